//! The generic GPU layer (tensors, views and their checks, the stream-ordered allocation cache,
//! cross-stream ordering, stream switches, the communicator's argument checks and life cycle)
//! on a `GpuRuntime` whose "device" memory is host memory and whose streams run every call at
//! once. Each event record and stream wait is logged, so the tests see the ordering the layer
//! asks for. Collectives need NCCL and a GPU: they are tested by each backend on hardware.

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::local::{MemStore, ThreadGroup};
use dist_core::{
    Backend, CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error, HostTensor,
    ReduceOp, Result, Tensor,
};
use dist_nccl::{
    Devices, Flavor, GpuBackend, GpuRuntime, GpuTensor, GpuView, GpuViewMut, NcclCommunicator,
    NoFastPath, Options, Pool, RawStream, Strided,
};

/// One record (`true`) or wait (`false`) on a stream.
type Fence = (bool, usize);

#[derive(Debug)]
struct Host {
    ordinal: usize,
    pool: Pool<Host>,
}

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
static FENCES: Mutex<Vec<Fence>> = Mutex::new(Vec::new());
static ALLOCS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
/// Whether recorded events have completed (the tests hold work "in flight" with it).
static DONE: AtomicBool = AtomicBool::new(true);

fn take_fences() -> Vec<Fence> {
    std::mem::take(&mut *lock(&FENCES))
}
fn live_allocations() -> usize {
    lock(&ALLOCS).len()
}
fn new_stream() -> RawStream {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) * 64;
    // SAFETY: the host runtime's streams are ids, never dereferenced.
    unsafe { RawStream::from_raw(id as *mut std::ffi::c_void) }
}
fn own_stream(ordinal: usize) -> RawStream {
    // SAFETY: as above: stream 8 + ordinal is device `ordinal`'s own.
    unsafe { RawStream::from_raw((8 + ordinal) as *mut std::ffi::c_void) }
}
fn id(s: RawStream) -> usize {
    s.as_raw() as usize
}

impl GpuRuntime for Host {
    const KIND: DeviceKind = DeviceKind::Cuda;
    const FLAVOR: Flavor = Flavor::Nccl;
    const NAME: &'static str = "host";
    type Options = Options;
    type Event = ();
    type Graph = ();
    type FastPath = NoFastPath;

    fn device(ordinal: usize) -> Result<Arc<Host>> {
        static DEVICES: Devices<Host> = Devices::new();
        dist_core::ensure_arg!(ordinal < 2, "host:{ordinal} does not exist (2 devices)");
        let d = DEVICES.get_or_make("host", ordinal, || {
            Ok(Host {
                ordinal,
                pool: Pool::new(1 << 20),
            })
        })?;
        Ok(d.clone())
    }
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    fn bind(&self) -> Result<()> {
        Ok(())
    }
    fn stream(&self) -> RawStream {
        own_stream(self.ordinal)
    }
    fn pool(&self) -> &Pool<Host> {
        &self.pool
    }
    fn fast_path(
        _: &Arc<Host>,
        _: &CommunicatorContext,
        _: &Options,
    ) -> Result<Option<NoFastPath>> {
        Ok(None)
    }
    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        let l = Layout::from_size_align(bytes, 256).map_err(|e| Error::invalid(e.to_string()))?;
        // SAFETY: non-zero size (the cache never asks for 0).
        let p = unsafe { std::alloc::alloc(l) } as u64;
        dist_core::ensure_arg!(p != 0, "out of host memory");
        lock(&ALLOCS).push((p, bytes));
        Ok(p)
    }
    unsafe fn free(&self, ptr: u64) -> Result<()> {
        let mut a = lock(&ALLOCS);
        let i = a
            .iter()
            .position(|x| x.0 == ptr)
            .ok_or_else(|| Error::invalid("double free"))?;
        let (_, bytes) = a.swap_remove(i);
        // SAFETY: allocated by `malloc` with this layout, freed once (removed above).
        unsafe {
            std::alloc::dealloc(ptr as *mut u8, Layout::from_size_align(bytes, 256).unwrap())
        };
        Ok(())
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize, _: RawStream) -> Result<()> {
        // SAFETY: the layer passes live ranges.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize, _: RawStream) -> Result<()> {
        // SAFETY: as above.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    unsafe fn copy_2d(&self, c: &Strided, _: RawStream) -> Result<()> {
        assert!(
            !c.is_contiguous() && c.width * c.height > 0,
            "{c:?} is the layer's to simplify"
        );
        for r in 0..c.height {
            let (d, s) = (
                c.dst as usize + r * c.dst_pitch,
                c.src as usize + r * c.src_pitch,
            );
            // SAFETY: as above, row by row.
            unsafe { std::ptr::copy(s as *const u8, d as *mut u8, c.width) };
        }
        Ok(())
    }
    unsafe fn copy_h2d(&self, dst: u64, src: &[u8], _: RawStream) -> Result<()> {
        // SAFETY: as above.
        unsafe { std::ptr::copy(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    unsafe fn copy_d2h(&self, dst: &mut [u8], src: u64, _: RawStream) -> Result<()> {
        // SAFETY: as above.
        unsafe { std::ptr::copy(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn create_stream(&self) -> Result<RawStream> {
        Ok(new_stream())
    }
    unsafe fn destroy_stream(&self, _: RawStream) -> Result<()> {
        Ok(())
    }
    fn new_event(&self, _: bool) -> Result<()> {
        Ok(())
    }
    fn elapsed_ms(&self, _: &(), _: &()) -> Result<f32> {
        Ok(0.5)
    }
    unsafe fn record(&self, _: &(), s: RawStream) -> Result<()> {
        lock(&FENCES).push((true, id(s)));
        Ok(())
    }
    unsafe fn wait_event(&self, s: RawStream, _: &()) -> Result<()> {
        lock(&FENCES).push((false, id(s)));
        Ok(())
    }
    fn event_done(&self, _: &()) -> Result<bool> {
        Ok(DONE.load(Ordering::SeqCst))
    }
    unsafe fn stream_done(&self, _: RawStream) -> Result<bool> {
        Ok(true)
    }
    unsafe fn is_capturing(&self, _: RawStream) -> Result<bool> {
        Ok(false)
    }
    unsafe fn begin_capture(&self, _: RawStream) -> Result<()> {
        Err(Error::unsupported("the host runtime has no graphs"))
    }
    unsafe fn end_capture(&self, _: RawStream) -> Result<()> {
        Err(Error::unsupported("the host runtime has no graphs"))
    }
    unsafe fn launch_graph(&self, _: &(), _: RawStream) -> Result<()> {
        Ok(())
    }
}

type Comm = NcclCommunicator<Host>;

/// Sets a flag when dropped (what a view keeps alive for its maker).
struct Flag(Arc<AtomicBool>);
impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn context(local_rank: usize) -> CommunicatorContext {
    CommunicatorContext {
        group_name: "tp:0".into(),
        ranks: vec![0],
        rank_in_group: 0,
        local_rank,
        host_group: Arc::new(ThreadGroup::new(1, Duration::from_secs(5)).pop().unwrap()),
        store: Arc::new(MemStore::new()),
        timeout: Duration::from_secs(5),
    }
}

/// One test: the runtime's state (allocations, fences, the cache) is process-wide.
#[test]
fn the_generic_gpu_layer_on_a_host_runtime() {
    let dev = Host::device(0).unwrap();
    let base = live_allocations();
    let on = |i| Device::new(DeviceKind::Cuda, i);

    // Tensors through the backend: round trips, re-views and device-side slices.
    type B = GpuBackend<Host>;
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for shape in [vec![0usize, 3], vec![1], vec![3, 5, 7]] {
            let x = HostTensor::random(dtype, &shape, i as u64);
            let d = B::from_host(&x, on(1)).unwrap();
            assert_eq!((d.device(), B::to_host(&d).unwrap()), (on(1), x));
        }
    }
    let x = HostTensor::random(DType::F16, &[4, 6], 11);
    let d = B::from_host(&x, on(0)).unwrap();
    let r = B::reshape(d.clone(), &[3, 8]).unwrap();
    assert_eq!(r.ptr(), d.ptr());
    assert!(B::reshape(d.clone(), &[5, 5]).is_err());
    for (start, len) in [(0usize, 24usize), (5, 7), (24, 0)] {
        let got = B::to_host(&B::flat_slice(&d, start, len).unwrap()).unwrap();
        assert_eq!(
            got,
            dist_core::LocalBackend::flat_slice(&x, start, len).unwrap()
        );
    }
    assert!(B::flat_slice(&d, 20, 5).is_err() && B::from_host(&x, Device::CPU).is_err());
    assert!(GpuTensor::<Host>::zeros(&dev, DType::F64, &[usize::MAX / 4, 3]).is_err());
    drop((d, r));

    // Views: checked once when made, narrowed and reshaped without a copy, keeping what their
    // maker gave them until the last of them drops.
    let t = GpuTensor::<Host>::from_host(&HostTensor::random(DType::F32, &[24], 3), 0).unwrap();
    let other = new_stream();
    let shape = [4usize, 6];
    // SAFETY: t holds 96 bytes at t.ptr(), alive and unwritten while the views live.
    let v = unsafe { GpuView::from_raw_parts(&*dev, t.ptr(), 96, DType::F32, &shape, other) };
    let dropped = Arc::new(AtomicBool::new(false));
    let v = v.unwrap().keeping(Arc::new(Flag(dropped.clone())));
    assert_eq!((v.shape(), v.nbytes(), v.stream()), (&shape[..], 96, other));
    // SAFETY: as above (refused before anything could be read).
    let bad = unsafe { GpuView::from_raw_parts(&*dev, t.ptr(), 96, DType::F32, &[5, 6], other) };
    assert!(bad.unwrap_err().to_string().contains("needs 120 bytes"));
    // SAFETY: as above.
    let bad = unsafe { GpuView::from_raw_bytes(&*dev, t.ptr() + 2, DType::F32, 8, other) };
    assert!(bad.unwrap_err().to_string().contains("not aligned"));
    let part = v.narrow(6, 12).unwrap();
    assert!(v.narrow(20, 5).is_err() && v.narrow(usize::MAX, 2).is_err());
    drop(v);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the narrowed view keeps it"
    );

    // A copy between two streams runs on the output's, after the input's, which then waits.
    let mut out = GpuTensor::<Host>::zeros(&dev, DType::F32, &[12]).unwrap();
    take_fences();
    Comm::copy(&part, &mut out.view_mut()).unwrap();
    let own = id(dev.stream());
    let (o, around) = (id(other), |a, b| {
        vec![(true, a), (false, b), (true, b), (false, a)]
    });
    assert_eq!(take_fences(), around(o, own));
    let want = dist_core::LocalBackend::flat_slice(&t.to_host().unwrap(), 6, 12).unwrap();
    assert_eq!(out.to_host().unwrap(), want);
    assert!(
        Comm::copy(&t.view(), &mut out.view_mut()).is_err(),
        "24 elements into 12"
    );
    Comm::copy(&out.view(), &mut out.clone().view_mut()).unwrap();
    assert_eq!(take_fences(), vec![], "one stream: no event");
    drop(part);
    assert!(dropped.load(Ordering::SeqCst));

    // The cache is stream-ordered: a buffer last used on another stream is parked until an
    // event recorded there has completed, and only then handed out again.
    let buf = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    let p = buf.ptr();
    DONE.store(false, Ordering::SeqCst);
    // SAFETY: a live stream of the device.
    unsafe { dev.pool().defer(buf, other) }.unwrap();
    assert_eq!((dev.pool().parked(), take_fences()), (1, vec![(true, o)]));
    let b2 = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    assert_ne!(
        b2.ptr(),
        p,
        "not reused while the other stream may still use it"
    );
    DONE.store(true, Ordering::SeqCst);
    let b3 = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    assert_eq!(
        (b3.ptr(), dev.pool().parked()),
        (p, 0),
        "reused once its event completed"
    );
    drop((b2, b3));

    // The communicator without NCCL: argument checks first, then Unsupported naming the op.
    let comm = Comm::new(
        &context(0),
        &Options {
            device: None,
            nccl: false,
        },
    )
    .unwrap();
    assert_eq!(comm.device(), on(0));
    assert!(!comm.has_nccl() && !comm.has_custom_ar());
    let e = comm.all_reduce(&t, ReduceOp::Sum).unwrap_err();
    assert!(
        e.to_string()
            .contains("tp:0 all_reduce: this communicator has no NCCL"),
        "{e}"
    );
    assert!(matches!(comm.all_gather(&t, 0), Err(Error::Unsupported(_))));
    let elsewhere = GpuTensor::<Host>::zeros(&Host::device(1).unwrap(), DType::F32, &[4]).unwrap();
    for bad in [
        comm.all_reduce(&elsewhere, ReduceOp::Sum).map(drop),
        comm.all_gather(&t, 3).map(drop),
        comm.broadcast(&mut t.clone().view_mut(), 1),
        comm.reduce_scatterv(&t, 0, &[60], ReduceOp::Sum).map(drop),
        comm.all_reduce_into(&t.view(), &mut out.view_mut(), ReduceOp::Sum),
        comm.send(&t.view(), 1),
    ] {
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    }
    assert_eq!(
        take_fences(),
        vec![],
        "refused before any stream is touched"
    );

    // An engine's stream: ops are enqueued there (after what came before); views on the
    // device's own stream are fenced both ways, even around an op that fails.
    // SAFETY: `other` is a stream of the device that outlives the communicator's use.
    unsafe { comm.set_stream(other, Arc::new(())) }.unwrap();
    assert_eq!(
        (comm.stream(), take_fences()),
        (other, vec![(true, own), (false, o)])
    );
    assert!(comm
        .all_reduce_in_place(&mut t.clone().view_mut(), ReduceOp::Sum)
        .is_err());
    assert_eq!(take_fences(), around(own, o));
    // SAFETY: t holds 96 bytes; `other` is alive.
    let mut on_other = unsafe { GpuViewMut::from_raw_bytes(&*dev, t.ptr(), DType::F32, 96, other) };
    assert!(comm.broadcast(on_other.as_mut().unwrap(), 0).is_err());
    assert_eq!(
        take_fences(),
        vec![],
        "views on the communicator's stream: no event"
    );
    comm.synchronize().unwrap();
    comm.reset_stream().unwrap();
    assert_eq!(
        (comm.stream(), take_fences()),
        (dev.stream(), vec![(true, o), (false, own)])
    );

    // Graphs: a runtime that refuses capture is an error, and the closure never runs.
    let r = dist_nccl::GpuGraph::capture(&dev, || -> Result<()> { panic!("must not run") });
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");

    comm.destroy().unwrap();
    assert!(matches!(
        comm.all_reduce(&t, ReduceOp::Sum),
        Err(Error::NotInitialized(_))
    ));
    drop((comm, t, out, elsewhere, on_other));
    dev.empty_cache().unwrap();
    Host::device(1).unwrap().empty_cache().unwrap();
    assert_eq!(
        live_allocations(),
        base,
        "every buffer is freed (no leak, no double free)"
    );
}
