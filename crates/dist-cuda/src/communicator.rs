//! The CUDA communicator: `dist_nccl`'s generic [`NcclCommunicator`] on this crate's
//! [`DeviceContext`], with vLLM's custom all-reduce as its fast path, and how it is built.

use dist_nccl::{CommOptions, GpuBackend, GpuGraph, NcclCommunicator};

use crate::custom_ar::policy;
use crate::driver::DeviceContext;

/// How a communicator is built. [`Options::from_env`] is what [`CudaBackend`] uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Device index; `None`: the context's `local_rank` (vLLM's `cuda:{local_rank}`).
    pub device: Option<usize>,
    /// Create the NCCL communicator (NCCL refuses two ranks on one GPU, so tests of the custom
    /// all-reduce with several processes on one device turn it off).
    pub nccl: bool,
    /// Try the custom all-reduce (it still needs a `"tp"` group of 2/4/6/8 ranks with peer access).
    pub custom_all_reduce: bool,
    /// Custom all-reduce `max_size` override (default: vLLM's rule).
    pub custom_ar_max_size: Option<usize>,
}

impl Options {
    /// Defaults, with `DIST_DISABLE_CUSTOM_ALL_REDUCE` honoured.
    pub fn from_env() -> Options {
        Options {
            device: None,
            nccl: true,
            custom_all_reduce: !policy::env_flag(
                std::env::var(policy::DISABLE_ENV).ok().as_deref(),
            ),
            custom_ar_max_size: None,
        }
    }
}

impl CommOptions for Options {
    fn common(&self) -> dist_nccl::Options {
        dist_nccl::Options {
            device: self.device,
            nccl: self.nccl,
        }
    }
    fn from_env() -> Self {
        Options::from_env()
    }
}

/// The CUDA device communicator of one group: every `DeviceCommunicator` op over NCCL,
/// asynchronous on the communicator's stream (the device's, or an engine's:
/// [`crate::engine::use_stream`]), the custom all-reduce first where vLLM's `should_custom_ar`
/// holds and the op is a sum. See [`dist_nccl::communicator`].
pub type Communicator = NcclCommunicator<DeviceContext>;

/// The CUDA backend: [`crate::CudaTensor`] and [`Communicator`].
pub type CudaBackend = GpuBackend<DeviceContext>;

/// A captured CUDA graph of the work enqueued on a device's stream, replayable.
pub type CudaGraph = GpuGraph<DeviceContext>;
