//! Sets `cfg(dist_kv_python)` when `DIST_KV_PYTHON` names the Python for the cross-language tests,
//! and `cfg(dist_kv_libcuda)` when the CUDA driver library is installed on the build machine, so
//! tests whose requirement is absent are reported as ignored (skipped) with the reason, not as
//! passed.

use std::path::Path;

/// Where distributions and the NVIDIA container runtime put `libcuda.so.1`.
const CUDA_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/compat",
    "/usr/local/nvidia/lib64",
];

fn libcuda_installed() -> bool {
    println!("cargo::rerun-if-env-changed=LD_LIBRARY_PATH");
    let mut dirs: Vec<String> = CUDA_DIRS.iter().map(|d| d.to_string()).collect();
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(p.split(':').filter(|d| !d.is_empty()).map(str::to_string));
    }
    for d in dirs.iter().filter(|d| Path::new(d).is_dir()) {
        println!("cargo::rerun-if-changed={d}");
    }
    dirs.iter()
        .any(|d| Path::new(d).join("libcuda.so.1").exists())
        || std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"))
            .unwrap_or(false)
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dist_kv_python)");
    println!("cargo::rustc-check-cfg=cfg(dist_kv_libcuda)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=DIST_KV_PYTHON");
    if std::env::var_os("DIST_KV_PYTHON").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=dist_kv_python");
    }
    if libcuda_installed() {
        println!("cargo::rustc-cfg=dist_kv_libcuda");
    }
}
