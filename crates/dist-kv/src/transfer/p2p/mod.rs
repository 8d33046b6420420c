//! The P2P connector (vLLM's `P2pNcclConnector`): a producer (prefill) instance sends each
//! layer's blocks of a request to a consumer (decode) instance.
//!
//! * **Addressing** as vLLM: the request id carries the peer, `___decode_addr_{ip}:{port}` for
//!   the producer and `___prefill_addr_{ip}:{port}___` for the consumer ([`parse_request_id`]);
//!   worker `rank` talks to `ip:(port + rank)` and listens at `kv_port + rank`. A tensor is
//!   named `{request_id}#{layer_name}`.
//! * **Data path**: TCP between the two instances on CPU ([`TcpDataPath`]), behind the
//!   [`DataPath`]/[`DataLink`] traits; with the `cuda` feature, device caches move over NCCL
//!   (`ncclSend`/`ncclRecv` on a 2-rank communicator per peer, unique id in the handshake, as
//!   vLLM) or CUDA IPC (one host), see `transfer::cuda`. The control channel is TCP, and so is
//!   the CPU data path, rather than shared memory, because the peer is only known by the
//!   address in the request id: producer and consumer are separate jobs with no common group
//!   to set up segments, usually on separate nodes; TCP works across nodes, and a dead peer
//!   shows at once as EOF or a reset instead of as a pid to poll.
//! * **Control channel**: typed frames ([`wire::Frame`], postcard, length-capped), no pickle;
//!   with a shared secret ([`Secret`], `EngineConfig::secret` or the job's token file) both ends
//!   prove they hold it at connect time ([`auth`]). Replies go back on the connection that
//!   asked, never to the address a peer claims; connections, handshakes, frames and buffers are
//!   bounded by count, size and time (the engine module's docs, docs/SECURITY.md).
//! * **Bookkeeping without I/O**: requests, bytes, lending, request-to-connection bindings and
//!   deadlines are a state machine (`ledger.rs`), the connections kept another (`admission.rs`),
//!   each unit-tested without sockets; the engine is the socket shell around them.
//! * **Modes** ([`SendType`]): PUT sends in `save_kv_layer`; PUT_ASYNC queues to a sender thread
//!   and `wait_for_save` drains the queue; GET keeps tensors until the consumer asks.
//! * **Bounded buffers with back-pressure**: the producer's queue/store is capped at
//!   `send_buffer_bytes` (a save waits for room, up to the timeout); the consumer answers a PUT
//!   only when the tensor fits its `recv_buffer_bytes`. vLLM's GET store evicts the oldest
//!   tensors instead, which turns into a silent miss on the consumer; here it waits and then
//!   fails the request with an error that names it.
//! * **Finished-request tracking** (a TODO in vLLM, whose `get_finished` returns nothing): after
//!   injecting every layer, the consumer sends `Loaded{request_id}`; the producer then reports the
//!   request in `finished_sending` and frees what it still holds for it. A consumer that dies or
//!   closes (EOF), aborts, or does not report within `done_timeout` fails the request on the
//!   producer with an error naming it, and its buffers are freed. On the consumer, a tensor
//!   that does not arrive by the timeout, or whose request's connection (the one its first
//!   tensor came over) broke, fails the request (no hang), nothing of it is written to the
//!   cache, and the producer is told.
//!   Tensors nobody loads expire after `done_timeout`, so they cannot hold the buffer. On a
//!   data path that lends memory (CUDA IPC) a sent tensor the receiver may still be copying
//!   is freed only by the receiver's acknowledgement or the loss of the connection, never
//!   under a copy, even when its request fails.

mod admission;
pub mod auth;
mod datapath;
mod engine;
mod ledger;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use auth::Secret;
pub use datapath::{DataLink, DataPath, RecvProgress, TcpDataPath, TcpLink};
pub use engine::{
    request_of, ConnectionCounts, EngineConfig, P2pEngine, SendType, FRAME_TIMEOUT,
    HANDSHAKE_TIMEOUT,
};

use super::connector::{
    FailureLog, FinishedRequests, KvConnectorMetadata, KvConnectorScheduler, KvConnectorWorker,
    SchedulerOutput,
};
use super::error::{Error, Result};
use super::model::{
    check_blocks_tensor, BlockId, KvCacheLayer, KvCacheSpec, PagedKvCache, Request,
};

/// Which side of the transfer an instance is (vLLM's `kv_role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum P2pRole {
    /// Prefill: computes the prompt's KV and sends it (`kv_producer`).
    Producer,
    /// Decode: receives the KV and generates (`kv_consumer`).
    Consumer,
}

/// Reads the peer's address from a request id: the decode address for a producer
/// (`___decode_addr_{ip}:{port}`), the prefill address for a consumer
/// (`___prefill_addr_{ip}:{port}___`). The host ends at the last `:` before the port digits;
/// the port is the digits that follow. Returns `(host, port)`.
pub fn parse_request_id(request_id: &str, is_prefill: bool) -> Result<(String, u16)> {
    let marker = if is_prefill {
        "___decode_addr_"
    } else {
        "___prefill_addr_"
    };
    let bad = || {
        Error::invalid(format!(
            "request id {request_id:?} does not carry {marker}<host>:<port>"
        ))
    };
    let start = request_id.find(marker).ok_or_else(bad)? + marker.len();
    let mut rest = &request_id[start..];
    if let Some(end) = rest.find("___") {
        rest = &rest[..end];
    }
    // The port is the digits after the last ':' that is followed by a digit.
    let colon = rest
        .char_indices()
        .filter(|&(i, c)| c == ':' && rest[i + 1..].starts_with(|d: char| d.is_ascii_digit()))
        .map(|(i, _)| i)
        .next_back()
        .ok_or_else(bad)?;
    let host = &rest[..colon];
    let digits: String = rest[colon + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let port: u16 = digits.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// The peer worker's address for `rank`: `host:(port + rank)`.
pub fn peer_address(request_id: &str, is_prefill: bool, rank: usize) -> Result<String> {
    let (host, port) = parse_request_id(request_id, is_prefill)?;
    let p = (port as usize)
        .checked_add(rank)
        .filter(|&p| p <= u16::MAX as usize)
        .ok_or_else(|| Error::invalid(format!("port {port} + rank {rank} overflows")))?;
    Ok(format!("{host}:{p}"))
}

/// Configuration of both sides (vLLM's `kv_transfer_config` and its extra config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pConfig {
    /// Producer or consumer.
    pub role: P2pRole,
    /// This worker's rank: the port offset, here and at the peer.
    pub rank: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// The engine; its `port` is `kv_port + rank` (0 for any free port, in tests).
    pub engine: EngineConfig,
}

/// One request's load or save in a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pReqMeta {
    /// The request id (carries the peer's address).
    pub request_id: String,
    /// Its blocks on this instance.
    pub block_ids: Vec<BlockId>,
    /// Tokens to send (the prompt) or to load (the prompt less its last token).
    pub num_tokens: usize,
    /// Save (producer) or load (consumer).
    pub is_store: bool,
}

/// The metadata of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pConnectorMetadata {
    /// The requests to send or receive.
    pub requests: Vec<P2pReqMeta>,
}

impl KvConnectorMetadata for P2pConnectorMetadata {}

/// Scheduler side of the P2P connector.
#[derive(Debug)]
pub struct P2pScheduler {
    role: P2pRole,
    block_size: usize,
    need_load: HashMap<String, (Request, Vec<BlockId>)>,
    /// Producer: requests whose prefill spans several steps, with the blocks so far.
    chunked: HashMap<String, (usize, Vec<BlockId>)>,
}

impl P2pScheduler {
    /// A scheduler-side connector.
    pub fn new(role: P2pRole, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::invalid("p2p connector: block_size must be positive"));
        }
        Ok(P2pScheduler {
            role,
            block_size,
            need_load: HashMap::new(),
            chunked: HashMap::new(),
        })
    }
}

impl KvConnectorScheduler for P2pScheduler {
    type Metadata = P2pConnectorMetadata;

    fn get_num_new_matched_tokens(
        &mut self,
        request: &Request,
        num_computed_tokens: usize,
    ) -> Result<(Option<usize>, bool)> {
        Ok(match self.role {
            P2pRole::Producer => (Some(0), false),
            P2pRole::Consumer => (
                Some(
                    request
                        .prompt_token_ids
                        .len()
                        .saturating_sub(1)
                        .saturating_sub(num_computed_tokens),
                ),
                false,
            ),
        })
    }

    fn update_state_after_alloc(
        &mut self,
        request: &Request,
        block_ids: &[BlockId],
        num_external_tokens: usize,
    ) {
        if self.role == P2pRole::Consumer && num_external_tokens > 0 {
            self.need_load.insert(
                request.request_id.clone(),
                (request.clone(), block_ids.to_vec()),
            );
        }
    }

    fn build_connector_meta(&mut self, out: &SchedulerOutput) -> P2pConnectorMetadata {
        let mut meta = P2pConnectorMetadata::default();
        let scheduled = |id: &str| out.num_scheduled_tokens.get(id).copied().unwrap_or(0);
        for new in &out.scheduled_new_reqs {
            let req = &new.request;
            let id = &req.request_id;
            match self.role {
                P2pRole::Consumer => {
                    if self.need_load.contains_key(id) {
                        meta.requests.push(P2pReqMeta {
                            request_id: id.clone(),
                            block_ids: new.block_ids.clone(),
                            num_tokens: req
                                .prompt_token_ids
                                .len()
                                .saturating_sub(1)
                                .min(new.block_ids.len() * self.block_size),
                            is_store: false,
                        });
                    }
                }
                P2pRole::Producer => {
                    let len = req.prompt_token_ids.len();
                    if new.num_computed_tokens + scheduled(id) >= len {
                        meta.requests.push(P2pReqMeta {
                            request_id: id.clone(),
                            block_ids: new.block_ids.clone(),
                            num_tokens: len,
                            is_store: true,
                        });
                    } else {
                        // Chunked prefill: send once the whole prompt is computed.
                        self.chunked
                            .insert(id.clone(), (len, new.block_ids.clone()));
                    }
                }
            }
        }
        if self.role == P2pRole::Producer {
            for c in &out.scheduled_cached_reqs {
                let Some((len, blocks)) = self.chunked.get_mut(&c.request_id) else {
                    continue;
                };
                if let Some(nb) = &c.new_block_ids {
                    if c.resumed_from_preemption {
                        *blocks = nb.clone();
                    } else {
                        blocks.extend_from_slice(nb);
                    }
                }
                if c.num_computed_tokens + scheduled(&c.request_id) >= *len {
                    let (len, blocks) = self.chunked.remove(&c.request_id).unwrap_or_default();
                    meta.requests.push(P2pReqMeta {
                        request_id: c.request_id.clone(),
                        block_ids: blocks,
                        num_tokens: len,
                        is_store: true,
                    });
                }
            }
        }
        self.need_load.clear();
        meta
    }

    fn request_finished(
        &mut self,
        request: &Request,
        _block_ids: &[BlockId],
    ) -> (bool, Option<super::connector::KvTransferParams>) {
        // Blocks are copied out when saved, so they can be freed at once.
        self.chunked.remove(&request.request_id);
        (false, None)
    }
}

/// Worker side of the P2P connector, generic over the layer caches (`C`: host memory by
/// default) and the data path that moves their gathered blocks (`D`: TCP by default; with the
/// `cuda` feature NCCL or CUDA IPC for device caches).
#[derive(Debug)]
pub struct P2pWorker<C: KvCacheLayer = PagedKvCache, D: DataPath<Buffer = C::Buffer> = TcpDataPath>
{
    cfg: P2pConfig,
    engine: P2pEngine<D>,
    layers: BTreeMap<String, KvCacheSpec>,
    meta: Option<P2pConnectorMetadata>,
    failures: FailureLog,
    loaded: BTreeSet<String>,
    /// Producer: requests saved in this step (marked after `wait_for_save`).
    saving: BTreeSet<String>,
    _cache: std::marker::PhantomData<fn() -> C>,
}

impl P2pWorker {
    /// A worker-side connector for host caches over the TCP data path; binds its listener.
    pub fn new(cfg: P2pConfig) -> Result<Self> {
        Self::with_data_path(cfg, TcpDataPath)
    }
}

impl<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>> P2pWorker<C, D> {
    /// A worker-side connector over `data_path`; binds its listener.
    pub fn with_data_path(cfg: P2pConfig, data_path: D) -> Result<Self> {
        if cfg.block_size == 0 {
            return Err(Error::invalid("p2p connector: block_size must be positive"));
        }
        let engine = P2pEngine::new(cfg.engine.clone(), data_path)?;
        Ok(P2pWorker {
            cfg,
            engine,
            layers: BTreeMap::new(),
            meta: None,
            failures: FailureLog::default(),
            loaded: BTreeSet::new(),
            saving: BTreeSet::new(),
            _cache: std::marker::PhantomData,
        })
    }

    /// The engine (its address, buffer fill, pending requests).
    pub fn engine(&self) -> &P2pEngine<D> {
        &self.engine
    }

    fn blocks_for(&self, r: &P2pReqMeta) -> Result<usize> {
        let n = r.num_tokens.div_ceil(self.cfg.block_size);
        if n > r.block_ids.len() {
            return Err(Error::invalid(format!(
                "{} tokens need {n} blocks, the request has {}",
                r.num_tokens,
                r.block_ids.len()
            )));
        }
        Ok(n)
    }

    /// Receives and checks one layer of one request (at least `n` blocks of this cache's shape;
    /// a producer that sent more blocks than this instance loads is fine).
    fn receive_layer(
        &self,
        r: &P2pReqMeta,
        n: usize,
        name: &str,
        spec: &KvCacheSpec,
        deadline: Instant,
    ) -> Result<(C::Buffer, String)> {
        // The producer's address: asked in GET mode, watched for a broken connection otherwise.
        let producer = match self.cfg.engine.send_type {
            SendType::Get => Some(peer_address(&r.request_id, false, self.cfg.rank)?),
            _ => peer_address(&r.request_id, false, self.cfg.rank).ok(),
        };
        let tid = format!("{}#{name}", r.request_id);
        let (t, from) = self
            .engine
            .recv_tensor(&tid, producer.as_deref(), deadline)?;
        check_blocks_tensor(spec, n, &t).map_err(|e| Error::Protocol(format!("{tid}: {e}")))?;
        Ok((t, from))
    }
}

/// A request being loaded: blocks to load, layers received so far, the producer's address.
type Pending<B> = (usize, Vec<(String, B)>, String);

impl<C: KvCacheLayer, D: DataPath<Buffer = C::Buffer>> KvConnectorWorker for P2pWorker<C, D> {
    type Metadata = P2pConnectorMetadata;
    type Cache = C;

    fn register_kv_caches(&mut self, caches: &BTreeMap<String, C>) -> Result<()> {
        for (name, c) in caches {
            if c.spec().block_size != self.cfg.block_size {
                return Err(Error::invalid(format!(
                    "layer {name}: block size {} differs from the connector's {}",
                    c.spec().block_size,
                    self.cfg.block_size
                )));
            }
            if name.contains('#') {
                return Err(Error::invalid(format!("layer name {name:?} contains '#'")));
            }
        }
        self.layers = caches.iter().map(|(n, c)| (n.clone(), *c.spec())).collect();
        Ok(())
    }

    crate::transfer::connector::metadata_in_field!(meta);

    fn start_load_kv(&mut self, caches: &mut BTreeMap<String, C>) -> Result<()> {
        if self.cfg.role != P2pRole::Consumer {
            return Ok(());
        }
        let Some(meta) = self.meta.take() else {
            return Ok(());
        };
        // Layer-major, in the order the producer saves (each layer for every request), so a
        // receive buffer that holds a few tensors never waits on one that cannot arrive yet.
        // A request's layers are kept until all arrived and checked: nothing of a failed
        // request is written. The deadline moves with progress.
        let loads: Vec<&P2pReqMeta> = meta
            .requests
            .iter()
            .filter(|r| !r.is_store && r.num_tokens > 0)
            .collect();
        let mut state: Vec<Result<Pending<C::Buffer>>> = loads
            .iter()
            .map(|r| self.blocks_for(r).map(|n| (n, Vec::new(), String::new())))
            .collect();
        let mut deadline = Instant::now() + self.cfg.engine.timeout;
        for (name, spec) in &self.layers {
            for (r, st) in loads.iter().zip(state.iter_mut()) {
                let Ok((n, got, from)) = st else { continue };
                match self.receive_layer(r, *n, name, spec, deadline) {
                    Ok((t, peer)) => {
                        got.push((name.clone(), t));
                        *from = peer;
                        deadline = Instant::now() + self.cfg.engine.timeout;
                    }
                    Err(e) => *st = Err(e),
                }
            }
        }
        for (r, st) in loads.iter().zip(state) {
            let res = st.and_then(|(n, layers, from)| {
                for (name, _) in &layers {
                    if !caches.contains_key(name) {
                        return Err(Error::invalid(format!(
                            "layer {name} was registered but is not passed"
                        )));
                    }
                }
                for (name, t) in &layers {
                    if let Some(c) = caches.get_mut(name) {
                        c.scatter_blocks(&r.block_ids[..n], t)?;
                    }
                }
                Ok(from)
            });
            match res {
                Ok(from) => {
                    self.loaded.insert(r.request_id.clone());
                    if let Err(e) = self.engine.notify_loaded(&r.request_id, &from) {
                        tracing::warn!(request = %r.request_id, error = %e,
                            "kv p2p: cannot tell the producer the request was loaded");
                    }
                }
                Err(e) => {
                    let e = e.for_request(&r.request_id);
                    // Told on the connection the request's tensors came over, then forgotten.
                    if let Ok(peer) = peer_address(&r.request_id, false, self.cfg.rank) {
                        self.engine
                            .notify_abort(&r.request_id, &peer, &e.to_string());
                    }
                    self.engine.discard_request(&r.request_id);
                    self.failures.record(&r.request_id, &r.block_ids, &e);
                }
            }
        }
        self.meta = Some(meta);
        Ok(())
    }

    fn wait_for_layer_load(&mut self, _layer_name: &str) -> Result<()> {
        Ok(())
    }

    fn save_kv_layer(&mut self, layer_name: &str, layer: &C) -> Result<()> {
        if self.cfg.role != P2pRole::Producer {
            return Ok(());
        }
        let Some(meta) = self.meta.take() else {
            return Ok(());
        };
        for r in meta
            .requests
            .iter()
            .filter(|r| r.is_store && r.num_tokens > 0)
        {
            if self.failures.failed.contains_key(&r.request_id) {
                continue;
            }
            let res = (|| {
                let n = self.blocks_for(r)?;
                let peer = peer_address(&r.request_id, true, self.cfg.rank)?;
                let t = layer.gather_blocks(&r.block_ids[..n])?;
                self.engine.send_tensor(
                    &r.request_id,
                    &format!("{}#{layer_name}", r.request_id),
                    t,
                    &peer,
                )
            })();
            match res {
                Ok(()) => {
                    self.saving.insert(r.request_id.clone());
                }
                Err(e) => {
                    let e = e.for_request(&r.request_id);
                    self.engine.fail_request(&r.request_id, &e);
                    self.saving.remove(&r.request_id);
                    self.failures.record(&r.request_id, &r.block_ids, &e);
                }
            }
        }
        self.meta = Some(meta);
        Ok(())
    }

    fn wait_for_save(&mut self) -> Result<()> {
        if self.cfg.role != P2pRole::Producer {
            return Ok(());
        }
        let r = if self.cfg.engine.send_type == SendType::PutAsync {
            self.engine.wait_for_sent()
        } else {
            Ok(())
        };
        for id in std::mem::take(&mut self.saving) {
            self.engine.mark_saved(&id);
        }
        r
    }

    fn get_finished(&mut self, finished_req_ids: &BTreeSet<String>) -> FinishedRequests {
        let (sending, mut failed) = self.engine.take_finished();
        failed.append(&mut std::mem::take(&mut self.failures.failed));
        if self.cfg.role == P2pRole::Consumer {
            for id in finished_req_ids {
                // Tensors that arrived for a request the scheduler already finished are dropped.
                self.engine.discard_request(id);
            }
        }
        FinishedRequests {
            finished_sending: sending,
            finished_recving: std::mem::take(&mut self.loaded),
            failed,
        }
    }

    fn get_block_ids_with_load_errors(&mut self) -> BTreeSet<BlockId> {
        std::mem::take(&mut self.failures.blocks)
    }

    fn shutdown(&mut self) -> Result<()> {
        self.engine.shutdown();
        Ok(())
    }
}

/// Polls `get_finished` until every id in `want` is reported finished or failed, or `timeout`
/// passes. A helper for tests and simple drivers; returns what was reported.
pub fn wait_finished<W: KvConnectorWorker>(
    worker: &mut W,
    want: &BTreeSet<String>,
    timeout: Duration,
) -> FinishedRequests {
    let deadline = Instant::now() + timeout;
    let mut all = FinishedRequests::default();
    loop {
        let mut f = worker.get_finished(&BTreeSet::new());
        all.finished_sending.append(&mut f.finished_sending);
        all.finished_recving.append(&mut f.finished_recving);
        all.failed.append(&mut f.failed);
        let seen = |id: &String| {
            all.finished_sending.contains(id)
                || all.finished_recving.contains(id)
                || all.failed.contains_key(id)
        };
        if want.iter().all(seen) || Instant::now() >= deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transfer::connector::CachedRequestData;

    #[test]
    fn producer_sends_a_chunked_prefill_once_with_every_block() {
        let mut s = P2pScheduler::new(P2pRole::Producer, 4).unwrap();
        let r = Request::new("r___decode_addr_h:1", (0..10).collect());
        // Step 1: 4 of 10 tokens, blocks [5].
        let mut out = SchedulerOutput::default();
        out.add_new_request(&r, &[5]);
        out.num_scheduled_tokens.insert(r.request_id.clone(), 4);
        assert!(s.build_connector_meta(&out).requests.is_empty());
        // Step 2: 4 more, block 2 added; step 3: the last 2, block 9 added.
        for (computed, blocks, emits) in [(4, vec![2], false), (8, vec![9], true)] {
            let mut out = SchedulerOutput::default();
            out.scheduled_cached_reqs.push(CachedRequestData {
                request_id: r.request_id.clone(),
                resumed_from_preemption: false,
                new_block_ids: Some(blocks),
                num_computed_tokens: computed,
            });
            out.num_scheduled_tokens
                .insert(r.request_id.clone(), if emits { 2 } else { 4 });
            let m = s.build_connector_meta(&out);
            assert_eq!(m.requests.len(), usize::from(emits));
            if emits {
                assert_eq!(m.requests[0].block_ids, vec![5, 2, 9]);
                assert_eq!(m.requests[0].num_tokens, 10);
                assert!(m.requests[0].is_store);
            }
        }
        // The consumer loads all but the last token, in blocks it was given.
        let mut c = P2pScheduler::new(P2pRole::Consumer, 4).unwrap();
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 0).unwrap(),
            (Some(9), false)
        );
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 8).unwrap(),
            (Some(1), false)
        );
        assert_eq!(
            s.get_num_new_matched_tokens(&r, 0).unwrap(),
            (Some(0), false)
        );
    }

    #[test]
    fn request_ids_carry_addresses_as_in_vllm() {
        let id = "cmpl-___prefill_addr_10.0.1.2:21001___decode_addr_10.0.1.3:22001_9f3a2b";
        assert_eq!(
            parse_request_id(id, true).unwrap(),
            ("10.0.1.3".to_string(), 22001)
        );
        assert_eq!(
            parse_request_id(id, false).unwrap(),
            ("10.0.1.2".to_string(), 21001)
        );
        assert_eq!(peer_address(id, true, 3).unwrap(), "10.0.1.3:22004");
        assert!(parse_request_id("cmpl-1", true).is_err());
        assert!(parse_request_id("___decode_addr_host:", true).is_err());
        assert!(parse_request_id("___decode_addr_:80", true).is_err());
        assert!(parse_request_id("___decode_addr_h:99999", true).is_err());
        assert!(peer_address("___decode_addr_h:65535", true, 1).is_err());
    }
}
