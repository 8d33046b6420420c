//! # dist: vLLM's distributed communication layer, in Rust
//!
//! The facade crate an application links. It re-exports [`dist_core`] (the vocabulary model
//! crates use), wires the concrete pieces together — the TCP store ([`dist_store`]), the host
//! groups over it, the shared-memory collectives and MessageQueue ([`dist_cpu`]) — and ships the
//! `dist` binary (`layout`, `pp-split`, `run`, `store serve`, `bench`).
//!
//! The binary's code (its CLI, `dist bench` and its plots, the store, MessageQueue and KV tools)
//! lives in the binary, behind the default feature `cli`: an engine that links the library with
//! `default-features = false` gets no clap, no font and no benchmark code.
//!
//! | feature | backend | status |
//! |---|---|---|
//! | `cpu` (default) | [`dist_cpu::CpuBackend`]: shared-memory collectives on one node | built |
//! | — (always) | [`dist_core::host_comm::HostBackend`]: collectives over the store, any topology | built |
//! | `gloo` | gloo across nodes for host tensors (a C++ shim over Debian's libgloo-dev) | built |
//! | `cuda` | `dist_cuda`: NCCL loaded at run time, the custom all-reduce | built (one GPU tested) |
//! | `rocm` | `dist_rocm`: HIP and RCCL loaded at run time | built (no AMD GPU tested) |
//! | `tpu` | `dist_tpu`: PJRT plugins (libtpu, or JAX's CUDA plugin), StableHLO collectives | built (world 1 tested through the CUDA plugin) |
//!
//! ## Example
//! ```no_run
//! // Under `dist run --nproc-per-node 4 -- my-engine`:
//! use dist::{DistEnv, InitOptions, ParallelConfig};
//! let env = DistEnv::init(&InitOptions::default())?;
//! let cfg = ParallelConfig { tp: 2, pp: 2, ..ParallelConfig::new(env.world().world_size) };
//! let state = env.initialize_model_parallel::<dist::DefaultBackend>(cfg)?;
//! let x = dist::HostTensor::from_vec(&[4], vec![1.0f32; 4])?;
//! let y = state.tp().all_reduce(x)?; // use the return value
//! # Ok::<(), dist::Error>(())
//! ```

pub mod diagnostics;
mod env;

pub use dist_core as core;
pub use dist_core::*;
pub use dist_cpu;
#[cfg(feature = "cuda")]
pub use dist_cuda;
#[cfg(feature = "rocm")]
pub use dist_rocm;
pub use dist_store;
#[cfg(feature = "tpu")]
pub use dist_tpu;
pub use env::{
    default_timeout, group_timeout, in_the_same_node_as, node_count, parse_tcp_uri, DistEnv,
    InitOptions, MqBroadcaster, StoreGroupFactory, CHECK_COLLECTIVES_ENV, TIMEOUT_ENV,
};

/// The backend the default features select: shared-memory host collectives (feature `cpu`).
#[cfg(feature = "cpu")]
pub type DefaultBackend = dist_cpu::CpuBackend;
/// Without the feature `cpu`: host collectives over the store.
#[cfg(not(feature = "cpu"))]
pub type DefaultBackend = dist_core::host_comm::HostBackend;

/// The backends compiled into this build, for choosing one at run time (`DIST_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// Shared-memory host collectives ([`dist_cpu::CpuBackend`], feature `cpu`).
    #[cfg(feature = "cpu")]
    Cpu,
    /// Host collectives over the store ([`dist_core::host_comm::HostBackend`]).
    Host,
    /// NVIDIA GPUs through NCCL (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda,
    /// AMD GPUs through RCCL (feature `rocm`).
    #[cfg(feature = "rocm")]
    Rocm,
    /// TPUs (or any PJRT plugin) through compiled StableHLO collectives (feature `tpu`).
    #[cfg(feature = "tpu")]
    Tpu,
}

impl BackendKind {
    /// Parses a backend name or alias (`cpu`/`shm`, `host`/`store`, `cuda`/`nccl`, `rocm`/`hip`/
    /// `rccl`, `tpu`/`pjrt`), in any case; a backend whose cargo feature is off in this build is
    /// an [`Error::Unsupported`] naming the feature to build with.
    pub fn parse(s: &str) -> Result<BackendKind> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            #[cfg(feature = "cpu")]
            "cpu" | "shm" => Ok(BackendKind::Cpu),
            "host" | "store" => Ok(BackendKind::Host),
            #[cfg(feature = "cuda")]
            "cuda" | "nccl" => Ok(BackendKind::Cuda),
            #[cfg(feature = "rocm")]
            "rocm" | "hip" | "rccl" => Ok(BackendKind::Rocm),
            #[cfg(feature = "tpu")]
            "tpu" | "pjrt" => Ok(BackendKind::Tpu),
            // Reached only for backends whose feature is off in this build.
            #[allow(unreachable_patterns)]
            "cpu" | "shm" | "cuda" | "nccl" | "rocm" | "hip" | "rccl" | "tpu" | "pjrt" => {
                Err(Error::unsupported(format!(
                    "backend {s}: not compiled into this build of dist (build with --features {})",
                    match lower.as_str() {
                        "rocm" | "hip" | "rccl" => "rocm",
                        "tpu" | "pjrt" => "tpu",
                        "cpu" | "shm" => "cpu",
                        _ => "cuda",
                    }
                )))
            }
            other => Err(Error::invalid(format!(
                "unknown backend {other:?} (expected cpu, host, cuda, rocm, tpu)"
            ))),
        }
    }
    /// `DIST_BACKEND`, else `cpu` (`host` in a build without the feature `cpu`).
    pub fn from_env() -> Result<BackendKind> {
        match std::env::var("DIST_BACKEND") {
            Ok(s) if !s.is_empty() => Self::parse(&s),
            #[cfg(feature = "cpu")]
            _ => Ok(BackendKind::Cpu),
            #[cfg(not(feature = "cpu"))]
            _ => Ok(BackendKind::Host),
        }
    }
    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "cpu")]
            BackendKind::Cpu => "cpu",
            BackendKind::Host => "host",
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => "cuda",
            #[cfg(feature = "rocm")]
            BackendKind::Rocm => "rocm",
            #[cfg(feature = "tpu")]
            BackendKind::Tpu => "tpu",
        }
    }
    /// The kind of device this backend's tensors live on.
    pub fn device_kind(self) -> DeviceKind {
        match self {
            #[cfg(feature = "cpu")]
            BackendKind::Cpu => DeviceKind::Cpu,
            BackendKind::Host => DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => DeviceKind::Cuda,
            #[cfg(feature = "rocm")]
            BackendKind::Rocm => DeviceKind::Rocm,
            #[cfg(feature = "tpu")]
            BackendKind::Tpu => DeviceKind::Tpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_in_any_case() {
        #[cfg(feature = "cpu")]
        assert_eq!(BackendKind::parse("SHM").unwrap(), BackendKind::Cpu);
        #[cfg(not(feature = "cpu"))]
        assert!(BackendKind::parse("SHM")
            .unwrap_err()
            .to_string()
            .contains("--features cpu"));
        assert_eq!(BackendKind::parse("Store").unwrap(), BackendKind::Host);
        assert!(matches!(
            BackendKind::parse("gpu"),
            Err(Error::InvalidArgument(_))
        ));
        #[cfg(not(feature = "rocm"))]
        {
            let e = BackendKind::parse("ROCm").unwrap_err().to_string();
            assert!(e.contains("--features rocm"), "{e}");
        }
        #[cfg(not(feature = "tpu"))]
        {
            let e = BackendKind::parse("PJRT").unwrap_err().to_string();
            assert!(e.contains("--features tpu"), "{e}");
        }
    }
}
