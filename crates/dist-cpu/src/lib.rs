//! # dist-cpu: host-tensor collectives on one node, and the shared-memory primitives
//!
//! This is the CPU backend of the `dist` workspace (vLLM's `CpuCommunicator` with its
//! shared-memory C++ backend, and the MessageQueue's primitives). It sits on
//! `dist-core` and implements its [`dist_core::Backend`] as [`CpuBackend`], whose communicator
//! [`ShmCommunicator`] runs every collective of [`dist_core::DeviceCommunicator`] on
//! [`dist_core::HostTensor`]s among the processes (or threads) of one group on one node.
//!
//! ## Design
//! - **One segment per rank**, named per job and group (`distrs.<pid>.cpu.<job>.<group>.<rank>`,
//!   the job id drawn by rank 0 and broadcast over the group's host group). Peers map every
//!   segment, then each creator unlinks its name: a process killed later leaves nothing in
//!   `/dev/shm`, and names left by a crash during set-up are removed by the next job
//!   ([`shm::remove_stale_segments`]). A `/dev/shm` too small is an error at creation
//!   (`posix_fallocate`), not a `SIGBUS` later.
//! - **Rounds with double buffering.** Collectives move data in chunks of one *half* of each
//!   segment; round `g` uses half `g % 2` so the next chunk is written while peers read this one.
//!   Tensors of any size go through halves of a few MiB; lengths of 0 and odd lengths are plain cases.
//! - **Bit-identical reductions.** Each element is reduced by one rank (or, for small tensors,
//!   by every rank) from all ranks' copies in rank order with `dist_core::reduce_bytes`, so
//!   every rank gets the same bits, which the `dist_core::reference` oracles (written
//!   separately) reproduce exactly.
//!   Half types accumulate in f32.
//! - **Waits** spin briefly, yield, then sleep on the waited-for peer's futex doorbell
//!   ([`shm::Doorbell`]), so eight ranks on two cores do not steal each other's time; a publisher
//!   makes no system call while nobody sleeps. Every wait has the call's deadline; a dead peer
//!   (its pid gone), a peer that closed or failed ends the wait with `Error::PeerLost` naming it,
//!   the deadline with `Error::Timeout` naming every rank that did not arrive.
//! - **Point-to-point** messages go through per-pair double-buffered slots: a message of up to
//!   two slots is sent without waiting for the receiver; larger ones stream. Lists of tensors of
//!   any count, dtype and shape ([`ShmCommunicator::send_list`]) carry typed metadata.
//! - fp8 tensors move as bytes; reducing them is [`dist_core::Error::Unsupported`].
//! - [`mq`]: vLLM's shared-memory broadcast MessageQueue (one writer, n readers; TCP for
//!   readers on other nodes), on the same primitives.
//!
//! - [`ShmHostGroup`]: the `HostGroup` operations (barrier, bytes, typed objects) at
//!   shared-memory speed over a communicator of its own, bootstrapped over a slower group.
//! - Large all-reduce chunks are split among a few helper threads per rank
//!   ([`ShmConfig::threads`], `DIST_CPU_THREADS`; default: cores / ranks, at most 8).
//!
//! - **Across nodes: gloo** (feature `gloo`, Debian's `libgloo-dev`): the `gloo` module holds a C++ shim
//!   (built with the `cc` crate; every C++ exception caught and returned as an error) whose
//!   rendezvous goes through the job's `dist_core::Store` as set/get/wait callbacks.
//!   [`CpuBackend`] picks shared memory when every rank is on this node and gloo otherwise;
//!   `DIST_CPU_BACKEND=shm|gloo` forces one. gloo's ring combines ranks in its own order, so its
//!   float results match the oracles within rounding (integers exactly).
//!
//! ## Example
//! ```
//! use std::time::Duration;
//! use dist_core::{local::run_threads, reference, DeviceCommunicator, HostTensor, DType, ReduceOp};
//! use dist_cpu::ShmCommunicator;
//!
//! let inputs: Vec<HostTensor> = (0..3).map(|r| HostTensor::random(DType::F32, &[5], r)).collect();
//! let want = reference::all_reduce(&inputs, ReduceOp::Sum).unwrap();
//! let got = run_threads(3, Duration::from_secs(30), |r, g| {
//!     let comm = ShmCommunicator::new(&g, "doc", Duration::from_secs(30)).unwrap();
//!     comm.all_reduce(&inputs[r], ReduceOp::Sum).unwrap()
//! });
//! for t in got {
//!     assert_eq!(t.unwrap(), want);
//! }
//! ```

mod backend;
mod coll;
#[cfg(feature = "gloo")]
pub mod gloo;
pub mod mq;
pub mod shm;

pub use backend::{CpuBackend, CpuCommunicator};
/// The communicator [`CpuBackend`] builds (the same item name in every backend crate).
pub type Communicator = CpuCommunicator;
pub use coll::{
    ShmCommunicator, ShmConfig, ShmHostGroup, MAX_LIST_BYTES, MAX_LIST_TENSORS, MAX_WORLD,
};
pub use dist_core::{Error, Result};

/// Checks a condition, returning [`dist_core::Error::InvalidArgument`] when it fails.
macro_rules! ensure_arg {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(dist_core::Error::InvalidArgument(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_arg;
