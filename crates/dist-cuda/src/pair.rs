//! A two-rank NCCL link for point-to-point transfers between two processes.
