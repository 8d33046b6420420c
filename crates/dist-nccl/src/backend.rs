//! [`GpuBackend`]: `dist_core::Backend` for any [`GpuRuntime`] (`CudaBackend`, `RocmBackend`),
//! and [`GpuGraph`], a captured graph of a device's stream.

use std::marker::PhantomData;
use std::sync::Arc;

use dist_core::{Backend, CommunicatorContext, Device, HostTensor, Result, Tensor};

use crate::memory::GpuTensor;
use crate::runtime::{CommOptions, GpuRuntime, RawStream};
use crate::NcclCommunicator;

/// The backend of runtime `R`: [`GpuTensor`] and [`NcclCommunicator`].
pub struct GpuBackend<R>(PhantomData<fn() -> R>);

impl<R> std::fmt::Debug for GpuBackend<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuBackend")
    }
}
impl<R> Clone for GpuBackend<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for GpuBackend<R> {}
impl<R> Default for GpuBackend<R> {
    fn default() -> Self {
        GpuBackend(PhantomData)
    }
}

impl<R: GpuRuntime> Backend for GpuBackend<R> {
    const NAME: &'static str = R::NAME;
    type Tensor = GpuTensor<R>;
    type Communicator = NcclCommunicator<R>;

    fn create_communicator(ctx: &CommunicatorContext) -> Result<NcclCommunicator<R>> {
        NcclCommunicator::new(ctx, &R::Options::from_env())
    }
    fn to_host(t: &GpuTensor<R>) -> Result<HostTensor> {
        t.to_host()
    }
    fn from_host(t: &HostTensor, device: Device) -> Result<GpuTensor<R>> {
        dist_core::ensure_arg!(
            device.kind == R::KIND,
            "the {} backend cannot place a tensor on {device}",
            R::NAME
        );
        GpuTensor::from_host(t, device.index)
    }
    /// The same storage re-viewed (no copy, as torch's `view`).
    fn reshape(t: GpuTensor<R>, shape: &[usize]) -> Result<GpuTensor<R>> {
        t.reshape(shape)
    }
    /// A device-to-device copy on the device's stream (no trip through the host).
    fn flat_slice(t: &GpuTensor<R>, start: usize, len: usize) -> Result<GpuTensor<R>> {
        dist_core::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= t.numel()),
            "flat_slice [{start}, {start}+{len}) out of range for {} elements",
            t.numel()
        );
        let dev = t.context();
        let out = GpuTensor::uninit(dev, t.dtype(), &[len])?;
        let es = t.dtype().size();
        if len > 0 {
            // SAFETY: [start, start + len) lies inside t (checked above) and out holds len
            // elements; ordered on the device's stream, which later uses of `out` follow; the
            // context was bound by `uninit`.
            unsafe {
                dev.copy_d2d(
                    out.ptr(),
                    t.ptr() + (start * es) as u64,
                    len * es,
                    dev.stream(),
                )
            }?;
        }
        Ok(out)
    }
}

/// A captured graph of the work enqueued on a device's stream, replayable.
pub struct GpuGraph<R: GpuRuntime> {
    // Field order: the graph is destroyed before the context it belongs to may go.
    graph: R::Graph,
    dev: Arc<R>,
    stream: RawStream,
}

impl<R: GpuRuntime> std::fmt::Debug for GpuGraph<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuGraph({}:{})", R::NAME, self.dev.ordinal())
    }
}

impl<R: GpuRuntime> GpuGraph<R> {
    /// Captures what `f` enqueues on `dev`'s own stream (relaxed mode, so `f` may allocate) and
    /// instantiates it. The capture is ended even when `f` fails; when it cannot begin, `f` is
    /// not run.
    pub fn capture<T>(dev: &Arc<R>, f: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        dev.bind()?;
        let s = dev.stream();
        // SAFETY: the runtime's own stream, not capturing (a nested capture fails here); bound.
        unsafe { dev.begin_capture(s) }?;
        let r = f();
        dev.bind()?;
        // SAFETY: ends the capture begun above on the same stream.
        let g = unsafe { dev.end_capture(s) };
        let r = r?;
        Ok((
            GpuGraph {
                graph: g?,
                dev: dev.clone(),
                stream: s,
            },
            r,
        ))
    }

    /// Enqueues one replay on the stream it was captured on.
    pub fn replay(&self) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: the graph was captured on this device; its stream is the runtime's own.
        unsafe { self.dev.launch_graph(&self.graph, self.stream) }
    }
}

impl<R: GpuRuntime> Drop for GpuGraph<R> {
    fn drop(&mut self) {
        // The graph's own drop releases it; it needs the context current.
        if let Err(e) = self.dev.bind() {
            tracing::warn!("dropping a graph: {e}");
        }
    }
}
