//! The store server: a few threads, each a `mio` event loop over its share of the
//! connections, every connection non-blocking.
//!
//! The keys, queues and waiters live in one `Core` behind a mutex held only while a request
//! executes (no I/O under it). Loop 0 accepts and deals connections round-robin to the loops.
//! A write that completes another loop's waiter leaves that waiter's reply in the owner's
//! inbox (under the core lock, so a later `CANCEL_WAIT` finds it there) and wakes the owner.
//! Each connection keeps a read buffer (never more than one request plus
//! one read beyond what it has sent us, and never more than [`Limits::max_request_bytes`]) and
//! a write buffer; a connection whose unread replies pass [`ServerOptions::max_pending_output`]
//! is not read from until it drains, so a client that never reads cannot grow our memory.
//! A connection that sends a malformed frame, breaks the handshake or stays silent past
//! [`ServerOptions::handshake_timeout`] before validating is dropped with a `warn!` line; the
//! others never notice. Each event handles at most [`READ_BUDGET`] bytes of one connection
//! before moving on, so one busy client cannot starve the rest.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::proto::{
    decode_request, put_blob, put_i64, CheckResponse, Decoded, Limits, Request, WaitResponse,
    FEATURE_WAIT_GET, VALIDATION_MAGIC,
};
use crate::{Error, Result};

/// Bytes read from one connection per event before the loop serves others.
pub const READ_BUDGET: usize = 1 << 20;
const SCRATCH: usize = 256 * 1024;
const WAKER: Token = Token(usize::MAX);
const FIRST_CONN: usize = 64;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Host or address to bind (`127.0.0.1` by default: loopback unless told otherwise).
    /// `0.0.0.0` binds every IPv4 interface, `::` every interface (dual-stack), a name binds
    /// each address it resolves to.
    pub host: String,
    /// Port; 0 picks a free one (read it back with [`StoreServer::port`]).
    pub port: u16,
    /// Shared secret: when set, a connection must send `AUTH` with it right after `VALIDATE`.
    pub token: Option<Vec<u8>>,
    /// Caps on keys, values, keys per request and request size.
    pub limits: Limits,
    /// Most live connections; more are accepted and closed at once.
    pub max_connections: usize,
    /// A connection that has not completed the handshake within this is dropped.
    pub handshake_timeout: Duration,
    /// Unread reply bytes at which a connection stops being read from.
    pub max_pending_output: usize,
    /// Serve our extensions (`HELLO`, `WAIT_GET`). `false` behaves as PyTorch's server does
    /// on them (closes the connection), which tests the clients' fallback.
    pub extensions: bool,
    /// Event-loop threads (at least 1). The default is the machine's parallelism, at most 4.
    pub threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 0,
            token: None,
            limits: Limits::default(),
            max_connections: 65_536,
            handshake_timeout: Duration::from_secs(30),
            max_pending_output: 64 << 20,
            extensions: true,
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
        }
    }
}

/// A running server; dropping it stops the loop and joins its thread.
#[derive(Debug)]
pub struct StoreServer {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl StoreServer {
    /// Binds and starts the loops on background threads named `dist-store-N`.
    pub fn start(opts: ServerOptions) -> Result<Self> {
        crate::sys::raise_nofile_limit();
        let listeners = bind_all(&opts.host, opts.port)?;
        let mut addrs = Vec::new();
        for l in &listeners {
            addrs.push(
                l.local_addr()
                    .map_err(|e| Error::io("store server: local_addr", e))?,
            );
        }
        let n = opts.threads.max(1);
        let mut polls = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..n {
            let poll = Poll::new().map_err(|e| Error::io("store server: create poll", e))?;
            let waker = Waker::new(poll.registry(), WAKER)
                .map_err(|e| Error::io("store server: create waker", e))?;
            inboxes.push(Inbox {
                msgs: Mutex::new(Vec::new()),
                waker,
            });
            polls.push(poll);
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::default()),
            opts,
            stop: AtomicBool::new(false),
            inboxes,
            live: AtomicUsize::new(0),
        });
        let mut loops = Vec::new();
        let mut listeners = Some(listeners);
        for (id, poll) in polls.into_iter().enumerate() {
            let ls = if id == 0 {
                listeners.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            loops.push(EventLoop::new(id, poll, ls, shared.clone())?);
        }
        let mut threads = Vec::new();
        for mut lp in loops {
            let t = std::thread::Builder::new()
                .name(format!("dist-store-{}", lp.id))
                .spawn(move || lp.run())
                .map_err(|e| Error::io("store server: spawn thread", e))?;
            threads.push(t);
        }
        info!(addrs = ?addrs, threads = n, "store server listening");
        Ok(StoreServer {
            addrs,
            shared,
            threads,
        })
    }

    /// The first bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every bound address.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addrs[0].port()
    }

    /// Stops the loop, closes every connection and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Connections open now (accepted and not yet closed).
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// True while every loop thread runs.
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| !t.is_finished())
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for i in &self.shared.inboxes {
            let _ = i.waker.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn bind_all(host: &str, port: u16) -> Result<Vec<TcpListener>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("store server: resolve {host}"), e))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::invalid(format!(
            "store server: {host} resolves to no address"
        )));
    }
    let mut out: Vec<TcpListener> = Vec::new();
    let mut first_err = None;
    let mut port = port;
    for a in addrs {
        let mut a = a;
        a.set_port(port);
        match bind_one(a) {
            Ok(l) => {
                if port == 0 {
                    port = l.local_addr().map(|x| x.port()).unwrap_or(0);
                }
                out.push(l);
            }
            Err(e) => {
                if out.is_empty() {
                    first_err.get_or_insert(Error::io(format!("store server: bind {a}"), e));
                } else {
                    debug!(%a, error = %e, "store server: extra address not bound");
                }
            }
        }
    }
    if out.is_empty() {
        return Err(first_err.unwrap_or_else(|| Error::invalid("store server: nothing bound")));
    }
    Ok(out)
}

fn bind_one(a: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if a.is_ipv6() && a.ip().is_unspecified() {
        // `::` serves IPv4 too.
        let _ = s.set_only_v6(false);
    }
    s.set_nonblocking(true)?;
    s.bind(&a.into())?;
    s.listen(4096)?;
    Ok(TcpListener::from_std(s.into()))
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Nothing received: the first request must be `VALIDATE`.
    New,
    /// Validated; a token is configured and `AUTH` must come next.
    NeedAuth,
    /// Serving.
    Ready,
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    phase: Phase,
    rbuf: Vec<u8>,
    /// Do not decode before `rbuf` holds this many bytes.
    need: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The id of this connection's pending `WAIT`/`WAIT_GET`, if any (state in `Core::waits`).
    wait: Option<u64>,
    close_after_flush: bool,
    /// WRITABLE interest is registered only while replies are stuck in `wbuf`.
    want_writable: bool,
    /// An event said the peer closed its side (or the socket failed): read to the EOF even
    /// after a short read, since edge-triggered readiness reports data and FIN only once.
    read_closed: bool,
}

impl Conn {
    fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

/// A pending wait, owned by connection `slot` (generation `gen`) of loop `owner`.
struct WaitState {
    owner: usize,
    slot: usize,
    gen: u64,
    remaining: usize,
    /// The missing keys it is registered under.
    keys: Vec<Vec<u8>>,
    /// For `WAIT_GET`: the keys whose values follow `STOP_WAITING`, in request order.
    then_get: Option<Vec<Vec<u8>>>,
}

/// A completed wait's reply, for the loop that owns the connection.
struct Done {
    owner: usize,
    slot: usize,
    gen: u64,
    wait: u64,
    bytes: Vec<u8>,
}

/// The keys, queues and waiters, shared by the loops.
#[derive(Default)]
struct Core {
    kv: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    /// Key -> ids of the waits registered on it.
    waiters: HashMap<Vec<u8>, Vec<u64>>,
    waits: HashMap<u64, WaitState>,
    next_wait: u64,
}

impl Core {
    fn present(&self, k: &[u8]) -> bool {
        self.kv.contains_key(k) || self.queues.get(k).is_some_and(|q| !q.is_empty())
    }

    fn unregister(&mut self, id: u64, keys: &[Vec<u8>], except: Option<&[u8]>) {
        for k in keys {
            if Some(k.as_slice()) == except {
                continue;
            }
            if let Some(v) = self.waiters.get_mut(k) {
                v.retain(|x| *x != id);
                if v.is_empty() {
                    self.waiters.remove(k);
                }
            }
        }
    }

    /// Counts `key` as arrived for its waiters (only the first live one with `only_one`);
    /// completed waits are removed and their replies pushed to `out`.
    fn wake_key(&mut self, key: &[u8], only_one: bool, out: &mut Vec<Done>) {
        let Some(mut ids) = self.waiters.remove(key) else {
            return;
        };
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            let Some(ws) = self.waits.get_mut(&id) else {
                ids.swap_remove(i);
                continue;
            };
            ws.remaining -= 1;
            if ws.remaining == 0 {
                let ws = self.waits.remove(&id).expect("present");
                self.unregister(id, &ws.keys, Some(key));
                let mut bytes = vec![WaitResponse::StopWaiting as u8];
                if let Some(keys) = &ws.then_get {
                    put_values(&mut bytes, &self.kv, keys);
                }
                out.push(Done {
                    owner: ws.owner,
                    slot: ws.slot,
                    gen: ws.gen,
                    wait: id,
                    bytes,
                });
            }
            if only_one {
                ids.remove(i);
                if !ids.is_empty() {
                    self.waiters.insert(key.to_vec(), ids);
                }
                return;
            }
            i += 1;
        }
    }
}

enum Msg {
    /// A connection dealt to this loop by loop 0.
    Conn(TcpStream, SocketAddr),
    /// A wait of one of this loop's connections completed on another loop.
    Done(Done),
}

struct Inbox {
    msgs: Mutex<Vec<Msg>>,
    waker: Waker,
}

struct Shared {
    core: Mutex<Core>,
    opts: ServerOptions,
    stop: AtomicBool,
    inboxes: Vec<Inbox>,
    live: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("loops", &self.inboxes.len())
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Hands replies of completed waits to their loops; call with the core lock held, so a
    /// `CANCEL_WAIT` that finds its wait gone also finds the reply in the inbox.
    fn post(&self, me: usize, done: &mut Vec<Done>, local: &mut Vec<Done>) {
        for d in done.drain(..) {
            if d.owner == me {
                local.push(d);
            } else {
                let inbox = &self.inboxes[d.owner];
                let was_empty = {
                    let mut m = lock(&inbox.msgs);
                    let e = m.is_empty();
                    m.push(Msg::Done(d));
                    e
                };
                if was_empty {
                    let _ = inbox.waker.wake();
                }
            }
        }
    }
}

struct EventLoop {
    id: usize,
    poll: Poll,
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    conns: Vec<Option<Conn>>,
    gens: Vec<u64>,
    free: Vec<usize>,
    /// Connections with replies appended by another connection's request.
    dirty: Vec<usize>,
    /// Connections with more input to process (their read budget ran out).
    again: VecDeque<(usize, u64)>,
    handshakes: VecDeque<(Instant, usize, u64)>,
    scratch: Vec<u8>,
    accept_retry: bool,
    next_loop: usize,
    refused: u64,
    last_refusal_log: Option<Instant>,
    /// Scratch lists for wait completions.
    done: Vec<Done>,
    local: Vec<Done>,
}

enum Flow {
    Continue,
    Close(String),
}

impl EventLoop {
    fn new(
        id: usize,
        poll: Poll,
        mut listeners: Vec<TcpListener>,
        shared: Arc<Shared>,
    ) -> Result<Self> {
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Token(i), Interest::READABLE)
                .map_err(|e| Error::io("store server: register listener", e))?;
        }
        Ok(EventLoop {
            id,
            poll,
            listeners,
            shared,
            conns: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            again: VecDeque::new(),
            handshakes: VecDeque::new(),
            scratch: vec![0; SCRATCH],
            accept_retry: false,
            next_loop: 0,
            refused: 0,
            last_refusal_log: None,
            done: Vec::new(),
            local: Vec::new(),
        })
    }

    fn opts(&self) -> &ServerOptions {
        &self.shared.opts
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = if !self.again.is_empty() {
                Some(Duration::ZERO)
            } else if self.accept_retry {
                Some(Duration::from_millis(50))
            } else {
                self.handshakes
                    .front()
                    .map(|(t, _, _)| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "store server: poll failed; stopping");
                break;
            }
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    self.drain_inbox();
                } else if t.0 < self.listeners.len() {
                    self.accept(t.0);
                } else if t.0 >= FIRST_CONN {
                    let slot = t.0 - FIRST_CONN;
                    if ev.is_read_closed() || ev.is_error() {
                        if let Some(Some(c)) = self.conns.get_mut(slot) {
                            c.read_closed = true;
                        }
                    }
                    self.handle(slot);
                }
            }
            if self.accept_retry {
                self.accept_retry = false;
                for i in 0..self.listeners.len() {
                    self.accept(i);
                }
            }
            let n = self.again.len();
            for _ in 0..n {
                if let Some((slot, gen)) = self.again.pop_front() {
                    if self.gens.get(slot) == Some(&gen) && self.conns[slot].is_some() {
                        self.handle(slot);
                    }
                }
            }
            self.flush_dirty();
            self.expire_handshakes();
        }
        let slots: Vec<usize> = (0..self.conns.len())
            .filter(|s| self.conns[*s].is_some())
            .collect();
        let n = slots.len();
        for s in slots {
            self.close(s, String::new());
        }
        info!(
            thread = self.id,
            connections = n,
            "store server loop stopped"
        );
    }

    /// Takes this loop's messages: new connections and completed waits.
    fn drain_inbox(&mut self) {
        let msgs = std::mem::take(&mut *lock(&self.shared.inboxes[self.id].msgs));
        for m in msgs {
            match m {
                Msg::Conn(stream, peer) => self.add_conn(stream, peer),
                Msg::Done(d) => self.apply_done(d),
            }
        }
    }

    fn apply_done(&mut self, d: Done) {
        if self.gens.get(d.slot) != Some(&d.gen) {
            return;
        }
        if let Some(c) = self.conns[d.slot].as_mut() {
            if c.wait == Some(d.wait) {
                c.wait = None;
                c.wbuf.extend_from_slice(&d.bytes);
                self.dirty.push(d.slot);
            }
        }
    }

    fn accept(&mut self, li: usize) {
        let n = self.shared.inboxes.len();
        loop {
            match self.listeners[li].accept() {
                Ok((stream, peer)) => {
                    let max = self.opts().max_connections;
                    if self.shared.live.load(Ordering::Relaxed) >= max {
                        self.refused += 1;
                        let now = Instant::now();
                        if self
                            .last_refusal_log
                            .map_or(true, |t| now.duration_since(t) > Duration::from_secs(1))
                        {
                            warn!(
                                %peer,
                                refused = self.refused,
                                max,
                                "store server: connection limit reached; closing new connections"
                            );
                            self.last_refusal_log = Some(now);
                        }
                        drop(stream);
                        continue;
                    }
                    self.shared.live.fetch_add(1, Ordering::Relaxed);
                    let to = self.next_loop % n;
                    self.next_loop = self.next_loop.wrapping_add(1);
                    if to == self.id {
                        self.add_conn(stream, peer);
                    } else {
                        let inbox = &self.shared.inboxes[to];
                        lock(&inbox.msgs).push(Msg::Conn(stream, peer));
                        let _ = inbox.waker.wake();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the pending connections stay in the backlog; retry soon.
                    warn!(error = %e, "store server: accept failed; retrying in 50 ms");
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    /// Takes a connection already counted in `live`.
    fn add_conn(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                self.conns.len() - 1
            }
        };
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, Token(FIRST_CONN + slot), Interest::READABLE)
        {
            warn!(%peer, error = %e, "store server: cannot register connection");
            self.free.push(slot);
            self.shared.live.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.gens[slot] += 1;
        self.conns[slot] = Some(Conn {
            stream,
            peer,
            phase: Phase::New,
            rbuf: Vec::new(),
            need: 1,
            wbuf: Vec::new(),
            wpos: 0,
            wait: None,
            close_after_flush: false,
            want_writable: false,
            read_closed: false,
        });
        let deadline = Instant::now() + self.opts().handshake_timeout;
        self.handshakes.push_back((deadline, slot, self.gens[slot]));
        debug!(%peer, slot, thread = self.id, "store server: connection accepted");
    }

    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        while let Some(&(t, slot, gen)) = self.handshakes.front() {
            if t > now {
                break;
            }
            self.handshakes.pop_front();
            if self.gens[slot] == gen
                && self.conns[slot]
                    .as_ref()
                    .is_some_and(|c| c.phase != Phase::Ready)
            {
                self.close(slot, "handshake not completed in time".into());
            }
        }
    }

    fn close(&mut self, slot: usize, reason: String) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        if reason.is_empty() {
            debug!(peer = %c.peer, "store server: connection closed");
        } else {
            warn!(peer = %c.peer, "store server: dropping connection: {reason}");
        }
        if let Some(id) = c.wait.take() {
            let mut core = lock(&self.shared.core);
            if let Some(ws) = core.waits.remove(&id) {
                core.unregister(id, &ws.keys, None);
            }
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.gens[slot] += 1;
        self.free.push(slot);
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Serves one connection: writes what is pending, runs complete requests, reads more.
    fn handle(&mut self, slot: usize) {
        if self.conns.get(slot).map_or(true, |c| c.is_none()) {
            return;
        }
        let mut budget = READ_BUDGET;
        let mut scratch = std::mem::take(&mut self.scratch);
        let flow = self.handle_inner(slot, &mut budget, &mut scratch);
        self.scratch = scratch;
        match flow {
            Flow::Continue => {
                if budget == 0 {
                    self.again.push_back((slot, self.gens[slot]));
                }
            }
            Flow::Close(reason) => self.close(slot, reason),
        }
    }

    fn handle_inner(&mut self, slot: usize, budget: &mut usize, scratch: &mut [u8]) -> Flow {
        let max_out = self.opts().max_pending_output;
        let max_req = self.opts().limits.max_request_bytes;
        // A read shorter than asked for emptied the socket: the next bytes will raise a new
        // readiness edge, so there is no need for a read that only says WouldBlock — unless the
        // peer's FIN came with those bytes (one edge for both): then read on to the EOF.
        let mut drained = false;
        loop {
            if let Flow::Close(r) = self.flush(slot) {
                return Flow::Close(r);
            }
            let Some(c) = self.conns[slot].as_mut() else {
                return Flow::Continue;
            };
            if c.close_after_flush {
                return if c.pending_out() == 0 {
                    Flow::Close("authentication failed".into())
                } else {
                    Flow::Continue
                };
            }
            if c.pending_out() >= max_out || *budget == 0 {
                return Flow::Continue;
            }
            // Process what is buffered before reading more.
            if let Flow::Close(r) = self.process_buffered(slot) {
                return Flow::Close(r);
            }
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.pending_out() >= max_out {
                continue;
            }
            if drained {
                return self.flush(slot);
            }
            let want = scratch.len().min(*budget);
            match c.stream.read(&mut scratch[..want]) {
                Ok(0) => return Flow::Close(String::new()),
                Ok(n) => {
                    drained = n < want && !c.read_closed;
                    *budget -= n.min(*budget);
                    if c.rbuf.len() + n > max_req + SCRATCH {
                        return Flow::Close("request larger than the request limit".into());
                    }
                    c.rbuf.extend_from_slice(&scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.flush(slot);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Flow::Close(format!("read error: {e}")),
            }
        }
    }

    fn process_buffered(&mut self, slot: usize) -> Flow {
        let max_out = self.opts().max_pending_output;
        let mut consumed = 0;
        let flow = loop {
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.close_after_flush || c.pending_out() >= max_out {
                break Flow::Continue;
            }
            let avail = c.rbuf.len() - consumed;
            if avail < c.need.max(1) {
                break Flow::Continue;
            }
            match decode_request(&c.rbuf[consumed..], &self.shared.opts.limits) {
                Ok(Decoded::NeedMore { min_len }) => {
                    c.need = min_len;
                    break Flow::Continue;
                }
                Ok(Decoded::Complete(req, used)) => {
                    consumed += used;
                    c.need = 1;
                    if let Flow::Close(r) = self.exec(slot, req) {
                        break Flow::Close(r);
                    }
                }
                Err(e) => break Flow::Close(format!("malformed request: {e}")),
            }
        };
        if let Some(c) = self.conns[slot].as_mut() {
            if consumed > 0 {
                c.rbuf.drain(..consumed);
                if c.rbuf.capacity() > 4 * SCRATCH && c.rbuf.len() < SCRATCH {
                    c.rbuf.shrink_to(SCRATCH);
                }
            }
        }
        flow
    }

    fn flush(&mut self, slot: usize) -> Flow {
        let Some(c) = self.conns[slot].as_mut() else {
            return Flow::Continue;
        };
        while c.wpos < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return Flow::Close("peer stopped accepting data".into()),
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !c.want_writable {
                        c.want_writable = true;
                        let t = Token(FIRST_CONN + slot);
                        if let Err(e) = self.poll.registry().reregister(
                            &mut c.stream,
                            t,
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            return Flow::Close(format!("reregister: {e}"));
                        }
                    }
                    return Flow::Continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Flow::Close(format!("write error: {e}")),
            }
        }
        if c.want_writable {
            c.want_writable = false;
            let t = Token(FIRST_CONN + slot);
            if let Err(e) = self
                .poll
                .registry()
                .reregister(&mut c.stream, t, Interest::READABLE)
            {
                return Flow::Close(format!("reregister: {e}"));
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        if c.wbuf.capacity() > 4 * SCRATCH {
            c.wbuf.shrink_to(SCRATCH);
        }
        Flow::Continue
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for slot in dirty {
            if self.conns[slot].is_some() {
                if let Flow::Close(r) = self.flush(slot) {
                    self.close(slot, r);
                }
            }
        }
    }

    fn conn(&mut self, slot: usize) -> &mut Conn {
        self.conns[slot].as_mut().expect("live connection")
    }

    /// Runs one request of connection `slot`.
    fn exec(&mut self, slot: usize, req: Request) -> Flow {
        let phase = self.conn(slot).phase;
        match (phase, &req) {
            (Phase::New, Request::Validate { magic }) => {
                if *magic != VALIDATION_MAGIC {
                    return Flow::Close(format!("bad validation magic {magic:#x}"));
                }
                let auth = self.opts().token.is_some();
                self.conn(slot).phase = if auth { Phase::NeedAuth } else { Phase::Ready };
                return Flow::Continue;
            }
            (Phase::New, r) => {
                return Flow::Close(format!(
                    "first request must be VALIDATE, got {:?}",
                    r.query_type()
                ))
            }
            (Phase::NeedAuth, Request::Auth { token }) => {
                let ok = self
                    .opts()
                    .token
                    .as_deref()
                    .is_some_and(|t| crate::auth::ct_eq(t, token));
                let c = self.conn(slot);
                if ok {
                    c.phase = Phase::Ready;
                    c.wbuf.push(0);
                } else {
                    c.wbuf.push(1);
                    c.close_after_flush = true;
                }
                return Flow::Continue;
            }
            (Phase::NeedAuth, r) => {
                return Flow::Close(format!(
                    "authentication required before {:?}",
                    r.query_type()
                ))
            }
            (Phase::Ready, Request::Hello { .. } | Request::WaitGet { .. })
                if !self.opts().extensions =>
            {
                return Flow::Close(format!("unknown query type {:?}", req.query_type()))
            }
            (Phase::Ready, _) => {}
        }
        // Requests that need no shared state.
        match &req {
            Request::Validate { .. } => return Flow::Continue,
            Request::Auth { token } => {
                let ok = match &self.opts().token {
                    Some(t) => crate::auth::ct_eq(t, token),
                    None => true,
                };
                self.conn(slot).wbuf.push(if ok { 0 } else { 1 });
                return Flow::Continue;
            }
            Request::Ping { nonce } => {
                let n = *nonce;
                self.conn(slot).wbuf.extend_from_slice(&n.to_le_bytes());
                return Flow::Continue;
            }
            Request::Hello { .. } => {
                self.conn(slot)
                    .wbuf
                    .extend_from_slice(&FEATURE_WAIT_GET.to_le_bytes());
                return Flow::Continue;
            }
            Request::CancelWait => return self.cancel_wait(slot),
            _ => {}
        }
        let shared = self.shared.clone();
        let mut core = lock(&shared.core);
        let mut done = std::mem::take(&mut self.done);
        let flow = self.exec_core(slot, req, &mut core, &mut done);
        let mut local = std::mem::take(&mut self.local);
        shared.post(self.id, &mut done, &mut local);
        drop(core);
        for d in local.drain(..) {
            self.apply_done(d);
        }
        self.done = done;
        self.local = local;
        flow
    }

    fn cancel_wait(&mut self, slot: usize) -> Flow {
        if let Some(id) = self.conn(slot).wait {
            let gone = {
                let mut core = lock(&self.shared.core);
                match core.waits.remove(&id) {
                    Some(ws) => {
                        core.unregister(id, &ws.keys, None);
                        false
                    }
                    None => true,
                }
            };
            if gone {
                // Completed on another loop: its reply is in our inbox; deliver it first.
                self.drain_inbox();
            }
            self.conn(slot).wait = None;
        }
        self.conn(slot).wbuf.push(WaitResponse::WaitCanceled as u8);
        Flow::Continue
    }

    /// Requests that touch the keys, queues or waiters (the core lock is held).
    fn exec_core(
        &mut self,
        slot: usize,
        req: Request,
        core: &mut Core,
        done: &mut Vec<Done>,
    ) -> Flow {
        let id = self.id;
        let gen = self.gens[slot];
        let c = self.conns[slot].as_mut().expect("live connection");
        match req {
            Request::Set { key, value } => {
                if core.waiters.contains_key(&key) {
                    core.kv.insert(key.clone(), value);
                    core.wake_key(&key, false, done);
                } else {
                    core.kv.insert(key, value);
                }
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let out = match core.kv.get_mut(&key) {
                    None if expected.is_empty() => {
                        core.kv.insert(key.clone(), desired.clone());
                        core.wake_key(&key, false, done);
                        desired
                    }
                    // PyTorch's documented oddity: a missing key with a non-empty `expected`
                    // answers `expected` and stores nothing.
                    None => expected,
                    Some(cur) => {
                        if *cur == expected {
                            *cur = desired;
                        }
                        cur.clone()
                    }
                };
                put_blob(&mut c.wbuf, &out);
            }
            Request::Get { key } => {
                put_blob(&mut c.wbuf, core.kv.get(&key).map_or(&[][..], |v| v));
            }
            Request::Add { key, delta } => {
                let cur = match core.kv.get(&key) {
                    None => 0,
                    Some(v) => match parse_i64(v) {
                        Some(n) => n,
                        None => {
                            return Flow::Close(format!(
                                "ADD on key {:?} whose value is not a decimal integer",
                                String::from_utf8_lossy(&key)
                            ))
                        }
                    },
                };
                let Some(n) = cur.checked_add(delta) else {
                    return Flow::Close(format!(
                        "ADD overflows i64 on key {:?}",
                        String::from_utf8_lossy(&key)
                    ));
                };
                core.kv.insert(key.clone(), n.to_string().into_bytes());
                put_i64(&mut c.wbuf, n);
                core.wake_key(&key, false, done);
            }
            Request::Check { keys } => {
                let ready = keys.iter().all(|k| core.present(k));
                let b = if ready {
                    CheckResponse::Ready
                } else {
                    CheckResponse::NotReady
                };
                c.wbuf.push(b as u8);
            }
            Request::Wait { keys } => return start_wait(core, c, (id, slot, gen), keys, false),
            Request::WaitGet { keys } => return start_wait(core, c, (id, slot, gen), keys, true),
            Request::GetNumKeys => put_i64(&mut c.wbuf, core.kv.len() as i64),
            Request::DeleteKey { key } => {
                put_i64(&mut c.wbuf, core.kv.remove(&key).is_some() as i64)
            }
            Request::Append { key, value } => {
                core.kv
                    .entry(key.clone())
                    .or_default()
                    .extend_from_slice(&value);
                core.wake_key(&key, false, done);
            }
            Request::MultiGet { keys } => put_values(&mut c.wbuf, &core.kv, &keys),
            Request::MultiSet { pairs } => {
                for (k, v) in pairs {
                    core.kv.insert(k.clone(), v);
                    core.wake_key(&k, false, done);
                }
            }
            Request::QueuePush { key, value } => {
                core.queues.entry(key.clone()).or_default().push_back(value);
                core.wake_key(&key, true, done);
            }
            Request::QueuePop { key } => {
                let q = core.queues.get_mut(&key);
                let len = q.as_ref().map_or(0, |q| q.len());
                let item = q.and_then(|q| q.pop_front());
                if core.queues.get(&key).is_some_and(|q| q.is_empty()) {
                    core.queues.remove(&key);
                }
                put_i64(&mut c.wbuf, len as i64);
                if let Some(it) = item {
                    put_blob(&mut c.wbuf, &it);
                }
            }
            Request::QueueLen { key } => {
                let n = core.queues.get(&key).map_or(0, |q| q.len()) as i64;
                put_i64(&mut c.wbuf, n);
            }
            Request::Validate { .. }
            | Request::Auth { .. }
            | Request::Ping { .. }
            | Request::Hello { .. }
            | Request::CancelWait => {}
        }
        Flow::Continue
    }
}

/// `WAIT` (and `WAIT_GET` with `get`): answers at once when every key exists, otherwise
/// registers a wait under each missing key. `who` is (loop, slot, generation).
fn start_wait(
    core: &mut Core,
    c: &mut Conn,
    who: (usize, usize, u64),
    keys: Vec<Vec<u8>>,
    get: bool,
) -> Flow {
    if c.wait.is_some() {
        return Flow::Close("WAIT while another WAIT is pending".into());
    }
    let mut missing: Vec<Vec<u8>> = keys.iter().filter(|k| !core.present(k)).cloned().collect();
    if missing.is_empty() {
        c.wbuf.push(WaitResponse::StopWaiting as u8);
        if get {
            put_values(&mut c.wbuf, &core.kv, &keys);
        }
        return Flow::Continue;
    }
    core.next_wait += 1;
    let id = core.next_wait;
    missing.sort_unstable();
    missing.dedup();
    for k in &missing {
        match core.waiters.get_mut(k) {
            Some(v) => v.push(id),
            None => {
                core.waiters.insert(k.clone(), vec![id]);
            }
        }
    }
    core.waits.insert(
        id,
        WaitState {
            owner: who.0,
            slot: who.1,
            gen: who.2,
            remaining: missing.len(),
            keys: missing,
            then_get: get.then_some(keys),
        },
    );
    c.wait = Some(id);
    Flow::Continue
}

/// Appends one value per key (empty for a missing key), as `MULTI_GET` answers.
fn put_values(out: &mut Vec<u8>, kv: &HashMap<Vec<u8>, Vec<u8>>, keys: &[Vec<u8>]) {
    for k in keys {
        put_blob(out, kv.get(k).map_or(&[][..], |v| v.as_slice()));
    }
}

/// Parses the decimal text `ADD` keeps (leading whitespace and a sign allowed, as `stoll`).
fn parse_i64(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.trim_start().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_accepts_what_add_writes() {
        assert_eq!(parse_i64(b"42"), Some(42));
        assert_eq!(parse_i64(b" -7"), Some(-7));
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"x1"), None);
    }

    #[test]
    fn binds_loopback_by_default_and_stops() {
        let s = StoreServer::start(ServerOptions::default()).unwrap();
        assert!(s.local_addr().ip().is_loopback());
        assert_ne!(s.port(), 0);
        assert!(s.is_running());
        s.shutdown();
    }
}
