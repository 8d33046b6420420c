//! Borrowed tensors: [`HostView`] / [`HostViewMut`] lend memory the caller owns to a collective.
//!
//! Every [`DeviceCommunicator`](crate::DeviceCommunicator) op works on *views* of its backend
//! (`View<'a>` to read, `ViewMut<'a>` to write); the backend's own tensors are simply owners that
//! lend such views. For host backends the views are the types of this module, made from an engine's
//! `&[T]` / `&mut [T]` (or a [`HostTensor`](crate::HostTensor)) with a shape; the checks a
//! collective needs (length against shape, alignment for the dtype) are done once, here, when
//! the view is made. Device backends define their own view types from typed device handles.
//!
//! ```
//! use dist_core::{HostView, HostViewMut, Tensor};
//! let data = vec![1.0f32; 6];
//! let v = HostView::new(&data, &[2, 3]).unwrap();
//! assert_eq!(v.shape(), &[2, 3]);
//! let mut out = vec![0.0f32; 6];
//! let mut o = HostViewMut::from_slice(&mut out);
//! o.as_bytes_mut().copy_from_slice(v.as_bytes());
//! assert_eq!(out, data);
//! assert!(HostView::new(&data, &[4, 2]).is_err()); // 8 elements asked, 6 given
//! ```

use crate::{DType, Device, Element, Result, Tensor};

/// Most dimensions of a shape given to a view's constructor (a view of a [`HostTensor`](crate::HostTensor)
/// borrows the tensor's shape and has no limit).
pub const MAX_DIMS: usize = 8;

/// The shape a view carries: borrowed from its owner, or copied inline from the caller's.
#[derive(Clone, Copy)]
enum Dims<'a> {
    Slice(&'a [usize]),
    Inline([usize; MAX_DIMS], u8),
}

impl Dims<'_> {
    fn as_slice(&self) -> &[usize] {
        match self {
            Dims::Slice(s) => s,
            Dims::Inline(a, n) => &a[..*n as usize],
        }
    }
    fn d1(len: usize) -> Self {
        let mut a = [0; MAX_DIMS];
        a[0] = len;
        Dims::Inline(a, 1)
    }
    fn copy(shape: &[usize]) -> Result<Self> {
        crate::ensure_arg!(
            shape.len() <= MAX_DIMS,
            "a view's shape has at most {MAX_DIMS} dimensions, got {shape:?}"
        );
        let mut a = [0; MAX_DIMS];
        a[..shape.len()].copy_from_slice(shape);
        Ok(Dims::Inline(a, shape.len() as u8))
    }
}

/// Checks that `len` bytes at `addr` can hold a dense `dtype` tensor of `shape`, aligned for the
/// dtype; returns the shape.
fn check_bytes(dtype: DType, shape: &[usize], addr: usize, len: usize) -> Result<()> {
    let need = crate::tensor::checked_nbytes(dtype, shape)?;
    crate::ensure_arg!(
        need == len,
        "a {dtype} tensor of shape {shape:?} needs {need} bytes, the memory lent holds {len}"
    );
    crate::ensure_arg!(
        len == 0 || addr % dtype.size() == 0,
        "memory lent for a {dtype} tensor at {addr:#x} is not aligned to {} bytes",
        dtype.size()
    );
    Ok(())
}

/// A dense host tensor that borrows its elements: the input of a host collective.
#[derive(Clone, Copy)]
pub struct HostView<'a> {
    dtype: DType,
    shape: Dims<'a>,
    bytes: &'a [u8],
}

impl<'a> HostView<'a> {
    /// `data` seen as a tensor of `shape` (whose element count must be `data.len()`).
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(data))
    }
    /// `data` as a 1-D tensor.
    pub fn from_slice<T: Element>(data: &'a [T]) -> Self {
        HostView {
            dtype: T::DTYPE,
            shape: Dims::d1(data.len()),
            bytes: bytemuck::cast_slice(data),
        }
    }
    /// Raw bytes seen as a `dtype` tensor of `shape`: the length must match and the address be
    /// aligned for the dtype (fp8 and other types without a Rust element type come this way).
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &'a [u8]) -> Result<Self> {
        check_bytes(dtype, shape, bytes.as_ptr() as usize, bytes.len())?;
        Ok(HostView {
            dtype,
            shape: Dims::copy(shape)?,
            bytes,
        })
    }

    /// A view whose shape borrows its owner's (no dimension limit).
    pub(crate) fn borrowed(dtype: DType, shape: &'a [usize], bytes: &'a [u8]) -> Result<Self> {
        check_bytes(dtype, shape, bytes.as_ptr() as usize, bytes.len())?;
        Ok(HostView {
            dtype,
            shape: Dims::Slice(shape),
            bytes,
        })
    }
    /// The elements' bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// The elements as `T` (`T::DTYPE` must be the view's dtype).
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        holds::<T>(self.dtype)?;
        Ok(bytemuck::cast_slice(self.bytes))
    }
    /// Elements `[start, start + len)` as a 1-D view.
    pub fn narrow(&self, start: usize, len: usize) -> Result<HostView<'a>> {
        let es = self.dtype.size();
        crate::ensure_arg!(
            start
                .checked_add(len)
                .is_some_and(|e| e <= self.bytes.len() / es.max(1)),
            "narrow [{start}, {start}+{len}) out of range for {} elements",
            self.bytes.len() / es.max(1)
        );
        Ok(HostView {
            dtype: self.dtype,
            shape: Dims::d1(len),
            bytes: &self.bytes[start * es..(start + len) * es],
        })
    }
    /// The same elements with another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<HostView<'a>> {
        HostView::from_bytes(self.dtype, shape, self.bytes)
    }
}

/// A dense host tensor that borrows its elements mutably: the output of a host collective.
pub struct HostViewMut<'a> {
    dtype: DType,
    shape: Dims<'a>,
    bytes: &'a mut [u8],
}

impl<'a> HostViewMut<'a> {
    /// `data` seen as a tensor of `shape` (whose element count must be `data.len()`).
    pub fn new<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(T::DTYPE, shape, bytemuck::cast_slice_mut(data))
    }
    /// `data` as a 1-D tensor.
    pub fn from_slice<T: Element>(data: &'a mut [T]) -> Self {
        HostViewMut {
            dtype: T::DTYPE,
            shape: Dims::d1(data.len()),
            bytes: bytemuck::cast_slice_mut(data),
        }
    }
    /// Raw bytes seen as a `dtype` tensor of `shape` (length and alignment checked).
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &'a mut [u8]) -> Result<Self> {
        check_bytes(dtype, shape, bytes.as_ptr() as usize, bytes.len())?;
        Ok(HostViewMut {
            dtype,
            shape: Dims::copy(shape)?,
            bytes,
        })
    }

    /// A view whose shape borrows its owner's (no dimension limit).
    pub(crate) fn borrowed(dtype: DType, shape: &'a [usize], bytes: &'a mut [u8]) -> Result<Self> {
        check_bytes(dtype, shape, bytes.as_ptr() as usize, bytes.len())?;
        Ok(HostViewMut {
            dtype,
            shape: Dims::Slice(shape),
            bytes,
        })
    }
    /// The elements' bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes
    }
    /// The elements' bytes, to write.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
    /// The elements as `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        holds::<T>(self.dtype)?;
        Ok(bytemuck::cast_slice(self.bytes))
    }
    /// The elements as mutable `T`.
    pub fn as_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        holds::<T>(self.dtype)?;
        Ok(bytemuck::cast_slice_mut(self.bytes))
    }
    /// A shorter-lived mutable view of the same elements.
    pub fn reborrow(&mut self) -> HostViewMut<'_> {
        HostViewMut {
            dtype: self.dtype,
            shape: self.shape,
            bytes: self.bytes,
        }
    }
    /// A read view of the same elements.
    pub fn as_view(&self) -> HostView<'_> {
        HostView {
            dtype: self.dtype,
            shape: self.shape,
            bytes: self.bytes,
        }
    }
    /// The same elements with another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<HostViewMut<'a>> {
        HostViewMut::from_bytes(self.dtype, shape, self.bytes)
    }
}

/// Checks that a view of `dtype` can be read as `T`.
fn holds<T: Element>(dtype: DType) -> Result<()> {
    crate::ensure_arg!(
        T::DTYPE == dtype,
        "view holds {dtype}, asked for {}",
        T::DTYPE
    );
    Ok(())
}

macro_rules! host_view_tensor {
    ($t:ident) => {
        impl $t<'_> {
            /// Element type.
            pub fn dtype(&self) -> DType {
                self.dtype
            }
            /// Shape.
            pub fn shape(&self) -> &[usize] {
                self.shape.as_slice()
            }
            /// Number of elements.
            pub fn numel(&self) -> usize {
                self.bytes.len() / self.dtype.size().max(1)
            }
            /// Bytes of the elements.
            pub fn nbytes(&self) -> usize {
                self.bytes.len()
            }
        }
        impl Tensor for $t<'_> {
            fn dtype(&self) -> DType {
                self.dtype
            }
            fn shape(&self) -> &[usize] {
                self.shape.as_slice()
            }
            fn device(&self) -> Device {
                Device::CPU
            }
        }
        impl std::fmt::Debug for $t<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("dtype", &self.dtype)
                    .field("shape", &self.shape.as_slice())
                    .field("addr", &format_args!("{:p}", self.bytes.as_ptr()))
                    .finish()
            }
        }
    };
}
host_view_tensor!(HostView);
host_view_tensor!(HostViewMut);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_check_length_dtype_and_alignment() {
        let mut data = vec![0u32; 8];
        assert!(HostView::new(&data, &[2, 4]).is_ok());
        assert!(HostView::new(&data, &[3, 3]).is_err());
        let bytes: &[u8] = bytemuck::cast_slice(&data);
        assert!(HostView::from_bytes(DType::F32, &[8], bytes).is_ok());
        // One byte in: misaligned for f32 (and the length no longer fits either).
        let e = HostView::from_bytes(DType::F32, &[7], &bytes[1..29]).unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
        assert!(HostView::from_bytes(DType::F32, &[7], &bytes[..27]).is_err());
        let v = HostView::from_slice(&data);
        assert!(v.as_slice::<f32>().is_err());
        assert_eq!(v.as_slice::<u32>().unwrap().len(), 8);
        let mut m = HostViewMut::new(&mut data, &[8]).unwrap();
        m.as_slice_mut::<u32>().unwrap()[3] = 7;
        let m = m.reshape(&[2, 2, 2]).unwrap();
        assert_eq!(m.shape(), &[2, 2, 2]);
        assert!(m.reshape(&[3]).is_err());
        assert_eq!(data[3], 7);
    }

    #[test]
    fn empty_views() {
        let data: Vec<f32> = vec![];
        let v = HostView::new(&data, &[0, 5]).unwrap();
        assert_eq!(v.numel(), 0);
        assert_eq!(v.nbytes(), 0);
    }
}
