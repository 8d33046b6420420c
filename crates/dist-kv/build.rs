//! Sets `cfg(dist_kv_python)` when `DIST_KV_PYTHON` names the Python for the cross-language tests,
//! so without it those tests are reported as ignored (skipped), not as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dist_kv_python)");
    println!("cargo::rerun-if-env-changed=DIST_KV_PYTHON");
    if std::env::var_os("DIST_KV_PYTHON").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=dist_kv_python");
    }
}
