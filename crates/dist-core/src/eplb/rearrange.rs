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
//! expert, e.g. `w13` and `w2`); received tensors and local copies land in buffers and are
//! swapped into their slots, so a rank's own old weights stay readable until every send of the
//! layer is done.
//!
//! **Transport.** The sends and receives of a layer are one list of [`PeerOp`]s in an order every
//! rank agrees on (by expert, then source, then destination, then weight). [`exchange`] runs them
//! with the group's point-to-point calls in that order, which cannot deadlock even when a send
//! waits for its receiver: the first unfinished op of the list has both its ranks waiting on it.
//! A grouped send/recv (vLLM's `batch_isend_irecv`) takes the same list unchanged.

use std::collections::BTreeMap;

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

/// One point-to-point operation of a grouped exchange (vLLM's `P2POp`).
#[derive(Debug)]
pub enum PeerOp<'a, T> {
    /// Send `tensor` to group rank `peer`.
    Send {
        /// Destination (group rank).
        peer: usize,
        /// What to send.
        tensor: &'a T,
    },
    /// Receive from group rank `peer` into `tensor` (its dtype and shape must match the sender's).
    Recv {
        /// Source (group rank).
        peer: usize,
        /// Where to receive.
        tensor: &'a mut T,
    },
}

/// Runs `ops` over `group` in list order with blocking send/recv; see the module docs for why
/// an order every rank agrees on cannot deadlock. Each call is bounded by the group's deadline.
pub fn exchange<B: Backend>(
    group: &GroupCoordinator<B>,
    ops: &mut [PeerOp<'_, B::Tensor>],
) -> Result<()> {
    for op in ops.iter_mut() {
        match op {
            PeerOp::Send { peer, tensor } => group.send(tensor, Some(*peer))?,
            PeerOp::Recv { peer, tensor } => {
                let got = group.recv(tensor.dtype(), tensor.shape(), Some(*peer))?;
                **tensor = got;
            }
        }
    }
    Ok(())
}

/// The order every rank agrees on: (expert, source rank, destination rank, weight index).
type OpKey = (usize, usize, usize, usize);

/// What one layer's rearrangement did on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Experts sent.
    pub sent: usize,
    /// Experts received.
    pub received: usize,
    /// Slots filled by a local copy.
    pub copied: usize,
    /// Bytes sent plus bytes received.
    pub bytes: usize,
}

/// Moves one layer's expert weights from `old` to `new` (full `phy2log` rows) on this rank of
/// the EP group `ep`. `weights[slot][w]` are this rank's slots, each with the same number of
/// weight tensors, and the same shapes and dtypes from slot to slot. Collective over the ranks
/// that exchange experts in this layer.
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
    let nw = weights.first().map_or(0, Vec::len);
    crate::ensure_arg!(
        weights.iter().all(|s| s.len() == nw),
        "eplb rearrange: slots hold different numbers of weight tensors"
    );
    // Buffers: local copies now, receive targets shaped like the slot they will replace.
    let mut buffers: BTreeMap<usize, Vec<B::Tensor>> = BTreeMap::new();
    for &(dst, src) in &plan.local {
        buffers.insert(dst, weights[src].clone());
    }
    for m in &plan.recvs {
        let bufs = weights[m.slot]
            .iter()
            .map(|t| empty_like::<B>(ep, t))
            .collect::<Result<Vec<_>>>()?;
        buffers.insert(m.slot, bufs);
    }
    let mut stats = LayerStats {
        sent: plan.sends.len(),
        received: plan.recvs.len(),
        copied: plan.local.len() + plan.duplicates.len(),
        bytes: 0,
    };
    // One op list in the global order (expert, src, dst, weight).
    {
        let me = ep.rank_in_group();
        let mut keyed: Vec<(OpKey, PeerOp<'_, B::Tensor>)> = Vec::new();
        for m in &plan.sends {
            for (w, t) in weights[m.slot].iter().enumerate() {
                stats.bytes += t.nbytes();
                keyed.push((
                    (m.expert, me, m.peer, w),
                    PeerOp::Send {
                        peer: m.peer,
                        tensor: t,
                    },
                ));
            }
        }
        let recv_experts: BTreeMap<usize, &ExpertMove> =
            plan.recvs.iter().map(|m| (m.slot, m)).collect();
        for (slot, bufs) in buffers.iter_mut() {
            let Some(m) = recv_experts.get(slot) else {
                continue;
            };
            for (w, t) in bufs.iter_mut().enumerate() {
                stats.bytes += t.nbytes();
                keyed.push((
                    (m.expert, m.peer, me, w),
                    PeerOp::Recv {
                        peer: m.peer,
                        tensor: t,
                    },
                ));
            }
        }
        keyed.sort_by_key(|(k, _)| *k);
        let mut ops: Vec<PeerOp<'_, B::Tensor>> = keyed.into_iter().map(|(_, op)| op).collect();
        exchange(ep, &mut ops)?;
    }
    for (slot, bufs) in buffers {
        weights[slot] = bufs;
    }
    for &(dst, src) in &plan.duplicates {
        weights[dst] = weights[src].clone();
    }
    Ok(stats)
}

fn empty_like<B: Backend>(ep: &GroupCoordinator<B>, t: &B::Tensor) -> Result<B::Tensor> {
    match ep.device_communicator() {
        Some(c) => c.empty(t.dtype(), t.shape()),
        None => B::from_host(&crate::HostTensor::zeros(t.dtype(), t.shape()), t.device()),
    }
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
