//! The HIP runtime as this crate uses it: presence check, device discovery ("no ROCm device"
//! as an error), [`probe`] for `dist bench --backend rocm`, and [`GpuRuntime`] for
//! [`DeviceContext`] (allocation, copies, events, graphs: the surface `dist_nccl`'s generic
//! communicator, tensors and cache run on).
//!
//! [`ensure_driver`] loads the runtime (or reports [`Error::LibraryNotFound`]); every entry
//! point of this crate calls it, then [`DeviceContext::get`], which turns "no AMD GPU" into
//! the error of [`crate::hip::result::no_device`].

use std::ffi::c_void;
use std::sync::Arc;

use dist_core::{CommunicatorContext, DeviceKind, Error, Result};
use dist_nccl::{
    annotate, Devices, Flavor, GpuRuntime, NoFastPath, Options, Pool, RawStream, Strided,
};

use crate::hip::safe::{Event, Graph, Stream};
use crate::hip::{self, result as hr, sys, Runtime};
use crate::DeviceBuffer;

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

/// One device's stream (the "current stream" of torch for this crate's own tensors) and its
/// allocation cache, implementing [`GpuRuntime`] over HIP. HIP has one implicit context per
/// device; [`DeviceContext::bind`] makes the device current on the calling thread.
pub struct DeviceContext {
    rt: &'static Runtime,
    stream: Stream,
    ordinal: usize,
    pool: Pool<DeviceContext>,
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
        static DEVICES: Devices<DeviceContext> = Devices::new();
        let d = DEVICES.get_or_make("rocm", ordinal, || {
            let n = visible_devices()?;
            if ordinal >= n {
                return Err(Error::invalid(format!(
                    "rocm:{ordinal} does not exist ({n} visible devices)"
                )));
            }
            Ok(DeviceContext {
                rt,
                stream: Stream::new(rt, ordinal)?,
                ordinal,
                pool: Pool::from_env("DIST_ROCM_CACHE_BYTES"),
            })
        })?;
        d.bind()?;
        Ok(d.clone())
    }

    /// The HIP runtime.
    pub fn runtime(&self) -> &'static Runtime {
        self.rt
    }
    /// The owning stream this crate's own tensors are ordered on.
    pub fn stream_handle(&self) -> &Stream {
        &self.stream
    }
    /// The device's name (`hipDeviceGetName`).
    pub fn name(&self) -> Result<String> {
        hr::device_get_name(self.rt, self.ordinal)
    }
    /// The device's PCI bus id, to tell devices apart across processes.
    pub fn pci_bus_id(&self) -> Result<String> {
        hr::device_get_pci_bus_id(self.rt, self.ordinal)
    }
}

/// An IPC handle of `buf`'s allocation for other processes (the custom all-reduce's buffers,
/// when it comes to ROCm). Cached blocks are whole `hipMalloc` allocations, so any buffer of
/// this crate can be shared.
pub fn ipc_handle(buf: &DeviceBuffer) -> Result<hip::safe::IpcMemHandle> {
    dist_core::ensure_arg!(buf.ptr() != 0, "no IPC handle for a zero-byte buffer");
    let dev = buf.device();
    dev.bind()?;
    // SAFETY: ptr is the start of a live hipMalloc allocation owned by buf.
    unsafe { hr::ipc_get_mem_handle(dev.rt, vptr(buf.ptr())) }.map(hip::safe::IpcMemHandle)
}

fn vptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

fn hs(s: RawStream) -> sys::hipStream_t {
    s.as_raw()
}

impl GpuRuntime for DeviceContext {
    const KIND: DeviceKind = DeviceKind::Rocm;
    const FLAVOR: Flavor = Flavor::Rccl;
    const NAME: &'static str = "rocm";
    type Options = Options;
    type Event = Event;
    type Graph = Graph;
    type FastPath = NoFastPath;

    fn device(ordinal: usize) -> Result<Arc<Self>> {
        DeviceContext::get(ordinal)
    }
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// HIP has one implicit context per device: makes the device current.
    fn bind(&self) -> Result<()> {
        hr::set_device(self.rt, self.ordinal)
    }
    fn stream(&self) -> RawStream {
        // SAFETY: the device's own stream, alive for the process.
        unsafe { RawStream::from_raw(self.stream.raw()) }
    }
    fn pool(&self) -> &Pool<Self> {
        &self.pool
    }
    /// vLLM's custom and quick all-reduce for ROCm are not built yet.
    fn fast_path(
        _: &Arc<Self>,
        _: &CommunicatorContext,
        _: &Options,
    ) -> Result<Option<NoFastPath>> {
        Ok(None)
    }

    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        let what = format!("hipMalloc({bytes} B) on rocm:{}", self.ordinal);
        hr::malloc(self.rt, bytes)
            .map(|p| p as usize as u64)
            .map_err(|e| annotate(e, &what))
    }
    unsafe fn free(&self, ptr: u64) -> Result<()> {
        // SAFETY: forwarded contract (hipFree waits for pending work).
        unsafe { hr::free(self.rt, vptr(ptr)) }
    }
    unsafe fn memset_zero(&self, dst: u64, bytes: usize, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { hr::memset_async(self.rt, vptr(dst), 0, bytes, hs(s)) }
    }
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize, s: RawStream) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let kind = sys::hipMemcpyDeviceToDevice;
        // SAFETY: forwarded contract.
        unsafe { hr::memcpy_async(self.rt, vptr(dst), vptr(src), bytes, kind, hs(s)) }
    }
    unsafe fn copy_2d(&self, c: &Strided, s: RawStream) -> Result<()> {
        let (d, sp) = (vptr(c.dst), vptr(c.src));
        let (w, h, kind) = (c.width, c.height, sys::hipMemcpyDeviceToDevice);
        // SAFETY: forwarded contract.
        unsafe { hr::memcpy_2d_async(self.rt, d, c.dst_pitch, sp, c.src_pitch, w, h, kind, hs(s)) }
    }
    unsafe fn copy_h2d(&self, dst: u64, src: &[u8], s: RawStream) -> Result<()> {
        let (d, from) = (vptr(dst), src.as_ptr() as *const c_void);
        // SAFETY: forwarded contract.
        unsafe {
            hr::memcpy_async(
                self.rt,
                d,
                from,
                src.len(),
                sys::hipMemcpyHostToDevice,
                hs(s),
            )
        }
    }
    unsafe fn copy_d2h(&self, dst: &mut [u8], src: u64, s: RawStream) -> Result<()> {
        let (to, n) = (dst.as_mut_ptr() as *mut c_void, dst.len());
        // SAFETY: forwarded contract.
        unsafe { hr::memcpy_async(self.rt, to, vptr(src), n, sys::hipMemcpyDeviceToHost, hs(s)) }
    }

    fn create_stream(&self) -> Result<RawStream> {
        self.bind()?;
        let s = hr::stream_create_with_flags(self.rt, sys::hipStreamNonBlocking)?;
        // SAFETY: a new stream of this device, destroyed by its owner.
        Ok(unsafe { RawStream::from_raw(s) })
    }
    unsafe fn destroy_stream(&self, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { hr::stream_destroy(self.rt, hs(s)) }
    }
    fn new_event(&self, timing: bool) -> Result<Event> {
        if timing {
            Event::new(self.rt, self.ordinal)
        } else {
            Event::without_timing(self.rt, self.ordinal)
        }
    }
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        start.elapsed_ms(end)
    }
    unsafe fn record(&self, ev: &Event, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract; the event is live.
        unsafe { hr::event_record(self.rt, ev.raw(), hs(s)) }
    }
    unsafe fn wait_event(&self, s: RawStream, ev: &Event) -> Result<()> {
        // SAFETY: forwarded contract; the event is live.
        unsafe { hr::stream_wait_event(self.rt, hs(s), ev.raw()) }
    }
    fn event_done(&self, ev: &Event) -> Result<bool> {
        ev.query()
    }
    unsafe fn stream_done(&self, s: RawStream) -> Result<bool> {
        // SAFETY: forwarded contract.
        unsafe { hr::stream_query(self.rt, hs(s)) }
    }
    unsafe fn is_capturing(&self, s: RawStream) -> Result<bool> {
        // SAFETY: forwarded contract.
        let st = unsafe { hr::stream_is_capturing(self.rt, hs(s)) }?;
        Ok(st == sys::hipStreamCaptureStatusActive)
    }
    unsafe fn begin_capture(&self, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract; relaxed mode.
        unsafe { hr::stream_begin_capture(self.rt, hs(s), sys::hipStreamCaptureModeRelaxed) }
    }
    unsafe fn end_capture(&self, s: RawStream) -> Result<Graph> {
        // SAFETY: forwarded contract.
        unsafe { Graph::end_capture(self.rt, self.ordinal, hs(s)) }
    }
    unsafe fn launch_graph(&self, g: &Graph, s: RawStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { g.launch(hs(s)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
