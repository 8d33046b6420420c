//! Devices, tensor metadata, the [`Tensor`] trait backends implement, typed host tensors and
//! the byte-level layout helpers (concatenate and split along a dimension) used by every backend.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pool::HostPool;
use crate::view::{HostView, HostViewMut};
use crate::{DType, Element, Result};

/// The kind of device memory lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeviceKind {
    /// Host memory.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
    /// An AMD GPU (HIP).
    Rocm,
    /// A PJRT device (TPU, or a GPU through the PJRT CUDA plugin).
    Tpu,
}

impl DeviceKind {
    /// vLLM's device type string (`"cpu"`, `"cuda"`, …); ROCm shows as `"cuda"` as in torch.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda | DeviceKind::Rocm => "cuda",
            DeviceKind::Tpu => "tpu",
        }
    }
}

/// A device: its kind and its index among the visible devices of that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Device {
    /// Kind of device.
    pub kind: DeviceKind,
    /// Index among visible devices (0 for the host).
    pub index: usize,
}

impl Device {
    /// The host.
    pub const CPU: Device = Device {
        kind: DeviceKind::Cpu,
        index: 0,
    };
    /// A device of `kind` at `index`.
    pub const fn new(kind: DeviceKind, index: usize) -> Self {
        Device { kind, index }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DeviceKind::Cpu => f.write_str("cpu"),
            k => write!(f, "{}:{}", k.as_str(), self.index),
        }
    }
}

/// What every tensor carries: dtype, shape, strides (in elements) and device.
///
/// This is also vLLM's `TensorMetadata` in the tensor-dict protocol (where only the device
/// *kind* matters to the receiver).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Strides in elements; `contiguous_strides(shape)` for a dense tensor.
    pub strides: Vec<usize>,
    /// Where the memory lives.
    pub device: Device,
}

impl TensorMeta {
    /// Metadata of a dense row-major tensor.
    pub fn contiguous(dtype: DType, shape: &[usize], device: Device) -> Self {
        TensorMeta {
            dtype,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            device,
        }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the elements (not of the storage).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// True when the strides are the row-major strides of the shape (dimensions of size 1 are ignored).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (d, s) in self.shape.iter().zip(&self.strides).rev() {
            if *d != 1 && *s != expected {
                return false;
            }
            expected *= *d;
        }
        true
    }
}

/// Row-major strides of `shape`, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A tensor of some backend: the metadata any collective needs to check its arguments.
pub trait Tensor: std::fmt::Debug + Send + Sync {
    /// Element type.
    fn dtype(&self) -> DType;
    /// Shape.
    fn shape(&self) -> &[usize];
    /// Device.
    fn device(&self) -> Device;
    /// Dense row-major layout? Collectives require it.
    fn is_contiguous(&self) -> bool {
        true
    }
    /// Number of elements.
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    /// Bytes of the elements.
    fn nbytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }
    /// The metadata, as sent by the tensor-dict protocol.
    fn meta(&self) -> TensorMeta {
        TensorMeta::contiguous(self.dtype(), self.shape(), self.device())
    }
}

/// [`Tensor`] for a reference type: what the referenced tensor says.
macro_rules! tensor_through_ref {
    ($($r:ty),*) => {$(
        impl<T: Tensor + ?Sized> Tensor for $r {
            fn dtype(&self) -> DType {
                (**self).dtype()
            }
            fn shape(&self) -> &[usize] {
                (**self).shape()
            }
            fn device(&self) -> Device {
                (**self).device()
            }
            fn is_contiguous(&self) -> bool {
                (**self).is_contiguous()
            }
        }
    )*};
}
tensor_through_ref!(&T, &mut T);

/// A dense tensor in host memory, any [`DType`].
///
/// Storage is 8-byte aligned words, so the bytes can be viewed as any element type without
/// copying (`as_slice::<f32>()`), which is what the host collectives and the oracles do. A
/// tensor made by a communicator's [`HostPool`] gives its buffer back to the pool when it drops;
/// clones are plain tensors.
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    /// At least `nbytes` bytes (a pooled buffer may be longer: its size class).
    words: Vec<u64>,
    nbytes: usize,
    home: Option<Arc<HostPool>>,
}

impl Clone for HostTensor {
    fn clone(&self) -> Self {
        HostTensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            words: self.words[..self.nbytes.div_ceil(8)].to_vec(),
            nbytes: self.nbytes,
            home: None,
        }
    }
}

impl PartialEq for HostTensor {
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype
            && self.shape == other.shape
            && self.as_bytes() == other.as_bytes()
    }
}

impl Drop for HostTensor {
    fn drop(&mut self) {
        if let Some(p) = self.home.take() {
            p.give_back(std::mem::take(&mut self.words));
        }
    }
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("nbytes", &self.nbytes)
            .finish()
    }
}

impl HostTensor {
    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Self {
        let nbytes = shape.iter().product::<usize>() * dtype.size();
        HostTensor {
            dtype,
            shape: shape.to_vec(),
            words: vec![0u64; nbytes.div_ceil(8)],
            nbytes,
            home: None,
        }
    }

    /// A tensor over a pool's buffer (`words` holds at least `nbytes`), returned to `pool` on drop.
    pub(crate) fn from_pool_words(
        dtype: DType,
        shape: &[usize],
        words: Vec<u64>,
        nbytes: usize,
        pool: Arc<HostPool>,
    ) -> Self {
        debug_assert!(words.len() * 8 >= nbytes);
        HostTensor {
            dtype,
            shape: shape.to_vec(),
            words,
            nbytes,
            home: Some(pool),
        }
    }

    /// A read view of the elements (what the collectives take).
    pub fn view(&self) -> HostView<'_> {
        HostView::borrowed(self.dtype, &self.shape, self.as_bytes())
            .expect("a host tensor's bytes match its shape and are 8-byte aligned")
    }

    /// A mutable view of the elements.
    pub fn view_mut(&mut self) -> HostViewMut<'_> {
        let n = self.nbytes;
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[..n];
        HostViewMut::borrowed(self.dtype, &self.shape, bytes)
            .expect("a host tensor's bytes match its shape and are 8-byte aligned")
    }

    /// A tensor holding `data` with `shape`; the lengths must agree.
    pub fn from_vec<T: Element>(shape: &[usize], data: Vec<T>) -> Result<Self> {
        Self::from_slice(shape, &data)
    }

    /// A tensor holding a copy of `data` with `shape`.
    pub fn from_slice<T: Element>(shape: &[usize], data: &[T]) -> Result<Self> {
        let n: usize = shape.iter().product();
        crate::ensure_arg!(
            n == data.len(),
            "shape {shape:?} holds {n} elements, data has {}",
            data.len()
        );
        let mut t = Self::zeros(T::DTYPE, shape);
        t.as_bytes_mut()
            .copy_from_slice(bytemuck::cast_slice::<T, u8>(data));
        Ok(t)
    }

    /// A tensor of `dtype` and `shape` holding a copy of `bytes`.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Self> {
        let mut t = Self::zeros(dtype, shape);
        crate::ensure_arg!(
            t.nbytes == bytes.len(),
            "{dtype} tensor of shape {shape:?} needs {} bytes, got {}",
            t.nbytes,
            bytes.len()
        );
        t.as_bytes_mut().copy_from_slice(bytes);
        Ok(t)
    }

    /// A tensor of random values (`Element::from_bits_sample`) from a seed; fp8 gets random bytes.
    pub fn random(dtype: DType, shape: &[usize], seed: u64) -> Self {
        let mut t = Self::zeros(dtype, shape);
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // splitmix64
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let r: Result<()> = (|| {
            crate::dispatch_dtype!(dtype, T => {
                for x in t.as_slice_mut::<T>()? {
                    *x = T::from_bits_sample(next());
                }
                Ok(())
            })
        })();
        if r.is_err() {
            for b in t.as_bytes_mut() {
                *b = next() as u8;
            }
        }
        t
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the elements.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// The elements as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.nbytes]
    }
    /// The elements as mutable bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let n = self.nbytes;
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[..n]
    }

    /// The elements as `T`; `T::DTYPE` must be the tensor's dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_type::<T>()?;
        Ok(bytemuck::cast_slice(self.as_bytes()))
    }
    /// The elements as mutable `T`.
    pub fn as_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_type::<T>()?;
        Ok(bytemuck::cast_slice_mut(self.as_bytes_mut()))
    }
    /// A copy of the elements as `Vec<T>`.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    fn check_type<T: Element>(&self) -> Result<()> {
        crate::ensure_arg!(
            T::DTYPE == self.dtype,
            "tensor holds {}, asked for {}",
            self.dtype,
            T::DTYPE
        );
        Ok(())
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        crate::ensure_arg!(
            n == self.numel(),
            "cannot reshape {:?} into {shape:?}",
            self.shape
        );
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl Tensor for HostTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn device(&self) -> Device {
        Device::CPU
    }
}

/// Bytes of a tensor of `shape` and `dtype`, with overflow checked before anything is allocated
/// (device backends size their buffers with it).
pub fn checked_nbytes(dtype: DType, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| {
            crate::Error::invalid(format!(
                "tensor of shape {shape:?} and dtype {dtype} overflows usize bytes"
            ))
        })
}

/// Normalises a possibly negative `dim` for a tensor of `ndim` dimensions, as torch does.
pub fn normalize_dim(dim: isize, ndim: usize) -> Result<usize> {
    let n = ndim as isize;
    crate::ensure_arg!(
        (-n..n).contains(&dim),
        "dim {dim} out of range for a {ndim}-d tensor (expected {} <= dim < {n})",
        -n
    );
    Ok(if dim < 0 {
        (dim + n) as usize
    } else {
        dim as usize
    })
}

/// `(outer, len, inner)`: the product of the dims before `dim`, `shape[dim]`, and the product after.
pub fn split_dims(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

/// Concatenates byte buffers of tensors along `dim`: `parts[r]` has shape `shape` except
/// `shape[dim] = lens[r]`. Returns the bytes of `cat(parts, dim)`.
///
/// This is the layout step of every all-gather: gather rank-major, then interleave.
pub fn concat_along(
    parts: &[&[u8]],
    shape: &[usize],
    dim: usize,
    lens: &[usize],
    elem: usize,
) -> Result<Vec<u8>> {
    crate::ensure_arg!(
        parts.len() == lens.len(),
        "concat: parts and lengths differ"
    );
    let (outer, _, inner) = split_dims(shape, dim);
    let total: usize = lens.iter().sum();
    let mut out = vec![0u8; outer * total * inner * elem];
    concat_along_into(&mut out, parts, shape, dim, lens, elem)?;
    Ok(out)
}

/// [`concat_along`] into a caller's buffer of the exact size.
pub fn concat_along_into(
    out: &mut [u8],
    parts: &[&[u8]],
    shape: &[usize],
    dim: usize,
    lens: &[usize],
    elem: usize,
) -> Result<()> {
    let (outer, _, inner) = split_dims(shape, dim);
    let total: usize = lens.iter().sum();
    crate::ensure_arg!(
        out.len() == outer * total * inner * elem,
        "concat: output has {} bytes, expected {}",
        out.len(),
        outer * total * inner * elem
    );
    for (p, l) in parts.iter().zip(lens) {
        crate::ensure_arg!(
            p.len() == outer * l * inner * elem,
            "concat: a part has {} bytes, expected {}",
            p.len(),
            outer * l * inner * elem
        );
    }
    let row = total * inner * elem;
    let mut off = 0;
    for (p, l) in parts.iter().zip(lens) {
        let w = l * inner * elem;
        if w > 0 {
            for o in 0..outer {
                out[o * row + off..o * row + off + w].copy_from_slice(&p[o * w..(o + 1) * w]);
            }
        }
        off += w;
    }
    Ok(())
}

/// Splits the bytes of a tensor of `shape` along `dim` into pieces of `lens` (summing to `shape[dim]`).
///
/// The inverse of [`concat_along`]; the layout step of every reduce-scatter.
pub fn split_along(
    data: &[u8],
    shape: &[usize],
    dim: usize,
    lens: &[usize],
    elem: usize,
) -> Result<Vec<Vec<u8>>> {
    let (outer, len, inner) = split_dims(shape, dim);
    crate::ensure_arg!(
        lens.iter().sum::<usize>() == len,
        "split sizes {lens:?} do not sum to dim {dim} of shape {shape:?}"
    );
    crate::ensure_arg!(
        data.len() == outer * len * inner * elem,
        "split: data has {} bytes, shape {shape:?} needs {}",
        data.len(),
        outer * len * inner * elem
    );
    let row = len * inner * elem;
    let mut off = 0;
    let mut out = Vec::with_capacity(lens.len());
    for l in lens {
        let w = l * inner * elem;
        let mut v = Vec::with_capacity(outer * w);
        if w > 0 {
            for o in 0..outer {
                v.extend_from_slice(&data[o * row + off..o * row + off + w]);
            }
        }
        off += w;
        out.push(v);
    }
    Ok(out)
}

/// `shape` with `shape[dim]` replaced by `len`.
pub fn with_dim(shape: &[usize], dim: usize, len: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[dim] = len;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        let m = TensorMeta::contiguous(DType::F32, &[2, 3, 4], Device::CPU);
        assert_eq!(m.strides, vec![12, 4, 1]);
        assert!(m.is_contiguous());
        let t = TensorMeta {
            strides: vec![1, 2, 6],
            ..m.clone()
        };
        assert!(!t.is_contiguous());
        assert_eq!(m.nbytes(), 96);
    }

    #[test]
    fn host_tensor_roundtrip() {
        let t = HostTensor::from_vec(&[2, 2], vec![1.0f64, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(t.as_slice::<f64>().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        assert!(t.as_slice::<f32>().is_err());
        assert_eq!(t.nbytes(), 32);
        let r = t.reshape(&[4]).unwrap();
        assert_eq!(r.shape(), &[4]);
        assert!(HostTensor::from_vec(&[3], vec![1u8, 2]).is_err());
        let z = HostTensor::zeros(DType::BF16, &[0, 5]);
        assert_eq!(z.nbytes(), 0);
        assert_eq!(z.as_slice::<half::bf16>().unwrap().len(), 0);
    }

    #[test]
    fn checked_sizes() {
        assert_eq!(checked_nbytes(DType::F32, &[2, 3]).unwrap(), 24);
        assert_eq!(checked_nbytes(DType::BF16, &[]).unwrap(), 2);
        assert!(checked_nbytes(DType::F64, &[usize::MAX / 4, 3]).is_err());
    }

    #[test]
    fn dims() {
        assert_eq!(normalize_dim(-1, 3).unwrap(), 2);
        assert_eq!(normalize_dim(0, 1).unwrap(), 0);
        assert!(normalize_dim(3, 3).is_err());
        assert!(normalize_dim(-4, 3).is_err());
    }

    #[test]
    fn concat_then_split_is_identity() {
        // Two parts of shape [2, 1, 3] and [2, 2, 3] along dim 1 (u8 elements).
        let a: Vec<u8> = (0..6).collect();
        let b: Vec<u8> = (100..112).collect();
        let c = concat_along(&[&a, &b], &[2, 0, 3], 1, &[1, 2], 1).unwrap();
        assert_eq!(
            c,
            vec![0, 1, 2, 100, 101, 102, 103, 104, 105, 3, 4, 5, 106, 107, 108, 109, 110, 111]
        );
        let s = split_along(&c, &[2, 3, 3], 1, &[1, 2], 1).unwrap();
        assert_eq!(s, vec![a, b]);
    }
}
