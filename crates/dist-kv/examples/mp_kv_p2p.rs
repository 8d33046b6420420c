//! Two processes through the P2P connector on the CPU data path (TCP), as `dist run
//! --nproc-per-node 2` starts them: rank 0 is the producer (prefill), rank 1 the consumer
//! (decode). For each mode (PUT, PUT_ASYNC, GET) the producer fills NHD caches with random data
//! and sends several requests' layers; the consumer, with HND caches and another block
//! assignment, receives them and checks every block against the producer's data (regenerated
//! from the same seed: the oracle). Then the consumer dies in the middle of a request and the
//! producer must report that request failed, naming it, with its buffers freed, in time.
//!
//! Exits 0 when every check passed; prints each mode's time and rate. `--worlds` prints `2`.
//! `--bench MIB` measures each mode's rate beside a plain TCP stream instead (no checks).
//!
//! `--path tcp` (the default) is the CPU data path with host caches. Built with the `cuda`
//! feature, `--path cuda-ipc` and `--path nccl` run the same checks with the caches in device
//! memory (device `LOCAL_RANK % device count`) and the tensors on a device data path; the
//! oracle compares host copies of the rows. NCCL refuses two ranks on one GPU: with fewer than
//! two GPUs, `--path nccl` first joins a bare NCCL pair on both ranks and requires exactly that
//! refusal (`ncclInvalidUsage` from `ncclCommInitRank` on both), then checks that the connector
//! over it fails cleanly on both sides within the deadline (no hang), and exits 77 (skipped)
//! printing NCCL's reason. Any other outcome of the pair is a failure, except NCCL accepting
//! (`NCCL_HOSTID` set apart, say), when the checks run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dist_core::{DType, HostGroup, HostGroupExt};
use dist_kv::transfer::p2p::{
    wait_finished, DataPath, EngineConfig, P2pConfig, P2pConnectorMetadata, P2pRole, P2pScheduler,
    P2pWorker, Secret, SendType, TcpDataPath,
};
use dist_kv::transfer::{
    slot_mapping, BlockId, KvCacheLayer, KvCacheSpec, KvCaches, KvConnectorScheduler,
    KvConnectorWorker, KvLayout, PagedKvCache, Request, SchedulerOutput,
};
use dist_store::StatelessProcessGroup;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BS: usize = 16;
const LAYERS: usize = 8;
const BLOCKS: usize = 64;
const SEED: u64 = 0x5eed;

fn spec(layout: KvLayout) -> KvCacheSpec {
    KvCacheSpec {
        kv: 2,
        num_blocks: BLOCKS,
        block_size: BS,
        num_kv_heads: 8,
        head_dim: 128,
        dtype: DType::BF16,
        layout,
    }
}

fn layer(i: usize) -> String {
    format!("model.layers.{i}.self_attn.attn")
}

/// Rank 0 produces, the others consume.
fn role_of(rank: usize) -> P2pRole {
    match rank {
        0 => P2pRole::Producer,
        _ => P2pRole::Consumer,
    }
}

/// The consumer's caches: zeros, in `layout`.
fn consumer_caches(layout: KvLayout) -> Res<KvCaches> {
    (0..LAYERS)
        .map(|i| Ok((layer(i), PagedKvCache::zeros(spec(layout))?)))
        .collect()
}

fn producer_caches() -> Res<KvCaches> {
    (0..LAYERS)
        .map(|i| {
            Ok((
                layer(i),
                PagedKvCache::random(spec(KvLayout::Nhd), SEED + i as u64)?,
            ))
        })
        .collect()
}

/// Prompt lengths and the two block assignments (disjoint permutations of the cache's blocks).
fn plan(n_req: usize) -> Vec<(usize, Vec<BlockId>, Vec<BlockId>)> {
    let lens = [200usize, 65, 17, 128, 33, 5];
    let mut next_p = 0u32;
    let mut next_c = 0u32;
    (0..n_req)
        .map(|i| {
            let len = lens[i % lens.len()];
            let nb = len.div_ceil(BS) as u32;
            let p = (0..nb).map(|k| (next_p + k) * 7 % BLOCKS as u32).collect();
            let c = (0..nb)
                .map(|k| (BLOCKS as u32 - 1) - (next_c + k) * 3 % BLOCKS as u32)
                .collect();
            next_p += nb;
            next_c += nb;
            (len, p, c)
        })
        .collect()
}

fn cfg(role: P2pRole, send_type: SendType, recv_cap: usize) -> P2pConfig {
    P2pConfig {
        role,
        rank: 0,
        block_size: BS,
        engine: EngineConfig {
            host: std::env::var("KV_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
            port: 0,
            send_type,
            send_buffer_bytes: 8 << 20,
            recv_buffer_bytes: recv_cap,
            timeout: Duration::from_secs(10),
            done_timeout: Duration::from_secs(20),
            // KV_P2P_AUTH=1: the ranks' shared secret (else the job's, from the environment).
            secret: SECRET.get().cloned().flatten(),
            ..Default::default()
        },
    }
}

/// With `KV_P2P_AUTH=1`, a random secret rank 0 makes and shares through the job's store (in a
/// deployment the secret comes from a file both instances read; see `Secret::from_env`).
static SECRET: OnceLock<Option<Secret>> = OnceLock::new();

fn share_secret(g: &StatelessProcessGroup) -> Res<()> {
    if std::env::var("KV_P2P_AUTH").as_deref() != Ok("1") {
        return Ok(());
    }
    let mine: Option<Vec<u8>> = (g.rank() == 0).then(|| rand::random::<[u8; 32]>().to_vec());
    let bytes: Vec<u8> = g.broadcast_obj(mine.as_ref(), 0)?;
    SECRET
        .set(Some(Secret::new(bytes)?))
        .map_err(|_| "the secret was set twice")?;
    Ok(())
}

fn ids(tag: &str, n: usize, pa: &str, ca: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag}-{i}___prefill_addr_{pa}___decode_addr_{ca}_{i:04x}"))
        .collect()
}

/// Where the caches live and how tensors move: host caches on TCP, or device caches on a device
/// data path.
struct Flavor<C, D> {
    /// Device copy (or not) of a host cache.
    wrap: fn(PagedKvCache) -> Res<C>,
    /// The data path.
    path: fn() -> Res<D>,
    /// A check once a worker has shut down (the IPC path: no mapping of the peer's memory left).
    after_shutdown: fn() -> Res<()>,
}

fn host_flavor() -> Flavor<PagedKvCache, TcpDataPath> {
    Flavor {
        wrap: Ok,
        path: || Ok(TcpDataPath),
        after_shutdown: || Ok(()),
    }
}

fn wrap_all<C>(f: fn(PagedKvCache) -> Res<C>, caches: KvCaches) -> Res<BTreeMap<String, C>> {
    caches.into_iter().map(|(n, c)| Ok((n, f(c)?))).collect()
}

/// Every slot of `blocks`, in order.
fn slots(blocks: &[BlockId]) -> Vec<u64> {
    slot_mapping(blocks, BS, blocks.len() * BS).expect("whole blocks fit")
}

fn produce<W: KvConnectorWorker<Metadata = P2pConnectorMetadata>>(
    w: &mut W,
    caches: &BTreeMap<String, W::Cache>,
    reqs: &[(Request, Vec<BlockId>)],
) -> Res<()> {
    let mut sched = P2pScheduler::new(P2pRole::Producer, BS)?;
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        out.add_new_prompt(r, b);
    }
    w.bind_connector_metadata(sched.build_connector_meta(&out));
    for (name, c) in caches {
        w.save_kv_layer(name, c)?;
    }
    let r = w.wait_for_save();
    w.clear_connector_metadata();
    Ok(r?)
}

fn consume<W: KvConnectorWorker<Metadata = P2pConnectorMetadata>>(
    w: &mut W,
    caches: &mut BTreeMap<String, W::Cache>,
    reqs: &[(Request, Vec<BlockId>)],
) -> Res<()> {
    let mut sched = P2pScheduler::new(P2pRole::Consumer, BS)?;
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        let (n, _) = sched.get_num_new_matched_tokens(r, 0)?;
        sched.update_state_after_alloc(r, b, n.unwrap_or(0));
        out.add_new_request(r, b);
    }
    w.bind_connector_metadata(sched.build_connector_meta(&out));
    w.start_load_kv(caches)?;
    w.clear_connector_metadata();
    Ok(())
}

fn run_mode<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>>(
    g: &StatelessProcessGroup,
    f: &Flavor<C, D>,
    mode: SendType,
    tag: &str,
) -> Res<()> {
    let rank = g.rank();
    let role = role_of(rank);
    let mut w = P2pWorker::<C, D>::with_data_path(cfg(role, mode, 4 << 20), (f.path)()?)?;
    let addrs: Vec<String> = g.all_gather_obj(&w.engine().listen_addr().to_string())?;
    let plan = plan(5);
    let ids = ids(tag, plan.len(), &addrs[0], &addrs[1]);
    let prompt = |len: usize, i: usize| (0..len as i64).map(|t| t * 31 + i as i64).collect();
    let pc = producer_caches()?;
    let start = Instant::now();
    if rank == 0 {
        let dc = wrap_all(f.wrap, pc)?;
        w.register_kv_caches(&dc)?;
        let reqs: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(i, (len, p, _))| (Request::new(&ids[i], prompt(*len, i)), p.clone()))
            .collect();
        produce(&mut w, &dc, &reqs)?;
        let want: BTreeSet<String> = ids.iter().cloned().collect();
        let fin = wait_finished(&mut w, &want, Duration::from_secs(30));
        if fin.finished_sending != want || !fin.failed.is_empty() {
            return Err(format!("{mode:?}: producer finished {fin:?}").into());
        }
        if w.engine().send_buffer_bytes() != 0 || w.engine().pending_requests() != 0 {
            return Err(format!("{mode:?}: producer still holds buffers").into());
        }
    } else {
        let mut cc = wrap_all(f.wrap, consumer_caches(KvLayout::Hnd)?)?;
        w.register_kv_caches(&cc)?;
        let reqs: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(i, (len, _, c))| (Request::new(&ids[i], prompt(*len, i)), c.clone()))
            .collect();
        consume(&mut w, &mut cc, &reqs)?;
        let fin = w.get_finished(&BTreeSet::new());
        if !fin.failed.is_empty() || fin.finished_recving.len() != ids.len() {
            return Err(format!("{mode:?}: consumer finished {fin:?}").into());
        }
        let elapsed = start.elapsed();
        let mut bytes = 0usize;
        for (i, (len, p, c)) in plan.iter().enumerate() {
            let n = (len - 1).div_ceil(BS);
            for name in cc.keys() {
                let want = pc[name].gather_slots(&slots(&p[..n]))?;
                let got = cc[name].gather_slots(&slots(&c[..n]))?;
                if want != got {
                    return Err(format!("{mode:?}: request {i} layer {name}: blocks differ").into());
                }
                bytes += want.nbytes();
            }
        }
        println!(
            "mp_kv_p2p {mode:?}: {} requests x {LAYERS} layers, {:.1} MiB in {:.1} ms ({:.0} MiB/s), every block equal",
            ids.len(),
            bytes as f64 / (1 << 20) as f64,
            elapsed.as_secs_f64() * 1e3,
            bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
        );
    }
    g.barrier()?;
    w.shutdown()?;
    (f.after_shutdown)()?;
    Ok(())
}

/// The consumer takes one layer of a request and exits without a word (as a crash would).
fn dead_consumer<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>>(
    g: &StatelessProcessGroup,
    f: &Flavor<C, D>,
) -> Res<()> {
    let rank = g.rank();
    let role = role_of(rank);
    // One layer of the request is 128 KiB: the consumer's buffer holds one.
    let mut w =
        P2pWorker::<C, D>::with_data_path(cfg(role, SendType::PutAsync, 128 << 10), (f.path)()?)?;
    let addrs: Vec<String> = g.all_gather_obj(&w.engine().listen_addr().to_string())?;
    let id = ids("dead", 1, &addrs[0], &addrs[1]).remove(0);
    g.barrier()?;
    if rank == 1 {
        let l0 = format!("{id}#{}", layer(0));
        w.engine()
            .recv_tensor(&l0, None, Instant::now() + Duration::from_secs(10))?;
        println!("mp_kv_p2p: consumer took layer 0 of {id} and dies");
        std::process::exit(0);
    }
    let pc = wrap_all(f.wrap, producer_caches()?)?;
    w.register_kv_caches(&pc)?;
    let start = Instant::now();
    let reqs = vec![(Request::new(&id, (0..32).collect()), vec![1, 2])];
    let _ = produce(&mut w, &pc, &reqs);
    let fin = wait_finished(&mut w, &[id.clone()].into(), Duration::from_secs(30));
    let waited = start.elapsed();
    let msg = fin
        .failed
        .get(&id)
        .ok_or_else(|| format!("dead consumer: request not failed: {fin:?}"))?;
    if !msg.contains(&id) || !msg.contains(&addrs[1]) {
        return Err(
            format!("dead consumer: error does not name the request and peer: {msg}").into(),
        );
    }
    if w.engine().send_buffer_bytes() != 0 || w.engine().pending_requests() != 0 {
        return Err("dead consumer: producer still holds buffers".into());
    }
    println!("mp_kv_p2p: dead consumer -> request failed after {waited:?}, buffers freed: {msg}");
    w.shutdown()?;
    Ok(())
}

/// `--bench MIB`: each mode moves about MIB MiB through the connector (requests of
/// `KV_BENCH_BLOCKS` blocks, default 16 = 1 MiB per layer, at most 64), timed on the consumer
/// from its start to the last injected layer, beside a plain TCP stream of the same bytes
/// between the same two processes (the ceiling).
fn bench<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>>(
    g: &StatelessProcessGroup,
    f: &Flavor<C, D>,
    mib: usize,
) -> Res<()> {
    let rank = g.rank();
    let per_req: usize = std::env::var("KV_BENCH_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
        .clamp(1, BLOCKS);
    let tensor_mib = per_req as f64 / 16.0;
    let nreq = ((mib as f64 / tensor_mib).ceil() as usize)
        .div_ceil(LAYERS)
        .max(1);
    let tokens = per_req * BS;
    for (mode, tag) in [
        (SendType::Put, "put"),
        (SendType::PutAsync, "putasync"),
        (SendType::Get, "get"),
    ] {
        let role = role_of(rank);
        let mut c = cfg(role, mode, 64 << 20);
        c.engine.send_buffer_bytes = 64 << 20;
        let mut w = P2pWorker::<C, D>::with_data_path(c, (f.path)()?)?;
        let addrs: Vec<String> = g.all_gather_obj(&w.engine().listen_addr().to_string())?;
        let ids = ids(&format!("bench-{tag}"), nreq, &addrs[0], &addrs[1]);
        let blocks = |i: usize| -> Vec<BlockId> {
            (0..per_req)
                .map(|k| ((i * per_req + k) % BLOCKS) as BlockId)
                .collect()
        };
        let reqs: Vec<_> = (0..nreq)
            .map(|i| {
                (
                    Request::new(&ids[i], (0..tokens as i64).collect()),
                    blocks(i),
                )
            })
            .collect();
        let pc = wrap_all(f.wrap, producer_caches()?)?;
        g.barrier()?;
        let start = Instant::now();
        if rank == 0 {
            w.register_kv_caches(&pc)?;
            produce(&mut w, &pc, &reqs)?;
            let want: BTreeSet<String> = ids.iter().cloned().collect();
            let fin = wait_finished(&mut w, &want, Duration::from_secs(60));
            if fin.finished_sending != want {
                return Err(format!("bench {mode:?}: {fin:?}").into());
            }
        } else {
            let mut cc = wrap_all(f.wrap, consumer_caches(KvLayout::Nhd)?)?;
            w.register_kv_caches(&cc)?;
            consume(&mut w, &mut cc, &reqs)?;
            let t = start.elapsed().as_secs_f64();
            let fin = w.get_finished(&BTreeSet::new());
            if fin.finished_recving.len() != nreq {
                return Err(format!("bench {mode:?}: {fin:?}").into());
            }
            let bytes = (nreq * LAYERS * per_req * 2 * BS * 8 * 128 * 2) as f64;
            println!(
                "bench {mode:?}: {:.0} MiB in {:.1} ms = {:.0} MiB/s ({} tensors of {tensor_mib} MiB, {:.0} us each)",
                bytes / (1 << 20) as f64,
                t * 1e3,
                bytes / (1 << 20) as f64 / t,
                nreq * LAYERS,
                t * 1e6 / (nreq * LAYERS) as f64
            );
        }
        g.barrier()?;
        w.shutdown()?;
    }
    // The ceiling: the same bytes as 1 MiB writes on one plain TCP stream.
    use std::io::{Read, Write};
    let total = ((nreq * LAYERS) as f64 * tensor_mib).ceil() as usize;
    let buf = vec![7u8; 1 << 20];
    if rank == 1 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        g.send_obj(&l.local_addr()?.to_string(), 0)?;
        let (mut s, _) = l.accept()?;
        let mut b = vec![0u8; 1 << 20];
        let start = Instant::now();
        for _ in 0..total {
            s.read_exact(&mut b)?;
        }
        let t = start.elapsed().as_secs_f64();
        println!(
            "bench plain TCP stream: {total} MiB in {:.1} ms = {:.0} MiB/s",
            t * 1e3,
            total as f64 / t
        );
    } else {
        let a: String = g.recv_obj(1)?;
        let mut s = std::net::TcpStream::connect(a)?;
        for _ in 0..total {
            s.write_all(&buf)?;
        }
    }
    g.barrier()?;
    Ok(())
}

/// The checks (or the bench) with one flavor.
fn run_all<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>>(
    g: &StatelessProcessGroup,
    f: &Flavor<C, D>,
    bench_mib: Option<usize>,
) -> Res<()> {
    if let Some(mib) = bench_mib {
        return bench(g, f, mib);
    }
    run_mode(g, f, SendType::Put, "put")?;
    run_mode(g, f, SendType::PutAsync, "putasync")?;
    run_mode(g, f, SendType::Get, "get")?;
    dead_consumer(g, f)
}

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use dist_kv::transfer::cuda::{CudaIpcDataPath, CudaKvCache, NcclDataPath};

    /// This rank's GPU: `LOCAL_RANK` (as the launcher sets it) modulo the visible devices.
    fn ordinal() -> Res<usize> {
        let local = dist_store::RankEnv::from_env()?.local_rank;
        Ok(local % dist_cuda::device_count().max(1))
    }

    fn wrap(c: PagedKvCache) -> Res<CudaKvCache> {
        Ok(CudaKvCache::from_host(&c, ordinal()?)?)
    }

    pub fn ipc() -> Flavor<CudaKvCache, CudaIpcDataPath> {
        Flavor {
            wrap,
            path: || Ok(CudaIpcDataPath::new(ordinal()?)?),
            after_shutdown: || {
                let dev = dist_cuda::DeviceContext::get(ordinal()?)?;
                let open = dist_cuda::ipc::IpcImporter::for_device(&dev).open_mappings();
                if open != 0 {
                    return Err(format!("{open} IPC mappings still open after shutdown").into());
                }
                Ok(())
            },
        }
    }

    pub fn nccl() -> Flavor<CudaKvCache, NcclDataPath> {
        Flavor {
            wrap,
            path: || Ok(NcclDataPath::new(ordinal()?, Duration::from_secs(20))?),
            after_shutdown: || Ok(()),
        }
    }

    /// `ncclInvalidUsage`: what `ncclCommInitRank` returns on every rank when two ranks of a
    /// communicator share a GPU ("Duplicate GPU detected").
    const NCCL_INVALID_USAGE: i64 = 5;

    /// `--path nccl` with fewer than two GPUs: both ranks on one GPU. `Ok(Some(reason))` when
    /// NCCL refused them as expected and the connector failed cleanly in time; `Ok(None)` when
    /// NCCL accepted (run the checks); an error for anything else.
    pub fn nccl_one_gpu(g: &StatelessProcessGroup) -> Res<Option<String>> {
        use dist_cuda::pair::NcclPair;
        let rank = g.rank();
        let dev = dist_cuda::DeviceContext::get(ordinal()?)?;
        NcclPair::load_library()?;
        // 1. A bare pair: the refusal must be NCCL's invalid usage from ncclCommInitRank.
        let id: Vec<u8> = if rank == 0 {
            let id = NcclPair::unique_id()?;
            g.send_obj(&id, 1)?;
            id
        } else {
            g.recv_obj(0)?
        };
        let refusal = match NcclPair::connect(&dev, &id, rank, Duration::from_secs(20)) {
            Ok(_pair) => None,
            Err(dist_core::Error::Backend {
                backend: "nccl",
                code: Some(NCCL_INVALID_USAGE),
                message,
            }) if message.contains("ncclCommInitRank") => Some(message),
            Err(e) => {
                return Err(format!(
                    "nccl on one GPU, rank {rank}: expected NCCL's invalid-usage refusal from \
                     ncclCommInitRank (two ranks on one GPU), got: {e}"
                )
                .into())
            }
        };
        let all: Vec<bool> = g.all_gather_obj(&refusal.is_some())?;
        if all.iter().any(|&r| r != refusal.is_some()) {
            return Err(format!("nccl on one GPU: the ranks disagree (refused: {all:?})").into());
        }
        let Some(reason) = refusal else {
            return Ok(None);
        };
        // 2. The connector over the refused path: a clean error on both sides, in time. The
        // producer's names NCCL's refusal; the consumer's loads fail (timed out or lost).
        let start = Instant::now();
        let e = match run_mode(g, &nccl(), SendType::Put, "nccl1gpu") {
            Ok(()) => {
                return Err(
                    "nccl on one GPU: the connector worked where the pair was refused".into(),
                )
            }
            Err(e) => e.to_string(),
        };
        let waited = start.elapsed();
        println!(
            "mp_kv_p2p: nccl on one GPU, rank {rank}: the connector failed after {waited:.1?}: {e}"
        );
        if waited > Duration::from_secs(40) {
            return Err(format!("the refusal took {waited:?}").into());
        }
        let expected = if rank == 0 {
            e.contains("ncclCommInitRank")
        } else {
            e.contains("timed out") || e.contains("lost")
        };
        if !expected {
            return Err(format!("nccl on one GPU, rank {rank}: unexpected failure: {e}").into());
        }
        Ok(Some(reason))
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("2");
        // Once more with the engines authenticating each other.
        println!("KV_P2P_AUTH=1");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let bench_mib: Option<usize> = args
        .iter()
        .position(|a| a == "--bench")
        .map(|i| args.get(i + 1).and_then(|m| m.parse().ok()).unwrap_or(256));
    let path = args
        .iter()
        .position(|a| a == "--path")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "tcp".into());
    let r = (|| -> Res<()> {
        let g = StatelessProcessGroup::from_env(Duration::from_secs(60))?;
        if g.world_size() != 2 {
            return Err(format!("mp_kv_p2p runs with 2 ranks, got {}", g.world_size()).into());
        }
        share_secret(&g)?;
        match path.as_str() {
            "tcp" => run_all(&g, &host_flavor(), bench_mib),
            #[cfg(feature = "cuda")]
            "cuda-ipc" => run_all(&g, &device::ipc(), bench_mib),
            #[cfg(feature = "cuda")]
            "nccl" if dist_cuda::device_count() < 2 && bench_mib.is_none() => {
                if let Some(reason) = device::nccl_one_gpu(&g)? {
                    println!(
                        "mp_kv_p2p: SKIPPED: the nccl path needs two GPUs; NCCL refused two \
                         ranks on one GPU: {reason}"
                    );
                    std::process::exit(77);
                }
                run_all(&g, &device::nccl(), None)
            }
            #[cfg(feature = "cuda")]
            "nccl" => run_all(&g, &device::nccl(), bench_mib),
            other => Err(format!(
                "--path {other}: expected tcp{}",
                if cfg!(feature = "cuda") {
                    ", cuda-ipc or nccl"
                } else {
                    " (cuda-ipc and nccl need the cuda feature)"
                }
            )
            .into()),
        }
    })();
    if let Err(e) = r {
        eprintln!("mp_kv_p2p: FAILED: {e}");
        std::process::exit(1);
    }
    println!("mp_kv_p2p ({path}): all checks passed");
}
