//! Finds out whether a HIP runtime (`libamdhip64`) is installed on the build machine, so the
//! tests that need one are `#[ignore]`d (counted as skipped, with the reason) where it is not.
//! The crate itself never links HIP: it is loaded at run time.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hip_runtime_found)");
    println!("cargo:rerun-if-env-changed=ROCM_PATH");
    println!("cargo:rerun-if-env-changed=DIST_HIP_SO_PATH");
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("ROCM_PATH") {
        dirs.push(std::path::Path::new(&p).join("lib"));
    }
    for d in [
        "/opt/rocm/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(d.into());
    }
    let names = [
        "libamdhip64.so",
        "libamdhip64.so.7",
        "libamdhip64.so.6",
        "libamdhip64.so.5",
    ];
    let found = dirs
        .iter()
        .any(|d| names.iter().any(|n| d.join(n).exists()));
    // A directory's mtime changes when a library is installed into it; missing ones are
    // not named (cargo would re-run the script on every build).
    for d in dirs.iter().filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", d.display());
    }
    if found {
        println!("cargo:rustc-cfg=hip_runtime_found");
    }
}
