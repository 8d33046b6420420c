//! The ROCm communicator: `dist_nccl`'s generic [`NcclCommunicator`] over RCCL on this
//! crate's [`DeviceContext`]. vLLM's custom all-reduce and quick all-reduce for ROCm are not
//! built yet: every all-reduce goes to RCCL.

use dist_nccl::{GpuBackend, GpuGraph, NcclCommunicator};

use crate::driver::DeviceContext;

/// How a communicator is built: the device and whether to create the RCCL communicator (off:
/// only device memory and copies work; every collective is then `Error::Unsupported`).
pub use dist_nccl::Options;

/// The ROCm device communicator of one group: every `DeviceCommunicator` op over RCCL,
/// asynchronous on the communicator's stream, capturable in a HIP graph. See
/// [`dist_nccl::communicator`].
pub type Communicator = NcclCommunicator<DeviceContext>;

/// The ROCm backend: [`crate::RocmTensor`] and [`Communicator`].
pub type RocmBackend = GpuBackend<DeviceContext>;

/// A captured HIP graph of the work enqueued on a device's stream, replayable.
pub type RocmGraph = GpuGraph<DeviceContext>;
