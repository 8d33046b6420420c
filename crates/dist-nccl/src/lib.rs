//! # dist-nccl: the GPU communicator, written once over the NCCL / RCCL C ABI
//!
//! NVIDIA's NCCL and AMD's RCCL export the same C names and signatures (RCCL's streams are
//! `hipStream_t` where NCCL's are `cudaStream_t`; both are opaque pointers here). This crate
//! holds everything the GPU backends share — the ABI, the tensors, the views, the communicator,
//! its bootstrap and teardown — generic over a [`GpuRuntime`], the hardware surface a backend
//! supplies. It sits just above `dist-core` and below the GPU backends:
//!
//! ```text
//!   dist-cuda (cudarc: driver, NVRTC, IPC, custom AR)   dist-rocm (HIP loaded at run time)
//!         └──── impl GpuRuntime ──── dist-nccl ──── impl GpuRuntime ────┘
//!                 NcclCommunicator<R>, GpuTensor<R>, GpuView<R>, GpuGraph<R>, GpuBackend<R>;
//!                 libnccl.so.2 / librccl.so.1 loaded at run time
//!                                   │
//!                               dist-core      DeviceCommunicator, Backend, Error, DType, ReduceOp
//! ```
//!
//! ## The seam
//! [`GpuRuntime`] is one device of a runtime: binding its context, its stream, raw allocation
//! (the cache above it, [`Pool`], is written here), copies, events, graph capture, device
//! faults, and an optional fast all-reduce ([`FastAllReduce`]: vLLM's custom all-reduce plugs
//! in there on CUDA). The generic code calls the runtime; the runtime never calls back. Every
//! entry point binds the context once, then calls primitives that do not bind.
//!
//! ## The pieces
//! - [`GpuTensor`]: a dense device buffer + dtype + shape (clones alias, as torch tensors do);
//!   [`DeviceBuffer`]: one allocation, back to the cache on drop.
//! - [`GpuView`] / [`GpuViewMut`]: memory lent to a collective — a tensor's, or an engine's on
//!   the engine's stream — checked once when made; the address stays private.
//! - [`NcclCommunicator`]: every `DeviceCommunicator` op, on the communicator's stream (the
//!   runtime's, or an engine's: [`NcclCommunicator::set_stream`]), views on other streams fenced
//!   by events; outputs are written by NCCL itself or by the re-layout copies, nothing else;
//!   no host synchronisation inside a call. `all_gather(dim)` gathers rank-major, then one
//!   strided copy per rank makes `cat(x, dim)` (none when the dims before `dim` are 1);
//!   `reduce_scatter(dim)` mirrors it; the `v` variants are one broadcast / reduce per root
//!   inside a group (as vLLM's pynccl); fp8 moves as bytes.
//! - [`GpuGraph`]: capture and replay on a device's stream; [`GpuBackend`]: `dist_core::Backend`;
//!   [`pair::NcclPair`]: a two-rank link with its own stream and deadlines (KV transfer).
//!
//! ## Layers of the ABI (as cudarc's `nccl` module)
//! - [`sys`]: the raw ABI: `ncclUniqueId` (128 bytes), the enums with NCCL's values, the
//!   function-pointer types and the table of bound functions.
//! - [`result`]: one thin function per C call; a non-zero status becomes
//!   [`dist_core::Error::Backend`] carrying the code and `ncclGetErrorString`'s message.
//! - [`safe`]: [`Comm`], an owning communicator: init with a deadline on a helper thread,
//!   stream-explicit collectives, grouped calls, and an abort on drop that runs on a helper
//!   thread joined with a deadline (abort can block while a CUDA graph holds the communicator).
//!   `Drop` never panics.
//!
//! ## Loading
//! The library is opened once per flavour behind a `OnceLock` ([`library`]): `DIST_NCCL_SO_PATH`
//! first (vLLM's `VLLM_NCCL_SO_PATH`), then `libnccl.so.2`, `libnccl.so` (RCCL: `librccl.so.1`,
//! `librccl.so`, then both under `$ROCM_PATH/lib`). A missing library is
//! [`dist_core::Error::LibraryNotFound`] listing every candidate with the loader's reason, never
//! a panic. The functions vLLM binds are required; `ncclCommGetAsyncError`,
//! `ncclCommInitRankConfig` and the window-register pair are optional and `None` when absent.
//! Versions print as vLLM prints them (`21903` → `2.19.3`, [`format_version`]).
//!
//! ## Example
//! ```no_run
//! use dist_nccl::{library, Flavor, UniqueId};
//! let lib = library(Flavor::Nccl)?; // Err(LibraryNotFound { tried }) without NCCL
//! println!("NCCL {}", lib.version());
//! let id = UniqueId::new(lib)?; // rank 0; the bytes travel over the host group
//! # Ok::<(), dist_core::Error>(())
//! ```

pub mod backend;
pub mod communicator;
mod layout;
pub mod loader;
pub mod memory;
pub mod pair;
pub mod result;
pub mod runtime;
pub mod safe;
pub mod sys;
pub mod types;
pub mod view;

pub use backend::{GpuBackend, GpuGraph};
pub use communicator::{NcclCommunicator, Options};
pub use dist_core::{Error, Result};
pub use loader::{
    candidates, format_version, install_library, library, Flavor, Library, SO_PATH_ENV,
};
pub use memory::{DeviceBuffer, GpuTensor, Pool};
pub use runtime::{
    annotate, wait_stream, CommOptions, Devices, FastAllReduce, GpuRuntime, NoFastPath, RawStream,
    Strided, MAX_DEVICES,
};
pub use safe::{Comm, UniqueId, ABORT_TIMEOUT};
pub use types::{check_reduction, nccl_dtype, nccl_op, wire_dtype};
pub use view::{GpuView, GpuViewMut, Keep};

pub(crate) fn ensure_rank(r: usize, world: usize, what: &str) -> Result<()> {
    if r >= world {
        return Err(Error::invalid(format!(
            "{what} {r} out of range for world size {world}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_bytes_roundtrip_and_length_check() {
        let b: Vec<u8> = (0..128u32).map(|i| (i * 7 % 256) as u8).collect();
        let id = UniqueId::from_bytes(&b).unwrap();
        assert_eq!(id.to_bytes(), b);
        assert!(UniqueId::from_bytes(&b[..127]).is_err());
        assert!(UniqueId::from_bytes(&[0; 129]).is_err());
    }

    #[test]
    fn rank_checks() {
        assert!(ensure_rank(3, 3, "peer").is_err());
        ensure_rank(2, 3, "peer").unwrap();
    }
}
