//! The CUDA backend through `dist_core::Backend`: clear errors without a driver or NCCL (what CI
//! runs), and with a GPU (ignored unless asked: `cargo test -p dist-cuda -- --ignored`) the
//! dist-core conformance suite at world size 1.

use std::time::Duration;

use dist_core::local::one_rank_context;
use dist_core::{Backend, CommunicatorContext, Device, DeviceKind, Error, HostTensor};
use dist_cuda::CudaBackend;

fn ctx(group: &str) -> CommunicatorContext {
    one_rank_context(group, Duration::from_secs(30))
}

use dist_testkit::skipped;

#[test]
fn without_a_driver_every_entry_point_says_which_library() {
    if dist_cuda::ensure_driver().is_ok() {
        // where libcuda loads (a GPU host), this test has nothing to check: a counted skip
        skipped(
            "dist-cuda without_a_driver_every_entry_point_says_which_library",
            "libcuda loads here; this test covers its absence",
        );
        return;
    }
    assert_eq!(dist_cuda::device_count(), 0);
    match CudaBackend::create_communicator(&ctx("tp:0")) {
        Err(Error::LibraryNotFound { library, tried }) => {
            assert_eq!(library, "libcuda");
            assert!(
                tried.iter().any(|t| t.starts_with("libcuda.so.1")),
                "{tried:?}"
            );
        }
        other => panic!("expected LibraryNotFound, got {other:?}"),
    }
    let t = HostTensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
    assert!(matches!(
        CudaBackend::from_host(&t, Device::new(DeviceKind::Cuda, 0)),
        Err(Error::LibraryNotFound { .. })
    ));
}

#[test]
fn a_host_device_is_refused() {
    let t = HostTensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
    assert!(matches!(
        CudaBackend::from_host(&t, Device::CPU),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn nccl_loader_reports_every_candidate() {
    match dist_nccl::library(dist_nccl::Flavor::Nccl) {
        Ok(lib) => assert!(lib.version().starts_with("2."), "{lib:?}"),
        Err(Error::LibraryNotFound { library, tried }) => {
            assert_eq!(library, "libnccl");
            assert!(
                tried.iter().any(|t| t.starts_with("libnccl.so.2: ")),
                "{tried:?}"
            );
            assert!(
                tried.iter().any(|t| t.starts_with("libnccl.so: ")),
                "{tried:?}"
            );
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl.so.2 (DIST_NCCL_SO_PATH)"]
fn conformance_world1_on_a_gpu() {
    let comm = CudaBackend::create_communicator(&ctx("tp:0")).unwrap();
    let n = dist_core::conformance::check_all::<CudaBackend>(
        &comm,
        &dist_core::conformance::Suite::quick(false),
    )
    .unwrap();
    assert!(n > 100);
    dist_core::DeviceCommunicator::destroy(&comm).unwrap();
}
