//! The example's error type.

use std::path::PathBuf;

/// What can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The weights file is not a readable safetensors file.
    #[error("{}: {detail}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The configuration is unusable (or the model was driven outside it).
    #[error("config: {0}")]
    Config(String),
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from {}", file.display())]
    MissingTensor {
        /// The tensor.
        name: String,
        /// The weights file.
        file: PathBuf,
    },
    /// A tensor's shape is not the one the configuration implies.
    #[error("tensor `{name}` has shape {got:?}, the configuration implies {want:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape in the checkpoint.
        got: Vec<usize>,
        /// The shape the configuration implies.
        want: Vec<usize>,
    },
    /// A tensor's dtype cannot be read.
    #[error("tensor `{name}` is {dtype}; the loader reads F32, BF16 and F16")]
    DType {
        /// The tensor.
        name: String,
        /// Its dtype in the checkpoint.
        dtype: String,
    },
    /// A dimension of a tensor does not split over the TP group.
    #[error("tensor `{name}`: {what} do not divide over TP {tp}")]
    NotDivisible {
        /// The tensor.
        name: String,
        /// What does not divide.
        what: String,
        /// The TP size.
        tp: usize,
    },
    /// A collective on candle tensors failed.
    #[error(transparent)]
    Collective(#[from] dist_candle::Error),
    /// A group or host-group call failed.
    #[error(transparent)]
    Dist(#[from] dist_core::Error),
    /// A candle op failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
