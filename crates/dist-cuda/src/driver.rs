//! The CUDA driver through cudarc: presence check, per-device context and stream, owned device
//! memory, 2-D copies, and the conversion of driver errors.
//!
//! cudarc panics when `libcuda` is missing, so [`ensure_driver`] checks `is_culib_present()`
//! first and every entry point of this crate calls it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys, CudaContext, DriverError};
use dist_core::{Error, Result};

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

/// Checks a raw `CUresult`.
pub(crate) fn check(call: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| cuda_err(call, e))
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
        .map_err(|e| cuda_err(&format!("cuModuleLoadData ({what})"), e))?;
    let funcs = names
        .iter()
        .map(|n| {
            let name = CString::new(n.as_str())
                .map_err(|_| Error::protocol("kernel name with a NUL byte"))?;
            // SAFETY: module is loaded; name is NUL-terminated.
            unsafe { cu::module::get_function(module, name) }
                .map(KernelFn)
                .map_err(|e| cuda_err(&format!("cuModuleGetFunction {n} ({what})"), e))
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

/// One device's primary context and the stream every op of this crate is enqueued on
/// (the "current stream" of torch): tensors, copies and collectives are ordered on it.
pub struct DeviceContext {
    ctx: Arc<CudaContext>,
    stream: Stream,
    ordinal: usize,
    pool: Mutex<Pool>,
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
/// the [`DeviceContext`], whose `synchronize` turns a set word into [`Error::Timeout`] naming
/// the ranks, so `to_host` cannot return the garbage such a kernel leaves.
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
        .map_err(|e| cuda_err("cuMemHostAlloc", e))? as *mut u32;
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

/// Freed allocations kept for reuse, by rounded size (a minimal caching allocator: `cuMemFree`
/// waits for the whole device, which out-of-place collectives would otherwise pay every call).
/// Reuse is safe because every op of this crate is ordered on the device's one stream.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    cached: usize,
    cap: usize,
}

/// Allocation granularity of the pool.
const POOL_ROUND: usize = 512;
/// Default cap of cached bytes per device (`DIST_CUDA_CACHE_BYTES` overrides; 0 disables).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

fn round_up(bytes: usize) -> Option<usize> {
    bytes
        .checked_add(POOL_ROUND - 1)
        .map(|b| b / POOL_ROUND * POOL_ROUND)
}

#[derive(Clone, Copy)]
struct Stream(sys::CUstream);
// SAFETY: a CUstream is a handle the driver lets any thread use.
unsafe impl Send for Stream {}
// SAFETY: as above; enqueueing from several threads is allowed by the driver.
unsafe impl Sync for Stream {}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceContext(cuda:{})", self.ordinal)
    }
}

impl DeviceContext {
    /// The process-wide context of device `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<Arc<DeviceContext>> {
        ensure_driver()?;
        static REG: OnceLock<Mutex<HashMap<usize, Arc<DeviceContext>>>> = OnceLock::new();
        let reg = REG.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = reg.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            d.bind()?;
            return Ok(d.clone());
        }
        let n = {
            cu::init().map_err(|e| cuda_err("cuInit", e))?;
            cu::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?
        };
        if ordinal >= n.max(0) as usize {
            return Err(Error::invalid(format!(
                "cuda:{ordinal} does not exist ({n} visible devices)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let cap = std::env::var("DIST_CUDA_CACHE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_CACHE_BYTES);
        let d = Arc::new(DeviceContext {
            ctx,
            stream: Stream(stream),
            ordinal,
            pool: Mutex::new(Pool {
                cap,
                ..Default::default()
            }),
            faults: Mutex::new(Vec::new()),
            serials: Mutex::new(HashMap::new()),
        });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }
    /// Device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The cudarc context.
    pub fn cudarc(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream this crate enqueues on.
    pub fn stream(&self) -> sys::CUstream {
        self.stream.0
    }
    /// Waits for the stream (at most [`dist_core::DEFAULT_TIMEOUT`]), then reports device-side
    /// barrier faults ([`FaultFlags`]).
    pub fn synchronize(&self) -> Result<()> {
        self.wait(
            &format!("cuda:{} synchronize", self.ordinal),
            dist_core::DEFAULT_TIMEOUT,
            || Ok(()),
        )
    }

    /// Waits for the stream with a deadline, calling `poll` between queries (spins briefly, then
    /// sleeps). Device faults win over the plain deadline: when `timeout` has passed, device
    /// code (whose own barrier deadline is the same) gets a grace of a quarter of it, at least
    /// one second, to report which peers it waited for.
    pub fn wait(
        &self,
        op: &str,
        timeout: std::time::Duration,
        poll: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.wait_on(self.stream.0, op, timeout, poll)
    }

    /// [`DeviceContext::wait`] for another stream of this device's context.
    pub(crate) fn wait_on(
        &self,
        stream: sys::CUstream,
        op: &str,
        timeout: std::time::Duration,
        mut poll: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.bind()?;
        let start = std::time::Instant::now();
        let grace = (timeout / 4).max(std::time::Duration::from_secs(1));
        let mut spins = 0u32;
        loop {
            // SAFETY: the caller's stream is alive (this context's own lives for the process).
            match unsafe { sys::cuStreamQuery(stream) } {
                sys::CUresult::CUDA_SUCCESS => return self.check_faults(),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(cuda_err(op, DriverError(other))),
            }
            poll()?;
            self.check_faults()?;
            let waited = start.elapsed();
            if waited >= timeout + grace {
                return Err(Error::Timeout {
                    op: op.to_string(),
                    waited,
                    missing_ranks: Vec::new(),
                    detail: "device work did not finish (a peer may not have joined a collective)"
                        .into(),
                });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(if spins < 1024 {
                    50
                } else {
                    500
                }));
            }
        }
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
        self.ctx
            .compute_capability()
            .map_err(|e| cuda_err("cuDeviceGetAttribute", e))
    }
    /// True while the stream is capturing a CUDA graph.
    pub fn is_capturing(&self) -> Result<bool> {
        self.bind()?;
        let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: valid stream and out-pointer.
        check("cuStreamIsCapturing", unsafe {
            sys::cuStreamIsCapturing(self.stream.0, &mut st)
        })?;
        Ok(st == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
    }
    /// Frees every cached allocation (after waiting for the stream).
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for (_, v) in p.free.drain() {
            for ptr in v {
                self.serial_freed(ptr);
                // SAFETY: cached pointers came from cuMemAlloc and are owned by the pool only.
                if let Err(e) = unsafe { cu::free_sync(ptr) } {
                    tracing::warn!("cuMemFree({ptr:#x}): {}", cuda_err("cuMemFree", e));
                }
            }
        }
        p.cached = 0;
        Ok(())
    }

    /// The serial of the allocation of this crate whose base address is `base` (`None` for
    /// memory allocated elsewhere). A serial changes when the address is freed and allocated
    /// again, and stays while the allocation is reused from the cache: an importer of this
    /// memory may keep its IPC mapping for as long as the serial it was given is the same.
    pub fn allocation_serial(&self, base: sys::CUdeviceptr) -> Option<u64> {
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&base)
            .map(|a| a.0)
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

    fn serial_born(&self, ptr: sys::CUdeviceptr) {
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ptr, (next_serial(), None));
    }

    fn serial_freed(&self, ptr: sys::CUdeviceptr) {
        self.serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ptr);
    }

    /// Bytes held by the allocation cache.
    pub fn cached_bytes(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).cached
    }

    fn pool_take(&self, size: usize) -> Option<sys::CUdeviceptr> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = p.free.get_mut(&size)?.pop()?;
        p.cached -= size;
        Some(ptr)
    }

    /// Returns `ptr` to the cache; false when the cache is full (the caller frees it).
    fn pool_put(&self, ptr: sys::CUdeviceptr, size: usize) -> bool {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.cached + size > p.cap {
            return false;
        }
        p.cached += size;
        p.free.entry(size).or_default().push(ptr);
        true
    }

    /// The device's UUID (16 bytes), to tell devices apart across processes.
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let u = self
            .ctx
            .uuid()
            .map_err(|e| cuda_err("cuDeviceGetUuid", e))?;
        let mut out = [0u8; 16];
        for (o, b) in out.iter_mut().zip(u.bytes.iter()) {
            *o = *b as u8;
        }
        Ok(out)
    }
}

/// Device memory owned by this process (`cuMemAlloc`, one allocation per buffer, so it can be
/// shared with CUDA IPC). Dropped: back to the device's cache, or freed when the cache is full;
/// a failing free is logged, never a panic. Reuse is ordered by the device's stream: work on
/// other streams must be synchronised by the caller before the buffer is dropped.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    dev: Arc<DeviceContext>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}, {} B, cuda:{})",
            self.ptr, self.bytes, self.dev.ordinal
        )
    }
}

impl DeviceBuffer {
    /// Allocates `bytes` (uninitialised), from the device's cache when it holds a block of the
    /// same rounded size. Zero bytes allocate nothing (null pointer). Out of memory: the cache
    /// is released and the allocation tried once more.
    pub fn alloc(dev: &Arc<DeviceContext>, bytes: usize) -> Result<DeviceBuffer> {
        dev.bind()?;
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ptr: 0,
                bytes: 0,
                dev: dev.clone(),
            });
        }
        let size =
            round_up(bytes).ok_or_else(|| Error::invalid(format!("allocation of {bytes} B")))?;
        if let Some(ptr) = dev.pool_take(size) {
            return Ok(DeviceBuffer {
                ptr,
                bytes: size,
                dev: dev.clone(),
            });
        }
        // SAFETY: the context is current; the result is owned by the returned buffer.
        let ptr = match unsafe { cu::malloc_sync(size) } {
            Ok(p) => p,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY && dev.cached_bytes() > 0 => {
                dev.empty_cache()?;
                // SAFETY: as above.
                unsafe { cu::malloc_sync(size) }.map_err(|e| {
                    cuda_err(&format!("cuMemAlloc({bytes} B) on cuda:{}", dev.ordinal), e)
                })?
            }
            Err(e) => {
                return Err(cuda_err(
                    &format!("cuMemAlloc({bytes} B) on cuda:{}", dev.ordinal),
                    e,
                ))
            }
        };
        dev.serial_born(ptr);
        Ok(DeviceBuffer {
            ptr,
            bytes: size,
            dev: dev.clone(),
        })
    }
    /// Allocates `bytes` and zeroes them on the device's stream.
    pub fn zeroed(dev: &Arc<DeviceContext>, bytes: usize) -> Result<DeviceBuffer> {
        let b = Self::alloc(dev, bytes)?;
        if bytes > 0 {
            // SAFETY: b owns `bytes` bytes at ptr; the stream is the device's.
            unsafe { cu::memset_d8_async(b.ptr, 0, bytes, dev.stream()) }
                .map_err(|e| cuda_err("cuMemsetD8Async", e))?;
        }
        Ok(b)
    }
    /// Device address.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    /// Size in bytes (the request rounded up to 512).
    pub fn len(&self) -> usize {
        self.bytes
    }
    /// True for a zero-byte buffer.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    /// The device.
    pub fn device(&self) -> &Arc<DeviceContext> {
        &self.dev
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 || self.dev.pool_put(self.ptr, self.bytes) {
            return;
        }
        if let Err(e) = self.dev.bind() {
            tracing::warn!("freeing {:?}: {e}", self);
            return;
        }
        self.dev.serial_freed(self.ptr);
        // SAFETY: ptr came from cuMemAlloc and is freed once. cuMemFree waits for pending work.
        if let Err(e) = unsafe { cu::free_sync(self.ptr) } {
            tracing::warn!("cuMemFree of {:?}: {}", self, cuda_err("cuMemFree", e));
        }
    }
}

/// Device-to-device async copy of `bytes` on `stream`.
///
/// # Safety
/// Both ranges are valid device memory for `bytes` bytes until the copy has run.
pub unsafe fn copy_d2d(dst: u64, src: u64, bytes: usize, stream: sys::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: forwarded contract.
    unsafe { cu::memcpy_dtod_async(dst, src, bytes, stream) }
        .map_err(|e| cuda_err("cuMemcpyDtoDAsync", e))
}

/// A strided device-to-device copy: `height` rows of `width` bytes, rows `src_pitch` /
/// `dst_pitch` bytes apart. The re-layout step of all_gather(dim) and reduce_scatter(dim).
///
/// # Safety
/// Both strided ranges are valid device memory until the copy has run.
pub unsafe fn copy_2d(
    dst: u64,
    dst_pitch: usize,
    src: u64,
    src_pitch: usize,
    width: usize,
    height: usize,
    stream: sys::CUstream,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Ok(());
    }
    if height == 1 || (width == src_pitch && width == dst_pitch) {
        // SAFETY: contiguous case of the same contract.
        return unsafe { copy_d2d(dst, src, width * height, stream) };
    }
    let p = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: width,
        Height: height,
    };
    // SAFETY: forwarded contract; p describes the two ranges.
    check("cuMemcpy2DAsync", unsafe {
        sys::cuMemcpy2DAsync_v2(&p, stream)
    })
}

/// Host-to-device copy on the device's stream, waited for (the host slice is borrowed).
pub fn copy_h2d(dev: &DeviceContext, dst: u64, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    dev.bind()?;
    // SAFETY: dst holds src.len() bytes (caller's buffer); we synchronise before src is released.
    unsafe { cu::memcpy_htod_async(dst, src, dev.stream()) }
        .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
    dev.synchronize()
}

/// Device-to-host copy on the device's stream, waited for.
pub fn copy_d2h(dev: &DeviceContext, dst: &mut [u8], src: u64) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    dev.bind()?;
    // SAFETY: src holds dst.len() bytes; we synchronise before dst is released.
    unsafe { cu::memcpy_dtoh_async(dst, src, dev.stream()) }
        .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
    dev.synchronize()
}

/// Raw pointer helper for the NCCL calls.
pub(crate) fn vptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
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
