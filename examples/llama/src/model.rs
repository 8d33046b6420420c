//! One rank's shard of the decoder: its PP stage's layers, each sharded over TP as vLLM shards
//! Llama, written with candle ops. The collectives are the TP group's [`CandleGroup`] calls on
//! the tensors the ops produce: an in-place all-reduce after each row-parallel layer and after
//! the embedding, an all-gather of the LM head's vocab blocks into the caller's logits buffer.

use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, D};
use dist_candle::{CandleBackend, CandleGroup};

use crate::checkpoint::{Checkpoint, Tensors};
use crate::shard::{LayerShard, VocabShard};
use crate::{Error, LlamaConfig, Result};

/// Where a rank sits: its TP rank and size, its PP stage and the number of stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Rank within the TP group.
    pub tp_rank: usize,
    /// TP group size.
    pub tp: usize,
    /// PP stage (rank within the PP group).
    pub pp_rank: usize,
    /// PP stages.
    pub pp: usize,
}

impl Placement {
    /// A single process holding the whole model.
    pub const SINGLE: Placement = Placement {
        tp_rank: 0,
        tp: 1,
        pp_rank: 0,
        pp: 1,
    };
    /// The first stage embeds the tokens.
    pub fn is_first_stage(&self) -> bool {
        self.pp_rank == 0
    }
    /// The last stage computes the logits.
    pub fn is_last_stage(&self) -> bool {
        self.pp_rank + 1 == self.pp
    }
}

/// The vocab-parallel embedding or LM head: this rank's block of rows, zero-padded.
#[derive(Debug)]
struct VocabBlock {
    shard: VocabShard,
    /// `[per_rank, hidden]`.
    weight: Tensor,
}

impl VocabBlock {
    fn load(t: &Tensors<'_>, name: &str, cfg: &LlamaConfig, p: Placement) -> Result<Self> {
        let shard = VocabShard::new(name, cfg.vocab_size, p.tp_rank, p.tp)?;
        let h = cfg.hidden_size;
        let rows = t.block(name, &[cfg.vocab_size, h], shard.tokens.clone(), 0..h)?;
        let pad = shard.per_rank - shard.tokens.len();
        let weight = match pad {
            0 => rows,
            _ => Tensor::cat(
                &[rows, Tensor::zeros((pad, h), DType::F32, &Device::Cpu)?],
                0,
            )?,
        };
        Ok(VocabBlock { shard, weight })
    }
}

/// One decoder layer's shard and its KV cache.
#[derive(Debug)]
struct Layer {
    shard: LayerShard,
    input_norm: Tensor,
    /// `[q; k; v]` rows of this rank, `[(heads + 2 kv_heads) · head_dim, hidden]`.
    qkv: Tensor,
    /// This rank's input columns of `o_proj`, `[hidden, heads · head_dim]`.
    o: Tensor,
    post_norm: Tensor,
    /// `[gate; up]` rows of this rank, `[2 · inter / tp, hidden]`.
    gate_up: Tensor,
    /// This rank's input columns of `down_proj`, `[hidden, inter / tp]`.
    down: Tensor,
    /// Keys and values of every position so far, `[kv_heads, positions, head_dim]`.
    cache: Option<(Tensor, Tensor)>,
}

impl Layer {
    fn load(t: &Tensors<'_>, cfg: &LlamaConfig, l: usize, p: Placement) -> Result<Self> {
        let s = LayerShard::new(cfg, l, p.tp_rank, p.tp)?;
        let n = |x: &str| format!("model.layers.{l}.{x}.weight");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (q, kv, i) = (
            cfg.num_attention_heads * hd,
            cfg.num_key_value_heads() * hd,
            cfg.intermediate_size,
        );
        let qkv = Tensor::cat(
            &[
                t.block(&n("self_attn.q_proj"), &[q, h], s.q_rows.clone(), 0..h)?,
                t.block(&n("self_attn.k_proj"), &[kv, h], s.kv_rows.clone(), 0..h)?,
                t.block(&n("self_attn.v_proj"), &[kv, h], s.kv_rows.clone(), 0..h)?,
            ],
            0,
        )?;
        let gate_up = Tensor::cat(
            &[
                t.block(&n("mlp.gate_proj"), &[i, h], s.mlp_rows.clone(), 0..h)?,
                t.block(&n("mlp.up_proj"), &[i, h], s.mlp_rows.clone(), 0..h)?,
            ],
            0,
        )?;
        Ok(Layer {
            input_norm: t.full(&n("input_layernorm"), &[h])?,
            o: t.block(&n("self_attn.o_proj"), &[h, q], 0..h, s.q_rows.clone())?,
            post_norm: t.full(&n("post_attention_layernorm"), &[h])?,
            down: t.block(&n("mlp.down_proj"), &[h, i], 0..h, s.mlp_rows.clone())?,
            qkv,
            gate_up,
            shard: s,
            cache: None,
        })
    }
}

/// Time spent in collectives, for the benchmark's breakdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommTime {
    /// Inside the TP group's calls.
    pub tp: Duration,
}

/// One rank's shard of the model: the layers of its PP stage, sharded over TP; the embedding on
/// the first stage, the final norm and the LM head on the last.
#[derive(Debug)]
pub struct LlamaShard {
    cfg: LlamaConfig,
    placement: Placement,
    layers_range: Range<usize>,
    embed: Option<VocabBlock>,
    layers: Vec<Layer>,
    norm: Option<Tensor>,
    lm_head: Option<VocabBlock>,
    /// Rotary tables, `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// Time spent in the TP group's collectives since the last [`Self::take_comm_time`].
    comm: CommTime,
}

impl LlamaShard {
    /// Loads the shard of `placement` from `ckpt`: only this rank's block of each tensor is read
    /// (vLLM's layouts, see [`crate::shard`]). A missing tensor, a tensor whose shape is not the
    /// configuration's, or a dimension that does not divide over TP is an error naming the tensor.
    pub fn load(ckpt: &Checkpoint, placement: Placement) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let p = placement;
        if p.tp == 0 || p.pp == 0 || p.tp_rank >= p.tp || p.pp_rank >= p.pp {
            return Err(Error::Config(format!("bad placement {p:?}")));
        }
        let t = ckpt.tensors()?;
        let (start, end) = dist_core::get_pp_indices(cfg.num_hidden_layers, p.pp_rank, p.pp, None)?;
        let layers = (start..end)
            .map(|l| Layer::load(&t, &cfg, l, p))
            .collect::<Result<Vec<_>>>()?;
        let embed_name = "model.embed_tokens.weight";
        let embed = match p.is_first_stage() {
            true => Some(VocabBlock::load(&t, embed_name, &cfg, p)?),
            false => None,
        };
        let (norm, lm_head) = match p.is_last_stage() {
            true => {
                let head = match cfg.tie_word_embeddings {
                    true => embed_name,
                    false => "lm_head.weight",
                };
                (
                    Some(t.full("model.norm.weight", &[cfg.hidden_size])?),
                    Some(VocabBlock::load(&t, head, &cfg, p)?),
                )
            }
            false => (None, None),
        };
        let (cos, sin) = rotary_tables(&cfg)?;
        Ok(LlamaShard {
            cfg,
            placement: p,
            layers_range: start..end,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            comm: CommTime::default(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    /// Where this shard sits.
    pub fn placement(&self) -> Placement {
        self.placement
    }
    /// The layers of this PP stage.
    pub fn layers(&self) -> Range<usize> {
        self.layers_range.clone()
    }
    /// The padded vocabulary (the width of the gathered logits, before the padding is cut).
    pub fn padded_vocab(&self) -> usize {
        crate::shard::pad_vocab_size(self.cfg.vocab_size, crate::shard::VOCAB_PADDING)
    }
    /// Forgets every cached position.
    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }
    /// The time spent in collectives since the last call, and resets it.
    pub fn take_comm_time(&mut self) -> CommTime {
        std::mem::take(&mut self.comm)
    }

    /// First stage: the vocab-parallel embedding of `tokens`, `[tokens, hidden]` (ids outside
    /// this rank's block embed to zero; the all-reduce over TP fills them in).
    pub fn embed<B: CandleBackend>(
        &mut self,
        tp: &CandleGroup<'_, B>,
        tokens: &[u32],
    ) -> Result<Tensor> {
        let e = self
            .embed
            .as_ref()
            .ok_or_else(|| Error::Config("embed on a stage other than the first".into()))?;
        let range = &e.shard.tokens;
        let mut local = Vec::with_capacity(tokens.len());
        let mut mask = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let t = t as usize;
            if t >= self.cfg.vocab_size {
                return Err(Error::Config(format!(
                    "token {t} outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
            let inside = range.contains(&t);
            local.push(if inside { (t - range.start) as u32 } else { 0 });
            mask.push(if inside { 1f32 } else { 0.0 });
        }
        let n = tokens.len();
        let ids = Tensor::from_vec(local, n, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (n, 1), &Device::Cpu)?;
        let x = e.weight.index_select(&ids, 0)?.broadcast_mul(&mask)?;
        timed(&mut self.comm.tp, || tp.all_reduce_in_place(&x))?;
        Ok(x)
    }

    /// Runs this stage's layers on `hidden` (`[tokens, hidden]`, the first `tokens` positions
    /// after `pos` cached ones) and `residual` (none before the first layer), appending to the
    /// KV cache; returns the new hidden states and residual.
    pub fn forward<B: CandleBackend>(
        &mut self,
        tp: &CandleGroup<'_, B>,
        mut hidden: Tensor,
        mut residual: Option<Tensor>,
        pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let n = hidden.dim(0)?;
        if pos + n > self.cfg.max_position_embeddings {
            return Err(Error::Config(format!(
                "positions {pos}..{} beyond max_position_embeddings {}",
                pos + n,
                self.cfg.max_position_embeddings
            )));
        }
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        let mask = causal_mask(n, pos)?;
        let eps = self.cfg.rms_norm_eps;
        for layer in &mut self.layers {
            // input_layernorm, fused with the residual add after the first layer (vLLM).
            let (h, res) = add_rms_norm(&hidden, residual.as_ref(), &layer.input_norm, eps)?;
            let s = &layer.shard;
            let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
            // QKV column-parallel: this rank's heads only.
            let qkv = h.matmul(&layer.qkv.t()?)?;
            let heads = |start: usize, count: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, start * hd, count * hd)?
                    .reshape((n, count, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let q = rope(&heads(0, nh)?, &cos, &sin)?;
            let k = rope(&heads(nh, nkv)?, &cos, &sin)?;
            let v = heads(nh + nkv, nkv)?;
            let (k, v) = match layer.cache.take() {
                Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 1)?, Tensor::cat(&[&cv, &v], 1)?),
                None => (k, v),
            };
            layer.cache = Some((k.clone(), v.clone()));
            let k = repeat_kv(&k, nh / nkv)?;
            let v = repeat_kv(&v, nh / nkv)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &mask {
                att = att.broadcast_add(m)?;
            }
            let att = softmax_last_dim(&att)?;
            let o = att
                .matmul(&v)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, nh * hd))?;
            // o_proj row-parallel: partial sums, all-reduced in their own storage.
            let out = o.matmul(&layer.o.t()?)?;
            timed(&mut self.comm.tp, || tp.all_reduce_in_place(&out))?;
            // post_attention_layernorm (fused add), SwiGLU with gate/up merged column-parallel.
            let (h, res) = add_rms_norm(&out, Some(&res), &layer.post_norm, eps)?;
            let gu = h.matmul(&layer.gate_up.t()?)?;
            let i = gu.dim(1)? / 2;
            let act = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
            // down_proj row-parallel.
            let down = act.matmul(&layer.down.t()?)?;
            timed(&mut self.comm.tp, || tp.all_reduce_in_place(&down))?;
            hidden = down;
            residual = Some(res);
        }
        let residual = match residual {
            Some(r) => r,
            None => return Err(Error::Config("a stage without layers".into())),
        };
        Ok((hidden, residual))
    }

    /// Last stage: the final norm and the LM head; each rank's vocab block is all-gathered into
    /// `logits` (`[tokens, padded_vocab]`, the caller's buffer). The logits of token `t` are
    /// `logits.narrow(1, 0, vocab_size)`, as vLLM cuts the padding.
    pub fn logits_into<B: CandleBackend>(
        &mut self,
        tp: &CandleGroup<'_, B>,
        hidden: &Tensor,
        residual: &Tensor,
        logits: &Tensor,
    ) -> Result<()> {
        let (norm, head) = match (&self.norm, &self.lm_head) {
            (Some(n), Some(h)) => (n, h),
            _ => {
                return Err(Error::Config(
                    "logits on a stage other than the last".into(),
                ))
            }
        };
        let (h, _) = add_rms_norm(hidden, Some(residual), norm, self.cfg.rms_norm_eps)?;
        let local = h.matmul(&head.weight.t()?)?;
        timed(&mut self.comm.tp, || tp.all_gather_into(&local, logits, -1))
    }
}

/// Runs the collective `f`, adding its wall time to `acc`.
fn timed<R>(acc: &mut Duration, f: impl FnOnce() -> dist_candle::Result<R>) -> Result<R> {
    let t0 = Instant::now();
    let r = f();
    *acc += t0.elapsed();
    Ok(r?)
}

/// `cos` and `sin` of every position and rotary frequency (vLLM's `get_rope`, neox style).
fn rotary_tables(cfg: &LlamaConfig) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
        .collect();
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (n, half), &Device::Cpu)?,
    ))
}

/// Rotates `x` (`[heads, tokens, head_dim]`) by the positions' angles, halves rotated (neox).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(2)? / 2;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], 2)
}

/// Each key/value head repeated for the `n` query heads that share it.
fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (h, s, d) = x.dims3()?;
    x.unsqueeze(1)?.expand((h, n, s, d))?.reshape((h * n, s, d))
}

/// `-inf` above the diagonal for `n` new tokens after `pos` cached ones; none for one token.
fn causal_mask(n: usize, pos: usize) -> candle_core::Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let s = pos + n;
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..s).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (n, s), &Device::Cpu).map(Some)
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// vLLM's `RMSNorm` with the fused residual: `residual = x + residual` (or `x` when there is
/// none), then `residual / rms(residual) · weight`. Returns `(normed, residual)`.
fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let r = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let var = r.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = r
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?;
    Ok((normed, r))
}
