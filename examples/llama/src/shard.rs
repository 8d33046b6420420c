//! How vLLM shards a Llama checkpoint over TP ranks, as pure arithmetic.
//!
//! - `QKVParallelLinear`: each rank holds `heads / tp` query heads and its key/value heads:
//!   `kv_heads / tp` of them when `kv_heads >= tp` (which must then divide), else one head
//!   replicated over `tp / kv_heads` ranks (`tp` must be a multiple of `kv_heads`); rank `r`
//!   holds key/value head block `r / replicas`. The merged weight is `[q; k; v]` along the
//!   output dim.
//! - `MergedColumnParallelLinear` (`gate_up_proj`): `[gate rows; up rows]` of this rank's
//!   `intermediate / tp` rows each.
//! - `RowParallelLinear` (`o_proj`, `down_proj`): this rank's `in / tp` input columns; the
//!   partial outputs are summed with an all-reduce.
//! - `VocabParallelEmbedding` / `ParallelLMHead`: the vocabulary is padded to a multiple of 64
//!   and split in equal blocks; rank `r` holds tokens `[min(r·n, V), min((r+1)·n, V))` of the
//!   checkpoint followed by zero rows up to `n`. Token ids outside the block embed to zero
//!   before the all-reduce; the LM head's blocks are all-gathered along the vocab dim and the
//!   padding cut off (`logits[..., :V]`).

use std::ops::Range;

use crate::{Error, LlamaConfig, Result};

/// vLLM's `DEFAULT_VOCAB_PADDING_SIZE`.
pub const VOCAB_PADDING: usize = 64;

/// `vocab` rounded up to a multiple of `pad_to` (vLLM's `pad_vocab_size`).
pub fn pad_vocab_size(vocab: usize, pad_to: usize) -> usize {
    vocab.div_ceil(pad_to) * pad_to
}

/// One rank's block of the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabShard {
    /// The padded vocabulary (a multiple of 64).
    pub padded: usize,
    /// Rows per rank (`padded / tp`).
    pub per_rank: usize,
    /// The checkpoint's token ids this rank holds (may be empty on the last ranks).
    pub tokens: Range<usize>,
}

impl VocabShard {
    /// The block of TP rank `rank` of `tp` for a vocabulary of `vocab` tokens; `name` is the
    /// tensor the error names.
    pub fn new(name: &str, vocab: usize, rank: usize, tp: usize) -> Result<Self> {
        let padded = pad_vocab_size(vocab, VOCAB_PADDING);
        if !padded.is_multiple_of(tp) {
            return Err(Error::NotDivisible {
                name: name.into(),
                what: format!("the padded vocabulary of {padded} rows ({vocab} tokens)"),
                tp,
            });
        }
        let per_rank = padded / tp;
        let start = (rank * per_rank).min(vocab);
        let end = ((rank + 1) * per_rank).min(vocab);
        Ok(VocabShard {
            padded,
            per_rank,
            tokens: start..end,
        })
    }
}

/// One rank's share of a decoder layer's heads and MLP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShard {
    /// Query heads on this rank.
    pub heads: usize,
    /// Key/value heads on this rank.
    pub kv_heads: usize,
    /// Ranks holding each key/value head (1 unless TP exceeds the key/value heads).
    pub kv_replicas: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// Query rows of `q_proj` this rank holds.
    pub q_rows: Range<usize>,
    /// Rows of `k_proj` and `v_proj` this rank holds.
    pub kv_rows: Range<usize>,
    /// Rows of `gate_proj` and `up_proj` (and columns of `down_proj`) this rank holds.
    pub mlp_rows: Range<usize>,
}

impl LayerShard {
    /// TP rank `rank` of `tp`'s share of layer `layer` (whose tensors the errors name).
    pub fn new(cfg: &LlamaConfig, layer: usize, rank: usize, tp: usize) -> Result<Self> {
        let p = |s: &str| format!("model.layers.{layer}.{s}.weight");
        let heads = cfg.num_attention_heads;
        let kv = cfg.num_key_value_heads();
        let hd = cfg.head_dim();
        if !heads.is_multiple_of(tp) {
            return Err(Error::NotDivisible {
                name: p("self_attn.q_proj"),
                what: format!("{heads} attention heads"),
                tp,
            });
        }
        let (kv_heads, kv_replicas) = if tp >= kv {
            if !tp.is_multiple_of(kv) {
                return Err(Error::NotDivisible {
                    name: p("self_attn.k_proj"),
                    what: format!(
                        "{kv} key/value heads (TP above the key/value heads must be a multiple of them, to replicate each)"
                    ),
                    tp,
                });
            }
            (1, tp / kv)
        } else {
            if !kv.is_multiple_of(tp) {
                return Err(Error::NotDivisible {
                    name: p("self_attn.k_proj"),
                    what: format!("{kv} key/value heads"),
                    tp,
                });
            }
            (kv / tp, 1)
        };
        let inter = cfg.intermediate_size;
        if !inter.is_multiple_of(tp) {
            return Err(Error::NotDivisible {
                name: p("mlp.gate_proj"),
                what: format!("{inter} intermediate rows"),
                tp,
            });
        }
        let h = heads / tp;
        let kv_block = rank / kv_replicas;
        let i = inter / tp;
        Ok(LayerShard {
            heads: h,
            kv_heads,
            kv_replicas,
            head_dim: hd,
            q_rows: rank * h * hd..(rank + 1) * h * hd,
            kv_rows: kv_block * kv_heads * hd..(kv_block + 1) * kv_heads * hd,
            mlp_rows: rank * i..(rank + 1) * i,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize, inter: usize) -> LlamaConfig {
        LlamaConfig {
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            intermediate_size: inter,
            ..LlamaConfig::tiny()
        }
    }

    #[test]
    fn vocab_blocks_are_vllms() {
        // vLLM's docstring example without LoRA: 1010 tokens pad to 1024.
        let s: Vec<_> = (0..2)
            .map(|r| VocabShard::new("e", 1010, r, 2).unwrap())
            .collect();
        assert_eq!(s[0].padded, 1024);
        assert_eq!(s[0].tokens, 0..512);
        assert_eq!(s[1].tokens, 512..1010);
        // A rank past the vocabulary holds padding only.
        let s = VocabShard::new("e", 1000, 63, 64).unwrap();
        assert_eq!((s.per_rank, s.tokens), (16, 1000..1000));
        let e = VocabShard::new("model.embed_tokens.weight", 1000, 0, 3).unwrap_err();
        assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
        assert_eq!(pad_vocab_size(64, 64), 64);
        assert_eq!(pad_vocab_size(65, 64), 128);
    }

    #[test]
    fn kv_heads_split_or_replicate() {
        let c = cfg(8, 2, 64);
        let hd = c.head_dim();
        let s = LayerShard::new(&c, 0, 1, 2).unwrap();
        assert_eq!((s.heads, s.kv_heads, s.kv_replicas), (4, 1, 1));
        assert_eq!(s.kv_rows, hd..2 * hd);
        // TP 4 over 2 key/value heads: each head on two ranks.
        let rows: Vec<_> = (0..4)
            .map(|r| LayerShard::new(&c, 0, r, 4).unwrap().kv_rows)
            .collect();
        assert_eq!(rows, vec![0..hd, 0..hd, hd..2 * hd, hd..2 * hd]);
        assert_eq!(LayerShard::new(&c, 0, 3, 4).unwrap().q_rows, 6 * hd..8 * hd);
        // Neither divides: 3 key/value heads over TP 2, TP 4 over 3 heads.
        let e = LayerShard::new(&cfg(6, 3, 64), 5, 0, 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("model.layers.5.self_attn.k_proj.weight"),
            "{e}"
        );
        let e = LayerShard::new(&cfg(24, 3, 64), 0, 0, 8).unwrap_err();
        assert!(e.to_string().contains("k_proj"), "{e}");
        let e = LayerShard::new(&cfg(8, 2, 66), 1, 0, 4).unwrap_err();
        assert!(
            e.to_string()
                .contains("model.layers.1.mlp.gate_proj.weight"),
            "{e}"
        );
        let e = LayerShard::new(&cfg(6, 2, 64), 0, 0, 4).unwrap_err();
        assert!(e.to_string().contains("q_proj"), "{e}");
    }
}
