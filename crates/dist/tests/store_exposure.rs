//! What the `dist` binary exposes: a multi-node `dist run` without a token says so, and a
//! `dist store serve` flooded with wrong tokens answers them later and later, serves the right
//! token at once, and logs a bounded number of lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_store::proto::{Request, VALIDATION_MAGIC};
use dist_store::{ClientOptions, TcpStoreClient};

fn token_file(name: &str, token: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("dist-exposure-{name}-{}", std::process::id()));
    std::fs::write(&p, token).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

#[test]
fn a_multi_node_run_without_a_token_says_what_it_exposes() {
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dist"))
            .args([
                "run",
                "--nnodes",
                "2",
                "--node-rank",
                "0",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                "0",
                "--nproc-per-node",
                "1",
            ])
            .args(extra)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("WARNING: the job's store listens on 127.0.0.1:") && err.contains("no token"),
        "{err}"
    );
    assert!(err.contains("--token-file"), "{err}");
    let t = token_file("run", "s3cret");
    let err = run(&["--token-file", t.to_str().unwrap()]);
    assert!(!err.contains("WARNING"), "{err}");
    let _ = std::fs::remove_file(t);
}

/// One attempt with a wrong token: `Some(true)` answered (refused) within `fast`, `Some(false)`
/// answered later, `None` closed without an answer.
fn wrong_token(port: u16, fast: Duration) -> Option<bool> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut b = Vec::new();
    Request::Validate {
        magic: VALIDATION_MAGIC,
    }
    .encode(&mut b);
    Request::Auth {
        token: b"wrong".to_vec(),
    }
    .encode(&mut b);
    let t = Instant::now();
    c.write_all(&b).ok()?;
    let mut r = [0u8; 1];
    match c.read(&mut r) {
        Ok(1) => {
            assert_eq!(r[0], 1, "a wrong token was accepted");
            Some(t.elapsed() < fast)
        }
        _ => None,
    }
}

#[test]
fn a_wrong_token_flood_is_slowed_and_logged_at_a_bounded_rate() {
    let t = token_file("serve", "right-token");
    let mut srv = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(["store", "serve", "--port", "0", "--token-file"])
        .arg(&t)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    BufReader::new(srv.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    let mut stderr = srv.stderr.take().unwrap();
    let srv = Kill(srv);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = match wrong_token(port, Duration::from_millis(30)) {
                        Some(true) => 0,
                        Some(false) => 1,
                        None => 2,
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The right token is served at once, flood or not, from the same address.
    let t0 = Instant::now();
    let c = TcpStoreClient::connect(
        "127.0.0.1",
        port,
        ClientOptions {
            token: Some(b"right-token".to_vec()),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    c.ping().unwrap();
    let good = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    drop(c);
    drop(srv);
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("dropping connection"))
        .count();
    let [fast, slow, dropped] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
    eprintln!(
        "2 s of wrong tokens from 4 threads: {fast} refused at once, {slow} refused late, \
         {dropped} closed unanswered; {lines} log lines; right token served in {good:?}"
    );
    assert!(good < Duration::from_secs(1), "{good:?}");
    // Three free refusals (plus the few racing them), then each answer is delayed.
    assert!(fast <= 8, "{fast} refusals answered at once");
    assert!(slow + dropped > 0);
    // 5 lines per second and a summary line per second, over about 2 s.
    assert!(lines <= 20, "{lines} log lines:\n{log}");
    let _ = std::fs::remove_file(t);
}
