//! Test support shared by the workspace's tests and build scripts, so that a test which cannot
//! run is counted as skipped, never as passed:
//!
//! - [`library_installed`] (for build scripts): is a shared library installed on the build
//!   machine? A build script turns the answer into a `cfg` that `#[ignore]`s, with its reason,
//!   the tests whose requirement the machine lacks.
//! - [`skipped`] (for tests): the case no build script can foresee — a test binary built on one
//!   machine and run on another — printed and recorded where `cargo xtask test` counts it.
//! - [`closed_within`], [`drained_until_closed`] (for the hostile-peer suites): did the listener
//!   under test close a connection in time?

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// For build scripts: whether `soname` (e.g. `libcuda.so.1`) is in one of `dirs`, in a folder of
/// `LD_LIBRARY_PATH`, or in the dynamic loader's cache (`ldconfig -p`). Prints the
/// `cargo::rerun-if-*` lines that make the answer follow the machine.
pub fn library_installed(soname: &str, dirs: &[&str]) -> bool {
    println!("cargo::rerun-if-env-changed=LD_LIBRARY_PATH");
    let mut all: Vec<String> = dirs.iter().map(|d| d.to_string()).collect();
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        all.extend(p.split(':').filter(|d| !d.is_empty()).map(str::to_string));
    }
    for d in all.iter().filter(|d| Path::new(d).is_dir()) {
        println!("cargo::rerun-if-changed={d}");
    }
    all.iter().any(|d| Path::new(d).join(soname).exists())
        || std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(soname))
            .unwrap_or(false)
}

/// For tests that find at run time that they cannot run here: prints `SKIPPED: <test>: <reason>`
/// and, where `DIST_TEST_SKIPS` names a file (`cargo xtask test` sets it), appends that line to
/// it, so the run's summary counts a skip rather than a pass. The test returns after the call.
pub fn skipped(test: &str, reason: &str) {
    let line = format!("{test}: {reason}");
    eprintln!("SKIPPED: {line}");
    if let Some(p) = std::env::var_os("DIST_TEST_SKIPS") {
        use std::io::Write;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p);
        if let Ok(mut f) = f {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Reads and drops what arrives on `s` while `go()` holds: true as soon as the peer closes it
/// (EOF or reset), false once `go()` is false. The stream's read timeout is how often `go` is
/// asked.
pub fn drained_until_closed(s: &mut TcpStream, mut go: impl FnMut() -> bool) -> bool {
    let mut b = [0u8; 256];
    while go() {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// True when the peer closes `s` within `within` (EOF or reset; what it sends first is read and
/// dropped), false when it stays open that long.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("a non-zero read timeout");
    drained_until_closed(s, || Instant::now() < deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_that_no_machine_has_is_not_installed() {
        assert!(!library_installed(
            "libdist-testkit-none.so.0",
            &["/usr/lib", "/usr/lib64"]
        ));
    }

    #[test]
    fn a_closed_connection_is_told_from_an_open_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut open = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (kept, _) = l.accept().unwrap();
        assert!(!closed_within(&mut open, Duration::from_millis(100)));
        let mut closing = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut peer, b"bye").unwrap();
        drop(peer);
        assert!(closed_within(&mut closing, Duration::from_secs(5)));
        drop(kept);
    }

    #[test]
    fn a_skip_is_recorded_in_the_named_file() {
        let path = std::env::temp_dir().join(format!("dist-testkit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::env::set_var("DIST_TEST_SKIPS", &path);
        skipped("t", "why");
        skipped("u", "because");
        std::env::remove_var("DIST_TEST_SKIPS");
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "t: why\nu: because\n");
    }
}
