//! Deterministic sample batches that use every event type and field.
//!
//! `dist kv-events publish` sends them so a subscriber can be tried against the stream, and the
//! cross-language tests rebuild the same batches in Python (`tests/python/kv_events_vllm.py`,
//! `sample_batch`), so both sides can compare field by field and byte by byte. Change both together.

use crate::events::types::{
    BlockHash, BlockRemoved, BlockStored, KvCacheEvent, KvEventBatch, Value, MEDIUM_GPU,
};

/// Sample batch number `index`, stamped with `dp_rank`.
///
/// Odd and even indices differ (parent hash, LoRA fields, spec kind), and the events cover: integer
/// hashes above `i64::MAX` and negative ones, 32-byte hashes, `extra_keys` of mixed types, a
/// `BlockStored` with every defaulted field `None`, one with only `group_idx` set, `BlockRemoved` with and without `group_idx`, and `AllBlocksCleared`.
pub fn sample_batch(index: u64, dp_rank: Option<i64>) -> KvEventBatch {
    let i = index;
    let odd = i % 2 == 1;
    let ii = i128::from(i);
    let bytes32 =
        |salt: u64| -> Vec<u8> { (0..32u64).map(|j| ((i + j + salt) % 256) as u8).collect() };
    let full = BlockStored {
        block_hashes: vec![
            BlockHash::Int(ii * 1000 + 1),
            BlockHash::Int(i128::from(u64::MAX) - ii),
            BlockHash::Bytes(bytes32(0)),
        ],
        parent_block_hash: if odd {
            Some(BlockHash::Int(-ii - 1))
        } else {
            None
        },
        token_ids: (0..12).map(|t| (i * 100 + t) as i64).collect(),
        block_size: 4,
        lora_id: if odd { Some(7) } else { None },
        medium: Some(MEDIUM_GPU.into()),
        lora_name: if odd { Some("adapter-a".into()) } else { None },
        extra_keys: Some(vec![
            None,
            Some(vec![Value::Str(format!("mm-hash-{i}")), Value::Int(0)]),
            Some(vec![
                Value::Str("adapter-a".into()),
                Value::Bytes(vec![1, 2, 3]),
                Value::Float(0.5),
                Value::Array(vec![Value::Int(1), Value::Nil]),
                Value::Bool(true),
            ]),
        ]),
        group_idx: Some((i % 3) as i64),
        kv_cache_spec_kind: Some(
            if odd {
                "sliding_window"
            } else {
                "full_attention"
            }
            .into(),
        ),
        kv_cache_spec_sliding_window: if odd { Some(128) } else { None },
    };
    let minimal = BlockStored {
        block_hashes: vec![BlockHash::Bytes(bytes32(100))],
        parent_block_hash: Some(BlockHash::Bytes(bytes32(200))),
        token_ids: vec![1, 2, 3, 4],
        block_size: 4,
        lora_id: None,
        medium: None,
        lora_name: None,
        extra_keys: None,
        group_idx: None,
        kv_cache_spec_kind: None,
        kv_cache_spec_sliding_window: None,
    };
    let group_only = BlockStored {
        group_idx: Some(2),
        medium: Some("CPU".into()),
        ..minimal.clone()
    };
    KvEventBatch {
        ts: 1_700_000_000.0 + i as f64 * 0.25,
        events: vec![
            KvCacheEvent::BlockStored(full),
            KvCacheEvent::BlockStored(minimal),
            KvCacheEvent::BlockStored(group_only),
            KvCacheEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![BlockHash::Int(ii * 1000 + 1)],
                medium: Some(MEDIUM_GPU.into()),
                group_idx: Some((i % 3) as i64),
            }),
            KvCacheEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![BlockHash::Bytes(bytes32(100))],
                medium: Some("CPU".into()),
                group_idx: None,
            }),
            KvCacheEvent::AllBlocksCleared,
        ],
        data_parallel_rank: dp_rank,
    }
}
