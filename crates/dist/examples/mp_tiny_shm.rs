//! A `/dev/shm` too small for the shared segments must be a clear error when the group (or the
//! MessageQueue) is created — never a `SIGBUS` later.
//!
//! The program re-runs itself in a private mount namespace with a 1 MiB tmpfs on `/dev/shm`
//! (`unshare -m` + `mount`, which needs root). Where that is not possible it exits 77, which
//! `cargo xtask test-multiproc` counts as skipped.

use std::process::Command;
use std::time::Duration;

use dist::core::local::run_threads;
use dist::dist_cpu::mq::MessageQueue;
use dist::dist_cpu::ShmCommunicator;

const INNER: &str = "DIST_TINY_SHM_INNER";

fn inner() -> i32 {
    println!("INNER_STARTED");
    let t = Duration::from_secs(10);
    let comm = run_threads(2, t, |_, g| ShmCommunicator::new(&g, "tiny", t).map(|_| ()));
    let mq = run_threads(2, t, |_, g| {
        MessageQueue::create_from_group(&g, 0, 4 << 20, 6).map(|_| ())
    });
    let mut ok = true;
    for (what, outs) in [("shm communicator", comm), ("message queue", mq)] {
        for (r, o) in outs.into_iter().enumerate() {
            match o {
                Ok(Err(e)) if e.to_string().contains("/dev/shm") => {
                    println!("{what} rank {r}: clear error: {e}")
                }
                Ok(Err(e)) => {
                    println!("{what} rank {r}: error does not mention /dev/shm: {e}");
                    ok = false;
                }
                Ok(Ok(())) => {
                    println!("{what} rank {r}: created on a 1 MiB /dev/shm?");
                    ok = false;
                }
                Err(_) => {
                    println!("{what} rank {r}: panicked");
                    ok = false;
                }
            }
        }
    }
    if ok {
        0
    } else {
        1
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1");
        return;
    }
    if std::env::var_os(INNER).is_some() {
        std::process::exit(inner());
    }
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /dev/shm && exec \"$0\"",
        ])
        .arg(&exe)
        .env(INNER, "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED: cannot run unshare: {e}");
            std::process::exit(77);
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !stdout.contains("INNER_STARTED") {
        println!(
            "SKIPPED: cannot mount a small /dev/shm in a private namespace (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::process::exit(77);
    }
    match out.status.code() {
        Some(0) => println!("mp_tiny_shm: a 1 MiB /dev/shm is a clear error at creation"),
        Some(c) => std::process::exit(c),
        None => {
            println!("mp_tiny_shm: the inner program died by a signal (SIGBUS?)");
            std::process::exit(1);
        }
    }
}
