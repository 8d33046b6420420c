//! Test support shared by the workspace's tests and build scripts, so that a test which cannot
//! run is counted as skipped, never as passed:
//!
//! - [`library_installed`] (for build scripts): is a shared library installed on the build
//!   machine? A build script turns the answer into a `cfg` that `#[ignore]`s, with its reason,
//!   the tests whose requirement the machine lacks.
//! - [`skipped`] (for tests): the case no build script can foresee — a test binary built on one
//!   machine and run on another — printed and recorded where `cargo xtask test` counts it.

use std::path::Path;

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
