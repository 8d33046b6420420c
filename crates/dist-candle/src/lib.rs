//! # dist-candle: candle tensors in dist's collectives
//!
//! An engine written with [candle](https://github.com/huggingface/candle) passes its own
//! `candle_core::Tensor`s to a group's collectives and gets candle tensors back; nothing is
//! copied between candle's storage and dist's buffers. The crate sits beside the backends: it
//! depends on `dist-core` (the coordinator and its view API) and on the backends whose views it
//! makes, and `dist-core` knows nothing of candle.
//!
//! ## Design
//! - **Views of candle's own storage.** Every [`dist_core::GroupCoordinator`] op takes borrowed
//!   views. [`CandleGroup`] makes them from the tensors' storage: inputs under the storage's read
//!   lock, outputs inside `Tensor::inplace_op1` (candle's one door to a storage's memory for
//!   writing), so an all-reduce sums in the tensor's own `Vec` and an all-gather writes straight
//!   into the caller's output. Tensors of one call that share a storage (narrowed views of one
//!   buffer) are locked once and carved into disjoint ranges; overlapping ones are an
//!   [`Error::Layout`], never a deadlock.
//! - **Layouts.** A contiguous tensor at any offset of its storage is used where it is. A
//!   non-contiguous *input* is made contiguous once (one copy) before it is read; an *output* or
//!   an in-place tensor must be contiguous, since the op writes its storage
//!   ([`CandleGroup::all_reduce`] takes its tensor by value and makes that copy itself when it
//!   must). Writing a tensor's storage is seen by every tensor sharing it, as with candle's own
//!   in-place ops.
//! - **New outputs** ([`CandleGroup::all_gather`], …) are fresh zeroed `Vec`s (calloc'd, so a
//!   large one costs no pass over its memory) wrapped as candle storage without a copy.
//! - **Misuse is typed**: a tensor on another device is [`Error::Device`], a dtype dist has no
//!   equivalent for or that the op cannot reduce (fp8) is [`Error::DType`], shapes the op
//!   refuses come back as the coordinator's [`dist_core::Error::InvalidArgument`] inside
//!   [`Error::Dist`], checked before any data moves.
//! - **Backends plug in through [`CandleBackend`]**: how a backend's views are lent by a candle
//!   tensor, and how its outputs are allocated. The host backends (`dist_cpu::CpuBackend`,
//!   `dist_core::host_comm::HostBackend`, `dist_core::LocalBackend`) lend
//!   [`dist_core::HostView`]s of `CpuStorage`. A CUDA backend lends views of the `CudaSlice<T>`
//!   inside candle's `CudaStorage` (`as_cuda_slice` under the read lock, `as_cuda_slice_mut` in
//!   `InplaceOp1::cuda_fwd`), enqueued on the stream of candle's `CudaDevice`: the same
//!   [`CandleGroup`] code runs on it, with no change to the model.
//!
//! ## CUDA storage: what builds
//! candle-core's `cuda` feature (candle-core 0.11.1, candle-kernels 0.11.1, cudarc 0.19.10) builds as
//! a library on a machine without a GPU or a CUDA install, with the CUDA 13.0 compilers from the
//! Python package registry (`nvidia-cuda-nvcc` 13.0.88, `nvidia-cuda-crt` 13.0.88,
//! `nvidia-cuda-runtime` 13.0.96, `nvidia-nvvm` 13.0.88, `nvidia-cuda-cccl` 13.0.85, unpacked into one
//! `nvidia/cu13` root): `PATH=$ROOT/bin:$PATH CUDA_ROOT=$ROOT CUDA_COMPUTE_CAP=90`; candle-kernels
//! compiles its PTX and its static MoE/GGUF kernels with that nvcc and cudarc reads CUDA 13.0 from
//! it (about 10 CPU-minutes on two cores, most of it nvcc). No binary links, though: candle-core
//! turns on cudarc's `dynamic-linking`, so every program needs `libcuda`, `libcudart`, `libnvrtc`,
//! `libcurand`, `libcublas` and `libcublasLt` at link time, and `libcuda` ships only with the
//! driver (no package of the registry carries it or a stub). `dist-cuda` uses cudarc's
//! `dynamic-loading` instead; one build with both features would link the libraries too (cudarc's
//! version from `dist-cuda`'s `cuda-13000` takes precedence over candle's detection). A `cuda`
//! feature of this crate is therefore built and tested where the CUDA libraries are installed.
//!
//! ## Example
//! ```
//! use candle_core::{Device, Tensor};
//! use dist_candle::CandleGroup;
//! # use std::sync::Arc;
//! # use dist_core::{local::ThreadGroup, CoordinatorParts, GroupCoordinator, LocalBackend};
//! # let host = Arc::new(ThreadGroup::new(1, std::time::Duration::from_secs(5)).remove(0));
//! # let tp: GroupCoordinator<LocalBackend> = GroupCoordinator::new(CoordinatorParts {
//! #     unique_name: "tp:0".into(), ranks: vec![0], rank: 0, local_rank: 0,
//! #     device: dist_core::Device::CPU, host, comm: None, mq: None, diag: None,
//! #     check_collectives: false,
//! # })?;
//! // `tp` is the TP group's coordinator (`state.tp()` under `dist run`).
//! let tp = CandleGroup::new(&tp);
//! let partial = Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let summed = tp.all_reduce(partial)?; // in the tensor's own storage
//! let logits = tp.all_gather(&summed, -1)?; // [4, 8 * tp]
//! assert_eq!(logits.dims(), &[4, 8]);
//! # Ok::<(), dist_candle::Error>(())
//! ```

mod dtype;
mod error;
mod group;
mod host;

use candle_core::{Device, Tensor};
use dist_core::communicator::{View, ViewMut};
use dist_core::Backend;

pub use dtype::{to_candle, to_dist};
pub use error::{Error, Result};
pub use group::CandleGroup;

/// A backend whose collectives candle tensors can take part in: how a candle tensor lends the
/// backend's views, and how the backend's new outputs are made as candle tensors.
pub trait CandleBackend: Backend {
    /// Lends views of `reads` and mutable views of `writes` to `f`, in order, for the duration of
    /// the call. Checks each tensor's device and dtype; makes non-contiguous inputs contiguous
    /// (one copy) and refuses non-contiguous or overlapping outputs.
    fn lend<R>(
        op: &'static str,
        reads: &[&Tensor],
        writes: &[&Tensor],
        f: impl for<'v> FnOnce(Vec<View<'v, Self>>, Vec<ViewMut<'v, Self>>) -> dist_core::Result<R>,
    ) -> Result<R>;

    /// A new tensor of `dtype` and `shape` on `device`, every element of which the op will write.
    fn alloc(
        op: &'static str,
        dtype: candle_core::DType,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor>;
}

/// The host backends: their views are [`dist_core::HostView`]s of candle's `CpuStorage`.
macro_rules! host_backend {
    ($($b:ty),* $(,)?) => {$(
        impl CandleBackend for $b {
            fn lend<R>(
                op: &'static str,
                reads: &[&Tensor],
                writes: &[&Tensor],
                f: impl for<'v> FnOnce(Vec<View<'v, Self>>, Vec<ViewMut<'v, Self>>) -> dist_core::Result<R>,
            ) -> Result<R> {
                host::lend(op, reads, writes, f)
            }
            fn alloc(
                op: &'static str,
                dtype: candle_core::DType,
                shape: &[usize],
                device: &Device,
            ) -> Result<Tensor> {
                host::alloc(op, dtype, shape, device)
            }
        }
    )*};
}

host_backend!(
    dist_cpu::CpuBackend,
    dist_core::host_comm::HostBackend,
    dist_core::LocalBackend,
);
