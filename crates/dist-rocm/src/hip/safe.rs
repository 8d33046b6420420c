//! Owning HIP objects: [`Stream`], [`Event`], [`IpcMemHandle`] /
//! [`IpcMapping`] and [`Graph`]. Each remembers its device and makes it current before
//! releasing itself; a failing release is logged, `Drop` never panics.

use std::ffi::c_void;

use dist_core::{Error, Result};

use super::{result, sys, Runtime};

fn release(what: &str, r: Result<()>) {
    if let Err(e) = r {
        tracing::warn!("releasing {what}: {e}");
    }
}

/// A non-blocking stream of one device.
pub struct Stream {
    rt: &'static Runtime,
    raw: sys::hipStream_t,
    ordinal: usize,
}

// SAFETY: a hipStream_t is a handle the runtime lets any thread use (enqueueing included).
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:p} on device {})", self.raw, self.ordinal)
    }
}

impl Stream {
    /// A new `hipStreamNonBlocking` stream on device `ordinal` (made current on this thread).
    pub fn new(rt: &'static Runtime, ordinal: usize) -> Result<Stream> {
        result::set_device(rt, ordinal)?;
        let raw = result::stream_create_with_flags(rt, sys::hipStreamNonBlocking)?;
        Ok(Stream { rt, raw, ordinal })
    }
    /// The raw handle (what RCCL takes as its `hipStream_t`).
    pub fn raw(&self) -> sys::hipStream_t {
        self.raw
    }
    /// `Ok(true)` once every enqueued item has run.
    pub fn query(&self) -> Result<bool> {
        // SAFETY: the stream is alive while self is.
        unsafe { result::stream_query(self.rt, self.raw) }
    }
    /// `hipStreamIsCapturing`: true while a graph capture is active.
    pub fn is_capturing(&self) -> Result<bool> {
        // SAFETY: the stream is alive while self is.
        let st = unsafe { result::stream_is_capturing(self.rt, self.raw) }?;
        Ok(st == sys::hipStreamCaptureStatusActive)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = result::set_device(self.rt, self.ordinal);
        // SAFETY: the stream is ours and destroyed once.
        release("a HIP stream", unsafe {
            result::stream_destroy(self.rt, self.raw)
        });
    }
}

/// An event (timing enabled unless created with [`Event::without_timing`]).
pub struct Event {
    rt: &'static Runtime,
    raw: sys::hipEvent_t,
    ordinal: usize,
}

// SAFETY: an event handle may be recorded and queried from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Event({:p} on device {})", self.raw, self.ordinal)
    }
}

impl Event {
    /// A timing event on device `ordinal`.
    pub fn new(rt: &'static Runtime, ordinal: usize) -> Result<Event> {
        Self::with_flags(rt, ordinal, sys::hipEventDefault)
    }
    /// An event without timing (cheaper; for ordering only).
    pub fn without_timing(rt: &'static Runtime, ordinal: usize) -> Result<Event> {
        Self::with_flags(rt, ordinal, sys::hipEventDisableTiming)
    }
    fn with_flags(rt: &'static Runtime, ordinal: usize, flags: u32) -> Result<Event> {
        result::set_device(rt, ordinal)?;
        let raw = result::event_create_with_flags(rt, flags)?;
        Ok(Event { rt, raw, ordinal })
    }
    /// Records the event on `stream` (of the same device).
    pub fn record(&self, stream: &Stream) -> Result<()> {
        dist_core::ensure_arg!(
            stream.ordinal == self.ordinal,
            "event of device {} recorded on a stream of device {}",
            self.ordinal,
            stream.ordinal
        );
        // SAFETY: both handles are alive while self and stream are.
        unsafe { result::event_record(self.rt, self.raw, stream.raw) }
    }
    /// `Ok(true)` once the recorded work has run.
    pub fn query(&self) -> Result<bool> {
        // SAFETY: alive while self is.
        unsafe { result::event_query(self.rt, self.raw) }
    }
    /// The raw handle.
    pub fn raw(&self) -> sys::hipEvent_t {
        self.raw
    }
    /// Milliseconds from `self` to `later`; both must be recorded and complete (query first).
    pub fn elapsed_ms(&self, later: &Event) -> Result<f32> {
        if !self.query()? || !later.query()? {
            return Err(Error::invalid("elapsed_ms: an event has not completed yet"));
        }
        // SAFETY: both alive and complete.
        unsafe { result::event_elapsed_time(self.rt, self.raw, later.raw) }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = result::set_device(self.rt, self.ordinal);
        // SAFETY: the event is ours and destroyed once.
        release("a HIP event", unsafe {
            result::event_destroy(self.rt, self.raw)
        });
    }
}

/// The 64 bytes that name an allocation to other processes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcMemHandle(pub sys::hipIpcMemHandle_t);

impl std::fmt::Debug for IpcMemHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IpcMemHandle(..)")
    }
}

impl IpcMemHandle {
    /// The bytes, for the host group.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.reserved.iter().map(|b| *b as u8).collect()
    }
    /// From bytes received over the host group; exactly 64 are required.
    pub fn from_bytes(b: &[u8]) -> Result<IpcMemHandle> {
        if b.len() != sys::HIP_IPC_HANDLE_SIZE {
            return Err(Error::protocol(format!(
                "HIP IPC handle has {} bytes, expected {}",
                b.len(),
                sys::HIP_IPC_HANDLE_SIZE
            )));
        }
        let mut h = sys::hipIpcMemHandle_t {
            reserved: [0; sys::HIP_IPC_HANDLE_SIZE],
        };
        for (d, s) in h.reserved.iter_mut().zip(b) {
            *d = *s as _;
        }
        Ok(IpcMemHandle(h))
    }
    /// Maps the allocation into this process on device `ordinal` (peer access enabled lazily);
    /// unmapped when the [`IpcMapping`] drops.
    pub fn open(&self, rt: &'static Runtime, ordinal: usize) -> Result<IpcMapping> {
        result::set_device(rt, ordinal)?;
        let ptr = result::ipc_open_mem_handle(rt, self.0, sys::hipIpcMemLazyEnablePeerAccess)?;
        Ok(IpcMapping { rt, ptr, ordinal })
    }
}

/// Another process's allocation mapped into this one; closed on drop.
pub struct IpcMapping {
    rt: &'static Runtime,
    ptr: *mut c_void,
    ordinal: usize,
}

// SAFETY: as DeviceMemory.
unsafe impl Send for IpcMapping {}
// SAFETY: as DeviceMemory.
unsafe impl Sync for IpcMapping {}

impl std::fmt::Debug for IpcMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcMapping({:p}, device {})", self.ptr, self.ordinal)
    }
}

impl IpcMapping {
    /// The mapped address in this process.
    pub fn ptr(&self) -> *mut c_void {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let _ = result::set_device(self.rt, self.ordinal);
        // SAFETY: ptr came from hipIpcOpenMemHandle and is closed once.
        release("a HIP IPC mapping", unsafe {
            result::ipc_close_mem_handle(self.rt, self.ptr)
        });
    }
}

/// A graph captured from a stream and instantiated, replayable with [`Graph::launch`].
pub struct Graph {
    rt: &'static Runtime,
    graph: sys::hipGraph_t,
    exec: sys::hipGraphExec_t,
    ordinal: usize,
}

// SAFETY: graph handles may be launched and destroyed from any thread (the device is made current first).
unsafe impl Send for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph(device {})", self.ordinal)
    }
}

impl Graph {
    /// Ends the capture of stream `s` of device `ordinal` and instantiates the graph.
    ///
    /// # Safety
    /// `s` is a live stream of device `ordinal` that is capturing; the device is current.
    pub unsafe fn end_capture(
        rt: &'static Runtime,
        ordinal: usize,
        s: sys::hipStream_t,
    ) -> Result<Graph> {
        // SAFETY: forwarded contract.
        let graph = unsafe { result::stream_end_capture(rt, s) }?;
        // SAFETY: graph is a valid captured graph.
        let exec = match unsafe { result::graph_instantiate(rt, graph) } {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: graph is ours and not instantiated.
                release("a HIP graph", unsafe { result::graph_destroy(rt, graph) });
                return Err(e);
            }
        };
        Ok(Graph {
            rt,
            graph,
            exec,
            ordinal,
        })
    }
    /// Enqueues one replay on stream `s`.
    ///
    /// # Safety
    /// `s` is a live stream of the graph's device; the device is current.
    pub unsafe fn launch(&self, s: sys::hipStream_t) -> Result<()> {
        // SAFETY: exec is alive; `s` by the caller's contract.
        unsafe { result::graph_launch(self.rt, self.exec, s) }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let _ = result::set_device(self.rt, self.ordinal);
        // SAFETY: both handles are ours and destroyed once.
        unsafe {
            release(
                "a HIP graph exec",
                result::graph_exec_destroy(self.rt, self.exec),
            );
            release("a HIP graph", result::graph_destroy(self.rt, self.graph));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_handle_bytes_roundtrip_and_length_check() {
        let b: Vec<u8> = (0..64u32).map(|i| (i * 37 % 256) as u8).collect();
        let h = IpcMemHandle::from_bytes(&b).unwrap();
        assert_eq!(h.to_bytes(), b);
        assert!(IpcMemHandle::from_bytes(&b[..63]).is_err());
        assert!(IpcMemHandle::from_bytes(&[0; 65]).is_err());
    }
}
