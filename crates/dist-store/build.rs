//! Finds out, on the machine that builds the tests (the one that runs them), whether it has an IPv6
//! loopback and a hard open-file limit high enough for the 4,096-connection test, so those tests are
//! `#[ignore]`d with the reason where it has not — counted as skipped, never as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dist_store_no_ipv6)");
    println!("cargo::rustc-check-cfg=cfg(dist_store_low_nofile)");
    println!("cargo:rerun-if-changed=build.rs");
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        println!("cargo::rustc-cfg=dist_store_no_ipv6");
    }
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        })
        .and_then(|v| {
            if v == "unlimited" {
                Some(u64::MAX)
            } else {
                v.parse().ok()
            }
        })
        .unwrap_or(0);
    if hard < 8_400 {
        println!("cargo::rustc-cfg=dist_store_low_nofile");
    }
}
