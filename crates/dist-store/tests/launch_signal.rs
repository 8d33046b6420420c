//! SIGTERM sent to the launcher reaches every rank (its own test binary: the signal flag is
//! process-wide).

use std::time::{Duration, Instant};

use dist_store::launch::{run, LaunchOptions};

#[test]
fn sigterm_is_forwarded_to_every_rank() {
    let d = std::env::temp_dir().join(format!("dist-store-sig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let script = format!(
        "trap 'echo got > {}/$RANK; exit 5' TERM; touch {}/up$RANK; sleep 30 & wait",
        d.display(),
        d.display()
    );
    let mut o = LaunchOptions::new(3, ["sh".to_string(), "-c".into(), script]);
    o.timeout = Some(20.0);
    o.kill_grace = 2.0;
    let h = std::thread::spawn(move || run(&o).unwrap());
    let t0 = Instant::now();
    while (0..3).any(|r| !d.join(format!("up{r}")).exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let me = std::process::id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &me])
        .status()
        .unwrap()
        .success());
    let code = h.join().unwrap();
    assert_eq!(code, 5);
    for r in 0..3 {
        assert!(
            d.join(r.to_string()).exists(),
            "rank {r} did not get SIGTERM"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
}
