//! The codec on random data: every random batch survives encode → decode in both wire forms, the
//! two forms decode to the same batch, and damaged bytes (every truncation, random byte changes)
//! give an error or a batch, never a panic.

use dist_kv::events::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_int(rng: &mut SmallRng) -> i128 {
    match rng.gen_range(0..4) {
        0 => i128::from(rng.gen_range(0u8..128)),
        1 => i128::from(rng.gen::<i64>()),
        2 => i128::from(rng.gen::<u64>()),
        _ => i128::from(rng.gen_range(-40i64..300)),
    }
}

fn rand_string(rng: &mut SmallRng) -> String {
    let n = match rng.gen_range(0..3) {
        0 => rng.gen_range(0..8),
        1 => rng.gen_range(30..40),
        _ => rng.gen_range(250..300),
    };
    (0..n)
        .map(|_| {
            if rng.gen_bool(0.9) {
                rng.gen_range('a'..='z')
            } else {
                'é'
            }
        })
        .collect()
}

fn rand_bytes(rng: &mut SmallRng) -> Vec<u8> {
    let n = if rng.gen_bool(0.8) {
        32
    } else {
        rng.gen_range(0..300)
    };
    (0..n).map(|_| rng.gen()).collect()
}

fn rand_hash(rng: &mut SmallRng) -> BlockHash {
    if rng.gen_bool(0.5) {
        BlockHash::Int(rand_int(rng))
    } else {
        BlockHash::Bytes(rand_bytes(rng))
    }
}

fn rand_value(rng: &mut SmallRng, depth: usize) -> Value {
    match rng.gen_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Nil,
        1 => Value::Bool(rng.gen()),
        2 => Value::Int(rand_int(rng)),
        3 => Value::Float(rng.gen::<f64>() * 1e6 - 5e5),
        4 => Value::Str(rand_string(rng)),
        5 => Value::Bytes(rand_bytes(rng)),
        6 => Value::Array(
            (0..rng.gen_range(0..5))
                .map(|_| rand_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Map(
            (0..rng.gen_range(0..4))
                .map(|_| (Value::Str(rand_string(rng)), rand_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

fn maybe<T>(rng: &mut SmallRng, f: impl FnOnce(&mut SmallRng) -> T) -> Option<T> {
    if rng.gen_bool(0.5) {
        Some(f(rng))
    } else {
        None
    }
}

fn rand_event(rng: &mut SmallRng) -> KvCacheEvent {
    match rng.gen_range(0..3) {
        0 => {
            let n = rng.gen_range(0..20);
            KvCacheEvent::BlockStored(BlockStored {
                block_hashes: (0..n).map(|_| rand_hash(rng)).collect(),
                parent_block_hash: maybe(rng, rand_hash),
                token_ids: (0..rng.gen_range(0..100))
                    .map(|_| rng.gen_range(-5..200_000))
                    .collect(),
                block_size: rng.gen_range(1..256),
                lora_id: maybe(rng, |r| r.gen()),
                medium: maybe(rng, rand_string),
                lora_name: maybe(rng, rand_string),
                extra_keys: maybe(rng, |r| {
                    (0..n)
                        .map(|_| {
                            maybe(r, |r| {
                                (0..r.gen_range(0..4)).map(|_| rand_value(r, 0)).collect()
                            })
                        })
                        .collect()
                }),
                group_idx: maybe(rng, |r| r.gen_range(0..8)),
                kv_cache_spec_kind: maybe(rng, rand_string),
                kv_cache_spec_sliding_window: maybe(rng, |r| r.gen_range(0..1 << 20)),
            })
        }
        1 => KvCacheEvent::BlockRemoved(BlockRemoved {
            block_hashes: (0..rng.gen_range(0..20)).map(|_| rand_hash(rng)).collect(),
            medium: maybe(rng, rand_string),
            group_idx: maybe(rng, |r| r.gen_range(-3..8)),
        }),
        _ => KvCacheEvent::AllBlocksCleared,
    }
}

fn rand_batch(rng: &mut SmallRng) -> KvEventBatch {
    KvEventBatch {
        ts: rng.gen::<f64>() * 2e9,
        events: (0..rng.gen_range(0..12)).map(|_| rand_event(rng)).collect(),
        data_parallel_rank: maybe(rng, |r| r.gen_range(0..64)),
    }
}

#[test]
fn random_batches_round_trip_in_both_forms() {
    let mut rng = SmallRng::seed_from_u64(0x6b76);
    for _ in 0..400 {
        let b = rand_batch(&mut rng);
        let arr = encode_batch(&b, WireFormat::Array).unwrap();
        let map = encode_batch(&b, WireFormat::Map).unwrap();
        assert_eq!(decode_batch(&arr).unwrap(), b);
        assert_eq!(decode_batch(&map).unwrap(), b);
        // Re-encoding what was decoded gives the same bytes (the encoding is canonical).
        assert_eq!(
            encode_batch(&decode_batch(&arr).unwrap(), WireFormat::Array).unwrap(),
            arr
        );
    }
}

#[test]
fn sample_batches_round_trip() {
    for i in 0..20 {
        for dp in [None, Some(0), Some(7)] {
            let b = sample_batch(i, dp);
            for f in [WireFormat::Array, WireFormat::Map] {
                assert_eq!(decode_batch(&encode_batch(&b, f).unwrap()).unwrap(), b);
            }
        }
    }
}

#[test]
fn damaged_bytes_never_panic() {
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..25 {
        let b = rand_batch(&mut rng);
        for f in [WireFormat::Array, WireFormat::Map] {
            let bytes = encode_batch(&b, f).unwrap();
            // Every strict prefix is incomplete, so an error (a sample of them for long batches).
            let step = (bytes.len() / 400).max(1);
            for n in (0..bytes.len()).step_by(step) {
                assert!(
                    decode_batch(&bytes[..n]).is_err(),
                    "prefix of {n}/{} decoded",
                    bytes.len()
                );
            }
            // Random byte changes: an error or some batch, and no panic, no huge allocation.
            for _ in 0..200 {
                let mut d = bytes.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..d.len());
                    d[i] = rng.gen();
                }
                let _ = decode_batch(&d);
            }
        }
    }
}
