//! # dist-cuda: the CUDA backend of `dist`
//!
//! Device tensors, the NCCL communicator and vLLM's custom all-reduce, for NVIDIA GPUs. It sits
//! on `dist-core` (the traits) and `dist-nccl` (the NCCL ABI it shares with `dist-rocm`):
//!
//! ```text
//!   dist (facade) ── dist-cuda ──┬── cudarc (driver API + NVRTC, loaded at run time)
//!                                ├── dist-nccl (libnccl.so.2, loaded at run time)
//!                                └── dist-core (DeviceCommunicator, Backend, Tensor, oracles)
//! ```
//!
//! ## Pieces
//! The communicator, the tensors, their views, the allocation cache and graph capture are
//! `dist_nccl`'s, written once for every GPU runtime; this crate supplies the CUDA runtime and
//! what only CUDA has:
//! - [`driver`]: `is_culib_present()` first (cudarc panics without `libcuda`; here that is
//!   `LibraryNotFound`), one [`DeviceContext`] per device — its primary context and its own
//!   stream — implementing [`dist_nccl::GpuRuntime`]: `cuMemAlloc` (one allocation per buffer,
//!   so it can be shared with CUDA IPC, each with a serial that survives reuse from the cache),
//!   async and strided copies, events, graph capture, and device faults of the custom
//!   all-reduce (a peer that never reached a device barrier is a `Timeout` naming it).
//! - [`CudaTensor`] (`dist_nccl::GpuTensor`: a dense device buffer + dtype + shape; clones
//!   alias, as torch tensors do), [`TensorView`] / [`TensorViewMut`] (memory lent to a
//!   collective), [`CudaBackend`] (`dist_core::Backend`), [`CudaGraph`].
//! - [`Communicator`]: `dist_nccl::NcclCommunicator` on CUDA — every `DeviceCommunicator` op
//!   over NCCL, asynchronous on the communicator's stream, outputs written by NCCL or by the
//!   re-layout copies only, capturable in a CUDA graph; the custom all-reduce first for sums
//!   where vLLM's `should_custom_ar` holds.
//! - [`engine`]: an engine's cudarc memory (`CudaSlice<T>`, `CudaView<T>`, `CudaViewMut<T>`)
//!   and `CudaStream`, lent without a copy; contexts checked; cudarc's event tracking kept.
//! - [`custom_ar`]: vLLM's custom all-reduce — IPC buffers exchanged over the host group, the
//!   signal/barrier protocol, one-shot and two-shot kernels in CUDA C compiled with NVRTC at
//!   first use (once per process and device), vLLM's sizes and algorithm choice as pure functions
//!   ([`custom_ar::policy`]), the eager copy-in path and the graph path with buffer registration.
//!   `DIST_DISABLE_CUSTOM_ALL_REDUCE` and `DIST_CUSTOM_ALLREDUCE_ALGO` behave as vLLM's variables.
//! - KV transfer's device pieces: [`paged`] (gather/scatter of a paged cache's token rows,
//!   NVRTC), [`ipc`] (export a tensor for another process; an importer that keeps mappings per
//!   allocation serial) and [`pair`] (a 2-rank NCCL link with its own stream and deadlines).
//!
//! ## Waiting
//! Ops return once enqueued. [`Communicator::synchronize`] waits for the stream with the
//! communicator's deadline, spinning briefly and then sleeping, and surfaces NCCL's asynchronous
//! errors; `to_host` waits for the stream. NCCL init runs on a helper thread joined with the
//! context's timeout; destroy aborts NCCL on a helper thread with a 5 s deadline.
//!
//! ## Environment
//! | variable | effect |
//! | --- | --- |
//! | `DIST_NCCL_SO_PATH` | NCCL library to load first (vLLM: `VLLM_NCCL_SO_PATH`) |
//! | `DIST_DISABLE_CUSTOM_ALL_REDUCE=1` | no custom all-reduce (vLLM: `disable_custom_all_reduce`); any rank setting it turns it off for the group |
//! | `DIST_CUSTOM_ALLREDUCE_ALGO` | `1stage`/`oneshot` or `2stage`/`twoshot` forces the kernel; anything else is an error (vLLM: `VLLM_CUSTOM_ALLREDUCE_ALGO`) |
//! | `DIST_CUDA_CACHE_BYTES` | cap of the per-device cache of freed buffers (default 1 GiB, 0 disables) |
//!
//! The P2P check is vLLM's default (`VLLM_SKIP_P2P_CHECK=1`): the driver's peer-access answer
//! (`cuDeviceCanAccessPeer`), with native peer atomics standing in for NVML's NVLink status when
//! deciding "fully connected" for more than two GPUs. vLLM's probe subprocess and JSON cache are
//! not reproduced.
//!
//! ## Example
//! ```no_run
//! use dist_core::{Backend, DeviceCommunicator, HostTensor, ReduceOp};
//! # fn ctx() -> dist_core::CommunicatorContext { unimplemented!() }
//! let comm = dist_cuda::CudaBackend::create_communicator(&ctx())?; // collective
//! let x = HostTensor::from_vec(&[4], vec![1.0f32, 2.0, 3.0, 4.0])?;
//! let dx = dist_cuda::CudaBackend::from_host(&x, comm.device())?;
//! let sum = comm.all_reduce(&dx, ReduceOp::Sum)?;
//! let host = dist_cuda::CudaBackend::to_host(&sum)?; // waits for the stream
//! # Ok::<(), dist_core::Error>(())
//! ```

pub mod communicator;
pub mod custom_ar;
pub mod driver;
pub mod engine;
pub mod ipc;
pub mod paged;
pub mod pair;

pub use communicator::{Communicator, CudaBackend, CudaGraph, Options};
pub use dist_core::{Error, Result};
pub use dist_nccl::GpuRuntime;
pub use driver::{device_count, ensure_driver, DeviceContext};

/// A dense tensor in CUDA device memory (clones alias).
pub type CudaTensor = dist_nccl::GpuTensor<DeviceContext>;
/// One `cuMemAlloc` allocation of this crate, back to the device's cache on drop.
pub type DeviceBuffer = dist_nccl::DeviceBuffer<DeviceContext>;
/// CUDA memory a collective reads: a [`CudaTensor`]'s, or an engine's ([`engine::view`]).
pub type TensorView<'a> = dist_nccl::GpuView<'a, DeviceContext>;
/// CUDA memory a collective writes: a [`CudaTensor`]'s, or an engine's ([`engine::view_mut`]).
pub type TensorViewMut<'a> = dist_nccl::GpuViewMut<'a, DeviceContext>;
