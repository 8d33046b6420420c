//! [`TpuTensor`]: a PJRT device buffer with its dtype, shape and device.

use std::sync::Arc;
use std::time::Duration;

use dist_core::{DType, Device, DeviceKind, HostTensor, Result, Tensor};

use crate::safe::{Buffer, Client};

/// Deadline of host <-> device copies made through `Backend::to_host` / `from_host`.
pub const TRANSFER_TIMEOUT: Duration = dist_core::DEFAULT_TIMEOUT;

/// A dense row-major tensor in a PJRT buffer.
///
/// PJRT buffers are immutable: an in-place collective gives the tensor a new buffer, so clones
/// taken before it keep the old value (unlike `CudaTensor`, whose clones alias).
#[derive(Clone)]
pub struct TpuTensor {
    pub(crate) buf: Arc<Buffer>,
    dtype: DType,
    shape: Vec<usize>,
    device: Device,
}

impl std::fmt::Debug for TpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpuTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("device", &self.device)
            .finish()
    }
}

impl TpuTensor {
    pub(crate) fn new(buf: Buffer, dtype: DType, shape: Vec<usize>, index: usize) -> TpuTensor {
        TpuTensor {
            buf: Arc::new(buf),
            dtype,
            shape,
            device: Device::new(DeviceKind::Tpu, index),
        }
    }

    /// Copies a host tensor to addressable device `index` of `client`.
    pub fn from_host(client: &Client, t: &HostTensor, index: usize) -> Result<TpuTensor> {
        let buf = client.buffer_from_host(index, t, TRANSFER_TIMEOUT)?;
        Ok(Self::new(buf, t.dtype(), t.shape().to_vec(), index))
    }

    /// Copies to the host.
    pub fn to_host(&self) -> Result<HostTensor> {
        self.buf.to_host(self.dtype, &self.shape, TRANSFER_TIMEOUT)
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
}

impl Tensor for TpuTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn device(&self) -> Device {
        self.device
    }
}
