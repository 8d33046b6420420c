//! Greedy generation over TP and PP: the loop an engine runs around [`LlamaShard`].
//!
//! Each step, the first PP stage embeds the step's tokens; every other stage receives
//! `{"hidden_states", "residual"}` from the previous one into its own buffers
//! ([`CandleGroup::recv_tensor_dict_into`]), runs its layers, and sends the same dict on
//! ([`CandleGroup::send_tensor_dict`]) with the TP group as the all-gather group, so each TP rank
//! moves only its slice (vLLM's `send_tensor_dict(..., all_gather_group=get_tp_group())`). The
//! last stage gathers the logits into its buffer, picks the next token and sends it back to the
//! first stage over the PP group's host group.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use dist_candle::{CandleBackend, CandleGroup};
use dist_core::{DictValue, GroupCoordinator};

use crate::{LlamaShard, Result};

/// A rank's groups: TP within its stage, PP across stages (one-rank groups when unused).
#[derive(Debug)]
pub struct Groups<'g, B: CandleBackend> {
    /// The TP group.
    pub tp: CandleGroup<'g, B>,
    /// The PP group.
    pub pp: CandleGroup<'g, B>,
}

impl<'g, B: CandleBackend> Groups<'g, B> {
    /// The groups of `tp` and `pp` coordinators.
    pub fn new(tp: &'g GroupCoordinator<B>, pp: &'g GroupCoordinator<B>) -> Self {
        Groups {
            tp: CandleGroup::new(tp),
            pp: CandleGroup::new(pp),
        }
    }
}

/// What a generation produced on this rank.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The last stage's logits of every prompt position, `[prompt, vocab]` row-major.
    pub prompt_logits: Option<Vec<f32>>,
    /// The greedy tokens (first and last stages; empty on middle stages).
    pub tokens: Vec<u32>,
    /// Wall time of the prompt step.
    pub prefill: Duration,
    /// Wall time of the decode steps.
    pub decode: Duration,
    /// Of [`Self::prefill`] and [`Self::decode`], the time inside the TP group's collectives
    /// (waiting for the slowest rank included).
    pub prefill_comm: Duration,
    /// See [`Self::prefill_comm`].
    pub decode_comm: Duration,
}

/// The index of the largest value (the first of equals).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates `new_tokens` greedy tokens after `prompt` (every rank of the job calls it with the
/// same arguments). The cache is cleared first.
pub fn generate<B: CandleBackend>(
    model: &mut LlamaShard,
    g: &Groups<'_, B>,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<Generation> {
    model.clear_cache();
    model.take_comm_time();
    let p = model.placement();
    let (hidden, vocab) = (model.config().hidden_size, model.config().vocab_size);
    let max_step = prompt.len().max(1);
    // Buffers this rank reuses every step: PP receive buffers, the gathered logits.
    let recv = match p.is_first_stage() {
        true => None,
        false => Some((
            Tensor::zeros((max_step, hidden), DType::F32, &Device::Cpu)?,
            Tensor::zeros((max_step, hidden), DType::F32, &Device::Cpu)?,
        )),
    };
    let logits = match p.is_last_stage() {
        true => Some(Tensor::zeros(
            (max_step, model.padded_vocab()),
            DType::F32,
            &Device::Cpu,
        )?),
        false => None,
    };
    let mut out = Generation::default();
    let mut step_tokens = prompt.to_vec();
    let mut pos = 0;
    for step in 0..new_tokens {
        let t0 = Instant::now();
        let n = step_tokens.len();
        let (h, r) = match &recv {
            None => (model.embed(&g.tp, &step_tokens)?, None),
            Some((bh, br)) => {
                let (h, r) = (bh.narrow(0, 0, n)?, br.narrow(0, 0, n)?);
                g.pp.recv_tensor_dict_into(
                    None,
                    Some(g.tp.group()),
                    &[("hidden_states", &h), ("residual", &r)],
                )?;
                (h, Some(r))
            }
        };
        let (h, r) = model.forward(&g.tp, h, r, pos)?;
        let next = match &logits {
            Some(buf) => {
                let l = buf.narrow(0, 0, n)?;
                model.logits_into(&g.tp, &h, &r, &l)?;
                let l = l.narrow(1, 0, vocab)?;
                if step == 0 {
                    out.prompt_logits = Some(l.flatten_all()?.to_vec1::<f32>()?);
                }
                let last = l.narrow(0, n - 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
                let next = argmax(&last);
                if p.pp > 1 {
                    g.pp.group().send_object(&next, 0)?;
                }
                Some(next)
            }
            None => {
                g.pp.send_tensor_dict(
                    &[
                        ("hidden_states".into(), DictValue::Tensor(h)),
                        ("residual".into(), DictValue::Tensor(r)),
                    ],
                    None,
                    Some(g.tp.group()),
                    None,
                )?;
                match p.is_first_stage() {
                    true => Some(g.pp.group().recv_object::<u32>(p.pp - 1)?),
                    false => None,
                }
            }
        };
        pos += n;
        let comm = model.take_comm_time().tp;
        match step {
            0 => (out.prefill, out.prefill_comm) = (t0.elapsed(), comm),
            _ => {
                (out.decode, out.decode_comm) = (out.decode + t0.elapsed(), out.decode_comm + comm)
            }
        }
        match next {
            Some(t) => {
                out.tokens.push(t);
                step_tokens = vec![t];
            }
            // A middle stage: the next step carries one token it never sees.
            None => step_tokens = vec![0],
        }
    }
    Ok(out)
}
