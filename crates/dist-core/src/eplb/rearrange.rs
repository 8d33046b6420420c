//! Moving expert weights to a new plan, layer by layer (vLLM's `rearrange_expert_weights_inplace`:
//! `move_to_buffer`, one grouped send/recv, `move_from_buffer`).
//!
//! Per layer and rank, [`LayerTransfer::plan`] decides from the old and new maps alone — every
//! rank computes every other rank's plan the same way, so no message says what will be sent:
//! - a slot whose expert does not change is left alone;
//! - a slot whose new expert this rank already holds (in another slot) is copied locally;
//! - every other new expert is received once (into its first slot, the *primary*) and copied
//!   into its other slots on this rank afterwards;
//! - the ranks that held an expert share its sends among the ranks that need it: with `S`
//!   senders and `D` receivers (ranks that do not hold it already), sender `i` serves receivers
//!   `[i·⌊D/S⌋, (i+1)·⌊D/S⌋)` and then receiver `S·⌊D/S⌋ + i` if there is one — vLLM's rule,
//!   so a mixed job would pair the same way.
//!
//! Unlike vLLM, an expert of the new map that no rank holds in the old one is an error (vLLM posts
//! no receive for it and then copies an unwritten buffer into the slot), and
//! [`rearrange_experts`] first checks that every rank plans from the same maps (one all-gather of
//! a fingerprint), since a rank with a different map would wait for sends that never come.
//!
//! The weights of a layer are held per slot (`weights[slot][w]`, one tensor per weight of the
//! expert, e.g. `w13` and `w2`) and are rewritten **in place**: each slot keeps its tensors and
//! their memory. A received expert goes straight into its slot's memory unless the slot's old
//! expert is still to be sent or copied from in this layer; only such slots (and local copies
//! onto them) go through a staging buffer, copied in after the exchange. vLLM stages every moved
//! expert through its buffer.
//!
//! **Transport.** The sends and receives of a layer are one grouped call,
//! [`GroupCoordinator::batch_send_recv`] (vLLM's `batch_isend_irecv`), its list in an order every
//! rank agrees on (by expert, then source, then destination, then weight), so several messages
//! between one pair of ranks match in order.

use std::collections::BTreeMap;

use crate::communicator::{Comm, P2pOp, View, ViewMut};
use crate::{Backend, DeviceCommunicator, Error, GroupCoordinator, HostGroupExt, Result, Tensor};

/// One expert moving between this rank and a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpertMove {
    /// The logical expert.
    pub expert: usize,
    /// The other rank (in the EP group).
    pub peer: usize,
    /// The local slot: read from (send) or received into (receive).
    pub slot: usize,
}

/// What one rank does for one layer; see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerTransfer {
    /// `(dst slot, src slot)`: local copies of old weights into buffers.
    pub local: Vec<(usize, usize)>,
    /// Experts this rank sends, by expert then peer.
    pub sends: Vec<ExpertMove>,
    /// Experts this rank receives (into their primary slot's buffer), by expert.
    pub recvs: Vec<ExpertMove>,
    /// `(dst slot, src slot)`: after the buffers are in place, copies of a received expert into
    /// its other slots.
    pub duplicates: Vec<(usize, usize)>,
}

impl LayerTransfer {
    /// Rank `rank`'s part of moving one layer from `old` to `new` (`phy2log` rows of
    /// `world × slots_per_rank` slots).
    pub fn plan(old: &[usize], new: &[usize], rank: usize, slots_per_rank: usize) -> Result<Self> {
        crate::ensure_arg!(
            old.len() == new.len(),
            "eplb rearrange: old map has {} slots, new map {}",
            old.len(),
            new.len()
        );
        crate::ensure_arg!(
            slots_per_rank > 0 && old.len() % slots_per_rank == 0,
            "eplb rearrange: {} slots do not split into ranks of {slots_per_rank}",
            old.len()
        );
        let world = old.len() / slots_per_rank;
        crate::ensure_arg!(
            rank < world,
            "eplb rearrange: rank {rank} out of range for {world} ranks"
        );
        let holders = |map: &[usize]| {
            let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (slot, &e) in map.iter().enumerate() {
                let r = slot / slots_per_rank;
                let v = m.entry(e).or_default();
                if v.last() != Some(&r) {
                    v.push(r);
                }
            }
            m
        };
        let old_holders = holders(old);
        let new_holders = holders(new);
        if let Some(e) = new_holders.keys().find(|e| !old_holders.contains_key(e)) {
            return Err(Error::invalid(format!(
                "eplb rearrange: expert {e} of the new map is on no rank in the old map"
            )));
        }
        let base = rank * slots_per_rank;
        let old_local = &old[base..base + slots_per_rank];
        let new_local = &new[base..base + slots_per_rank];
        let first_old_slot = |e: usize| old_local.iter().position(|&x| x == e);
        // Who sends expert e to whom: (senders, receivers that do not hold it).
        let pairing = |e: usize| -> (Vec<usize>, Vec<usize>) {
            let senders = old_holders.get(&e).cloned().unwrap_or_default();
            let receivers = new_holders
                .get(&e)
                .map(|v| v.iter().copied().filter(|r| !senders.contains(r)).collect())
                .unwrap_or_default();
            (senders, receivers)
        };

        let mut t = LayerTransfer::default();
        let mut primary: BTreeMap<usize, usize> = BTreeMap::new();
        for (s, &e) in new_local.iter().enumerate() {
            if old_local[s] == e {
                continue;
            }
            if let Some(src) = first_old_slot(e) {
                t.local.push((s, src));
            } else if let Some(&p) = primary.get(&e) {
                t.duplicates.push((s, p));
            } else {
                primary.insert(e, s);
            }
        }
        // Sends: each expert this rank holds, to its share of the receivers.
        let mut held: Vec<(usize, usize)> = Vec::new();
        for (s, &e) in old_local.iter().enumerate() {
            if !held.iter().any(|&(x, _)| x == e) {
                held.push((e, s));
            }
        }
        held.sort_unstable();
        for (e, slot) in held {
            let (senders, receivers) = pairing(e);
            if receivers.is_empty() {
                continue;
            }
            let i = senders.iter().position(|&r| r == rank).expect("holds it");
            let per = receivers.len() / senders.len();
            let mut to: Vec<usize> = receivers[i * per..(i + 1) * per].to_vec();
            if let Some(&extra) = receivers.get(senders.len() * per + i) {
                to.push(extra);
            }
            t.sends.extend(to.into_iter().map(|peer| ExpertMove {
                expert: e,
                peer,
                slot,
            }));
        }
        for (&e, &slot) in &primary {
            let (senders, receivers) = pairing(e);
            let j = receivers.iter().position(|&r| r == rank).expect("needs it");
            let per = receivers.len() / senders.len();
            let rem = senders.len() * per;
            let peer = if j < rem {
                senders[j / per]
            } else {
                senders[j - rem]
            };
            t.recvs.push(ExpertMove {
                expert: e,
                peer,
                slot,
            });
        }
        Ok(t)
    }

    /// Bytes-free summary: experts sent, received, copied locally.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.sends.len(),
            self.recvs.len(),
            self.local.len() + self.duplicates.len(),
        )
    }
}

/// The order every rank agrees on: (expert, source rank, destination rank, weight index).
type OpKey = (usize, usize, usize, usize);

/// One send or receive of a layer's exchange, on views of the slots or their staging buffers.
type LayerOp<'o, 'v, B> = P2pOp<'o, View<'v, B>, ViewMut<'v, B>>;

/// What one layer's rearrangement did on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Experts sent.
    pub sent: usize,
    /// Experts received.
    pub received: usize,
    /// Slots filled by a local copy.
    pub copied: usize,
    /// Received experts that went through a staging buffer (their slot was also read).
    pub staged: usize,
    /// Bytes sent plus bytes received.
    pub bytes: usize,
}

/// `(&v[a], &mut v[b])` for `a != b`.
fn split_pair<T>(v: &mut [T], a: usize, b: usize) -> (&T, &mut T) {
    assert_ne!(a, b, "a slot is never copied onto itself");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// Copies every weight tensor of slot `src` into slot `dst`'s memory.
fn copy_slot<B: Backend>(src: &[B::Tensor], dst: &mut [B::Tensor]) -> Result<()> {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        Comm::<B>::copy(&Comm::<B>::view(s), &mut Comm::<B>::view_mut(d))?;
    }
    Ok(())
}

/// A tensor shaped like `t` whose contents will be overwritten (the communicator's pool, or host
/// zeros on a group without a communicator).
fn alloc_like<B: Backend>(ep: &GroupCoordinator<B>, t: &B::Tensor) -> Result<B::Tensor> {
    match ep.device_communicator() {
        Some(c) => c.alloc(t.dtype(), t.shape()),
        None => B::from_host(&crate::HostTensor::zeros(t.dtype(), t.shape()), t.device()),
    }
}

/// Moves one layer's expert weights from `old` to `new` (full `phy2log` rows) on this rank of
/// the EP group `ep`, **in place**: every slot keeps its tensors and their memory, and only the
/// bytes behind them change, so a model whose kernels hold the slots' addresses (CUDA graphs)
/// keeps working. `weights[slot][w]` are this rank's slots, each with the same number of weight
/// tensors, and the same shapes and dtypes from slot to slot. Collective over the ranks that
/// exchange experts in this layer: their sends and receives are one
/// [`GroupCoordinator::batch_send_recv`].
///
/// Where the bytes go: a received expert lands straight in its slot's memory unless that slot's
/// old expert is still to be sent or copied from (then in a staging buffer, copied into the slot
/// after the exchange); local copies likewise; duplicates are copied from their primary slot
/// last.
pub fn rearrange_layer<B: Backend>(
    ep: &GroupCoordinator<B>,
    old: &[usize],
    new: &[usize],
    weights: &mut [Vec<B::Tensor>],
) -> Result<LayerStats> {
    let slots = weights.len();
    let plan = LayerTransfer::plan(old, new, ep.rank_in_group(), slots)?;
    crate::ensure_arg!(
        old.len() == slots * ep.world_size(),
        "eplb rearrange: {} slots in the map, {slots} per rank × {} ranks here",
        old.len(),
        ep.world_size()
    );
    if let Some(first) = weights.first() {
        for (s, slot) in weights.iter().enumerate() {
            crate::ensure_arg!(
                slot.len() == first.len()
                    && slot
                        .iter()
                        .zip(first)
                        .all(|(a, b)| a.dtype() == b.dtype() && a.shape() == b.shape()),
                "eplb rearrange: slot {s}'s weights differ from slot 0's in number, dtype or shape"
            );
        }
    }
    // A slot is read when its old expert is sent or copied from.
    let mut read = vec![false; slots];
    plan.sends.iter().for_each(|m| read[m.slot] = true);
    plan.local.iter().for_each(|&(_, src)| read[src] = true);
    let mut staging: BTreeMap<usize, Vec<B::Tensor>> = BTreeMap::new();
    for dst in plan
        .local
        .iter()
        .map(|&(d, _)| d)
        .chain(plan.recvs.iter().map(|m| m.slot))
    {
        if read[dst] {
            let bufs = weights[dst]
                .iter()
                .map(|t| alloc_like(ep, t))
                .collect::<Result<Vec<_>>>()?;
            staging.insert(dst, bufs);
        }
    }
    let mut stats = LayerStats {
        sent: plan.sends.len(),
        received: plan.recvs.len(),
        copied: plan.local.len() + plan.duplicates.len(),
        staged: plan.recvs.iter().filter(|m| read[m.slot]).count(),
        bytes: 0,
    };
    // 1. Local copies of old experts: straight into slots nobody reads, else into staging.
    for &(dst, src) in &plan.local {
        match staging.get_mut(&dst) {
            Some(buf) => copy_slot::<B>(&weights[src], buf)?,
            None => {
                let (s, d) = split_pair(weights, src, dst);
                copy_slot::<B>(s, d)?;
            }
        }
    }
    // 2. One grouped exchange in the global order (expert, src, dst, weight).
    {
        let me = ep.rank_in_group();
        let recv_of: BTreeMap<usize, &ExpertMove> =
            plan.recvs.iter().map(|m| (m.slot, m)).collect();
        let sends_of = |slot: usize| plan.sends.iter().filter(move |m| m.slot == slot);
        // Each slot lends shared views (read) or mutable ones (received into directly).
        let mut read_views: Vec<(usize, Vec<View<'_, B>>)> = Vec::new();
        let mut recv_views: Vec<(&ExpertMove, Vec<ViewMut<'_, B>>)> = Vec::new();
        for (s, slot) in weights.iter_mut().enumerate() {
            if read[s] {
                read_views.push((s, slot.iter().map(Comm::<B>::view).collect()));
            } else if let Some(m) = recv_of.get(&s) {
                recv_views.push((m, slot.iter_mut().map(Comm::<B>::view_mut).collect()));
            }
        }
        for (s, bufs) in staging.iter_mut() {
            if let Some(m) = recv_of.get(s) {
                recv_views.push((m, bufs.iter_mut().map(Comm::<B>::view_mut).collect()));
            }
        }
        let mut keyed: Vec<(OpKey, LayerOp<'_, '_, B>)> = Vec::new();
        for (s, views) in &read_views {
            for m in sends_of(*s) {
                for (w, v) in views.iter().enumerate() {
                    stats.bytes += v.nbytes();
                    keyed.push(((m.expert, me, m.peer, w), P2pOp::Send(v, m.peer)));
                }
            }
        }
        for (m, views) in recv_views.iter_mut() {
            for (w, v) in views.iter_mut().enumerate() {
                stats.bytes += v.nbytes();
                keyed.push(((m.expert, m.peer, me, w), P2pOp::Recv(v, m.peer)));
            }
        }
        keyed.sort_by_key(|(k, _)| *k);
        let mut ops: Vec<_> = keyed.into_iter().map(|(_, op)| op).collect();
        if !ops.is_empty() {
            ep.batch_send_recv(&mut ops)?;
        }
    }
    // 3. Staged experts into their slots, then duplicates from their primary slot.
    for (slot, bufs) in &staging {
        copy_slot::<B>(bufs, &mut weights[*slot])?;
    }
    for &(dst, src) in &plan.duplicates {
        let (s, d) = split_pair(weights, src, dst);
        copy_slot::<B>(s, d)?;
    }
    Ok(stats)
}

/// A 64-bit FNV-1a fingerprint of two maps, to check every rank plans from the same ones.
fn fingerprint(old: &[Vec<usize>], new: &[Vec<usize>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    for m in [old, new] {
        eat(m.len() as u64);
        for row in m {
            eat(row.len() as u64);
            row.iter().for_each(|&e| eat(e as u64));
        }
    }
    h
}

/// Moves every layer's expert weights from `old` to `new` (`[layer][slot]` maps), layer by layer:
/// first one host-group all-gather checks that every rank of `ep` has the same maps (an error
/// names the ranks that differ), then [`rearrange_layer`] per layer. `weights[layer][slot][w]`.
pub fn rearrange_experts<B: Backend>(
    ep: &GroupCoordinator<B>,
    old: &[Vec<usize>],
    new: &[Vec<usize>],
    weights: &mut [Vec<Vec<B::Tensor>>],
) -> Result<Vec<LayerStats>> {
    crate::ensure_arg!(
        old.len() == new.len() && old.len() == weights.len(),
        "eplb rearrange: {} old layers, {} new layers, {} layers of weights",
        old.len(),
        new.len(),
        weights.len()
    );
    if ep.world_size() > 1 {
        let mine = fingerprint(old, new);
        let all: Vec<u64> = ep.host_group().all_gather_obj(&mine)?;
        let odd: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
        if !odd.is_empty() {
            return Err(Error::invalid(format!(
                "eplb rearrange on {}: ranks {odd:?} have other expert maps than rank 0",
                ep.unique_name()
            )));
        }
    }
    let mut stats = Vec::with_capacity(old.len());
    for (l, w) in weights.iter_mut().enumerate() {
        stats.push(rearrange_layer(ep, &old[l], &new[l], w)?);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank's plan together: each receive has exactly one matching send, and after the
    /// moves each rank's slots hold the new map's experts.
    fn check_consistent(old: &[usize], new: &[usize], per: usize) {
        let world = old.len() / per;
        let plans: Vec<LayerTransfer> = (0..world)
            .map(|r| LayerTransfer::plan(old, new, r, per).unwrap())
            .collect();
        let mut sends: Vec<(usize, usize, usize)> = vec![];
        let mut recvs: Vec<(usize, usize, usize)> = vec![];
        for (r, p) in plans.iter().enumerate() {
            sends.extend(p.sends.iter().map(|m| (m.expert, r, m.peer)));
            recvs.extend(p.recvs.iter().map(|m| (m.expert, m.peer, r)));
            for m in &p.sends {
                assert_eq!(old[r * per + m.slot], m.expert);
            }
        }
        sends.sort();
        recvs.sort();
        assert_eq!(sends, recvs, "old {old:?} new {new:?}");
        // Simulate: slot contents after local copies, receives and duplicates.
        for (r, p) in plans.iter().enumerate() {
            let base = r * per;
            let mut slots: Vec<usize> = old[base..base + per].to_vec();
            let before = slots.clone();
            for &(d, s) in &p.local {
                slots[d] = before[s];
            }
            for m in &p.recvs {
                slots[m.slot] = m.expert;
            }
            for &(d, s) in &p.duplicates {
                slots[d] = slots[s];
            }
            assert_eq!(slots, &new[base..base + per], "rank {r}");
        }
    }

    #[test]
    fn plans_match_up_across_ranks() {
        check_consistent(&[0, 1, 2, 3], &[3, 2, 1, 0], 2);
        check_consistent(&[0, 1, 2, 3, 0, 1], &[0, 2, 0, 1, 0, 3], 2);
        // one holder, many receivers; many holders, one receiver; duplicates on one rank
        check_consistent(&[0, 1, 2, 3, 4, 5, 6, 7], &[0, 0, 0, 0, 0, 0, 1, 2], 2);
        check_consistent(
            &[5, 5, 5, 5, 0, 3, 4, 6, 1, 2],
            &[5, 0, 1, 2, 3, 4, 6, 5, 5, 5],
            2,
        );
        let mut seed = 7u64;
        for _ in 0..300 {
            let mut rnd = |m: usize| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as usize) % m
            };
            let per = 1 + rnd(4);
            let world = 1 + rnd(6);
            let e = 1 + rnd(per * world);
            let mut old: Vec<usize> = (0..per * world).map(|s| s % e).collect();
            let new: Vec<usize> = (0..per * world).map(|_| rnd(e)).collect();
            for s in (1..old.len()).rev() {
                old.swap(s, rnd(s + 1));
            }
            check_consistent(&old, &new, per);
        }
    }

    #[test]
    fn missing_expert_is_an_error() {
        let e = LayerTransfer::plan(&[0, 1, 0, 1], &[0, 2, 0, 1], 0, 2).unwrap_err();
        assert!(e.to_string().contains("expert 2"), "{e}");
        assert!(LayerTransfer::plan(&[0, 1, 2], &[0, 1, 2], 0, 2).is_err());
    }
}
