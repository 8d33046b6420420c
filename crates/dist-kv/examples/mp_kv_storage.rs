//! Two processes through the shared-storage connector, as `dist run --nproc-per-node 2` starts
//! them: rank 0 (prefill) fills NHD caches with random data and saves several requests' KV as
//! safetensors files under a shared folder; rank 1 (decode), with HND caches and another block
//! assignment, finds each request by vLLM's cache key, loads it and checks every token row
//! against the producer's data (regenerated from the same seed: the oracle). One request's file
//! is then damaged: that request alone fails, and nothing of it is written.
//!
//! Exits 0 when every check passed. `--worlds` prints `2`. Built with the `cuda` feature,
//! `--device` keeps both sides' caches in device memory (device `LOCAL_RANK % device count`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dist_core::{DType, HostGroup, HostGroupExt};
use dist_kv::transfer::{
    align_to_block_size, slot_mapping, BlockId, KvCacheLayer, KvCacheSpec, KvCaches,
    KvConnectorScheduler, KvConnectorWorker, KvLayout, PagedKvCache, Request, SchedulerOutput,
    StorageConfig, StorageScheduler, StorageWorker,
};
use dist_store::StatelessProcessGroup;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BS: usize = 16;
const LAYERS: usize = 6;
const BLOCKS: usize = 48;
const SEED: u64 = 0x51de;

fn spec(layout: KvLayout) -> KvCacheSpec {
    KvCacheSpec {
        kv: 2,
        num_blocks: BLOCKS,
        block_size: BS,
        num_kv_heads: 4,
        head_dim: 64,
        dtype: DType::F16,
        layout,
    }
}

fn caches(layout: KvLayout, seed: Option<u64>) -> Res<KvCaches> {
    (0..LAYERS)
        .map(|i| {
            let name = format!("model.layers.{i}.self_attn.attn");
            let c = match seed {
                Some(s) => PagedKvCache::random(spec(layout), s + i as u64)?,
                None => PagedKvCache::zeros(spec(layout))?,
            };
            Ok((name, c))
        })
        .collect()
}

/// (prompt, producer blocks, consumer blocks) per request.
fn plan() -> Vec<(Vec<i64>, Vec<BlockId>, Vec<BlockId>)> {
    let lens = [130usize, 49, 17, 96, 200];
    let (mut np, mut nc) = (0u32, 0u32);
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let nb = len.div_ceil(BS) as u32;
            let p = (0..nb).map(|k| (np + k) * 5 % BLOCKS as u32).collect();
            let c = (0..nb)
                .map(|k| BLOCKS as u32 - 1 - (nc + k) * 7 % BLOCKS as u32)
                .collect();
            np += nb;
            nc += nb;
            let prompt = (0..len as i64)
                .map(|t| (t * 131 + i as i64 * 7) % 50_000)
                .collect();
            (prompt, p, c)
        })
        .collect()
}

fn step_out(reqs: &[(Request, Vec<BlockId>)]) -> SchedulerOutput {
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        out.add_new_prompt(r, b);
    }
    out
}

/// Loads every request; returns (loaded, failed) ids.
fn load<C: KvCacheLayer>(
    cfg: &StorageConfig,
    cc: &mut BTreeMap<String, C>,
    reqs: &[(Request, Vec<BlockId>)],
) -> Res<(BTreeSet<String>, Vec<String>)> {
    let mut sched = StorageScheduler::new(cfg.clone())?;
    let mut w = StorageWorker::<C>::new(cfg.clone())?;
    w.register_kv_caches(cc)?;
    for (r, b) in reqs {
        let (n, _) = sched.get_num_new_matched_tokens(r, 0)?;
        let n = n.unwrap_or(0);
        if n == 0 {
            return Err(
                format!("{}: no hit in {}", r.request_id, cfg.storage_path.display()).into(),
            );
        }
        sched.update_state_after_alloc(r, b, n);
    }
    w.bind_connector_metadata(sched.build_connector_meta(&step_out(reqs)));
    w.start_load_kv(cc)?;
    let fin = w.get_finished(&BTreeSet::new());
    Ok((fin.finished_recving, fin.failed.into_values().collect()))
}

fn wrap_all<C>(f: fn(PagedKvCache) -> Res<C>, caches: KvCaches) -> Res<BTreeMap<String, C>> {
    caches.into_iter().map(|(n, c)| Ok((n, f(c)?))).collect()
}

#[cfg(feature = "cuda")]
fn device_cache(c: PagedKvCache) -> Res<dist_kv::transfer::cuda::CudaKvCache> {
    // This rank's GPU: `LOCAL_RANK` (as the launcher sets it) modulo the visible devices.
    let local = dist_store::RankEnv::from_env()?.local_rank;
    let ordinal = local % dist_cuda::device_count().max(1);
    Ok(dist_kv::transfer::cuda::CudaKvCache::from_host(
        &c, ordinal,
    )?)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("2");
        return;
    }
    let device = std::env::args().any(|a| a == "--device");
    let r = (|| -> Res<()> {
        let g = StatelessProcessGroup::from_env(Duration::from_secs(60))?;
        if g.world_size() != 2 {
            return Err(format!("mp_kv_storage runs with 2 ranks, got {}", g.world_size()).into());
        }
        if !device {
            return run(&g, Ok);
        }
        #[cfg(feature = "cuda")]
        return run(&g, device_cache);
        #[cfg(not(feature = "cuda"))]
        Err("--device needs the cuda feature".into())
    })();
    if let Err(e) = r {
        eprintln!("mp_kv_storage: FAILED: {e}");
        std::process::exit(1);
    }
    println!(
        "mp_kv_storage ({}): all checks passed",
        if device {
            "device caches"
        } else {
            "host caches"
        }
    );
}

/// Every check, with the caches made by `wrap` from host caches.
fn run<C: KvCacheLayer>(g: &StatelessProcessGroup, wrap: fn(PagedKvCache) -> Res<C>) -> Res<()> {
    {
        let dir = std::env::temp_dir().join(format!(
            "dist-kv-mp-storage-{}",
            std::env::var("MASTER_PORT").unwrap_or_default()
        ));
        let dir: String = g.broadcast_obj(
            (g.rank() == 0).then(|| dir.display().to_string()).as_ref(),
            0,
        )?;
        let cfg = StorageConfig::new(&dir, BS);
        let plan = plan();
        let pc = caches(KvLayout::Nhd, Some(SEED))?;
        if g.rank() == 0 {
            let _ = std::fs::remove_dir_all(&dir);
            let reqs: Vec<_> = plan
                .iter()
                .enumerate()
                .map(|(i, (p, b, _))| (Request::new(format!("pre-{i}"), p.clone()), b.clone()))
                .collect();
            let mut sched = StorageScheduler::new(cfg.clone())?;
            let mut w = StorageWorker::<C>::new(cfg.clone())?;
            let pc = wrap_all(wrap, pc.clone())?;
            w.register_kv_caches(&pc)?;
            let start = Instant::now();
            w.bind_connector_metadata(sched.build_connector_meta(&step_out(&reqs)));
            for (name, c) in &pc {
                w.save_kv_layer(name, c)?;
            }
            w.wait_for_save()?;
            let fin = w.get_finished(&BTreeSet::new());
            if !fin.failed.is_empty() || fin.finished_sending.len() != reqs.len() {
                return Err(format!("save: {fin:?}").into());
            }
            println!(
                "mp_kv_storage: saved {} requests x {LAYERS} layers in {:?}",
                reqs.len(),
                start.elapsed()
            );
        }
        g.barrier()?;
        // The decode prompts are the prefill prompts plus one generated token.
        let dec: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(i, (p, _, c))| {
                let mut p = p.clone();
                p.push(7);
                (Request::new(format!("dec-{i}"), p), c.clone())
            })
            .collect();
        if g.rank() == 1 {
            let mut cc = wrap_all(wrap, caches(KvLayout::Hnd, None)?)?;
            let start = Instant::now();
            let (loaded, failed) = load(&cfg, &mut cc, &dec)?;
            if !failed.is_empty() || loaded.len() != dec.len() {
                return Err(format!("load: loaded {loaded:?}, failed {failed:?}").into());
            }
            let took = start.elapsed();
            for (i, (p, pb, cb)) in plan.iter().enumerate() {
                let n = align_to_block_size(p.len(), BS);
                let (ps, cs) = (slot_mapping(pb, BS, n)?, slot_mapping(cb, BS, n)?);
                for name in cc.keys() {
                    if pc[name].gather_slots(&ps)? != cc[name].gather_slots(&cs)? {
                        return Err(format!("request {i} layer {name}: rows differ").into());
                    }
                }
            }
            println!(
                "mp_kv_storage: loaded {} requests in {took:?}, every row equal",
                dec.len()
            );
        }
        g.barrier()?;
        if g.rank() == 0 {
            // Damage request 3's last layer file (one byte of its data).
            let (p, _, _) = &plan[3];
            let key = cfg.cache_key(&p[..align_to_block_size(p.len(), BS)], &[]);
            let f = cfg.file(&key, &format!("model.layers.{}.self_attn.attn", LAYERS - 1))?;
            let mut b = std::fs::read(&f)?;
            let n = b.len();
            b[n - 100] ^= 1;
            std::fs::write(&f, b)?;
        }
        g.barrier()?;
        if g.rank() == 1 {
            let mut cc = wrap_all(wrap, caches(KvLayout::Hnd, None)?)?;
            let (loaded, failed) = load(&cfg, &mut cc, &dec)?;
            if failed.len() != 1
                || !failed[0].contains("dec-3")
                || !failed[0].contains("checksum")
                || loaded.contains("dec-3")
                || loaded.len() != 4
            {
                return Err(format!("damaged file: loaded {loaded:?}, failed {failed:?}").into());
            }
            let n3 = plan[3].2.len() * BS;
            let s3 = slot_mapping(&plan[3].2, BS, n3)?;
            if cc.values().any(|c| {
                c.gather_slots(&s3)
                    .map(|t| t.as_bytes().iter().any(|&x| x != 0))
                    .unwrap_or(true)
            }) {
                return Err("damaged file: request 3's blocks were written".into());
            }
            println!(
                "mp_kv_storage: damaged file -> only that request failed: {}",
                failed[0]
            );
        }
        g.barrier()?;
        if g.rank() == 0 {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }
}
