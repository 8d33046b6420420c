//! # dist-nccl: the NCCL / RCCL C ABI, written once
//!
//! NVIDIA's NCCL and AMD's RCCL export the same C names and signatures (RCCL's streams are
//! `hipStream_t` where NCCL's are `cudaStream_t`; both are opaque pointers here), so `dist-cuda`
//! and `dist-rocm` share this crate. It sits just above `dist-core` and below the two GPU
//! backends:
//!
//! ```text
//!   dist-cuda (cudarc)     dist-rocm (HIP)
//!         └──── dist-nccl ─────┘      loads libnccl.so.2 / librccl.so.1 at run time
//!                   │
//!               dist-core             Error, DType, ReduceOp
//! ```
//!
//! ## Layers (as cudarc's `nccl` module)
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

pub mod loader;
pub mod ops;
pub mod result;
pub mod safe;
pub mod sys;
pub mod types;

pub use dist_core::{Error, Result};
pub use loader::{candidates, format_version, library, Flavor, Library, SO_PATH_ENV};
pub use safe::{Comm, UniqueId, ABORT_TIMEOUT};
pub use types::{check_reduction, nccl_dtype, nccl_op, wire_dtype};

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
