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
//! - [`driver`]: `is_culib_present()` first (cudarc panics without `libcuda`; here that is
//!   `LibraryNotFound`), one [`DeviceContext`] per device: its primary context and the one stream
//!   every op of this crate is enqueued on (torch's "current stream"), owned device memory
//!   (`cuMemAlloc`, so it can be shared with CUDA IPC), strided 2-D copies.
//! - [`CudaTensor`]: a dense device buffer + dtype + shape; clones alias, as torch tensors do.
//!   [`CudaBackend`] implements `dist_core::Backend` (`to_host`, `from_host`).
//! - [`Communicator`]: every `DeviceCommunicator` op over NCCL, asynchronous on the device's
//!   stream (as vLLM's pynccl), capturable in a CUDA graph ([`CudaGraph`]):
//!   - `all_reduce` is out of place; the custom all-reduce takes it first where vLLM's
//!     `should_custom_ar` holds and the op is a sum, else NCCL;
//!   - `all_gather(dim)`: NCCL gathers rank-major, then a **device-side** re-layout with one
//!     `cuMemcpy2DAsync` per rank makes `cat(x, dim)` (no copy when the dims before `dim` are 1);
//!     `reduce_scatter(dim)` mirrors it (re-layout, then `ncclReduceScatter`);
//!   - `all_gatherv` / `reduce_scatterv` as vLLM: one `ncclBroadcast` / `ncclReduce` per root
//!     inside an NCCL group (equal sizes fall back to the plain collective); any `dim`;
//!   - `gather` is grouped send/recv to `dst`; `broadcast` passes a null send buffer off-root;
//!   - send/recv and [`Communicator::batch_send_recv_owned`] are grouped; fp8 travels as bytes;
//!   - temporaries of ops captured in a graph are kept alive with the communicator, since the
//!     graph reuses their addresses on replay.
//! - [`custom_ar`]: vLLM's custom all-reduce — IPC buffers exchanged over the host group, the
//!   signal/barrier protocol, one-shot and two-shot kernels in CUDA C compiled with NVRTC at
//!   first use (once per process and device), vLLM's sizes and algorithm choice as pure functions
//!   ([`custom_ar::policy`]), the eager copy-in path and the graph path with buffer registration.
//!   `DIST_DISABLE_CUSTOM_ALL_REDUCE` and `DIST_CUSTOM_ALLREDUCE_ALGO` behave as vLLM's variables.
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

pub mod bench;
pub mod communicator;
pub mod custom_ar;
pub mod driver;
pub mod ipc;
pub mod paged;
pub mod pair;
pub mod tensor;

pub use communicator::{Communicator, CudaBackend, CudaGraph, Options, P2pOp};
pub use dist_core::{Error, Result};
pub use driver::{device_count, ensure_driver, DeviceContext};
pub use tensor::CudaTensor;
