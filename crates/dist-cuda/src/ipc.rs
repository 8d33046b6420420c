//! CUDA IPC: sharing device memory between processes of one host.
