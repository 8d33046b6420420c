//! A two-rank NCCL link between two processes, for KV transfer: `dist_nccl`'s generic
//! [`dist_nccl::pair::NcclPair`] on CUDA (see there for the protocol and the deadlines).

/// A two-rank NCCL communicator on a CUDA device, with its own stream.
pub type NcclPair = dist_nccl::pair::NcclPair<crate::DeviceContext>;
