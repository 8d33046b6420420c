//! # dist-cpu: host-tensor collectives and the shared-memory primitives
//!
//! Being built. Today this crate holds the shared-memory primitives the CPU collectives and the
//! MessageQueue share ([`shm`]): named segments with a clear error when `/dev/shm` is too small
//! and removal of segments left by crashed jobs, and futex waits that spin briefly then sleep.

pub mod shm;

/// Checks a condition, returning [`dist_core::Error::InvalidArgument`] when it fails.
macro_rules! ensure_arg {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(dist_core::Error::InvalidArgument(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_arg;
