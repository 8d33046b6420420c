//! The device pieces of KV transfer on a machine without CUDA (CI): building a device data path
//! is a clear error naming the missing library, never a panic. The device checks themselves run
//! on the GPU machine (`ci/device/kv_run.sh`: mp_kv_p2p --path cuda-ipc / nccl, mp_kv_storage
//! --device).
#![cfg(feature = "cuda")]

use std::time::Duration;

use dist_kv::transfer::cuda::{CudaIpcDataPath, CudaKvCache, NcclDataPath};
use dist_kv::transfer::{Error, KvCacheSpec, KvLayout};

use dist_testkit::skipped;

#[test]
fn without_cuda_the_device_paths_are_clear_errors() {
    if dist_cuda::ensure_driver().is_ok() {
        // where libcuda loads (a GPU host), this test has nothing to check: a counted skip
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
