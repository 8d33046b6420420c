//! Device memory written once for every runtime: the cache of freed allocations ([`Pool`]),
//! owned allocations ([`DeviceBuffer`]) and the backends' tensor type ([`GpuTensor`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dist_core::tensor::checked_nbytes;
use dist_core::{DType, Device, Error, HostTensor, Result, Tensor};

use crate::runtime::{wait_stream, GpuRuntime, RawStream};
use crate::view::{GpuView, GpuViewMut};

/// Allocation granularity of the cache.
pub const POOL_ROUND: usize = 512;
/// Default cap of cached bytes per device (the backends' `DIST_*_CACHE_BYTES` override it).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

fn round_up(bytes: usize) -> Option<usize> {
    bytes
        .checked_add(POOL_ROUND - 1)
        .map(|b| b / POOL_ROUND * POOL_ROUND)
}

/// Freed allocations kept for reuse, by rounded size (a minimal caching allocator: a real free
/// waits for the whole device, which out-of-place collectives would otherwise pay every call).
///
/// Reuse is stream-ordered: a buffer freed while work on the runtime's own stream may still use
/// it is safe to hand out again, since every later user of the cache orders after that stream or
/// waits for it; a buffer last used on *another* stream (an engine's) is parked with an event
/// recorded there ([`Pool::defer`]) and comes back only once the event has completed.
pub struct Pool<R: GpuRuntime> {
    inner: Mutex<PoolInner<R>>,
}

struct PoolInner<R: GpuRuntime> {
    free: HashMap<usize, Vec<u64>>,
    cached: usize,
    cap: usize,
    /// Buffers last used on another stream: (event recorded after that use, address, size).
    parked: Vec<(R::Event, u64, usize)>,
    spare_events: Vec<R::Event>,
}

impl<R: GpuRuntime> std::fmt::Debug for Pool<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        write!(
            f,
            "Pool({} B cached, cap {}, {} parked)",
            g.cached,
            g.cap,
            g.parked.len()
        )
    }
}

impl<R: GpuRuntime> Pool<R> {
    /// An empty cache holding at most `cap` bytes (0: no caching).
    pub fn new(cap: usize) -> Pool<R> {
        Pool {
            inner: Mutex::new(PoolInner {
                free: HashMap::new(),
                cached: 0,
                cap,
                parked: Vec::new(),
                spare_events: Vec::new(),
            }),
        }
    }

    /// A cache whose cap is read from `env` (bytes), else [`DEFAULT_CACHE_BYTES`].
    pub fn from_env(env: &str) -> Pool<R> {
        let cap = std::env::var(env)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_CACHE_BYTES);
        Self::new(cap)
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner<R>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held (parked buffers included).
    pub fn cached_bytes(&self) -> usize {
        self.lock().cached
    }

    /// Buffers waiting for another stream before they can be reused.
    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    /// Moves parked buffers whose streams have passed their last use into the free lists.
    fn reap(dev: &R, g: &mut PoolInner<R>) {
        let mut i = 0;
        while i < g.parked.len() {
            // An event that cannot be queried keeps its buffer parked (never reused early).
            if dev.event_done(&g.parked[i].0).unwrap_or(false) {
                let (ev, ptr, size) = g.parked.swap_remove(i);
                g.free.entry(size).or_default().push(ptr);
                g.spare_events.push(ev);
            } else {
                i += 1;
            }
        }
    }

    fn take(&self, dev: &R, size: usize) -> Option<u64> {
        let mut g = self.lock();
        if !g.parked.is_empty() {
            Self::reap(dev, &mut g);
        }
        let ptr = g.free.get_mut(&size)?.pop()?;
        g.cached -= size;
        Some(ptr)
    }

    /// Returns `ptr` to the cache; false when the cache is full (the caller frees it).
    fn put(&self, ptr: u64, size: usize) -> bool {
        let mut g = self.lock();
        if g.cached + size > g.cap {
            return false;
        }
        g.cached += size;
        g.free.entry(size).or_default().push(ptr);
        true
    }

    /// Frees `buf` once the work enqueued on `stream` so far has run: the buffer is parked with
    /// an event recorded there and reused after it completes (see the type's docs). On the
    /// runtime's own stream this is a plain drop.
    ///
    /// # Safety
    /// `stream` is a live stream of `buf`'s device and the context is current.
    pub unsafe fn defer(&self, buf: DeviceBuffer<R>, stream: RawStream) -> Result<()> {
        let dev = buf.dev.clone();
        let full = {
            let g = self.lock();
            g.cached + buf.bytes > g.cap
        };
        if buf.ptr == 0 || stream == dev.stream() || full {
            // Own stream: reuse is ordered; a full cache frees, and a real free waits for the
            // device.
            drop(buf);
            return Ok(());
        }
        let ev = match self.lock().spare_events.pop() {
            Some(e) => e,
            None => dev.new_event(false)?,
        };
        // SAFETY: forwarded contract.
        if let Err(e) = unsafe { dev.record(&ev, stream) } {
            // Not recorded: wait for the stream instead, then free normally.
            // SAFETY: forwarded contract.
            unsafe {
                wait_stream(
                    &*dev,
                    stream,
                    "deferred free",
                    dist_core::DEFAULT_TIMEOUT,
                    || Ok(()),
                )
            }?;
            drop(buf);
            return Err(e);
        }
        let (ptr, size) = (buf.ptr, buf.bytes);
        std::mem::forget(buf);
        let mut g = self.lock();
        g.cached += size;
        g.parked.push((ev, ptr, size));
        Ok(())
    }

    /// Frees every cached buffer. The caller has waited for the runtime's stream; parked
    /// buffers are waited for through their events (at most the default deadline).
    pub fn empty(&self, dev: &R) -> Result<()> {
        dev.bind()?;
        let start = std::time::Instant::now();
        loop {
            let mut g = self.lock();
            Self::reap(dev, &mut g);
            if g.parked.is_empty() {
                break;
            }
            drop(g);
            if start.elapsed() > dist_core::DEFAULT_TIMEOUT {
                return Err(Error::timeout(
                    "emptying the allocation cache",
                    start.elapsed(),
                    "buffers last used on another stream are still in use",
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let mut g = self.lock();
        for (_, v) in g.free.drain() {
            for ptr in v {
                // SAFETY: cached pointers came from malloc and are owned by the cache only;
                // their last uses have run (the stream was waited for, parked ones reaped).
                if let Err(e) = unsafe { dev.free(ptr) } {
                    tracing::warn!("freeing cached {ptr:#x}: {e}");
                }
            }
        }
        g.cached = 0;
        g.spare_events.clear();
        Ok(())
    }
}

/// One device allocation owned by this process (one `malloc` per buffer, so it can be shared
/// over IPC). Dropped: back to the device's cache, or freed when the cache is full; a failing
/// free is logged, never a panic. Zero bytes allocate nothing (address 0).
pub struct DeviceBuffer<R: GpuRuntime> {
    ptr: u64,
    bytes: usize,
    dev: Arc<R>,
}

impl<R: GpuRuntime> std::fmt::Debug for DeviceBuffer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}, {} B, {}:{})",
            self.ptr,
            self.bytes,
            R::NAME,
            self.dev.ordinal()
        )
    }
}

impl<R: GpuRuntime> DeviceBuffer<R> {
    /// Allocates `bytes` (uninitialised), from the cache when it holds a block of the same
    /// rounded size. Out of memory: the cache is released and the allocation tried once more.
    pub fn alloc(dev: &Arc<R>, bytes: usize) -> Result<DeviceBuffer<R>> {
        dev.bind()?;
        // SAFETY: the context was just bound.
        unsafe { Self::alloc_bound(dev, bytes) }
    }

    /// [`DeviceBuffer::alloc`] without binding.
    ///
    /// # Safety
    /// `dev`'s context is current.
    pub unsafe fn alloc_bound(dev: &Arc<R>, bytes: usize) -> Result<DeviceBuffer<R>> {
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ptr: 0,
                bytes: 0,
                dev: dev.clone(),
            });
        }
        let size =
            round_up(bytes).ok_or_else(|| Error::invalid(format!("allocation of {bytes} B")))?;
        if let Some(ptr) = dev.pool().take(dev, size) {
            return Ok(DeviceBuffer {
                ptr,
                bytes: size,
                dev: dev.clone(),
            });
        }
        // SAFETY: the context is current (caller's contract).
        let ptr = match unsafe { dev.malloc(size) } {
            Ok(p) => p,
            Err(_) if dev.pool().cached_bytes() > 0 => {
                dev.empty_cache()?;
                // SAFETY: as above (empty_cache leaves the context bound).
                unsafe { dev.malloc(size) }?
            }
            Err(e) => return Err(e),
        };
        Ok(DeviceBuffer {
            ptr,
            bytes: size,
            dev: dev.clone(),
        })
    }

    /// Allocates `bytes` and zeroes them on the device's stream.
    pub fn zeroed(dev: &Arc<R>, bytes: usize) -> Result<DeviceBuffer<R>> {
        let b = Self::alloc(dev, bytes)?;
        if bytes > 0 {
            // SAFETY: b owns at least `bytes` bytes; the device's own stream; bound by alloc.
            unsafe { dev.memset_zero(b.ptr, bytes, dev.stream()) }?;
        }
        Ok(b)
    }
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes (the request rounded up to [`POOL_ROUND`]).
    pub fn len(&self) -> usize {
        self.bytes
    }
    /// True for a zero-byte buffer.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    /// The device.
    pub fn device(&self) -> &Arc<R> {
        &self.dev
    }
}

impl<R: GpuRuntime> Drop for DeviceBuffer<R> {
    fn drop(&mut self) {
        if self.ptr == 0 || self.dev.pool().put(self.ptr, self.bytes) {
            return;
        }
        if let Err(e) = self.dev.bind() {
            tracing::warn!("freeing {:?}: {e}", self);
            return;
        }
        // SAFETY: ptr came from malloc and is freed once; the free waits for pending work.
        if let Err(e) = unsafe { self.dev.free(self.ptr) } {
            tracing::warn!("freeing {:?}: {e}", self);
        }
    }
}

/// A dense row-major tensor in device memory: the backends' own tensor type
/// (`CudaTensor`, `RocmTensor`).
///
/// Clones share the storage (as torch tensors that alias): in-place collectives on one clone
/// are seen by the others. Memory is released when the last clone is dropped. Its views
/// ([`GpuTensor::view`]) are ordered on the runtime's own stream.
pub struct GpuTensor<R: GpuRuntime> {
    buf: Arc<DeviceBuffer<R>>,
    /// Bytes from the start of the buffer to the first element (a narrowed tensor's).
    offset: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl<R: GpuRuntime> Clone for GpuTensor<R> {
    fn clone(&self) -> Self {
        GpuTensor {
            buf: self.buf.clone(),
            offset: self.offset,
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
}

impl<R: GpuRuntime> std::fmt::Debug for GpuTensor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .field("ptr", &format_args!("{:#x}", self.ptr()))
            .finish()
    }
}

impl<R: GpuRuntime> GpuTensor<R> {
    /// A zero-filled tensor on `dev` (zeroed on the device's stream).
    pub fn zeros(dev: &Arc<R>, dtype: DType, shape: &[usize]) -> Result<Self> {
        let n = checked_nbytes(dtype, shape)?;
        Ok(Self::from_buffer(
            DeviceBuffer::zeroed(dev, n)?,
            dtype,
            shape,
        ))
    }
    /// An uninitialised tensor (for outputs every byte of which an op writes).
    pub fn uninit(dev: &Arc<R>, dtype: DType, shape: &[usize]) -> Result<Self> {
        let n = checked_nbytes(dtype, shape)?;
        Ok(Self::from_buffer(
            DeviceBuffer::alloc(dev, n)?,
            dtype,
            shape,
        ))
    }
    fn from_buffer(buf: DeviceBuffer<R>, dtype: DType, shape: &[usize]) -> Self {
        GpuTensor {
            buf: Arc::new(buf),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        }
    }
    /// Copies a host tensor to device `ordinal` (waits for the copy).
    pub fn from_host(t: &HostTensor, ordinal: usize) -> Result<Self> {
        let dev = R::device(ordinal)?;
        let mut out = Self::uninit(&dev, t.dtype(), t.shape())?;
        out.write_host(t.as_bytes())?;
        Ok(out)
    }
    /// Copies to the host (waits for the device's stream).
    pub fn to_host(&self) -> Result<HostTensor> {
        let mut h = HostTensor::zeros(self.dtype, &self.shape);
        let dev = &self.buf.dev;
        if self.nbytes() > 0 {
            dev.bind()?;
            // SAFETY: the tensor holds nbytes at ptr; `h` is ours and the stream is waited
            // for before it is read or dropped.
            unsafe { dev.copy_d2h(h.as_bytes_mut(), self.ptr(), dev.stream()) }?;
        }
        dev.synchronize()?;
        Ok(h)
    }
    /// Overwrites the contents from a host tensor of the same dtype and shape (waits).
    pub fn copy_from_host(&mut self, t: &HostTensor) -> Result<()> {
        dist_core::ensure_arg!(
            t.dtype() == self.dtype && t.shape() == self.shape.as_slice(),
            "copy_from_host: {} {:?} into {} {:?}",
            t.dtype(),
            t.shape(),
            self.dtype,
            self.shape
        );
        self.write_host(t.as_bytes())
    }
    fn write_host(&mut self, bytes: &[u8]) -> Result<()> {
        let dev = &self.buf.dev;
        if !bytes.is_empty() {
            dev.bind()?;
            // SAFETY: the tensor holds bytes.len() bytes (checked by the callers); the stream
            // is waited for before `bytes` can be released.
            unsafe { dev.copy_h2d(self.ptr(), bytes, dev.stream()) }?;
        }
        dev.synchronize()
    }
    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr() + self.offset as u64
    }
    /// The device context.
    pub fn context(&self) -> &Arc<R> {
        &self.buf.dev
    }
    /// The allocation holding the tensor.
    pub fn buffer(&self) -> &DeviceBuffer<R> {
        &self.buf
    }
    /// The same storage seen with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        dist_core::ensure_arg!(
            shape.iter().product::<usize>() == self.numel(),
            "reshape {:?} -> {shape:?} changes the element count",
            self.shape
        );
        Ok(GpuTensor {
            buf: self.buf.clone(),
            offset: self.offset,
            dtype: self.dtype,
            shape: shape.to_vec(),
        })
    }
    /// Elements `[start, start + len)` as a 1-D tensor sharing this storage (no copy).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        dist_core::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= self.numel()),
            "narrow [{start}, {start}+{len}) out of range for {} elements",
            self.numel()
        );
        Ok(GpuTensor {
            buf: self.buf.clone(),
            offset: self.offset + start * self.dtype.size(),
            dtype: self.dtype,
            shape: vec![len],
        })
    }
    /// A read view, ordered on the device's own stream.
    pub fn view(&self) -> GpuView<'_, R> {
        let dev: &R = &self.buf.dev;
        // SAFETY: the tensor owns nbytes at ptr on dev (dtype and shape made it), alive while
        // the view borrows it; the stream is the device's own.
        unsafe { GpuView::new_unchecked(dev, self.ptr(), self.dtype, &self.shape, dev.stream()) }
    }
    /// A write view, ordered on the device's own stream.
    pub fn view_mut(&mut self) -> GpuViewMut<'_, R> {
        let dev: &R = &self.buf.dev;
        // SAFETY: as in `view`; borrowed mutably.
        unsafe { GpuViewMut::new_unchecked(dev, self.ptr(), self.dtype, &self.shape, dev.stream()) }
    }
}

impl<R: GpuRuntime> Tensor for GpuTensor<R> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn device(&self) -> Device {
        Device::new(R::KIND, self.buf.dev.ordinal())
    }
}
