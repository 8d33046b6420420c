//! # llama: a Llama-style decoder on candle, sharded with TP and PP over `dist`
//!
//! What an engine author writes to run a candle model on several processes: the model is plain
//! candle code (token embedding, RMSNorm, rotary attention with grouped key/value heads and a KV
//! cache, SwiGLU MLP, LM head) and the only distributed calls are a [`dist_candle::CandleGroup`]'s,
//! made on the tensors candle produced:
//!
//! | layer (vLLM) | shard on TP rank `r` | collective |
//! |---|---|---|
//! | `VocabParallelEmbedding` | rows of the padded vocabulary block `r` | all-reduce in place |
//! | `QKVParallelLinear` | `[q; k; v]` rows of its heads (key/value heads replicated when TP > their number) | — |
//! | `RowParallelLinear` `o_proj` | its heads' input columns | all-reduce in place |
//! | `MergedColumnParallelLinear` `gate_up_proj` | `[gate; up]` rows of its block | — |
//! | `RowParallelLinear` `down_proj` | its block's input columns | all-reduce in place |
//! | `ParallelLMHead` + `LogitsProcessor` | rows of vocab block `r` | all-gather into the caller's logits buffer, padding cut |
//!
//! Pipeline stages split the layers with vLLM's `get_pp_indices` and pass
//! `{"hidden_states", "residual"}` with the PP group's tensor-dict protocol (see [`engine`]).
//! Checkpoints have the names and shapes of a Hugging Face Llama ([`checkpoint`]); each rank reads
//! only its block of every tensor, and a missing tensor, a wrong shape or a dimension that does
//! not divide over TP is an [`Error`] naming the tensor.
//!
//! `examples/mp_llama.rs` runs it under `dist run --nproc-per-node N` and checks the sharded
//! logits and greedy tokens against the single-process model; `--bench` prints tokens/s.

pub mod checkpoint;
mod config;
pub mod engine;
mod error;
mod model;
pub mod shard;

pub use checkpoint::Checkpoint;
pub use config::LlamaConfig;
pub use engine::{generate, Generation, Groups};
pub use error::{Error, Result};
pub use model::{CommTime, LlamaShard, Placement};

/// A one-rank group (no communicator): what a single process passes as its TP and PP group.
pub fn single_rank_group<B: dist_core::Backend>(
    name: &str,
) -> Result<dist_core::GroupCoordinator<B>> {
    let host = std::sync::Arc::new(
        dist_core::local::ThreadGroup::new(1, dist_core::DEFAULT_TIMEOUT).remove(0),
    );
    Ok(dist_core::GroupCoordinator::new(
        dist_core::CoordinatorParts {
            unique_name: name.into(),
            ranks: vec![0],
            rank: 0,
            local_rank: 0,
            device: dist_core::Device::CPU,
            host,
            comm: None,
            mq: None,
            diag: None,
            check_collectives: false,
        },
    )?)
}
