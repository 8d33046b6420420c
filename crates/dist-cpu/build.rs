//! Builds the C++ gloo shim when the `gloo` feature is on (Debian's `libgloo-dev`:
//! headers under /usr/include/gloo, `libgloo.so` under /usr/lib).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
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
