//! The device pieces of KV transfer on a machine without CUDA (CI): building a device data path
//! is a clear error naming the missing library, never a panic. The device checks themselves run
//! on the GPU machine (`ci/device/kv_run.sh`: mp_kv_p2p --path cuda-ipc / nccl, mp_kv_storage
//! --device).
#![cfg(feature = "cuda")]

use std::time::Duration;

use dist_kv::transfer::cuda::{CudaIpcDataPath, CudaKvCache, NcclDataPath};
use dist_kv::transfer::{Error, KvCacheSpec, KvLayout};

/// Reports a test that cannot run here: prints `SKIPPED: <test>: <reason>` and, where
/// `DIST_TEST_SKIPS` names a file (`cargo xtask test` sets it), appends that line to it, so the
/// run's summary counts a skip rather than a pass.
fn skipped(test: &str, reason: &str) {
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

#[test]
#[cfg_attr(
    dist_kv_libcuda,
    ignore = "SKIPPED: libcuda is installed on the build machine; this test covers its absence"
)]
fn without_cuda_the_device_paths_are_clear_errors() {
    if dist_cuda::ensure_driver().is_ok() {
        // built where libcuda was absent, run where it loads (a test binary taken to a GPU host)
        skipped(
            "dist-kv without_cuda_the_device_paths_are_clear_errors",
            "libcuda loads here; this test covers its absence",
        );
        return;
    }
    // dist-core's LibraryNotFound, carried as a backend error naming the library.
    let missing_libcuda = |e: Error| {
        assert!(
            matches!(&e, Error::Backend(m) if m.contains("library libcuda not found")),
            "{e}"
        );
    };
    missing_libcuda(CudaIpcDataPath::new(0).unwrap_err());
    missing_libcuda(NcclDataPath::new(0, Duration::from_secs(1)).unwrap_err());
    let spec = KvCacheSpec {
        kv: 2,
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 8,
        dtype: dist_core::DType::BF16,
        layout: KvLayout::Hnd,
    };
    let host = dist_kv::transfer::PagedKvCache::zeros(spec).unwrap();
    missing_libcuda(CudaKvCache::from_host(&host, 0).unwrap_err());
}
