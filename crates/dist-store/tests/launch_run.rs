//! The launcher with `sh` as the program: environment contract, the store it hosts,
//! failure propagation, and the job timeout.

use std::time::{Duration, Instant};

use dist_store::launch::{run, LaunchOptions};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dist-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[test]
fn sets_torchrun_variables_and_hosts_the_store() {
    let d = tmpdir("env");
    let script = format!(
        "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $TORCHELASTIC_USE_AGENT_STORE\" > {}/$RANK",
        d.display()
    );
    let mut o = LaunchOptions::new(3, sh(&script));
    o.timeout = Some(20.0);
    assert_eq!(run(&o).unwrap(), 0);
    let mut port = None;
    for r in 0..3 {
        let line = std::fs::read_to_string(d.join(r.to_string())).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &f[..5],
            &[&r.to_string(), &r.to_string(), "3", "3", "127.0.0.1"]
        );
        assert_eq!(f[6], "True");
        let p: u16 = f[5].parse().unwrap();
        assert!(port.map_or(true, |q| q == p));
        port = Some(p);
    }
}

#[test]
fn ranks_reach_the_store_on_master_port() {
    // While the rank runs, our client reaches the store at MASTER_PORT.
    let d = tmpdir("store");
    let mut o = LaunchOptions::new(
        1,
        sh(&format!(
            "echo $MASTER_PORT > {}/port; sleep 1",
            d.display()
        )),
    );
    o.timeout = Some(20.0);
    let dd = d.clone();
    let h = std::thread::spawn(move || run(&o).unwrap());
    let t0 = Instant::now();
    let port: u16 = loop {
        if let Ok(s) = std::fs::read_to_string(dd.join("port")) {
            if let Ok(p) = s.trim().parse() {
                break p;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    };
    let c = dist_store::TcpStoreClient::connect("127.0.0.1", port, Default::default()).unwrap();
    c.ping().unwrap();
    assert_eq!(h.join().unwrap(), 0);
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let mut o = LaunchOptions::new(4, sh("if [ $RANK = 2 ]; then exit 7; fi; exec sleep 30"));
    o.kill_grace = 1.0;
    let t0 = Instant::now();
    assert_eq!(run(&o).unwrap(), 7);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn timeout_kills_a_hung_job() {
    let mut o = LaunchOptions::new(2, sh("exec sleep 30"));
    o.timeout = Some(0.3);
    let t0 = Instant::now();
    assert_eq!(run(&o).unwrap(), 124);
    assert!(t0.elapsed() < Duration::from_secs(4));
}

#[test]
fn a_rank_killed_by_a_signal_exits_128_plus_n() {
    let o = LaunchOptions::new(1, sh("kill -9 $$"));
    assert_eq!(run(&o).unwrap(), 128 + 9);
}

#[test]
fn a_missing_program_is_an_error() {
    let o = LaunchOptions::new(1, ["/nonexistent/program"]);
    let e = run(&o).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/program"), "{e}");
}
