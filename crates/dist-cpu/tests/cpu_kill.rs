//! kill -9 of a rank in the middle of all-reduces: the other ranks (real processes) fail with an
//! error naming it well within their deadline, and no shared segment of the job is left behind.
//!
//! The test re-runs its own binary as the ranks (`DIST_CPU_KILL_CHILD=1`), with a
//! `dist_store::StatelessProcessGroup` (rank 0 hosts the store) as their host group.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dist_core::{DType, DeviceCommunicator, Error, HostTensor, ReduceOp};
use dist_cpu::ShmCommunicator;
use dist_store::StatelessProcessGroup;

const TEST: &str = "killed_rank_is_named_and_leaves_no_segment";
const WORLD: usize = 4;
const VICTIM: usize = 2;
const DEADLINE: Duration = Duration::from_secs(5);

fn child() -> ! {
    // Die with the parent test, whatever happens to it.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and changes only this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Written straight to fd 1: the test harness captures `println!`.
    let say = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "KILLTEST {s}");
        let _ = o.flush();
    };
    let g = match StatelessProcessGroup::from_env(Duration::from_secs(30)) {
        Ok(g) => g,
        Err(e) => {
            say(format!("SETUP {e}"));
            std::process::exit(2)
        }
    };
    let c = match ShmCommunicator::new(&g, "kill-test", DEADLINE) {
        Ok(c) => c,
        Err(e) => {
            say(format!("SETUP {e}"));
            std::process::exit(2)
        }
    };
    let mut t = HostTensor::random(DType::F32, &[1 << 20], 1);
    say("READY".into());
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let start = Instant::now();
        match c.all_reduce_in_place(&mut t.view_mut(), ReduceOp::Max) {
            Ok(()) => {}
            Err(e) => {
                let took = start.elapsed().as_millis();
                let what = match &e {
                    Error::PeerLost { rank, .. } => format!("LOST {rank}"),
                    Error::Timeout { missing_ranks, .. } => format!("TIMEOUT {missing_ranks:?}"),
                    _ => "OTHER".into(),
                };
                say(format!("ERR {what} {took} {e}"));
                std::process::exit(0)
            }
        }
    }
    say("NOERROR".into());
    std::process::exit(1)
}

fn segments_of(pid: u32) -> Vec<String> {
    let prefix = format!("{}{pid}.", dist_cpu::shm::SEGMENT_PREFIX);
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_rank_is_named_and_leaves_no_segment() {
    if std::env::var("DIST_CPU_KILL_CHILD").is_ok() {
        child();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut kids = Vec::new();
    for r in 0..WORLD {
        let mut k = Command::new(&exe)
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env("DIST_CPU_KILL_CHILD", "1")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", WORLD.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", WORLD.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = k.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The harness prints "test NAME ... " before the test runs, without a newline.
                if let Some(i) = line.find("KILLTEST ") {
                    let _ = tx.send((r, line[i + 9..].to_string()));
                }
            }
        });
        kids.push(k);
    }
    let pids: Vec<u32> = kids.iter().map(|k| k.id()).collect();
    /// Kills and reaps every child when the test ends, passed or not.
    struct Reap(Vec<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for k in &mut self.0 {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
    }
    let mut kids = Reap(kids);
    let kids = &mut kids.0;
    let mut ready = 0;
    let mut results: Vec<Option<String>> = vec![None; WORLD];
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready < WORLD {
        let (r, m) = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("ranks did not get ready");
        assert!(!m.starts_with("SETUP"), "rank {r}: {m}");
        if m == "READY" {
            ready += 1;
        }
    }
    // Let the all-reduces run, then kill -9 the victim in the middle of one, and reap it.
    std::thread::sleep(Duration::from_millis(300));
    kids[VICTIM].kill().unwrap();
    kids[VICTIM].wait().unwrap();
    let killed_at = Instant::now();
    while results
        .iter()
        .enumerate()
        .any(|(r, x)| r != VICTIM && x.is_none())
    {
        let (r, m) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a surviving rank did not report");
        results[r] = Some(m);
    }
    let noticed = killed_at.elapsed();
    eprintln!("survivors noticed after {noticed:?}: {results:?}");
    for (r, k) in kids.iter_mut().enumerate() {
        if r != VICTIM {
            let st = k.wait().unwrap();
            assert!(st.success(), "rank {r} exited with {st}");
        }
    }
    for (r, m) in results.iter().enumerate() {
        let Some(m) = m else { continue };
        let ok = m.starts_with(&format!("ERR LOST {VICTIM} "))
            || m.starts_with(&format!("ERR TIMEOUT [{VICTIM}] "));
        assert!(ok, "rank {r} reported {m}");
        let took: u64 = m.split(' ').nth(3).unwrap().parse().unwrap();
        assert!(
            took < DEADLINE.as_millis() as u64 + 1000,
            "rank {r} took {took} ms: {m}"
        );
    }
    // Detected through the pid, not the deadline.
    assert!(noticed < DEADLINE, "survivors noticed after {noticed:?}");
    for (r, pid) in pids.iter().enumerate() {
        assert_eq!(
            segments_of(*pid),
            Vec::<String>::new(),
            "rank {r} left segments"
        );
    }
}
