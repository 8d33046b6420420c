//! The P2P connector with producer and consumer as threads of one process (each with its own
//! engine and sockets): every mode moves every block correctly between caches of different
//! layouts and block assignments; small buffers still finish (back-pressure); a consumer that
//! dies, gives up or never loads fails the producer's request with an error naming it and frees
//! its buffers, within the deadlines; hostile bytes on the socket do not hurt the engine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use dist_core::DType;
use dist_kv::transfer::p2p::wire::{write_frame, Frame, TensorHeader, PROTOCOL_VERSION};
use dist_kv::transfer::p2p::{
    wait_finished, DataPath, EngineConfig, P2pConfig, P2pConnectorMetadata, P2pRole, P2pScheduler,
    P2pWorker, SendType, TcpDataPath,
};
use dist_kv::transfer::{
    decode_metadata, encode_metadata, slot_mapping, BlockId, KvCacheLayer, KvCacheSpec, KvCaches,
    KvConnectorScheduler, KvConnectorWorker, KvLayout, PagedKvCache, Request, SchedulerOutput,
};

#[path = "kv_transfer_p2p/lending.rs"]
mod lending;

const BS: usize = 4;
const LAYERS: usize = 3;

fn spec(layout: KvLayout, num_blocks: usize) -> KvCacheSpec {
    KvCacheSpec {
        kv: 2,
        num_blocks,
        block_size: BS,
        num_kv_heads: 2,
        head_dim: 16,
        dtype: DType::F16,
        layout,
    }
}

fn caches(layout: KvLayout, num_blocks: usize, seed: Option<u64>) -> KvCaches {
    (0..LAYERS)
        .map(|i| {
            let s = spec(layout, num_blocks);
            let c = match seed {
                Some(seed) => PagedKvCache::random(s, seed + i as u64),
                None => PagedKvCache::zeros(s),
            };
            (format!("model.layers.{i}.self_attn.attn"), c.unwrap())
        })
        .collect()
}

fn cfg(role: P2pRole, send_type: SendType, send_cap: usize, recv_cap: usize) -> P2pConfig {
    P2pConfig {
        role,
        rank: 0,
        block_size: BS,
        engine: EngineConfig {
            host: "127.0.0.1".into(),
            port: 0,
            send_type,
            send_buffer_bytes: send_cap,
            recv_buffer_bytes: recv_cap,
            timeout: Duration::from_secs(5),
            done_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    }
}

/// vLLM's proxy names requests `___prefill_addr_{p}___decode_addr_{d}_{uuid}`.
fn request_id(i: usize, prefill: &str, decode: &str) -> String {
    format!(
        "cmpl-{i}___prefill_addr_{prefill}___decode_addr_{decode}_{:08x}",
        rand::random::<u32>()
    )
}

struct Plan {
    prompts: Vec<Vec<i64>>,
    prod_blocks: Vec<Vec<BlockId>>,
    cons_blocks: Vec<Vec<BlockId>>,
}

fn plan() -> Plan {
    Plan {
        // 14, 9 and 4 tokens: 4, 3 and 1 blocks sent; 4, 2 and 1 blocks loaded (len - 1 tokens).
        prompts: [14usize, 9, 4]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n as i64).map(|t| t + 100 * i as i64).collect())
            .collect(),
        prod_blocks: vec![vec![3, 0, 7, 9], vec![1, 15, 2], vec![4]],
        cons_blocks: vec![vec![11, 2, 5, 0], vec![9, 10], vec![3]],
    }
}

fn producer_step<W: KvConnectorWorker<Metadata = P2pConnectorMetadata>>(
    worker: &mut W,
    caches: &BTreeMap<String, W::Cache>,
    reqs: &[(Request, Vec<BlockId>)],
) -> BTreeSet<String> {
    let mut sched = P2pScheduler::new(P2pRole::Producer, BS).unwrap();
    let out = common::new_prompts(&mut sched, reqs);
    let meta: P2pConnectorMetadata =
        decode_metadata(&encode_metadata(&sched.build_connector_meta(&out)).unwrap()).unwrap();
    assert!(meta.requests.iter().all(|m| m.is_store));
    worker.bind_connector_metadata(meta);
    for (name, c) in caches {
        worker.save_kv_layer(name, c).unwrap();
    }
    let _ = worker.wait_for_save();
    worker.clear_connector_metadata();
    reqs.iter().map(|(r, _)| r.request_id.clone()).collect()
}

fn consumer_step<W: KvConnectorWorker<Metadata = P2pConnectorMetadata>>(
    worker: &mut W,
    caches: &mut BTreeMap<String, W::Cache>,
    reqs: &[(Request, Vec<BlockId>)],
) {
    let mut sched = P2pScheduler::new(P2pRole::Consumer, BS).unwrap();
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        let (n, is_async) = sched.get_num_new_matched_tokens(r, 0).unwrap();
        assert_eq!((n, is_async), (Some(r.prompt_token_ids.len() - 1), false));
        sched.update_state_after_alloc(r, b, n.unwrap());
        out.add_new_request(r, b);
    }
    let meta = sched.build_connector_meta(&out);
    worker.bind_connector_metadata(decode_metadata(&encode_metadata(&meta).unwrap()).unwrap());
    worker.start_load_kv(caches).unwrap();
    worker.clear_connector_metadata();
}

/// Runs a full transfer and checks every loaded block against the producer's.
fn transfer(send_type: SendType, send_cap: usize, recv_cap: usize) {
    transfer_on::<PagedKvCache, TcpDataPath>(send_type, send_cap, recv_cap, |c| c, || TcpDataPath);
}

/// [`transfer`] with caches `C` (made from host caches by `wrap`) over data path `D`.
fn transfer_on<C, D>(
    send_type: SendType,
    send_cap: usize,
    recv_cap: usize,
    wrap: impl Fn(PagedKvCache) -> C,
    path: impl Fn() -> D,
) where
    C: KvCacheLayer,
    D: DataPath<Buffer = C::Buffer>,
{
    let p = plan();
    let mut prod = P2pWorker::<C, D>::with_data_path(
        cfg(P2pRole::Producer, send_type, send_cap, recv_cap),
        path(),
    )
    .unwrap();
    let mut cons = P2pWorker::<C, D>::with_data_path(
        cfg(P2pRole::Consumer, send_type, send_cap, recv_cap),
        path(),
    )
    .unwrap();
    let (pa, ca) = (
        prod.engine().listen_addr().to_string(),
        cons.engine().listen_addr().to_string(),
    );
    let ids: Vec<String> = (0..3).map(|i| request_id(i, &pa, &ca)).collect();
    let prod_reqs: Vec<_> = (0..3)
        .map(|i| {
            (
                Request::new(&ids[i], p.prompts[i].clone()),
                p.prod_blocks[i].clone(),
            )
        })
        .collect();
    let cons_reqs: Vec<_> = (0..3)
        .map(|i| {
            (
                Request::new(&ids[i], p.prompts[i].clone()),
                p.cons_blocks[i].clone(),
            )
        })
        .collect();
    let wrap_all =
        |c: KvCaches| -> BTreeMap<String, C> { c.into_iter().map(|(n, c)| (n, wrap(c))).collect() };
    let pc = wrap_all(caches(KvLayout::Nhd, 16, Some(1234)));
    let mut cc = wrap_all(caches(KvLayout::Hnd, 12, None));
    prod.register_kv_caches(&pc).unwrap();
    cons.register_kv_caches(&cc).unwrap();
    let start = Instant::now();
    let (sent, got) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let ids = producer_step(&mut prod, &pc, &prod_reqs);
            wait_finished(&mut prod, &ids, Duration::from_secs(10))
        });
        consumer_step(&mut cons, &mut cc, &cons_reqs);
        let got = wait_finished(
            &mut cons,
            &ids.iter().cloned().collect(),
            Duration::from_secs(10),
        );
        (h.join().unwrap(), got)
    });
    assert!(
        sent.failed.is_empty() && got.failed.is_empty(),
        "{sent:?} {got:?}"
    );
    assert_eq!(sent.finished_sending.len(), 3, "{send_type:?}: {sent:?}");
    assert_eq!(got.finished_recving.len(), 3, "{send_type:?}: {got:?}");
    for i in 0..3 {
        let n = (p.prompts[i].len() - 1).div_ceil(BS);
        for (name, c) in &cc {
            let want = pc[name]
                .gather_slots(&slots(&p.prod_blocks[i][..n]))
                .unwrap();
            let have = c.gather_slots(&slots(&p.cons_blocks[i][..n])).unwrap();
            assert!(
                want == have,
                "{send_type:?} request {i} layer {name}: blocks differ"
            );
        }
    }
    // Nothing is held any more on either side.
    assert_eq!(prod.engine().send_buffer_bytes(), 0);
    assert_eq!(prod.engine().pending_requests(), 0);
    assert_eq!(cons.engine().recv_buffer_bytes(), 0);
    eprintln!(
        "{send_type:?} send cap {send_cap} recv cap {recv_cap}: {:?}",
        start.elapsed()
    );
}

/// Every slot of `blocks`, in order.
fn slots(blocks: &[BlockId]) -> Vec<u64> {
    slot_mapping(blocks, BS, blocks.len() * BS).expect("whole blocks fit")
}

#[test]
fn put_moves_every_block() {
    transfer(SendType::Put, 1 << 20, 1 << 20);
}

#[test]
fn put_async_moves_every_block() {
    transfer(SendType::PutAsync, 1 << 20, 1 << 20);
}

#[test]
fn get_moves_every_block() {
    transfer(SendType::Get, 1 << 20, 1 << 20);
}

/// One layer of request 0 is 2*4*4*2*16*2 = 2 KiB: buffers that hold one tensor still finish.
#[test]
fn small_buffers_apply_back_pressure_and_finish() {
    transfer(SendType::PutAsync, 2048, 2048);
    transfer(SendType::Put, 2048, 2048);
    transfer(SendType::Get, 2048, 1 << 20);
}

/// A producer request of the tensors of a plan, to `ca`, saved through a worker; returns the id.
fn one_request(prod: &mut P2pWorker, ca: &str, pc: &KvCaches) -> String {
    let pa = prod.engine().listen_addr().to_string();
    let id = request_id(0, &pa, ca);
    let reqs = vec![(Request::new(&id, (0..14).collect()), vec![3, 0, 7, 9])];
    producer_step(prod, pc, &reqs);
    id
}

#[test]
fn consumer_dying_mid_transfer_fails_the_request_and_frees_buffers() {
    // The consumer's buffer holds one layer: the producer's second PUT waits for room.
    let mut prod =
        P2pWorker::new(cfg(P2pRole::Producer, SendType::PutAsync, 1 << 20, 1 << 20)).unwrap();
    let mut cons =
        P2pWorker::new(cfg(P2pRole::Consumer, SendType::PutAsync, 1 << 20, 4096)).unwrap();
    let ca = cons.engine().listen_addr().to_string();
    let pc = caches(KvLayout::Nhd, 16, Some(5));
    prod.register_kv_caches(&pc).unwrap();
    let id = request_id(0, prod.engine().listen_addr(), &ca);
    let reqs = vec![(Request::new(&id, (0..14).collect()), vec![3, 0, 7, 9])];
    let start = Instant::now();
    std::thread::scope(|s| {
        let h = s.spawn(|| producer_step(&mut prod, &pc, &reqs));
        // Take the first layer (4 KiB, the whole buffer), wait for the second, then die while
        // the third waits for room.
        let deadline = Instant::now() + Duration::from_secs(5);
        let l0 = format!("{id}#model.layers.0.self_attn.attn");
        cons.engine().recv_tensor(&l0, None, deadline).unwrap();
        while cons.engine().recv_buffer_bytes() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        cons.shutdown().unwrap();
        h.join().unwrap();
    });
    let fin = wait_finished(&mut prod, &[id.clone()].into(), Duration::from_secs(10));
    let waited = start.elapsed();
    let msg = fin
        .failed
        .get(&id)
        .unwrap_or_else(|| panic!("not failed: {fin:?}"));
    assert!(msg.contains(&id) && msg.contains(&ca), "{msg}");
    assert!(fin.finished_sending.is_empty());
    assert_eq!(prod.engine().send_buffer_bytes(), 0);
    assert_eq!(prod.engine().pending_requests(), 0);
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    eprintln!("dead consumer detected in {waited:?}: {msg}");
}

#[test]
fn consumer_that_never_loads_times_out_on_the_producer() {
    let mut c = cfg(P2pRole::Producer, SendType::Get, 1 << 20, 1 << 20);
    c.engine.done_timeout = Duration::from_millis(300);
    let mut prod = P2pWorker::new(c).unwrap();
    let cons = P2pWorker::new(cfg(P2pRole::Consumer, SendType::Get, 1 << 20, 1 << 20)).unwrap();
    let pc = caches(KvLayout::Nhd, 16, Some(5));
    prod.register_kv_caches(&pc).unwrap();
    let id = one_request(&mut prod, cons.engine().listen_addr(), &pc);
    assert!(
        prod.engine().send_buffer_bytes() > 0,
        "GET keeps the layers"
    );
    let fin = wait_finished(&mut prod, &[id.clone()].into(), Duration::from_secs(5));
    let msg = &fin.failed[&id];
    assert!(
        msg.contains(&id) && msg.contains("consumer to load"),
        "{msg}"
    );
    assert_eq!(prod.engine().send_buffer_bytes(), 0);
}

#[test]
fn consumer_without_data_fails_its_request_in_time_and_tells_the_producer() {
    // The producer never saves: the consumer's load times out, fails only that request, writes
    // nothing, and its Abort makes the producer drop the request it tracks.
    let mut c = cfg(P2pRole::Consumer, SendType::PutAsync, 1 << 20, 1 << 20);
    c.engine.timeout = Duration::from_millis(400);
    let mut cons = P2pWorker::new(c).unwrap();
    let prod =
        P2pWorker::new(cfg(P2pRole::Producer, SendType::PutAsync, 1 << 20, 1 << 20)).unwrap();
    let id = request_id(0, prod.engine().listen_addr(), cons.engine().listen_addr());
    let mut cc = caches(KvLayout::Hnd, 12, Some(9));
    let before = cc.clone();
    cons.register_kv_caches(&cc).unwrap();
    let start = Instant::now();
    consumer_step(
        &mut cons,
        &mut cc,
        &[(Request::new(&id, (0..14).collect()), vec![11, 2, 5, 0])],
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    let fin = cons.get_finished(&BTreeSet::new());
    assert!(fin.failed[&id].contains("timed out"), "{fin:?}");
    assert_eq!(
        cons.get_block_ids_with_load_errors(),
        [0u32, 2, 5, 11].into_iter().collect()
    );
    assert!(cc == before, "nothing written");
}

#[test]
fn hostile_bytes_do_not_hurt_the_engine() {
    let cons = P2pWorker::new(cfg(P2pRole::Consumer, SendType::Put, 1 << 20, 1 << 20)).unwrap();
    let addr = cons.engine().listen_addr().to_string();
    // A huge length prefix, garbage, a hello of another version, an oversized PUT.
    let mut a = std::net::TcpStream::connect(&addr).unwrap();
    a.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).unwrap();
    let mut b = std::net::TcpStream::connect(&addr).unwrap();
    b.write_all(&[8, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write_frame(
        &mut c,
        &Frame::Hello {
            version: PROTOCOL_VERSION + 1,
            listen_addr: "x:1".into(),
            data_path: "tcp".into(),
            link_init: vec![],
            nonce: vec![0; 32],
            auth: false,
        },
    )
    .unwrap();
    let mut d = std::net::TcpStream::connect(&addr).unwrap();
    write_frame(
        &mut d,
        &Frame::Hello {
            version: PROTOCOL_VERSION,
            listen_addr: "127.0.0.1:1".into(),
            data_path: "tcp".into(),
            link_init: vec![],
            nonce: vec![0; 32],
            auth: false,
        },
    )
    .unwrap();
    write_frame(
        &mut d,
        &Frame::Put {
            seq: 1,
            tensor_id: "r#l".into(),
            header: TensorHeader {
                dtype: DType::F32,
                shape: vec![1 << 40, 1 << 30],
            },
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cons.engine().recv_buffer_bytes(),
        0,
        "nothing reserved for hostile PUTs"
    );
    drop((a, b, c, d));
    // The same engine still serves a real producer.
    let prod = P2pWorker::new(cfg(P2pRole::Producer, SendType::Put, 1 << 20, 1 << 20)).unwrap();
    let t = dist_core::HostTensor::random(DType::F32, &[3, 5], 1);
    prod.engine()
        .send_tensor("ok", "ok#l", t.clone(), &addr)
        .unwrap();
    let (got, _) = cons
        .engine()
        .recv_tensor("ok#l", None, Instant::now() + Duration::from_secs(2))
        .unwrap();
    assert!(got == t);
    // A connection that never says hello does not hold up the shutdown.
    let idle = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    drop(cons);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    drop(idle);
}

#[test]
fn producer_dying_fails_the_consumers_request_at_once() {
    let mut prod = P2pWorker::new(cfg(P2pRole::Producer, SendType::Put, 1 << 20, 1 << 20)).unwrap();
    let mut cons = P2pWorker::new(cfg(P2pRole::Consumer, SendType::Put, 1 << 20, 1 << 20)).unwrap();
    let id = request_id(0, prod.engine().listen_addr(), cons.engine().listen_addr());
    let mut cc = caches(KvLayout::Hnd, 12, Some(9));
    let before = cc.clone();
    cons.register_kv_caches(&cc).unwrap();
    // Layer 0 arrives, then the producer goes away.
    let pc = caches(KvLayout::Nhd, 16, Some(5));
    let l0 = "model.layers.0.self_attn.attn";
    let t = pc[l0].gather_blocks(&[3, 0, 7, 9]).unwrap();
    prod.engine()
        .send_tensor(&id, &format!("{id}#{l0}"), t, cons.engine().listen_addr())
        .unwrap();
    prod.shutdown().unwrap();
    let start = Instant::now();
    consumer_step(
        &mut cons,
        &mut cc,
        &[(Request::new(&id, (0..14).collect()), vec![11, 2, 5, 0])],
    );
    let waited = start.elapsed();
    let fin = cons.get_finished(&BTreeSet::new());
    let msg = &fin.failed[&id];
    assert!(msg.contains(&id) && msg.contains("lost"), "{msg}");
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?} (timeout is 5 s)"
    );
    assert!(cc == before, "nothing written");
    assert_eq!(cons.engine().recv_buffer_bytes(), 0, "layer 0 dropped");
}

#[test]
fn unclaimed_tensors_expire_and_free_the_buffer() {
    let mut c = cfg(P2pRole::Consumer, SendType::Put, 1 << 20, 4096);
    c.engine.done_timeout = Duration::from_millis(200);
    let cons = P2pWorker::new(c).unwrap();
    let prod = P2pWorker::new(cfg(P2pRole::Producer, SendType::Put, 1 << 20, 1 << 20)).unwrap();
    let ca = cons.engine().listen_addr().to_string();
    let zeros = || dist_core::HostTensor::zeros(DType::U8, &[4096]);
    // A tensor nobody will load fills the consumer's buffer...
    prod.engine()
        .send_tensor("ghost", "ghost#l", zeros(), &ca)
        .unwrap();
    assert_eq!(cons.engine().recv_buffer_bytes(), 4096);
    // ...so the next PUT waits for room until the ghost expires, then goes through.
    let start = Instant::now();
    prod.engine()
        .send_tensor("real", "real#l", zeros(), &ca)
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    let (t, from) = cons
        .engine()
        .recv_tensor("real#l", None, Instant::now() + Duration::from_secs(2))
        .unwrap();
    assert_eq!(t.nbytes(), 4096);
    assert_eq!(from, prod.engine().listen_addr());
    assert_eq!(cons.engine().recv_buffer_bytes(), 0);
}

/// A data path whose receiver reads the sender's memory (as CUDA IPC): in every mode, the
/// sender keeps each tensor until the receiver's `Stored` / `GetDone`, then frees it.
#[test]
fn lending_data_path_keeps_tensors_until_the_receiver_copied_them() {
    use std::sync::atomic::Ordering;
    for send_type in [SendType::Put, SendType::PutAsync, SendType::Get] {
        let before = lending::COPIES.load(Ordering::Relaxed);
        transfer_on(send_type, 1 << 20, 1 << 20, lending::wrap, || {
            lending::LendingPath
        });
        // 3 layers of 3 requests, each a copy out of lent memory.
        assert!(lending::COPIES.load(Ordering::Relaxed) - before >= 9);
        transfer_on(send_type, 2048, 2048, lending::wrap, || {
            lending::LendingPath
        });
    }
}
