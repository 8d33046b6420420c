//! Every entry point of the ROCm backend on a machine that has the HIP runtime but no AMD GPU
//! (CI: Debian's `libamdhip64-dev`, HIP 5.2) reports "no ROCm device" as an error, never a
//! panic, and names where the runtime came from. Ignored (counted as skipped, with the reason)
//! where the build machine has no `libamdhip64` at all; on a machine with an AMD GPU it checks
//! the positive side of the same entry points instead.

use std::time::Duration;

use dist_core::local::one_rank_context;
use dist_core::{Backend, CommunicatorContext, DType, Device, DeviceKind, HostTensor};
use dist_rocm::{is_no_device, DeviceContext, RocmBackend, RocmTensor};

fn context() -> CommunicatorContext {
    one_rank_context("tp:0", Duration::from_secs(5))
}

#[test]
#[cfg_attr(
    not(hip_runtime_found),
    ignore = "SKIPPED: no libamdhip64 on the build machine (apt-get install libamdhip64-dev)"
)]
fn every_entry_point_reports_no_rocm_device() {
    // The runtime loads (this test only runs where the build found it).
    let rt = dist_rocm::ensure_driver().expect("the HIP runtime should load");
    assert!(rt.version_code > 0, "{rt:?}");
    let x = HostTensor::random(DType::F32, &[3, 4], 7);
    let on = Device::new(DeviceKind::Rocm, 0);

    if let Ok(n) = dist_rocm::visible_devices() {
        // A machine with an AMD GPU: the same entry points work.
        assert!(n > 0);
        let p = dist_rocm::probe().unwrap();
        assert!(p.contains("rocm:0"), "{p}");
        let d = RocmBackend::from_host(&x, on).unwrap();
        assert_eq!(RocmBackend::to_host(&d).unwrap(), x);
        eprintln!("an AMD GPU is present: checked the positive paths; {p}");
        return;
    }

    let mut seen = Vec::new();
    let mut expect_no_device = |what: &str, e: dist_core::Error| {
        assert!(
            is_no_device(&e),
            "{what}: expected 'no ROCm device', got {e:?}"
        );
        assert!(e.to_string().contains("no ROCm device"), "{what}: {e}");
        seen.push(format!("{what}: {e}"));
    };

    assert_eq!(dist_rocm::device_count(), 0);
    expect_no_device("visible_devices", dist_rocm::visible_devices().unwrap_err());
    let p = dist_rocm::probe().unwrap_err();
    // The probe's error says which runtime answered, so the CLI's message is actionable.
    assert!(p.to_string().contains(&rt.version()), "{p}");
    expect_no_device("probe", p);
    expect_no_device("DeviceContext::get", DeviceContext::get(0).unwrap_err());
    expect_no_device(
        "RocmTensor::from_host",
        RocmTensor::from_host(&x, 0).unwrap_err(),
    );
    expect_no_device(
        "RocmBackend::from_host",
        RocmBackend::from_host(&x, on).unwrap_err(),
    );
    expect_no_device(
        "RocmBackend::create_communicator",
        RocmBackend::create_communicator(&context()).unwrap_err(),
    );
    // Asked again (the registry and the runtime are process-wide): the same answer.
    expect_no_device(
        "DeviceContext::get again",
        DeviceContext::get(0).unwrap_err(),
    );
    // A tensor for another backend is refused for what it is, not for the device.
    let e = RocmBackend::from_host(&x, Device::new(DeviceKind::Cuda, 0)).unwrap_err();
    assert!(matches!(e, dist_core::Error::InvalidArgument(_)), "{e:?}");
    for s in &seen {
        eprintln!("{s}");
    }
}
