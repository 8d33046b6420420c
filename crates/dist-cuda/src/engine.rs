//! An engine's own CUDA memory and stream, lent to the collectives: cudarc 0.19's
//! `CudaSlice<T>` / `CudaView<T>` / `CudaViewMut<T>` (what candle 0.11 holds its tensors in)
//! and its `CudaStream`.
//!
//! [`view`] / [`view_mut`] make a [`TensorView`] / [`TensorViewMut`] of the engine's memory
//! ordered on the engine's stream — no copy, no allocation. [`use_stream`] makes a
//! communicator enqueue on the engine's stream: then collectives on the engine's views need no
//! event at all, in-place all-reduces write the engine's memory directly, and the calls can be
//! captured in a CUDA graph on that stream (a communicator on its own stream orders itself with
//! the engine's by events, which a capture does not allow across its boundary).
//!
//! ## Contexts
//! dist runs in each device's **primary** context, which is also what cudarc's
//! `CudaContext::new` retains: an engine's context made that way is the same device context.
//! A stream or memory of another context (`CudaContext::new_non_primary`, a wrapped raw
//! context, another device) is [`dist_core::Error::InvalidArgument`], checked when the view is
//! made.
//!
//! ## cudarc's event tracking
//! With more than one stream in its context and tracking on (cudarc's defaults once
//! `new_stream` was called), cudarc records a read or write event for a slice when the guard
//! `device_ptr(&stream)` returns is dropped. A view keeps that guard until it (and every view
//! narrowed from it) has dropped — after the collective was enqueued — so the engine's other
//! streams order after the collective. Inside a graph capture, cudarc's waits on events
//! recorded before the capture cross the capture boundary, which CUDA refuses: capture with
//! tracking off (`CudaContext::disable_event_tracking` before allocating, or one stream only,
//! as candle does).
//!
//! ```no_run
//! use dist_core::{DeviceCommunicator, ReduceOp};
//! # fn comm() -> dist_cuda::Communicator { unimplemented!() }
//! let comm = comm();
//! let ctx = cudarc::driver::CudaContext::new(0).unwrap(); // the primary context
//! let stream = ctx.new_stream().unwrap();
//! let mut x = stream.alloc_zeros::<f32>(1 << 20).unwrap();
//! dist_cuda::engine::use_stream(&comm, &stream)?;
//! comm.all_reduce_in_place(&mut dist_cuda::engine::view_mut(&mut x, &stream)?, ReduceOp::Sum)?;
//! # Ok::<(), dist_core::Error>(())
//! ```

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use dist_core::{Element, Error, Result};
use dist_nccl::RawStream;

use crate::{Communicator, DeviceContext, TensorView, TensorViewMut};

/// The device context of `stream`, after checking that it and the memory's `mem` context are
/// this crate's (the device's primary context).
fn check_contexts(mem: &CudaContext, stream: &CudaStream) -> Result<&'static DeviceContext> {
    let sc = stream.context();
    let dev = DeviceContext::get_static(sc.ordinal())?;
    let ours = dev.cudarc().cu_ctx();
    if sc.cu_ctx() != ours {
        return Err(Error::invalid(format!(
            "the engine's stream belongs to a CUDA context of cuda:{} that is not the device's \
             primary context (made with CudaContext::new_non_primary or from a raw context?); \
             dist's collectives run in the primary context (CudaContext::new)",
            sc.ordinal()
        )));
    }
    if mem.cu_ctx() != ours {
        return Err(Error::invalid(format!(
            "the engine's memory belongs to cuda:{} ({}), its stream to cuda:{} (primary \
             context): memory and stream must be of the same context",
            mem.ordinal(),
            if mem.is_primary() {
                "primary context"
            } else {
                "a non-primary context"
            },
            sc.ordinal()
        )));
    }
    Ok(dev)
}

fn raw(stream: &CudaStream) -> RawStream {
    // SAFETY: the stream is alive while the view (or communicator) that carries the handle
    // borrows (or holds) it.
    unsafe { RawStream::from_raw(stream.cu_stream() as *mut c_void) }
}

/// Keeps cudarc's guard where it will record an event when dropped; drops it now where it
/// would not (no tracking in effect: one stream, or tracking off).
fn keeping<'a, V>(
    v: V,
    guard: SyncOnDrop<'a>,
    stream: &CudaStream,
    keep: impl FnOnce(V, Arc<SyncOnDrop<'a>>) -> V,
) -> V {
    if stream.context().is_managing_stream_synchronization() {
        keep(v, Arc::new(guard))
    } else {
        drop(guard);
        v
    }
}

/// A read view of the engine's memory `s` (a `CudaSlice<T>`, `CudaView<T>` or
/// `CudaViewMut<T>`), 1-D, ordered on `stream` (reshape it with [`TensorView::reshape`]).
pub fn view<'a, T: Element, S: DevicePtr<T>>(
    s: &'a S,
    stream: &'a CudaStream,
) -> Result<TensorView<'a>> {
    let dev = check_contexts(s.stream().context(), stream)?;
    let bytes = s.num_bytes();
    let (ptr, guard) = s.device_ptr(stream);
    // SAFETY: cudarc's handle owns `bytes` bytes at `ptr` in this context (checked above) and
    // is borrowed for 'a; `device_ptr` made `stream` wait for the slice's last write where
    // tracking is on, and the guard (kept by the view) records this read after the collective.
    let v = unsafe { TensorView::from_raw_bytes(dev, ptr, T::DTYPE, bytes, raw(stream)) }?;
    Ok(keeping(v, guard, stream, |v, g| v.keeping(g)))
}

/// A write view of the engine's memory `s` (a `CudaSlice<T>` or `CudaViewMut<T>`), 1-D,
/// ordered on `stream`.
pub fn view_mut<'a, T: Element, S: DevicePtrMut<T>>(
    s: &'a mut S,
    stream: &'a CudaStream,
) -> Result<TensorViewMut<'a>> {
    let dev = check_contexts(s.stream().context(), stream)?;
    let bytes = s.num_bytes();
    let (ptr, guard) = s.device_ptr_mut(stream);
    // SAFETY: as in `view`, borrowed mutably for 'a (cudarc made `stream` wait for the slice's
    // last read and write).
    let v = unsafe { TensorViewMut::from_raw_bytes(dev, ptr, T::DTYPE, bytes, raw(stream)) }?;
    Ok(keeping(v, guard, stream, |v, g| v.keeping(g)))
}

/// Makes `comm` enqueue every later collective on the engine's `stream` (ordered after what
/// it enqueued so far); the communicator holds the stream until it is given another or
/// [`Communicator::reset_stream`].
pub fn use_stream(comm: &Communicator, stream: &Arc<CudaStream>) -> Result<()> {
    let dev = check_contexts(stream.context(), stream)?;
    dist_core::ensure_arg!(
        dev.ordinal() == comm.context().ordinal(),
        "{}: the engine's stream is on cuda:{}, the communicator on cuda:{}",
        comm.group_name(),
        dev.ordinal(),
        comm.context().ordinal()
    );
    // SAFETY: a stream of the communicator's device and context (checked above), held alive by
    // the keep for as long as the communicator uses it.
    unsafe { comm.set_stream(raw(stream), Arc::new(stream.clone())) }
}
