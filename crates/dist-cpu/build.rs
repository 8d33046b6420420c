//! Builds the C++ gloo shim when the `gloo` feature is on (Debian's `libgloo-dev`:
//! headers under /usr/include/gloo, `libgloo.so` under /usr/lib).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The two-namespace gloo test needs root (`ip netns`): without it the test is `#[ignore]`d
    // with the reason (counted as skipped, never as passed).
    println!("cargo::rustc-check-cfg=cfg(dist_cpu_not_root)");
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if euid.as_deref() != Some("0") {
        println!("cargo::rustc-cfg=dist_cpu_not_root");
    }
    #[cfg(feature = "gloo")]
    {
        println!("cargo:rerun-if-changed=src/gloo/shim.cc");
        cc::Build::new()
            .cpp(true)
            .file("src/gloo/shim.cc")
            .flag_if_supported("-std=c++17")
            .warnings(false)
            .compile("dist_cpu_gloo_shim");
        for dir in [
            "/usr/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
        ] {
            println!("cargo:rustc-link-search=native={dir}");
        }
        println!("cargo:rustc-link-lib=dylib=gloo");
    }
}
