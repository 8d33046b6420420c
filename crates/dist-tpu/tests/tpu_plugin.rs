//! dist-tpu against what this machine has: clear errors with no plugin (always), and, where the
//! `libtpu` wheel is installed (found through `DIST_TEST_LIBTPU`, `TPU_LIBRARY_PATH` or the
//! Python package), that `GetPjrtApi` loads and reports its version and that client creation
//! fails with a "no TPU" error on a host without TPUs. Without libtpu at build time (see
//! `build.rs`) that test is `#[ignore]`d with the reason: counted as skipped, never as a pass.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dist_core::local::one_rank_context;
use dist_core::{Backend, Device, Error, HostTensor};
use dist_tpu::{Library, TpuBackend};

use dist_testkit::skipped;

#[test]
#[cfg_attr(
    dist_tpu_system_libtpu,
    ignore = "SKIPPED: a libtpu.so is installed system-wide on the build machine; this test covers its absence"
)]
fn no_plugin_is_library_not_found_listing_every_try() {
    match Library::open_with(
        Some("/nonexistent/plugin.so"),
        Some("/nonexistent/libtpu-dir/libtpu.so"),
        false,
    ) {
        Err(Error::LibraryNotFound { library, tried }) => {
            assert!(library.contains("PJRT plugin"), "{library}");
            assert!(
                tried[0].starts_with("/nonexistent/plugin.so: "),
                "{tried:?}"
            );
            assert!(
                tried[1].starts_with("/nonexistent/libtpu-dir/libtpu.so: "),
                "{tried:?}"
            );
            // libtpu.so on the loader's path is tried last (and is absent here unless installed
            // system-wide, in which case it loaded and we are in the Ok arm)
            assert!(
                tried.iter().any(|t| t.starts_with("libtpu.so: ")),
                "{tried:?}"
            );
            assert!(
                tried.iter().all(|t| t.len() > t.find(": ").unwrap() + 2),
                "each has a reason: {tried:?}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        // built where no system libtpu.so was found, run where one loads
        Ok(l) => skipped(
            "dist-tpu no_plugin_is_library_not_found_listing_every_try",
            &format!("a system libtpu.so loaded ({l:?}); this test covers its absence"),
        ),
    }
}

#[test]
fn a_host_device_is_refused_before_any_plugin_is_loaded() {
    let t = HostTensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
    assert!(matches!(
        TpuBackend::from_host(&t, Device::CPU),
        Err(Error::InvalidArgument(_))
    ));
}

fn libtpu_path() -> Option<PathBuf> {
    for var in ["DIST_TEST_LIBTPU", "TPU_LIBRARY_PATH"] {
        if let Ok(p) = std::env::var(var) {
            let p = PathBuf::from(p);
            let p = if p.is_dir() { p.join("libtpu.so") } else { p };
            if p.exists() {
                return Some(p);
            }
        }
    }
    dist_tpu::loader::python_libtpu_dir()
        .map(|d| d.join("libtpu.so"))
        .filter(|p| p.exists())
}

fn open_libtpu() -> &'static Library {
    let path = libtpu_path().expect("the build found libtpu, the test run does not");
    let lib: &'static Library = match Library::open_path(&path) {
        Ok(l) => Box::leak(Box::new(l)),
        Err(e) => panic!("{} did not load: {e}", path.display()),
    };
    lib
}

#[test]
#[cfg_attr(
    dist_tpu_no_libtpu,
    ignore = "SKIPPED: libtpu was not installed at build time (pip install libtpu, or DIST_TEST_LIBTPU=/path/libtpu.so)"
)]
fn libtpu_loads_and_reports_its_version() {
    let lib = open_libtpu();
    assert_eq!(lib.major, 0);
    assert!(lib.minor >= dist_tpu::MIN_API_MINOR, "{lib:?}");
    assert!(lib.is_libtpu());
    eprintln!("{} reports PJRT API {}", lib.path, lib.version());
}

#[test]
#[cfg_attr(
    dist_tpu_no_libtpu,
    ignore = "SKIPPED: libtpu was not installed at build time (pip install libtpu, or DIST_TEST_LIBTPU=/path/libtpu.so)"
)]
#[cfg_attr(
    all(not(dist_tpu_no_libtpu), dist_tpu_chips),
    ignore = "SKIPPED: the build machine has TPU chips; this test covers a host without them"
)]
fn libtpu_says_no_tpu_on_a_host_without_chips() {
    let lib = open_libtpu();
    if dist_tpu::loader::tpu_chip_count(std::path::Path::new(dist_tpu::loader::PCI_DEVICES)) > 0 {
        // built on a host without TPU chips, run on one with them
        skipped(
            "dist-tpu libtpu_says_no_tpu_on_a_host_without_chips",
            "this host has TPU chips; the no-TPU error is not what happens here",
        );
        return;
    }
    let t = Instant::now();
    match dist_tpu::Client::create(lib, &[], None, Duration::from_secs(60)) {
        Err(e) => {
            let s = e.to_string();
            eprintln!("client creation: {s}");
            assert!(s.contains("no TPU"), "{s}");
            assert!(s.contains("pjrt"), "{s}");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        }
        Ok(c) => panic!("a client on a host without TPUs: {c:?}"),
    }
}

#[test]
#[cfg_attr(
    not(dist_tpu_plugin),
    ignore = "SKIPPED: DIST_PJRT_PLUGIN was not set at build time (a plugin with a device is needed)"
)]
fn conformance_world1_needs_a_plugin_with_a_device() {
    // Runs only where DIST_PJRT_PLUGIN names a plugin whose client finds a device (the device
    // machine runs the same through examples/pjrt_check.rs).
    let ctx = one_rank_context("tp:0", Duration::from_secs(60));
    let comm = TpuBackend::create_communicator(&ctx)
        .unwrap_or_else(|e| panic!("DIST_PJRT_PLUGIN is set but gives no usable device: {e}"));
    let n = dist_core::conformance::check_all::<TpuBackend>(
        &comm,
        &dist_core::conformance::Suite::quick(false),
    )
    .unwrap();
    assert!(n > 100);
}
