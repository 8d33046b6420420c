//! A tensor-parallel MLP, the way a model crate uses `dist`: it depends on `dist-core` alone and
//! is generic over the backend `B`. The application picks the backend (through the `dist` facade)
//! and hands the model its TP group.
//!
//! `y = W2 · gelu(W1 · x)`: `W1` is column-parallel (each rank holds `ffn/tp` output rows), `W2`
//! is row-parallel (each rank holds the matching `ffn/tp` input columns), and one `all_reduce`
//! over the TP group sums the partial outputs — Megatron's split, as vLLM's `MergedColumnParallelLinear`
//! and `RowParallelLinear` do it. The math runs on the host (this is an example of the communication
//! pattern, not a kernel library).

use dist_core::{divide, Backend, GroupCoordinator, HostTensor, Result};

/// The full (unsharded) weight element `(layer, row, col)`: deterministic, so every rank can
/// build its own shard and a single process can build the whole matrix.
pub fn weight(layer: u64, row: usize, col: usize) -> f32 {
    let mut h = layer
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((row as u64) << 32 | col as u64);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    ((h % 2001) as f32 - 1000.0) / 10_000.0
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
}

/// One rank's shard of the MLP.
#[derive(Debug, Clone)]
pub struct TpMlp {
    hidden: usize,
    ffn_shard: usize,
    /// `[ffn_shard, hidden]`: rows `rank*ffn_shard..` of W1.
    w1: Vec<f32>,
    /// `[hidden, ffn_shard]`: columns `rank*ffn_shard..` of W2.
    w2: Vec<f32>,
}

impl TpMlp {
    /// The shard of TP rank `tp_rank` of `tp_size` for a `hidden → ffn → hidden` MLP.
    pub fn new(hidden: usize, ffn: usize, tp_rank: usize, tp_size: usize) -> Result<Self> {
        let ffn_shard = divide(ffn, tp_size)?;
        let off = tp_rank * ffn_shard;
        let mut w1 = Vec::with_capacity(ffn_shard * hidden);
        for f in 0..ffn_shard {
            for h in 0..hidden {
                w1.push(weight(1, off + f, h));
            }
        }
        let mut w2 = Vec::with_capacity(hidden * ffn_shard);
        for h in 0..hidden {
            for f in 0..ffn_shard {
                w2.push(weight(2, h, off + f));
            }
        }
        Ok(TpMlp {
            hidden,
            ffn_shard,
            w1,
            w2,
        })
    }

    /// This rank's partial output for a batch `x` of shape `[tokens, hidden]` (before the all_reduce).
    pub fn partial(&self, x: &HostTensor) -> Result<HostTensor> {
        let xs = x.as_slice::<f32>()?;
        dist_core::ensure_arg!(
            x.shape().len() == 2 && x.shape()[1] == self.hidden,
            "input must be [tokens, {}], got {:?}",
            self.hidden,
            x.shape()
        );
        let tokens = x.shape()[0];
        let mut out = vec![0f32; tokens * self.hidden];
        let mut act = vec![0f32; self.ffn_shard];
        for t in 0..tokens {
            let xr = &xs[t * self.hidden..(t + 1) * self.hidden];
            for (f, a) in act.iter_mut().enumerate() {
                let w = &self.w1[f * self.hidden..(f + 1) * self.hidden];
                *a = gelu(w.iter().zip(xr).map(|(a, b)| a * b).sum());
            }
            for h in 0..self.hidden {
                let w = &self.w2[h * self.ffn_shard..(h + 1) * self.ffn_shard];
                out[t * self.hidden + h] = w.iter().zip(&act).map(|(a, b)| a * b).sum();
            }
        }
        HostTensor::from_vec(&[tokens, self.hidden], out)
    }

    /// The MLP's output: this rank's partial result summed over the TP group.
    pub fn forward<B: Backend>(
        &self,
        tp: &GroupCoordinator<B>,
        x: &HostTensor,
    ) -> Result<HostTensor> {
        let part = B::from_host(&self.partial(x)?, tp.device())?;
        let y = tp.all_reduce(part)?;
        B::to_host(&y)
    }
}

/// The same MLP in one process, unsharded: the reference the parallel output must equal.
pub fn single_process(hidden: usize, ffn: usize, x: &HostTensor) -> Result<HostTensor> {
    TpMlp::new(hidden, ffn, 0, 1)?.partial(x)
}
