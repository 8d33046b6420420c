//! The adapter's error type.

/// What can go wrong when a candle tensor takes part in a collective.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The collective failed or refused its arguments: a shape that does not fit the op, a rank
    /// out of range, a deadline passed ([`dist_core::Error::Timeout`] names the ranks), a peer lost.
    #[error(transparent)]
    Dist(#[from] dist_core::Error),
    /// A candle operation the adapter needed failed (making an input contiguous, building an output).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The tensor's dtype cannot take part in this op (no dist equivalent, not reducible, or not
    /// the dtype of the op's other tensor).
    #[error("{op}: a {dtype:?} tensor {why}")]
    DType {
        /// The collective.
        op: &'static str,
        /// The tensor's candle dtype.
        dtype: candle_core::DType,
        /// What is wrong with it.
        why: String,
    },
    /// The tensor lives on a device this group's backend does not serve.
    #[error("{op}: the tensor is on {got}, this group's tensors live on {want}")]
    Device {
        /// The collective.
        op: &'static str,
        /// The tensor's device.
        got: String,
        /// The device the group's backend serves.
        want: String,
    },
    /// A tensor the op writes is not one dense row-major block of its storage, or the op's
    /// tensors overlap in memory.
    #[error("{op}: {detail}")]
    Layout {
        /// The collective.
        op: &'static str,
        /// What is wrong and how to fix it.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The dist error inside, when the collective itself failed.
    pub fn as_dist(&self) -> Option<&dist_core::Error> {
        match self {
            Error::Dist(e) => Some(e),
            _ => None,
        }
    }
}
