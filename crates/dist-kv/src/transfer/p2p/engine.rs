//! The P2P engine (vLLM's `P2pNcclEngine`): one listening socket per worker, one connection per
//! peer instance, the producer's bounded send buffer and request tracking, the consumer's
//! bounded receive buffer.
//!
//! Threads: `kv-p2p-listen` accepts connections; each connection has a reader thread that
//! handles the peer's frames (a PUT waits there for room in the receive buffer, which is the
//! consumer's back-pressure: the producer's PUT is answered only when the tensor fits); in
//! PUT_ASYNC mode `kv-p2p-send` drains the send queue. Callers' threads write frames under the
//! connection's writer lock and wait for replies with a deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dist_core::Tensor;
use serde::{Deserialize, Serialize};

use super::datapath::{DataLink, DataPath, TcpDataPath};
use super::wire::{
    read_frame, write_frame, Frame, PutStatus, TensorHeader, MAX_TENSOR_ID, PROTOCOL_VERSION,
};
use crate::transfer::error::{Error, Result};

/// How a producer hands tensors to the consumer (vLLM's `send_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum SendType {
    /// `save_kv_layer` sends the layer before it returns.
    Put,
    /// `save_kv_layer` queues the layer (bounded); a thread sends it; `wait_for_save` drains the queue.
    #[default]
    PutAsync,
    /// The producer keeps the layer (bounded) until the consumer asks for it.
    Get,
}

impl std::str::FromStr for SendType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "PUT" => Ok(SendType::Put),
            "PUT_ASYNC" => Ok(SendType::PutAsync),
            "GET" => Ok(SendType::Get),
            o => Err(Error::invalid(format!(
                "send_type {o:?}: expected PUT, PUT_ASYNC or GET"
            ))),
        }
    }
}

/// Settings of one engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Host to listen on and to advertise to peers (an address the peers can reach).
    pub host: String,
    /// Port to listen on; 0 picks a free one ([`P2pEngine::listen_addr`] tells which).
    pub port: u16,
    /// Send mode.
    pub send_type: SendType,
    /// Cap on bytes held for sending (PUT_ASYNC queue, GET store); vLLM's `kv_buffer_size`.
    pub send_buffer_bytes: usize,
    /// Cap on bytes received and not yet loaded.
    pub recv_buffer_bytes: usize,
    /// Deadline of every wait (connect, reply, buffer room, a tensor's arrival).
    pub timeout: Duration,
    /// How long a producer waits, after handing over a request's last layer, for the consumer
    /// to report it loaded before failing it and freeing its buffers.
    pub done_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            host: "127.0.0.1".into(),
            port: 0,
            send_type: SendType::PutAsync,
            send_buffer_bytes: 1 << 30,
            recv_buffer_bytes: 1 << 30,
            timeout: Duration::from_secs(30),
            done_timeout: Duration::from_secs(120),
        }
    }
}

/// Socket read timeout: how often idle readers look at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);
/// Given-up requests remembered to refuse their late tensors.
const MAX_DISCARDED: usize = 4096;
/// Most connections one engine keeps.
const MAX_CONNS: usize = 1024;

#[derive(Debug)]
enum Reply<B> {
    Put(PutStatus),
    Get(Option<B>),
}

#[derive(Debug)]
struct Conn<D: DataPath> {
    peer: String,
    writer: Mutex<TcpStream>,
    link: D::Link,
    /// Expected replies by seq: `None` until the reader delivers it.
    replies: Mutex<HashMap<u64, Option<Reply<D::Buffer>>>>,
    cv: Condvar,
    lost: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: DataPath> Conn<D> {
    fn alive(&self) -> bool {
        lock(&self.lost).is_none()
    }

    fn lose(&self, reason: &str) {
        let mut l = lock(&self.lost);
        if l.is_none() {
            *l = Some(reason.to_string());
        }
        drop(l);
        // Wake reply waiters first: one of them may hold the writer while it waits.
        drop(lock(&self.replies));
        self.cv.notify_all();
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }

    fn peer_lost(&self, op: &str) -> Error {
        Error::PeerLost {
            peer: self.peer.clone(),
            op: op.to_string(),
            detail: lock(&self.lost).clone().unwrap_or_default(),
        }
    }

    fn send_frame(&self, f: &Frame, op: &str) -> Result<()> {
        if !self.alive() {
            return Err(self.peer_lost(op));
        }
        let mut w = lock(&self.writer);
        write_frame(&mut *w, f).map_err(|e| {
            drop(w);
            self.lose(&e.to_string());
            self.peer_lost(op)
        })
    }

    fn expect(&self, seq: u64) {
        lock(&self.replies).insert(seq, None);
    }

    fn deliver(&self, seq: u64, r: Reply<D::Buffer>) {
        let mut m = lock(&self.replies);
        if let Some(slot) = m.get_mut(&seq) {
            *slot = Some(r);
            self.cv.notify_all();
        }
        // A reply nobody waits for any more (its waiter timed out) is dropped.
    }

    fn wait_reply(&self, seq: u64, deadline: Instant, op: &str) -> Result<Reply<D::Buffer>> {
        let start = Instant::now();
        let mut m = lock(&self.replies);
        loop {
            if let Some(Some(_)) = m.get(&seq) {
                if let Some(Some(r)) = m.remove(&seq) {
                    return Ok(r);
                }
            }
            if !self.alive() {
                m.remove(&seq);
                return Err(self.peer_lost(op));
            }
            let now = Instant::now();
            if now >= deadline {
                m.remove(&seq);
                return Err(Error::Timeout {
                    op: op.to_string(),
                    waited: start.elapsed(),
                    peer: Some(self.peer.clone()),
                    detail: "no reply".into(),
                });
            }
            m = self
                .cv
                .wait_timeout(m, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[derive(Debug)]
struct Outgoing<B> {
    request_id: String,
    tensor_id: String,
    tensor: B,
    peer: String,
}

#[derive(Debug)]
struct ProdReq {
    peer: String,
    /// Tensors queued (PUT_ASYNC) or held (GET) for it.
    pending: usize,
    /// When the worker said every layer was handed over.
    saved: Option<Instant>,
}

#[derive(Debug)]
struct SendState<B> {
    queue: VecDeque<Outgoing<B>>,
    store: HashMap<String, Outgoing<B>>,
    /// Tensors sent on a path whose receiver reads this memory ([`DataPath::lends_memory`]),
    /// by (peer, seq), until the receiver's `Stored` (PUT) or `GetDone` (GET). Counted in
    /// `bytes`.
    lent: HashMap<(String, u64), Outgoing<B>>,
    bytes: usize,
    in_flight: bool,
    reqs: HashMap<String, ProdReq>,
    done: BTreeSet<String>,
    failed: BTreeMap<String, String>,
}

impl<B> Default for SendState<B> {
    fn default() -> Self {
        SendState {
            queue: VecDeque::new(),
            store: HashMap::new(),
            lent: HashMap::new(),
            bytes: 0,
            in_flight: false,
            reqs: HashMap::new(),
            done: BTreeSet::new(),
            failed: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct RecvStore<B> {
    /// Tensor id -> (tensor, producer's address, arrival).
    tensors: HashMap<String, (B, String, Instant)>,
    /// Requests given up here (bounded, oldest forgotten first): their late PUTs are refused.
    discarded: VecDeque<String>,
    /// Bytes held plus bytes reserved for PUTs whose data is arriving.
    bytes: usize,
}

impl<B> Default for RecvStore<B> {
    fn default() -> Self {
        RecvStore {
            tensors: HashMap::new(),
            discarded: VecDeque::new(),
            bytes: 0,
        }
    }
}

#[derive(Debug)]
struct Inner<D: DataPath> {
    cfg: EngineConfig,
    addr: String,
    datapath: D,
    conns: Mutex<HashMap<String, Arc<Conn<D>>>>,
    /// Peers whose connection broke (address -> reason), until they connect again.
    lost_peers: Mutex<HashMap<String, String>>,
    recv: Mutex<RecvStore<D::Buffer>>,
    recv_cv: Condvar,
    send: Mutex<SendState<D::Buffer>>,
    send_cv: Condvar,
    shutdown: AtomicBool,
    seq: AtomicU64,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

/// A P2P engine over the data path `D`; see the module docs. Dropping it shuts it down.
#[derive(Debug)]
pub struct P2pEngine<D: DataPath = TcpDataPath> {
    inner: Arc<Inner<D>>,
    threads: Vec<JoinHandle<()>>,
}

/// The request id part of a tensor id (`{request_id}#{layer_name}`).
pub fn request_of(tensor_id: &str) -> &str {
    tensor_id.rsplit_once('#').map_or(tensor_id, |(r, _)| r)
}

impl<D: DataPath> P2pEngine<D> {
    /// Binds the listening socket and starts the engine's threads.
    pub fn new(cfg: EngineConfig, datapath: D) -> Result<Self> {
        if cfg.send_buffer_bytes == 0 || cfg.recv_buffer_bytes == 0 || cfg.timeout.is_zero() {
            return Err(Error::invalid(format!(
                "p2p engine: buffer sizes and timeout must be positive ({cfg:?})"
            )));
        }
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
            .map_err(|e| Error::io(format!("bind kv p2p listener {}:{}", cfg.host, cfg.port), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("kv p2p listener address", e))?
            .port();
        let addr = format!("{}:{port}", cfg.host);
        let inner = Arc::new(Inner {
            cfg,
            addr,
            datapath,
            conns: Mutex::new(HashMap::new()),
            lost_peers: Mutex::new(HashMap::new()),
            recv: Mutex::new(RecvStore::default()),
            recv_cv: Condvar::new(),
            send: Mutex::new(SendState::default()),
            send_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            seq: AtomicU64::new(1),
            readers: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("kv-p2p-listen".into())
                .spawn(move || i.listen(listener))
                .map_err(|e| Error::io("spawn kv-p2p-listen", e))?,
        );
        if inner.cfg.send_type == SendType::PutAsync {
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("kv-p2p-send".into())
                    .spawn(move || i.sender())
                    .map_err(|e| Error::io("spawn kv-p2p-send", e))?,
            );
        }
        tracing::info!(addr = %inner.addr, send_type = ?inner.cfg.send_type, "kv p2p engine listening");
        Ok(P2pEngine { inner, threads })
    }

    /// The address peers reach this engine at (`host:port`).
    pub fn listen_addr(&self) -> &str {
        &self.inner.addr
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Producer: hands one tensor of `request_id` to `peer` in the configured mode. PUT sends
    /// now; PUT_ASYNC queues and GET stores it, waiting (up to the timeout) for room in the send
    /// buffer. An error fails the request and frees everything held for it.
    pub fn send_tensor(
        &self,
        request_id: &str,
        tensor_id: &str,
        tensor: D::Buffer,
        peer: &str,
    ) -> Result<()> {
        self.inner.send_tensor(request_id, tensor_id, tensor, peer)
    }

    /// Producer: every layer of `request_id` has been handed over; from now on the consumer has
    /// `done_timeout` to report it loaded.
    pub fn mark_saved(&self, request_id: &str) {
        if let Some(r) = lock(&self.inner.send).reqs.get_mut(request_id) {
            r.saved.get_or_insert_with(Instant::now);
        }
    }

    /// Producer, PUT_ASYNC: waits until the send queue is empty (vLLM's `wait_for_sent`).
    pub fn wait_for_sent(&self) -> Result<()> {
        let i = &self.inner;
        let start = Instant::now();
        let deadline = start + i.cfg.timeout;
        let mut s = lock(&i.send);
        while !s.queue.is_empty() || s.in_flight {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: "kv p2p wait_for_sent".into(),
                    waited: start.elapsed(),
                    peer: s.queue.front().map(|o| o.peer.clone()),
                    detail: format!("{} tensors, {} bytes queued", s.queue.len(), s.bytes),
                });
            }
            s = i
                .send_cv
                .wait_timeout(s, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Producer: requests the consumer has loaded (their buffers are freed) and requests that
    /// failed since the last call. Requests whose consumer did not report in time fail here.
    pub fn take_finished(&self) -> (BTreeSet<String>, BTreeMap<String, String>) {
        let i = &self.inner;
        let expired: Vec<(String, String)> = {
            let s = lock(&i.send);
            s.reqs
                .iter()
                .filter(|(_, r)| r.saved.is_some_and(|t| t.elapsed() > i.cfg.done_timeout))
                .map(|(id, r)| (id.clone(), r.peer.clone()))
                .collect()
        };
        for (id, peer) in expired {
            let e = Error::Timeout {
                op: "kv p2p wait for the consumer to load".into(),
                waited: i.cfg.done_timeout,
                peer: Some(peer),
                detail: String::new(),
            };
            i.fail_request(&id, &e.for_request(&id));
        }
        let mut s = lock(&i.send);
        (std::mem::take(&mut s.done), std::mem::take(&mut s.failed))
    }

    /// Producer: requests still tracked (sent or queued, not yet reported loaded).
    pub fn pending_requests(&self) -> usize {
        lock(&self.inner.send).reqs.len()
    }

    /// Bytes held in the send buffer (queued or stored).
    pub fn send_buffer_bytes(&self) -> usize {
        lock(&self.inner.send).bytes
    }

    /// Bytes held or reserved in the receive buffer.
    pub fn recv_buffer_bytes(&self) -> usize {
        lock(&self.inner.recv).bytes
    }

    /// Producer: fails `request_id` (the worker gave up on it) and frees what it holds.
    pub fn fail_request(&self, request_id: &str, err: &Error) {
        self.inner.fail_request(request_id, err);
    }

    /// Consumer: the tensor `tensor_id`, waiting until it arrives (PUT modes) or asking `peer`
    /// for it (GET, retried while the producer does not hold it yet) until `deadline`. In PUT
    /// modes `peer`, when given, is the producer: a broken connection from it ends the wait at
    /// once. Returns the tensor and the producer's address.
    pub fn recv_tensor(
        &self,
        tensor_id: &str,
        peer: Option<&str>,
        deadline: Instant,
    ) -> Result<(D::Buffer, String)> {
        let i = &self.inner;
        let op = format!("kv p2p recv {tensor_id}");
        let start = Instant::now();
        if i.cfg.send_type == SendType::Get {
            let peer = peer.ok_or_else(|| {
                Error::invalid(format!("{op}: GET mode needs the producer's address"))
            })?;
            let mut backoff = Duration::from_millis(1);
            loop {
                let conn = i.get_conn(peer)?;
                let seq = i.seq.fetch_add(1, Ordering::Relaxed);
                conn.expect(seq);
                conn.send_frame(
                    &Frame::Get {
                        seq,
                        tensor_id: tensor_id.to_string(),
                    },
                    &op,
                )?;
                match conn.wait_reply(seq, deadline, &op)? {
                    Reply::Get(Some(t)) => return Ok((t, peer.to_string())),
                    Reply::Get(None) => {}
                    Reply::Put(_) => {
                        return Err(Error::Protocol(format!("{op}: PUT reply to a GET")))
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout {
                        op,
                        waited: start.elapsed(),
                        peer: Some(peer.to_string()),
                        detail: "the producer does not hold the tensor".into(),
                    });
                }
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
        let mut r = lock(&i.recv);
        loop {
            if let Some((t, from, _)) = r.tensors.remove(tensor_id) {
                r.bytes -= t.nbytes();
                i.recv_cv.notify_all();
                return Ok((t, from));
            }
            if i.shutdown.load(Ordering::Acquire) {
                return Err(Error::Shutdown(op));
            }
            if let Some(why) = peer.and_then(|p| lock(&i.lost_peers).get(p).cloned()) {
                return Err(Error::PeerLost {
                    peer: peer.unwrap_or_default().to_string(),
                    op,
                    detail: why,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op,
                    waited: start.elapsed(),
                    peer: peer.map(str::to_string),
                    detail: format!(
                        "{} tensors, {} of {} bytes in the receive buffer",
                        r.tensors.len(),
                        r.bytes,
                        i.cfg.recv_buffer_bytes
                    ),
                });
            }
            r = i
                .recv_cv
                .wait_timeout(r, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Consumer: tells the producer at `peer` that every layer of `request_id` was loaded.
    pub fn notify_loaded(&self, request_id: &str, peer: &str) -> Result<()> {
        let conn = self.inner.get_conn(peer)?;
        conn.send_frame(
            &Frame::Loaded {
                request_id: request_id.to_string(),
            },
            &format!("kv p2p notify loaded {request_id}"),
        )
    }

    /// Consumer: tells the producer at `peer` that `request_id` was given up (best effort).
    pub fn notify_abort(&self, request_id: &str, peer: &str, reason: &str) {
        if let Ok(conn) = self.inner.get_conn(peer) {
            let _ = conn.send_frame(
                &Frame::Abort {
                    request_id: request_id.to_string(),
                    reason: reason.to_string(),
                },
                "kv p2p abort",
            );
        }
    }

    /// Consumer: drops every received tensor of `request_id`, freeing the receive buffer.
    pub fn discard_request(&self, request_id: &str) {
        let mut r = lock(&self.inner.recv);
        if !r.discarded.iter().any(|d| d == request_id) {
            if r.discarded.len() >= MAX_DISCARDED {
                r.discarded.pop_front();
            }
            r.discarded.push_back(request_id.to_string());
        }
        let mut freed = 0;
        r.tensors.retain(|id, (t, _, _)| {
            let keep = request_of(id) != request_id;
            if !keep {
                freed += t.nbytes();
            }
            keep
        });
        r.bytes -= freed;
        self.inner.recv_cv.notify_all();
    }

    /// Stops the threads and closes every connection; waits for the threads.
    pub fn shutdown(&mut self) {
        let i = &self.inner;
        if i.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake the listener's accept.
        let _ = TcpStream::connect_timeout(
            &match i.addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                Some(a) => a,
                None => return,
            },
            Duration::from_secs(1),
        );
        let conns: Vec<Arc<Conn<D>>> = lock(&i.conns).drain().map(|(_, c)| c).collect();
        for c in conns {
            c.lose("engine shut down");
        }
        i.send_cv.notify_all();
        i.recv_cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let readers: Vec<_> = lock(&i.readers).drain(..).collect();
        for t in readers {
            let _ = t.join();
        }
    }
}

impl<D: DataPath> Drop for P2pEngine<D> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<D: DataPath> Inner<D> {
    fn listen(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.shutdown.load(Ordering::Acquire) {
                break;
            }
            let Ok(stream) = stream else { continue };
            if self.live_threads() >= MAX_CONNS {
                tracing::warn!("kv p2p: refusing a connection, {MAX_CONNS} are open");
                continue;
            }
            let me = self.clone();
            match std::thread::Builder::new()
                .name("kv-p2p-conn".into())
                .spawn(move || me.accept(stream))
            {
                Ok(h) => self.add_thread(h),
                Err(e) => tracing::warn!(error = %e, "kv p2p: cannot spawn a connection thread"),
            }
        }
    }

    /// Keeps a connection thread's handle (for the join at shutdown), forgetting finished ones.
    fn add_thread(&self, h: JoinHandle<()>) {
        let mut r = lock(&self.readers);
        r.retain(|h| !h.is_finished());
        r.push(h);
    }

    fn live_threads(&self) -> usize {
        let mut r = lock(&self.readers);
        r.retain(|h| !h.is_finished());
        r.len()
    }

    fn prepare(&self, s: &TcpStream) -> Result<()> {
        s.set_nodelay(true)
            .and_then(|_| s.set_read_timeout(Some(POLL)))
            .and_then(|_| s.set_write_timeout(Some(self.cfg.timeout)))
            .map_err(|e| Error::io("configure kv p2p socket", e))
    }

    fn accept(self: Arc<Self>, mut s: TcpStream) {
        let r = (|| -> Result<Arc<Conn<D>>> {
            self.prepare(&s)?;
            let deadline = Instant::now() + self.cfg.timeout;
            let mut closed = false;
            let hello = loop {
                match read_frame(&mut s, true, deadline, &mut closed)? {
                    Some(f) => break f,
                    None if closed => return Err(Error::Protocol("closed before hello".into())),
                    None if self.shutdown.load(Ordering::Acquire) => {
                        return Err(Error::Shutdown("kv p2p handshake".into()))
                    }
                    None if Instant::now() >= deadline => {
                        return Err(Error::Protocol("no hello in time".into()))
                    }
                    None => {}
                }
            };
            let Frame::Hello {
                version,
                listen_addr,
                data_path,
                link_init,
            } = hello
            else {
                return Err(Error::Protocol(format!("expected hello, got {hello:?}")));
            };
            if version != PROTOCOL_VERSION || data_path != self.datapath.name() {
                return Err(Error::Protocol(format!(
                    "peer {listen_addr} speaks version {version} over {data_path:?}, \
                     this engine version {PROTOCOL_VERSION} over {:?}",
                    self.datapath.name()
                )));
            }
            if listen_addr.len() > MAX_TENSOR_ID {
                return Err(Error::Protocol("peer address too long".into()));
            }
            write_frame(
                &mut s,
                &Frame::HelloAck {
                    version: PROTOCOL_VERSION,
                    listen_addr: self.addr.clone(),
                    data_path: self.datapath.name().into(),
                },
            )?;
            let link = self.datapath.open(&listen_addr, false, &link_init)?;
            let conn = Arc::new(Conn {
                peer: listen_addr.clone(),
                writer: Mutex::new(
                    s.try_clone()
                        .map_err(|e| Error::io("clone kv p2p socket", e))?,
                ),
                link,
                replies: Mutex::new(HashMap::new()),
                cv: Condvar::new(),
                lost: Mutex::new(None),
            });
            lock(&self.lost_peers).remove(&listen_addr);
            lock(&self.conns).insert(listen_addr, conn.clone());
            Ok(conn)
        })();
        match r {
            Ok(conn) => self.read_loop(conn, s),
            Err(e) => tracing::warn!(error = %e, "kv p2p: refused a connection"),
        }
    }

    fn get_conn(self: &Arc<Self>, peer: &str) -> Result<Arc<Conn<D>>> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(Error::Shutdown(format!("kv p2p connect to {peer}")));
        }
        if let Some(c) = lock(&self.conns).get(peer) {
            if c.alive() {
                return Ok(c.clone());
            }
        }
        let op = format!("kv p2p connect to {peer}");
        let addr = peer
            .to_socket_addrs()
            .map_err(|e| Error::io(op.clone(), e))?
            .next()
            .ok_or_else(|| Error::invalid(format!("{op}: no address")))?;
        let lost = |detail: String| Error::PeerLost {
            peer: peer.to_string(),
            op: op.clone(),
            detail,
        };
        let mut s =
            TcpStream::connect_timeout(&addr, self.cfg.timeout).map_err(|e| lost(e.to_string()))?;
        self.prepare(&s)?;
        let init = self.datapath.link_init(peer)?;
        write_frame(
            &mut s,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                listen_addr: self.addr.clone(),
                data_path: self.datapath.name().into(),
                link_init: init.clone(),
            },
        )
        .map_err(|e| lost(e.to_string()))?;
        let deadline = Instant::now() + self.cfg.timeout;
        let mut closed = false;
        let ack = loop {
            match read_frame(&mut s, true, deadline, &mut closed)
                .map_err(|e| lost(e.to_string()))?
            {
                Some(f) => break f,
                None if closed => return Err(lost("closed during the handshake".into())),
                None if Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        op,
                        waited: self.cfg.timeout,
                        peer: Some(peer.to_string()),
                        detail: "no handshake reply".into(),
                    })
                }
                None => {}
            }
        };
        match &ack {
            Frame::HelloAck {
                version, data_path, ..
            } if *version == PROTOCOL_VERSION && data_path == self.datapath.name() => {}
            other => return Err(Error::Protocol(format!("{op}: handshake reply {other:?}"))),
        }
        let link = self.datapath.open(peer, true, &init)?;
        let conn = Arc::new(Conn {
            peer: peer.to_string(),
            writer: Mutex::new(
                s.try_clone()
                    .map_err(|e| Error::io("clone kv p2p socket", e))?,
            ),
            link,
            replies: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            lost: Mutex::new(None),
        });
        let me = self.clone();
        let c = conn.clone();
        let h = std::thread::Builder::new()
            .name("kv-p2p-conn".into())
            .spawn(move || me.read_loop(c, s))
            .map_err(|e| Error::io("spawn kv-p2p-conn", e))?;
        self.add_thread(h);
        lock(&self.lost_peers).remove(peer);
        lock(&self.conns).insert(peer.to_string(), conn.clone());
        Ok(conn)
    }

    fn read_loop(self: Arc<Self>, conn: Arc<Conn<D>>, mut s: TcpStream) {
        let reason = loop {
            if self.shutdown.load(Ordering::Acquire) {
                break "engine shut down".to_string();
            }
            let mut closed = false;
            match read_frame(&mut s, true, Instant::now() + self.cfg.timeout, &mut closed) {
                Ok(Some(f)) => {
                    if let Err(e) = self.handle(&conn, &mut s, f) {
                        break e.to_string();
                    }
                }
                Ok(None) if closed => break "connection closed by the peer".to_string(),
                Ok(None) => {}
                Err(e) => break e.to_string(),
            }
        };
        conn.lose(&reason);
        if !self.shutdown.load(Ordering::Acquire) {
            tracing::warn!(peer = %conn.peer, %reason, "kv p2p connection lost");
            let mut conns = lock(&self.conns);
            if conns.get(&conn.peer).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                conns.remove(&conn.peer);
            }
            drop(conns);
            let mut lost = lock(&self.lost_peers);
            if lost.len() >= MAX_CONNS {
                lost.clear();
            }
            lost.insert(conn.peer.clone(), reason.clone());
            drop(lost);
            self.on_conn_lost(&conn.peer, &reason);
        }
    }

    fn handle(&self, conn: &Conn<D>, s: &mut TcpStream, f: Frame) -> Result<()> {
        match f {
            Frame::Put {
                seq,
                tensor_id,
                header,
            } => self.on_put(conn, s, seq, tensor_id, header),
            Frame::PutReply {
                seq,
                status: PutStatus::Stored,
            } => {
                self.release_lent(&conn.peer, seq);
                Ok(())
            }
            Frame::PutReply { seq, status } => {
                conn.deliver(seq, Reply::Put(status));
                Ok(())
            }
            Frame::Get { seq, tensor_id } => self.on_get(conn, seq, &tensor_id),
            Frame::GetDone { seq } => {
                self.release_lent(&conn.peer, seq);
                Ok(())
            }
            Frame::GetReply { seq, header } => {
                let t = match header {
                    Some(h) => {
                        let n = h.nbytes().filter(|&n| n <= self.cfg.recv_buffer_bytes);
                        let Some(_) = n else {
                            return Err(Error::Protocol(format!(
                                "GET reply of {:?} {:?} exceeds the receive buffer",
                                h.dtype, h.shape
                            )));
                        };
                        let mut t = self.datapath.alloc(h.dtype, &h.shape)?;
                        conn.link
                            .recv(s, &mut t, Instant::now() + self.cfg.timeout)?;
                        if self.datapath.lends_memory() {
                            conn.send_frame(&Frame::GetDone { seq }, "kv p2p get done")?;
                        }
                        Some(t)
                    }
                    None => None,
                };
                conn.deliver(seq, Reply::Get(t));
                Ok(())
            }
            Frame::Loaded { request_id } => {
                if self.tracks(&request_id, &conn.peer) {
                    self.finish_request(&request_id);
                } else {
                    tracing::debug!(request = %request_id, peer = %conn.peer,
                        "kv p2p: loaded report for a request not sent to that peer");
                }
                Ok(())
            }
            Frame::Abort { request_id, .. } if !self.tracks(&request_id, &conn.peer) => Ok(()),
            Frame::Abort { request_id, reason } => {
                let e = Error::PeerLost {
                    peer: conn.peer.clone(),
                    op: "kv p2p transfer".into(),
                    detail: format!("the consumer aborted the request: {reason}"),
                };
                self.fail_request(&request_id, &e.for_request(&request_id));
                Ok(())
            }
            other => Err(Error::Protocol(format!("unexpected frame {other:?}"))),
        }
    }

    fn on_put(
        &self,
        conn: &Conn<D>,
        s: &mut TcpStream,
        seq: u64,
        tensor_id: String,
        header: TensorHeader,
    ) -> Result<()> {
        let cap = self.cfg.recv_buffer_bytes;
        let refuse = |why: String| {
            tracing::warn!(%tensor_id, %why, "kv p2p: refusing a PUT");
            conn.send_frame(
                &Frame::PutReply {
                    seq,
                    status: PutStatus::Refused(why),
                },
                "kv p2p put reply",
            )
        };
        let Some(n) = header.nbytes().filter(|&n| n <= cap) else {
            return refuse(format!(
                "{tensor_id}: {:?} {:?} exceeds the receive buffer of {cap} bytes",
                header.dtype, header.shape
            ));
        };
        if lock(&self.recv)
            .discarded
            .iter()
            .any(|d| d == request_of(&tensor_id))
        {
            return refuse(format!("{tensor_id}: the request was given up here"));
        }
        // Back-pressure: answer only when the tensor fits.
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        {
            let mut r = lock(&self.recv);
            while r.bytes + n > cap {
                // Tensors nobody loaded within the done timeout are dropped (their producer has
                // failed the request by then), so unclaimed data cannot hold the buffer forever.
                let ttl = self.cfg.done_timeout;
                let mut freed = 0;
                r.tensors.retain(|id, (t, _, at)| {
                    let keep = at.elapsed() <= ttl;
                    if !keep {
                        tracing::warn!(tensor = %id, "kv p2p: dropping a tensor nobody loaded");
                        freed += t.nbytes();
                    }
                    keep
                });
                r.bytes -= freed;
                if r.bytes + n <= cap {
                    break;
                }
                let now = Instant::now();
                if self.shutdown.load(Ordering::Acquire) || now >= deadline {
                    let why = format!(
                        "{tensor_id}: receive buffer full ({} of {cap} bytes) for {:?}",
                        r.bytes,
                        start.elapsed()
                    );
                    drop(r);
                    return refuse(why);
                }
                r = self
                    .recv_cv
                    .wait_timeout(r, (deadline - now).min(POLL))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            r.bytes += n;
        }
        let unreserve = |n: usize| {
            lock(&self.recv).bytes -= n;
            self.recv_cv.notify_all();
        };
        // The buffer first (device memory can run out): a failed allocation refuses the PUT.
        let mut t = match self.datapath.alloc(header.dtype, &header.shape) {
            Ok(t) => t,
            Err(e) => {
                unreserve(n);
                return refuse(format!(
                    "{tensor_id}: cannot allocate the receive buffer: {e}"
                ));
            }
        };
        if let Err(e) = conn.send_frame(
            &Frame::PutReply {
                seq,
                status: PutStatus::Ready,
            },
            "kv p2p put reply",
        ) {
            unreserve(n);
            return Err(e);
        }
        if let Err(e) = conn.link.recv(s, &mut t, Instant::now() + self.cfg.timeout) {
            unreserve(n);
            return Err(e);
        }
        if self.datapath.lends_memory() {
            // The producer may free its copy now. Sent before the tensor can be loaded, so it
            // reaches the producer before this request's Loaded.
            if let Err(e) = conn.send_frame(
                &Frame::PutReply {
                    seq,
                    status: PutStatus::Stored,
                },
                "kv p2p put reply",
            ) {
                unreserve(n);
                return Err(e);
            }
        }
        let mut r = lock(&self.recv);
        if let Some((old, _, _)) = r
            .tensors
            .insert(tensor_id, (t, conn.peer.clone(), Instant::now()))
        {
            r.bytes -= old.nbytes();
        }
        self.recv_cv.notify_all();
        Ok(())
    }

    fn on_get(&self, conn: &Conn<D>, seq: u64, tensor_id: &str) -> Result<()> {
        let lends = self.datapath.lends_memory();
        let o = {
            let mut st = lock(&self.send);
            let o = st.store.remove(tensor_id);
            if let Some(o) = &o {
                if !lends {
                    st.bytes -= o.tensor.nbytes();
                }
                if let Some(r) = st.reqs.get_mut(&o.request_id) {
                    r.pending = r.pending.saturating_sub(1);
                }
                self.send_cv.notify_all();
            }
            o
        };
        let header = o.as_ref().map(|o| TensorHeader {
            dtype: o.tensor.dtype(),
            shape: o.tensor.shape().to_vec(),
        });
        let mut w = lock(&conn.writer);
        let r = write_frame(&mut *w, &Frame::GetReply { seq, header }).and_then(|_| match &o {
            Some(o) => conn
                .link
                .send(&mut w, &o.tensor, Instant::now() + self.cfg.timeout),
            None => Ok(()),
        });
        drop(w);
        match (&r, o) {
            (Err(e), Some(o)) => {
                if lends {
                    lock(&self.send).bytes -= o.tensor.nbytes();
                }
                self.fail_request(&o.request_id, &e.duplicate().for_request(&o.request_id));
            }
            // The consumer reads this memory: kept (and counted) until its GetDone.
            (Ok(()), Some(o)) if lends => {
                lock(&self.send).lent.insert((conn.peer.clone(), seq), o);
            }
            _ => {}
        }
        r
    }

    /// Producer: sends one tensor now (PUT): offer, wait for the answer, then the data.
    fn put_now(self: &Arc<Self>, o: &Outgoing<D::Buffer>) -> Result<()> {
        let op = format!("kv p2p put {}", o.tensor_id);
        let conn = self.get_conn(&o.peer)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        conn.expect(seq);
        // The writer stays locked from the offer to the data, so nothing interleaves.
        let mut w = lock(&conn.writer);
        let frame = Frame::Put {
            seq,
            tensor_id: o.tensor_id.clone(),
            header: TensorHeader {
                dtype: o.tensor.dtype(),
                shape: o.tensor.shape().to_vec(),
            },
        };
        if let Err(e) = write_frame(&mut *w, &frame) {
            drop(w);
            conn.lose(&e.to_string());
            return Err(conn.peer_lost(&op));
        }
        // The consumer may wait for room before answering: allow it its own timeout too.
        let deadline = Instant::now() + self.cfg.timeout * 2;
        match conn.wait_reply(seq, deadline, &op)? {
            Reply::Put(PutStatus::Ready) => {}
            Reply::Put(PutStatus::Refused(why)) => {
                return Err(Error::Capacity(format!(
                    "{op}: the consumer refused: {why}"
                )))
            }
            Reply::Put(PutStatus::Stored) => {
                return Err(Error::Protocol(format!("{op}: stored before the data")))
            }
            Reply::Get(_) => return Err(Error::Protocol(format!("{op}: GET reply to a PUT"))),
        }
        // The consumer reads this memory on a lending path: keep (and count) it until its
        // Stored. Registered before the data goes out, so the Stored cannot come first; the
        // next tensor goes out meanwhile.
        let lends = self.datapath.lends_memory();
        if lends {
            let mut st = lock(&self.send);
            st.bytes += o.tensor.nbytes();
            st.lent.insert(
                (conn.peer.clone(), seq),
                Outgoing {
                    request_id: o.request_id.clone(),
                    tensor_id: o.tensor_id.clone(),
                    tensor: o.tensor.clone(),
                    peer: o.peer.clone(),
                },
            );
        }
        let r = conn
            .link
            .send(&mut w, &o.tensor, Instant::now() + self.cfg.timeout);
        if r.is_err() && lends {
            self.release_lent(&conn.peer, seq);
        }
        drop(w);
        r.map_err(|e| {
            conn.lose(&e.to_string());
            conn.peer_lost(&op)
        })
    }

    fn send_tensor(
        self: &Arc<Self>,
        request_id: &str,
        tensor_id: &str,
        tensor: D::Buffer,
        peer: &str,
    ) -> Result<()> {
        if tensor_id.len() > MAX_TENSOR_ID {
            return Err(Error::invalid(format!(
                "tensor id of {} bytes",
                tensor_id.len()
            )));
        }
        let o = Outgoing {
            request_id: request_id.to_string(),
            tensor_id: tensor_id.to_string(),
            tensor,
            peer: peer.to_string(),
        };
        {
            let mut s = lock(&self.send);
            if let Some(why) = s.failed.get(request_id) {
                return Err(
                    Error::Protocol(format!("already failed: {why}")).for_request(request_id)
                );
            }
            s.reqs.entry(request_id.to_string()).or_insert(ProdReq {
                peer: peer.to_string(),
                pending: 0,
                saved: None,
            });
        }
        if self.cfg.send_type == SendType::Put {
            return self.put_now(&o).map_err(|e| {
                let e = e.for_request(request_id);
                self.fail_request(request_id, &e);
                e
            });
        }
        let n = o.tensor.nbytes();
        let cap = self.cfg.send_buffer_bytes;
        let fail = |e: Error| {
            let e = e.for_request(request_id);
            self.fail_request(request_id, &e);
            e
        };
        if n > cap {
            return Err(fail(Error::Capacity(format!(
                "{tensor_id}: {n} bytes exceed the send buffer of {cap} bytes"
            ))));
        }
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let mut s = lock(&self.send);
        while s.bytes + n > cap {
            let now = Instant::now();
            if now >= deadline || self.shutdown.load(Ordering::Acquire) {
                let detail = format!("send buffer full ({} of {cap} bytes)", s.bytes);
                drop(s);
                return Err(fail(Error::Timeout {
                    op: format!("kv p2p queue {tensor_id}"),
                    waited: start.elapsed(),
                    peer: Some(peer.to_string()),
                    detail,
                }));
            }
            s = self
                .send_cv
                .wait_timeout(s, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(why) = s.failed.get(request_id) {
            return Err(Error::Protocol(format!("already failed: {why}")).for_request(request_id));
        }
        s.bytes += n;
        if let Some(r) = s.reqs.get_mut(request_id) {
            r.pending += 1;
        }
        if self.cfg.send_type == SendType::PutAsync {
            s.queue.push_back(o);
        } else if let Some(old) = s.store.insert(tensor_id.to_string(), o) {
            s.bytes -= old.tensor.nbytes();
            if let Some(r) = s.reqs.get_mut(request_id) {
                r.pending -= 1;
            }
        }
        self.send_cv.notify_all();
        Ok(())
    }

    fn sender(self: Arc<Self>) {
        loop {
            let o = {
                let mut s = lock(&self.send);
                loop {
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(o) = s.queue.pop_front() {
                        s.in_flight = true;
                        break o;
                    }
                    s = self
                        .send_cv
                        .wait_timeout(s, POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            let r = self.put_now(&o);
            {
                let mut s = lock(&self.send);
                s.in_flight = false;
                s.bytes -= o.tensor.nbytes();
                if let Some(q) = s.reqs.get_mut(&o.request_id) {
                    q.pending = q.pending.saturating_sub(1);
                }
                self.send_cv.notify_all();
            }
            if let Err(e) = r {
                self.fail_request(&o.request_id, &e.for_request(&o.request_id));
            }
        }
    }

    /// Drops every queued or stored tensor of `request_id` (not the lent ones).
    fn drop_buffers(&self, s: &mut SendState<D::Buffer>, request_id: &str) {
        let mut freed = 0;
        s.queue.retain(|o| {
            let keep = o.request_id != request_id;
            if !keep {
                freed += o.tensor.nbytes();
            }
            keep
        });
        s.store.retain(|_, o| {
            let keep = o.request_id != request_id;
            if !keep {
                freed += o.tensor.nbytes();
            }
            keep
        });
        // Lent tensors stay: the receiver may be copying out of them right now, and memory
        // reused under it could be loaded as this request's. Its Stored / GetDone, or the
        // connection's loss, frees them.
        s.bytes -= freed;
    }

    fn fail_request(&self, request_id: &str, err: &Error) {
        let mut s = lock(&self.send);
        s.reqs.remove(request_id);
        self.drop_buffers(&mut s, request_id);
        if !s.done.contains(request_id) {
            s.failed
                .entry(request_id.to_string())
                .or_insert_with(|| err.to_string());
        }
        self.send_cv.notify_all();
        tracing::warn!(request = request_id, error = %err, "kv p2p: request failed, buffers freed");
    }

    /// True when `request_id` is being sent to `peer` (reports from others are ignored).
    fn tracks(&self, request_id: &str, peer: &str) -> bool {
        lock(&self.send)
            .reqs
            .get(request_id)
            .is_some_and(|r| r.peer == peer)
    }

    fn finish_request(&self, request_id: &str) {
        let mut s = lock(&self.send);
        s.reqs.remove(request_id);
        self.drop_buffers(&mut s, request_id);
        if !s.failed.contains_key(request_id) {
            s.done.insert(request_id.to_string());
        }
        self.send_cv.notify_all();
    }

    /// The receiver at `peer` has copied the lent tensor of `seq`: free it.
    fn release_lent(&self, peer: &str, seq: u64) {
        let mut st = lock(&self.send);
        if let Some(o) = st.lent.remove(&(peer.to_string(), seq)) {
            st.bytes -= o.tensor.nbytes();
            self.send_cv.notify_all();
        }
    }

    fn on_conn_lost(&self, peer: &str, reason: &str) {
        {
            let mut s = lock(&self.send);
            let mut freed = 0;
            s.lent.retain(|(p, _), o| {
                let keep = p != peer;
                if !keep {
                    freed += o.tensor.nbytes();
                }
                keep
            });
            s.bytes -= freed;
        }
        let ids: Vec<String> = lock(&self.send)
            .reqs
            .iter()
            .filter(|(_, r)| r.peer == peer)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let e = Error::PeerLost {
                peer: peer.to_string(),
                op: "kv p2p transfer".into(),
                detail: reason.to_string(),
            };
            self.fail_request(&id, &e.for_request(&id));
        }
    }
}
