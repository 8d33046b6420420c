//! Group math, exactly vLLM's (`parallel_state.py`): rank layouts of the TP, DCP, PCP, PP, DP and EP
//! groups, pipeline layer partitions, and the small helpers (`divide`, `tcp_uri`…).

use serde::{Deserialize, Serialize};

use crate::tensor::split_along;
use crate::{Error, HostTensor, Result};

/// The parallel sizes of a job. `world_size` must be a multiple of `dp * pp * pcp * tp`; the
/// quotient is the external data-parallel factor (replicas launched outside the engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelConfig {
    /// Total ranks.
    pub world_size: usize,
    /// Tensor parallel size.
    pub tp: usize,
    /// Pipeline parallel size.
    pub pp: usize,
    /// Data parallel size.
    pub dp: usize,
    /// Prefill context parallel size.
    pub pcp: usize,
    /// Decode context parallel size (reuses the TP ranks; must divide TP).
    pub dcp: usize,
    /// Build expert-parallel groups (MoE models).
    pub ep: bool,
}

impl ParallelConfig {
    /// A config with every size 1 except `world_size` (which is then all external DP).
    pub fn new(world_size: usize) -> Self {
        ParallelConfig {
            world_size,
            tp: 1,
            pp: 1,
            dp: 1,
            pcp: 1,
            dcp: 1,
            ep: false,
        }
    }

    /// Checks the sizes; returns the external data-parallel factor.
    pub fn validate(&self) -> Result<usize> {
        for (name, v) in [
            ("world_size", self.world_size),
            ("tp", self.tp),
            ("pp", self.pp),
            ("dp", self.dp),
            ("pcp", self.pcp),
            ("dcp", self.dcp),
        ] {
            crate::ensure_arg!(v > 0, "{name} must be at least 1, got 0");
        }
        let inner = self
            .dp
            .checked_mul(self.pp)
            .and_then(|x| x.checked_mul(self.pcp))
            .and_then(|x| x.checked_mul(self.tp))
            .ok_or_else(|| Error::invalid("parallel sizes overflow"))?;
        crate::ensure_arg!(
            self.world_size % inner == 0,
            "world_size {} is not divisible by dp*pp*pcp*tp = {}*{}*{}*{} = {inner}",
            self.world_size,
            self.dp,
            self.pp,
            self.pcp,
            self.tp
        );
        crate::ensure_arg!(
            self.dcp <= self.tp,
            "dcp {} must not exceed tp {} (DCP reuses the TP ranks)",
            self.dcp,
            self.tp
        );
        crate::ensure_arg!(
            self.tp % self.dcp == 0,
            "tp {} is not divisible by dcp {}",
            self.tp,
            self.dcp
        );
        Ok(self.world_size / inner)
    }

    /// The rank lists of every group kind.
    pub fn layout(&self) -> Result<GroupLayout> {
        let ext = self.validate()?;
        // all_ranks = arange(world).reshape(ext, dp, pp, pcp, tp)
        let shape = [ext, self.dp, self.pp, self.pcp, self.tp];
        let swapped = |a: usize, b: usize, group: usize| -> Vec<Vec<usize>> {
            let mut perm = [0, 1, 2, 3, 4];
            perm.swap(a, b);
            transpose_rows(&shape, &perm, group)
        };
        Ok(GroupLayout {
            tp: swapped(4, 4, self.tp),
            dcp: (0..self.world_size)
                .collect::<Vec<_>>()
                .chunks(self.dcp)
                .map(|c| c.to_vec())
                .collect(),
            pcp: swapped(3, 4, self.pcp),
            pp: swapped(2, 4, self.pp),
            dp: swapped(1, 4, self.dp),
            ep: self.ep.then(|| swapped(1, 2, self.dp * self.pcp * self.tp)),
        })
    }
}

/// Rows of length `group` of `arange(prod(shape)).reshape(shape).permute(perm).reshape(-1, group)`.
fn transpose_rows(shape: &[usize; 5], perm: &[usize; 5], group: usize) -> Vec<Vec<usize>> {
    let strides = {
        let mut s = [1usize; 5];
        for i in (0..4).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    };
    let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let pstrides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let total: usize = shape.iter().product();
    let mut flat = Vec::with_capacity(total);
    let mut idx = [0usize; 5];
    for _ in 0..total {
        flat.push(idx.iter().zip(&pstrides).map(|(i, s)| i * s).sum());
        for d in (0..5).rev() {
            idx[d] += 1;
            if idx[d] < pshape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    flat.chunks(group).map(|c| c.to_vec()).collect()
}

/// The rank lists of each group kind; each inner list is one group, in group-rank order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLayout {
    /// Tensor parallel groups.
    pub tp: Vec<Vec<usize>>,
    /// Pipeline parallel groups.
    pub pp: Vec<Vec<usize>>,
    /// Data parallel groups.
    pub dp: Vec<Vec<usize>>,
    /// Prefill context parallel groups.
    pub pcp: Vec<Vec<usize>>,
    /// Decode context parallel groups.
    pub dcp: Vec<Vec<usize>>,
    /// Expert parallel groups, when built.
    pub ep: Option<Vec<Vec<usize>>>,
}

impl GroupLayout {
    /// The group of `kind` (`"tp"`, `"pp"`…) that holds `rank`.
    pub fn group_of(&self, kind: &str, rank: usize) -> Option<&[usize]> {
        let groups = match kind {
            "tp" => &self.tp,
            "pp" => &self.pp,
            "dp" => &self.dp,
            "pcp" => &self.pcp,
            "dcp" => &self.dcp,
            "ep" => self.ep.as_ref()?,
            _ => return None,
        };
        groups
            .iter()
            .find(|g| g.contains(&rank))
            .map(|g| g.as_slice())
    }
}

/// `a / b`, failing unless `b` divides `a` (vLLM's `divide`).
pub fn divide(a: usize, b: usize) -> Result<usize> {
    ensure_divisibility(a, b)?;
    Ok(a / b)
}

/// Fails with "a is not divisible by b" unless `b` divides `a`.
pub fn ensure_divisibility(a: usize, b: usize) -> Result<()> {
    crate::ensure_arg!(b != 0 && a % b == 0, "{a} is not divisible by {b}");
    Ok(())
}

/// Splits a tensor into `n` equal chunks along its last dim (vLLM's `split_tensor_along_last_dim`).
/// Host tensors are always dense, so the chunks are contiguous copies.
pub fn split_tensor_along_last_dim(t: &HostTensor, n: usize) -> Result<Vec<HostTensor>> {
    crate::ensure_arg!(!t.shape().is_empty(), "cannot split a 0-d tensor");
    let d = t.shape().len() - 1;
    let chunk = divide(t.shape()[d], n)?;
    let parts = split_along(
        t.as_bytes(),
        t.shape(),
        d,
        &vec![chunk; n],
        t.dtype().size(),
    )?;
    let mut shape = t.shape().to_vec();
    shape[d] = chunk;
    parts
        .iter()
        .map(|b| HostTensor::from_bytes(t.dtype(), &shape, b))
        .collect()
}

/// The environment variable with a manual pipeline layer partition (`"4,6,6,4"`).
pub const PP_LAYER_PARTITION_ENV: &str = "DIST_PP_LAYER_PARTITION";

/// The layers `[start, end)` of pipeline stage `pp_rank` (vLLM's `get_pp_indices`).
///
/// `partition` is a manual split in vLLM's `VLLM_PP_LAYER_PARTITION` grammar (comma-separated
/// integers, one per stage, summing to `num_layers`); without it the remainder layers go to the
/// stages before the last, starting from the second-to-last.
pub fn get_pp_indices(
    num_layers: usize,
    pp_rank: usize,
    pp_size: usize,
    partition: Option<&str>,
) -> Result<(usize, usize)> {
    let parts = pp_partitions(num_layers, pp_size, partition)?;
    crate::ensure_arg!(
        pp_rank < pp_size,
        "pp_rank {pp_rank} out of range for pp_size {pp_size}"
    );
    let start: usize = parts[..pp_rank].iter().sum();
    Ok((start, start + parts[pp_rank]))
}

/// [`get_pp_indices`] with the partition read from [`PP_LAYER_PARTITION_ENV`].
pub fn get_pp_indices_from_env(
    num_layers: usize,
    pp_rank: usize,
    pp_size: usize,
) -> Result<(usize, usize)> {
    let p = std::env::var(PP_LAYER_PARTITION_ENV).ok();
    get_pp_indices(num_layers, pp_rank, pp_size, p.as_deref())
}

/// The layer count of each stage.
pub fn pp_partitions(
    num_layers: usize,
    pp_size: usize,
    partition: Option<&str>,
) -> Result<Vec<usize>> {
    crate::ensure_arg!(pp_size > 0, "pp_size must be at least 1");
    if let Some(p) = partition {
        let parts: Vec<usize> = p
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::invalid(format!("invalid partition string: {p}")))?;
        crate::ensure_arg!(
            parts.len() == pp_size,
            "{} partitions does not match pp_size {pp_size}",
            parts.len()
        );
        crate::ensure_arg!(
            parts.iter().sum::<usize>() == num_layers,
            "partition sum {} does not match num_layers {num_layers}",
            parts.iter().sum::<usize>()
        );
        return Ok(parts);
    }
    let mut parts = vec![num_layers / pp_size; pp_size];
    let rem = num_layers % pp_size;
    for i in 2..rem + 2 {
        parts[pp_size - i] += 1;
    }
    if rem != 0 {
        tracing::info!(?parts, "hidden layers were unevenly partitioned");
    }
    Ok(parts)
}

/// `tcp://host:port`, with IPv6 addresses in brackets (vLLM's `get_tcp_uri`).
pub fn tcp_uri(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(
        world: usize,
        tp: usize,
        pp: usize,
        dp: usize,
        pcp: usize,
        dcp: usize,
        ep: bool,
    ) -> ParallelConfig {
        ParallelConfig {
            world_size: world,
            tp,
            pp,
            dp,
            pcp,
            dcp,
            ep,
        }
    }

    #[test]
    fn worked_example_8_ranks() {
        let l = cfg(8, 2, 2, 2, 1, 1, true).layout().unwrap();
        assert_eq!(l.tp, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.pp, vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(l.dp, vec![vec![0, 4], vec![2, 6], vec![1, 5], vec![3, 7]]);
        assert_eq!(l.ep.unwrap(), vec![vec![0, 1, 4, 5], vec![2, 3, 6, 7]]);
        assert_eq!(l.dcp, (0..8).map(|r| vec![r]).collect::<Vec<_>>());
        assert_eq!(l.pcp, (0..8).map(|r| vec![r]).collect::<Vec<_>>());
    }

    #[test]
    fn worked_example_16_ranks() {
        let l = cfg(16, 2, 2, 2, 2, 1, true).layout().unwrap();
        assert_eq!(&l.pcp[..3], &[vec![0, 2], vec![1, 3], vec![4, 6]]);
        assert_eq!(
            &l.pp[..4],
            &[vec![0, 4], vec![2, 6], vec![1, 5], vec![3, 7]]
        );
        assert_eq!(&l.dp[..2], &[vec![0, 8], vec![2, 10]]);
        assert_eq!(
            l.ep.unwrap(),
            vec![
                vec![0, 1, 2, 3, 8, 9, 10, 11],
                vec![4, 5, 6, 7, 12, 13, 14, 15]
            ]
        );
    }

    #[test]
    fn dcp_example() {
        let l = cfg(8, 4, 2, 1, 1, 2, false).layout().unwrap();
        assert_eq!(l.dcp, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.tp, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert!(l.ep.is_none());
    }

    #[test]
    fn invalid_configs_are_errors() {
        assert!(cfg(6, 4, 1, 1, 1, 1, false).layout().is_err());
        assert!(cfg(8, 2, 1, 1, 1, 4, false).layout().is_err());
        assert!(cfg(8, 0, 1, 1, 1, 1, false).layout().is_err());
        assert!(cfg(0, 1, 1, 1, 1, 1, false).layout().is_err());
        assert!(cfg(8, 4, 1, 1, 1, 3, false).layout().is_err());
    }

    /// Every rank appears exactly once per group kind, and every group has the right size,
    /// over many configurations.
    #[test]
    fn property_partition_of_ranks() {
        for ext in 1..=2 {
            for dp in [1, 2, 3] {
                for pp in [1, 2, 4] {
                    for pcp in [1, 2] {
                        for tp in [1, 2, 3, 4] {
                            for dcp in [1, 2, 4] {
                                if tp % dcp != 0 {
                                    continue;
                                }
                                let world = ext * dp * pp * pcp * tp;
                                let c = cfg(world, tp, pp, dp, pcp, dcp, true);
                                let l = c.layout().unwrap();
                                let kinds = [
                                    (&l.tp, tp),
                                    (&l.pp, pp),
                                    (&l.dp, dp),
                                    (&l.pcp, pcp),
                                    (&l.dcp, dcp),
                                    (l.ep.as_ref().unwrap(), dp * pcp * tp),
                                ];
                                for (groups, size) in kinds {
                                    let mut seen = vec![0; world];
                                    for g in groups {
                                        assert_eq!(g.len(), size, "{c:?}");
                                        for &r in g {
                                            seen[r] += 1;
                                        }
                                    }
                                    assert!(seen.iter().all(|&s| s == 1), "{c:?}");
                                }
                                // Coordinates: rank r has tp = r % tp, pp = (r / (tp*pcp)) % pp.
                                for r in 0..world {
                                    let g = l.group_of("tp", r).unwrap();
                                    assert_eq!(g.iter().position(|&x| x == r), Some(r % tp));
                                    let g = l.group_of("pp", r).unwrap();
                                    assert_eq!(
                                        g.iter().position(|&x| x == r),
                                        Some((r / (tp * pcp)) % pp)
                                    );
                                    let g = l.group_of("dp", r).unwrap();
                                    assert_eq!(
                                        g.iter().position(|&x| x == r),
                                        Some((r / (tp * pcp * pp)) % dp)
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pp_split_table() {
        let split = |n, p| pp_partitions(n, p, None).unwrap();
        assert_eq!(split(22, 4), vec![5, 6, 6, 5]);
        assert_eq!(split(4, 3), vec![1, 2, 1]);
        assert_eq!(split(5, 3), vec![2, 2, 1]);
        assert_eq!(split(3, 2), vec![2, 1]);
        assert_eq!(get_pp_indices(22, 2, 4, None).unwrap(), (11, 17));
        assert_eq!(get_pp_indices(22, 1, 4, Some("4,6,6,6")).unwrap(), (4, 10));
    }

    #[test]
    fn pp_partition_errors() {
        assert!(get_pp_indices(22, 0, 4, Some("4,6,6,6,")).is_err());
        assert!(get_pp_indices(22, 0, 4, Some("4,6,12")).is_err());
        assert!(get_pp_indices(22, 0, 4, Some("4,6,6,5")).is_err());
        assert!(get_pp_indices(22, 0, 4, Some("a,6,6,5")).is_err());
        assert!(get_pp_indices(22, 4, 4, None).is_err());
    }

    #[test]
    fn helpers() {
        assert_eq!(divide(12, 4).unwrap(), 3);
        let e = divide(10, 4).unwrap_err().to_string();
        assert!(e.contains("10 is not divisible by 4"), "{e}");
        assert!(divide(1, 0).is_err());
        assert_eq!(tcp_uri("127.0.0.1", 29500), "tcp://127.0.0.1:29500");
        assert_eq!(tcp_uri("::1", 29500), "tcp://[::1]:29500");
        assert_eq!(tcp_uri("node-a", 1), "tcp://node-a:1");
        let t = HostTensor::from_vec(&[2, 4], (0..8).collect::<Vec<i32>>()).unwrap();
        let parts = split_tensor_along_last_dim(&t, 2).unwrap();
        assert_eq!(parts[0].as_slice::<i32>().unwrap(), &[0, 1, 4, 5]);
        assert_eq!(parts[1].as_slice::<i32>().unwrap(), &[2, 3, 6, 7]);
        assert!(split_tensor_along_last_dim(&t, 3).is_err());
    }
}
