//! With `DIST_HIP_SO_PATH` naming a file that does not exist, every entry point of the ROCm
//! backend reports `LibraryNotFound` for `libamdhip64`, listing the path tried and the loader's
//! reason, and never panics (whatever is installed on the machine: the override is the only
//! candidate when set). One test in this binary, so the environment is set before the
//! process-wide loader first runs.

use std::time::Duration;

use dist_core::local::one_rank_context;
use dist_core::{Backend, DType, Device, DeviceKind, Error, HostTensor};
use dist_rocm::{DeviceContext, RocmBackend, RocmTensor};

const MISSING: &str = "/nonexistent/dist-rocm-test/libamdhip64.so.6";

fn check(what: &str, e: Error) -> String {
    match &e {
        Error::LibraryNotFound { library, tried } => {
            assert_eq!(library, "libamdhip64", "{what}");
            assert_eq!(tried.len(), 1, "{what}: {tried:?}");
            assert!(tried[0].starts_with(MISSING), "{what}: {tried:?}");
            // The loader's reason follows the path.
            assert!(tried[0].len() > MISSING.len() + 2, "{what}: {tried:?}");
        }
        other => panic!("{what}: expected LibraryNotFound, got {other:?}"),
    }
    format!("{what}: {e}")
}

#[test]
fn a_missing_hip_runtime_is_library_not_found_everywhere() {
    std::env::set_var("DIST_HIP_SO_PATH", MISSING);
    let x = HostTensor::random(DType::BF16, &[5], 1);
    let ctx = one_rank_context("tp:0", Duration::from_secs(5));
    let msgs = [
        check("ensure_driver", dist_rocm::ensure_driver().unwrap_err()),
        check("probe", dist_rocm::probe().unwrap_err()),
        check("visible_devices", dist_rocm::visible_devices().unwrap_err()),
        check("DeviceContext::get", DeviceContext::get(0).unwrap_err()),
        check(
            "RocmTensor::from_host",
            RocmTensor::from_host(&x, 0).unwrap_err(),
        ),
        check(
            "RocmBackend::from_host",
            RocmBackend::from_host(&x, Device::new(DeviceKind::Rocm, 0)).unwrap_err(),
        ),
        check(
            "RocmBackend::create_communicator",
            RocmBackend::create_communicator(&ctx).unwrap_err(),
        ),
    ];
    assert_eq!(dist_rocm::device_count(), 0);
    // The message a user sees names the library and the path.
    assert!(msgs[1].contains("library libamdhip64 not found (tried: /nonexistent/"));
    for m in msgs {
        eprintln!("{m}");
    }
}
