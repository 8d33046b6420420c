//! Routing plans: where experts live, which tokens go to which rank, and the index lists the row
//! kernels need on both sides. Pure functions of the routing; no communication.

use crate::moe::kernels::RowSums;
use crate::{Error, Result};

/// Largest `top_k` a routing may have.
pub const MAX_TOP_K: usize = 64;
/// Most experts a placement may hold.
pub const MAX_EXPERTS: usize = 1 << 16;

/// Which EP rank holds each (physical) expert, and its index among that rank's experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    rank: Vec<u32>,
    local: Vec<u32>,
    /// `global[rank][local]`: the expert.
    global: Vec<Vec<u32>>,
}

impl ExpertPlacement {
    /// vLLM's linear placement (`determine_expert_map`, the default `expert_placement_strategy`):
    /// rank `r` holds a contiguous run of `E / world` experts, the first `E % world` ranks one
    /// more. With EPLB, the experts are the physical slots (`world × slots_per_rank`).
    pub fn linear(num_experts: usize, world: usize) -> Result<Self> {
        crate::ensure_arg!(world > 0, "expert placement: world size 0");
        let (base, rem) = (num_experts / world, num_experts % world);
        let rank: Vec<usize> = (0..world)
            .flat_map(|r| std::iter::repeat(r).take(base + usize::from(r < rem)))
            .collect();
        Self::from_ranks(&rank, world)
    }

    /// vLLM's `round_robin` placement: expert `e` on rank `e % world`.
    pub fn round_robin(num_experts: usize, world: usize) -> Result<Self> {
        crate::ensure_arg!(world > 0, "expert placement: world size 0");
        let rank: Vec<usize> = (0..num_experts).map(|e| e % world).collect();
        Self::from_ranks(&rank, world)
    }

    /// Expert `e` on rank `ranks[e]`; its local index is its place among that rank's experts.
    pub fn from_ranks(ranks: &[usize], world: usize) -> Result<Self> {
        crate::ensure_arg!(
            !ranks.is_empty() && ranks.len() <= MAX_EXPERTS,
            "expert placement: {} experts (1..={MAX_EXPERTS})",
            ranks.len()
        );
        let mut global = vec![Vec::new(); world];
        let mut local = Vec::with_capacity(ranks.len());
        for (e, &r) in ranks.iter().enumerate() {
            crate::ensure_arg!(
                r < world,
                "expert placement: expert {e} on rank {r} of {world}"
            );
            local.push(global[r].len() as u32);
            global[r].push(e as u32);
        }
        Ok(ExpertPlacement {
            rank: ranks.iter().map(|&r| r as u32).collect(),
            local,
            global,
        })
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.rank.len()
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.global.len()
    }
    /// The rank holding expert `e`.
    pub fn rank_of(&self, e: usize) -> usize {
        self.rank[e] as usize
    }
    /// Expert `e`'s index among its rank's experts.
    pub fn local_of(&self, e: usize) -> usize {
        self.local[e] as usize
    }
    /// The experts of `rank`, by local index.
    pub fn experts_of(&self, rank: usize) -> &[u32] {
        &self.global[rank]
    }
}

/// The top-k routing of a rank's tokens: `topk_ids[t * top_k + j]` is token `t`'s `j`-th
/// expert and `topk_weights[…]` its router weight (vLLM's `topk_ids` / `topk_weights`).
#[derive(Clone, Copy, Debug)]
pub struct Routing<'a> {
    /// Experts, `tokens × top_k`.
    pub topk_ids: &'a [u32],
    /// Router weights, `tokens × top_k`.
    pub topk_weights: &'a [f32],
    /// Experts per token.
    pub top_k: usize,
}

impl Routing<'_> {
    /// Number of tokens.
    pub fn num_tokens(&self) -> usize {
        self.topk_ids.len() / self.top_k.max(1)
    }

    /// Checks the routing against `tokens` rows and a placement: sizes, expert ids in range, no
    /// expert twice in a token's top-k, finite weights.
    pub fn check(&self, tokens: usize, placement: &ExpertPlacement) -> Result<()> {
        let k = self.top_k;
        crate::ensure_arg!(
            (1..=MAX_TOP_K).contains(&k),
            "moe routing: top_k {k} (1..={MAX_TOP_K})"
        );
        crate::ensure_arg!(
            Some(self.topk_ids.len()) == tokens.checked_mul(k)
                && self.topk_weights.len() == self.topk_ids.len(),
            "moe routing: {} ids and {} weights for {tokens} tokens of top-{k}",
            self.topk_ids.len(),
            self.topk_weights.len()
        );
        let e = placement.num_experts();
        for (t, ids) in self.topk_ids.chunks_exact(k).enumerate() {
            for (j, &x) in ids.iter().enumerate() {
                crate::ensure_arg!(
                    (x as usize) < e,
                    "moe routing: token {t} routed to expert {x} of {e}"
                );
                crate::ensure_arg!(
                    !ids[..j].contains(&x),
                    "moe routing: token {t} lists expert {x} twice"
                );
            }
        }
        if let Some(i) = self.topk_weights.iter().position(|w| !w.is_finite()) {
            return Err(Error::invalid(format!(
                "moe routing: token {}'s weight {} is {}",
                i / k,
                i % k,
                self.topk_weights[i]
            )));
        }
        Ok(())
    }
}

/// What a rank sends in a dispatch and how the returned rows combine into its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SendPlan {
    /// The token of each send row: grouped by destination rank in rank order, tokens in order
    /// within a group (all-to-all-v); `0..tokens` once (all-gather).
    pub rows: Vec<u32>,
    /// Rows for each destination rank.
    pub counts: Vec<usize>,
    /// Per send row, `2 × top_k` words: the destination's local index of each expert (or −1
    /// where the expert is elsewhere; global ids for the all-gather, which every rank maps),
    /// then the weights' `f32` bits.
    pub meta: Vec<i32>,
    /// Per token, the rows that come back to it in the combine, in rank order.
    pub back: RowSums,
    /// Tokens routed to each expert (the per-expert counts exchanged before any data).
    pub expert_counts: Vec<u64>,
}

fn push_meta(meta: &mut Vec<i32>, ids: impl Iterator<Item = i32>, weights: &[f32]) {
    meta.extend(ids);
    meta.extend(weights.iter().map(|w| w.to_bits() as i32));
}

fn expert_counts(routing: &Routing<'_>, placement: &ExpertPlacement) -> Vec<u64> {
    let mut c = vec![0u64; placement.num_experts()];
    routing.topk_ids.iter().for_each(|&e| c[e as usize] += 1);
    c
}

/// The all-to-all-v plan: each token goes once to every rank that holds one of its experts
/// (however many of its experts that rank holds).
pub fn plan_all_to_all(routing: &Routing<'_>, placement: &ExpertPlacement) -> SendPlan {
    let (k, n, tokens) = (routing.top_k, placement.world_size(), routing.num_tokens());
    // Destination ranks of each token, as a sorted, deduplicated list.
    let mut dests: Vec<Vec<u32>> = Vec::with_capacity(tokens);
    for ids in routing.topk_ids.chunks_exact(k) {
        let mut d: Vec<u32> = ids
            .iter()
            .map(|&e| placement.rank_of(e as usize) as u32)
            .collect();
        d.sort_unstable();
        d.dedup();
        dests.push(d);
    }
    let mut counts = vec![0usize; n];
    dests
        .iter()
        .flatten()
        .for_each(|&p| counts[p as usize] += 1);
    let mut start = vec![0usize; n];
    for p in 1..n {
        start[p] = start[p - 1] + counts[p - 1];
    }
    let total = start.last().map_or(0, |s| s + counts[n - 1]);
    let mut rows = vec![0u32; total];
    let mut meta = vec![0i32; total * 2 * k];
    let mut fill = start.clone();
    let mut back_rows = Vec::with_capacity(total);
    let mut back_offsets = Vec::with_capacity(tokens + 1);
    back_offsets.push(0);
    for (t, d) in dests.iter().enumerate() {
        let ids = &routing.topk_ids[t * k..(t + 1) * k];
        let w = &routing.topk_weights[t * k..(t + 1) * k];
        for &p in d {
            let p = p as usize;
            let at = fill[p];
            fill[p] += 1;
            rows[at] = t as u32;
            back_rows.push(at as u32);
            let m = &mut meta[at * 2 * k..(at + 1) * 2 * k];
            for (j, &e) in ids.iter().enumerate() {
                let e = e as usize;
                m[j] = if placement.rank_of(e) == p {
                    placement.local_of(e) as i32
                } else {
                    -1
                };
                m[k + j] = w[j].to_bits() as i32;
            }
        }
        back_offsets.push(back_rows.len());
    }
    SendPlan {
        rows,
        counts,
        meta,
        back: RowSums::new(back_offsets, back_rows, None).expect("offsets rise to the row count"),
        expert_counts: expert_counts(routing, placement),
    }
}

/// The all-gather plan: every token to every rank, with global expert ids.
pub fn plan_all_gather(routing: &Routing<'_>, placement: &ExpertPlacement) -> SendPlan {
    let (k, tokens) = (routing.top_k, routing.num_tokens());
    let mut meta = Vec::with_capacity(tokens * 2 * k);
    for t in 0..tokens {
        push_meta(
            &mut meta,
            routing.topk_ids[t * k..(t + 1) * k]
                .iter()
                .map(|&e| e as i32),
            &routing.topk_weights[t * k..(t + 1) * k],
        );
    }
    SendPlan {
        rows: (0..tokens as u32).collect(),
        counts: vec![tokens; placement.world_size()],
        meta,
        back: RowSums::new(vec![0; tokens + 1], vec![], None).expect("empty lists"),
        expert_counts: expert_counts(routing, placement),
    }
}

/// Received tokens grouped by local expert (vLLM's contiguous expert layout with
/// `expert_num_tokens`), and how expert outputs in that order reduce back to one row per
/// received token with the router weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLayout {
    /// The received row of each expert-ordered row: local expert 0's rows first, each expert's
    /// in received order.
    pub rows: Vec<u32>,
    /// `offsets[e]..offsets[e + 1]`: local expert `e`'s rows.
    pub offsets: Vec<usize>,
    /// Per received row: its expert-ordered rows in top-k order, with their router weights.
    pub reduce: RowSums,
}

impl ExpertLayout {
    /// The layout of received rows whose local expert ids (`−1`: elsewhere) and weights are
    /// `ids` / `weights` (`rows × top_k`), for `num_local` local experts.
    pub fn new(ids: &[i32], weights: &[f32], top_k: usize, num_local: usize) -> Result<Self> {
        let mut per = vec![0usize; num_local];
        for &e in ids {
            if e >= 0 {
                let e = e as usize;
                crate::ensure_arg!(
                    e < num_local,
                    "moe dispatch: local expert {e} of {num_local}"
                );
                per[e] += 1;
            }
        }
        let mut offsets = vec![0usize; num_local + 1];
        for e in 0..num_local {
            offsets[e + 1] = offsets[e] + per[e];
        }
        let mut fill = offsets[..num_local].to_vec();
        let mut rows = vec![0u32; offsets[num_local]];
        let mut pos = vec![0u32; ids.len()];
        for (i, &e) in ids.iter().enumerate() {
            if e >= 0 {
                let at = fill[e as usize];
                fill[e as usize] += 1;
                rows[at] = (i / top_k) as u32;
                pos[i] = at as u32;
            }
        }
        let mut r_off = Vec::with_capacity(ids.len() / top_k.max(1) + 1);
        let (mut r_rows, mut r_w) = (
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
        );
        r_off.push(0);
        for (r, row_ids) in ids.chunks_exact(top_k.max(1)).enumerate() {
            for (j, &e) in row_ids.iter().enumerate() {
                if e >= 0 {
                    r_rows.push(pos[r * top_k + j]);
                    r_w.push(weights[r * top_k + j]);
                }
            }
            r_off.push(r_rows.len());
        }
        Ok(ExpertLayout {
            rows,
            offsets,
            reduce: RowSums::new(r_off, r_rows, Some(r_w))?,
        })
    }

    /// Rows per local expert (vLLM's `expert_num_tokens`).
    pub fn expert_num_tokens(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_follow_vllm() {
        let p = ExpertPlacement::linear(10, 4).unwrap();
        let ranks: Vec<usize> = (0..10).map(|e| p.rank_of(e)).collect();
        assert_eq!(ranks, [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]);
        assert_eq!(p.experts_of(1), &[3, 4, 5]);
        assert_eq!(p.local_of(4), 1);
        let p = ExpertPlacement::round_robin(10, 4).unwrap();
        assert_eq!(p.experts_of(1), &[1, 5, 9]);
        assert_eq!(p.local_of(9), 2);
        assert!(ExpertPlacement::from_ranks(&[0, 4], 4).is_err());
        assert!(ExpertPlacement::linear(0, 4).is_err());
    }

    #[test]
    fn a_token_goes_once_to_each_rank_of_its_experts() {
        // 6 experts on 3 ranks: [0,1] [2,3] [4,5].
        let p = ExpertPlacement::linear(6, 3).unwrap();
        let ids = [0u32, 1, 2, 5, 4, 3, 1, 0];
        let w = [0.5f32, 0.25, 1.0, 2.0, 0.1, 0.2, 0.3, 0.4];
        let r = Routing {
            topk_ids: &ids,
            topk_weights: &w,
            top_k: 2,
        };
        r.check(4, &p).unwrap();
        let s = plan_all_to_all(&r, &p);
        // token 0 -> rank 0 once (both experts there); token 1 -> 1, 2; token 2 -> 2, 1; token 3 -> 0.
        assert_eq!(s.counts, [2, 2, 2]);
        assert_eq!(s.rows, [0, 3, 1, 2, 1, 2]);
        assert_eq!(s.back.segment(1).0, &[2, 4]);
        assert_eq!(s.back.segment(2).0, &[3, 5]);
        assert_eq!(s.expert_counts, [2, 2, 1, 1, 1, 1]);
        // Row 2 is token 1 at rank 1: expert 2 is its local 0, expert 5 elsewhere.
        let m = &s.meta[2 * 4..3 * 4];
        assert_eq!(&m[..2], &[0, -1]);
        assert_eq!(f32::from_bits(m[2] as u32), 1.0);
        // Layout on rank 0 of rows [token 0: 0,1 ; token 3: 1,0].
        let l = ExpertLayout::new(&[0, 1, 1, 0], &[0.5, 0.25, 0.3, 0.4], 2, 2).unwrap();
        assert_eq!(l.rows, [0, 1, 0, 1]);
        assert_eq!(l.expert_num_tokens(), [2, 2]);
        assert_eq!(
            l.reduce.segment(1),
            (&[3u32, 1][..], Some(&[0.3f32, 0.4][..]))
        );
        assert!(ExpertLayout::new(&[2, -1], &[1.0, 1.0], 2, 2).is_err());
    }

    #[test]
    fn bad_routing_is_refused() {
        let p = ExpertPlacement::linear(4, 2).unwrap();
        let ok = |ids: &[u32], w: &[f32], k: usize, t: usize| {
            Routing {
                topk_ids: ids,
                topk_weights: w,
                top_k: k,
            }
            .check(t, &p)
        };
        assert!(ok(&[0, 1], &[1.0, 1.0], 2, 1).is_ok());
        assert!(ok(&[0, 4], &[1.0, 1.0], 2, 1).is_err());
        assert!(ok(&[1, 1], &[1.0, 1.0], 2, 1).is_err());
        assert!(ok(&[0, 1], &[1.0, f32::NAN], 2, 1).is_err());
        assert!(ok(&[0, 1], &[1.0], 2, 1).is_err());
        assert!(ok(&[0, 1], &[1.0, 1.0], 2, 2).is_err());
        assert!(ok(&[], &[], 0, 0).is_err());
    }
}
