//! What the dist-nccl integration tests share: a `GpuRuntime` whose "device" memory is host
//! memory and whose streams run every call at once, logging each event record and stream wait
//! (`host`), and a stand-in for NCCL over host memory with ranks as threads (`fake_nccl`).

#![allow(dead_code)]

pub mod fake_nccl;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::local::{MemStore, ThreadGroup};
use dist_core::{CommunicatorContext, DeviceKind, Error, HostGroup, Result};
use dist_nccl::{Devices, Flavor, GpuRuntime, NoFastPath, Options, Pool, RawStream, Strided};

/// One record (`true`) or wait (`false`) on a stream.
pub type Fence = (bool, usize);

#[derive(Debug)]
pub struct Host {
    ordinal: usize,
    pool: Pool<Host>,
}

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
static FENCES: Mutex<Vec<Fence>> = Mutex::new(Vec::new());
static ALLOCS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
/// Whether recorded events have completed (the tests hold work "in flight" with it).
pub static DONE: AtomicBool = AtomicBool::new(true);

pub fn take_fences() -> Vec<Fence> {
    std::mem::take(&mut *lock(&FENCES))
}
pub fn live_allocations() -> usize {
    lock(&ALLOCS).len()
}
pub fn new_stream() -> RawStream {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) * 64;
    // SAFETY: the host runtime's streams are ids, never dereferenced.
    unsafe { RawStream::from_raw(id as *mut std::ffi::c_void) }
}
pub fn own_stream(ordinal: usize) -> RawStream {
    // SAFETY: as above: stream 8 + ordinal is device `ordinal`'s own.
    unsafe { RawStream::from_raw((8 + ordinal) as *mut std::ffi::c_void) }
}
pub fn id(s: RawStream) -> usize {
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

/// Sets a flag when dropped (what a view keeps alive for its maker).
pub struct Flag(pub Arc<AtomicBool>);
impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub fn context(local_rank: usize) -> CommunicatorContext {
    CommunicatorContext {
        local_rank,
        ..dist_core::local::one_rank_context("tp:0", Duration::from_secs(5))
    }
}

/// The context of rank `hg.rank()` of a group of threads, on host device `rank % 2`.
pub fn thread_context(hg: ThreadGroup) -> CommunicatorContext {
    let (rank, world) = (hg.rank(), hg.world_size());
    CommunicatorContext {
        group_name: "tp:0".into(),
        ranks: (0..world).collect(),
        rank_in_group: rank,
        local_rank: rank % 2,
        host_group: Arc::new(hg),
        store: Arc::new(MemStore::new()),
        timeout: Duration::from_secs(30),
    }
}
