//! # dist: vLLM's distributed communication layer, in Rust
//!
//! The facade crate an application links. It re-exports [`dist_core`] (the vocabulary every
//! model crate uses) and the backend crates its cargo features select:
//!
//! | feature | backend | status |
//! |---|---|---|
//! | `cpu` (default) | [`dist_cpu`]: shared-memory collectives on one node | being built |
//! | `gloo` | gloo across nodes for host tensors | being built |
//! | `cuda` | NCCL and the custom all-reduce | being built |
//! | `rocm` | HIP and RCCL | being built |
//! | `tpu` | PJRT | being built |
//!
//! It also ships the `dist` binary: `dist layout` and `dist pp-split` today.

pub use dist_core as core;
pub use dist_core::*;
pub use dist_cpu;
