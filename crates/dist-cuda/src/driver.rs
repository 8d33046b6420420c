//! The CUDA driver through cudarc: presence check, per-device context and stream, NVRTC, and
//! [`GpuRuntime`] for [`DeviceContext`] (allocation, copies, events, graphs, device faults:
//! the surface `dist_nccl`'s generic communicator, tensors and cache run on).
//!
//! cudarc panics when `libcuda` is missing, so [`ensure_driver`] checks `is_culib_present()`
//! first and every entry point of this crate calls it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys, CudaContext, DriverError};
use dist_core::{CommunicatorContext, DeviceKind, Error, Result};
use dist_nccl::{wait_stream, Devices, Flavor, GpuRuntime, Pool, RawStream, Strided};

use crate::custom_ar::CustomAllreduce;

/// Turns a driver error into [`Error::Backend`] with the driver's name and message.
pub fn cuda_err(call: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let msg = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Backend {
        backend: "cuda",
        code: Some(e.0 as i64),
        message: format!("{call}: {name}: {msg}"),
    }
}

/// Driver results with the call named in the error.
pub(crate) trait Cu<T> {
    /// [`cuda_err`] of the error, naming `call`.
    fn cu(self, call: &str) -> Result<T>;
}

impl<T> Cu<T> for std::result::Result<T, DriverError> {
    fn cu(self, call: &str) -> Result<T> {
        self.map_err(|e| cuda_err(call, e))
    }
}

/// Checks a raw `CUresult`.
pub(crate) fn check(call: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| cuda_err(call, e))
}

/// The base address of the allocation holding device address `p` (`cuMemGetAddressRange`).
///
/// # Safety
/// `p` is a live device address of the current context.
pub(crate) unsafe fn allocation_base(p: u64) -> Result<u64> {
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: valid out-pointers; `p` by the caller's contract.
    check("cuMemGetAddressRange", unsafe {
        sys::cuMemGetAddressRange_v2(&mut base, &mut size, p)
    })?;
    Ok(base)
}

/// Checks once that `libcuda` and `libnvrtc` can be loaded. Absent: [`Error::LibraryNotFound`]
/// with the names tried, never a panic.
pub fn ensure_driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the candidate names.
    let ok = *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() });
    if ok {
        return Ok(());
    }
    Err(Error::LibraryNotFound {
        library: "libcuda".into(),
        tried: why_not_loaded("cuda"),
    })
}

/// cudarc's candidate names for `lib`, de-duplicated, each with the loader's reason.
fn why_not_loaded(lib: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    cudarc::get_lib_name_candidates(lib)
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .map(|n| {
            // SAFETY: only reached when cudarc found none of these; a library that loads now
            // is closed again at once (its initialisers are the vendor's).
            match unsafe { libloading::Library::new(&n) } {
                Ok(_) => format!("{n}: loads now but did not at the first check"),
                Err(e) => {
                    let e = e.to_string();
                    format!("{n}: {}", e.strip_prefix(&format!("{n}: ")).unwrap_or(&e))
                }
            }
        })
        .collect()
}

/// Checks that NVRTC can be loaded (needed by the kernels this crate compiles: the custom
/// all-reduce and the paged KV copy).
pub fn ensure_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the candidate names.
    let ok = *PRESENT.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() });
    if ok {
        return Ok(());
    }
    Err(Error::LibraryNotFound {
        library: "libnvrtc".into(),
        tried: why_not_loaded("nvrtc"),
    })
}

/// A kernel of a module loaded by [`load_kernels`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelFn(pub(crate) sys::CUfunction);
// SAFETY: a CUfunction is a handle usable from any thread with its context current.
unsafe impl Send for KernelFn {}
// SAFETY: as above; launching is thread-safe in the driver.
unsafe impl Sync for KernelFn {}

/// Compiles CUDA C `source` (no headers) with NVRTC for compute capability `cc`; returns the
/// PTX. `what` names the kernels in the error.
pub(crate) fn compile_ptx(source: &str, cc: (i32, i32), what: &str) -> Result<String> {
    ensure_nvrtc()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "-std=c++17".into(),
        ],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Backend {
        backend: "nvrtc",
        code: None,
        message: format!("compiling {what}: {e:?}"),
    })?;
    Ok(ptx.to_src())
}

/// Compiles `source` for `dev`'s architecture, loads it into `dev`'s context (never unloaded)
/// and returns the kernels `names`, in order.
pub(crate) fn load_kernels(
    dev: &DeviceContext,
    source: &str,
    what: &str,
    names: &[String],
) -> Result<Vec<KernelFn>> {
    let t0 = std::time::Instant::now();
    let ptx = compile_ptx(source, dev.compute_capability()?, what)?;
    let src = CString::new(ptx).map_err(|_| Error::protocol("PTX with a NUL byte"))?;
    dev.bind()?;
    // SAFETY: src is NUL-terminated PTX text; the module lives for the process (never unloaded).
    let module = unsafe { cu::module::load_data(src.as_ptr() as *const c_void) }
        .cu(&format!("cuModuleLoadData ({what})"))?;
    let funcs = names
        .iter()
        .map(|n| {
            let name = CString::new(n.as_str())
                .map_err(|_| Error::protocol("kernel name with a NUL byte"))?;
            // SAFETY: module is loaded; name is NUL-terminated.
            unsafe { cu::module::get_function(module, name) }
                .map(KernelFn)
                .cu(&format!("cuModuleGetFunction {n} ({what})"))
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::debug!(
        device = dev.ordinal(),
        "{what} compiled in {:?}",
        t0.elapsed()
    );
    Ok(funcs)
}

/// One value per device and process, made by `make` at first use: `cache` is the caller's
/// `static` (compiled kernels, the IPC importer).
pub(crate) fn per_device<T>(
    cache: &'static OnceLock<Mutex<HashMap<usize, Arc<T>>>>,
    dev: &DeviceContext,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let mut map = cache
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = map.get(&dev.ordinal()) {
        return Ok(v.clone());
    }
    let v = Arc::new(make()?);
    map.insert(dev.ordinal(), v.clone());
    Ok(v)
}

/// Number of visible CUDA devices (0 without a driver or a device).
pub fn device_count() -> usize {
    if ensure_driver().is_err() {
        return 0;
    }
    if cu::init().is_err() {
        return 0;
    }
    cu::device::get_count()
        .map(|c| c.max(0) as usize)
        .unwrap_or(0)
}

/// One device's primary context and the stream this crate's own tensors are ordered on (the
/// "current stream" of torch), its allocation cache and the bookkeeping of its allocations.
///
/// The context is the device's **primary** context (`cuDevicePrimaryCtxRetain`, as cudarc's
/// `CudaContext::new` and torch use): an engine's cudarc context made with `CudaContext::new`
/// on the same device is the same device context, so its memory and streams are usable here;
/// one made otherwise (`new_non_primary`, a wrapped raw context) is refused by the adapters of
/// [`crate::engine`].
pub struct DeviceContext {
    ctx: Arc<CudaContext>,
    stream: RawStream,
    ordinal: usize,
    pool: Pool<DeviceContext>,
    faults: Mutex<Vec<std::sync::Weak<FaultFlags>>>,
    /// Serial (and IPC handle, once exported) of each live `cuMemAlloc` allocation of this
    /// crate (cached ones included), by base address; see [`DeviceContext::allocation_serial`].
    serials: Mutex<HashMap<sys::CUdeviceptr, AllocInfo>>,
}

/// An allocation's serial and, once exported, its CUDA IPC handle.
type AllocInfo = (u64, Option<[u8; 64]>);

/// A process-unique, cross-process-distinct allocation serial: a random base per process plus
/// a counter, so a serial names one allocation of one process.
fn next_serial() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let base = *BASE.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1
    });
    base.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 1)
}

/// Per-peer fault words in host-mapped pinned memory that device code sets when a peer never
/// arrived at a barrier before the deadline (the custom all-reduce's kernels). Registered with
/// the [`DeviceContext`], whose waits turn a set word into [`Error::Timeout`] naming the ranks,
/// so `to_host` cannot return the garbage such a kernel leaves.
pub struct FaultFlags {
    host: *mut u32,
    dev: sys::CUdeviceptr,
    words: usize,
    op: String,
    timeout: Mutex<std::time::Duration>,
}

// SAFETY: the pinned host words are only read/written with volatile accesses; the pointers are
// valid until drop.
unsafe impl Send for FaultFlags {}
// SAFETY: as above.
unsafe impl Sync for FaultFlags {}

impl std::fmt::Debug for FaultFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultFlags({}, {:?})", self.op, self.faulted())
    }
}

impl FaultFlags {
    /// `words` zeroed fault words, mapped for the device, registered with `dev`.
    pub fn new(
        dev: &Arc<DeviceContext>,
        words: usize,
        op: &str,
        timeout: std::time::Duration,
    ) -> Result<Arc<FaultFlags>> {
        dev.bind()?;
        let bytes = words.max(1) * 4;
        // SAFETY: allocation of pinned, device-mapped host memory; zeroed below before use.
        let host = unsafe {
            cu::malloc_host(
                bytes,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        }
        .cu("cuMemHostAlloc")? as *mut u32;
        for i in 0..words {
            // SAFETY: i < words, inside the allocation.
            unsafe { std::ptr::write_volatile(host.add(i), 0) };
        }
        let mut d: sys::CUdeviceptr = 0;
        // SAFETY: host came from cuMemHostAlloc with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, host as *mut c_void, 0) };
        if let Err(e) = r.result() {
            // SAFETY: host came from cuMemHostAlloc and is freed once.
            let _ = unsafe { cu::free_host(host as *mut c_void) };
            return Err(cuda_err("cuMemHostGetDevicePointer", e));
        }
        let f = Arc::new(FaultFlags {
            host,
            dev: d,
            words,
            op: op.to_string(),
            timeout: Mutex::new(timeout),
        });
        let mut reg = dev.faults.lock().unwrap_or_else(|e| e.into_inner());
        reg.retain(|w| w.strong_count() > 0);
        reg.push(Arc::downgrade(&f));
        Ok(f)
    }
    /// Device address of word 0.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.dev
    }
    /// Indices of the words that are set (the peers that did not arrive).
    pub fn faulted(&self) -> Vec<usize> {
        // SAFETY: i < words; volatile reads of pinned memory the device may write.
        (0..self.words)
            .filter(|i| unsafe { std::ptr::read_volatile(self.host.add(*i)) } != 0)
            .collect()
    }
    /// The deadline device code is given.
    pub fn timeout(&self) -> std::time::Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Changes the deadline of later launches.
    pub fn set_timeout(&self, t: std::time::Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
    /// `Err(Timeout)` naming the peers when any word is set.
    pub fn check(&self) -> Result<()> {
        let missing = self.faulted();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::Timeout {
            op: self.op.clone(),
            waited: self.timeout(),
            missing_ranks: missing,
            detail: "peers never reached the device barrier; this custom all-reduce is disabled and its last results are invalid".into(),
        })
    }
}

impl Drop for FaultFlags {
    fn drop(&mut self) {
        // SAFETY: host came from cuMemHostAlloc and is freed once.
        if let Err(e) = unsafe { cu::free_host(self.host as *mut c_void) } {
            tracing::warn!("cuMemFreeHost: {}", cuda_err("cuMemFreeHost", e));
        }
    }
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceContext(cuda:{})", self.ordinal)
    }
}

static DEVICES: Devices<DeviceContext> = Devices::new();

impl DeviceContext {
    /// The process-wide context of device `ordinal`, created on first use, bound to the
    /// calling thread.
    pub fn get(ordinal: usize) -> Result<Arc<DeviceContext>> {
        let d = Self::get_static(ordinal)?;
        d.bind()?;
        Ok(d.clone())
    }

    /// [`DeviceContext::get`] without binding, as the registry's own reference (contexts live
    /// for the process).
    pub fn get_static(ordinal: usize) -> Result<&'static Arc<DeviceContext>> {
        ensure_driver()?;
        DEVICES.get_or_make("cuda", ordinal, || {
            cu::init().cu("cuInit")?;
            let n = cu::device::get_count().cu("cuDeviceGetCount")?;
            if ordinal >= n.max(0) as usize {
                return Err(Error::invalid(format!(
                    "cuda:{ordinal} does not exist ({n} visible devices)"
                )));
            }
            let ctx = CudaContext::new(ordinal).cu("cuDevicePrimaryCtxRetain")?;
            let stream =
                cu::stream::create(cu::stream::StreamKind::NonBlocking).cu("cuStreamCreate")?;
            Ok(DeviceContext {
                ctx,
                // SAFETY: a stream of this context, never destroyed (contexts live for the process).
                stream: unsafe { RawStream::from_raw(stream as *mut c_void) },
                ordinal,
                pool: Pool::from_env("DIST_CUDA_CACHE_BYTES"),
                faults: Mutex::new(Vec::new()),
                serials: Mutex::new(HashMap::new()),
            })
        })
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().cu("cuCtxSetCurrent")
    }
    /// Device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The cudarc context (the device's primary context).
    pub fn cudarc(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream this crate's own tensors are ordered on, as the driver's handle.
    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.as_raw() as sys::CUstream
    }
    /// Waits for the device's own stream with a deadline, calling `poll` between queries; see
    /// [`dist_nccl::wait_stream`].
    pub fn wait(
        &self,
        op: &str,
        timeout: std::time::Duration,
        poll: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.bind()?;
        // SAFETY: the device's own stream lives for the process; bound above.
        unsafe { wait_stream(self, self.stream, op, timeout, poll) }
    }
    /// True while the device's own stream is capturing a CUDA graph.
    pub fn is_capturing_own(&self) -> Result<bool> {
        self.bind()?;
        // SAFETY: the device's own stream; bound above.
        unsafe { GpuRuntime::is_capturing(self, self.stream) }
    }
    /// `Err(Timeout)` when device code registered a fault (see [`FaultFlags`]).
    pub fn check_faults(&self) -> Result<()> {
        let live: Vec<Arc<FaultFlags>> = {
            let reg = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            reg.iter().filter_map(|w| w.upgrade()).collect()
        };
        live.iter().try_for_each(|f| f.check())
    }
    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx.compute_capability().cu("cuDeviceGetAttribute")
    }

    /// The serial of the allocation of this crate whose base address is `base` (`None` for
    /// memory allocated elsewhere). A serial changes when the address is freed and allocated
    /// again, and stays while the allocation is reused from the cache: an importer of this
    /// memory may keep its IPC mapping for as long as the serial it was given is the same.
    pub fn allocation_serial(&self, base: sys::CUdeviceptr) -> Option<u64> {
        self.allocation_ipc(base).map(|a| a.0)
    }

    /// The serial and, once exported, the IPC handle of the allocation at `base`.
    pub(crate) fn allocation_ipc(&self, base: sys::CUdeviceptr) -> Option<AllocInfo> {
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&base)
            .copied()
    }

    /// Remembers the IPC handle of the allocation at `base` while it has `serial`.
    pub(crate) fn remember_ipc_handle(&self, base: sys::CUdeviceptr, serial: u64, h: [u8; 64]) {
        let mut m = self.serials.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = m.get_mut(&base).filter(|a| a.0 == serial) {
            a.1 = Some(h);
        }
    }

    /// The device's UUID (16 bytes), to tell devices apart across processes.
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let u = self.ctx.uuid().cu("cuDeviceGetUuid")?;
        let mut out = [0u8; 16];
        for (o, b) in out.iter_mut().zip(u.bytes.iter()) {
            *o = *b as u8;
        }
        Ok(out)
    }
}

/// A CUDA event, destroyed on drop.
#[derive(Debug)]
pub struct Event(sys::CUevent);
// SAFETY: an event handle may be recorded, waited for and destroyed from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is ours and destroyed once (pending waits keep what they need).
        if let Err(e) = unsafe { cu::event::destroy(self.0) } {
            tracing::warn!("{}", cuda_err("cuEventDestroy", e));
        }
    }
}

/// An instantiated CUDA graph, destroyed on drop (the owner binds the context first).
#[derive(Debug)]
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}
// SAFETY: graph handles may be launched and destroyed from any thread with the context current.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles are ours and destroyed once.
        unsafe {
            let _ = cu::graph::exec_destroy(self.exec);
            let _ = cu::graph::destroy(self.graph);
        }
    }
}

fn cu(s: RawStream) -> sys::CUstream {
    s.as_raw() as sys::CUstream
}

/// `Ok(true)` for success, `Ok(false)` for "not ready", else the error.
fn ready(call: &str, r: sys::CUresult) -> Result<bool> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(cuda_err(call, DriverError(other))),
    }
}

impl GpuRuntime for DeviceContext {
    const KIND: DeviceKind = DeviceKind::Cuda;
    const FLAVOR: Flavor = Flavor::Nccl;
    const NAME: &'static str = "cuda";
    type Options = crate::Options;
    type Event = Event;
    type Graph = Graph;
    type FastPath = CustomAllreduce;

    fn device(ordinal: usize) -> Result<Arc<Self>> {
        DeviceContext::get(ordinal)
    }
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    fn bind(&self) -> Result<()> {
        DeviceContext::bind(self)
    }
    fn stream(&self) -> RawStream {
        self.stream
    }
    fn pool(&self) -> &Pool<Self> {
        &self.pool
    }
    fn fast_path(
        dev: &Arc<Self>,
        ctx: &CommunicatorContext,
        opts: &crate::Options,
    ) -> Result<Option<CustomAllreduce>> {
        if !opts.custom_all_reduce {
            return Ok(None);
        }
        CustomAllreduce::new(
            dev,
            ctx.host_group.as_ref(),
            &ctx.group_name,
            opts.custom_ar_max_size,
            ctx.timeout,
        )
    }

    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        // SAFETY: the context is current (caller's contract); the pointer is owned by the caller.
        let ptr = unsafe { cu::malloc_sync(bytes) }.map_err(|e| {
            cuda_err(
                &format!("cuMemAlloc({bytes} B) on cuda:{}", self.ordinal),
                e,
            )
        })?;
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ptr, (next_serial(), None));
        Ok(ptr)
    }
    unsafe fn free(&self, ptr: u64) -> Result<()> {
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ptr);
        // SAFETY: forwarded contract (cuMemFree waits for pending work).
        unsafe { cu::free_sync(ptr) }.cu("cuMemFree")
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { cu::memset_d8_async(dst, 0, bytes, cu(s)) }.cu("cuMemsetD8Async")
    }
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize, s: RawStream) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: forwarded contract.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, cu(s)) }.cu("cuMemcpyDtoDAsync")
    }
    unsafe fn copy_2d(&self, c: &Strided, s: RawStream) -> Result<()> {
        let dev_mem = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: dev_mem,
            srcHost: std::ptr::null(),
            srcDevice: c.src,
            srcArray: std::ptr::null_mut(),
            srcPitch: c.src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: dev_mem,
            dstHost: std::ptr::null_mut(),
            dstDevice: c.dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: c.dst_pitch,
            WidthInBytes: c.width,
            Height: c.height,
        };
        // SAFETY: forwarded contract.
        check("cuMemcpy2DAsync", unsafe {
            sys::cuMemcpy2DAsync_v2(&p, cu(s))
        })
    }
    unsafe fn copy_h2d(&self, dst: u64, src: &[u8], s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { cu::memcpy_htod_async(dst, src, cu(s)) }.cu("cuMemcpyHtoDAsync")
    }
    unsafe fn copy_d2h(&self, dst: &mut [u8], src: u64, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { cu::memcpy_dtoh_async(dst, src, cu(s)) }.cu("cuMemcpyDtoHAsync")
    }

    fn create_stream(&self) -> Result<RawStream> {
        self.bind()?;
        let s = cu::stream::create(cu::stream::StreamKind::NonBlocking).cu("cuStreamCreate")?;
        // SAFETY: a new stream of this context, destroyed by its owner.
        Ok(unsafe { RawStream::from_raw(s as *mut c_void) })
    }
    unsafe fn destroy_stream(&self, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { cu::stream::destroy(cu(s)) }.cu("cuStreamDestroy")
    }
    fn new_event(&self, timing: bool) -> Result<Event> {
        self.bind()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        cu::event::create(flags).map(Event).cu("cuEventCreate")
    }
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        // SAFETY: both events are live; the driver reports events not recorded or not done.
        unsafe { cu::event::elapsed(start.0, end.0) }.cu("cuEventElapsedTime")
    }
    unsafe fn record(&self, ev: &Event, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract; the event is live.
        unsafe { cu::event::record(ev.0, cu(s)) }.cu("cuEventRecord")
    }
    unsafe fn wait_event(&self, s: RawStream, ev: &Event) -> Result<()> {
        // SAFETY: forwarded contract; the event is live.
        unsafe {
            cu::stream::wait_event(cu(s), ev.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        }
        .cu("cuStreamWaitEvent")
    }
    fn event_done(&self, ev: &Event) -> Result<bool> {
        // SAFETY: the event is live.
        ready("cuEventQuery", unsafe { sys::cuEventQuery(ev.0) })
    }
    unsafe fn stream_done(&self, s: RawStream) -> Result<bool> {
        // SAFETY: forwarded contract.
        ready("cuStreamQuery", unsafe { sys::cuStreamQuery(cu(s)) })
    }
    unsafe fn is_capturing(&self, s: RawStream) -> Result<bool> {
        let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: forwarded contract; valid out-pointer.
        check("cuStreamIsCapturing", unsafe {
            sys::cuStreamIsCapturing(cu(s), &mut st)
        })?;
        Ok(st == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
    }
    unsafe fn begin_capture(&self, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract; relaxed mode.
        unsafe {
            cu::stream::begin_capture(
                cu(s),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .cu("cuStreamBeginCapture")
    }
    unsafe fn end_capture(&self, s: RawStream) -> Result<Graph> {
        // SAFETY: forwarded contract.
        let graph = unsafe { cu::stream::end_capture(cu(s)) }.cu("cuStreamEndCapture")?;
        // SAFETY: graph is a valid captured graph.
        match unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Graph { graph, exec }),
            Err(e) => {
                // SAFETY: graph is ours and not instantiated.
                let _ = unsafe { cu::graph::destroy(graph) };
                Err(cuda_err("cuGraphInstantiate", e))
            }
        }
    }
    unsafe fn launch_graph(&self, g: &Graph, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract; exec is live.
        unsafe { cu::graph::launch(g.exec, cu(s)) }.cu("cuGraphLaunch")
    }
    fn check_faults(&self) -> Result<()> {
        DeviceContext::check_faults(self)
    }
    /// Device code whose barrier deadline is `timeout` gets a quarter of it more (at least one
    /// second) to report which peers it waited for.
    fn fault_grace(&self, timeout: std::time::Duration) -> std::time::Duration {
        (timeout / 4).max(std::time::Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        match ensure_driver() {
            Ok(()) => assert!(device_count() < 1024),
            Err(Error::LibraryNotFound { library, tried }) => {
                assert_eq!(library, "libcuda");
                assert!(
                    tried.iter().any(|t| t.starts_with("libcuda.so")),
                    "{tried:?}"
                );
                assert_eq!(device_count(), 0);
                assert!(matches!(
                    DeviceContext::get(0),
                    Err(Error::LibraryNotFound { .. })
                ));
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
}
