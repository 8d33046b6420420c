//! [`GpuView`] / [`GpuViewMut`]: device memory lent to a collective — the backend's own
//! [`crate::GpuTensor`]s, or an engine's buffers on the engine's stream.
//!
//! A view is a device range (its address private to this crate), a dtype and shape, the device
//! and the stream the memory is ordered on, borrowed for `'a`. The checks a collective needs
//! (bytes against shape, alignment) are made once, when the view is made; an op then checks
//! only the shapes and the device it is given. A view may also keep something of its maker's
//! alive until it drops (cudarc's `SyncOnDrop`, which records the engine's read/write event
//! after the collective was enqueued).
//!
//! Safe constructors: [`crate::GpuTensor::view`] / [`crate::GpuTensor::view_mut`] and a
//! backend's adapters of typed handles (dist-cuda's cudarc adapter). Anything else comes through
//! [`GpuView::from_raw_parts`], whose contract is the caller's.

use std::marker::PhantomData;
use std::sync::Arc;

use dist_core::tensor::checked_nbytes;
use dist_core::{DType, Device, Result, Tensor};

use crate::runtime::{GpuRuntime, RawStream};

/// A view's shape: borrowed (from its owner or the caller), or a flat length kept inline (a
/// narrowed or adapted view has no shape to borrow).
#[derive(Clone, Copy)]
struct Dims<'a> {
    borrowed: Option<&'a [usize]>,
    flat: [usize; 1],
}

impl<'a> Dims<'a> {
    fn of(shape: &'a [usize]) -> Self {
        Dims {
            borrowed: Some(shape),
            flat: [0],
        }
    }
    fn flat(n: usize) -> Self {
        Dims {
            borrowed: None,
            flat: [n],
        }
    }
    fn as_slice(&self) -> &[usize] {
        self.borrowed.unwrap_or(&self.flat)
    }
}

/// What a view keeps alive for its maker until it drops.
pub type Keep<'a> = Arc<dyn Send + Sync + 'a>;

/// The fields both view types share.
pub(crate) struct Raw<'a, R> {
    pub(crate) dev: &'a R,
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) dtype: DType,
    shape: Dims<'a>,
    pub(crate) stream: RawStream,
    keep: Option<Keep<'a>>,
}

impl<R> Clone for Raw<'_, R> {
    fn clone(&self) -> Self {
        Raw {
            keep: self.keep.clone(),
            ..*self
        }
    }
}

impl<'a, R: GpuRuntime> Raw<'a, R> {
    /// Checks `shape` and alignment against the memory; see [`GpuView::from_raw_parts`].
    fn checked(
        dev: &'a R,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        shape: Dims<'a>,
        stream: RawStream,
    ) -> Result<Self> {
        let need = checked_nbytes(dtype, shape.as_slice())?;
        dist_core::ensure_arg!(
            need == bytes,
            "a {dtype} tensor of shape {:?} needs {need} bytes, the memory lent holds {bytes}",
            shape.as_slice()
        );
        dist_core::ensure_arg!(
            bytes == 0 || ptr % dtype.size() as u64 == 0,
            "device memory lent for a {dtype} tensor at {ptr:#x} is not aligned to {} bytes",
            dtype.size()
        );
        Ok(Raw {
            dev,
            ptr,
            bytes,
            dtype,
            shape,
            stream,
            keep: None,
        })
    }
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let es = self.dtype.size();
        let n = self.bytes / es.max(1);
        dist_core::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= n),
            "narrow [{start}, {start}+{len}) out of range for {n} elements"
        );
        Ok(Raw {
            ptr: self.ptr + (start * es) as u64,
            bytes: len * es,
            shape: Dims::flat(len),
            ..self.clone()
        })
    }
    fn reshape<'b>(self, shape: &'b [usize]) -> Result<Raw<'b, R>>
    where
        'a: 'b,
    {
        let mut r = Raw::checked(
            self.dev,
            self.ptr,
            self.bytes,
            self.dtype,
            Dims::of(shape),
            self.stream,
        )?;
        r.keep = self.keep;
        Ok(r)
    }
    pub(crate) fn shape(&self) -> &[usize] {
        self.shape.as_slice()
    }
    fn fmt(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape.as_slice())
            .field(
                "device",
                &format_args!("{}:{}", R::NAME, self.dev.ordinal()),
            )
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("stream", &self.stream)
            .finish()
    }
}

/// Device memory a collective reads; see the module docs.
pub struct GpuView<'a, R: GpuRuntime> {
    pub(crate) raw: Raw<'a, R>,
}

/// Device memory a collective writes; see the module docs.
pub struct GpuViewMut<'a, R: GpuRuntime> {
    pub(crate) raw: Raw<'a, R>,
    _mut: PhantomData<&'a mut [u8]>,
}

impl<'a, R: GpuRuntime> GpuView<'a, R> {
    /// A view of the `bytes` bytes at device address `ptr` of `dev`'s device as a `dtype`
    /// tensor of `shape`, ordered on `stream`. That the shape fits the bytes and the address is
    /// aligned for the dtype is checked here, once.
    ///
    /// # Safety
    /// For all of `'a`: `ptr` starts `bytes` bytes of device memory of `dev`'s device *and
    /// context*, which stay allocated; nothing writes them except work ordered before the
    /// collectives enqueued on `stream`; `stream` is a live stream of `dev`.
    pub unsafe fn from_raw_parts(
        dev: &'a R,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        shape: &'a [usize],
        stream: RawStream,
    ) -> Result<Self> {
        Raw::checked(dev, ptr, bytes, dtype, Dims::of(shape), stream).map(|raw| GpuView { raw })
    }
    /// A 1-D view of `bytes / dtype.size()` elements (the typed-handle adapters' form).
    ///
    /// # Safety
    /// As [`GpuView::from_raw_parts`], for `bytes` bytes.
    pub unsafe fn from_raw_bytes(
        dev: &'a R,
        ptr: u64,
        dtype: DType,
        bytes: usize,
        stream: RawStream,
    ) -> Result<Self> {
        let n = bytes / dtype.size().max(1);
        Raw::checked(dev, ptr, bytes, dtype, Dims::flat(n), stream).map(|raw| GpuView { raw })
    }
    /// A view of memory the caller owns with a shape that fits it (no checks).
    ///
    /// # Safety
    /// As [`GpuView::from_raw_parts`], and the bytes and alignment fit `dtype` and `shape`.
    pub(crate) unsafe fn new_unchecked(
        dev: &'a R,
        ptr: u64,
        dtype: DType,
        shape: &'a [usize],
        stream: RawStream,
    ) -> Self {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        GpuView {
            raw: Raw {
                dev,
                ptr,
                bytes,
                dtype,
                shape: Dims::of(shape),
                stream,
                keep: None,
            },
        }
    }
    /// Keeps `keep` alive until this view and every view narrowed from it have dropped.
    pub fn keeping(mut self, keep: Keep<'a>) -> Self {
        self.raw.keep = Some(keep);
        self
    }
    /// Elements `[start, start + len)` as a 1-D view of the same memory.
    pub fn narrow(&self, start: usize, len: usize) -> Result<GpuView<'a, R>> {
        self.raw.narrow(start, len).map(|raw| GpuView { raw })
    }
    /// The same elements with another shape of the same element count.
    pub fn reshape<'b>(self, shape: &'b [usize]) -> Result<GpuView<'b, R>>
    where
        'a: 'b,
    {
        self.raw.reshape(shape).map(|raw| GpuView { raw })
    }
    /// The stream the memory is ordered on (collectives on this view are enqueued there).
    pub fn stream(&self) -> RawStream {
        self.raw.stream
    }
    /// The device context.
    pub fn context(&self) -> &'a R {
        self.raw.dev
    }
}

impl<'a, R: GpuRuntime> GpuViewMut<'a, R> {
    /// A mutable view; see [`GpuView::from_raw_parts`].
    ///
    /// # Safety
    /// As [`GpuView::from_raw_parts`], and nothing else reads or writes the memory during `'a`
    /// except work ordered on `stream`.
    pub unsafe fn from_raw_parts(
        dev: &'a R,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        shape: &'a [usize],
        stream: RawStream,
    ) -> Result<Self> {
        // SAFETY: forwarded contract (exclusive).
        unsafe { GpuView::from_raw_parts(dev, ptr, bytes, dtype, shape, stream) }
            .map(|v| Self::wrap(v.raw))
    }
    /// A 1-D mutable view; see [`GpuView::from_raw_bytes`].
    ///
    /// # Safety
    /// As [`GpuViewMut::from_raw_parts`], for `bytes` bytes.
    pub unsafe fn from_raw_bytes(
        dev: &'a R,
        ptr: u64,
        dtype: DType,
        bytes: usize,
        stream: RawStream,
    ) -> Result<Self> {
        // SAFETY: forwarded contract (exclusive).
        unsafe { GpuView::from_raw_bytes(dev, ptr, dtype, bytes, stream) }
            .map(|v| Self::wrap(v.raw))
    }
    /// # Safety
    /// As [`GpuView::new_unchecked`], exclusive.
    pub(crate) unsafe fn new_unchecked(
        dev: &'a R,
        ptr: u64,
        dtype: DType,
        shape: &'a [usize],
        stream: RawStream,
    ) -> Self {
        // SAFETY: forwarded contract.
        Self::wrap(unsafe { GpuView::new_unchecked(dev, ptr, dtype, shape, stream) }.raw)
    }
    fn wrap(raw: Raw<'a, R>) -> Self {
        GpuViewMut {
            raw,
            _mut: PhantomData,
        }
    }
    /// Keeps `keep` alive until this view drops.
    pub fn keeping(mut self, keep: Keep<'a>) -> Self {
        self.raw.keep = Some(keep);
        self
    }
    /// A shorter-lived mutable view of the same memory.
    pub fn reborrow(&mut self) -> GpuViewMut<'_, R> {
        let mut raw = self.raw.clone();
        raw.keep = None; // self keeps it, and outlives the reborrow
        Self::wrap(raw)
    }
    /// A read view of the same memory.
    pub fn as_view(&self) -> GpuView<'_, R> {
        let mut raw = self.raw.clone();
        raw.keep = None;
        GpuView { raw }
    }
    /// The same elements with another shape of the same element count.
    pub fn reshape<'b>(self, shape: &'b [usize]) -> Result<GpuViewMut<'b, R>>
    where
        'a: 'b,
    {
        self.raw.reshape(shape).map(GpuViewMut::wrap)
    }
    /// Elements `[start, start + len)` as a 1-D mutable view (borrows `self`).
    pub fn narrow_mut(&mut self, start: usize, len: usize) -> Result<GpuViewMut<'_, R>> {
        let mut raw = self.raw.narrow(start, len)?;
        raw.keep = None;
        Ok(Self::wrap(raw))
    }
    /// The stream the memory is ordered on.
    pub fn stream(&self) -> RawStream {
        self.raw.stream
    }
    /// The device context.
    pub fn context(&self) -> &'a R {
        self.raw.dev
    }
}

macro_rules! view_tensor {
    ($t:ident) => {
        impl<R: GpuRuntime> Tensor for $t<'_, R> {
            fn dtype(&self) -> DType {
                self.raw.dtype
            }
            fn shape(&self) -> &[usize] {
                self.raw.shape()
            }
            fn device(&self) -> Device {
                Device::new(R::KIND, self.raw.dev.ordinal())
            }
            fn nbytes(&self) -> usize {
                self.raw.bytes
            }
        }
        impl<R: GpuRuntime> std::fmt::Debug for $t<'_, R> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.raw.fmt(stringify!($t), f)
            }
        }
    };
}
view_tensor!(GpuView);
view_tensor!(GpuViewMut);
