//! # dist-rocm: the ROCm backend of `dist`
//!
//! Device tensors and the RCCL communicator, for AMD GPUs. It sits on `dist-core` (the traits)
//! and `dist-nccl` (the NCCL C ABI, which RCCL exports unchanged, shared with `dist-cuda`); the
//! HIP runtime is loaded at run time, so nothing of ROCm is needed to build it:
//!
//! ```text
//!   dist (facade) ── dist-rocm ──┬── hip (libamdhip64, loaded at run time: sys → result → safe)
//!                                ├── dist-nccl (librccl.so.1, loaded at run time)
//!                                └── dist-core (DeviceCommunicator, Backend, Tensor, oracles)
//! ```
//!
//! Its files and item names are those of `dist-cuda`, and both are thin: the communicator, the
//! tensors, their views, the allocation cache and graph capture are `dist_nccl`'s, written once
//! for every GPU runtime. What is here is what HIP makes different: `hip/` in place of cudarc,
//! no `custom_ar/`, `Rocm*` in place of `Cuda*`.
//!
//! ## Pieces
//! - [`hip`]: the HIP runtime in cudarc's three layers. [`hip::sys`] binds the ~36 calls whose C
//!   signatures are stable from HIP 5 to 7 (no `hipDeviceProp_t`, whose layout changed in 6.0);
//!   [`hip::result`] is one thin function per call, a failing status becoming
//!   [`Error::Backend`] with HIP's own name and message; [`hip::safe`] owns streams, events,
//!   device memory, IPC handles and mappings, and captured graphs, and its `Drop`s never panic.
//!   The library is opened once ([`hip::runtime`]): `DIST_HIP_SO_PATH` alone when set, else
//!   `libamdhip64.so`, `.so.7`, `.so.6`, `.so.5`, then the same under `$ROCM_PATH/lib`.
//! - [`driver`]: [`ensure_driver`] (no runtime: [`Error::LibraryNotFound`] listing every path
//!   and why), [`visible_devices`] / [`device_count`] (no AMD GPU: the error
//!   "no ROCm device", see [`is_no_device`]), [`probe`] (the summary `dist bench --backend rocm`
//!   prints), one [`DeviceContext`] per device implementing [`dist_nccl::GpuRuntime`]: its
//!   stream, `hipMalloc` (one allocation per buffer so it can be shared with HIP IPC), async and
//!   strided copies, events, graph capture.
//! - [`RocmTensor`] (`dist_nccl::GpuTensor`; clones alias, as torch tensors do),
//!   [`TensorView`] / [`TensorViewMut`], [`RocmBackend`] (`dist_core::Backend`; `reshape`
//!   re-views and `flat_slice` copies on the device), [`RocmGraph`].
//! - [`Communicator`]: `dist_nccl::NcclCommunicator` over RCCL on the communicator's
//!   `hipStream_t`, asynchronous (as vLLM's pynccl), capturable in a HIP graph; the layouts are
//!   dist-cuda's: `all_gather(dim)` gathers rank-major then re-lays out on the device with one
//!   `hipMemcpy2DAsync` per rank, `reduce_scatter(dim)` mirrors it, the `v` variants are one
//!   broadcast / reduce per root inside an RCCL group, `gather` is grouped send/recv, fp8
//!   travels as bytes. An engine's HIP memory and stream come in through
//!   `TensorView::from_raw_parts` and `Communicator::set_stream`.
//!
//! ## Not built yet
//! vLLM's **custom all-reduce on ROCm** (IPC buffers and HIP kernels) and its **quick
//! all-reduce** (`QuickAllReduce`, quantised all-reduce for MI300) come later: every all-reduce
//! goes to RCCL, and [`Communicator::has_custom_ar`] is false. The IPC pieces they need
//! ([`driver::ipc_handle`], [`hip::safe::IpcMemHandle::open`]) are here.
//!
//! ## Errors and waiting
//! Nothing in this crate panics for a missing library or a missing GPU: every entry point
//! (`probe`, `DeviceContext::get`, `RocmTensor::from_host`, `RocmBackend::from_host`,
//! `Communicator::new`) returns `LibraryNotFound` or "no ROCm device", in that order, before RCCL
//! is looked for. Ops return once enqueued; [`Communicator::synchronize`] waits for the stream
//! with the communicator's deadline, spinning briefly and then sleeping, and surfaces RCCL's
//! asynchronous errors. RCCL init runs on a helper thread joined with the context's timeout.
//!
//! ## Tested how
//! - Without an AMD GPU (CI, Debian's `libamdhip64-dev`, HIP 5.2): every entry point reports "no
//!   ROCm device" (`tests/rocm_no_device.rs`), and a `DIST_HIP_SO_PATH` that does not exist is
//!   `LibraryNotFound` everywhere (`tests/rocm_missing_library.rs`).
//! - The crate's own logic (cache, copies, the 2-D re-layout against `concat_along`, IPC
//!   handles, argument checks, life cycle) on a host-memory test double of the HIP runtime
//!   installed with [`hip::install_runtime`] (`tests/rocm_host_runtime.rs`): no GPU needed.
//! - On NVIDIA machines, an **ABI test, not a ROCm test** (`ci/device/rocm_run.sh`):
//!   `examples/mp_rocm.rs --hip-from-cudart` installs a HIP function table served by
//!   `libcudart` (HIP's NVIDIA platform is that mapping) and points the RCCL entry point at
//!   `libnccl.so.2` (`DIST_NCCL_SO_PATH`), then runs this crate's communicator through every op
//!   and dtype against the `dist_core::reference` oracles, HIP-graph replay and dist-core's
//!   conformance suite. On an H100 (cudart 13.0, NCCL 2.28.9) at world 1: 1414 of 1414 checks.
//!   Nothing here has run on AMD hardware yet.
//!
//! ## Example
//! ```no_run
//! use dist_core::{Backend, DeviceCommunicator, HostTensor, ReduceOp};
//! # fn ctx() -> dist_core::CommunicatorContext { unimplemented!() }
//! println!("{}", dist_rocm::probe()?); // Err("no ROCm device: …") without an AMD GPU
//! let comm = dist_rocm::RocmBackend::create_communicator(&ctx())?; // collective
//! let x = HostTensor::from_vec(&[4], vec![1.0f32, 2.0, 3.0, 4.0])?;
//! let dx = dist_rocm::RocmBackend::from_host(&x, comm.device())?;
//! let sum = comm.all_reduce(&dx, ReduceOp::Sum)?;
//! let host = dist_rocm::RocmBackend::to_host(&sum)?; // waits for the stream
//! # Ok::<(), dist_core::Error>(())
//! ```

pub mod communicator;
pub mod driver;
pub mod hip;

pub use communicator::{Communicator, Options, RocmBackend, RocmGraph};
pub use dist_core::{Error, Result};
pub use dist_nccl::GpuRuntime;
pub use driver::{device_count, ensure_driver, probe, visible_devices, DeviceContext};
pub use hip::result::is_no_device;

/// A dense tensor in ROCm device memory (clones alias).
pub type RocmTensor = dist_nccl::GpuTensor<DeviceContext>;
/// One `hipMalloc` allocation of this crate, back to the device's cache on drop.
pub type DeviceBuffer = dist_nccl::DeviceBuffer<DeviceContext>;
/// ROCm memory a collective reads.
pub type TensorView<'a> = dist_nccl::GpuView<'a, DeviceContext>;
/// ROCm memory a collective writes.
pub type TensorViewMut<'a> = dist_nccl::GpuViewMut<'a, DeviceContext>;
