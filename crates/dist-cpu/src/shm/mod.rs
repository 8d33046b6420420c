//! Shared-memory primitives: named POSIX segments with a clear error when `/dev/shm` is too small,
//! stale-segment cleanup, and futex waits that spin briefly and then sleep.

mod futex;
mod segment;

pub use futex::{
    futex_wait, futex_wake, wait_until, Doorbell, WaitOutcome, SPIN_ITERS, YIELD_ITERS,
};
pub use segment::{remove_stale_segments, Segment, SEGMENT_PREFIX};
