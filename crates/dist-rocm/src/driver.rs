//! The HIP runtime as this crate uses it: presence check, device discovery ("no ROCm device"
//! as an error), per-device context and stream, owned device memory with a small cache, 2-D
//! copies, and [`probe`] for `dist bench --backend rocm`.
//!
//! [`ensure_driver`] loads the runtime (or reports [`Error::LibraryNotFound`]); every entry
//! point of this crate calls it, then [`DeviceContext::get`], which turns "no AMD GPU" into
//! the error of [`crate::hip::result::no_device`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use dist_core::{Error, Result};

use crate::hip::{self, result as hr, safe::Stream, sys, Runtime};

/// Loads the HIP runtime once (see [`crate::hip::runtime`]). Absent: [`Error::LibraryNotFound`]
/// with every path tried and why, never a panic.
pub fn ensure_driver() -> Result<&'static Runtime> {
    hip::runtime()
}

/// Number of usable AMD GPUs: `Err` ("no ROCm device", [`crate::is_no_device`]) when the
/// runtime loads but finds none, [`Error::LibraryNotFound`] without the runtime.
pub fn visible_devices() -> Result<usize> {
    let rt = ensure_driver()?;
    let from = format!("HIP runtime {} from {}", rt.version(), rt.path);
    match hr::get_device_count(rt) {
        Ok(0) => Err(hr::no_device(format!(
            "hipGetDeviceCount found 0 devices ({from})"
        ))),
        Ok(n) => Ok(n),
        Err(Error::Backend {
            backend,
            code,
            message,
        }) => Err(Error::Backend {
            backend,
            code,
            message: format!("{message} ({from})"),
        }),
        Err(e) => Err(e),
    }
}

/// Number of visible AMD GPUs (0 without a runtime or a device).
pub fn device_count() -> usize {
    visible_devices().unwrap_or(0)
}

/// A one-paragraph summary of the ROCm setup for `dist bench --backend rocm`: the HIP runtime,
/// each device (name, memory, PCI bus) and the RCCL library. `Err` when there is no runtime or
/// no device (the CLI prints it and exits non-zero); an RCCL that cannot be loaded is reported
/// in the text (a single GPU needs none), not as an error.
pub fn probe() -> Result<String> {
    let rt = ensure_driver()?;
    let n = visible_devices()?;
    let drv = hr::driver_get_version(rt)
        .map(hip::format_version)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let mut s = format!(
        "HIP runtime {} ({}), driver {drv}, {n} device(s)",
        rt.version(),
        rt.path
    );
    for i in 0..n {
        let name = hr::device_get_name(rt, i).unwrap_or_else(|e| format!("? ({e})"));
        let mem = hr::device_total_mem(rt, i)
            .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_else(|e| format!("? GiB ({e})"));
        let bus = hr::device_get_pci_bus_id(rt, i).unwrap_or_else(|e| format!("? ({e})"));
        s.push_str(&format!("\n  rocm:{i}: {name}, {mem}, PCI {bus}"));
    }
    match dist_nccl::library(dist_nccl::Flavor::Rccl) {
        Ok(l) => s.push_str(&format!("\n  RCCL {} ({})", l.version(), l.path)),
        Err(e) => s.push_str(&format!("\n  RCCL not loaded: {e}")),
    }
    Ok(s)
}

/// One device's stream (the "current stream" of torch: every op of this crate is enqueued on
/// it) and its allocation cache. HIP has one implicit context per device; [`Self::bind`] makes
/// the device current on the calling thread.
pub struct DeviceContext {
    rt: &'static Runtime,
    stream: Stream,
    ordinal: usize,
    pool: Mutex<Pool>,
}

/// Freed allocations kept for reuse, by rounded size (`hipFree` waits for the whole device,
/// which out-of-place collectives would otherwise pay every call). Reuse is safe because every
/// op of this crate is ordered on the device's one stream.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<u64>>,
    cached: usize,
    cap: usize,
}

/// Allocation granularity of the pool.
const POOL_ROUND: usize = 512;
/// Default cap of cached bytes per device (`DIST_ROCM_CACHE_BYTES` overrides; 0 disables).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

fn round_up(bytes: usize) -> Option<usize> {
    bytes
        .checked_add(POOL_ROUND - 1)
        .map(|b| b / POOL_ROUND * POOL_ROUND)
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceContext(rocm:{})", self.ordinal)
    }
}

impl DeviceContext {
    /// The process-wide context of device `ordinal`, created on first use. No runtime:
    /// [`Error::LibraryNotFound`]; no AMD GPU: "no ROCm device"; an ordinal past the last
    /// device: [`Error::InvalidArgument`].
    pub fn get(ordinal: usize) -> Result<Arc<DeviceContext>> {
        let rt = ensure_driver()?;
        static REG: OnceLock<Mutex<HashMap<usize, Arc<DeviceContext>>>> = OnceLock::new();
        let reg = REG.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = reg.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            d.bind()?;
            return Ok(d.clone());
        }
        let n = visible_devices()?;
        if ordinal >= n {
            return Err(Error::invalid(format!(
                "rocm:{ordinal} does not exist ({n} visible devices)"
            )));
        }
        let stream = Stream::new(rt, ordinal)?;
        let cap = std::env::var("DIST_ROCM_CACHE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_CACHE_BYTES);
        let d = Arc::new(DeviceContext {
            rt,
            stream,
            ordinal,
            pool: Mutex::new(Pool {
                cap,
                ..Default::default()
            }),
        });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// Makes this device current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        hr::set_device(self.rt, self.ordinal)
    }
    /// Device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The HIP runtime.
    pub fn runtime(&self) -> &'static Runtime {
        self.rt
    }
    /// The stream this crate enqueues on (RCCL's `hipStream_t`).
    pub fn stream(&self) -> sys::hipStream_t {
        self.stream.raw()
    }
    /// The owning stream.
    pub fn stream_handle(&self) -> &Stream {
        &self.stream
    }
    /// Waits for the stream, at most [`dist_core::DEFAULT_TIMEOUT`].
    pub fn synchronize(&self) -> Result<()> {
        self.wait(
            &format!("rocm:{} synchronize", self.ordinal),
            dist_core::DEFAULT_TIMEOUT,
            || Ok(()),
        )
    }

    /// Waits for the stream with a deadline, calling `poll` between queries (spins briefly,
    /// then sleeps, so a descheduled peer on a loaded machine gets the core).
    pub fn wait(
        &self,
        op: &str,
        timeout: std::time::Duration,
        mut poll: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.bind()?;
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            if self.stream.query().map_err(|e| annotate(e, op))? {
                return Ok(());
            }
            poll()?;
            let waited = start.elapsed();
            if waited >= timeout {
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

    /// True while the stream is capturing a graph.
    pub fn is_capturing(&self) -> Result<bool> {
        self.bind()?;
        self.stream.is_capturing()
    }
    /// The device's name (`hipDeviceGetName`).
    pub fn name(&self) -> Result<String> {
        hr::device_get_name(self.rt, self.ordinal)
    }
    /// The device's PCI bus id, to tell devices apart across processes.
    pub fn pci_bus_id(&self) -> Result<String> {
        hr::device_get_pci_bus_id(self.rt, self.ordinal)
    }
    /// Frees every cached allocation (after waiting for the stream).
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for (_, v) in p.free.drain() {
            for ptr in v {
                // SAFETY: cached pointers came from hipMalloc and are owned by the pool only.
                if let Err(e) = unsafe { hr::free(self.rt, vptr(ptr)) } {
                    tracing::warn!("hipFree({ptr:#x}): {e}");
                }
            }
        }
        p.cached = 0;
        Ok(())
    }

    /// Bytes held by the allocation cache.
    pub fn cached_bytes(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).cached
    }

    fn pool_take(&self, size: usize) -> Option<u64> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = p.free.get_mut(&size)?.pop()?;
        p.cached -= size;
        Some(ptr)
    }

    /// Returns `ptr` to the cache; false when the cache is full (the caller frees it).
    fn pool_put(&self, ptr: u64, size: usize) -> bool {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.cached + size > p.cap {
            return false;
        }
        p.cached += size;
        p.free.entry(size).or_default().push(ptr);
        true
    }
}

fn annotate(e: Error, op: &str) -> Error {
    match e {
        Error::Backend {
            backend,
            code,
            message,
        } => Error::Backend {
            backend,
            code,
            message: format!("{op}: {message}"),
        },
        e => e,
    }
}

/// Device memory owned by this process (`hipMalloc`, one allocation per buffer, so it can be
/// shared with HIP IPC). Dropped: back to the device's cache, or freed when the cache is full;
/// a failing free is logged, never a panic. Reuse is ordered by the device's stream: work on
/// other streams must be synchronised by the caller before the buffer is dropped.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    dev: Arc<DeviceContext>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}, {} B, rocm:{})",
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
        let what = format!("hipMalloc({bytes} B) on rocm:{}", dev.ordinal);
        let ptr = match hr::malloc(dev.rt, size) {
            Ok(p) => p,
            Err(Error::Backend { code: Some(c), .. })
                if c == sys::hipErrorOutOfMemory as i64 && dev.cached_bytes() > 0 =>
            {
                dev.empty_cache()?;
                hr::malloc(dev.rt, size).map_err(|e| annotate(e, &what))?
            }
            Err(e) => return Err(annotate(e, &what)),
        };
        Ok(DeviceBuffer {
            ptr: ptr as usize as u64,
            bytes: size,
            dev: dev.clone(),
        })
    }
    /// Allocates `bytes` and zeroes them on the device's stream.
    pub fn zeroed(dev: &Arc<DeviceContext>, bytes: usize) -> Result<DeviceBuffer> {
        let b = Self::alloc(dev, bytes)?;
        if bytes > 0 {
            // SAFETY: b owns `bytes` bytes at ptr; the stream is the device's.
            unsafe { hr::memset_async(dev.rt, vptr(b.ptr), 0, bytes, dev.stream()) }?;
        }
        Ok(b)
    }
    /// Device address.
    pub fn ptr(&self) -> u64 {
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
    /// An IPC handle of this allocation for other processes (the custom all-reduce's buffers,
    /// when it comes to ROCm). Cached blocks are whole `hipMalloc` allocations, so any buffer
    /// of this crate can be shared.
    pub fn ipc_handle(&self) -> Result<hip::safe::IpcMemHandle> {
        dist_core::ensure_arg!(self.ptr != 0, "no IPC handle for a zero-byte buffer");
        self.dev.bind()?;
        // SAFETY: ptr is the start of a live hipMalloc allocation owned by self.
        unsafe { hr::ipc_get_mem_handle(self.dev.rt, vptr(self.ptr)) }.map(hip::safe::IpcMemHandle)
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
        // SAFETY: ptr came from hipMalloc and is freed once. hipFree waits for pending work.
        if let Err(e) = unsafe { hr::free(self.dev.rt, vptr(self.ptr)) } {
            tracing::warn!("hipFree of {:?}: {e}", self);
        }
    }
}

/// Device-to-device async copy of `bytes` on `stream`.
///
/// # Safety
/// Both ranges are valid device memory for `bytes` bytes until the copy has run.
pub unsafe fn copy_d2d(
    rt: &Runtime,
    dst: u64,
    src: u64,
    bytes: usize,
    stream: sys::hipStream_t,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: forwarded contract.
    unsafe {
        hr::memcpy_async(
            rt,
            vptr(dst),
            vptr(src),
            bytes,
            sys::hipMemcpyDeviceToDevice,
            stream,
        )
    }
}

/// A strided device-to-device copy: `height` rows of `width` bytes, rows `src_pitch` /
/// `dst_pitch` bytes apart. The re-layout step of all_gather(dim) and reduce_scatter(dim).
///
/// # Safety
/// Both strided ranges are valid device memory until the copy has run.
#[allow(clippy::too_many_arguments)]
pub unsafe fn copy_2d(
    rt: &Runtime,
    dst: u64,
    dst_pitch: usize,
    src: u64,
    src_pitch: usize,
    width: usize,
    height: usize,
    stream: sys::hipStream_t,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Ok(());
    }
    if height == 1 || (width == src_pitch && width == dst_pitch) {
        // SAFETY: contiguous case of the same contract.
        return unsafe { copy_d2d(rt, dst, src, width * height, stream) };
    }
    // SAFETY: forwarded contract.
    unsafe {
        hr::memcpy_2d_async(
            rt,
            vptr(dst),
            dst_pitch,
            vptr(src),
            src_pitch,
            width,
            height,
            sys::hipMemcpyDeviceToDevice,
            stream,
        )
    }
}

/// Host-to-device copy on the device's stream, waited for (the host slice is borrowed).
pub fn copy_h2d(dev: &DeviceContext, dst: u64, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    dev.bind()?;
    // SAFETY: dst holds src.len() bytes (caller's buffer); we synchronise before src is released.
    unsafe {
        hr::memcpy_async(
            dev.rt,
            vptr(dst),
            src.as_ptr() as *const c_void,
            src.len(),
            sys::hipMemcpyHostToDevice,
            dev.stream(),
        )
    }?;
    dev.synchronize()
}

/// Device-to-host copy on the device's stream, waited for.
pub fn copy_d2h(dev: &DeviceContext, dst: &mut [u8], src: u64) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    dev.bind()?;
    // SAFETY: src holds dst.len() bytes; we synchronise before dst is released.
    unsafe {
        hr::memcpy_async(
            dev.rt,
            dst.as_mut_ptr() as *mut c_void,
            vptr(src),
            dst.len(),
            sys::hipMemcpyDeviceToHost,
            dev.stream(),
        )
    }?;
    dev.synchronize()
}

/// Raw pointer helper for the HIP and RCCL calls.
pub(crate) fn vptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(round_up(1), Some(512));
        assert_eq!(round_up(512), Some(512));
        assert_eq!(round_up(513), Some(1024));
        assert_eq!(round_up(usize::MAX), None);
    }

    #[test]
    fn no_runtime_or_no_device_is_an_error_not_a_panic() {
        match visible_devices() {
            Ok(n) => {
                assert!(n > 0);
                assert!(probe().unwrap().contains("rocm:0"));
            }
            Err(Error::LibraryNotFound { library, tried }) => {
                assert_eq!(library, "libamdhip64");
                assert!(!tried.is_empty());
                assert_eq!(device_count(), 0);
                assert!(matches!(
                    DeviceContext::get(0),
                    Err(Error::LibraryNotFound { .. })
                ));
            }
            Err(e) => {
                assert!(hr::is_no_device(&e), "{e}");
                assert_eq!(device_count(), 0);
                let e = DeviceContext::get(0).unwrap_err();
                assert!(hr::is_no_device(&e), "{e}");
                let e = probe().unwrap_err();
                assert!(hr::is_no_device(&e), "{e}");
            }
        }
    }
}
