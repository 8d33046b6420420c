//! Reference results of every collective, computed on the host from all ranks' inputs.
//!
//! These are the oracles: every backend's tests compute the expected value with these functions
//! and compare. They share no code with any backend: no layout helper of [`crate::tensor`], no
//! reduction kernel of the crate root ([`crate::reduce_slices`], [`crate::reduce_bytes`]), no
//! [`crate::Element`] arithmetic. Every element is read from its bytes, and every result is
//! written element by element with plain index arithmetic, so a bug in the shared kernels shows
//! as a difference instead of being reproduced.
//!
//! Reductions follow the documented contract of the host kernels, computed another way: each
//! element is widened exactly (f64 for the float types, i128 for the integers), ranks are
//! combined in ascending rank order, and
//! - f16, bf16 and f32 accumulate in f32: each step is done in f64 and rounded to f32 (exactly
//!   the f32 operation, as f64 carries more than twice f32's precision), the half types are
//!   rounded once more when stored; f64 accumulates in f64;
//! - integers wrap at their width (sum and product modulo 2^bits); `Avg` is the wrapped sum
//!   divided by the world size, truncated toward zero;
//! - `Max`/`Min` keep the earlier rank's value on ties (the sign of a zero result is not part of
//!   the contract).
//!
//! Result layouts (vLLM's `GroupCoordinator`'s):
//! - `all_gather(x, dim)` = `cat([x_0, …, x_{n-1}], dim)`;
//! - `reduce_scatter(x, dim)` gives rank `r` the `r`-th of `n` equal chunks along `dim` of the reduction.
//!   vLLM's `movedim(0, dim)` picks the wrong axis for 3-D inputs with `dim >= 2`; here the chunk
//!   is always taken along `dim` itself;
//! - the `v` variants take per-rank lengths along `dim`;
//! - `gather(x, dst, dim)` gives `dst` the all-gather result and the others nothing.

use half::{bf16, f16};

use crate::{DType, Error, HostTensor, ReduceOp, Result};

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

/// `dim` as an index into a shape of `ndim` dims (negative counts from the end, as in torch).
fn axis(dim: isize, ndim: usize) -> Result<usize> {
    let n = ndim as isize;
    crate::ensure_arg!(
        dim >= -n && dim < n,
        "dim {dim} out of range for a {ndim}-d tensor"
    );
    Ok(if dim < 0 {
        (dim + n) as usize
    } else {
        dim as usize
    })
}

/// `(elements before dim, elements after dim)` of a row-major `shape`.
fn outer_inner(shape: &[usize], d: usize) -> (usize, usize) {
    let mut outer = 1;
    for s in &shape[..d] {
        outer *= s;
    }
    let mut inner = 1;
    for s in &shape[d + 1..] {
        inner *= s;
    }
    (outer, inner)
}

/// Element `i` of a buffer of float `dtype`, exactly as f64.
fn load_float(dtype: DType, b: &[u8], i: usize) -> f64 {
    match dtype {
        DType::F16 => f16::from_bits(u16::from_ne_bytes(elem(b, i))).to_f64(),
        DType::BF16 => bf16::from_bits(u16::from_ne_bytes(elem(b, i))).to_f64(),
        DType::F32 => f32::from_ne_bytes(elem(b, i)) as f64,
        DType::F64 => f64::from_ne_bytes(elem(b, i)),
        other => unreachable!("load_float of {other}"),
    }
}

/// `v` rounded to nearest (ties to even) in a binary format with `fraction` fraction bits,
/// smallest normal exponent `emin` and largest exponent `emax`: subnormals keep the quantum
/// `2^(emin - fraction)`, magnitudes that round to `2^(emax + 1)` or beyond become infinite.
///
/// Written out rather than taken from a conversion routine, so the oracle's rounding is its own
/// (the `half` crate's f64 conversions drop low bits before rounding, which is not correct
/// rounding of an f64).
fn round_to_format(v: f64, fraction: i32, emin: i32, emax: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let e = (((v.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(emin);
    let quantum = 2f64.powi(e - fraction);
    let r = (v / quantum).round_ties_even() * quantum;
    if r.abs() >= 2f64.powi(emax + 1) {
        f64::INFINITY.copysign(v)
    } else {
        r
    }
}

/// Writes `v` as element `i` of a buffer of float `dtype`, rounding to nearest even once.
fn store_float(dtype: DType, b: &mut [u8], i: usize, v: f64) {
    match dtype {
        // the rounded value is exact in the format, so the conversion only re-encodes it
        DType::F16 => {
            let r = round_to_format(v, 10, -14, 15);
            b[2 * i..2 * i + 2].copy_from_slice(&f16::from_f64(r).to_bits().to_ne_bytes())
        }
        DType::BF16 => {
            let r = round_to_format(v, 7, -126, 127);
            b[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f64(r).to_bits().to_ne_bytes())
        }
        // `as f32` rounds to nearest even
        DType::F32 => b[4 * i..4 * i + 4].copy_from_slice(&(v as f32).to_ne_bytes()),
        DType::F64 => b[8 * i..8 * i + 8].copy_from_slice(&v.to_ne_bytes()),
        other => unreachable!("store_float of {other}"),
    }
}

/// The `N` bytes of element `i` of a buffer.
fn elem<const N: usize>(b: &[u8], i: usize) -> [u8; N] {
    let mut w = [0u8; N];
    w.copy_from_slice(&b[N * i..N * (i + 1)]);
    w
}

/// Element `i` of a buffer of integer `dtype`, sign- or zero-extended to i128.
fn load_int(dtype: DType, b: &[u8], i: usize) -> i128 {
    match dtype {
        DType::I8 => i8::from_ne_bytes(elem(b, i)) as i128,
        DType::U8 => u8::from_ne_bytes(elem(b, i)) as i128,
        DType::I32 => i32::from_ne_bytes(elem(b, i)) as i128,
        DType::U32 => u32::from_ne_bytes(elem(b, i)) as i128,
        DType::I64 => i64::from_ne_bytes(elem(b, i)) as i128,
        DType::U64 => u64::from_ne_bytes(elem(b, i)) as i128,
        other => unreachable!("load_int of {other}"),
    }
}

/// `v` truncated to the width of integer `dtype` (two's complement) and sign- or zero-extended
/// back: the value the type holds.
fn wrap_int(dtype: DType, v: i128) -> i128 {
    match dtype {
        DType::I8 => v as i8 as i128,
        DType::U8 => v as u8 as i128,
        DType::I32 => v as i32 as i128,
        DType::U32 => v as u32 as i128,
        DType::I64 => v as i64 as i128,
        DType::U64 => v as u64 as i128,
        other => unreachable!("wrap_int of {other}"),
    }
}

/// Writes `v`, truncated to the width, as element `i` of a buffer of integer `dtype`.
fn store_int(dtype: DType, b: &mut [u8], i: usize, v: i128) {
    let es = dtype.size();
    let dst = &mut b[es * i..es * (i + 1)];
    match dtype {
        DType::I8 => dst.copy_from_slice(&(v as i8).to_ne_bytes()),
        DType::U8 => dst.copy_from_slice(&(v as u8).to_ne_bytes()),
        DType::I32 => dst.copy_from_slice(&(v as i32).to_ne_bytes()),
        DType::U32 => dst.copy_from_slice(&(v as u32).to_ne_bytes()),
        DType::I64 => dst.copy_from_slice(&(v as i64).to_ne_bytes()),
        DType::U64 => dst.copy_from_slice(&(v as u64).to_ne_bytes()),
        other => unreachable!("store_int of {other}"),
    }
}

/// The reduction of `inputs` (byte buffers of `n` elements of `dtype`, one per rank) with `op`,
/// element by element, ranks in ascending order.
fn reduce(dtype: DType, inputs: &[&[u8]], n: usize, op: ReduceOp) -> Result<Vec<u8>> {
    if !dtype.is_reducible() {
        return Err(Error::unsupported(format!(
            "host arithmetic on {dtype} (fp8 is moved as bytes only)"
        )));
    }
    let ranks = inputs.len();
    let mut out = vec![0u8; n * dtype.size()];
    if dtype.is_float() {
        // the accumulator's rounding: f32 for f16, bf16 and f32; none beyond f64 for f64
        let acc = |x: f64| {
            if dtype == DType::F64 {
                x
            } else {
                x as f32 as f64
            }
        };
        for i in 0..n {
            let mut a = load_float(dtype, inputs[0], i);
            for input in &inputs[1..] {
                let x = load_float(dtype, input, i);
                a = match op {
                    ReduceOp::Sum | ReduceOp::Avg => acc(a + x),
                    ReduceOp::Prod => acc(a * x),
                    ReduceOp::Max => {
                        if x > a {
                            x
                        } else {
                            a
                        }
                    }
                    ReduceOp::Min => {
                        if x < a {
                            x
                        } else {
                            a
                        }
                    }
                };
            }
            if op == ReduceOp::Avg {
                a = acc(a / ranks as f64);
            }
            store_float(dtype, &mut out, i, a);
        }
    } else {
        for i in 0..n {
            let mut a = load_int(dtype, inputs[0], i);
            for input in &inputs[1..] {
                let x = load_int(dtype, input, i);
                a = match op {
                    ReduceOp::Sum | ReduceOp::Avg => wrap_int(dtype, a.wrapping_add(x)),
                    ReduceOp::Prod => wrap_int(dtype, a.wrapping_mul(x)),
                    ReduceOp::Max => a.max(x),
                    ReduceOp::Min => a.min(x),
                };
            }
            if op == ReduceOp::Avg {
                // i128 division truncates toward zero, as the fixed-width types' division does
                a /= ranks as i128;
            }
            store_int(dtype, &mut out, i, a);
        }
    }
    Ok(out)
}

/// The all-reduce of `inputs` (one per rank, same dtype and shape) with `op`.
pub fn all_reduce(inputs: &[HostTensor], op: ReduceOp) -> Result<HostTensor> {
    let (dtype, shape) = check_same(inputs)?;
    let ins: Vec<&[u8]> = inputs.iter().map(|t| t.as_bytes()).collect();
    let n: usize = shape.iter().product();
    HostTensor::from_bytes(dtype, &shape, &reduce(dtype, &ins, n, op)?)
}

/// `cat(inputs, dim)`: the all-gather of same-shaped inputs.
pub fn all_gather(inputs: &[HostTensor], dim: isize) -> Result<HostTensor> {
    let (_, shape) = check_same(inputs)?;
    let d = axis(dim, shape.len())?;
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
    let ndim = first.shape().len();
    let d = axis(dim, ndim)?;
    for (r, t) in inputs.iter().enumerate() {
        let same_outside = t.shape().len() == ndim
            && (0..ndim).all(|k| k == d || t.shape()[k] == first.shape()[k]);
        crate::ensure_arg!(
            t.dtype() == first.dtype() && same_outside,
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
    let es = first.dtype().size();
    let (outer, inner) = outer_inner(first.shape(), d);
    let total: usize = sizes.iter().sum();
    let mut out = vec![0u8; outer * total * inner * es];
    // output elements in order: for each outer index, rank 0's rows along dim, then rank 1's…
    let mut i = 0;
    for o in 0..outer {
        for (r, t) in inputs.iter().enumerate() {
            let src = t.as_bytes();
            for p in 0..sizes[r] {
                for k in 0..inner {
                    let j = (o * sizes[r] + p) * inner + k;
                    out[i * es..(i + 1) * es].copy_from_slice(&src[j * es..(j + 1) * es]);
                    i += 1;
                }
            }
        }
    }
    let mut out_shape = first.shape().to_vec();
    out_shape[d] = total;
    HostTensor::from_bytes(first.dtype(), &out_shape, &out)
}

/// The reduce-scatter: element `r` of the result is rank `r`'s output.
pub fn reduce_scatter(inputs: &[HostTensor], dim: isize, op: ReduceOp) -> Result<Vec<HostTensor>> {
    let (_, shape) = check_same(inputs)?;
    let d = axis(dim, shape.len())?;
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
    let d = axis(dim, shape.len())?;
    crate::ensure_arg!(
        sizes.iter().sum::<usize>() == shape[d],
        "reduce_scatterv: sizes {sizes:?} do not sum to dim {d} of shape {shape:?}"
    );
    let reduced = all_reduce(inputs, op)?;
    let all = reduced.as_bytes();
    let es = dtype.size();
    let (outer, inner) = outer_inner(&shape, d);
    let mut start = 0;
    let mut pieces = Vec::with_capacity(sizes.len());
    for &len in sizes {
        let mut piece = Vec::with_capacity(outer * len * inner * es);
        for o in 0..outer {
            for p in start..start + len {
                for k in 0..inner {
                    let j = (o * shape[d] + p) * inner + k;
                    piece.extend_from_slice(&all[j * es..(j + 1) * es]);
                }
            }
        }
        let mut piece_shape = shape.clone();
        piece_shape[d] = len;
        pieces.push(HostTensor::from_bytes(dtype, &piece_shape, &piece)?);
        start += len;
    }
    Ok(pieces)
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

    /// Random elements of `dtype` as bytes: integers over their whole range; floats of random
    /// sign, mantissa and exponent (small enough that products of a few never overflow), with
    /// ±0 and subnormals among them. No NaN or infinity.
    fn random_bytes(rng: &mut rand::rngs::SmallRng, dtype: DType, n: usize) -> Vec<u8> {
        use rand::Rng;
        let mut out = vec![0u8; n * dtype.size()];
        for i in 0..n {
            if !dtype.is_float() {
                let w: u64 = rng.gen();
                let es = dtype.size();
                out[i * es..(i + 1) * es].copy_from_slice(&w.to_ne_bytes()[..es]);
                continue;
            }
            let v: f64 = match rng.gen_range(0..10) {
                0 => 0.0,
                1 => -0.0,
                2 => {
                    // the smallest magnitudes the type holds, subnormals included
                    let tiny = match dtype {
                        DType::F16 => 2f64.powi(-24),
                        DType::BF16 | DType::F32 => 2f64.powi(-149),
                        _ => 2f64.powi(-1074),
                    };
                    tiny * rng.gen_range(-8i32..=8) as f64
                }
                _ => {
                    let e = match dtype {
                        DType::F16 => rng.gen_range(-12..4),
                        _ => rng.gen_range(-40..4),
                    };
                    let m: f64 = rng.gen_range(1.0..2.0);
                    let s = if rng.gen() { -1.0 } else { 1.0 };
                    s * m * 2f64.powi(e)
                }
            };
            store_float(dtype, &mut out, i, v);
        }
        out
    }

    /// Equal elements, where a zero equals a zero of either sign.
    fn same_elements(dtype: DType, a: &[u8], b: &[u8]) -> Option<usize> {
        let n = a.len() / dtype.size();
        (0..n).find(|&i| {
            if dtype.is_float() {
                let (x, y) = (load_float(dtype, a, i), load_float(dtype, b, i));
                !(x.to_bits() == y.to_bits() || (x == 0.0 && y == 0.0))
            } else {
                load_int(dtype, a, i) != load_int(dtype, b, i)
            }
        })
    }

    #[test]
    fn host_kernel_matches_oracle() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut cases = 0;
        for dtype in DType::ALL.into_iter().filter(|d| d.is_reducible()) {
            for op in ReduceOp::ALL {
                for ranks in [1usize, 2, 3, 5] {
                    for n in [0usize, 1, 2, 3, 7, 31, 511, 512, 513, 1027] {
                        let ins: Vec<Vec<u8>> = (0..ranks)
                            .map(|_| random_bytes(&mut rng, dtype, n))
                            .collect();
                        let views: Vec<&[u8]> = ins.iter().map(Vec::as_slice).collect();
                        let want = reduce(dtype, &views, n, op).unwrap();
                        // the kernels need element-aligned buffers: copy into host tensors
                        let tensors: Vec<HostTensor> = ins
                            .iter()
                            .map(|b| HostTensor::from_bytes(dtype, &[n], b).unwrap())
                            .collect();
                        let tin: Vec<&[u8]> = tensors.iter().map(|t| t.as_bytes()).collect();
                        let mut got = HostTensor::zeros(dtype, &[n]);
                        crate::reduce_bytes(dtype, got.as_bytes_mut(), &tin, op).unwrap();
                        if let Some(i) = same_elements(dtype, &want, got.as_bytes()) {
                            let show = |b: &[u8]| {
                                if dtype.is_float() {
                                    format!("{:e}", load_float(dtype, b, i))
                                } else {
                                    load_int(dtype, b, i).to_string()
                                }
                            };
                            let inputs: Vec<String> = views.iter().map(|b| show(b)).collect();
                            panic!(
                                "reduce_bytes {op} {dtype}, {ranks} ranks, {n} elements: element \
                                 {i} is {}, the oracle says {} (inputs {inputs:?})",
                                show(got.as_bytes()),
                                show(&want)
                            );
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 10 * 5 * 4 * 10);
    }

    #[test]
    fn rounding_to_half_formats() {
        // every f16 and bf16 value is its own rounding; midpoints go to the even neighbour;
        // a value just above a midpoint goes up (the case a conversion that drops low bits misses)
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(round_to_format(h.to_f64(), 10, -14, 15), h.to_f64(), "{h}");
            }
            let b = bf16::from_bits(bits);
            if b.is_finite() {
                assert_eq!(round_to_format(b.to_f64(), 7, -126, 127), b.to_f64(), "{b}");
            }
        }
        let mid = 1.0 + 2f64.powi(-8);
        assert_eq!(round_to_format(mid, 7, -126, 127), 1.0);
        assert_eq!(
            round_to_format(mid + 2f64.powi(-40), 7, -126, 127),
            1.0 + 2f64.powi(-7)
        );
        assert_eq!(round_to_format(65520.0, 10, -14, 15), f64::INFINITY);
        assert_eq!(round_to_format(65519.0, 10, -14, 15), 65504.0);
        assert_eq!(round_to_format(-(2f64.powi(-25)), 10, -14, 15), 0.0);
        assert_eq!(
            round_to_format(3.0 * 2f64.powi(-25), 10, -14, 15),
            2f64.powi(-23)
        );
    }

    #[test]
    fn integer_reductions_wrap() {
        let a = t(&[3], vec![i32::MAX, i32::MIN, 1 << 20]);
        let b = t(&[3], vec![1, -1, 1 << 12]);
        let s = all_reduce(&[a.clone(), b.clone()], ReduceOp::Sum).unwrap();
        assert_eq!(
            s.as_slice::<i32>().unwrap(),
            &[i32::MIN, i32::MAX, (1 << 20) + (1 << 12)]
        );
        let p = all_reduce(&[a.clone(), b.clone()], ReduceOp::Prod).unwrap();
        assert_eq!(p.as_slice::<i32>().unwrap(), &[i32::MAX, i32::MIN, 0]);
        // the wrapped sum, divided
        let m = all_reduce(&[a, b], ReduceOp::Avg).unwrap();
        assert_eq!(
            m.as_slice::<i32>().unwrap(),
            &[i32::MIN / 2, i32::MAX / 2, 526336]
        );
        let u = HostTensor::from_vec(&[1], vec![u64::MAX]).unwrap();
        let s = all_reduce(&[u.clone(), u], ReduceOp::Sum).unwrap();
        assert_eq!(s.as_slice::<u64>().unwrap(), &[u64::MAX - 1]);
    }

    #[test]
    fn float_reductions_round_like_the_contract() {
        // f32 accumulates in f32: 1 + 2^-24 rounds back to 1 at every step
        let one = HostTensor::from_vec(&[1], vec![1.0f32]).unwrap();
        let eps = HostTensor::from_vec(&[1], vec![2f32.powi(-24)]).unwrap();
        let s = all_reduce(&[one, eps.clone(), eps], ReduceOp::Sum).unwrap();
        assert_eq!(s.as_slice::<f32>().unwrap(), &[1.0]);
        // f16 accumulates in f32 and rounds once: 2048 + 1 + 1 = 2050
        let a = HostTensor::from_vec(&[1], vec![f16::from_f32(2048.0)]).unwrap();
        let b = HostTensor::from_vec(&[1], vec![f16::from_f32(1.0)]).unwrap();
        let s = all_reduce(&[a, b.clone(), b], ReduceOp::Sum).unwrap();
        assert_eq!(s.as_slice::<f16>().unwrap(), &[f16::from_f32(2050.0)]);
        let x = HostTensor::from_vec(&[2], vec![-1.5f64, 3.0]).unwrap();
        let y = HostTensor::from_vec(&[2], vec![2.5f64, -4.0]).unwrap();
        let r = |op| {
            all_reduce(&[x.clone(), y.clone()], op)
                .unwrap()
                .to_vec::<f64>()
                .unwrap()
        };
        assert_eq!(r(ReduceOp::Max), vec![2.5, 3.0]);
        assert_eq!(r(ReduceOp::Min), vec![-1.5, -4.0]);
        assert_eq!(r(ReduceOp::Prod), vec![-3.75, -12.0]);
        assert_eq!(r(ReduceOp::Avg), vec![0.5, -0.5]);
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
