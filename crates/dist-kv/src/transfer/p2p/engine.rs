//! The P2P engine (vLLM's `P2pNcclEngine`): one listening socket per worker, connections to and
//! from peer instances, the producer's bounded send buffer, the consumer's bounded receive
//! buffer. This file is the socket shell: its bookkeeping (requests, bytes, lending, which
//! connection a request belongs to, deadlines) is the [`Ledger`], and which connections it keeps
//! is the [`Admission`] table, both without I/O and unit-tested on their own.
//!
//! Threads: `kv-p2p-listen` accepts connections; each connection has a thread that does its
//! handshake and then reads the peer's frames (a PUT waits there for room in the receive
//! buffer, which is the consumer's back-pressure: the producer's PUT is answered only when the
//! tensor fits); in PUT_ASYNC mode `kv-p2p-send` drains the send queue. Callers' threads write
//! frames under the connection's writer lock and wait for replies with a deadline.
//!
//! The listener is built for hostile peers:
//! * with a shared secret, a peer proves it holds it before anything else is read from it or
//!   sent to it ([`super::auth`]), and this engine proves it back;
//! * a handshake must finish within [`HANDSHAKE_TIMEOUT`] and at most
//!   [`MAX_HANDSHAKING`](super::admission::MAX_HANDSHAKING) run at once (the oldest gives way);
//!   open connections are capped (`max_connections`, the least recently active idle one gives
//!   way) and closed after `idle_timeout` idle;
//! * a control frame must arrive whole within [`FRAME_TIMEOUT`] of its first byte, and is capped
//!   at [`MAX_FRAME_BYTES`] (before the handshake, [`MAX_HELLO_BYTES`]);
//! * replies go back on the connection the request came over, never to an address a peer
//!   claims, and a request's `Loaded`, `Stored` and `GetDone` count only on its connection;
//! * memory: the receive buffer (reservations included) is one budget across connections, and
//!   a reservation whose data stalls gives way when another peer's PUT needs the room;
//! * what a peer can trigger in the log is rate-limited.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dist_core::Tensor;
use serde::{Deserialize, Serialize};

use super::admission::{Admission, MAX_HANDSHAKING};
use super::auth::{self, Secret, NONCE_BYTES};
use super::datapath::{DataLink, DataPath, TcpDataPath};
use super::ledger::{ConnId, Hold, Ledger, Limits, Offer, Outgoing, Take};
use super::wire::{
    cut, encode_frame, read_frame, write_encoded, write_frame, Frame, FrameRead, PutStatus,
    TensorHeader, MAX_FRAME_BYTES, MAX_HELLO_BYTES, MAX_REASON, MAX_TENSOR_ID, PROTOCOL_VERSION,
};
use crate::ratelog::{warn_limited, RateLimit};
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
    /// Cap on bytes received and not yet loaded, and reserved for data arriving, across every
    /// connection.
    pub recv_buffer_bytes: usize,
    /// Deadline of every wait (connect, reply, buffer room, a tensor's arrival).
    pub timeout: Duration,
    /// How long a producer waits, after handing over a request's last layer, for the consumer
    /// to report it loaded before failing it and freeing its buffers.
    pub done_timeout: Duration,
    /// Most connections accepted from peers kept open at once (their handshake done). When a
    /// new one completes its handshake with all of them open, the least recently active idle
    /// one is closed; when none is idle, the new one is refused.
    pub max_connections: usize,
    /// A connection with nothing in flight for this long is closed; its peer reconnects when it
    /// needs it again.
    pub idle_timeout: Duration,
    /// The shared secret peers must prove they hold (and this engine proves back). `None`: the
    /// job's, from the file `DIST_KV_P2P_TOKEN_FILE` or else `DIST_STORE_TOKEN_FILE` names, if
    /// any; without one, peers are not authenticated. Never serialised.
    #[serde(skip)]
    pub secret: Option<Secret>,
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
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
            secret: None,
        }
    }
}

/// Socket read timeout: how often idle readers look at the shutdown flag and their idle time.
const POLL: Duration = Duration::from_millis(100);
/// Longest a handshake may take from the connection's accept (or the engine's timeout, if
/// shorter).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a control frame may take from its first byte to its last (or the engine's timeout,
/// if shorter).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Refused, evicted and failed handshakes.
static LOG_CONNS: RateLimit = RateLimit::new(5, Duration::from_secs(10));
/// Refused PUTs and closed stalled ones.
static LOG_PUTS: RateLimit = RateLimit::new(5, Duration::from_secs(10));
/// Lost connections.
static LOG_LOST: RateLimit = RateLimit::new(5, Duration::from_secs(10));
/// Failed requests and dropped tensors.
static LOG_REQUESTS: RateLimit = RateLimit::new(10, Duration::from_secs(10));

#[derive(Debug)]
enum Reply<B> {
    Put(PutStatus),
    Get(Option<B>),
}

/// One connection, dialed by this engine or accepted from a peer.
#[derive(Debug)]
struct Conn<D: DataPath> {
    id: ConnId,
    /// The address dialed, or the one the peer gave in its `Hello` (a name for messages and
    /// for an `Abort` of a request not bound yet; never where replies go).
    peer: String,
    writer: Mutex<TcpStream>,
    /// Shuts the socket down without waiting for the writer.
    killer: TcpStream,
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
    fn new(id: ConnId, peer: &str, s: &TcpStream, link: D::Link) -> Result<Self> {
        let clone = || {
            s.try_clone()
                .map_err(|e| Error::io("clone kv p2p socket", e))
        };
        Ok(Conn {
            id,
            peer: peer.to_string(),
            writer: Mutex::new(clone()?),
            killer: clone()?,
            link,
            replies: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            lost: Mutex::new(None),
        })
    }

    fn alive(&self) -> bool {
        lock(&self.lost).is_none()
    }

    fn lost_reason(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    fn lose(&self, reason: &str) {
        let mut l = lock(&self.lost);
        if l.is_none() {
            *l = Some(reason.to_string());
        }
        drop(l);
        drop(lock(&self.replies));
        self.cv.notify_all();
        let _ = self.killer.shutdown(Shutdown::Both);
    }

    fn peer_lost(&self, op: &str) -> Error {
        Error::PeerLost {
            peer: self.peer.clone(),
            op: op.to_string(),
            detail: self.lost_reason().unwrap_or_default(),
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

    fn expects(&self, seq: u64) -> bool {
        lock(&self.replies).contains_key(&seq)
    }

    fn awaiting(&self) -> bool {
        !lock(&self.replies).is_empty()
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
                drop(m);
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

/// The engine's connections.
#[derive(Debug)]
struct Table<D: DataPath> {
    by_id: HashMap<ConnId, Arc<Conn<D>>>,
    /// Connections this engine dialed, by the address dialed.
    dialed: HashMap<String, ConnId>,
    /// Accepted connections still in their handshake (to close one evicted).
    handshaking: HashMap<ConnId, TcpStream>,
}

#[derive(Debug)]
struct Inner<D: DataPath> {
    cfg: EngineConfig,
    addr: String,
    datapath: D,
    secret: Option<Secret>,
    book: Mutex<Ledger<D::Buffer>>,
    /// Signalled whenever the ledger changes.
    cv: Condvar,
    admission: Mutex<Admission>,
    table: Mutex<Table<D>>,
    shutdown: AtomicBool,
    seq: AtomicU64,
    next_conn: AtomicU64,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

/// Connections an engine holds, by state ([`P2pEngine::connections`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnectionCounts {
    /// Accepted, handshake not done.
    pub handshaking: usize,
    /// Accepted, handshake done.
    pub open: usize,
    /// Dialed by this engine.
    pub dialed: usize,
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
        if cfg.send_buffer_bytes == 0
            || cfg.recv_buffer_bytes == 0
            || cfg.timeout.is_zero()
            || cfg.max_connections == 0
            || cfg.idle_timeout.is_zero()
        {
            return Err(Error::invalid(format!(
                "p2p engine: buffer sizes, timeouts and max_connections must be positive ({cfg:?})"
            )));
        }
        let secret = match &cfg.secret {
            Some(s) => Some(s.clone()),
            None => Secret::from_env()?,
        };
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
            .map_err(|e| Error::io(format!("bind kv p2p listener {}:{}", cfg.host, cfg.port), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("kv p2p listener address", e))?
            .port();
        let addr = format!("{}:{port}", cfg.host);
        let limits = Limits {
            send_cap: cfg.send_buffer_bytes,
            recv_cap: cfg.recv_buffer_bytes,
            done_timeout: cfg.done_timeout,
            lends: datapath.lends_memory(),
        };
        let inner = Arc::new(Inner {
            admission: Mutex::new(Admission::new(cfg.max_connections, MAX_HANDSHAKING)),
            cfg,
            addr,
            datapath,
            secret,
            book: Mutex::new(Ledger::new(limits)),
            cv: Condvar::new(),
            table: Mutex::new(Table {
                by_id: HashMap::new(),
                dialed: HashMap::new(),
                handshaking: HashMap::new(),
            }),
            shutdown: AtomicBool::new(false),
            seq: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
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
        tracing::info!(addr = %inner.addr, send_type = ?inner.cfg.send_type,
            authenticated = inner.secret.is_some(), "kv p2p engine listening");
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

    /// True when peers must prove they hold a shared secret.
    pub fn authenticates(&self) -> bool {
        self.inner.secret.is_some()
    }

    /// The connections held now.
    pub fn connections(&self) -> ConnectionCounts {
        let (handshaking, open, dialed) = lock(&self.inner.admission).counts();
        ConnectionCounts {
            handshaking,
            open,
            dialed,
        }
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
        lock(&self.inner.book).mark_saved(request_id, Instant::now());
    }

    /// Producer, PUT_ASYNC: waits until the send queue is empty (vLLM's `wait_for_sent`).
    pub fn wait_for_sent(&self) -> Result<()> {
        let i = &self.inner;
        let start = Instant::now();
        let deadline = start + i.cfg.timeout;
        let mut b = lock(&i.book);
        while !b.queue_drained() {
            let now = Instant::now();
            if now >= deadline {
                let (n, peer) = b.queue_state();
                return Err(Error::Timeout {
                    op: "kv p2p wait_for_sent".into(),
                    waited: start.elapsed(),
                    peer,
                    detail: format!("{n} tensors, {} bytes queued", b.send_bytes()),
                });
            }
            b =
                i.cv.wait_timeout(b, (deadline - now).min(POLL))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
        Ok(())
    }

    /// Producer: requests the consumer has loaded (their buffers are freed) and requests that
    /// failed since the last call. Requests whose consumer did not report in time fail here;
    /// received tensors nobody took within `done_timeout` are dropped.
    pub fn take_finished(
        &self,
    ) -> (
        std::collections::BTreeSet<String>,
        std::collections::BTreeMap<String, String>,
    ) {
        let i = &self.inner;
        let (expired, fin) = {
            let mut b = lock(&i.book);
            let e = b.expire(Instant::now());
            (e, b.take_finished())
        };
        if !expired.failed.is_empty() || !expired.dropped.is_empty() {
            i.cv.notify_all();
        }
        for id in &expired.failed {
            warn_limited!(LOG_REQUESTS, request = %id,
                "kv p2p: the consumer did not report the request loaded in time; buffers freed");
        }
        for id in &expired.dropped {
            warn_limited!(LOG_REQUESTS, tensor = %id, "kv p2p: dropping a tensor nobody loaded");
        }
        fin
    }

    /// Producer: requests still tracked (sent or queued, not yet reported loaded).
    pub fn pending_requests(&self) -> usize {
        lock(&self.inner.book).pending_requests()
    }

    /// Bytes held in the send buffer (queued, stored, in flight or lent).
    pub fn send_buffer_bytes(&self) -> usize {
        lock(&self.inner.book).send_bytes()
    }

    /// Bytes held or reserved in the receive buffer.
    pub fn recv_buffer_bytes(&self) -> usize {
        lock(&self.inner.book).recv_bytes()
    }

    /// Producer: fails `request_id` (the worker gave up on it) and frees what it holds.
    pub fn fail_request(&self, request_id: &str, err: &Error) {
        self.inner.fail_request(request_id, err);
    }

    /// Consumer: the tensor `tensor_id`, waiting until it arrives (PUT modes) or asking `peer`
    /// for it (GET, retried while the producer does not hold it yet) until `deadline`. In PUT
    /// modes, once a tensor of the request came over a connection, that connection's loss ends
    /// the wait at once. Returns the tensor and the producer's address.
    pub fn recv_tensor(
        &self,
        tensor_id: &str,
        peer: Option<&str>,
        deadline: Instant,
    ) -> Result<(D::Buffer, String)> {
        let i = &self.inner;
        let op = format!("kv p2p recv {tensor_id}");
        if i.cfg.send_type == SendType::Get {
            let peer = peer.ok_or_else(|| {
                Error::invalid(format!("{op}: GET mode needs the producer's address"))
            })?;
            return i.fetch(tensor_id, peer, deadline, &op);
        }
        let start = Instant::now();
        let mut b = lock(&i.book);
        loop {
            match b.take(tensor_id) {
                Take::Ready { tensor, from } => {
                    i.cv.notify_all();
                    return Ok((tensor, from));
                }
                Take::Lost { from, reason } => {
                    return Err(Error::PeerLost {
                        peer: from,
                        op,
                        detail: reason,
                    })
                }
                Take::Pending => {}
            }
            if i.shutdown.load(Ordering::Acquire) {
                return Err(Error::Shutdown(op));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op,
                    waited: start.elapsed(),
                    peer: peer.map(str::to_string),
                    detail: format!(
                        "{} tensors, {} of {} bytes in the receive buffer",
                        b.held_count(),
                        b.recv_bytes(),
                        i.cfg.recv_buffer_bytes
                    ),
                });
            }
            b =
                i.cv.wait_timeout(b, (deadline - now).min(POLL))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }

    /// Consumer: tells the producer that every layer of `request_id` was loaded, on the
    /// connection its tensors came over (`peer`, the producer's address, names it in errors).
    pub fn notify_loaded(&self, request_id: &str, peer: &str) -> Result<()> {
        let i = &self.inner;
        let op = format!("kv p2p notify loaded {request_id}");
        let bound = lock(&i.book).loaded_here(request_id);
        let Some((id, _)) = bound else {
            return Err(Error::NotFound(format!(
                "{op}: no tensor of the request came from {peer}"
            )));
        };
        let conn = lock(&i.table).by_id.get(&id).cloned();
        match conn {
            Some(c) => c.send_frame(
                &Frame::Loaded {
                    request_id: request_id.to_string(),
                },
                &op,
            ),
            None => Err(Error::PeerLost {
                peer: peer.to_string(),
                op,
                detail: "the connection the request's tensors came over is closed".into(),
            }),
        }
    }

    /// Consumer: tells the producer at `peer` that `request_id` was given up (best effort), on
    /// the connection its tensors came over, or a connection to `peer` when none came.
    pub fn notify_abort(&self, request_id: &str, peer: &str, reason: &str) {
        let i = &self.inner;
        let bound = lock(&i.book).recv_conn(request_id);
        let conn = bound
            .and_then(|id| lock(&i.table).by_id.get(&id).cloned())
            .filter(|c| c.alive());
        let conn = match conn {
            Some(c) => c,
            None => match i.get_conn(peer) {
                Ok((c, _)) => c,
                Err(_) => return,
            },
        };
        let _ = conn.send_frame(
            &Frame::Abort {
                request_id: request_id.to_string(),
                reason: cut(reason, MAX_REASON),
            },
            "kv p2p abort",
        );
    }

    /// Consumer: drops every received tensor of `request_id`, freeing the receive buffer, and
    /// refuses its later ones.
    pub fn discard_request(&self, request_id: &str) {
        lock(&self.inner.book).discard(request_id);
        self.inner.cv.notify_all();
    }

    /// Stops the threads and closes every connection; waits for the threads.
    pub fn shutdown(&mut self) {
        let i = &self.inner;
        if i.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake the listener's accept.
        if let Some(a) = i.addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            let _ = TcpStream::connect_timeout(&a, Duration::from_secs(1));
        }
        let (conns, handshaking) = {
            let mut t = lock(&i.table);
            t.dialed.clear();
            (
                t.by_id.drain().map(|(_, c)| c).collect::<Vec<_>>(),
                t.handshaking.drain().map(|(_, s)| s).collect::<Vec<_>>(),
            )
        };
        for c in conns {
            c.lose("engine shut down");
        }
        for s in handshaking {
            let _ = s.shutdown(Shutdown::Both);
        }
        i.cv.notify_all();
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

/// How a PUT on one connection failed: `retry` when the connection was gone before the
/// consumer answered anything (it may have been closed as idle: a fresh one may work).
struct PutFailure {
    error: Error,
    retry: bool,
}

impl<D: DataPath> Inner<D> {
    fn handshake_timeout(&self) -> Duration {
        self.cfg.timeout.min(HANDSHAKE_TIMEOUT)
    }

    fn frame_timeout(&self) -> Duration {
        self.cfg.timeout.min(FRAME_TIMEOUT)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn listen(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.shutdown.load(Ordering::Acquire) {
                break;
            }
            let s = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, say: do not spin.
                    warn_limited!(LOG_CONNS, error = %e, "kv p2p: accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let evicted = lock(&self.admission).accept(id, Instant::now());
            {
                let mut t = lock(&self.table);
                if let Some(v) = evicted {
                    if let Some(vs) = t.handshaking.remove(&v) {
                        let _ = vs.shutdown(Shutdown::Both);
                    }
                    warn_limited!(
                        LOG_CONNS,
                        limit = MAX_HANDSHAKING,
                        "kv p2p: too many handshakes pending; closing the oldest"
                    );
                }
                if let Ok(c) = s.try_clone() {
                    t.handshaking.insert(id, c);
                }
            }
            let me = self.clone();
            match std::thread::Builder::new()
                .name("kv-p2p-conn".into())
                .spawn(move || me.accept(id, s))
            {
                Ok(h) => self.add_thread(h),
                Err(e) => {
                    lock(&self.admission).closed(id);
                    lock(&self.table).handshaking.remove(&id);
                    warn_limited!(LOG_CONNS, error = %e, "kv p2p: cannot spawn a connection thread");
                }
            }
        }
    }

    /// Keeps a connection thread's handle (for the join at shutdown), forgetting finished ones.
    fn add_thread(&self, h: JoinHandle<()>) {
        let mut r = lock(&self.readers);
        r.retain(|h| !h.is_finished());
        r.push(h);
    }

    fn prepare(&self, s: &TcpStream) -> Result<()> {
        s.set_nodelay(true)
            .and_then(|_| s.set_read_timeout(Some(POLL)))
            .and_then(|_| s.set_write_timeout(Some(self.cfg.timeout)))
            .map_err(|e| Error::io("configure kv p2p socket", e))
    }

    /// Reads one handshake frame (at most [`MAX_HELLO_BYTES`]) by `deadline`.
    fn read_handshake_frame(
        &self,
        s: &mut TcpStream,
        deadline: Instant,
        what: &str,
    ) -> Result<(Frame, Vec<u8>)> {
        let start = Instant::now();
        loop {
            match read_frame(s, deadline, MAX_HELLO_BYTES)? {
                FrameRead::Frame(f, body) => return Ok((f, body)),
                FrameRead::Closed => {
                    return Err(Error::Protocol(format!("closed before its {what}")))
                }
                FrameRead::Idle if self.shutdown.load(Ordering::Acquire) => {
                    return Err(Error::Shutdown("kv p2p handshake".into()))
                }
                FrameRead::Idle if Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        op: "kv p2p handshake".into(),
                        waited: start.elapsed(),
                        peer: s.peer_addr().ok().map(|a| a.to_string()),
                        detail: format!("no {what}"),
                    })
                }
                FrameRead::Idle => {}
            }
        }
    }

    /// The acceptor's side of the handshake: the peer's listening address and link set-up
    /// bytes, once it proved it holds the secret (when this engine has one).
    fn handshake(&self, s: &mut TcpStream) -> Result<(String, Vec<u8>)> {
        self.prepare(s)?;
        let deadline = Instant::now() + self.handshake_timeout();
        let from = s
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let (hello, body) = self.read_handshake_frame(s, deadline, "hello")?;
        let Frame::Hello {
            version,
            listen_addr,
            data_path,
            link_init,
            nonce,
            auth,
        } = hello
        else {
            return Err(Error::Protocol(format!(
                "{from}: expected a hello, got {}",
                hello.kind()
            )));
        };
        if version != PROTOCOL_VERSION || data_path != self.datapath.name() {
            return Err(Error::Protocol(format!(
                "peer {listen_addr} ({from}) speaks version {version} over {data_path:?}, \
                 this engine version {PROTOCOL_VERSION} over {:?}",
                self.datapath.name()
            )));
        }
        if nonce.len() != NONCE_BYTES {
            return Err(Error::Protocol(format!(
                "peer {listen_addr} ({from}): a nonce of {} bytes",
                nonce.len()
            )));
        }
        let mine = auth::nonce()?;
        let ack = |auth: bool, proof: Vec<u8>| Frame::HelloAck {
            version: PROTOCOL_VERSION,
            listen_addr: self.addr.clone(),
            data_path: self.datapath.name().into(),
            auth,
            nonce: mine.clone(),
            proof,
        };
        match (&self.secret, auth) {
            (Some(secret), true) => {
                write_frame(s, &ack(true, secret.acceptor_proof(&body, &mine)))?;
                let (f, _) = self.read_handshake_frame(s, deadline, "proof")?;
                let Frame::Auth { proof } = f else {
                    return Err(Error::Protocol(format!(
                        "peer {listen_addr} ({from}): expected its proof, got {}",
                        f.kind()
                    )));
                };
                if !secret.check_initiator(&body, &mine, &proof) {
                    return Err(Error::Auth(format!(
                        "peer {listen_addr} ({from}) does not hold this engine's secret"
                    )));
                }
            }
            (Some(_), false) => {
                write_frame(s, &ack(true, Vec::new()))?;
                return Err(Error::Auth(format!(
                    "peer {listen_addr} ({from}) has no shared secret; this engine requires one"
                )));
            }
            (None, true) => {
                write_frame(s, &ack(false, Vec::new()))?;
                return Err(Error::Auth(format!(
                    "peer {listen_addr} ({from}) holds a shared secret; this engine has none"
                )));
            }
            (None, false) => write_frame(s, &ack(false, Vec::new()))?,
        }
        Ok((listen_addr, link_init))
    }

    fn conn_busy(&self, c: &Conn<D>) -> bool {
        c.awaiting() || lock(&self.book).busy(c.id)
    }

    fn accept(self: Arc<Self>, id: ConnId, mut s: TcpStream) {
        let hs = self.handshake(&mut s);
        lock(&self.table).handshaking.remove(&id);
        let refuse = |e: &Error| {
            lock(&self.admission).closed(id);
            warn_limited!(LOG_CONNS, error = %e, "kv p2p: refused a connection");
        };
        let (listen_addr, link_init) = match hs {
            Ok(x) => x,
            Err(e) => return refuse(&e),
        };
        // Room among the open connections: the least recently active idle one gives way.
        let admitted = {
            let mut adm = lock(&self.admission);
            let book = lock(&self.book);
            let t = lock(&self.table);
            adm.opened(id, Instant::now(), |c| {
                book.busy(c) || t.by_id.get(&c).is_some_and(|c| c.awaiting())
            })
        };
        match admitted {
            Err(why) => {
                return refuse(&Error::Capacity(format!("peer {listen_addr}: {why}")));
            }
            Ok(Some(victim)) => {
                let v = lock(&self.table).by_id.get(&victim).cloned();
                if let Some(v) = v {
                    warn_limited!(LOG_CONNS, peer = %v.peer, max = self.cfg.max_connections,
                        "kv p2p: connections at their cap; closing the least recently active idle one");
                    v.lose("closed to make room for a new connection (it was idle)");
                }
            }
            Ok(None) => {}
        }
        let conn = self
            .datapath
            .open(&listen_addr, false, &link_init)
            .and_then(|link| Conn::new(id, &listen_addr, &s, link));
        let conn = match conn {
            Ok(c) => Arc::new(c),
            Err(e) => return refuse(&e),
        };
        lock(&self.table).by_id.insert(id, conn.clone());
        if self.shutdown.load(Ordering::Acquire) {
            conn.lose("engine shut down");
        }
        self.read_loop(conn, s);
    }

    /// A live connection this engine dialed to `peer`, or a new one; `true` when new.
    fn get_conn(self: &Arc<Self>, peer: &str) -> Result<(Arc<Conn<D>>, bool)> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(Error::Shutdown(format!("kv p2p connect to {peer}")));
        }
        {
            let t = lock(&self.table);
            if let Some(c) = t.dialed.get(peer).and_then(|id| t.by_id.get(id)) {
                if c.alive() {
                    return Ok((c.clone(), false));
                }
            }
        }
        self.dial(peer).map(|c| (c, true))
    }

    fn dial(self: &Arc<Self>, peer: &str) -> Result<Arc<Conn<D>>> {
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
        let hello = encode_frame(&Frame::Hello {
            version: PROTOCOL_VERSION,
            listen_addr: self.addr.clone(),
            data_path: self.datapath.name().into(),
            link_init: init.clone(),
            nonce: auth::nonce()?,
            auth: self.secret.is_some(),
        })?;
        let body = &hello[4..];
        write_encoded(&mut s, &hello).map_err(|e| lost(e.to_string()))?;
        let deadline = Instant::now() + self.handshake_timeout();
        let (ack, _) = self
            .read_handshake_frame(&mut s, deadline, "handshake reply")
            .map_err(|e| match e {
                e @ Error::Timeout { .. } => e,
                e => lost(e.to_string()),
            })?;
        let Frame::HelloAck {
            version,
            data_path,
            auth,
            nonce,
            proof,
            ..
        } = ack
        else {
            return Err(Error::Protocol(format!(
                "{op}: the handshake reply is a {}",
                ack.kind()
            )));
        };
        if version != PROTOCOL_VERSION || data_path != self.datapath.name() {
            return Err(Error::Protocol(format!(
                "{op}: the peer speaks version {version} over {data_path:?}, this engine \
                 version {PROTOCOL_VERSION} over {:?}",
                self.datapath.name()
            )));
        }
        match (&self.secret, auth) {
            (Some(secret), true) => {
                // The peer proves itself before it gets anything.
                if !secret.check_acceptor(body, &nonce, &proof) {
                    return Err(Error::Auth(format!(
                        "{op}: the peer does not hold this engine's secret"
                    )));
                }
                write_frame(
                    &mut s,
                    &Frame::Auth {
                        proof: secret.initiator_proof(body, &nonce),
                    },
                )
                .map_err(|e| lost(e.to_string()))?;
            }
            (Some(_), false) => {
                return Err(Error::Auth(format!(
                    "{op}: the peer has no shared secret and this engine talks to \
                     authenticated peers only"
                )))
            }
            (None, true) => {
                return Err(Error::Auth(format!(
                    "{op}: the peer requires a shared secret and this engine has none (set \
                     {} or the engine's secret)",
                    auth::SECRET_FILE_ENV
                )))
            }
            (None, false) => {}
        }
        let link = self.datapath.open(peer, true, &init)?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(id, peer, &s, link)?);
        lock(&self.admission).dialed(id, Instant::now());
        {
            let mut t = lock(&self.table);
            t.by_id.insert(id, conn.clone());
            t.dialed.insert(peer.to_string(), id);
        }
        let me = self.clone();
        let c = conn.clone();
        match std::thread::Builder::new()
            .name("kv-p2p-conn".into())
            .spawn(move || me.read_loop(c, s))
        {
            Ok(h) => self.add_thread(h),
            Err(e) => {
                conn.lose(&format!("spawn kv-p2p-conn: {e}"));
                let mut t = lock(&self.table);
                t.by_id.remove(&id);
                t.dialed.remove(peer);
                drop(t);
                lock(&self.admission).closed(id);
                return Err(Error::io("spawn kv-p2p-conn", e));
            }
        }
        Ok(conn)
    }

    fn read_loop(self: Arc<Self>, conn: Arc<Conn<D>>, mut s: TcpStream) {
        let id = conn.id;
        let reason = loop {
            if self.shutdown.load(Ordering::Acquire) {
                break "engine shut down".to_string();
            }
            let deadline = Instant::now() + self.frame_timeout();
            match read_frame(&mut s, deadline, MAX_FRAME_BYTES) {
                Ok(FrameRead::Frame(f, _)) => {
                    lock(&self.admission).begin_frame(id, Instant::now());
                    let r = self.handle(&conn, &mut s, f);
                    lock(&self.admission).end_frame(id, Instant::now());
                    if let Err(e) = r {
                        break e.to_string();
                    }
                }
                Ok(FrameRead::Closed) => break "connection closed by the peer".to_string(),
                Ok(FrameRead::Idle) => {
                    if !conn.alive() {
                        break String::new();
                    }
                    let idle = lock(&self.admission).idle_for(id, Instant::now());
                    if let Some(idle) = idle.filter(|&d| d >= self.cfg.idle_timeout) {
                        if !self.conn_busy(&conn) {
                            break format!("idle for {idle:.1?}");
                        }
                    }
                }
                Err(e) => break e.to_string(),
            }
        };
        conn.lose(&reason);
        // The first reason recorded (a connection closed by another thread says why).
        let reason = conn.lost_reason().unwrap_or(reason);
        {
            let mut t = lock(&self.table);
            t.by_id.remove(&id);
            if t.dialed.get(&conn.peer) == Some(&id) {
                t.dialed.remove(&conn.peer);
            }
        }
        lock(&self.admission).closed(id);
        if self.shutdown.load(Ordering::Acquire) {
            return;
        }
        let failed = lock(&self.book).conn_lost(id, &conn.peer, &reason);
        self.cv.notify_all();
        if reason.starts_with("idle for") && failed.is_empty() {
            tracing::debug!(peer = %conn.peer, %reason, "kv p2p: closed an idle connection");
        } else {
            warn_limited!(LOG_LOST, peer = %conn.peer, %reason, failed_requests = failed.len(),
                "kv p2p connection lost");
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
            }
            | Frame::GetDone { seq } => {
                if lock(&self.book).release_lent(conn.id, seq) {
                    self.cv.notify_all();
                }
                Ok(())
            }
            Frame::PutReply { seq, status } => {
                conn.deliver(seq, Reply::Put(status));
                Ok(())
            }
            Frame::Get { seq, tensor_id } => self.on_get(conn, seq, &tensor_id),
            Frame::GetReply { seq, header } => self.on_get_reply(conn, s, seq, header),
            Frame::Loaded { request_id } => {
                if lock(&self.book).loaded(conn.id, &request_id) {
                    self.cv.notify_all();
                } else {
                    tracing::debug!(request = %request_id, peer = %conn.peer,
                        "kv p2p: loaded report for a request not sent over that connection");
                }
                Ok(())
            }
            Frame::Abort { request_id, reason } => {
                if lock(&self.book).aborted(conn.id, &conn.peer, &request_id, &reason) {
                    self.cv.notify_all();
                    warn_limited!(LOG_REQUESTS, request = %request_id, peer = %conn.peer,
                        %reason, "kv p2p: the consumer aborted a request; buffers freed");
                }
                Ok(())
            }
            other => Err(Error::Protocol(format!(
                "unexpected {} after the handshake",
                other.kind()
            ))),
        }
    }

    fn on_get_reply(
        &self,
        conn: &Conn<D>,
        s: &mut TcpStream,
        seq: u64,
        header: Option<TensorHeader>,
    ) -> Result<()> {
        // Data follows a header: a reply to a GET never sent cannot be skipped, only refused.
        if !conn.expects(seq) && seq >= self.seq.load(Ordering::Relaxed) {
            return Err(Error::Protocol(format!("a reply to GET {seq}, never sent")));
        }
        let t = match header {
            Some(h) => {
                let Some(_) = h.nbytes().filter(|&n| n <= self.cfg.recv_buffer_bytes) else {
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
            warn_limited!(LOG_PUTS, tensor = %cut(&tensor_id, 200), peer = %conn.peer,
                why = %cut(&why, 300), "kv p2p: refusing a PUT");
            conn.send_frame(
                &Frame::PutReply {
                    seq,
                    status: PutStatus::Refused(cut(&why, MAX_REASON)),
                },
                "kv p2p put reply",
            )
        };
        let Some(n) = header.nbytes() else {
            return refuse(format!(
                "{tensor_id}: {:?} {:?} overflows",
                header.dtype, header.shape
            ));
        };
        // Back-pressure: answer only when the tensor fits.
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let res = {
            let mut b = lock(&self.book);
            loop {
                let now = Instant::now();
                match b.offer(conn.id, &conn.peer, &tensor_id, n, now) {
                    Offer::Granted(r) => break r,
                    Offer::Refused(why) => {
                        drop(b);
                        return refuse(why);
                    }
                    Offer::Wait { preempt, .. } if !preempt.is_empty() => {
                        drop(b);
                        for (c, why) in preempt {
                            let victim = lock(&self.table).by_id.get(&c).cloned();
                            if let Some(v) = victim {
                                warn_limited!(LOG_PUTS, peer = %v.peer, %why,
                                    "kv p2p: closing a connection whose PUT stalled");
                                v.lose(&why);
                            }
                        }
                        b = lock(&self.book);
                    }
                    Offer::Wait { recheck, .. } => {
                        if self.shutdown.load(Ordering::Acquire) || now >= deadline {
                            // Others may have been waiting behind it.
                            b.withdraw(conn.id);
                            self.cv.notify_all();
                            let why = format!(
                                "{tensor_id}: receive buffer full ({} of {cap} bytes) for {:?}",
                                b.recv_bytes(),
                                start.elapsed()
                            );
                            drop(b);
                            return refuse(why);
                        }
                        let mut wait = (deadline - now).min(POLL);
                        if let Some(r) = recheck {
                            wait = wait.min(
                                r.saturating_duration_since(now)
                                    .max(Duration::from_millis(1)),
                            );
                        }
                        b = self
                            .cv
                            .wait_timeout(b, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        };
        let abandon = || {
            lock(&self.book).abandon(res.id);
            self.cv.notify_all();
        };
        // The buffer first (device memory can run out): a failed allocation refuses the PUT.
        let mut t = match self.datapath.alloc(header.dtype, &header.shape) {
            Ok(t) => t,
            Err(e) => {
                abandon();
                return refuse(format!(
                    "{tensor_id}: cannot allocate the receive buffer: {e}"
                ));
            }
        };
        let ready = Frame::PutReply {
            seq,
            status: PutStatus::Ready,
        };
        let r = conn
            .send_frame(&ready, "kv p2p put reply")
            .and_then(|()| {
                conn.link
                    .recv_counted(s, &mut t, Instant::now() + self.cfg.timeout, &res.progress)
            })
            .and_then(|()| {
                // The producer may free its copy now. Sent before the tensor can be loaded, so
                // it reaches the producer before this request's Loaded.
                if self.datapath.lends_memory() {
                    let stored = Frame::PutReply {
                        seq,
                        status: PutStatus::Stored,
                    };
                    conn.send_frame(&stored, "kv p2p put reply")
                } else {
                    Ok(())
                }
            });
        if let Err(e) = r {
            abandon();
            return Err(e);
        }
        lock(&self.book).arrived(res.id, t, Instant::now());
        self.cv.notify_all();
        Ok(())
    }

    fn on_get(&self, conn: &Conn<D>, seq: u64, tensor_id: &str) -> Result<()> {
        let o = lock(&self.book).take_stored(tensor_id, conn.id);
        if o.is_some() {
            self.cv.notify_all();
        }
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
                lock(&self.book).fetch_failed(&o);
                self.fail_request(&o.request_id, &e.duplicate().for_request(&o.request_id));
            }
            // The consumer reads this memory: kept (and counted) until its GetDone.
            (Ok(()), Some(o)) if self.datapath.lends_memory() => {
                lock(&self.book).lend_fetched(conn.id, seq, o);
            }
            _ => {}
        }
        r
    }

    /// Consumer, GET: asks `peer` for `tensor_id` until it has it or `deadline` passes.
    fn fetch(
        self: &Arc<Self>,
        tensor_id: &str,
        peer: &str,
        deadline: Instant,
        op: &str,
    ) -> Result<(D::Buffer, String)> {
        let start = Instant::now();
        let request = request_of(tensor_id);
        let mut backoff = Duration::from_millis(1);
        let mut retried = false;
        loop {
            let (conn, fresh) = self.get_conn(peer)?;
            // A reused connection found closed (as idle) is retried once on a fresh one,
            // unless the request's tensors came over it (then the request is lost).
            let retry = |e: &Error, retried: bool| {
                !fresh
                    && !retried
                    && matches!(e, Error::PeerLost { .. })
                    && lock(&self.book).recv_conn(request) != Some(conn.id)
            };
            let seq = self.next_seq();
            conn.expect(seq);
            lock(&self.admission).touch(conn.id, Instant::now());
            let get = Frame::Get {
                seq,
                tensor_id: tensor_id.to_string(),
            };
            let r = conn
                .send_frame(&get, op)
                .and_then(|()| conn.wait_reply(seq, deadline, op));
            match r {
                Ok(Reply::Get(Some(t))) => {
                    lock(&self.book).bind_recv(request, conn.id, peer, Instant::now());
                    return Ok((t, peer.to_string()));
                }
                Ok(Reply::Get(None)) => {}
                Ok(Reply::Put(_)) => {
                    return Err(Error::Protocol(format!("{op}: PUT reply to a GET")))
                }
                Err(e) if retry(&e, retried) => {
                    retried = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: op.to_string(),
                    waited: start.elapsed(),
                    peer: Some(peer.to_string()),
                    detail: "the producer does not hold the tensor".into(),
                });
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// Producer: sends one tensor now (PUT): offer, wait for the answer, then the data. A
    /// reused connection that turns out closed before the consumer answered is retried once on
    /// a fresh one.
    fn put_now(self: &Arc<Self>, o: &Outgoing<D::Buffer>) -> Result<()> {
        let op = format!("kv p2p put {}", o.tensor_id);
        let mut retried = false;
        loop {
            let (conn, fresh) = self.get_conn(&o.peer)?;
            match self.put_on(&conn, o, &op) {
                Ok(()) => return Ok(()),
                Err(f) if f.retry && !fresh && !retried => {
                    tracing::debug!(peer = %o.peer, error = %f.error,
                        "kv p2p: connection closed before the PUT was answered; retrying on a new one");
                    retried = true;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    fn put_on(&self, conn: &Conn<D>, o: &Outgoing<D::Buffer>, op: &str) -> Result<(), PutFailure> {
        let fail = |error: Error, retry: bool| PutFailure { error, retry };
        let seq = self.next_seq();
        conn.expect(seq);
        lock(&self.admission).touch(conn.id, Instant::now());
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
            lock(&conn.replies).remove(&seq);
            return Err(fail(conn.peer_lost(op), true));
        }
        // The consumer may wait for room before answering: allow it its own timeout too.
        let deadline = Instant::now() + self.cfg.timeout * 2;
        match conn.wait_reply(seq, deadline, op) {
            Ok(Reply::Put(PutStatus::Ready)) => {}
            Ok(Reply::Put(PutStatus::Refused(why))) => {
                return Err(fail(
                    Error::Capacity(format!("{op}: the consumer refused: {why}")),
                    false,
                ))
            }
            Ok(Reply::Put(PutStatus::Stored)) => {
                return Err(fail(
                    Error::Protocol(format!("{op}: stored before the data")),
                    false,
                ))
            }
            Ok(Reply::Get(_)) => {
                return Err(fail(
                    Error::Protocol(format!("{op}: GET reply to a PUT")),
                    false,
                ))
            }
            Err(e @ Error::PeerLost { .. }) => return Err(fail(e, true)),
            Err(e) => return Err(fail(e, false)),
        }
        // The request belongs to this connection from now on: only its Loaded counts.
        let lends = self.datapath.lends_memory();
        {
            let mut b = lock(&self.book);
            b.bind_send(&o.request_id, conn.id);
            // The consumer reads this memory on a lending path: keep (and count) it until its
            // Stored. Registered before the data goes out, so the Stored cannot come first.
            if lends {
                b.lend_sent(
                    conn.id,
                    seq,
                    Outgoing {
                        request_id: o.request_id.clone(),
                        tensor_id: o.tensor_id.clone(),
                        tensor: o.tensor.clone(),
                        peer: o.peer.clone(),
                    },
                );
            }
        }
        let r = conn
            .link
            .send(&mut w, &o.tensor, Instant::now() + self.cfg.timeout);
        drop(w);
        if let Err(e) = r {
            if lends {
                lock(&self.book).release_lent(conn.id, seq);
                self.cv.notify_all();
            }
            conn.lose(&e.to_string());
            return Err(fail(conn.peer_lost(op), false));
        }
        Ok(())
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
        let mut o = Outgoing {
            request_id: request_id.to_string(),
            tensor_id: tensor_id.to_string(),
            tensor,
            peer: peer.to_string(),
        };
        let already =
            |why: String| Error::Protocol(format!("already failed: {why}")).for_request(request_id);
        lock(&self.book).begin(request_id, peer).map_err(already)?;
        let fail = |e: Error| {
            let e = e.for_request(request_id);
            self.fail_request(request_id, &e);
            e
        };
        if self.cfg.send_type == SendType::Put {
            return self.put_now(&o).map_err(fail);
        }
        let queue = self.cfg.send_type == SendType::PutAsync;
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let mut b = lock(&self.book);
        loop {
            match b.hold(o, queue) {
                Hold::Held => {
                    self.cv.notify_all();
                    return Ok(());
                }
                Hold::TooLarge { bytes, cap } => {
                    drop(b);
                    return Err(fail(Error::Capacity(format!(
                        "{tensor_id}: {bytes} bytes exceed the send buffer of {cap} bytes"
                    ))));
                }
                Hold::Failed(why) => return Err(already(why)),
                Hold::Full(back) => o = back,
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.load(Ordering::Acquire) {
                let detail = format!(
                    "send buffer full ({} of {} bytes)",
                    b.send_bytes(),
                    self.cfg.send_buffer_bytes
                );
                drop(b);
                return Err(fail(Error::Timeout {
                    op: format!("kv p2p queue {tensor_id}"),
                    waited: start.elapsed(),
                    peer: Some(peer.to_string()),
                    detail,
                }));
            }
            b = self
                .cv
                .wait_timeout(b, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn sender(self: Arc<Self>) {
        loop {
            let o = {
                let mut b = lock(&self.book);
                loop {
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(o) = b.next_to_send() {
                        break o;
                    }
                    b = self
                        .cv
                        .wait_timeout(b, POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            let r = self.put_now(&o);
            lock(&self.book).sent(&o);
            self.cv.notify_all();
            if let Err(e) = r {
                self.fail_request(&o.request_id, &e.for_request(&o.request_id));
            }
        }
    }

    fn fail_request(&self, request_id: &str, err: &Error) {
        lock(&self.book).fail(request_id, &err.to_string());
        self.cv.notify_all();
        warn_limited!(LOG_REQUESTS, request = request_id, error = %err,
            "kv p2p: request failed, buffers freed");
    }
}
