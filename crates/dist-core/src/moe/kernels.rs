//! The two row kernels MoE dispatch and combine run on a backend's views, beside the
//! communicator's ops: a gather of rows by index (tokens into send order, received tokens into
//! expert order) and a weighted sum of rows by index lists (expert outputs into one row per
//! received token, returned rows into one row per token).
//!
//! [`RowKernels`] is implemented here for the host views, which every host backend uses
//! ([`HostViewMut`] writing, [`HostView`] read); a device backend implements it for its own view
//! types (a gather kernel and a segmented weighted sum), and MoE over that backend compiles.

use half::{bf16, f16};

use crate::{DType, Element, Error, HostView, HostViewMut, ReduceOp, Result, Tensor};

/// For each output row, the source rows summed into it and, optionally, their weights: a
/// compressed sparse row list (`offsets[t]..offsets[t + 1]` index `rows` and `weights`).
///
/// Output rows with no source row are zero. Sums run in the accumulator type (f32 for f16 and
/// bf16, f64 for f64), in list order, and are rounded once, so a sum of unweighted rows in rank
/// order is bit for bit what a reduce-scatter computes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowSums {
    offsets: Vec<usize>,
    rows: Vec<u32>,
    weights: Option<Vec<f32>>,
    /// `1 + max(rows)`: the fewest rows a source must have.
    src_rows: usize,
}

impl RowSums {
    /// Checks and wraps a row list: `offsets` starts at 0, never decreases and ends at
    /// `rows.len()`; `weights`, when given, has one weight per entry of `rows`.
    pub fn new(offsets: Vec<usize>, rows: Vec<u32>, weights: Option<Vec<f32>>) -> Result<Self> {
        crate::ensure_arg!(
            offsets.first() == Some(&0)
                && offsets.windows(2).all(|w| w[0] <= w[1])
                && offsets.last() == Some(&rows.len()),
            "row sums: offsets must rise from 0 to {} ({} offsets given)",
            rows.len(),
            offsets.len()
        );
        if let Some(w) = &weights {
            crate::ensure_arg!(
                w.len() == rows.len(),
                "row sums: {} weights for {} rows",
                w.len(),
                rows.len()
            );
        }
        let src_rows = rows.iter().map(|&r| r as usize + 1).max().unwrap_or(0);
        Ok(RowSums {
            offsets,
            rows,
            weights,
            src_rows,
        })
    }
    /// Number of output rows.
    pub fn out_rows(&self) -> usize {
        self.offsets.len() - 1
    }
    /// The source rows of output row `t` and their weights.
    pub fn segment(&self, t: usize) -> (&[u32], Option<&[f32]>) {
        let r = self.offsets[t]..self.offsets[t + 1];
        (&self.rows[r.clone()], self.weights.as_ref().map(|w| &w[r]))
    }
    /// Every source row index, in order.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }
    /// The fewest rows a source must have.
    pub fn src_rows(&self) -> usize {
        self.src_rows
    }
}

/// Row kernels on a backend's views (see the module docs): `Self` is the written view, `Src` the
/// read one. Rows are along dim 0; the other dims must agree between source and output.
pub trait RowKernels<Src> {
    /// `self[i] = src[rows[i]]` for every row `i` of `self` (`rows.len()` must be its row count).
    fn gather_rows(&mut self, src: &Src, rows: &[u32]) -> Result<()>;
    /// `self[t] = Σ_j w_j · src[r_j]` over output row `t`'s segment of `sums` (`w_j = 1` without
    /// weights); float dtypes only.
    fn sum_rows(&mut self, src: &Src, sums: &RowSums) -> Result<()>;
}

/// Bytes of one row of `src` after checking `out` against it (same dtype and trailing dims).
fn row_bytes(op: &str, src: &impl Tensor, out: &impl Tensor) -> Result<usize> {
    let (s, o) = (src.shape(), out.shape());
    crate::ensure_arg!(
        !s.is_empty() && !o.is_empty() && s[1..] == o[1..] && src.dtype() == out.dtype(),
        "{op}: rows of {} {s:?} into {} {o:?} (dtype and dims past 0 must agree)",
        src.dtype(),
        out.dtype()
    );
    Ok(s[1..].iter().product::<usize>() * src.dtype().size())
}

impl<'b> RowKernels<HostView<'b>> for HostViewMut<'_> {
    fn gather_rows(&mut self, src: &HostView<'b>, rows: &[u32]) -> Result<()> {
        let rb = row_bytes("gather_rows", src, self)?;
        let n = src.shape()[0];
        crate::ensure_arg!(
            rows.len() == self.shape()[0],
            "gather_rows: {} indices for {} output rows",
            rows.len(),
            self.shape()[0]
        );
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(Error::invalid(format!(
                "gather_rows: row {bad} of a source with {n} rows"
            )));
        }
        if rb == 0 {
            return Ok(());
        }
        let inp = src.as_bytes();
        for (o, &r) in self.as_bytes_mut().chunks_exact_mut(rb).zip(rows) {
            let r = r as usize;
            o.copy_from_slice(&inp[r * rb..(r + 1) * rb]);
        }
        Ok(())
    }

    fn sum_rows(&mut self, src: &HostView<'b>, sums: &RowSums) -> Result<()> {
        let rb = row_bytes("sum_rows", src, self)?;
        crate::ensure_arg!(
            sums.out_rows() == self.shape()[0] && sums.src_rows() <= src.shape()[0],
            "sum_rows: a list of {} output rows over {} source rows, for {} rows from {}",
            sums.out_rows(),
            sums.src_rows(),
            self.shape()[0],
            src.shape()[0]
        );
        let width = rb / src.dtype().size().max(1);
        match src.dtype() {
            DType::F32 => sum_typed::<f32>(self.as_slice_mut()?, src.as_slice()?, width, sums),
            DType::F64 => sum_typed::<f64>(self.as_slice_mut()?, src.as_slice()?, width, sums),
            DType::F16 => sum_typed::<f16>(self.as_slice_mut()?, src.as_slice()?, width, sums),
            DType::BF16 => sum_typed::<bf16>(self.as_slice_mut()?, src.as_slice()?, width, sums),
            other => {
                return Err(Error::unsupported(format!(
                    "sum_rows: MoE outputs are summed in float types, not {other}"
                )))
            }
        }
        Ok(())
    }
}

/// A float element whose accumulator can be scaled by an `f32` router weight.
trait Weighted: Element {
    fn scale(a: Self::Acc, w: f32) -> Self::Acc;
}
impl Weighted for f32 {
    fn scale(a: f32, w: f32) -> f32 {
        a * w
    }
}
impl Weighted for f64 {
    fn scale(a: f64, w: f32) -> f64 {
        a * w as f64
    }
}
impl Weighted for f16 {
    fn scale(a: f32, w: f32) -> f32 {
        a * w
    }
}
impl Weighted for bf16 {
    fn scale(a: f32, w: f32) -> f32 {
        a * w
    }
}

fn sum_typed<T: Weighted>(out: &mut [T], src: &[T], width: usize, sums: &RowSums) {
    if width == 0 {
        return;
    }
    let mut acc = vec![T::Acc::default(); width];
    for (t, o) in out.chunks_exact_mut(width).enumerate() {
        let (rows, weights) = sums.segment(t);
        if rows.is_empty() {
            o.iter_mut()
                .for_each(|y| *y = T::from_acc(T::Acc::default()));
            continue;
        }
        if let ([r], None) = (rows, weights) {
            // One row, unweighted: widening and rounding back gives its value; copy it.
            let r = *r as usize;
            o.copy_from_slice(&src[r * width..(r + 1) * width]);
            continue;
        }
        for (j, &r) in rows.iter().enumerate() {
            let x = &src[r as usize * width..(r as usize + 1) * width];
            match (j, weights) {
                (0, None) => acc.iter_mut().zip(x).for_each(|(a, &v)| *a = v.to_acc()),
                (0, Some(w)) => acc
                    .iter_mut()
                    .zip(x)
                    .for_each(|(a, &v)| *a = T::scale(v.to_acc(), w[0])),
                (_, None) => acc
                    .iter_mut()
                    .zip(x)
                    .for_each(|(a, &v)| *a = T::combine(*a, v.to_acc(), ReduceOp::Sum)),
                (_, Some(w)) => acc.iter_mut().zip(x).for_each(|(a, &v)| {
                    *a = T::combine(*a, T::scale(v.to_acc(), w[j]), ReduceOp::Sum)
                }),
            }
        }
        o.iter_mut()
            .zip(&acc)
            .for_each(|(y, &a)| *y = T::from_acc(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    #[test]
    fn gather_and_sums_on_host_views() {
        let src = HostTensor::from_vec(&[3, 2], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut out = HostTensor::zeros(DType::F32, &[4, 2]);
        out.view_mut()
            .gather_rows(&src.view(), &[2, 0, 0, 1])
            .unwrap();
        assert_eq!(
            out.to_vec::<f32>().unwrap(),
            [5.0, 6.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0]
        );
        assert!(out
            .view_mut()
            .gather_rows(&src.view(), &[3, 0, 0, 0])
            .is_err());
        assert!(out.view_mut().gather_rows(&src.view(), &[0]).is_err());

        let sums =
            RowSums::new(vec![0, 2, 2, 3], vec![0, 2, 1], Some(vec![0.5, 2.0, -1.0])).unwrap();
        let mut out = HostTensor::random(DType::F32, &[3, 2], 1);
        out.view_mut().sum_rows(&src.view(), &sums).unwrap();
        assert_eq!(
            out.to_vec::<f32>().unwrap(),
            [10.5, 13.0, 0.0, 0.0, -3.0, -4.0]
        );
        let plain = RowSums::new(vec![0, 3], vec![0, 1, 2], None).unwrap();
        let mut one = HostTensor::zeros(DType::F32, &[1, 2]);
        one.view_mut().sum_rows(&src.view(), &plain).unwrap();
        assert_eq!(one.to_vec::<f32>().unwrap(), [9.0, 12.0]);
        // Wrong shapes, an index past the source, an integer dtype.
        assert!(one.view_mut().sum_rows(&src.view(), &sums).is_err());
        let far = RowSums::new(vec![0, 1], vec![3], None).unwrap();
        assert!(one.view_mut().sum_rows(&src.view(), &far).is_err());
        let ints = HostTensor::zeros(DType::I32, &[1, 2]);
        let mut io = HostTensor::zeros(DType::I32, &[1, 2]);
        assert!(io
            .view_mut()
            .sum_rows(
                &ints.view(),
                &RowSums::new(vec![0, 1], vec![0], None).unwrap()
            )
            .is_err());
        assert!(RowSums::new(vec![0, 2, 1], vec![0, 1], None).is_err());
        assert!(RowSums::new(vec![0, 1], vec![0], Some(vec![])).is_err());
    }

    #[test]
    fn half_sums_round_once() {
        // 1 + 2^-8 + 2^-8 is 1 + 2^-7 in f32, which bf16 holds; summing in bf16 would lose both.
        let v = [1.0f32, 1.0 / 256.0, 1.0 / 256.0];
        let src =
            HostTensor::from_vec(&[3, 1], v.iter().map(|&x| bf16::from_f32(x)).collect()).unwrap();
        let mut out = HostTensor::zeros(DType::BF16, &[1, 1]);
        let sums = RowSums::new(vec![0, 3], vec![0, 1, 2], None).unwrap();
        out.view_mut().sum_rows(&src.view(), &sums).unwrap();
        assert_eq!(out.to_vec::<bf16>().unwrap()[0].to_f32(), 1.0 + 1.0 / 128.0);
    }
}
