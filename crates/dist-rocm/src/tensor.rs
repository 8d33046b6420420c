//! [`RocmTensor`]: a dense device buffer with its dtype, shape and device.

use std::sync::Arc;

use dist_core::{DType, Device, DeviceKind, HostTensor, Result, Tensor};

use crate::driver::{copy_d2h, copy_h2d, DeviceBuffer, DeviceContext};

/// A dense row-major tensor in device memory.
///
/// Clones share the storage (as torch tensors that alias): in-place collectives on one clone
/// are seen by the others. Memory is released when the last clone is dropped.
#[derive(Clone)]
pub struct RocmTensor {
    buf: Arc<DeviceBuffer>,
    /// Bytes from the start of the buffer to the first element (a narrowed tensor's).
    offset: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for RocmTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocmTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .field("ptr", &format_args!("{:#x}", self.buf.ptr()))
            .finish()
    }
}

pub use dist_core::tensor::checked_nbytes;

impl RocmTensor {
    /// A zero-filled tensor on `dev` (zeroed on the device's stream).
    pub fn zeros(dev: &Arc<DeviceContext>, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        let n = checked_nbytes(dtype, shape)?;
        Ok(RocmTensor {
            buf: Arc::new(DeviceBuffer::zeroed(dev, n)?),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }
    /// An uninitialised tensor (for outputs every byte of which an op writes).
    pub fn uninit(dev: &Arc<DeviceContext>, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        let n = checked_nbytes(dtype, shape)?;
        Ok(RocmTensor {
            buf: Arc::new(DeviceBuffer::alloc(dev, n)?),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }
    /// Copies a host tensor to device `ordinal`.
    pub fn from_host(t: &HostTensor, ordinal: usize) -> Result<RocmTensor> {
        let dev = DeviceContext::get(ordinal)?;
        let out = Self::uninit(&dev, t.dtype(), t.shape())?;
        copy_h2d(&dev, out.ptr(), t.as_bytes())?;
        Ok(out)
    }
    /// Copies to the host (waits for the device's stream).
    pub fn to_host(&self) -> Result<HostTensor> {
        let mut h = HostTensor::zeros(self.dtype, &self.shape);
        copy_d2h(self.buf.device(), h.as_bytes_mut(), self.ptr())?;
        Ok(h)
    }
    /// Overwrites the contents from a host tensor of the same dtype and shape.
    pub fn copy_from_host(&mut self, t: &HostTensor) -> Result<()> {
        dist_core::ensure_arg!(
            t.dtype() == self.dtype && t.shape() == self.shape.as_slice(),
            "copy_from_host: {} {:?} into {} {:?}",
            t.dtype(),
            t.shape(),
            self.dtype,
            self.shape
        );
        copy_h2d(self.buf.device(), self.ptr(), t.as_bytes())
    }
    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr() + self.offset as u64
    }
    /// The device context.
    pub fn context(&self) -> &Arc<DeviceContext> {
        self.buf.device()
    }
    /// The same storage seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<RocmTensor> {
        dist_core::ensure_arg!(
            shape.iter().product::<usize>() == self.numel(),
            "reshape {:?} -> {shape:?} changes the element count",
            self.shape
        );
        Ok(RocmTensor {
            buf: self.buf.clone(),
            offset: self.offset,
            dtype: self.dtype,
            shape: shape.to_vec(),
        })
    }

    /// Elements `[start, start + len)` as a 1-D tensor sharing this storage (no copy).
    pub fn narrow(&self, start: usize, len: usize) -> Result<RocmTensor> {
        dist_core::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= self.numel()),
            "narrow [{start}, {start}+{len}) out of range for {} elements",
            self.numel()
        );
        Ok(RocmTensor {
            buf: self.buf.clone(),
            offset: self.offset + start * self.dtype.size(),
            dtype: self.dtype,
            shape: vec![len],
        })
    }
}

impl Tensor for RocmTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn device(&self) -> Device {
        Device::new(DeviceKind::Rocm, self.buf.device().ordinal())
    }
}
