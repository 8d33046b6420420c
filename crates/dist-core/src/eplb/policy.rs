//! The rebalancing policy: vLLM's `DefaultEplbPolicy.rebalance_experts` (DeepSeek's hierarchical
//! EPLB), step for step, with the same arithmetic so that the same load gives the same plan.
//!
//! For each MoE layer, with `E` logical experts in `G` groups, `R` physical slots, `N` nodes and
//! `K` ranks (`R / K` slots per rank):
//!
//! 1. **Groups to nodes.** The load of each group (its experts' loads summed) is packed onto the
//!    nodes, `G / N` groups per node, heaviest group first onto the lightest node that has room.
//! 2. **Replication within nodes.** Each node has `R / N` slots for its `E / N` experts; the
//!    redundant slots go one by one to the expert whose load per replica is then the highest.
//! 3. **Slots to ranks.** Each node's `R / N` physical experts, weighted by load per replica, are
//!    packed onto its `K / N` ranks the same way as step 1, `R / K` per rank.
//! 4. **Slots kept** (with a previous map). On each rank, an expert that was already there keeps
//!    its slot; the experts that arrive fill the freed slots in order.
//!
//! When `G % N != 0` the hierarchy is dropped (one group, one node), as vLLM does.
//!
//! ## Where the arithmetic must match vLLM's
//! - Loads are integers converted to `f32` (vLLM's `weight.float()`); a group's load is their
//!   `f32` sum **in numpy's pairwise order** ([`numpy_sum_f32`]), which differs from a left-to-right
//!   sum once loads pass 2^24; per-replica loads are `f64` (`float32 / int64` promotes to `float64`).
//! - "First maximum" and "first minimum" pick the lowest index among equals, as `argmax`/`argmin`.
//! - **Ties in the sorts.** vLLM orders items by `np.argsort(-weight)`, numpy's default
//!   *unstable* sort: equal loads come out in an order that depends on the CPU (numpy sorts with
//!   AVX-512 or AVX2 sorting networks where it can, and its scalar introsort elsewhere), so two
//!   machines can compute different plans from the same load — all-zero loads at start-up
//!   included. Here ties are broken by the lower index (a stable sort), which is what numpy's
//!   scalar path gives for small inputs and what `np.argsort(-w, kind="stable")` gives always.
//!   `ci/eplb_golden.py` records, per golden case, whether unmodified vLLM agreed on the machine
//!   that made it.
//! - vLLM does not check a previous map's shape against the new plan; here a mismatch is an error.

use crate::{Error, Result};

/// The sizes of one rebalancing: `R`, `G`, `N` and `K` of the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyParams {
    /// Physical expert slots per layer, over all ranks (`R`).
    pub num_replicas: usize,
    /// Expert groups (`G`); DeepSeek's models route within groups.
    pub num_groups: usize,
    /// Nodes (`N`), where the network inside a node is faster.
    pub num_nodes: usize,
    /// Ranks of the expert-parallel group (`K`).
    pub num_ranks: usize,
}

impl PolicyParams {
    /// Checks the sizes against `num_logical` experts, as vLLM's asserts do, with errors that say
    /// which size is wrong. Returns the `(groups, nodes)` the policy runs with: `(1, 1)` when
    /// `G % N != 0` (vLLM's global policy).
    pub fn check(&self, num_logical: usize) -> Result<(usize, usize)> {
        let PolicyParams {
            num_replicas: r,
            num_groups: g,
            num_nodes: n,
            num_ranks: k,
        } = *self;
        crate::ensure_arg!(k > 0, "eplb: the number of ranks must be at least 1");
        crate::ensure_arg!(n > 0, "eplb: the number of nodes must be at least 1");
        crate::ensure_arg!(
            g > 0,
            "eplb: the number of expert groups must be at least 1"
        );
        crate::ensure_arg!(num_logical > 0, "eplb: the load has no experts");
        crate::ensure_arg!(
            r % k == 0,
            "eplb: {r} replicas are not a multiple of {k} ranks"
        );
        crate::ensure_arg!(
            r >= num_logical,
            "eplb: {r} replicas are fewer than the {num_logical} logical experts"
        );
        let (g, n) = if g % n == 0 { (g, n) } else { (1, 1) };
        crate::ensure_arg!(
            num_logical % g == 0,
            "eplb: {num_logical} experts do not divide into {g} groups"
        );
        crate::ensure_arg!(
            k % n == 0,
            "eplb: {k} ranks are not a multiple of {n} nodes"
        );
        Ok((g, n))
    }
}

/// The plan for every layer: `phy2log[layer][slot]` is the logical expert that physical slot
/// `slot` holds; slots `[r * R/K, (r + 1) * R/K)` are rank `r`'s. The same result as vLLM's
/// `DefaultEplbPolicy.rebalance_experts(load, R, G, N, K, old)`, ties broken by lower index
/// (see the module docs).
///
/// `load[layer][expert]` is each logical expert's load (tokens routed to it over the window).
/// `old` is the current map in the output's shape; experts that stay on a rank keep their slots.
/// An entry of `-1` in `old` is an empty slot (vLLM's elastic expert parallelism).
pub fn rebalance_experts(
    load: &[Vec<u64>],
    params: &PolicyParams,
    old: Option<&[Vec<i64>]>,
) -> Result<Vec<Vec<usize>>> {
    let num_logical = load.first().map_or(0, Vec::len);
    for (l, row) in load.iter().enumerate() {
        crate::ensure_arg!(
            row.len() == num_logical,
            "eplb: layer {l} of the load has {} experts, layer 0 has {num_logical}",
            row.len()
        );
    }
    if load.is_empty() {
        crate::ensure_arg!(
            old.map_or(true, |o| o.is_empty()),
            "eplb: the previous map has layers but the load has none"
        );
        return Ok(Vec::new());
    }
    let (groups, nodes) = params.check(num_logical)?;
    if let Some(old) = old {
        check_old(old, load.len(), params.num_replicas, num_logical)?;
    }
    let mut out = Vec::with_capacity(load.len());
    for (l, row) in load.iter().enumerate() {
        let mut phy2log = hierarchical(row, params.num_replicas, groups, nodes, params.num_ranks);
        if let Some(old) = old {
            preserve_slots(&mut phy2log, &old[l], params.num_ranks);
        }
        out.push(phy2log);
    }
    Ok(out)
}

fn check_old(old: &[Vec<i64>], layers: usize, replicas: usize, logical: usize) -> Result<()> {
    crate::ensure_arg!(
        old.len() == layers,
        "eplb: the previous map has {} layers, the load has {layers}",
        old.len()
    );
    for (l, row) in old.iter().enumerate() {
        crate::ensure_arg!(
            row.len() == replicas,
            "eplb: layer {l} of the previous map has {} slots, the plan has {replicas} replicas",
            row.len()
        );
        if let Some(bad) = row.iter().find(|&&e| e < -1 || e >= logical as i64) {
            return Err(Error::invalid(format!(
                "eplb: layer {l} of the previous map names expert {bad}, outside -1..{logical}"
            )));
        }
    }
    Ok(())
}

/// numpy's `float32` sum of a contiguous run (`np.add.reduce` along the last axis): the
/// identity `-0.0` plus numpy's pairwise sum, which adds runs of up to 128 elements with eight
/// interleaved accumulators and splits longer runs in two at a multiple of eight.
pub fn numpy_sum_f32(a: &[f32]) -> f32 {
    -0.0f32 + pairwise_f32(a)
}

fn pairwise_f32(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        let mut r = -0.0f32;
        for &x in a {
            r += x;
        }
        r
    } else if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_f32(&a[..n2]) + pairwise_f32(&a[n2..])
    }
}

/// Indices of `w` by decreasing weight, equal weights by increasing index.
fn order_desc(w: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..w.len()).collect();
    // A stable sort: equal weights keep index order. Weights are never NaN (finite loads).
    idx.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
    idx
}

/// vLLM's `balanced_packing` for one row: `n` items into `packs` packs of `n / packs` items,
/// each item (heaviest first) into the lightest pack with room. Returns `(pack, rank_in_pack)`.
fn balanced_packing(w: &[f64], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = w.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut pack_of = vec![0; n];
    let mut rank_in = vec![0; n];
    let mut weight = vec![0f64; packs];
    let mut items = vec![0usize; packs];
    for item in order_desc(w) {
        // The first lightest pack; full packs weigh +inf, as in vLLM.
        let mut p = 0;
        for j in 1..packs {
            if weight[j] < weight[p] {
                p = j;
            }
        }
        pack_of[item] = p;
        rank_in[item] = items[p];
        weight[p] += w[item];
        items[p] += 1;
        if items[p] == per_pack {
            weight[p] = f64::INFINITY;
        }
    }
    (pack_of, rank_in)
}

/// vLLM's `replicate_experts` for one row: `phy2log` of `num_phy` slots (the first `w.len()` are
/// the experts themselves) and the replica count of each expert.
fn replicate_experts(w: &[f32], num_phy: usize) -> (Vec<usize>, Vec<u64>) {
    let num_log = w.len();
    let mut phy2log: Vec<usize> = (0..num_log).collect();
    let mut cnt = vec![1u64; num_log];
    for _ in num_log..num_phy {
        // argmax of weight / count in float64, the first of equals.
        let mut best = 0;
        let mut best_v = w[0] as f64 / cnt[0] as f64;
        for e in 1..num_log {
            let v = w[e] as f64 / cnt[e] as f64;
            if v > best_v {
                best = e;
                best_v = v;
            }
        }
        phy2log.push(best);
        cnt[best] += 1;
    }
    (phy2log, cnt)
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// vLLM's `rebalance_experts_hierarchical` for one layer (sizes already checked).
fn hierarchical(
    load: &[u64],
    num_phy: usize,
    groups: usize,
    nodes: usize,
    ranks: usize,
) -> Vec<usize> {
    let num_log = load.len();
    let group_size = num_log / groups;
    let groups_per_node = groups / nodes;
    let phy_per_rank = num_phy / ranks;
    let w: Vec<f32> = load.iter().map(|&x| x as f32).collect();

    // Step 1: groups to nodes.
    let group_load: Vec<f64> = w
        .chunks(group_size)
        .map(|g| numpy_sum_f32(g) as f64)
        .collect();
    let (gpack, grank) = balanced_packing(&group_load, nodes);
    let log2mlog: Vec<usize> = (0..num_log)
        .map(|e| {
            let g = e / group_size;
            (gpack[g] * groups_per_node + grank[g]) * group_size + e % group_size
        })
        .collect();
    let mlog2log = inverse(&log2mlog);

    // Step 2: replicas within each node; step 3: that node's slots to its ranks.
    let log_per_node = num_log / nodes;
    let phy_per_node = num_phy / nodes;
    let mut pphy2mlog = Vec::with_capacity(num_phy);
    for node in 0..nodes {
        let row: Vec<f32> = (0..log_per_node)
            .map(|m| w[mlog2log[node * log_per_node + m]])
            .collect();
        let (phy2mlog, cnt) = replicate_experts(&row, phy_per_node);
        let per_phy: Vec<f64> = phy2mlog
            .iter()
            .map(|&m| row[m] as f64 / cnt[m] as f64)
            .collect();
        let (pack, rank) = balanced_packing(&per_phy, ranks / nodes);
        let phy2pphy: Vec<usize> = (0..phy_per_node)
            .map(|p| pack[p] * phy_per_rank + rank[p])
            .collect();
        let pphy2phy = inverse(&phy2pphy);
        pphy2mlog.extend(pphy2phy.iter().map(|&p| phy2mlog[p] + node * log_per_node));
    }
    pphy2mlog.iter().map(|&m| mlog2log[m]).collect()
}

/// vLLM's `preserve_intragpu_slots` for one layer: on each rank, an expert of `old` that is
/// also in the new plan's slots of that rank keeps its old slot; the rest fill the other slots
/// in order.
fn preserve_slots(new: &mut [usize], old: &[i64], ranks: usize) {
    let num_phy = new.len();
    if ranks == 0 || num_phy % ranks != 0 {
        return;
    }
    let per = num_phy / ranks;
    for r in 0..ranks {
        let slots = r * per..(r + 1) * per;
        let new_local: Vec<usize> = new[slots.clone()].to_vec();
        let old_local = &old[slots.clone()];
        let mut post = new_local.clone();
        let mut used = vec![false; per];
        let mut kept = vec![false; per];
        for (s, &o) in old_local.iter().enumerate() {
            if let Some(j) = (0..per).find(|&j| !used[j] && new_local[j] as i64 == o) {
                post[s] = new_local[j];
                used[j] = true;
                kept[s] = true;
            }
        }
        let rest = (0..per).filter(|&j| !used[j]);
        let free = (0..per).filter(|&s| !kept[s]);
        for (j, s) in rest.zip(free) {
            post[s] = new_local[j];
        }
        new[slots].copy_from_slice(&post);
    }
}

/// vLLM's `compute_logical_maps`: for each layer, the physical slots of each logical expert in
/// slot order (`log2phy[layer][expert]`) — whose lengths are the replica counts.
pub fn logical_to_physical(
    phy2log: &[Vec<usize>],
    num_logical: usize,
) -> Result<Vec<Vec<Vec<usize>>>> {
    phy2log
        .iter()
        .enumerate()
        .map(|(l, row)| {
            let mut m = vec![Vec::new(); num_logical];
            for (slot, &e) in row.iter().enumerate() {
                crate::ensure_arg!(
                    e < num_logical,
                    "layer {l} slot {slot} holds expert {e}, outside 0..{num_logical}"
                );
                m[e].push(slot);
            }
            Ok(m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(r: usize, g: usize, n: usize, k: usize) -> PolicyParams {
        PolicyParams {
            num_replicas: r,
            num_groups: g,
            num_nodes: n,
            num_ranks: k,
        }
    }

    /// DeepSeek's README example (vLLM's tests/distributed/test_eplb_algo.py uses it too).
    #[test]
    fn deepseek_readme_example() {
        let load = vec![
            vec![90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            vec![20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ];
        let got = rebalance_experts(&load, &params(16, 4, 2, 8), None).unwrap();
        assert_eq!(
            got,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ]
        );
    }

    #[test]
    fn every_expert_placed_and_ranks_balanced() {
        let load: Vec<Vec<u64>> = vec![(0..16u64).map(|e| (e * 37 + 11) % 23 + 1).collect()];
        let plan = rebalance_experts(&load, &params(24, 4, 2, 4), None).unwrap();
        let maps = logical_to_physical(&plan, 16).unwrap();
        assert!(maps[0].iter().all(|slots| !slots.is_empty()));
        assert_eq!(maps[0].iter().map(Vec::len).sum::<usize>(), 24);
    }

    #[test]
    fn inconsistent_sizes_are_errors() {
        let load = vec![vec![1u64; 8]];
        let msg = |p: PolicyParams| rebalance_experts(&load, &p, None).unwrap_err().to_string();
        assert!(msg(params(10, 1, 1, 4)).contains("not a multiple of 4 ranks"));
        assert!(msg(params(8, 1, 1, 0)).contains("at least 1"));
        assert!(msg(params(4, 1, 1, 2)).contains("fewer than the 8"));
        assert!(msg(params(12, 3, 1, 4)).contains("do not divide into 3 groups"));
        assert!(msg(params(12, 4, 2, 3)).contains("not a multiple of 2 nodes"));
        // G % N != 0 drops the hierarchy: no node check then (as vLLM).
        assert!(rebalance_experts(&load, &params(12, 4, 3, 4), None).is_ok());
        let ragged = vec![vec![1u64; 8], vec![1u64; 7]];
        assert!(rebalance_experts(&ragged, &params(8, 1, 1, 4), None).is_err());
        let old = vec![vec![0i64; 9]];
        assert!(rebalance_experts(&load, &params(8, 1, 1, 4), Some(&old))
            .unwrap_err()
            .to_string()
            .contains("9 slots"));
        let old = vec![vec![8i64; 8]];
        assert!(rebalance_experts(&load, &params(8, 1, 1, 4), Some(&old)).is_err());
    }

    #[test]
    fn kept_experts_keep_their_slots() {
        let load = vec![vec![10u64, 80, 30, 5, 60, 20, 40, 70]];
        let p = params(12, 1, 1, 3);
        let fresh = rebalance_experts(&load, &p, None).unwrap();
        // The previous map is the fresh plan with each rank's slots rotated: the same experts
        // per rank, so preservation must give back exactly that old map.
        let mut old = fresh[0].clone();
        for r in 0..3 {
            old[r * 4..(r + 1) * 4].rotate_left(1);
        }
        let old: Vec<Vec<i64>> = vec![old.iter().map(|&e| e as i64).collect()];
        let kept = rebalance_experts(&load, &p, Some(&old)).unwrap();
        assert_eq!(
            kept[0].iter().map(|&e| e as i64).collect::<Vec<_>>(),
            old[0]
        );
    }

    #[test]
    fn numpy_pairwise_order() {
        // Past 2^24 the order of f32 additions shows: 2^24 + 1 + 1 is 2^24 left to right.
        let mut a = vec![0f32; 16];
        a[0] = 16_777_216.0;
        a[1] = 1.0;
        a[9] = 1.0;
        // pairwise: accumulator 1 gets 1 + 1 = 2, then 2^24 + 2 is exact.
        assert_eq!(numpy_sum_f32(&a), 16_777_218.0);
        let left: f32 = a.iter().sum();
        assert_eq!(left, 16_777_216.0);
    }
}
