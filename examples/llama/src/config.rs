//! The model's configuration: the fields of a Hugging Face Llama `config.json` the model uses.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}

/// A Hugging Face `LlamaConfig` (the fields this model reads; others in the file are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Rows of `gate_proj` / `up_proj`.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); the query heads when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Dims per head; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Tokens.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence the rotary tables cover.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix (no `lm_head.weight` in the checkpoint).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The MLP's activation; only `silu` (SwiGLU) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl LlamaConfig {
    /// The test model: small enough that every TP/PP layout runs in a few seconds on two cores,
    /// shaped so that TP 4 replicates key/value heads and pads the vocabulary.
    pub fn tiny() -> Self {
        LlamaConfig {
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 3,
            num_attention_heads: 8,
            num_key_value_heads: Some(2),
            head_dim: None,
            vocab_size: 1000,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
        }
    }

    /// The benchmark model (about 20 M parameters).
    pub fn bench() -> Self {
        LlamaConfig {
            hidden_size: 512,
            intermediate_size: 1408,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: Some(2),
            head_dim: None,
            vocab_size: 8000,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
        }
    }

    /// Key/value heads.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Dims per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks what the model needs of the configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?}: only silu is supported",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads() == 0 {
            return bad("no attention heads".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads())
        {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads,
                self.num_key_value_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim()));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return bad("hidden_size, vocab_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }
}
