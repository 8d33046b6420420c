//! Expert load over a sliding window, as vLLM's `EplbState` records it.
//!
//! Each forward pass, the MoE layers add the number of tokens routed to each *physical* expert
//! slot into the pass counters ([`ExpertLoadWindow::pass_mut`]); at the end of a step the pass
//! becomes one entry of a ring of `window` entries ([`ExpertLoadWindow::commit_pass`]). When a
//! rebalance is due, the window is summed, each slot's count is added to the logical expert the
//! slot holds, and the result is summed over the EP group
//! ([`ExpertLoadWindow::global_logical_load`]): the load [`super::rebalance_experts`] takes.
//!
//! [`EplbSchedule`] is vLLM's step counting: a rebalance every `step_interval` steps, the first
//! one after a quarter of the interval, and passes recorded only in the last `window` steps
//! before a rebalance (earlier ones would be overwritten before they are read).

use crate::{Backend, DType, GroupCoordinator, HostTensor, Result};

/// Tokens per physical expert slot, per layer, over the last `window` recorded passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertLoadWindow {
    layers: usize,
    physical: usize,
    window: usize,
    /// The pass being recorded: `[layer][slot]`.
    pass: Vec<u64>,
    /// The ring: `[entry][layer][slot]`.
    ring: Vec<u64>,
    next: usize,
}

impl ExpertLoadWindow {
    /// An empty window of `window` passes for `layers` MoE layers of `physical` slots each.
    pub fn new(layers: usize, physical: usize, window: usize) -> Result<Self> {
        crate::ensure_arg!(
            window > 0,
            "eplb: the load window must hold at least one pass"
        );
        let per = layers
            .checked_mul(physical)
            .and_then(|p| p.checked_mul(window).map(|_| p))
            .ok_or_else(|| crate::Error::invalid("eplb: load window size overflows"))?;
        Ok(ExpertLoadWindow {
            layers,
            physical,
            window,
            pass: vec![0; per],
            ring: vec![0; per * window],
            next: 0,
        })
    }

    /// MoE layers.
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// Physical slots per layer.
    pub fn physical(&self) -> usize {
        self.physical
    }
    /// Passes the window holds.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Layer `layer`'s counters of the pass being recorded, one per physical slot.
    pub fn pass_mut(&mut self, layer: usize) -> Result<&mut [u64]> {
        crate::ensure_arg!(
            layer < self.layers,
            "eplb: layer {layer} out of range for {} layers",
            self.layers
        );
        Ok(&mut self.pass[layer * self.physical..(layer + 1) * self.physical])
    }

    /// Adds one token routed to each slot of `slots` in layer `layer` (a router's top-k output,
    /// flattened).
    pub fn record_routed(&mut self, layer: usize, slots: &[usize]) -> Result<()> {
        let physical = self.physical;
        let row = self.pass_mut(layer)?;
        for &s in slots {
            crate::ensure_arg!(
                s < physical,
                "eplb: routed to slot {s}, layer has {physical}"
            );
            row[s] += 1;
        }
        Ok(())
    }

    /// Moves the pass into the window (overwriting its oldest entry) and starts a new one.
    pub fn commit_pass(&mut self) {
        let n = self.pass.len();
        self.ring[self.next * n..(self.next + 1) * n].copy_from_slice(&self.pass);
        self.pass.fill(0);
        self.next = (self.next + 1) % self.window;
    }

    /// Forgets the pass (a dummy or profiling step).
    pub fn discard_pass(&mut self) {
        self.pass.fill(0);
    }

    /// This rank's window summed per logical expert: `[layer][logical]`. `phy2log` is the map
    /// the window was recorded under; a slot of `-1`-style emptiness does not exist here (every
    /// slot holds an expert).
    pub fn logical_load(
        &self,
        phy2log: &[Vec<usize>],
        num_logical: usize,
    ) -> Result<Vec<Vec<u64>>> {
        crate::ensure_arg!(
            phy2log.len() == self.layers,
            "eplb: the map has {} layers, the window {}",
            phy2log.len(),
            self.layers
        );
        let n = self.pass.len();
        let mut out = vec![vec![0u64; num_logical]; self.layers];
        for (l, row) in phy2log.iter().enumerate() {
            crate::ensure_arg!(
                row.len() == self.physical,
                "eplb: layer {l} of the map has {} slots, the window {}",
                row.len(),
                self.physical
            );
            for (s, &e) in row.iter().enumerate() {
                crate::ensure_arg!(
                    e < num_logical,
                    "eplb: layer {l} slot {s} holds expert {e}, outside 0..{num_logical}"
                );
                let at = l * self.physical + s;
                let total: u64 = (0..self.window).map(|w| self.ring[w * n + at]).sum();
                out[l][e] += total;
            }
        }
        Ok(out)
    }

    /// [`Self::logical_load`] summed over every rank of the EP group (one all-reduce of
    /// `layers × num_logical` int64 values), the load every rank then plans from.
    pub fn global_logical_load<B: Backend>(
        &self,
        ep: &GroupCoordinator<B>,
        phy2log: &[Vec<usize>],
        num_logical: usize,
    ) -> Result<Vec<Vec<u64>>> {
        let local = self.logical_load(phy2log, num_logical)?;
        let flat: Vec<i64> = local
            .iter()
            .flatten()
            .map(|&x| i64::try_from(x).map_err(|_| crate::Error::invalid("eplb: load exceeds i64")))
            .collect::<Result<_>>()?;
        let t = HostTensor::from_vec(&[self.layers, num_logical], flat)?;
        let summed = ep.all_reduce(B::from_host(&t, ep.device())?)?;
        let h = B::to_host(&summed)?;
        crate::ensure_arg!(
            h.dtype() == DType::I64 && h.numel() == self.layers * num_logical,
            "eplb: the all-reduced load came back as {} {:?}",
            h.dtype(),
            h.shape()
        );
        Ok(h.as_slice::<i64>()?
            .chunks(num_logical.max(1))
            .take(self.layers)
            .map(|r| r.iter().map(|&x| x.max(0) as u64).collect())
            .collect())
    }
}

/// vLLM's EPLB step counting; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EplbSchedule {
    interval: usize,
    window: usize,
    step: usize,
}

impl EplbSchedule {
    /// A rebalance every `step_interval` steps over a window of `window` passes; the first comes
    /// after `step_interval / 4` steps (vLLM starts the counter at three quarters).
    pub fn new(step_interval: usize, window: usize) -> Result<Self> {
        crate::ensure_arg!(
            step_interval > 0,
            "eplb: the step interval must be at least 1"
        );
        crate::ensure_arg!(
            window > 0,
            "eplb: the load window must hold at least one pass"
        );
        Ok(EplbSchedule {
            interval: step_interval,
            window,
            step: step_interval - step_interval / 4,
        })
    }

    /// Steps since the last rebalance.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Should this step's pass be recorded (are we within `window` steps of the rebalance)?
    pub fn should_record(&self) -> bool {
        self.interval.saturating_sub(self.step) <= self.window
    }

    /// Ends a step: commits (or, for a dummy step or one outside the window, discards) the pass,
    /// counts the step, and returns true when a rebalance is due now (the counter restarts).
    /// Every rank of the EP group must call it once per step, dummy steps included, so that all
    /// rebalance together.
    pub fn end_step(&mut self, load: &mut ExpertLoadWindow, dummy: bool) -> bool {
        if !dummy && self.should_record() {
            load.commit_pass();
        } else {
            load.discard_pass();
        }
        self.step += 1;
        if self.step >= self.interval {
            self.step = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_the_last_passes_per_logical_expert() {
        let mut w = ExpertLoadWindow::new(1, 4, 2).unwrap();
        let map = vec![vec![0, 1, 0, 2]];
        for pass in 0..3u64 {
            let row = w.pass_mut(0).unwrap();
            row.copy_from_slice(&[pass + 1, 10, 100, 1000]);
            w.commit_pass();
        }
        // passes 1 and 2 remain (pass 0 was overwritten): slot sums 2+3, 20, 200, 2000.
        assert_eq!(w.logical_load(&map, 3).unwrap(), vec![vec![205, 20, 2000]]);
        w.record_routed(0, &[3, 3, 1]).unwrap();
        w.discard_pass();
        assert_eq!(w.logical_load(&map, 3).unwrap(), vec![vec![205, 20, 2000]]);
        assert!(w.record_routed(0, &[4]).is_err());
        assert!(w.logical_load(&[vec![0, 1, 0, 3]], 3).is_err());
    }

    #[test]
    fn schedule_matches_vllm() {
        // interval 8, window 3: starts at step 6, so steps 6,7 then 5..7 of each period record.
        let mut s = EplbSchedule::new(8, 3).unwrap();
        let mut w = ExpertLoadWindow::new(1, 1, 3).unwrap();
        let mut rebalanced_at = vec![];
        let mut recorded = vec![];
        for t in 0..20 {
            recorded.push(s.should_record());
            if s.end_step(&mut w, false) {
                rebalanced_at.push(t);
            }
        }
        assert_eq!(rebalanced_at, vec![1, 9, 17]);
        let expect: Vec<bool> = (0..20)
            .map(|t| {
                let step = (6 + t) % 8;
                8 - step <= 3
            })
            .collect();
        assert_eq!(recorded, expect);
    }
}
