//! The device re-layout between NCCL's rank-major buffers and `cat(parts, dim)`: one strided
//! copy per rank. The layout step of all_gather(dim) / all_gatherv / gather (rank-major →
//! cat) and of reduce_scatter(dim) / reduce_scatterv (cat → rank-major) when `dim` is not the
//! outermost non-trivial dimension.

use dist_core::Result;

use crate::runtime::Strided;

/// The parts of a re-layout: `lens[r]` rows of `inner` elements of `es` bytes per rank, in
/// `outer` blocks (`parts[r]` has shape `(outer, lens[r], inner)`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts<'l> {
    pub(crate) outer: usize,
    pub(crate) inner: usize,
    pub(crate) lens: &'l [usize],
    pub(crate) es: usize,
}

impl Parts<'_> {
    /// Bytes of the whole buffer.
    pub(crate) fn bytes(&self) -> usize {
        self.outer * self.lens.iter().sum::<usize>() * self.inner * self.es
    }

    /// For each rank with elements: its rank, the byte offset of its block in the rank-major
    /// buffer and its element count (`outer * lens[r] * inner`).
    pub(crate) fn blocks_by_rank(&self) -> impl Iterator<Item = (usize, u64, usize)> + '_ {
        let per = self.outer * self.inner;
        let es = self.es as u64;
        self.lens
            .iter()
            .scan(0u64, move |off, &l| {
                let at = *off;
                *off += (per * l) as u64 * es;
                Some((at, per * l))
            })
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(r, (at, n))| (r, at, n))
    }

    /// For each rank: its offset in the rank-major buffer, its column offset in a `cat` row,
    /// and its width, all in bytes.
    fn blocks(&self) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
        let (outer, inner, es) = (self.outer, self.inner, self.es);
        self.lens
            .iter()
            .scan((0usize, 0usize), move |(off, col), &l| {
                let w = l * inner * es;
                let b = (*off as u64, *col as u64, w);
                *off += outer * w;
                *col += w;
                Some(b)
            })
    }

    /// Re-lays out rank-major `src` into `cat(parts, dim)` at `dst` (`to_cat`), or the reverse,
    /// with one strided `copy` per rank.
    ///
    /// # Safety
    /// `copy` performs the strided copies it is given; `src` and `dst` are buffers of
    /// [`Parts::bytes`] bytes, live until the copies have run.
    pub(crate) unsafe fn relayout(
        &self,
        mut copy: impl FnMut(Strided) -> Result<()>,
        to_cat: bool,
        dst: u64,
        src: u64,
    ) -> Result<()> {
        let row = self.lens.iter().sum::<usize>() * self.inner * self.es;
        for (off, col, width) in self.blocks() {
            let (d, dp, sr, sp) = if to_cat {
                (dst + col, row, src + off, width)
            } else {
                (dst + off, width, src + col, row)
            };
            copy(Strided {
                dst: d,
                dst_pitch: dp,
                src: sr,
                src_pitch: sp,
                width,
                height: self.outer,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::tensor::{concat_along, split_along};

    /// The re-layouts, run with a host-memory copy, equal dist-core's concat/split.
    #[test]
    fn relayouts_match_concat_and_split() {
        let host_copy_2d = |c: Strided| {
            assert!(c.width <= c.dst_pitch && c.width <= c.src_pitch, "{c:?}");
            for r in 0..c.height {
                // SAFETY: the test's buffers hold every row the re-layout addresses.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (c.src as usize + r * c.src_pitch) as *const u8,
                        (c.dst as usize + r * c.dst_pitch) as *mut u8,
                        c.width,
                    )
                };
            }
            Ok(())
        };
        for (outer, inner, es, lens) in [
            (3usize, 2usize, 4usize, vec![1usize, 0, 3, 2]),
            (1, 5, 2, vec![2, 2]),
            (4, 1, 1, vec![3]),
        ] {
            let p = Parts {
                outer,
                inner,
                lens: &lens,
                es,
            };
            let total: usize = lens.iter().sum();
            let parts: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    (0..outer * l * inner * es)
                        .map(|i| (r * 50 + i) as u8)
                        .collect()
                })
                .collect();
            let rank_major: Vec<u8> = parts.concat();
            assert_eq!(rank_major.len(), p.bytes());
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let want = concat_along(&refs, &[outer, 0, inner], 1, &lens, es).unwrap();
            let mut cat = vec![0u8; rank_major.len()];
            let (c, r) = (cat.as_mut_ptr() as u64, rank_major.as_ptr() as u64);
            // SAFETY: both buffers hold p.bytes() bytes; the copy is a host copy.
            unsafe { p.relayout(host_copy_2d, true, c, r) }.unwrap();
            assert_eq!(cat, want);
            let mut back = vec![0u8; cat.len()];
            let (b, c) = (back.as_mut_ptr() as u64, cat.as_ptr() as u64);
            // SAFETY: as above.
            unsafe { p.relayout(host_copy_2d, false, b, c) }.unwrap();
            assert_eq!(back, rank_major);
            let split = split_along(&cat, &[outer, total, inner], 1, &lens, es).unwrap();
            assert_eq!(split.concat(), rank_major);
            // Per-rank blocks of the rank-major buffer: the parts, in order, empty ones left out.
            let mut at = 0u64;
            let mut want = Vec::new();
            for (r, part) in parts.iter().enumerate() {
                if !part.is_empty() {
                    want.push((r, at, part.len() / es));
                }
                at += part.len() as u64;
            }
            assert_eq!(p.blocks_by_rank().collect::<Vec<_>>(), want);
        }
    }
}
