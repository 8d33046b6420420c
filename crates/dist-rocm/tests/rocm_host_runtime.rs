//! This crate's HIP runtime (device registry, allocation and its cache, host↔device copies, the
//! strided copy the re-layouts are made of, event records and stream waits, IPC handles, graph
//! capture, events, the communicator's checks and life cycle over RCCL's absence) on a **test
//! double of the HIP runtime that keeps "device" memory in host memory** and runs every async
//! call synchronously. The generic layer above it is tested in dist-nccl on its own. It is installed with
//! `hip::install_runtime`, as a real HIP-compatible runtime would be, so CI exercises these
//! paths without an AMD GPU. It checks this crate's code, not HIP; collectives need RCCL and
//! are tested on hardware (`examples/mp_rocm.rs`).
//!
//! The double is strict where HIP is: frees of unknown pointers, pitches smaller than the row
//! width, and ordinals past the device count are errors, so misuse shows up here.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dist_core::local::one_rank_context;
use dist_core::{
    Backend, CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error, HostTensor,
    ReduceOp, Tensor,
};
use dist_nccl::{RawStream, Strided};
use dist_rocm::hip::{self, safe::Event, sys, Runtime};
use dist_rocm::{
    Communicator, DeviceBuffer, DeviceContext, GpuRuntime, Options, RocmBackend, RocmTensor,
    TensorView,
};

const DEVICES: c_int = 2;
const INVALID: c_int = sys::hipErrorInvalidValue;

fn allocs() -> &'static Mutex<HashMap<usize, Layout>> {
    static A: OnceLock<Mutex<HashMap<usize, Layout>>> = OnceLock::new();
    A.get_or_init(|| Mutex::new(HashMap::new()))
}

thread_local! {
    static CURRENT: std::cell::Cell<c_int> = const { std::cell::Cell::new(0) };
}

/// A distinct fake handle per stream or event (never dereferenced).
fn token() -> *mut c_void {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    (NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 64) as *mut c_void
}

unsafe extern "C" fn error_string(_: c_int) -> *const c_char {
    c"fake HIP error".as_ptr()
}
unsafe extern "C" fn version(v: *mut c_int) -> c_int {
    // SAFETY: the caller passes a valid out-pointer.
    unsafe { *v = 60_342_134 };
    0
}
unsafe extern "C" fn device_count(n: *mut c_int) -> c_int {
    // SAFETY: as above.
    unsafe { *n = DEVICES };
    0
}
unsafe extern "C" fn get_device(n: *mut c_int) -> c_int {
    // SAFETY: as above.
    unsafe { *n = CURRENT.with(|c| c.get()) };
    0
}
unsafe extern "C" fn set_device(d: c_int) -> c_int {
    if !(0..DEVICES).contains(&d) {
        return sys::hipErrorInvalidDevice;
    }
    CURRENT.with(|c| c.set(d));
    0
}
unsafe extern "C" fn name(buf: *mut c_char, len: c_int, dev: c_int) -> c_int {
    let s = format!("Fake Instinct {dev}\0");
    if len < s.len() as c_int {
        return INVALID;
    }
    // SAFETY: the buffer holds `len` >= s.len() chars.
    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr() as *const c_char, buf, s.len()) };
    0
}
unsafe extern "C" fn total_mem(b: *mut usize, _: c_int) -> c_int {
    // SAFETY: valid out-pointer.
    unsafe { *b = 64 << 30 };
    0
}
unsafe extern "C" fn ok0() -> c_int {
    0
}
unsafe extern "C" fn stream_create(s: *mut *mut c_void, _: c_uint) -> c_int {
    // SAFETY: valid out-pointer.
    unsafe { *s = token() };
    0
}
unsafe extern "C" fn ok1(_: *mut c_void) -> c_int {
    0
}
unsafe extern "C" fn malloc(p: *mut *mut c_void, bytes: usize) -> c_int {
    let Ok(l) = Layout::from_size_align(bytes.max(1), 256) else {
        return sys::hipErrorOutOfMemory;
    };
    // SAFETY: non-zero size.
    let m = unsafe { std::alloc::alloc(l) };
    if m.is_null() {
        return sys::hipErrorOutOfMemory;
    }
    allocs().lock().unwrap().insert(m as usize, l);
    // SAFETY: valid out-pointer.
    unsafe { *p = m as *mut c_void };
    0
}
unsafe extern "C" fn free(p: *mut c_void) -> c_int {
    match allocs().lock().unwrap().remove(&(p as usize)) {
        // SAFETY: allocated by `malloc` above with this layout, freed once (removed from the map).
        Some(l) => unsafe { std::alloc::dealloc(p as *mut u8, l) },
        None => return INVALID,
    }
    0
}
unsafe extern "C" fn memset(p: *mut c_void, v: c_int, n: usize, _: *mut c_void) -> c_int {
    // SAFETY: the crate passes a live allocation of at least n bytes.
    unsafe { std::ptr::write_bytes(p as *mut u8, v as u8, n) };
    0
}
unsafe extern "C" fn memcpy(
    d: *mut c_void,
    s: *const c_void,
    n: usize,
    kind: c_int,
    _: *mut c_void,
) -> c_int {
    if !(1..=3).contains(&kind) {
        return INVALID;
    }
    // SAFETY: the crate passes ranges of n bytes (std::ptr::copy allows overlap).
    unsafe { std::ptr::copy(s as *const u8, d as *mut u8, n) };
    0
}
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn memcpy_2d(
    d: *mut c_void,
    dp: usize,
    s: *const c_void,
    sp: usize,
    w: usize,
    h: usize,
    kind: c_int,
    _: *mut c_void,
) -> c_int {
    if w > dp || w > sp || kind != sys::hipMemcpyDeviceToDevice {
        return INVALID;
    }
    for r in 0..h {
        // SAFETY: the crate passes strided ranges of h rows of w bytes.
        unsafe { std::ptr::copy((s as *const u8).add(r * sp), (d as *mut u8).add(r * dp), w) };
    }
    0
}
unsafe extern "C" fn event_create(e: *mut *mut c_void, _: c_uint) -> c_int {
    // SAFETY: valid out-pointer.
    unsafe { *e = token() };
    0
}
/// Every event record and stream wait, in order: `(true, stream)` records on `stream`,
/// `(false, stream)` makes `stream` wait (the double runs work synchronously, so this log is
/// how the tests see the ordering the crate asked for).
fn fences() -> &'static Mutex<Vec<(bool, usize)>> {
    static F: OnceLock<Mutex<Vec<(bool, usize)>>> = OnceLock::new();
    F.get_or_init(|| Mutex::new(Vec::new()))
}
fn take_fences() -> Vec<(bool, usize)> {
    std::mem::take(&mut *fences().lock().unwrap())
}
unsafe extern "C" fn event_record(_: *mut c_void, s: *mut c_void) -> c_int {
    fences().lock().unwrap().push((true, s as usize));
    0
}
unsafe extern "C" fn wait_event(s: *mut c_void, _: *mut c_void, flags: c_uint) -> c_int {
    if flags != 0 {
        return INVALID;
    }
    fences().lock().unwrap().push((false, s as usize));
    0
}
unsafe extern "C" fn elapsed(ms: *mut f32, _: *mut c_void, _: *mut c_void) -> c_int {
    // SAFETY: valid out-pointer.
    unsafe { *ms = 0.25 };
    0
}
unsafe extern "C" fn ipc_get(h: *mut sys::hipIpcMemHandle_t, p: *mut c_void) -> c_int {
    if !allocs().lock().unwrap().contains_key(&(p as usize)) {
        return INVALID;
    }
    let mut r = [0 as c_char; 64];
    for (i, b) in (p as usize).to_le_bytes().iter().enumerate() {
        r[i] = *b as c_char;
    }
    // SAFETY: valid out-pointer.
    unsafe { (*h).reserved = r };
    0
}
unsafe extern "C" fn ipc_open(p: *mut *mut c_void, h: sys::hipIpcMemHandle_t, _: c_uint) -> c_int {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(h.reserved.iter()) {
        *d = *s as u8;
    }
    // SAFETY: valid out-pointer.
    unsafe { *p = usize::from_le_bytes(b) as *mut c_void };
    0
}
unsafe extern "C" fn unsupported2(_: *mut c_void, _: c_int) -> c_int {
    INVALID
}
unsafe extern "C" fn not_capturing(_: *mut c_void, st: *mut c_int) -> c_int {
    // SAFETY: valid out-pointer.
    unsafe { *st = sys::hipStreamCaptureStatusNone };
    0
}
unsafe extern "C" fn unsupported_ptr2(_: *mut c_void, _: *mut c_void) -> c_int {
    INVALID
}
unsafe extern "C" fn unsupported_inst(_: *mut *mut c_void, _: *mut c_void, _: u64) -> c_int {
    INVALID
}

fn fake_runtime() -> Runtime {
    let table: HashMap<&str, *const c_void> = [
        ("hipGetErrorString", error_string as *const c_void),
        ("hipGetErrorName", error_string as *const c_void),
        ("hipRuntimeGetVersion", version as *const c_void),
        ("hipDriverGetVersion", version as *const c_void),
        ("hipGetDeviceCount", device_count as *const c_void),
        ("hipGetDevice", get_device as *const c_void),
        ("hipSetDevice", set_device as *const c_void),
        ("hipDeviceGetName", name as *const c_void),
        ("hipDeviceGetPCIBusId", name as *const c_void),
        ("hipDeviceTotalMem", total_mem as *const c_void),
        ("hipDeviceSynchronize", ok0 as *const c_void),
        ("hipStreamCreateWithFlags", stream_create as *const c_void),
        ("hipStreamDestroy", ok1 as *const c_void),
        ("hipStreamQuery", ok1 as *const c_void),
        ("hipStreamSynchronize", ok1 as *const c_void),
        ("hipMalloc", malloc as *const c_void),
        ("hipFree", free as *const c_void),
        ("hipMemsetAsync", memset as *const c_void),
        ("hipMemcpyAsync", memcpy as *const c_void),
        ("hipMemcpy2DAsync", memcpy_2d as *const c_void),
        ("hipEventCreateWithFlags", event_create as *const c_void),
        ("hipEventDestroy", ok1 as *const c_void),
        ("hipEventRecord", event_record as *const c_void),
        ("hipEventQuery", ok1 as *const c_void),
        ("hipStreamWaitEvent", wait_event as *const c_void),
        ("hipEventElapsedTime", elapsed as *const c_void),
        ("hipIpcGetMemHandle", ipc_get as *const c_void),
        ("hipIpcOpenMemHandle", ipc_open as *const c_void),
        ("hipIpcCloseMemHandle", ok1 as *const c_void),
        ("hipStreamBeginCapture", unsupported2 as *const c_void),
        ("hipStreamEndCapture", unsupported_ptr2 as *const c_void),
        ("hipStreamIsCapturing", not_capturing as *const c_void),
        (
            "hipGraphInstantiateWithFlags",
            unsupported_inst as *const c_void,
        ),
        ("hipGraphLaunch", unsupported_ptr2 as *const c_void),
        ("hipGraphExecDestroy", ok1 as *const c_void),
        ("hipGraphDestroy", ok1 as *const c_void),
    ]
    .into_iter()
    .collect();
    // SAFETY: every entry above is an extern "C" fn with the HIP signature of its name (the
    // pointer-typed arguments of the shared helpers are ABI-identical to HIP's handle types).
    let fns = unsafe {
        sys::Functions::bind(|n| table.get(n).copied().ok_or_else(|| "absent".to_string()))
    }
    .unwrap();
    // SAFETY: as above; the functions are statics of this test binary.
    unsafe { Runtime::from_functions(fns, "host-memory test double") }.unwrap()
}

fn live_allocations() -> usize {
    allocs().lock().unwrap().len()
}

/// One test, so the runtime is installed before anything in the process touches HIP.
#[test]
fn crate_logic_on_a_host_memory_hip_double() {
    let rt = hip::install_runtime(fake_runtime()).unwrap();
    assert_eq!(rt.version(), "6.3.42134");
    // A second install is refused: the runtime is chosen once per process.
    assert!(matches!(
        hip::install_runtime(fake_runtime()),
        Err(Error::InvalidArgument(_))
    ));

    // Discovery and the probe.
    assert_eq!(dist_rocm::device_count(), 2);
    let p = dist_rocm::probe().unwrap();
    assert!(p.contains("rocm:1: Fake Instinct 1, 64.0 GiB"), "{p}");
    assert!(p.contains("RCCL"), "{p}");
    let e = DeviceContext::get(2).unwrap_err();
    assert!(
        e.to_string()
            .contains("rocm:2 does not exist (2 visible devices)"),
        "{e}"
    );
    let dev = DeviceContext::get(1).unwrap();
    assert_eq!(dev.name().unwrap(), "Fake Instinct 1");
    assert!(Arc::ptr_eq(&dev, &DeviceContext::get(1).unwrap()));

    // Host <-> device round trips, every dtype, empty and odd shapes.
    let base = live_allocations();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for shape in [vec![0usize, 3], vec![1], vec![3, 5, 7], vec![1000]] {
            let x = HostTensor::random(dtype, &shape, i as u64);
            let d = RocmBackend::from_host(&x, Device::new(DeviceKind::Rocm, 1)).unwrap();
            assert_eq!(d.device(), Device::new(DeviceKind::Rocm, 1));
            assert_eq!(RocmBackend::to_host(&d).unwrap(), x, "{dtype} {shape:?}");
            let z = RocmTensor::zeros(&dev, dtype, &shape).unwrap();
            assert_eq!(z.to_host().unwrap(), HostTensor::zeros(dtype, &shape));
        }
    }
    // Sizes are checked before anything is allocated.
    assert!(RocmTensor::zeros(&dev, DType::F64, &[usize::MAX / 4, 3]).is_err());

    // The cache: a dropped buffer is reused for the same rounded size, freed by empty_cache.
    let a = DeviceBuffer::alloc(&dev, 1000).unwrap();
    let pa = a.ptr();
    drop(a);
    assert!(dev.cached_bytes() >= 1024);
    let b = DeviceBuffer::alloc(&dev, 1024).unwrap();
    assert_eq!(b.ptr(), pa, "same rounded size reuses the cached block");
    drop(b);
    dev.empty_cache().unwrap();
    assert_eq!(dev.cached_bytes(), 0);
    assert_eq!(
        live_allocations(),
        base,
        "every buffer is freed (no leak, no double free)"
    );

    // The strided copy the re-layouts of all_gather(dim) / reduce_scatter(dim) are made of
    // (the layouts themselves are dist-nccl's, tested there): against a host loop.
    for (width, height, sp, dp) in [
        (3usize, 4usize, 5usize, 7usize),
        (8, 1, 8, 8),
        (4, 3, 4, 4),
        (1, 5, 9, 2),
    ] {
        let src: Vec<u8> = (0..sp * height).map(|i| (i * 7 % 251) as u8).collect();
        let d = RocmTensor::from_host(
            &HostTensor::from_bytes(DType::U8, &[src.len()], &src).unwrap(),
            1,
        )
        .unwrap();
        let out = RocmTensor::zeros(&dev, DType::U8, &[dp * height]).unwrap();
        dev.bind().unwrap();
        let c = Strided {
            dst: out.ptr(),
            dst_pitch: dp,
            src: d.ptr(),
            src_pitch: sp,
            width,
            height,
        };
        // SAFETY: both tensors hold `height` rows at their pitches; waited for by to_host.
        unsafe { dev.copy_2d(&c, dev.stream()) }.unwrap();
        let mut want = vec![0u8; dp * height];
        for r in 0..height {
            want[r * dp..r * dp + width].copy_from_slice(&src[r * sp..r * sp + width]);
        }
        assert_eq!(
            out.to_host().unwrap().as_bytes(),
            &want[..],
            "{width}x{height} {sp}->{dp}"
        );
    }

    // hipEventRecord / hipStreamWaitEvent on the right streams: a copy between two streams
    // runs on the output's, after the input's, which then waits for it (the ordering itself is
    // dist-nccl's, tested there).
    let x8 = HostTensor::random(DType::F32, &[24], 3);
    let t = RocmTensor::from_host(&x8, 1).unwrap();
    let other = hip::safe::Stream::new(rt, 1).unwrap();
    // SAFETY: a stream of device 1, alive until the end of this test.
    let os = unsafe { RawStream::from_raw(other.raw()) };
    // SAFETY: t holds 96 bytes at t.ptr(), alive and not written while the view lives.
    let v = unsafe { TensorView::from_raw_bytes(&dev, t.ptr(), DType::F32, 96, os) }.unwrap();
    let mut out = RocmTensor::zeros(&dev, DType::F32, &[24]).unwrap();
    let (o, own) = (os.as_raw() as usize, dev.stream().as_raw() as usize);
    take_fences();
    Communicator::copy(&v, &mut out.view_mut()).unwrap();
    assert_eq!(
        take_fences(),
        vec![(true, o), (false, own), (true, own), (false, o)]
    );
    assert_eq!(out.to_host().unwrap(), x8);
    drop((v, t, out));

    // IPC handle of a buffer, through bytes, opened again: the same memory.
    let x = HostTensor::random(DType::I32, &[64], 5);
    let d = RocmTensor::from_host(&x, 1).unwrap();
    let buf = DeviceBuffer::alloc(&dev, 256).unwrap();
    let h = dist_rocm::driver::ipc_handle(&buf).unwrap();
    let h2 = hip::safe::IpcMemHandle::from_bytes(&h.to_bytes()).unwrap();
    let m = h2.open(rt, 1).unwrap();
    assert_eq!(m.ptr() as usize as u64, buf.ptr());
    drop(m);
    drop(buf);
    // A runtime that refuses capture: an error, the closure never runs, nothing panics.
    let r = dist_rocm::RocmGraph::capture(&dev, || -> dist_core::Result<()> {
        panic!("must not run when the capture cannot begin")
    });
    assert!(
        matches!(r, Err(Error::Backend { backend: "hip", .. })),
        "{r:?}"
    );
    // Events.
    let (e0, e1) = (Event::new(rt, 1).unwrap(), Event::new(rt, 1).unwrap());
    e0.record(dev.stream_handle()).unwrap();
    e1.record(dev.stream_handle()).unwrap();
    assert_eq!(e0.elapsed_ms(&e1).unwrap(), 0.25);
    assert!(e0
        .record(DeviceContext::get(0).unwrap().stream_handle())
        .is_err());

    // The communicator without RCCL: created, argument checks, Unsupported collectives, destroy.
    let ctx = CommunicatorContext {
        local_rank: 1,
        ..one_rank_context("tp:0", Duration::from_secs(5))
    };
    let comm = Communicator::new(
        &ctx,
        &Options {
            device: None,
            nccl: false,
        },
    )
    .unwrap();
    assert_eq!(comm.device(), Device::new(DeviceKind::Rocm, 1));
    assert!(!comm.has_nccl() && !comm.has_custom_ar());
    let e = comm.all_reduce(&d, ReduceOp::Sum).unwrap_err();
    assert!(
        e.to_string()
            .contains("tp:0 all_reduce: this communicator has no RCCL"),
        "{e}"
    );
    assert!(matches!(comm.all_gather(&d, 0), Err(Error::Unsupported(_))));
    // Bad arguments are refused before RCCL is needed.
    let on0 = RocmTensor::from_host(&x, 0).unwrap();
    assert!(matches!(
        comm.all_reduce(&on0, ReduceOp::Sum),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        comm.all_gather(&d, 3),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        comm.broadcast(&mut d.clone().view_mut(), 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        comm.reduce_scatterv(&d, 0, &[60], ReduceOp::Sum),
        Err(Error::InvalidArgument(_))
    ));
    let e = comm.empty(DType::BF16, &[2, 3]).unwrap();
    assert_eq!(
        e.to_host().unwrap(),
        HostTensor::zeros(DType::BF16, &[2, 3])
    );
    comm.destroy().unwrap();
    assert!(matches!(
        comm.all_reduce(&d, ReduceOp::Sum),
        Err(Error::NotInitialized(_))
    ));
    drop((comm, d, on0, e, other));
    dev.empty_cache().unwrap();
    DeviceContext::get(0).unwrap().empty_cache().unwrap();
    assert_eq!(
        live_allocations(),
        base,
        "every buffer is freed (no leak, no double free)"
    );
}
