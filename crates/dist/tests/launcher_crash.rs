//! The launcher's crash leftovers: `dist run` killed with SIGKILL must take its ranks along
//! (they get the parent-death signal), and when a rank is killed inside an all-reduce, the
//! launcher's report must name that all-reduce.
//!
//! Ranks of the second test are this test binary re-executed (`--exact crash_worker_entry
//! --include-ignored`) with `DIST_CRASH_CASE` set.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dist::{DType, DistEnv, HostTensor, InitOptions, ParallelConfig};

const CASE_ENV: &str = "DIST_CRASH_CASE";

/// Entry point of the rank processes, which run it with `--include-ignored`; ignored in a normal
/// test run, so it is never counted as a passed test.
#[test]
#[ignore = "entry point of the rank processes the crash test starts"]
fn crash_worker_entry() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        // `--include-ignored` without the parent: not a test, nothing to do
        return;
    };
    match worker(&case) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("RANK_ERROR: {e}");
            std::process::exit(1)
        }
    }
}

fn worker(case: &str) -> Result<(), Box<dyn std::error::Error>> {
    assert_eq!(case, "kill_in_all_reduce");
    let env = DistEnv::init(&InitOptions::default())?;
    let rank = env.world().rank;
    let state = env.initialize_model_parallel::<dist::DefaultBackend>(ParallelConfig {
        tp: 2,
        ..ParallelConfig::new(2)
    })?;
    if rank == 0 {
        // Never enters the all-reduce: rank 1 waits in it until it is killed.
        std::thread::sleep(Duration::from_secs(30));
        return Ok(());
    }
    // Enter the all-reduce right after a periodic publish of our snapshot, so that a
    // publisher that only published every 200 ms would not publish again before we die.
    let key = dist::core::diag::snapshot_key(rank);
    let beat = |e: &DistEnv| -> Option<u64> {
        let b = e.store().get(&key, Duration::from_secs(5)).ok()?;
        dist::core::decode_obj::<dist::core::diag::Snapshot>(&b, 1 << 20)
            .ok()
            .map(|s| s.heartbeat_ms)
    };
    let first = beat(&env);
    let t0 = Instant::now();
    while beat(&env) == first && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(40));
        // SAFETY: raising SIGKILL on ourselves: the process ends here, inside the all-reduce
        // the main thread entered.
        unsafe { libc::raise(libc::SIGKILL) };
    });
    state
        .tp()
        .all_reduce(HostTensor::random(DType::F32, &[1024], 1))?;
    Err("the all-reduce returned without its peer".into())
}

/// A rank killed with SIGKILL inside an all-reduce: the launcher's failure line names the
/// all-reduce it was in (before: "no collective call yet", the rank having died before its
/// next 200 ms publish).
#[test]
fn the_crash_report_names_the_op_a_killed_rank_was_in() {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args([
            "run",
            "--nproc-per-node",
            "2",
            "--timeout",
            "60",
            "--kill-grace",
            "1",
            "--",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "crash_worker_entry",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_ENV, "kill_in_all_reduce")
        .env("DIST_TIMEOUT", "30")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("dist run: rank 1 failed"))
        .unwrap_or_else(|| panic!("no failure line:\n{err}"));
    eprintln!("{line}");
    assert!(line.contains("signal 9 (SIGKILL)"), "{line}");
    assert!(line.contains("while in tp:0 all_reduce #"), "{line}");
    let summary = err
        .lines()
        .find(|l| l.contains("rank 1 (pid"))
        .unwrap_or_else(|| panic!("no summary line for rank 1:\n{err}"));
    assert!(
        summary.contains("tp:0 all_reduce #") && summary.contains("still running"),
        "{summary}"
    );
}

fn alive(pid: u32) -> bool {
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
    }
}

fn wait_for_files(d: &Path, n: usize, limit: Duration) -> Vec<u32> {
    let t0 = Instant::now();
    loop {
        let pids: Vec<u32> = (0..n)
            .filter_map(|r| std::fs::read_to_string(d.join(r.to_string())).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if pids.len() == n {
            return pids;
        }
        assert!(t0.elapsed() < limit, "ranks did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL of the launcher: its ranks die at once (the parent-death signal) instead of running
/// on to the end of the job with nobody reading their output.
#[test]
fn sigkill_of_the_launcher_takes_its_ranks_along() {
    let d = std::env::temp_dir().join(format!("dist-launcher-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let script = format!(
        "echo $$ > {}/$RANK.tmp && mv {}/$RANK.tmp {}/$RANK; exec sleep 30",
        d.display(),
        d.display(),
        d.display()
    );
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(["run", "--nproc-per-node", "3", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pids = wait_for_files(&d, 3, Duration::from_secs(20));
    assert!(pids.iter().all(|p| alive(*p)));
    launcher.kill().unwrap(); // SIGKILL: no handler, no cleanup in the launcher
    let _ = launcher.wait();
    let t0 = Instant::now();
    while pids.iter().any(|p| alive(*p)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &left {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    let mut e = String::new();
    let _ = launcher.stderr.take().map(|mut s| s.read_to_string(&mut e));
    assert!(
        left.is_empty(),
        "ranks {left:?} outlived their SIGKILLed launcher by {:?}",
        t0.elapsed()
    );
    eprintln!(
        "3 ranks gone {:?} after the launcher's SIGKILL",
        t0.elapsed()
    );
    let _ = std::fs::remove_dir_all(&d);
}
