//! [`GpuRuntime`]: the hardware surface a GPU backend supplies to the generic communicator —
//! device registry and binding, its stream, raw allocation, copies, events, graph capture and
//! the optional fast all-reduce ([`FastAllReduce`]). Everything above it ([`crate::GpuTensor`],
//! [`crate::GpuView`], [`crate::NcclCommunicator`], [`crate::GpuGraph`], the allocation cache)
//! is written once against it.
//!
//! The primitives that take device addresses or streams are `unsafe fn`s: their callers (this
//! crate's safe types) guarantee the ranges, the stream and the current context. None of them
//! binds the context: a safe entry point binds once ([`GpuRuntime::bind`]) and then calls as
//! many primitives as it needs.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dist_core::{CommunicatorContext, DType, DeviceKind, Error, HostGroup, Result};

use crate::memory::Pool;
use crate::Flavor;

/// A stream handle as NCCL takes it (`cudaStream_t`, `hipStream_t`, `CUstream`): opaque, never
/// dereferenced here. Made only by [`RawStream::from_raw`] (unsafe: the handle must be a live
/// stream) or by a runtime for its own stream.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawStream(*mut c_void);

// SAFETY: a stream handle is a value the GPU runtimes let any thread enqueue on.
unsafe impl Send for RawStream {}
// SAFETY: as above.
unsafe impl Sync for RawStream {}

impl std::fmt::Debug for RawStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawStream({:p})", self.0)
    }
}

impl RawStream {
    /// Wraps a runtime's stream handle.
    ///
    /// # Safety
    /// `raw` is a stream of the runtime and device it will be used with, alive for as long as
    /// this value (or a view carrying it) is used to enqueue work.
    pub unsafe fn from_raw(raw: *mut c_void) -> RawStream {
        RawStream(raw)
    }
    /// The handle, for the runtime's and NCCL's C calls.
    pub fn as_raw(self) -> *mut c_void {
        self.0
    }
}

/// A strided device copy: `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` bytes
/// apart (`width <= pitch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    /// Destination address.
    pub dst: u64,
    /// Bytes from one destination row to the next.
    pub dst_pitch: usize,
    /// Source address.
    pub src: u64,
    /// Bytes from one source row to the next.
    pub src_pitch: usize,
    /// Bytes per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

impl Strided {
    /// True when the rows are adjacent on both sides (one contiguous copy of
    /// `width * height` bytes does it).
    pub fn is_contiguous(&self) -> bool {
        self.height == 1 || (self.width == self.src_pitch && self.width == self.dst_pitch)
    }
}

/// What every backend's communicator options say: the device and whether to create the
/// NCCL/RCCL communicator. [`crate::Options`] is the plain form; a backend with more to decide
/// (the CUDA custom all-reduce) has its own type.
pub trait CommOptions: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The device and whether to create the NCCL/RCCL communicator.
    fn common(&self) -> crate::Options;
    /// What [`crate::GpuBackend`]'s `create_communicator` uses: defaults, with the environment.
    fn from_env() -> Self;
}

/// An all-reduce faster than NCCL's for some calls (vLLM's custom all-reduce on CUDA), tried
/// first for sums. The communicator serialises calls (it holds the fast path under its lock)
/// and orders them across streams; the fast path never calls back into the communicator.
pub trait FastAllReduce<R: GpuRuntime>: Send + std::fmt::Debug {
    /// Whether a sum of `nbytes` of `dtype` goes to the fast path now (eligible and healthy).
    fn accepts(&self, dtype: DType, nbytes: usize) -> bool;
    /// Sums `nbytes` bytes of `dtype` at `src` over the group into `dst` on `stream`
    /// (`src == dst`: in place).
    ///
    /// # Safety
    /// `src` and `dst` are device memory of `dev`'s device holding `nbytes` bytes each, equal
    /// or not overlapping, alive and not accessed otherwise until the work enqueued on `stream`
    /// has run; `stream` is a live stream of `dev`; `dev`'s context is current; and
    /// [`FastAllReduce::accepts`] said yes for `(dtype, nbytes)`.
    unsafe fn all_reduce(
        &mut self,
        dev: &R,
        src: u64,
        dst: u64,
        dtype: DType,
        nbytes: usize,
        stream: RawStream,
    ) -> Result<()>;
    /// The deadline its device-side waits get (the communicator's timeout).
    fn set_timeout(&self, timeout: Duration);
    /// After a graph capture: collective over `host` (graph-buffer registration). Returns how
    /// many buffers were registered.
    fn end_capture(&mut self, host: &dyn HostGroup) -> Result<usize>;
}

/// The fast path of a runtime that has none.
#[derive(Debug)]
pub enum NoFastPath {}

impl<R: GpuRuntime> FastAllReduce<R> for NoFastPath {
    fn accepts(&self, _: DType, _: usize) -> bool {
        match *self {}
    }
    unsafe fn all_reduce(
        &mut self,
        _: &R,
        _: u64,
        _: u64,
        _: DType,
        _: usize,
        _: RawStream,
    ) -> Result<()> {
        match *self {}
    }
    fn set_timeout(&self, _: Duration) {
        match *self {}
    }
    fn end_capture(&mut self, _: &dyn HostGroup) -> Result<usize> {
        match *self {}
    }
}

/// One device of a GPU runtime (CUDA through cudarc, HIP loaded at run time, or a test double):
/// the seam between the generic communicator and the hardware. Implemented by the backend's
/// per-device context, one per device and process ([`GpuRuntime::device`]).
pub trait GpuRuntime: Send + Sync + std::fmt::Debug + Sized + 'static {
    /// The device kind this runtime's tensors report.
    const KIND: DeviceKind;
    /// The collective library of this runtime.
    const FLAVOR: Flavor;
    /// The backend's name (`"cuda"`, `"rocm"`), as [`dist_core::Backend::NAME`].
    const NAME: &'static str;
    /// How a communicator is built.
    type Options: CommOptions;
    /// An event, to order one stream after another.
    type Event: Send + Sync;
    /// A captured, instantiated graph; destroyed when dropped (with the context bound).
    type Graph: Send;
    /// The fast all-reduce ([`NoFastPath`] where there is none).
    type FastPath: FastAllReduce<Self>;

    /// The process-wide context of device `ordinal`, made at first use.
    fn device(ordinal: usize) -> Result<Arc<Self>>;
    /// Device index.
    fn ordinal(&self) -> usize;
    /// Makes the device's context current on the calling thread.
    fn bind(&self) -> Result<()>;
    /// The runtime's own stream (torch's "current stream" for the backend's own tensors).
    fn stream(&self) -> RawStream;
    /// The cache of freed allocations of this device.
    fn pool(&self) -> &Pool<Self>;
    /// Builds the fast all-reduce of a new communicator (collective over `ctx.host_group`, with
    /// the NCCL communicator already up). `Ok(None)`: the group does not qualify.
    fn fast_path(
        dev: &Arc<Self>,
        ctx: &CommunicatorContext,
        opts: &Self::Options,
    ) -> Result<Option<Self::FastPath>>;

    /// Allocates `bytes > 0` of device memory (one allocation, shareable over IPC).
    ///
    /// # Safety
    /// The context is current.
    unsafe fn malloc(&self, bytes: usize) -> Result<u64>;
    /// Frees an allocation of [`GpuRuntime::malloc`] (waits for the device).
    ///
    /// # Safety
    /// `ptr` came from `malloc` on this device, is freed once and no pending work uses it; the
    /// context is current.
    unsafe fn free(&self, ptr: u64) -> Result<()>;
    /// Zeroes `bytes` at `dst` on `stream`.
    ///
    /// # Safety
    /// `dst` holds `bytes` bytes of this device's memory until the work has run; `stream` is a
    /// live stream of this device; the context is current.
    unsafe fn memset_zero(&self, dst: u64, bytes: usize, stream: RawStream) -> Result<()>;
    /// A device-to-device copy of `bytes` on `stream`.
    ///
    /// # Safety
    /// As [`GpuRuntime::memset_zero`], for both ranges.
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize, stream: RawStream) -> Result<()>;
    /// A strided device copy (the generic layer sends contiguous ones to
    /// [`GpuRuntime::copy_d2d`] and skips empty ones).
    ///
    /// # Safety
    /// As [`GpuRuntime::memset_zero`], for both strided ranges.
    unsafe fn copy_2d(&self, c: &Strided, stream: RawStream) -> Result<()>;
    /// Enqueues a host-to-device copy on `stream`.
    ///
    /// # Safety
    /// As [`GpuRuntime::memset_zero`] for `dst`; `src` stays alive until the copy has run.
    unsafe fn copy_h2d(&self, dst: u64, src: &[u8], stream: RawStream) -> Result<()>;
    /// Enqueues a device-to-host copy on `stream`.
    ///
    /// # Safety
    /// As [`GpuRuntime::memset_zero`] for `src`; `dst` is neither read nor written by anyone
    /// else until the copy has run.
    unsafe fn copy_d2h(&self, dst: &mut [u8], src: u64, stream: RawStream) -> Result<()>;

    /// A new non-blocking stream of this device (destroy it with [`GpuRuntime::destroy_stream`]).
    fn create_stream(&self) -> Result<RawStream>;
    /// Destroys a stream of [`GpuRuntime::create_stream`].
    ///
    /// # Safety
    /// `stream` came from `create_stream` on this device and is not used afterwards.
    unsafe fn destroy_stream(&self, stream: RawStream) -> Result<()>;
    /// A new event; `timing`: one [`GpuRuntime::elapsed_ms`] can measure (ordering-only events
    /// are cheaper).
    fn new_event(&self, timing: bool) -> Result<Self::Event>;
    /// Milliseconds between two completed timing events.
    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f32>;
    /// Records `ev` on `stream`.
    ///
    /// # Safety
    /// `stream` is a live stream of this device; the context is current.
    unsafe fn record(&self, ev: &Self::Event, stream: RawStream) -> Result<()>;
    /// Makes later work on `stream` wait for `ev`'s last record.
    ///
    /// # Safety
    /// As [`GpuRuntime::record`].
    unsafe fn wait_event(&self, stream: RawStream, ev: &Self::Event) -> Result<()>;
    /// True once the work `ev` recorded has run.
    fn event_done(&self, ev: &Self::Event) -> Result<bool>;
    /// True once every item enqueued on `stream` has run.
    ///
    /// # Safety
    /// As [`GpuRuntime::record`].
    unsafe fn stream_done(&self, stream: RawStream) -> Result<bool>;
    /// True while `stream` is capturing a graph.
    ///
    /// # Safety
    /// As [`GpuRuntime::record`].
    unsafe fn is_capturing(&self, stream: RawStream) -> Result<bool>;
    /// Starts capturing `stream` (relaxed mode: allocations are allowed meanwhile).
    ///
    /// # Safety
    /// As [`GpuRuntime::record`]; `stream` is not capturing.
    unsafe fn begin_capture(&self, stream: RawStream) -> Result<()>;
    /// Ends the capture of `stream` and instantiates the graph.
    ///
    /// # Safety
    /// As [`GpuRuntime::record`]; `stream` is capturing.
    unsafe fn end_capture(&self, stream: RawStream) -> Result<Self::Graph>;
    /// Enqueues one replay of `graph` on `stream`.
    ///
    /// # Safety
    /// As [`GpuRuntime::record`]; `graph` was captured on this device.
    unsafe fn launch_graph(&self, graph: &Self::Graph, stream: RawStream) -> Result<()>;

    /// Device-side faults that make results invalid (the CUDA custom all-reduce's barrier
    /// deadline), as an error naming the ranks; `Ok` when none (the default).
    fn check_faults(&self) -> Result<()> {
        Ok(())
    }
    /// Extra time a wait gives device code whose own deadline is `timeout` to report a fault
    /// before the plain deadline wins (none by default).
    fn fault_grace(&self, timeout: Duration) -> Duration {
        let _ = timeout;
        Duration::ZERO
    }

    /// Waits (at most [`dist_core::DEFAULT_TIMEOUT`]) for the runtime's own stream, then
    /// reports device faults.
    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        let op = format!("{}:{} synchronize", Self::NAME, self.ordinal());
        // SAFETY: the runtime's own stream lives for the process; the context was just bound.
        unsafe {
            wait_stream(self, self.stream(), &op, dist_core::DEFAULT_TIMEOUT, || {
                Ok(())
            })
        }
    }
    /// Frees every cached allocation (after waiting for the device's stream).
    fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        self.pool().empty(self)
    }
    /// Bytes held by the allocation cache.
    fn cached_bytes(&self) -> usize {
        self.pool().cached_bytes()
    }
}

/// Most devices a process addresses per runtime (ordinals at or past it are refused).
pub const MAX_DEVICES: usize = 64;

/// A runtime's per-process table of device contexts, made at first use and kept for the
/// process (so views may borrow them for `'static`).
#[derive(Debug)]
pub struct Devices<R> {
    slots: [OnceLock<Arc<R>>; MAX_DEVICES],
    making: Mutex<()>,
}

impl<R> Default for Devices<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> Devices<R> {
    /// An empty table (for a `static`).
    pub const fn new() -> Self {
        Devices {
            slots: [const { OnceLock::new() }; MAX_DEVICES],
            making: Mutex::new(()),
        }
    }
    /// Device `ordinal`'s context, made by `make` the first time (one maker at a time).
    pub fn get_or_make(
        &'static self,
        name: &str,
        ordinal: usize,
        make: impl FnOnce() -> Result<R>,
    ) -> Result<&'static Arc<R>> {
        let slot = self.slots.get(ordinal).ok_or_else(|| {
            Error::invalid(format!(
                "{name}:{ordinal}: at most {MAX_DEVICES} devices are addressed"
            ))
        })?;
        if let Some(d) = slot.get() {
            return Ok(d);
        }
        let _g = self.making.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = slot.get() {
            return Ok(d);
        }
        let d = Arc::new(make()?);
        Ok(slot.get_or_init(|| d))
    }
}

/// Waits for `stream` with a deadline, calling `poll` between queries (NCCL's asynchronous
/// error, say): spins briefly, then sleeps, so a descheduled peer on a loaded machine gets the
/// core. Device faults ([`GpuRuntime::check_faults`]) win over the plain deadline: past
/// `timeout`, device code gets [`GpuRuntime::fault_grace`] more to say which peers it waited for.
///
/// # Safety
/// `stream` is a live stream of `dev`; the context is current.
pub unsafe fn wait_stream<R: GpuRuntime>(
    dev: &R,
    stream: RawStream,
    op: &str,
    timeout: Duration,
    mut poll: impl FnMut() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    let limit = timeout + dev.fault_grace(timeout);
    let mut spins = 0u32;
    loop {
        // SAFETY: forwarded contract.
        if unsafe { dev.stream_done(stream) }.map_err(|e| annotate(e, op))? {
            return dev.check_faults();
        }
        poll()?;
        dev.check_faults()?;
        let waited = start.elapsed();
        if waited >= limit {
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
            std::thread::sleep(Duration::from_micros(if spins < 1024 { 50 } else { 500 }));
        }
    }
}

/// Prefixes a backend error's message with the op it failed in.
pub fn annotate(mut e: Error, op: &str) -> Error {
    if let Error::Backend { message, .. } = &mut e {
        *message = format!("{op}: {message}");
    }
    e
}
