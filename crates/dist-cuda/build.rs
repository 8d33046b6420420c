//! Finds out whether the CUDA driver library (`libcuda.so.1`) is installed on the build machine,
//! so the test of its absence is `#[ignore]`d with the reason where it is present (counted as
//! skipped, never as passed). The crate itself loads the driver at run time.

use std::path::Path;

/// Where distributions and the NVIDIA container runtime put `libcuda.so.1`.
const DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/compat",
    "/usr/local/nvidia/lib64",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dist_cuda_libcuda)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LD_LIBRARY_PATH");
    let mut dirs: Vec<String> = DIRS.iter().map(|d| d.to_string()).collect();
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(p.split(':').filter(|d| !d.is_empty()).map(str::to_string));
    }
    let in_dirs = dirs
        .iter()
        .any(|d| Path::new(d).join("libcuda.so.1").exists());
    let in_cache = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"))
        .unwrap_or(false);
    for d in dirs.iter().filter(|d| Path::new(d).is_dir()) {
        println!("cargo:rerun-if-changed={d}");
    }
    if in_dirs || in_cache {
        println!("cargo::rustc-cfg=dist_cuda_libcuda");
    }
}
