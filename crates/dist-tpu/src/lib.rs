//! # dist-tpu: collectives on TPUs (and any PJRT device) through the PJRT C API
//!
//! On TPUs, collectives are not library calls: they are operations inside compiled XLA
//! programs. vLLM reached them through torch_xla (`xm.all_reduce`). This crate reaches
//! them through the PJRT C API that every XLA runtime plugin exports (`GetPjrtApi`): Google's
//! `libtpu.so` on TPU hosts, or the CUDA plugin `xla_cuda_plugin.so` of a JAX install, which is
//! how it is tested on a GPU machine. It sits beside the other backends:
//!
//! ```text
//!   dist (facade, feature tpu) ── dist-tpu ──┬── PJRT plugin (libtpu.so / any plugin), loaded at run time
//!                                            └── dist-core (DeviceCommunicator, Backend, Tensor, oracles)
//! ```
//!
//! ## Layers (as dist-nccl's)
//! - [`sys`]: the C structs and the function table, transcribed from `pjrt_c_api.h`; every
//!   argument struct travels in [`sys::Args`], zeroed and with `struct_size` set (plus a
//!   zeroed tail, so plugins newer than our header accept it — see [`sys`]).
//! - [`result`]: one thin function per C call; a returned `PJRT_Error*` becomes
//!   `Error::Backend { backend: "pjrt", code, message }` with `PJRT_Error_Message`'s text and is
//!   freed with `PJRT_Error_Destroy`. Events are awaited by polling with a deadline.
//! - [`safe`]: [`Client`], [`Buffer`], [`Executable`]: owning types whose `Drop` destroys the
//!   PJRT object and never panics; the process-wide client ([`global_client`]).
//! - [`program`]: the StableHLO text of each collective, the cache key and the serialized
//!   `CompileOptionsProto`: pure functions with golden tests.
//! - [`kv`]: the key-value callbacks of `PJRT_Client_Create` over a dist-core `Store`.
//! - [`Communicator`] / [`TpuBackend`] / [`TpuTensor`]: the `dist_core` traits.
//!
//! ## Loading
//! [`library`] loads the plugin once per process: `DIST_PJRT_PLUGIN`, then `TPU_LIBRARY_PATH`
//! (file or directory), then `libtpu.so` on the loader's path, then the `libtpu` Python
//! package's directory (asked of `python3`, with a deadline, only when all else failed; no
//! Python is no error). A missing plugin is `LibraryNotFound { tried }` naming every path with
//! its reason. The plugin's `PJRT_API_MAJOR.MINOR` is checked ([`check_version`]): another
//! major, or a minor below [`MIN_API_MINOR`], is `Unsupported` with both versions in the
//! message. `PJRT_Plugin_Initialize` runs once, at the first client. For libtpu it is preceded
//! by a check for TPU chips on the PCI bus (vendor `0x1ae0`, as JAX does): on a host without
//! them libtpu's initialisation spends minutes retrying the cloud metadata server, so instead
//! client creation fails at once with an error starting "no TPU" (`DIST_TPU_SKIP_CHIP_CHECK=1`
//! lets libtpu try; it then fails with its own "No jellyfish device found", also worded "no TPU").
//!
//! ## Collectives
//! Each op is a small StableHLO program (MLIR text, format `"mlir"`) over the group's devices as
//! replicas (`mhlo.num_replicas` = group size, device assignment = each rank's global device id,
//! all-gathered over the host group at creation), compiled at first use per
//! [`ProgramKey`] (op, dtype, shape, replica groups, devices) and cached per communicator; each
//! rank launches it on its own device and waits for its completion event with the
//! communicator's deadline. The table of programs is in [`program`]; in short: all_reduce
//! (avg = sum then divide), all_gather / reduce_scatter along any dim, broadcast as an
//! all-reduce of the source's bits masked elsewhere (bit-exact), send/recv as a two-replica
//! `collective_permute` compiled for the (sender, receiver) pair only, so the other ranks do not
//! take part; gather = all_gather kept on `dst`; the v-variants pad or slice with one-device
//! programs around a uniform collective. fp8 moves as bytes and is never reduced.
//!
//! ## Several processes
//! The first communicator creates the process's one client. With several ranks it passes
//! key-value callbacks backed by `ctx.store` (keys under `dist-tpu/pjrt/`), which multi-process
//! plugins use to exchange topology, and the create options of `DIST_PJRT_CREATE_OPTIONS`
//! (`name=type:value;…`, with `{rank}`, `{world}`, `{local_rank}` replaced): for the CUDA
//! plugin `node_id=int:{rank};num_nodes=int:{world};visible_devices=ints:{local_rank}`; libtpu
//! reads its own environment (`TPU_VISIBLE_CHIPS`, `TPU_PROCESS_BOUNDS`…).
//!
//! ## Environment
//! | variable | effect |
//! | --- | --- |
//! | `DIST_PJRT_PLUGIN` | plugin to load first |
//! | `TPU_LIBRARY_PATH` | libtpu's path (file or directory) |
//! | `DIST_PJRT_CREATE_OPTIONS` | client create options (see above) |
//! | `DIST_TPU_SKIP_CHIP_CHECK=1` | initialise libtpu even with no TPU chip on the PCI bus |
//!
//! ## What ran where
//! - Here (no accelerator): unit tests of the transcribed layouts, the version check, the
//!   program texts (golden), the compile options bytes, the cache keys and the key-value
//!   adapter on `MemStore`; with the `libtpu` 0.0.52 wheel, `GetPjrtApi` reports PJRT API 0.117
//!   and client creation fails with "no TPU" (`ci/device/tpu_libtpu_check.sh`).
//! - H100 through the CUDA plugin of jax-cuda13-pjrt 0.11.2 (PJRT API 0.115,
//!   `ci/device/tpu_cuda_plugin.sh`): the dist-core conformance suite at world 1 (875 checks,
//!   417 programs compiled), one program compiled once and launched 1001 times.
//! - Not run anywhere yet: groups of several ranks (no TPU host, and one GPU): the send/recv,
//!   masked-broadcast, v-variant and multi-process client paths are checked only as program text.
//!
//! ## Example
//! ```no_run
//! use dist_core::{Backend, DeviceCommunicator, HostTensor, ReduceOp};
//! # fn ctx() -> dist_core::CommunicatorContext { unimplemented!() }
//! let comm = dist_tpu::TpuBackend::create_communicator(&ctx())?; // collective
//! let x = HostTensor::from_vec(&[4], vec![1.0f32, 2.0, 3.0, 4.0])?;
//! let dx = dist_tpu::TpuBackend::from_host(&x, comm.device())?;
//! let sum = comm.all_reduce(&dx, ReduceOp::Sum)?; // compiled once, then cached
//! let host = dist_tpu::TpuBackend::to_host(&sum)?;
//! println!("{:?} ({} compilations)", host.as_slice::<f32>()?, comm.stats().compilations);
//! # Ok::<(), dist_core::Error>(())
//! ```

pub mod communicator;
pub mod kv;
pub mod loader;
pub mod program;
pub mod result;
pub mod safe;
pub mod sys;
pub mod tensor;

pub use communicator::{Communicator, ProgramStats, TpuBackend};
pub use dist_core::{Error, Result};
pub use loader::{check_version, library, Library, MIN_API_MINOR, PLUGIN_ENV};
pub use program::{OpKind, ProgramKey};
pub use safe::{global_client, Buffer, Client, Executable};
pub use tensor::TpuTensor;
