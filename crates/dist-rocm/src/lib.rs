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
//! tensors, their views, the allocation cache, graphs and the 2-rank pair are `dist_nccl`'s,
//! written once for every GPU runtime. What is here is what HIP makes different.
//!
//! ## Pieces
//! - [`hip`]: the HIP runtime in cudarc's three layers. [`hip::sys`] binds the 36 calls whose C
//!   signatures are stable from HIP 5 to 7 (no `hipDeviceProp_t`, whose layout changed in 6.0),
//!   declared once; [`hip::result`] is one thin function per call, a failing status becoming
//!   [`Error::Backend`] with HIP's own name and message; [`hip::safe`] owns streams, events,
//!   IPC handles and mappings, and graphs; its `Drop`s never panic. The library is opened once
//!   ([`hip::runtime`]): `DIST_HIP_SO_PATH` alone when set, else `libamdhip64.so`, `.so.7`,
//!   `.so.6`, `.so.5`, then the same under `$ROCM_PATH/lib`.
//! - [`driver`]: [`ensure_driver`] (no runtime: [`Error::LibraryNotFound`] listing every path
//!   and why), [`visible_devices`] / [`device_count`] (no AMD GPU: "no ROCm device", see
//!   [`is_no_device`]), [`probe`] (what `dist bench --backend rocm` prints), and one
//!   [`DeviceContext`] per device implementing [`dist_nccl::GpuRuntime`]: its stream, `hipMalloc`
//!   (one allocation per buffer, shareable over HIP IPC), async and strided copies, events,
//!   streams, graph capture.
//! - [`RocmTensor`], [`TensorView`] / [`TensorViewMut`], [`RocmBackend`] (`reshape` re-views,
//!   `flat_slice` copies on the device), [`RocmGraph`], and [`Communicator`]: every
//!   `DeviceCommunicator` op over RCCL on the communicator's `hipStream_t`, asynchronous (as
//!   vLLM's pynccl), capturable in a HIP graph, with dist-cuda's layouts. An engine's HIP memory
//!   and stream come in through `TensorView::from_raw_parts` and `Communicator::set_stream`.
//!
//! ## Not built yet
//! vLLM's **custom all-reduce on ROCm** and its **quick all-reduce** (`QuickAllReduce`,
//! quantised, for MI300): every all-reduce goes to RCCL ([`Communicator::has_custom_ar`] is
//! false). The IPC pieces they need ([`driver::ipc_handle`], [`hip::safe::IpcMemHandle::open`])
//! are here.
//!
//! ## Errors and waiting
//! Nothing panics for a missing library or GPU: every entry point (`probe`,
//! `DeviceContext::get`, `RocmTensor::from_host`, `RocmBackend::from_host`, `Communicator::new`)
//! returns `LibraryNotFound` or "no ROCm device", in that order, before RCCL is looked for. Ops
//! return once enqueued; [`Communicator::synchronize`] waits with the communicator's deadline,
//! spinning briefly and then sleeping, and surfaces RCCL's asynchronous errors.
//!
//! ## Tested how
//! - Without an AMD GPU (CI, Debian's `libamdhip64-dev`, HIP 5.2): every entry point reports "no
//!   ROCm device" (`tests/rocm_no_device.rs`); a `DIST_HIP_SO_PATH` that does not exist is
//!   `LibraryNotFound` everywhere (`tests/rocm_missing_library.rs`).
//! - This crate's runtime and the generic layer on it (cache and its stream-ordered reuse,
//!   copies, strided copies, views, cross-stream copies, stream switches, IPC handles, argument
//!   checks, life cycle) on a host-memory double of the HIP runtime installed with
//!   [`hip::install_runtime`] (`tests/rocm_host_runtime.rs`).
//! - On NVIDIA machines, an **ABI test, not a ROCm test** (`ci/device/rocm_run.sh`):
//!   `examples/mp_rocm.rs --hip-from-cudart` serves the HIP calls from `libcudart` (HIP's
//!   NVIDIA platform is that mapping) and the RCCL entry point from `libnccl.so.2`, then runs the
//!   GPU backends' shared checks (dist-core's conformance suite, graph replay). Nothing here
//!   has run on AMD hardware yet.
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
