//! Host views lent by candle CPU tensors.
//!
//! A candle tensor is an `Arc<RwLock<Storage>>` plus a [`Layout`]. Inputs are read under the
//! storage's read lock ([`Tensor::storage_and_layout`]); outputs are written inside
//! [`Tensor::inplace_op1`], the one way candle lends its storage mutably, so a collective writes
//! the tensor's own `Vec` and nothing is copied. Several tensors of one call are locked together:
//! each distinct storage once (the first writer of a storage takes its write lock, nested inside
//! the others'), and tensors that share a storage — narrowed views of one buffer — are carved out
//! of it as disjoint byte ranges. Overlapping tensors of one call are an error, never a deadlock.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
use dist_core::{HostView, HostViewMut};

use crate::{dtype::dist_dtype, Error, Result};

/// The bytes of a `CpuStorage` (`$s`), through `$cast` (bytemuck's `cast_slice` or
/// `cast_slice_mut`) for the element types wider than a byte.
macro_rules! bytes_of_storage {
    ($s:expr, $cast:path) => {
        match $s {
            CpuStorage::U8(v) => v,
            CpuStorage::U32(v) => $cast(v),
            CpuStorage::I16(v) => $cast(v),
            CpuStorage::I32(v) => $cast(v),
            CpuStorage::I64(v) => $cast(v),
            CpuStorage::BF16(v) => $cast(v),
            CpuStorage::F16(v) => $cast(v),
            CpuStorage::F32(v) => $cast(v),
            CpuStorage::F64(v) => $cast(v),
            CpuStorage::F8E4M3(v) => $cast(v),
            CpuStorage::F6E2M3(v)
            | CpuStorage::F6E3M2(v)
            | CpuStorage::F4(v)
            | CpuStorage::F8E8M0(v) => v,
        }
    };
}

/// The elements of a CPU storage, as bytes.
pub(crate) fn storage_bytes(s: &CpuStorage) -> &[u8] {
    bytes_of_storage!(s, bytemuck::cast_slice)
}

/// The elements of a CPU storage, as bytes to write.
pub(crate) fn storage_bytes_mut(s: &mut CpuStorage) -> &mut [u8] {
    bytes_of_storage!(s, bytemuck::cast_slice_mut)
}

/// The error of a tensor (or an allocation) on `device` where the CPU is wanted.
fn not_on_cpu(op: &'static str, device: &candle_core::Device) -> Error {
    Error::Device {
        op,
        got: format!("{:?}", device.location()),
        want: "the CPU".into(),
    }
}

/// Checks that `t` is a CPU tensor.
pub(crate) fn ensure_cpu(op: &'static str, t: &Tensor) -> Result<()> {
    match t.device().is_cpu() {
        true => Ok(()),
        false => Err(not_on_cpu(op, t.device())),
    }
}

/// The byte range of a contiguous layout within its storage.
fn byte_range(layout: &Layout, elem: usize) -> Option<Range<usize>> {
    let (start, end) = layout.contiguous_offsets()?;
    Some(start * elem..end * elem)
}

/// Runs `f` inside candle's in-place op on one storage.
struct WithStorage<F>(RefCell<Option<F>>);

impl<F: FnOnce(&mut CpuStorage)> InplaceOp1 for WithStorage<F> {
    fn name(&self) -> &'static str {
        "dist-candle"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        match self.0.borrow_mut().take() {
            Some(f) => {
                f(storage);
                Ok(())
            }
            None => Err(candle_core::Error::Msg(
                "dist-candle: an in-place op ran twice".into(),
            )),
        }
    }
}

/// Takes the write lock of each tensor's storage, nested in order, and calls `f` with all of
/// their bytes.
fn with_storages_mut<'a, R>(
    tensors: &[&Tensor],
    held: Vec<&'a mut [u8]>,
    f: impl for<'x> FnOnce(Vec<&'x mut [u8]>) -> R,
) -> candle_core::Result<R> {
    let Some((first, rest)) = tensors.split_first() else {
        return Ok(f(held));
    };
    let mut out = None;
    let op = WithStorage(RefCell::new(Some(|s: &mut CpuStorage| {
        let held: Vec<&mut [u8]> = held
            .into_iter()
            .chain(std::iter::once(storage_bytes_mut(s)))
            .collect();
        out = Some(with_storages_mut(rest, held, f));
    })));
    first.inplace_op1(&op)?;
    drop(op);
    out.unwrap_or_else(|| {
        Err(candle_core::Error::Msg(
            "dist-candle: the storage was not lent".into(),
        ))
    })
}

/// One tensor of a call: which storage it lives in and where.
struct Place {
    dtype: dist_core::DType,
    /// Index into the call's distinct storages; `None` for a tensor with no elements.
    storage: Option<usize>,
    bytes: Range<usize>,
}

/// One distinct storage of a call.
struct Store {
    addr: usize,
    len: usize,
    /// A tensor of the call that lives in it, through which it is locked.
    via: usize,
    written: bool,
}

/// Lends host views of `reads` and mutable host views of `writes` (CPU tensors) to `f`, in order.
///
/// A non-contiguous input is made contiguous once (a copy); an output must be contiguous, since
/// the op writes its storage. Tensors of one call may share a storage as long as they do not
/// overlap where one of them is written.
pub(crate) fn lend<R>(
    op: &'static str,
    reads: &[&Tensor],
    writes: &[&Tensor],
    f: impl for<'v> FnOnce(Vec<HostView<'v>>, Vec<HostViewMut<'v>>) -> dist_core::Result<R>,
) -> Result<R> {
    // Owned handles (Arc clones) of every tensor, inputs made contiguous where they are not.
    let mut ts: Vec<Tensor> = Vec::with_capacity(reads.len() + writes.len());
    for t in reads {
        ensure_cpu(op, t)?;
        // `t` itself (an Arc clone) when contiguous, else one copy.
        ts.push(t.contiguous()?);
    }
    for t in writes {
        ensure_cpu(op, t)?;
        if !t.is_contiguous() {
            return Err(Error::Layout {
                op,
                detail: format!(
                    "the output {:?} (strides {:?}) is not contiguous; the op writes the tensor's storage, so pass a contiguous one",
                    t.dims(),
                    t.stride()
                ),
            });
        }
        ts.push((*t).clone());
    }
    let n_reads = reads.len();

    // Where each tensor lives; one entry per distinct storage.
    let mut places = Vec::with_capacity(ts.len());
    let mut stores: Vec<Store> = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        let dtype = dist_dtype(op, t.dtype())?;
        let written = i >= n_reads;
        if t.elem_count() == 0 {
            places.push(Place {
                dtype,
                storage: None,
                bytes: 0..0,
            });
            continue;
        }
        let bytes = byte_range(t.layout(), dtype.size()).ok_or_else(|| Error::Layout {
            op,
            detail: format!("tensor {:?} is not contiguous", t.dims()),
        })?;
        let (addr, len) = {
            let (g, _) = t.storage_and_layout();
            match &*g {
                Storage::Cpu(c) => {
                    let b = storage_bytes(c);
                    (b.as_ptr() as usize, b.len())
                }
                _ => return Err(not_on_cpu(op, t.device())),
            }
        };
        if bytes.end > len {
            return Err(Error::Layout {
                op,
                detail: format!(
                    "tensor {:?} reaches byte {} of a storage of {len}",
                    t.dims(),
                    bytes.end
                ),
            });
        }
        // Two live allocations never share an address: equal addresses are one storage.
        let s = match stores.iter().position(|s| s.addr == addr && s.len == len) {
            Some(s) => {
                stores[s].written |= written;
                s
            }
            None => {
                stores.push(Store {
                    addr,
                    len,
                    via: i,
                    written,
                });
                stores.len() - 1
            }
        };
        places.push(Place {
            dtype,
            storage: Some(s),
            bytes,
        });
    }

    // Within a written storage, the call's tensors must be disjoint.
    for (s, st) in stores.iter().enumerate() {
        if !st.written {
            continue;
        }
        let mut ranges: Vec<(Range<usize>, usize)> = places
            .iter()
            .enumerate()
            .filter(|(_, p)| p.storage == Some(s))
            .map(|(i, p)| (p.bytes.clone(), i))
            .collect();
        ranges.sort_by_key(|(r, _)| r.start);
        for w in ranges.windows(2) {
            if w[0].0.end > w[1].0.start {
                let name = |i: usize| match i < n_reads {
                    true => format!("input {i}"),
                    false => format!("output {}", i - n_reads),
                };
                return Err(Error::Layout {
                    op,
                    detail: format!(
                        "{} {:?} and {} {:?} overlap in memory, and the op writes one of them",
                        name(w[0].1),
                        ts[w[0].1].dims(),
                        name(w[1].1),
                        ts[w[1].1].dims()
                    ),
                });
            }
        }
    }

    // Read locks of the storages only read, then the write locks (nested) of the others.
    let read_only: Vec<usize> = (0..stores.len()).filter(|&s| !stores[s].written).collect();
    let guards: Vec<_> = read_only
        .iter()
        .map(|&s| ts[stores[s].via].storage_and_layout().0)
        .collect();
    let mut read_bytes: Vec<Option<&[u8]>> = vec![None; stores.len()];
    for (&s, g) in read_only.iter().zip(&guards) {
        match &**g {
            Storage::Cpu(c) => read_bytes[s] = Some(storage_bytes(c)),
            _ => unreachable!("checked to be CPU storage above"),
        }
    }
    let written: Vec<usize> = (0..stores.len()).filter(|&s| stores[s].written).collect();
    let lock: Vec<&Tensor> = written.iter().map(|&s| &ts[stores[s].via]).collect();
    let ts = &ts;
    let places = &places;
    let r = with_storages_mut(&lock, Vec::new(), move |bufs: Vec<&mut [u8]>| {
        let mut slices: Vec<Option<&[u8]>> = vec![None; places.len()];
        let mut slices_mut: Vec<Option<&mut [u8]>> = (0..places.len()).map(|_| None).collect();
        for (i, p) in places.iter().enumerate() {
            if let Some(s) = p.storage {
                if let Some(b) = read_bytes[s] {
                    slices[i] = Some(&b[p.bytes.clone()]);
                }
            }
        }
        // Carve each written storage into its tensors' disjoint ranges.
        for (buf, &s) in bufs.into_iter().zip(&written) {
            let mut mine: Vec<usize> = (0..places.len())
                .filter(|&i| places[i].storage == Some(s))
                .collect();
            mine.sort_by_key(|&i| places[i].bytes.start);
            let mut rest = buf;
            let mut at = 0;
            for i in mine {
                let r = places[i].bytes.clone();
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
                let (piece, tail) = tail.split_at_mut(r.len());
                rest = tail;
                at = r.end;
                if i < n_reads {
                    slices[i] = Some(&*piece);
                } else {
                    slices_mut[i] = Some(piece);
                }
            }
        }
        let mut rv = Vec::with_capacity(n_reads);
        let mut wv = Vec::with_capacity(places.len() - n_reads);
        for (i, p) in places.iter().enumerate() {
            let shape = ts[i].dims();
            if i < n_reads {
                let b = slices[i].take().unwrap_or(&[]);
                rv.push(HostView::from_bytes(p.dtype, shape, b)?);
            } else {
                let b = slices_mut[i].take().unwrap_or(&mut []);
                wv.push(HostViewMut::from_bytes(p.dtype, shape, b)?);
            }
        }
        f(rv, wv)
    });
    drop(guards);
    Ok(r??)
}

/// A new CPU tensor of `dtype` and `shape` whose storage is a fresh zeroed `Vec` (calloc'd, so
/// a large one costs no pass over its memory before the collective writes it; candle's own
/// `Tensor::zeros` fills half-precision types element by element).
pub(crate) fn alloc(
    op: &'static str,
    dtype: candle_core::DType,
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor> {
    use bytemuck::allocation::cast_vec;
    use candle_core::DType as C;
    if !device.is_cpu() {
        return Err(not_on_cpu(op, device));
    }
    let d = dist_dtype(op, dtype)?;
    let n = dist_core::tensor::checked_nbytes(d, shape)? / d.size();
    let storage = match dtype {
        C::U8 => CpuStorage::U8(vec![0; n]),
        C::U32 => CpuStorage::U32(vec![0; n]),
        C::I32 => CpuStorage::I32(vec![0; n]),
        C::I64 => CpuStorage::I64(vec![0; n]),
        C::F32 => CpuStorage::F32(vec![0.0; n]),
        C::F64 => CpuStorage::F64(vec![0.0; n]),
        C::F16 => CpuStorage::F16(cast_vec(vec![0u16; n])),
        C::BF16 => CpuStorage::BF16(cast_vec(vec![0u16; n])),
        C::F8E4M3 => CpuStorage::F8E4M3(cast_vec(vec![0u8; n])),
        other => unreachable!("{other:?} has a dist dtype ({d}) but no allocation above"),
    };
    Ok(Tensor::from_storage(
        Storage::Cpu(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// What a call lent: the inputs' bytes and the outputs' shapes.
    type Lent = (Vec<Vec<u8>>, Vec<Vec<usize>>);

    fn noop(reads: &[&Tensor], writes: &[&Tensor]) -> Result<Lent> {
        lend("test", reads, writes, |r, w| {
            Ok((
                r.iter().map(|v| v.as_bytes().to_vec()).collect(),
                w.iter().map(|v| v.shape().to_vec()).collect(),
            ))
        })
    }

    #[test]
    fn views_see_the_tensors_elements_and_write_their_storage() {
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let out = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        lend(
            "test",
            &[&a.narrow(0, 1, 2).unwrap()],
            &[&out],
            |r, mut w| {
                let src = r[0].as_slice::<f32>()?;
                assert_eq!(src, &[4., 5., 6., 7., 8., 9., 10., 11.]);
                w[0].as_slice_mut::<f32>()?.copy_from_slice(src);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            vec![vec![4., 5., 6., 7.], vec![8., 9., 10., 11.]]
        );
        // A clone shares the storage: it sees the write too (candle's in-place semantics).
        let c = out.clone();
        lend("test", &[], &[&out], |_, mut w| {
            w[0].as_slice_mut::<f32>()?[0] = -1.0;
            Ok(())
        })
        .unwrap();
        assert_eq!(c.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], -1.0);
    }

    #[test]
    fn non_contiguous_inputs_are_copied_once_outputs_refused() {
        let a = Tensor::arange(0u32, 6, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let t = a.t().unwrap();
        let (r, _) = noop(&[&t], &[]).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, u32>(&r[0]), &[0, 3, 1, 4, 2, 5]);
        let e = noop(&[], &[&t]).unwrap_err();
        assert!(matches!(e, Error::Layout { .. }), "{e}");
        assert!(e.to_string().contains("not contiguous"), "{e}");
    }

    #[test]
    fn disjoint_views_of_one_storage_are_carved_overlaps_refused() {
        let buf = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let lo = buf.narrow(0, 0, 4).unwrap();
        let hi = buf.narrow(0, 4, 4).unwrap();
        let src = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        // Read the low half, write the high half: one write lock serves both.
        lend("test", &[&lo, &src], &[&hi], |r, mut w| {
            assert_eq!(r[0].as_slice::<f32>()?, &[0.0; 4]);
            w[0].as_slice_mut::<f32>()?
                .copy_from_slice(r[1].as_slice::<f32>()?);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            buf.to_vec1::<f32>().unwrap(),
            &[0., 0., 0., 0., 1., 1., 1., 1.]
        );
        // Two writes of disjoint halves.
        lend("test", &[], &[&hi, &lo], |_, mut w| {
            w[0].as_slice_mut::<f32>()?.fill(2.0);
            w[1].as_slice_mut::<f32>()?.fill(3.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            buf.to_vec1::<f32>().unwrap(),
            &[3., 3., 3., 3., 2., 2., 2., 2.]
        );
        // Overlaps where one is written: an error, not a deadlock.
        let mid = buf.narrow(0, 2, 4).unwrap();
        for (r, w) in [
            (vec![&mid], vec![&hi]),
            (vec![], vec![&lo, &mid]),
            (vec![&buf], vec![&buf]),
        ] {
            let e = noop(&r, &w).unwrap_err();
            assert!(e.to_string().contains("overlap"), "{e}");
        }
        // Reads may overlap each other.
        noop(&[&buf, &mid, &buf], &[&src]).unwrap();
    }

    #[test]
    fn dtypes_and_empty_tensors() {
        let e = noop(&[&Tensor::zeros(3, DType::I16, &Device::Cpu).unwrap()], &[]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DType {
                    dtype: DType::I16,
                    ..
                }
            ),
            "{e}"
        );
        let empty = Tensor::zeros((0, 3), DType::BF16, &Device::Cpu).unwrap();
        let (r, w) = noop(&[&empty], &[&empty]).unwrap();
        assert!(r[0].is_empty());
        assert_eq!(w[0], vec![0, 3]);
    }
}
