//! The event types, with exactly vLLM's fields, order and defaults.
//!
//! vLLM (`vllm/distributed/kv_events.py`) declares them as msgspec structs; the field order below is
//! the wire order of the positional (array) encoding, so it must not change. Fields that vLLM gives a
//! default (`= None`) are the trailing ones: in the array form they are still written (msgspec
//! ignores `omit_defaults` for `array_like` structs), in the map form they are left out while `None`,
//! and a decoder fills them in when a shorter array omits them.

use std::hash::{Hash, Hasher};

use serde_json::{json, Map as JsonMap, Value as Json};

/// vLLM's `MEDIUM_GPU`: the `medium` of blocks held in GPU memory.
pub const MEDIUM_GPU: &str = "GPU";

/// A block hash as vLLM publishes it (`ExternalBlockHash = bytes | int`).
///
/// Older vLLM releases published Python `hash()` integers (which may be negative); newer ones publish
/// the raw hash bytes (32 for sha256) or a 64-bit integer. On the wire an integer is a MessagePack int,
/// bytes are MessagePack `bin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockHash {
    /// An integer hash; MessagePack carries `i64::MIN..=u64::MAX`, the encoder rejects the rest.
    Int(i128),
    /// A byte-string hash.
    Bytes(Vec<u8>),
}

impl From<u64> for BlockHash {
    fn from(v: u64) -> Self {
        BlockHash::Int(i128::from(v))
    }
}

impl From<i64> for BlockHash {
    fn from(v: i64) -> Self {
        BlockHash::Int(i128::from(v))
    }
}

impl From<Vec<u8>> for BlockHash {
    fn from(v: Vec<u8>) -> Self {
        BlockHash::Bytes(v)
    }
}

/// Any MessagePack value: the entries of `extra_keys` (`tuple[Any, ...]`) are untyped in vLLM.
///
/// Floats compare and hash by their bits, so `Value` is `Eq + Hash` (a NaN equals the same NaN),
/// which the [aggregator](crate::events::KvEventAggregator) needs.
#[derive(Debug, Clone)]
pub enum Value {
    /// `nil` (Python `None`).
    Nil,
    /// A boolean.
    Bool(bool),
    /// An integer in `i64::MIN..=u64::MAX`.
    Int(i128),
    /// A float (msgspec writes every Python float as float64).
    Float(f64),
    /// A UTF-8 string.
    Str(String),
    /// A byte string (`bin`).
    Bytes(Vec<u8>),
    /// An array (Python list or tuple).
    Array(Vec<Value>),
    /// A map, in wire order.
    Map(Vec<(Value, Value)>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Nil, Value::Nil) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Bytes(a), Value::Bytes(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a == b,
            (Value::Map(a), Value::Map(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Nil => {}
            Value::Bool(b) => b.hash(state),
            Value::Int(i) => i.hash(state),
            Value::Float(f) => f.to_bits().hash(state),
            Value::Str(s) => s.hash(state),
            Value::Bytes(b) => b.hash(state),
            Value::Array(a) => a.hash(state),
            Value::Map(m) => m.hash(state),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i128::from(i))
    }
}

/// `BlockStored`: blocks that became resident (prefix-cacheable) in a KV cache.
///
/// Field order is vLLM's wire order. The first seven fields have no default in vLLM and are always
/// written; the last four default to `None` (left out of the map form while `None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockStored {
    /// Hashes of the stored blocks, in order.
    pub block_hashes: Vec<BlockHash>,
    /// Hash of the block before the first one, if any.
    pub parent_block_hash: Option<BlockHash>,
    /// Token ids of all stored blocks, concatenated.
    pub token_ids: Vec<i64>,
    /// Tokens per block.
    pub block_size: i64,
    /// Deprecated in vLLM (use `lora_name`); kept for wire compatibility.
    pub lora_id: Option<i64>,
    /// Where the blocks live ([`MEDIUM_GPU`], `"CPU"`, …).
    pub medium: Option<String>,
    /// The LoRA adapter's name, if any.
    pub lora_name: Option<String>,
    /// Extra keys that went into each block's hash (multimodal identifiers, LoRA name, cache salt…),
    /// one entry per block. Default `None`.
    pub extra_keys: Option<Vec<Option<Vec<Value>>>>,
    /// KV-cache group index. Default `None`.
    pub group_idx: Option<i64>,
    /// Kind of the group's KV-cache spec (`"full_attention"`, …). Default `None`.
    pub kv_cache_spec_kind: Option<String>,
    /// Sliding window of the group's spec. Default `None`.
    pub kv_cache_spec_sliding_window: Option<i64>,
}

impl BlockStored {
    /// Number of fields vLLM requires (no default): `block_hashes` … `lora_name`.
    pub const REQUIRED_FIELDS: usize = 7;
    /// Number of fields in all.
    pub const FIELDS: usize = 11;
    /// Field names in wire order.
    pub const FIELD_NAMES: [&'static str; 11] = [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ];
}

/// `BlockRemoved`: blocks evicted from a KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockRemoved {
    /// Hashes of the removed blocks.
    pub block_hashes: Vec<BlockHash>,
    /// Where the blocks lived.
    pub medium: Option<String>,
    /// KV-cache group index. Default `None`.
    pub group_idx: Option<i64>,
}

impl BlockRemoved {
    /// Number of fields vLLM requires.
    pub const REQUIRED_FIELDS: usize = 2;
    /// Number of fields in all.
    pub const FIELDS: usize = 3;
    /// Field names in wire order.
    pub const FIELD_NAMES: [&'static str; 3] = ["block_hashes", "medium", "group_idx"];
}

/// One KV-cache event: vLLM's tagged union `BlockStored | BlockRemoved | AllBlocksCleared`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvCacheEvent {
    /// Blocks stored.
    BlockStored(BlockStored),
    /// Blocks removed.
    BlockRemoved(BlockRemoved),
    /// The whole cache was cleared (no fields).
    AllBlocksCleared,
}

impl KvCacheEvent {
    /// The msgspec tag: the class name, written first (array form) or under `"type"` (map form).
    pub fn tag(&self) -> &'static str {
        match self {
            KvCacheEvent::BlockStored(_) => "BlockStored",
            KvCacheEvent::BlockRemoved(_) => "BlockRemoved",
            KvCacheEvent::AllBlocksCleared => "AllBlocksCleared",
        }
    }

    /// The event as JSON: `{"type": tag, field: value, …}` with every field (defaults included).
    /// Integers are JSON numbers, byte strings are `{"bytes": "<hex>"}`.
    pub fn to_json(&self) -> Json {
        let mut m = JsonMap::new();
        m.insert("type".into(), Json::from(self.tag()));
        match self {
            KvCacheEvent::BlockStored(e) => {
                m.insert("block_hashes".into(), hashes_json(&e.block_hashes));
                m.insert(
                    "parent_block_hash".into(),
                    e.parent_block_hash.as_ref().map_or(Json::Null, hash_json),
                );
                m.insert("token_ids".into(), Json::from(e.token_ids.clone()));
                m.insert("block_size".into(), Json::from(e.block_size));
                m.insert("lora_id".into(), opt_json(e.lora_id));
                m.insert("medium".into(), opt_json(e.medium.clone()));
                m.insert("lora_name".into(), opt_json(e.lora_name.clone()));
                m.insert(
                    "extra_keys".into(),
                    e.extra_keys.as_ref().map_or(Json::Null, |keys| {
                        Json::Array(
                            keys.iter()
                                .map(|k| {
                                    k.as_ref().map_or(Json::Null, |t| {
                                        Json::Array(t.iter().map(Value::to_json).collect())
                                    })
                                })
                                .collect(),
                        )
                    }),
                );
                m.insert("group_idx".into(), opt_json(e.group_idx));
                m.insert(
                    "kv_cache_spec_kind".into(),
                    opt_json(e.kv_cache_spec_kind.clone()),
                );
                m.insert(
                    "kv_cache_spec_sliding_window".into(),
                    opt_json(e.kv_cache_spec_sliding_window),
                );
            }
            KvCacheEvent::BlockRemoved(e) => {
                m.insert("block_hashes".into(), hashes_json(&e.block_hashes));
                m.insert("medium".into(), opt_json(e.medium.clone()));
                m.insert("group_idx".into(), opt_json(e.group_idx));
            }
            KvCacheEvent::AllBlocksCleared => {}
        }
        Json::Object(m)
    }
}

/// vLLM's `KVEventBatch`: a timestamp, the events of one scheduler step, and the data-parallel rank.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// Wall-clock time of the batch, seconds since the Unix epoch (Python `time.time()`).
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<KvCacheEvent>,
    /// Data-parallel rank of the engine that produced it. Default `None`; publishers fill it in.
    pub data_parallel_rank: Option<i64>,
}

impl KvEventBatch {
    /// A batch stamped with the current time and no DP rank.
    pub fn now(events: Vec<KvCacheEvent>) -> Self {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        KvEventBatch {
            ts,
            events,
            data_parallel_rank: None,
        }
    }

    /// The batch as JSON: `{"ts", "events": [...], "data_parallel_rank"}`.
    pub fn to_json(&self) -> Json {
        json!({
            "ts": self.ts,
            "events": self.events.iter().map(KvCacheEvent::to_json).collect::<Vec<_>>(),
            "data_parallel_rank": self.data_parallel_rank,
        })
    }
}

impl Value {
    /// The value as JSON; byte strings become `{"bytes": "<hex>"}`, maps with non-string keys become
    /// arrays of `[key, value]` pairs, non-finite floats become strings.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Nil => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => int_json(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map_or_else(|| Json::String(f.to_string()), Json::Number),
            Value::Str(s) => Json::String(s.clone()),
            Value::Bytes(b) => bytes_json(b),
            Value::Array(a) => Json::Array(a.iter().map(Value::to_json).collect()),
            Value::Map(m) => {
                if m.iter().all(|(k, _)| matches!(k, Value::Str(_))) {
                    let mut o = JsonMap::new();
                    for (k, v) in m {
                        if let Value::Str(k) = k {
                            o.insert(k.clone(), v.to_json());
                        }
                    }
                    Json::Object(o)
                } else {
                    Json::Array(
                        m.iter()
                            .map(|(k, v)| Json::Array(vec![k.to_json(), v.to_json()]))
                            .collect(),
                    )
                }
            }
        }
    }
}

fn int_json(i: i128) -> Json {
    if let Ok(v) = i64::try_from(i) {
        Json::from(v)
    } else if let Ok(v) = u64::try_from(i) {
        Json::from(v)
    } else {
        Json::String(i.to_string())
    }
}

fn bytes_json(b: &[u8]) -> Json {
    json!({ "bytes": hex(b) })
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

fn hash_json(h: &BlockHash) -> Json {
    match h {
        BlockHash::Int(i) => int_json(*i),
        BlockHash::Bytes(b) => bytes_json(b),
    }
}

fn hashes_json(hs: &[BlockHash]) -> Json {
    Json::Array(hs.iter().map(hash_json).collect())
}

fn opt_json<T: Into<Json>>(v: Option<T>) -> Json {
    v.map_or(Json::Null, Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_of_every_kind() {
        let ev = KvCacheEvent::BlockStored(BlockStored {
            block_hashes: vec![
                BlockHash::from(u64::MAX),
                BlockHash::Bytes(vec![0xab, 0x01]),
            ],
            parent_block_hash: Some(BlockHash::from(-3i64)),
            token_ids: vec![1, 2],
            block_size: 2,
            lora_id: None,
            medium: Some(MEDIUM_GPU.into()),
            lora_name: None,
            extra_keys: Some(vec![None, Some(vec![Value::from("x"), Value::Float(0.5)])]),
            group_idx: Some(1),
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        });
        let j = ev.to_json();
        assert_eq!(j["type"], "BlockStored");
        assert_eq!(j["block_hashes"][0], json!(u64::MAX));
        assert_eq!(j["block_hashes"][1], json!({"bytes": "ab01"}));
        assert_eq!(j["parent_block_hash"], json!(-3));
        assert_eq!(j["extra_keys"], json!([null, ["x", 0.5]]));
        assert_eq!(j["kv_cache_spec_sliding_window"], Json::Null);
        assert_eq!(
            KvCacheEvent::AllBlocksCleared.to_json(),
            json!({"type": "AllBlocksCleared"})
        );
    }

    #[test]
    fn float_values_compare_by_bits() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(0.0), Value::Float(-0.0));
        assert_ne!(Value::Int(1), Value::Float(1.0));
    }
}
