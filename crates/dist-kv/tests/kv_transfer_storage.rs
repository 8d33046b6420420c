//! The shared-storage connector end to end through both roles: a producer saves random caches,
//! a consumer with another layout and another block assignment loads them, and every token row
//! equals the producer's. Damaged, partial, missing and foreign files fail only their request,
//! leave the cache untouched and report the request's blocks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dist_core::DType;
use dist_kv::transfer::storage::StorageConfig;
use dist_kv::transfer::{
    align_to_block_size, decode_metadata, encode_metadata, slot_mapping, BlockId, KvCacheSpec,
    KvCaches, KvConnectorScheduler, KvConnectorWorker, KvLayout, PagedKvCache, Request,
    SchedulerOutput, StorageScheduler, StorageWorker,
};

const BS: usize = 4;
const LAYERS: usize = 3;

fn spec(layout: KvLayout, num_blocks: usize, heads: usize) -> KvCacheSpec {
    KvCacheSpec {
        kv: 2,
        num_blocks,
        block_size: BS,
        num_kv_heads: heads,
        head_dim: 8,
        dtype: DType::BF16,
        layout,
    }
}

fn layer(i: usize) -> String {
    format!("model.layers.{i}.self_attn.attn")
}

fn caches(layout: KvLayout, num_blocks: usize, heads: usize, seed: Option<u64>) -> KvCaches {
    (0..LAYERS)
        .map(|i| {
            let s = spec(layout, num_blocks, heads);
            let c = match seed {
                Some(seed) => PagedKvCache::random(s, seed + i as u64),
                None => PagedKvCache::zeros(s),
            };
            (layer(i), c.unwrap())
        })
        .collect()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dist-kv-storage-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn prompt(seed: u64, len: usize) -> Vec<i64> {
    (0..len as i64)
        .map(|t| (t * 7919 + seed as i64 * 104729) % 32000)
        .collect()
}

/// Runs one producer step that saves `reqs` (request, blocks).
fn produce(cfg: &StorageConfig, caches: &KvCaches, reqs: &[(Request, Vec<BlockId>)]) {
    let mut sched = StorageScheduler::new(cfg.clone()).unwrap();
    let mut worker = StorageWorker::new(cfg.clone()).unwrap();
    worker.register_kv_caches(caches).unwrap();
    let out = common::new_prompts(&mut sched, reqs);
    let meta = sched.build_connector_meta(&out);
    assert_eq!(meta.requests.len(), reqs.len());
    assert!(meta.requests.iter().all(|m| m.is_store));
    worker.bind_connector_metadata(decode_metadata(&encode_metadata(&meta).unwrap()).unwrap());
    for (name, c) in caches {
        worker.save_kv_layer(name, c).unwrap();
    }
    worker.wait_for_save().unwrap();
    let fin = worker.get_finished(&BTreeSet::new());
    assert!(fin.failed.is_empty(), "{:?}", fin.failed);
    assert_eq!(fin.finished_sending.len(), reqs.len());
    worker.clear_connector_metadata();
}

/// Runs one consumer step; returns (failed requests, blocks with load errors).
fn consume(
    cfg: &StorageConfig,
    caches: &mut KvCaches,
    reqs: &[(Request, Vec<BlockId>)],
) -> (
    BTreeMap<String, String>,
    BTreeSet<BlockId>,
    BTreeSet<String>,
) {
    let mut sched = StorageScheduler::new(cfg.clone()).unwrap();
    let mut worker = StorageWorker::new(cfg.clone()).unwrap();
    worker.register_kv_caches(caches).unwrap();
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        let (n, is_async) = sched.get_num_new_matched_tokens(r, 0).unwrap();
        assert!(!is_async);
        let n = n.unwrap();
        assert_eq!(n, align_to_block_size(r.prompt_token_ids.len() - 1, BS));
        sched.update_state_after_alloc(r, b, n);
        out.add_new_request(r, b);
    }
    let meta = sched.build_connector_meta(&out);
    assert!(meta.requests.iter().all(|m| !m.is_store));
    worker.bind_connector_metadata(decode_metadata(&encode_metadata(&meta).unwrap()).unwrap());
    worker.start_load_kv(caches).unwrap();
    for name in caches.keys() {
        worker.wait_for_layer_load(name).unwrap();
    }
    let fin = worker.get_finished(&BTreeSet::new());
    let blocks = worker.get_block_ids_with_load_errors();
    worker.clear_connector_metadata();
    (fin.failed, blocks, fin.finished_recving)
}

struct Setup {
    cfg: StorageConfig,
    prod: KvCaches,
    prod_reqs: Vec<(Request, Vec<BlockId>)>,
    cons_reqs: Vec<(Request, Vec<BlockId>)>,
}

fn setup(tag: &str) -> Setup {
    let cfg = StorageConfig::new(tmpdir(tag), BS);
    let prod = caches(KvLayout::Nhd, 16, 2, Some(42));
    // Prompt lengths 13, 9 and 20: 12, 8 and 16 tokens saved (align_to_block_size(len)).
    let lens = [13usize, 9, 20];
    let prod_blocks: [Vec<BlockId>; 3] = [vec![3, 0, 7, 9], vec![1, 15, 2], vec![4, 5, 6, 8, 10]];
    let cons_blocks: [Vec<BlockId>; 3] = [vec![11, 2, 5, 0], vec![9, 10, 1], vec![3, 4, 12, 13, 7]];
    let mut prod_reqs = Vec::new();
    let mut cons_reqs = Vec::new();
    for i in 0..3 {
        let p = prompt(i as u64, lens[i]);
        let mut r = Request::new(format!("req-{i}"), p.clone());
        if i == 2 {
            r.mm_hashes = vec!["img-a".into(), "img-b".into()];
        }
        prod_reqs.push((r.clone(), prod_blocks[i].clone()));
        // The decode instance's prompt is the prefill's plus the generated token.
        let mut p2 = p;
        p2.push(31999);
        let mut r2 = Request::new(format!("dec-{i}"), p2);
        r2.mm_hashes = r.mm_hashes.clone();
        cons_reqs.push((r2, cons_blocks[i].clone()));
    }
    Setup {
        cfg,
        prod,
        prod_reqs,
        cons_reqs,
    }
}

/// Every loaded token row equals the producer's (the oracle: the producer's rows at its slots).
fn assert_rows_equal(s: &Setup, cons: &KvCaches, which: &[usize]) {
    for &i in which {
        let n = align_to_block_size(s.prod_reqs[i].0.prompt_token_ids.len(), BS);
        let ps = slot_mapping(&s.prod_reqs[i].1, BS, n).unwrap();
        let cs = slot_mapping(&s.cons_reqs[i].1, BS, n).unwrap();
        for name in s.prod.keys() {
            let want = s.prod[name].gather_slots(&ps).unwrap();
            let got = cons[name].gather_slots(&cs).unwrap();
            assert!(want == got, "request {i} layer {name}: rows differ");
        }
    }
}

#[test]
fn save_then_load_with_another_layout_and_blocks() {
    let s = setup("ok");
    produce(&s.cfg, &s.prod, &s.prod_reqs);
    // A miss: a prompt nobody saved.
    let mut sched = StorageScheduler::new(s.cfg.clone()).unwrap();
    let miss = Request::new("miss", prompt(99, 30));
    assert_eq!(
        sched.get_num_new_matched_tokens(&miss, 0).unwrap(),
        (Some(0), false)
    );
    // A hit partly computed already: only the rest is reported.
    assert_eq!(
        sched
            .get_num_new_matched_tokens(&s.cons_reqs[0].0, 4)
            .unwrap(),
        (Some(8), false)
    );
    // Same tokens but other multimodal hashes: another key, a miss.
    let mut other_mm = s.cons_reqs[2].0.clone();
    other_mm.mm_hashes = vec!["img-c".into()];
    assert_eq!(
        sched.get_num_new_matched_tokens(&other_mm, 0).unwrap(),
        (Some(0), false)
    );

    let mut cons = caches(KvLayout::Hnd, 14, 2, None);
    let (failed, blocks, loaded) = consume(&s.cfg, &mut cons, &s.cons_reqs);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(blocks.is_empty());
    assert_eq!(loaded.len(), 3);
    assert_rows_equal(&s, &cons, &[0, 1, 2]);
    let _ = std::fs::remove_dir_all(&s.cfg.storage_path);
}

fn file_of(s: &Setup, i: usize, l: usize) -> PathBuf {
    let r = &s.prod_reqs[i].0;
    let n = align_to_block_size(r.prompt_token_ids.len(), BS);
    let key = s.cfg.cache_key(&r.prompt_token_ids[..n], &r.mm_hashes);
    s.cfg.file(&key, &layer(l)).unwrap()
}

#[test]
fn damaged_files_fail_only_their_request_and_load_nothing() {
    type Damage = fn(&std::path::Path);
    let damages: Vec<(&str, Damage, &str)> = vec![
        (
            "flipped byte",
            |p| {
                let mut b = std::fs::read(p).unwrap();
                let n = b.len();
                b[n - 3] ^= 0x40;
                std::fs::write(p, b).unwrap();
            },
            "checksum",
        ),
        (
            "truncated",
            |p| {
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..b.len() / 2]).unwrap();
            },
            "corrupt",
        ),
        ("missing", |p| std::fs::remove_file(p).unwrap(), "not found"),
        (
            "garbage header",
            |p| {
                let n = std::fs::metadata(p).unwrap().len() as usize;
                std::fs::write(p, vec![0xffu8; n]).unwrap();
            },
            "not safetensors",
        ),
        (
            "another request's file",
            |p| {
                // Same size, valid checksum, wrong shape: request 1's layer file is smaller.
                let other = p
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("foreign.safetensors");
                std::fs::copy(&other, p).unwrap();
            },
            "expected",
        ),
        (
            "same size, other shape",
            |p| {
                // 12 tokens x 2 heads x 8 dims as 12 x 4 x 4: valid file, valid checksum.
                let t = dist_core::HostTensor::random(DType::BF16, &[2, 12, 4, 4], 5);
                std::fs::write(p, dist_kv::transfer::storage::encode_file(&t).unwrap()).unwrap();
            },
            "needs",
        ),
    ];
    for (what, damage, needle) in damages {
        let s = setup("bad");
        produce(&s.cfg, &s.prod, &s.prod_reqs);
        std::fs::copy(
            file_of(&s, 1, 0),
            s.cfg.storage_path.join("foreign.safetensors"),
        )
        .unwrap();
        // Damage request 0's last layer: nothing of request 0 may be written, even layer 0.
        damage(&file_of(&s, 0, LAYERS - 1));
        let mut cons = caches(KvLayout::Hnd, 14, 2, Some(7));
        let before = cons.clone();
        let (failed, blocks, loaded) = consume(&s.cfg, &mut cons, &s.cons_reqs);
        assert_eq!(failed.len(), 1, "{what}: {failed:?}");
        let msg = &failed["dec-0"];
        assert!(
            msg.contains("dec-0") && msg.contains(needle),
            "{what}: {msg}"
        );
        assert_eq!(
            blocks,
            s.cons_reqs[0].1[..3]
                .iter()
                .copied()
                .collect::<BTreeSet<_>>(),
            "{what}"
        );
        assert!(!loaded.contains("dec-0") && loaded.len() == 2, "{what}");
        for (name, c) in &cons {
            for &b in &s.cons_reqs[0].1 {
                assert!(
                    c.gather_blocks(&[b]).unwrap() == before[name].gather_blocks(&[b]).unwrap(),
                    "{what}: block {b} of {name} was written"
                );
            }
        }
        assert_rows_equal(&s, &cons, &[1, 2]);
        let _ = std::fs::remove_dir_all(&s.cfg.storage_path);
    }
}

#[test]
fn a_cache_of_another_shape_is_refused_per_request() {
    let s = setup("shape");
    produce(&s.cfg, &s.prod, &s.prod_reqs);
    // The consumer has 4 heads, the files 2: every request fails, nothing crashes.
    let mut cons = caches(KvLayout::Nhd, 14, 4, None);
    let (failed, _, loaded) = consume(&s.cfg, &mut cons, &s.cons_reqs);
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(loaded.is_empty());
    assert!(cons
        .values()
        .all(|c| c.tensor().as_bytes().iter().all(|&b| b == 0)));
    let _ = std::fs::remove_dir_all(&s.cfg.storage_path);
}

#[test]
fn files_without_checksum_need_opt_in() {
    let s = setup("nosum");
    produce(&s.cfg, &s.prod, &s.prod_reqs);
    // Rewrite request 1's files the way vLLM's safetensors.torch.save_file does: no metadata.
    for l in 0..LAYERS {
        let p = file_of(&s, 1, l);
        let b = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        let v = st.tensor("kv_cache").unwrap();
        let bytes = safetensors::serialize([("kv_cache", v)], None).unwrap();
        std::fs::write(&p, bytes).unwrap();
    }
    let mut cons = caches(KvLayout::Hnd, 14, 2, None);
    let (failed, _, _) = consume(&s.cfg, &mut cons, &s.cons_reqs[1..2]);
    assert!(failed["dec-1"].contains("no dist_kv.sha256"), "{failed:?}");
    let lax = StorageConfig {
        require_checksum: false,
        ..s.cfg.clone()
    };
    let (failed, _, loaded) = consume(&lax, &mut cons, &s.cons_reqs[1..2]);
    assert!(failed.is_empty() && loaded.contains("dec-1"), "{failed:?}");
    assert_rows_equal(&s, &cons, &[1]);
    let _ = std::fs::remove_dir_all(&s.cfg.storage_path);
}
