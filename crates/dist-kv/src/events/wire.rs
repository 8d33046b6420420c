//! The MessagePack wire format, byte for byte as msgspec writes it.
//!
//! # Encoding
//!
//! `msgspec.msgpack.Encoder().encode(batch)` for vLLM's classes gives
//!
//! ```text
//! [ts, [event, ...], data_parallel_rank]           (EventBatch, array_like)
//! ["BlockStored", block_hashes, parent, token_ids, block_size, lora_id, medium, lora_name,
//!  extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]
//! ["BlockRemoved", block_hashes, medium, group_idx]
//! ["AllBlocksCleared"]
//! ```
//!
//! **Every field is written, defaults included**, even though vLLM's classes set `omit_defaults=True`:
//! msgspec ignores `omit_defaults` for `array_like` structs (msgspec issue #720; measured with
//! msgspec 0.22: `EventBatch(ts=1.0)` encodes as `[1.0, [], nil]`). A `None` is `nil`. Integers take the smallest MessagePack form (non-negative ones the unsigned forms), floats are
//! always float64, strings and byte strings the smallest `str`/`bin` form: this encoder makes the
//! same choices, so its bytes equal msgspec's (the cross-language test checks that).
//!
//! vLLM PR #42892 (2026) dropped `array_like` from the *event* classes: newer releases write each event
//! as a map `{"type": tag, field: value, ...}` with every defaulted field that is still `None` left out
//! (the batch stays an array). [`WireFormat::Map`] writes that form.
//!
//! # Decoding
//!
//! [`decode_batch`] accepts both forms (and a batch written as a map), ints or bytes for block hashes,
//! arrays shorter than the full field list (missing trailing fields take their defaults, as msgspec
//! decodes them), and extra trailing array elements or unknown map keys (which msgspec ignores),
//! so it reads every vLLM release's stream. It never allocates in proportion to a length header: a
//! container may not claim more elements than bytes remain, and [`DecodeLimits`] caps nesting depth
//! and the total number of values. Anything else is an [`Error::Decode`] naming the place.

use crate::error::{Error, Result};
use crate::events::types::{
    BlockHash, BlockRemoved, BlockStored, KvCacheEvent, KvEventBatch, Value,
};

/// How events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// Positional arrays with the tag first (`array_like=True`): vLLM up to its 2026 releases.
    #[default]
    Array,
    /// Tagged maps with the tag under `"type"` (vLLM after PR #42892).
    Map,
}

impl std::str::FromStr for WireFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "array" => Ok(WireFormat::Array),
            "map" => Ok(WireFormat::Map),
            other => Err(Error::InvalidArgument(format!(
                "wire format {other:?}: expected \"array\" or \"map\""
            ))),
        }
    }
}

/// Caps that keep a hostile payload from exhausting memory or stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Deepest nesting of arrays and maps (the batch itself is depth 1).
    pub max_depth: usize,
    /// Most values (scalars and containers) in one payload.
    pub max_values: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_depth: 32,
            max_values: 1 << 22,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

fn enc_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Encode(e.to_string())
}

fn len_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| Error::Encode(format!("{what}: length {len} exceeds u32::MAX")))
}

fn write_int(out: &mut Vec<u8>, i: i128) -> Result<()> {
    if let Ok(u) = u64::try_from(i) {
        rmp::encode::write_uint(out, u).map_err(enc_err)?;
    } else if let Ok(s) = i64::try_from(i) {
        rmp::encode::write_sint(out, s).map_err(enc_err)?;
    } else {
        return Err(Error::Encode(format!(
            "integer {i} is outside i64::MIN..=u64::MAX"
        )));
    }
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    len_u32(s.len(), "string")?;
    rmp::encode::write_str(out, s).map_err(enc_err)
}

fn write_bin(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    len_u32(b.len(), "bytes")?;
    rmp::encode::write_bin(out, b).map_err(enc_err)
}

fn write_array_len(out: &mut Vec<u8>, len: usize) -> Result<()> {
    rmp::encode::write_array_len(out, len_u32(len, "array")?).map_err(enc_err)?;
    Ok(())
}

fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

fn write_opt_int(out: &mut Vec<u8>, v: Option<i64>) -> Result<()> {
    match v {
        Some(i) => write_int(out, i128::from(i)),
        None => {
            write_nil(out);
            Ok(())
        }
    }
}

fn write_opt_str(out: &mut Vec<u8>, v: Option<&str>) -> Result<()> {
    match v {
        Some(s) => write_str(out, s),
        None => {
            write_nil(out);
            Ok(())
        }
    }
}

fn write_hash(out: &mut Vec<u8>, h: &BlockHash) -> Result<()> {
    match h {
        BlockHash::Int(i) => write_int(out, *i),
        BlockHash::Bytes(b) => write_bin(out, b),
    }
}

fn write_hashes(out: &mut Vec<u8>, hs: &[BlockHash]) -> Result<()> {
    write_array_len(out, hs.len())?;
    hs.iter().try_for_each(|h| write_hash(out, h))
}

/// Writes any [`Value`] as msgspec writes the Python object it stands for.
pub fn write_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::Nil => write_nil(out),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Int(i) => write_int(out, *i)?,
        Value::Float(f) => rmp::encode::write_f64(out, *f).map_err(enc_err)?,
        Value::Str(s) => write_str(out, s)?,
        Value::Bytes(b) => write_bin(out, b)?,
        Value::Array(a) => {
            write_array_len(out, a.len())?;
            for x in a {
                write_value(out, x)?;
            }
        }
        Value::Map(m) => {
            rmp::encode::write_map_len(out, len_u32(m.len(), "map")?).map_err(enc_err)?;
            for (k, x) in m {
                write_value(out, k)?;
                write_value(out, x)?;
            }
        }
    }
    Ok(())
}

fn write_extra_keys(out: &mut Vec<u8>, keys: Option<&Vec<Option<Vec<Value>>>>) -> Result<()> {
    match keys {
        None => write_nil(out),
        Some(keys) => {
            write_array_len(out, keys.len())?;
            for k in keys {
                match k {
                    None => write_nil(out),
                    Some(t) => {
                        write_array_len(out, t.len())?;
                        for x in t {
                            write_value(out, x)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes field `i` (wire order) of a `BlockStored`.
fn write_stored_field(out: &mut Vec<u8>, e: &BlockStored, i: usize) -> Result<()> {
    match i {
        0 => write_hashes(out, &e.block_hashes),
        1 => match &e.parent_block_hash {
            Some(h) => write_hash(out, h),
            None => {
                write_nil(out);
                Ok(())
            }
        },
        2 => {
            write_array_len(out, e.token_ids.len())?;
            e.token_ids
                .iter()
                .try_for_each(|&t| write_int(out, i128::from(t)))
        }
        3 => write_int(out, i128::from(e.block_size)),
        4 => write_opt_int(out, e.lora_id),
        5 => write_opt_str(out, e.medium.as_deref()),
        6 => write_opt_str(out, e.lora_name.as_deref()),
        7 => write_extra_keys(out, e.extra_keys.as_ref()),
        8 => write_opt_int(out, e.group_idx),
        9 => write_opt_str(out, e.kv_cache_spec_kind.as_deref()),
        10 => write_opt_int(out, e.kv_cache_spec_sliding_window),
        _ => unreachable!("BlockStored has {} fields", BlockStored::FIELDS),
    }
}

fn stored_is_default(e: &BlockStored, i: usize) -> bool {
    match i {
        7 => e.extra_keys.is_none(),
        8 => e.group_idx.is_none(),
        9 => e.kv_cache_spec_kind.is_none(),
        10 => e.kv_cache_spec_sliding_window.is_none(),
        _ => false, // required fields are never omitted
    }
}

fn write_removed_field(out: &mut Vec<u8>, e: &BlockRemoved, i: usize) -> Result<()> {
    match i {
        0 => write_hashes(out, &e.block_hashes),
        1 => write_opt_str(out, e.medium.as_deref()),
        2 => write_opt_int(out, e.group_idx),
        _ => unreachable!("BlockRemoved has {} fields", BlockRemoved::FIELDS),
    }
}

fn removed_is_default(e: &BlockRemoved, i: usize) -> bool {
    i == 2 && e.group_idx.is_none()
}

/// Writes a struct with `n` fields named `names`, where `is_default(i)` says whether field `i` still
/// has its default, in msgspec's array or map form with the tag first.
fn write_tagged_struct(
    out: &mut Vec<u8>,
    format: WireFormat,
    tag: &str,
    names: &[&str],
    is_default: &dyn Fn(usize) -> bool,
    write_field: &mut dyn FnMut(&mut Vec<u8>, usize) -> Result<()>,
) -> Result<()> {
    let n = names.len();
    match format {
        WireFormat::Array => {
            // msgspec writes every field of an array_like struct (omit_defaults has no effect).
            write_array_len(out, 1 + n)?;
            write_str(out, tag)?;
            for i in 0..n {
                write_field(out, i)?;
            }
        }
        WireFormat::Map => {
            let kept: Vec<usize> = (0..n).filter(|&i| !is_default(i)).collect();
            rmp::encode::write_map_len(out, len_u32(1 + kept.len(), "map")?).map_err(enc_err)?;
            write_str(out, "type")?;
            write_str(out, tag)?;
            for i in kept {
                write_str(out, names[i])?;
                write_field(out, i)?;
            }
        }
    }
    Ok(())
}

/// Writes one event.
pub fn write_event(out: &mut Vec<u8>, ev: &KvCacheEvent, format: WireFormat) -> Result<()> {
    match ev {
        KvCacheEvent::BlockStored(e) => write_tagged_struct(
            out,
            format,
            ev.tag(),
            &BlockStored::FIELD_NAMES,
            &|i| stored_is_default(e, i),
            &mut |o, i| write_stored_field(o, e, i),
        ),
        KvCacheEvent::BlockRemoved(e) => write_tagged_struct(
            out,
            format,
            ev.tag(),
            &BlockRemoved::FIELD_NAMES,
            &|i| removed_is_default(e, i),
            &mut |o, i| write_removed_field(o, e, i),
        ),
        KvCacheEvent::AllBlocksCleared => {
            write_tagged_struct(out, format, ev.tag(), &[], &|_| false, &mut |_, _| Ok(()))
        }
    }
}

/// Encodes a batch as `msgspec.msgpack.Encoder().encode(batch)` does: `[ts, events, dp_rank]`.
pub fn encode_batch(batch: &KvEventBatch, format: WireFormat) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + 32 * batch.events.len());
    // The batch is array_like in every vLLM release, so all three fields are written.
    write_array_len(&mut out, 3)?;
    rmp::encode::write_f64(&mut out, batch.ts).map_err(enc_err)?;
    write_array_len(&mut out, batch.events.len())?;
    for ev in &batch.events {
        write_event(&mut out, ev, format)?;
    }
    write_opt_int(&mut out, batch.data_parallel_rank)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Decoding: bytes → Value (bounded), then Value → typed (msgspec's rules)
// ---------------------------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    values: usize,
    limits: DecodeLimits,
}

impl<'a> Reader<'a> {
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::Decode(format!("at byte {}: {what}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format_args!(
                "truncated: need {n} bytes, {} left",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len_field(&mut self, width: usize) -> Result<usize> {
        Ok(match width {
            1 => usize::from(self.be::<1>()?[0]),
            2 => usize::from(u16::from_be_bytes(self.be()?)),
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    /// Checks a container's claimed element count before anything is allocated for it: every
    /// element takes at least one byte (two for a map entry).
    fn container_len(&mut self, len: usize, bytes_per: usize) -> Result<usize> {
        let left = self.buf.len() - self.pos;
        if len.saturating_mul(bytes_per) > left {
            return Err(self.err(format_args!(
                "container claims {len} elements but only {left} bytes remain"
            )));
        }
        Ok(len)
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(self.err(format_args!(
                "more than {} values in one payload",
                self.limits.max_values
            )));
        }
        let m = self.be::<1>()?[0];
        Ok(match m {
            0x00..=0x7f => Value::Int(i128::from(m)),
            0xe0..=0xff => Value::Int(i128::from(m as i8)),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xcc => Value::Int(i128::from(self.be::<1>()?[0])),
            0xcd => Value::Int(i128::from(u16::from_be_bytes(self.be()?))),
            0xce => Value::Int(i128::from(u32::from_be_bytes(self.be()?))),
            0xcf => Value::Int(i128::from(u64::from_be_bytes(self.be()?))),
            0xd0 => Value::Int(i128::from(i8::from_be_bytes(self.be()?))),
            0xd1 => Value::Int(i128::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Value::Int(i128::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Value::Int(i128::from(i64::from_be_bytes(self.be()?))),
            0xca => Value::Float(f64::from(f32::from_be_bytes(self.be()?))),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xa0..=0xbf => self.str(usize::from(m & 0x1f))?,
            0xd9 => {
                let n = self.len_field(1)?;
                self.str(n)?
            }
            0xda => {
                let n = self.len_field(2)?;
                self.str(n)?
            }
            0xdb => {
                let n = self.len_field(4)?;
                self.str(n)?
            }
            0xc4..=0xc6 => {
                let n = self.len_field(1 << (m - 0xc4))?;
                Value::Bytes(self.take(n)?.to_vec())
            }
            0x90..=0x9f => self.array(usize::from(m & 0x0f), depth)?,
            0xdc => {
                let n = self.len_field(2)?;
                self.array(n, depth)?
            }
            0xdd => {
                let n = self.len_field(4)?;
                self.array(n, depth)?
            }
            0x80..=0x8f => self.map(usize::from(m & 0x0f), depth)?,
            0xde => {
                let n = self.len_field(2)?;
                self.map(n, depth)?
            }
            0xdf => {
                let n = self.len_field(4)?;
                self.map(n, depth)?
            }
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                return Err(Error::Decode(format!(
                    "at byte {}: MessagePack extension types are not part of the KV-event format",
                    self.pos - 1
                )))
            }
            _ => {
                return Err(Error::Decode(format!(
                    "at byte {}: reserved MessagePack marker 0x{m:02x}",
                    self.pos - 1
                )))
            }
        })
    }

    fn str(&mut self, n: usize) -> Result<Value> {
        let at = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|e| Error::Decode(format!("at byte {at}: string is not UTF-8: {e}")))
    }

    fn enter(&self, depth: usize) -> Result<usize> {
        if depth >= self.limits.max_depth {
            return Err(self.err(format_args!(
                "nesting deeper than {} levels",
                self.limits.max_depth
            )));
        }
        Ok(depth + 1)
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value> {
        let depth = self.enter(depth)?;
        let n = self.container_len(n, 1)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.value(depth)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value> {
        let depth = self.enter(depth)?;
        let n = self.container_len(n, 2)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.value(depth)?;
            let x = self.value(depth)?;
            v.push((k, x));
        }
        Ok(Value::Map(v))
    }
}

/// Parses one MessagePack value (of any shape) from `bytes`, which it must fill exactly.
pub fn decode_value(bytes: &[u8], limits: DecodeLimits) -> Result<Value> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        values: 0,
        limits,
    };
    let v = r.value(0)?;
    if r.pos != bytes.len() {
        return Err(Error::Decode(format!(
            "{} trailing bytes after the value",
            bytes.len() - r.pos
        )));
    }
    Ok(v)
}

/// Decodes a batch with the default [`DecodeLimits`].
pub fn decode_batch(bytes: &[u8]) -> Result<KvEventBatch> {
    decode_batch_with(bytes, DecodeLimits::default())
}

/// Decodes a batch from any vLLM release's encoding (see the module docs).
pub fn decode_batch_with(bytes: &[u8], limits: DecodeLimits) -> Result<KvEventBatch> {
    batch_from_value(decode_value(bytes, limits)?)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
    }
}

fn bad(path: &str, expected: &str, got: &Value) -> Error {
    Error::Decode(format!(
        "{path}: expected {expected}, got {}",
        type_name(got)
    ))
}

fn as_f64(v: Value, path: &str) -> Result<f64> {
    match v {
        Value::Float(f) => Ok(f),
        // msgspec accepts an int for a float field.
        Value::Int(i) => Ok(i as f64),
        other => Err(bad(path, "float", &other)),
    }
}

fn as_i64(v: Value, path: &str) -> Result<i64> {
    match v {
        Value::Int(i) => i64::try_from(i)
            .map_err(|_| Error::Decode(format!("{path}: integer {i} does not fit in i64"))),
        other => Err(bad(path, "int", &other)),
    }
}

fn opt<T>(v: Value, path: &str, f: fn(Value, &str) -> Result<T>) -> Result<Option<T>> {
    match v {
        Value::Nil => Ok(None),
        other => f(other, path).map(Some),
    }
}

fn as_string(v: Value, path: &str) -> Result<String> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(bad(path, "str", &other)),
    }
}

fn as_array(v: Value, path: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(bad(path, "array", &other)),
    }
}

fn as_hash(v: Value, path: &str) -> Result<BlockHash> {
    match v {
        Value::Int(i) => Ok(BlockHash::Int(i)),
        Value::Bytes(b) => Ok(BlockHash::Bytes(b)),
        other => Err(bad(path, "bytes or int", &other)),
    }
}

fn as_hashes(v: Value, path: &str) -> Result<Vec<BlockHash>> {
    as_array(v, path)?
        .into_iter()
        .enumerate()
        .map(|(i, h)| as_hash(h, &format!("{path}[{i}]")))
        .collect()
}

fn as_extra_keys(v: Value, path: &str) -> Result<Vec<Option<Vec<Value>>>> {
    as_array(v, path)?
        .into_iter()
        .enumerate()
        .map(|(i, k)| match k {
            Value::Nil => Ok(None),
            Value::Array(t) => Ok(Some(t)),
            other => Err(bad(&format!("{path}[{i}]"), "array (tuple) or nil", &other)),
        })
        .collect()
}

/// An event's fields, by wire position, whichever form it came in.
struct Fields {
    path: String,
    slots: Vec<Option<Value>>,
}

impl Fields {
    /// Takes field `i` (named `names[i]`); `None` when it was omitted. Required fields missing is an
    /// error, as in msgspec.
    fn take(&mut self, i: usize, names: &[&str], required: usize) -> Result<Option<Value>> {
        match self.slots.get_mut(i).and_then(Option::take) {
            Some(v) => Ok(Some(v)),
            None if i < required => Err(Error::Decode(format!(
                "{}: missing required field `{}`",
                self.path, names[i]
            ))),
            None => Ok(None),
        }
    }

    fn p(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }
}

fn event_from_value(v: Value, path: &str) -> Result<KvCacheEvent> {
    let (tag, mut slots_src): (String, RawFields) = match v {
        Value::Array(mut a) => {
            if a.is_empty() {
                return Err(Error::Decode(format!("{path}: empty event array (no tag)")));
            }
            let tag = as_string(a.remove(0), &format!("{path}[0] (tag)"))?;
            (tag, RawFields::Positional(a))
        }
        Value::Map(m) => {
            let mut tag = None;
            let mut rest = Vec::with_capacity(m.len());
            for (k, x) in m {
                let Value::Str(k) = k else {
                    return Err(bad(&format!("{path} key"), "str", &k));
                };
                if k == "type" {
                    if tag.is_some() {
                        return Err(Error::Decode(format!("{path}: duplicate key \"type\"")));
                    }
                    tag = Some(as_string(x, &format!("{path}.type"))?);
                } else {
                    rest.push((k, x));
                }
            }
            let tag = tag.ok_or_else(|| {
                Error::Decode(format!("{path}: event map without a \"type\" tag"))
            })?;
            (tag, RawFields::Named(rest))
        }
        other => return Err(bad(path, "event (tagged array or map)", &other)),
    };
    let names: &[&str] = match tag.as_str() {
        "BlockStored" => &BlockStored::FIELD_NAMES,
        "BlockRemoved" => &BlockRemoved::FIELD_NAMES,
        "AllBlocksCleared" => &[],
        other => {
            return Err(Error::Decode(format!(
                "{path}: unknown event tag {other:?} (expected BlockStored, BlockRemoved or AllBlocksCleared)"
            )))
        }
    };
    let path = format!("{path} ({tag})");
    let mut f = Fields {
        slots: slots_src.slots(names, &path)?,
        path,
    };
    match tag.as_str() {
        "BlockStored" => {
            let (n, r) = (&BlockStored::FIELD_NAMES[..], BlockStored::REQUIRED_FIELDS);
            let req = |f: &mut Fields, i: usize| -> Result<Value> {
                Ok(f.take(i, n, r)?.unwrap_or(Value::Nil))
            };
            let block_hashes = as_hashes(req(&mut f, 0)?, &f.p(n[0]))?;
            let parent_block_hash = opt(req(&mut f, 1)?, &f.p(n[1]), as_hash)?;
            let token_ids = as_array(req(&mut f, 2)?, &f.p(n[2]))?
                .into_iter()
                .enumerate()
                .map(|(i, t)| as_i64(t, &format!("{}[{i}]", f.p(n[2]))))
                .collect::<Result<Vec<_>>>()?;
            let block_size = as_i64(req(&mut f, 3)?, &f.p(n[3]))?;
            let lora_id = opt(req(&mut f, 4)?, &f.p(n[4]), as_i64)?;
            let medium = opt(req(&mut f, 5)?, &f.p(n[5]), as_string)?;
            let lora_name = opt(req(&mut f, 6)?, &f.p(n[6]), as_string)?;
            let extra_keys = opt(req(&mut f, 7)?, &f.p(n[7]), as_extra_keys)?;
            let group_idx = opt(req(&mut f, 8)?, &f.p(n[8]), as_i64)?;
            let kv_cache_spec_kind = opt(req(&mut f, 9)?, &f.p(n[9]), as_string)?;
            let kv_cache_spec_sliding_window = opt(req(&mut f, 10)?, &f.p(n[10]), as_i64)?;
            Ok(KvCacheEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
                kv_cache_spec_kind,
                kv_cache_spec_sliding_window,
            }))
        }
        "BlockRemoved" => {
            let (n, r) = (
                &BlockRemoved::FIELD_NAMES[..],
                BlockRemoved::REQUIRED_FIELDS,
            );
            let block_hashes = as_hashes(f.take(0, n, r)?.unwrap_or(Value::Nil), &f.p(n[0]))?;
            let medium = opt(
                f.take(1, n, r)?.unwrap_or(Value::Nil),
                &f.p(n[1]),
                as_string,
            )?;
            let group_idx = opt(f.take(2, n, r)?.unwrap_or(Value::Nil), &f.p(n[2]), as_i64)?;
            Ok(KvCacheEvent::BlockRemoved(BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            }))
        }
        _ => Ok(KvCacheEvent::AllBlocksCleared),
    }
}

enum RawFields {
    Positional(Vec<Value>),
    Named(Vec<(String, Value)>),
}

impl RawFields {
    /// Puts the fields into wire-order slots. Extra trailing elements and unknown keys are ignored,
    /// as msgspec ignores them (`forbid_unknown_fields=False`).
    fn slots(&mut self, names: &[&str], path: &str) -> Result<Vec<Option<Value>>> {
        let mut slots: Vec<Option<Value>> = (0..names.len()).map(|_| None).collect();
        match self {
            RawFields::Positional(a) => {
                for (slot, v) in slots.iter_mut().zip(a.drain(..)) {
                    *slot = Some(v);
                }
            }
            RawFields::Named(m) => {
                for (k, v) in m.drain(..) {
                    if let Some(i) = names.iter().position(|n| *n == k) {
                        if slots[i].is_some() {
                            return Err(Error::Decode(format!("{path}: duplicate key {k:?}")));
                        }
                        slots[i] = Some(v);
                    }
                }
            }
        }
        Ok(slots)
    }
}

fn batch_from_value(v: Value) -> Result<KvEventBatch> {
    let (ts, events, dp) = match v {
        Value::Array(a) => {
            if a.len() < 2 {
                return Err(Error::Decode(format!(
                    "batch: expected an array of at least 2 elements (ts, events), got {}",
                    a.len()
                )));
            }
            let mut it = a.into_iter();
            let ts = it.next().unwrap_or(Value::Nil);
            let events = it.next().unwrap_or(Value::Nil);
            (ts, events, it.next())
        }
        Value::Map(m) => {
            let (mut ts, mut events, mut dp) = (None, None, None);
            for (k, x) in m {
                let slot = match &k {
                    Value::Str(s) if s == "ts" => &mut ts,
                    Value::Str(s) if s == "events" => &mut events,
                    Value::Str(s) if s == "data_parallel_rank" => &mut dp,
                    _ => continue,
                };
                if slot.replace(x).is_some() {
                    return Err(Error::Decode(format!("batch: duplicate key {:?}", k)));
                }
            }
            let missing = |n: &str| Error::Decode(format!("batch: missing required field `{n}`"));
            (
                ts.ok_or_else(|| missing("ts"))?,
                events.ok_or_else(|| missing("events"))?,
                dp,
            )
        }
        other => return Err(bad("batch", "array or map", &other)),
    };
    let ts = as_f64(ts, "batch.ts")?;
    let events = as_array(events, "batch.events")?
        .into_iter()
        .enumerate()
        .map(|(i, e)| event_from_value(e, &format!("batch.events[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let data_parallel_rank = match dp {
        None => None,
        Some(v) => opt(v, "batch.data_parallel_rank", as_i64)?,
    };
    Ok(KvEventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::types::MEDIUM_GPU;

    fn stored() -> BlockStored {
        BlockStored {
            block_hashes: vec![BlockHash::from(1u64), BlockHash::Bytes(vec![7; 32])],
            parent_block_hash: None,
            token_ids: vec![1, 2, 3, 4],
            block_size: 2,
            lora_id: None,
            medium: Some(MEDIUM_GPU.into()),
            lora_name: None,
            extra_keys: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        }
    }

    #[test]
    fn golden_bytes_of_a_small_batch() {
        // Hand-assembled from the MessagePack spec and msgspec's rules.
        let batch = KvEventBatch {
            ts: 1.5,
            events: vec![
                KvCacheEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![BlockHash::from(-1i64), BlockHash::from(300u64)],
                    medium: None,
                    group_idx: None,
                }),
                KvCacheEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        };
        let mut want = vec![0x93, 0xcb];
        want.extend_from_slice(&1.5f64.to_be_bytes());
        want.extend_from_slice(&[0x92, 0x94, 0xac]);
        want.extend_from_slice(b"BlockRemoved");
        want.extend_from_slice(&[0x92, 0xff, 0xcd, 0x01, 0x2c, 0xc0, 0xc0]);
        want.extend_from_slice(&[0x91, 0xb0]);
        want.extend_from_slice(b"AllBlocksCleared");
        want.push(0x00);
        assert_eq!(encode_batch(&batch, WireFormat::Array).unwrap(), want);
        assert_eq!(decode_batch(&want).unwrap(), batch);
    }

    #[test]
    fn array_form_writes_every_field_and_short_arrays_decode() {
        let e = stored();
        let batch = KvEventBatch {
            ts: 0.0,
            events: vec![KvCacheEvent::BlockStored(e.clone())],
            data_parallel_rank: None,
        };
        let bytes = encode_batch(&batch, WireFormat::Array).unwrap();
        let Value::Array(top) = decode_value(&bytes, DecodeLimits::default()).unwrap() else {
            panic!()
        };
        assert_eq!(top.len(), 3, "dp rank written as nil");
        assert_eq!(top[2], Value::Nil);
        let Value::Array(evs) = &top[1] else { panic!() };
        let Value::Array(ev) = &evs[0] else { panic!() };
        assert_eq!(ev.len(), 1 + BlockStored::FIELDS);
        assert!(ev[8..].iter().all(|v| *v == Value::Nil));
        assert_eq!(decode_batch(&bytes).unwrap(), batch);

        // A producer that trims trailing defaults (older hand-written ones do): [ts, [event]] with
        // only the required fields; the missing ones decode as None.
        let mut short = vec![0x92, 0x00, 0x91, 0x98];
        let Value::Array(top) = decode_value(&bytes, DecodeLimits::default()).unwrap() else {
            panic!()
        };
        let Value::Array(evs) = &top[1] else { panic!() };
        let Value::Array(ev) = &evs[0] else { panic!() };
        for v in &ev[..8] {
            write_value(&mut short, v).unwrap();
        }
        let got = decode_batch(&short).unwrap();
        assert_eq!(got.data_parallel_rank, None);
        assert_eq!(got.events, vec![KvCacheEvent::BlockStored(e)]);
    }

    #[test]
    fn map_form_round_trips_and_omits_every_default() {
        let mut e = stored();
        e.group_idx = Some(0);
        let batch = KvEventBatch {
            ts: 2.0,
            events: vec![KvCacheEvent::BlockStored(e), KvCacheEvent::AllBlocksCleared],
            data_parallel_rank: None,
        };
        let bytes = encode_batch(&batch, WireFormat::Map).unwrap();
        let Value::Array(top) = decode_value(&bytes, DecodeLimits::default()).unwrap() else {
            panic!()
        };
        let Value::Array(evs) = &top[1] else { panic!() };
        let Value::Map(m) = &evs[0] else { panic!() };
        let keys: Vec<_> = m.iter().map(|(k, _)| k.clone()).collect();
        let want: Vec<Value> = [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "group_idx",
        ]
        .iter()
        .map(|s| Value::from(*s))
        .collect();
        assert_eq!(keys, want);
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn unknown_trailing_fields_and_keys_are_ignored() {
        // ["BlockRemoved", [5], "GPU", 1, "future-field"] and {"type":"AllBlocksCleared","x":1}
        let mut b = vec![0x92, 0x00, 0x92, 0x95, 0xac];
        b.extend_from_slice(b"BlockRemoved");
        b.extend_from_slice(&[0x91, 0x05, 0xa3]);
        b.extend_from_slice(b"GPU");
        b.push(0x01);
        b.extend_from_slice(&[0xac]);
        b.extend_from_slice(b"future-field");
        b.extend_from_slice(&[0x82, 0xa4]);
        b.extend_from_slice(b"type");
        b.push(0xb0);
        b.extend_from_slice(b"AllBlocksCleared");
        b.extend_from_slice(&[0xa1, b'x', 0x01]);
        let got = decode_batch(&b).unwrap();
        assert_eq!(got.ts, 0.0, "int ts accepted as float");
        assert_eq!(
            got.events,
            vec![
                KvCacheEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![BlockHash::from(5u64)],
                    medium: Some("GPU".into()),
                    group_idx: Some(1)
                }),
                KvCacheEvent::AllBlocksCleared
            ]
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic_or_allocation() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            (
                "array32 claiming 4G elements",
                vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                "bin32 claiming 4 GiB",
                vec![0x92, 0x00, 0x91, 0xc6, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                "map32 claiming 4G entries",
                vec![0xdf, 0xff, 0xff, 0xff, 0xff],
            ),
            ("not a batch", vec![0x05]),
            ("batch of one", vec![0x91, 0x00]),
            ("events not array", vec![0x92, 0x00, 0x00]),
            ("unknown tag", vec![0x92, 0x00, 0x91, 0x91, 0xa1, b'X']),
            (
                "missing required",
                vec![
                    0x92, 0x00, 0x91, 0x92, 0xac, b'B', b'l', b'o', b'c', b'k', b'R', b'e', b'm',
                    b'o', b'v', b'e', b'd', 0x90,
                ],
            ),
            ("ext type", vec![0xd4, 0x01, 0x00]),
            ("reserved marker", vec![0xc1]),
            ("bad utf8", vec![0xa1, 0xff]),
            ("trailing bytes", vec![0x92, 0x00, 0x90, 0x00]),
            ("dp rank str", vec![0x93, 0x00, 0x90, 0xa1, b'x']),
        ];
        for (what, b) in cases {
            assert!(decode_batch(&b).is_err(), "{what} should fail");
        }
        // Deep nesting is refused by the depth cap, not by the stack.
        let mut deep = vec![0x91; 10_000];
        deep.push(0xc0);
        let e = decode_value(&deep, DecodeLimits::default()).unwrap_err();
        assert!(e.to_string().contains("nesting"), "{e}");
        // The value budget holds.
        let mut many = vec![0xdc, 0x03, 0xe8];
        many.extend(std::iter::repeat(0xc0).take(1000));
        assert!(decode_value(
            &many,
            DecodeLimits {
                max_depth: 4,
                max_values: 100
            }
        )
        .is_err());
        assert!(decode_value(&many, DecodeLimits::default()).is_ok());
    }

    #[test]
    fn out_of_range_integers_are_refused_by_the_encoder() {
        let mut e = stored();
        e.block_hashes = vec![BlockHash::Int(i128::from(u64::MAX) + 1)];
        let batch = KvEventBatch {
            ts: 0.0,
            events: vec![KvCacheEvent::BlockStored(e)],
            data_parallel_rank: None,
        };
        assert!(matches!(
            encode_batch(&batch, WireFormat::Array),
            Err(Error::Encode(_))
        ));
    }
}
