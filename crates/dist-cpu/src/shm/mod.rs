//! Shared-memory primitives: named POSIX segments with a clear error when `/dev/shm` is too small,
//! stale-segment cleanup, futex waits that spin briefly and then sleep, and the two facts every
//! shared-memory user needs about its peers: are they on this node ([`same_node`], [`NodeKey`])
//! and are they still alive ([`ProcessId`], [`ProcessWatch`]).

mod futex;
mod node;
mod process;
mod segment;

pub use futex::{
    futex_wait, futex_wake, wait_until, Doorbell, Spin, WaitOutcome, SPIN_ITERS, YIELD_ITERS,
};
pub use node::{node_key, node_keys, same_node, NodeKey};
pub use process::{liveness_all, Liveness, ProcessId, ProcessWatch};
pub use segment::{remove_stale_segments, Segment, ShmWord, SEGMENT_PREFIX};
