//! Finds out, on the machine that builds the tests, whether the `libtpu` wheel (or a
//! `DIST_TEST_LIBTPU` / `TPU_LIBRARY_PATH` library) is there and whether `DIST_PJRT_PLUGIN` names a
//! plugin, so the tests that need them are `#[ignore]`d with the reason where they are not —
//! counted as skipped, never as passed. The crate itself loads every plugin at run time.

use std::path::PathBuf;

fn libtpu_found() -> bool {
    for var in ["DIST_TEST_LIBTPU", "TPU_LIBRARY_PATH"] {
        if let Ok(p) = std::env::var(var) {
            let p = PathBuf::from(p);
            let p = if p.is_dir() { p.join("libtpu.so") } else { p };
            if p.exists() {
                return true;
            }
        }
    }
    std::process::Command::new("python3")
        .args([
            "-c",
            "import libtpu, os; print(os.path.dirname(libtpu.__file__))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                .join("libtpu.so")
                .exists()
        })
        .unwrap_or(false)
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dist_tpu_no_libtpu)");
    println!("cargo::rustc-check-cfg=cfg(dist_tpu_plugin)");
    println!("cargo:rerun-if-changed=build.rs");
    for v in ["DIST_TEST_LIBTPU", "TPU_LIBRARY_PATH", "DIST_PJRT_PLUGIN"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if !libtpu_found() {
        println!("cargo::rustc-cfg=dist_tpu_no_libtpu");
    }
    if std::env::var_os("DIST_PJRT_PLUGIN").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=dist_tpu_plugin");
    }
}
