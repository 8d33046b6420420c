//! Reference results of every collective, computed on the host from all ranks' inputs.
//!
//! These are the oracles: every backend's tests compute the expected value with these functions
//! and compare. They are written for clarity, on the shared layout helpers of [`crate::tensor`]
//! and the shared reduction kernel [`crate::reduce_slices`] (so reductions are bit-identical to
//! what a backend that combines ranks in ascending order computes).
//!
//! Result layouts (vLLM's, SPEC §1.3):
//! - `all_gather(x, dim)` = `cat([x_0, …, x_{n-1}], dim)`;
//! - `reduce_scatter(x, dim)` gives rank `r` the `r`-th of `n` equal chunks along `dim` of the reduction.
//!   vLLM's `movedim(0, dim)` picks the wrong axis for 3-D inputs with `dim >= 2`; here the chunk
//!   is always taken along `dim` itself;
//! - the `v` variants take per-rank lengths along `dim`;
//! - `gather(x, dst, dim)` gives `dst` the all-gather result and the others nothing.

use crate::tensor::{concat_along, normalize_dim, split_along, with_dim};
use crate::{reduce_bytes, DType, Error, HostTensor, ReduceOp, Result};

fn check_same(inputs: &[HostTensor]) -> Result<(DType, Vec<usize>)> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::invalid("a collective needs at least one rank's input"))?;
    for (r, t) in inputs.iter().enumerate() {
        crate::ensure_arg!(
            t.dtype() == first.dtype() && t.shape() == first.shape(),
            "rank {r} has {} {:?}, rank 0 has {} {:?}",
            t.dtype(),
            t.shape(),
            first.dtype(),
            first.shape()
        );
    }
    Ok((first.dtype(), first.shape().to_vec()))
}

/// The all-reduce of `inputs` (one per rank, same dtype and shape) with `op`.
pub fn all_reduce(inputs: &[HostTensor], op: ReduceOp) -> Result<HostTensor> {
    let (dtype, shape) = check_same(inputs)?;
    let mut out = HostTensor::zeros(dtype, &shape);
    let ins: Vec<&[u8]> = inputs.iter().map(|t| t.as_bytes()).collect();
    reduce_bytes(dtype, out.as_bytes_mut(), &ins, op)?;
    Ok(out)
}

/// `cat(inputs, dim)`: the all-gather of same-shaped inputs.
pub fn all_gather(inputs: &[HostTensor], dim: isize) -> Result<HostTensor> {
    let (_, shape) = check_same(inputs)?;
    let d = normalize_dim(dim, shape.len())?;
    let sizes = vec![shape[d]; inputs.len()];
    all_gatherv(inputs, dim, &sizes)
}

/// `cat(inputs, dim)` where rank `r`'s input has `sizes[r]` along `dim` and the other dims agree.
pub fn all_gatherv(inputs: &[HostTensor], dim: isize, sizes: &[usize]) -> Result<HostTensor> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::invalid("all_gatherv needs at least one rank's input"))?;
    crate::ensure_arg!(
        sizes.len() == inputs.len(),
        "all_gatherv: {} sizes for {} ranks",
        sizes.len(),
        inputs.len()
    );
    let d = normalize_dim(dim, first.shape().len())?;
    for (r, t) in inputs.iter().enumerate() {
        crate::ensure_arg!(
            t.dtype() == first.dtype()
                && t.shape().len() == first.shape().len()
                && with_dim(t.shape(), d, 0) == with_dim(first.shape(), d, 0),
            "all_gatherv: rank {r}'s shape {:?} differs from rank 0's {:?} outside dim {d}",
            t.shape(),
            first.shape()
        );
        crate::ensure_arg!(
            t.shape()[d] == sizes[r],
            "all_gatherv: rank {r} has {} rows along dim {d}, sizes say {}",
            t.shape()[d],
            sizes[r]
        );
    }
    let parts: Vec<&[u8]> = inputs.iter().map(|t| t.as_bytes()).collect();
    let out_shape = with_dim(first.shape(), d, sizes.iter().sum());
    let bytes = concat_along(&parts, first.shape(), d, sizes, first.dtype().size())?;
    HostTensor::from_bytes(first.dtype(), &out_shape, &bytes)
}

/// The reduce-scatter: element `r` of the result is rank `r`'s output.
pub fn reduce_scatter(inputs: &[HostTensor], dim: isize, op: ReduceOp) -> Result<Vec<HostTensor>> {
    let (_, shape) = check_same(inputs)?;
    let d = normalize_dim(dim, shape.len())?;
    let n = inputs.len();
    crate::ensure_arg!(
        shape[d] % n == 0,
        "reduce_scatter: dim {d} of shape {shape:?} is not divisible by world size {n}"
    );
    reduce_scatterv(inputs, dim, &vec![shape[d] / n; n], op)
}

/// The reduce-scatter with per-rank lengths `sizes` along `dim` (summing to the input's length there).
pub fn reduce_scatterv(
    inputs: &[HostTensor],
    dim: isize,
    sizes: &[usize],
    op: ReduceOp,
) -> Result<Vec<HostTensor>> {
    let (dtype, shape) = check_same(inputs)?;
    crate::ensure_arg!(
        sizes.len() == inputs.len(),
        "reduce_scatterv: {} sizes for {} ranks",
        sizes.len(),
        inputs.len()
    );
    let d = normalize_dim(dim, shape.len())?;
    let reduced = all_reduce(inputs, op)?;
    let pieces = split_along(reduced.as_bytes(), &shape, d, sizes, dtype.size())?;
    pieces
        .iter()
        .zip(sizes)
        .map(|(b, l)| HostTensor::from_bytes(dtype, &with_dim(&shape, d, *l), b))
        .collect()
}

/// The gather to `dst`: `dst` gets `Some(cat(inputs, dim))`, every other rank `None`.
pub fn gather(inputs: &[HostTensor], dst: usize, dim: isize) -> Result<Vec<Option<HostTensor>>> {
    crate::ensure_arg!(
        dst < inputs.len(),
        "gather: dst {dst} out of range for {} ranks",
        inputs.len()
    );
    let all = all_gather(inputs, dim)?;
    Ok((0..inputs.len())
        .map(|r| (r == dst).then(|| all.clone()))
        .collect())
}

/// The broadcast from `src`: every rank ends with `inputs[src]`.
pub fn broadcast(inputs: &[HostTensor], src: usize) -> Result<HostTensor> {
    check_same(inputs)?;
    crate::ensure_arg!(
        src < inputs.len(),
        "broadcast: src {src} out of range for {} ranks",
        inputs.len()
    );
    Ok(inputs[src].clone())
}

/// The all-to-all-v: `counts[s][d]` dim-0 rows of rank `s`'s input go to rank `d`, taken in
/// order from `s`'s rows; element `d` of the result is rank `d`'s output, the rows it received
/// from every rank in rank order. Computed row by row, independently of any backend.
pub fn all_to_all_v(inputs: &[HostTensor], counts: &[Vec<usize>]) -> Result<Vec<HostTensor>> {
    let n = inputs.len();
    let first = inputs
        .first()
        .ok_or_else(|| Error::invalid("all_to_all_v needs at least one rank's input"))?;
    crate::ensure_arg!(
        !first.shape().is_empty(),
        "all_to_all_v: a 0-d tensor has no rows"
    );
    crate::ensure_arg!(
        counts.len() == n && counts.iter().all(|c| c.len() == n),
        "all_to_all_v: counts must be {n} x {n}"
    );
    let rest = &first.shape()[1..];
    let row = rest.iter().product::<usize>() * first.dtype().size();
    for (s, t) in inputs.iter().enumerate() {
        crate::ensure_arg!(
            t.dtype() == first.dtype()
                && &t.shape()[1..] == rest
                && t.shape()[0] == counts[s].iter().sum::<usize>(),
            "all_to_all_v: rank {s}'s input {} {:?} does not match its counts {:?}",
            t.dtype(),
            t.shape(),
            counts[s]
        );
    }
    (0..n)
        .map(|d| {
            let mut bytes = Vec::new();
            for s in 0..n {
                let start: usize = counts[s][..d].iter().sum();
                for r in start..start + counts[s][d] {
                    bytes.extend_from_slice(&inputs[s].as_bytes()[r * row..(r + 1) * row]);
                }
            }
            let rows: usize = (0..n).map(|s| counts[s][d]).sum();
            let mut shape = vec![rows];
            shape.extend_from_slice(rest);
            HostTensor::from_bytes(first.dtype(), &shape, &bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: Vec<i32>) -> HostTensor {
        HostTensor::from_vec(shape, v).unwrap()
    }

    #[test]
    fn all_gather_1d() {
        let a = t(&[2], vec![1, 2]);
        let b = t(&[2], vec![3, 4]);
        let g = all_gather(&[a, b], 0).unwrap();
        assert_eq!(g.shape(), &[4]);
        assert_eq!(g.as_slice::<i32>().unwrap(), &[1, 2, 3, 4]);
    }

    #[test]
    fn all_gather_2d_each_dim() {
        // a = [[1,2],[3,4]], b = [[5,6],[7,8]]
        let a = t(&[2, 2], vec![1, 2, 3, 4]);
        let b = t(&[2, 2], vec![5, 6, 7, 8]);
        let g0 = all_gather(&[a.clone(), b.clone()], 0).unwrap();
        assert_eq!(g0.shape(), &[4, 2]);
        assert_eq!(g0.as_slice::<i32>().unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        let g1 = all_gather(&[a.clone(), b.clone()], 1).unwrap();
        assert_eq!(g1.shape(), &[2, 4]);
        assert_eq!(g1.as_slice::<i32>().unwrap(), &[1, 2, 5, 6, 3, 4, 7, 8]);
        let gm1 = all_gather(&[a, b], -1).unwrap();
        assert_eq!(gm1, g1);
    }

    #[test]
    fn all_gather_3d_middle_dim() {
        // shape [2,1,2]: a = [[[1,2]],[[3,4]]], b = [[[5,6]],[[7,8]]]; cat dim 1 -> [2,2,2]
        let a = t(&[2, 1, 2], vec![1, 2, 3, 4]);
        let b = t(&[2, 1, 2], vec![5, 6, 7, 8]);
        let g = all_gather(&[a, b], 1).unwrap();
        assert_eq!(g.shape(), &[2, 2, 2]);
        assert_eq!(g.as_slice::<i32>().unwrap(), &[1, 2, 5, 6, 3, 4, 7, 8]);
    }

    #[test]
    fn all_gather_4d_last_dim() {
        let a = t(&[1, 1, 2, 1], vec![1, 2]);
        let b = t(&[1, 1, 2, 1], vec![3, 4]);
        let c = t(&[1, 1, 2, 1], vec![5, 6]);
        let g = all_gather(&[a, b, c], 3).unwrap();
        assert_eq!(g.shape(), &[1, 1, 2, 3]);
        assert_eq!(g.as_slice::<i32>().unwrap(), &[1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn reduce_scatter_each_dim_of_3d() {
        // Two ranks, shape [2,2,2]; rank0 = 0..8, rank1 = 10*(0..8). Sum = 11*(0..8).
        let a = t(&[2, 2, 2], (0..8).collect());
        let b = t(&[2, 2, 2], (0..8).map(|x| 10 * x).collect());
        let s = |i: i32| 11 * i;
        // dim 0: rank 0 gets rows [0], rank 1 gets rows [1].
        let r = reduce_scatter(&[a.clone(), b.clone()], 0, ReduceOp::Sum).unwrap();
        assert_eq!(r[0].shape(), &[1, 2, 2]);
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[s(0), s(1), s(2), s(3)]);
        assert_eq!(r[1].as_slice::<i32>().unwrap(), &[s(4), s(5), s(6), s(7)]);
        // dim 1
        let r = reduce_scatter(&[a.clone(), b.clone()], 1, ReduceOp::Sum).unwrap();
        assert_eq!(r[0].shape(), &[2, 1, 2]);
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[s(0), s(1), s(4), s(5)]);
        assert_eq!(r[1].as_slice::<i32>().unwrap(), &[s(2), s(3), s(6), s(7)]);
        // dim 2: the case vLLM gets wrong; the chunk is along the last axis.
        let r = reduce_scatter(&[a.clone(), b.clone()], 2, ReduceOp::Sum).unwrap();
        assert_eq!(r[0].shape(), &[2, 2, 1]);
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[s(0), s(2), s(4), s(6)]);
        assert_eq!(r[1].as_slice::<i32>().unwrap(), &[s(1), s(3), s(5), s(7)]);
        assert!(reduce_scatter(&[a.clone(), b.clone(), a], 0, ReduceOp::Sum).is_err());
    }

    #[test]
    fn reduce_scatter_4d_dim3_and_gather() {
        let a = t(&[1, 1, 1, 4], vec![1, 2, 3, 4]);
        let b = t(&[1, 1, 1, 4], vec![5, 6, 7, 8]);
        let r = reduce_scatter(&[a.clone(), b.clone()], -1, ReduceOp::Max).unwrap();
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[5, 6]);
        assert_eq!(r[1].as_slice::<i32>().unwrap(), &[7, 8]);
        let g = gather(&[a, b], 1, 3).unwrap();
        assert!(g[0].is_none());
        assert_eq!(
            g[1].as_ref().unwrap().as_slice::<i32>().unwrap(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn v_variants() {
        let a = t(&[1, 2], vec![1, 2]);
        let b = t(&[3, 2], vec![3, 4, 5, 6, 7, 8]);
        let g = all_gatherv(&[a.clone(), b.clone()], 0, &[1, 3]).unwrap();
        assert_eq!(g.shape(), &[4, 2]);
        assert_eq!(g.as_slice::<i32>().unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(all_gatherv(&[a, b], 0, &[1, 2]).is_err());
        let x = t(&[3, 1], vec![1, 2, 3]);
        let y = t(&[3, 1], vec![10, 20, 30]);
        let r = reduce_scatterv(&[x, y], 0, &[2, 1], ReduceOp::Sum).unwrap();
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[11, 22]);
        assert_eq!(r[1].as_slice::<i32>().unwrap(), &[33]);
        // zero-length pieces
        let z = t(&[0, 2], vec![]);
        let g = all_gatherv(&[z.clone(), z], 0, &[0, 0]).unwrap();
        assert_eq!(g.shape(), &[0, 2]);
    }

    #[test]
    fn reduce_and_broadcast() {
        let a = t(&[2], vec![1, 2]);
        let b = t(&[2], vec![3, 5]);
        assert_eq!(
            all_reduce(&[a.clone(), b.clone()], ReduceOp::Sum)
                .unwrap()
                .as_slice::<i32>()
                .unwrap(),
            &[4, 7]
        );
        assert_eq!(broadcast(&[a, b.clone()], 1).unwrap(), b);
    }
}
