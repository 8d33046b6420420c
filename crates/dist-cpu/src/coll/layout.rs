//! Where one rank's part of a tensor cut along a dim lies, and copies between the part's own
//! row-major bytes and the whole tensor. This is the re-layout of every all-gather (parts into
//! the output) and reduce-scatter (the output's part out of the input) done in place, chunk by
//! chunk, with no intermediate copy (the same result as `dist_core::tensor::concat_along` and
//! `split_along`, which the tests compare against).

use dist_core::tensor::split_dims;

/// Rank `r`'s part of a tensor of shape `shape` (the whole) cut along `dim` into lengths
/// `sizes`: `outer` rows of `row` bytes each, the part holding `w` bytes at offset `off` of every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PartMap {
    outer: usize,
    row: usize,
    off: usize,
    w: usize,
}

impl PartMap {
    /// The part of rank `r`; `shape[dim]` must equal the sum of `sizes` (checked by callers).
    pub(crate) fn new(shape: &[usize], dim: usize, sizes: &[usize], r: usize, elem: usize) -> Self {
        let (outer, len, inner) = split_dims(shape, dim);
        debug_assert_eq!(len, sizes.iter().sum::<usize>());
        let off: usize = sizes[..r].iter().sum();
        PartMap {
            outer,
            row: len * inner * elem,
            off: off * inner * elem,
            w: sizes[r] * inner * elem,
        }
    }

    /// Bytes of the part.
    pub(crate) fn len(&self) -> usize {
        self.outer * self.w
    }

    /// Calls `f(part_offset, whole_offset, n)` for each contiguous run of bytes
    /// `[start, start + len)` of the part.
    fn runs(&self, start: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        if len == 0 || self.w == 0 {
            return;
        }
        if self.w == self.row {
            f(start, start, len);
            return;
        }
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let o = pos / self.w;
            let within = pos % self.w;
            let n = (self.w - within).min(end - pos);
            f(pos - start, o * self.row + self.off + within, n);
            pos += n;
        }
    }

    /// Writes `data`, which is bytes `[start, start + data.len())` of the part, into `whole`.
    pub(crate) fn scatter(&self, whole: &mut [u8], start: usize, data: &[u8]) {
        self.runs(start, data.len(), |p, w, n| {
            whole[w..w + n].copy_from_slice(&data[p..p + n]);
        });
    }

    /// Reads bytes `[start, start + out.len())` of the part out of `whole`.
    pub(crate) fn gather(&self, whole: &[u8], start: usize, out: &mut [u8]) {
        self.runs(start, out.len(), |p, w, n| {
            out[p..p + n].copy_from_slice(&whole[w..w + n]);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::tensor::{concat_along, split_along};
    use dist_core::{DType, HostTensor};

    #[test]
    fn matches_concat_and_split_in_any_chunking() {
        let shape_full = [3usize, 7, 2];
        let sizes = [2usize, 0, 4, 1];
        for dim in 0..3 {
            let mut shape = shape_full;
            shape[dim] = sizes.iter().sum();
            let whole = HostTensor::random(DType::I32, &shape, 5);
            let parts = split_along(whole.as_bytes(), &shape, dim, &sizes, 4).unwrap();
            for (r, part) in parts.iter().enumerate() {
                let m = PartMap::new(&shape, dim, &sizes, r, 4);
                assert_eq!(m.len(), part.len());
                for chunk in [1usize, 4, 5, 24, 1000] {
                    let mut got = vec![0u8; m.len()];
                    let mut s = 0;
                    while s < m.len() {
                        let e = (s + chunk).min(m.len());
                        m.gather(whole.as_bytes(), s, &mut got[s..e]);
                        s = e;
                    }
                    assert_eq!(&got, part, "dim {dim} rank {r} chunk {chunk}");
                }
            }
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let cat = concat_along(&refs, &shape, dim, &sizes, 4).unwrap();
            let mut out = vec![0u8; cat.len()];
            for (r, part) in parts.iter().enumerate() {
                let m = PartMap::new(&shape, dim, &sizes, r, 4);
                for s in (0..part.len()).step_by(12) {
                    let e = (s + 12).min(part.len());
                    m.scatter(&mut out, s, &part[s..e]);
                }
            }
            assert_eq!(out, cat, "dim {dim}");
        }
    }
}
