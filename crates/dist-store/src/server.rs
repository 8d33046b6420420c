//! The store server: one thread, one `mio` event loop, every connection non-blocking.
//!
//! State lives in [`Core`] (keys, queues, waiters) and is touched only by the loop thread, so
//! there are no locks. Each connection keeps a read buffer (never more than one request plus
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
        }
    }
}

/// A running server; dropping it stops the loop and joins its thread.
#[derive(Debug)]
pub struct StoreServer {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Binds and starts the loop on a background thread named `dist-store`.
    pub fn start(opts: ServerOptions) -> Result<Self> {
        crate::sys::raise_nofile_limit();
        let poll = Poll::new().map_err(|e| Error::io("store server: create poll", e))?;
        let listeners = bind_all(&opts.host, opts.port)?;
        let mut addrs = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            addrs.push(
                l.local_addr()
                    .map_err(|e| Error::io("store server: local_addr", e))?,
            );
            let _ = i;
        }
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| Error::io("store server: create waker", e))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut lp = EventLoop::new(poll, listeners, opts, stop.clone())?;
        info!(addrs = ?addrs, "store server listening");
        let thread = std::thread::Builder::new()
            .name("dist-store".into())
            .spawn(move || lp.run())
            .map_err(|e| Error::io("store server: spawn thread", e))?;
        Ok(StoreServer {
            addrs,
            stop,
            waker,
            thread: Some(thread),
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

    /// True while the loop thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
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

struct Waiting {
    id: u64,
    remaining: usize,
    keys: Vec<Vec<u8>>,
    /// For `WAIT_GET`: the keys whose values follow `STOP_WAITING`, in request order.
    then_get: Option<Vec<Vec<u8>>>,
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
    wait: Option<Waiting>,
    close_after_flush: bool,
    /// WRITABLE interest is registered only while replies are stuck in `wbuf`.
    want_writable: bool,
}

impl Conn {
    fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

/// Waiter registration: connection slot, its generation, the wait's id.
type Reg = (usize, u64, u64);

/// The keys, queues and waiters.
#[derive(Default)]
struct Core {
    kv: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    waiters: HashMap<Vec<u8>, Vec<Reg>>,
    next_wait: u64,
}

impl Core {
    fn present(&self, k: &[u8]) -> bool {
        self.kv.contains_key(k) || self.queues.get(k).is_some_and(|q| !q.is_empty())
    }
}

struct EventLoop {
    poll: Poll,
    listeners: Vec<TcpListener>,
    opts: ServerOptions,
    stop: Arc<AtomicBool>,
    conns: Vec<Option<Conn>>,
    gens: Vec<u64>,
    free: Vec<usize>,
    live: usize,
    core: Core,
    /// Connections with replies appended by another connection's request.
    dirty: Vec<usize>,
    /// Connections with more input to process (their read budget ran out).
    again: VecDeque<(usize, u64)>,
    handshakes: VecDeque<(Instant, usize, u64)>,
    scratch: Vec<u8>,
    accept_retry: bool,
    refused: u64,
    last_refusal_log: Option<Instant>,
}

enum Flow {
    Continue,
    Close(String),
}

impl EventLoop {
    fn new(
        poll: Poll,
        mut listeners: Vec<TcpListener>,
        opts: ServerOptions,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Token(i), Interest::READABLE)
                .map_err(|e| Error::io("store server: register listener", e))?;
        }
        Ok(EventLoop {
            poll,
            listeners,
            opts,
            stop,
            conns: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            live: 0,
            core: Core::default(),
            dirty: Vec::new(),
            again: VecDeque::new(),
            handshakes: VecDeque::new(),
            scratch: vec![0; SCRATCH],
            accept_retry: false,
            refused: 0,
            last_refusal_log: None,
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.stop.load(Ordering::SeqCst) {
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
                    continue;
                }
                if t.0 < self.listeners.len() {
                    self.accept(t.0);
                } else if t.0 >= FIRST_CONN {
                    let slot = t.0 - FIRST_CONN;
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
        let live = self.live;
        self.conns.clear();
        info!(connections = live, "store server stopped");
    }

    fn accept(&mut self, li: usize) {
        loop {
            match self.listeners[li].accept() {
                Ok((stream, peer)) => {
                    if self.live >= self.opts.max_connections {
                        self.refused += 1;
                        let now = Instant::now();
                        if self
                            .last_refusal_log
                            .map_or(true, |t| now.duration_since(t) > Duration::from_secs(1))
                        {
                            warn!(
                                %peer,
                                refused = self.refused,
                                max = self.opts.max_connections,
                                "store server: connection limit reached; closing new connections"
                            );
                            self.last_refusal_log = Some(now);
                        }
                        drop(stream);
                        continue;
                    }
                    self.add_conn(stream, peer);
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
        });
        self.live += 1;
        self.handshakes.push_back((
            Instant::now() + self.opts.handshake_timeout,
            slot,
            self.gens[slot],
        ));
        debug!(%peer, slot, "store server: connection accepted");
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
            debug!(peer = %c.peer, "store server: connection closed by peer");
        } else {
            warn!(peer = %c.peer, "store server: dropping connection: {reason}");
        }
        if let Some(w) = c.wait.take() {
            self.unregister_wait(slot, &w);
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.gens[slot] += 1;
        self.free.push(slot);
        self.live -= 1;
    }

    fn unregister_wait(&mut self, slot: usize, w: &Waiting) {
        for k in &w.keys {
            if let Some(v) = self.core.waiters.get_mut(k) {
                v.retain(|r| !(r.0 == slot && r.2 == w.id));
                if v.is_empty() {
                    self.core.waiters.remove(k);
                }
            }
        }
    }

    /// Serves one connection: writes what is pending, runs complete requests, reads more.
    fn handle(&mut self, slot: usize) {
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
        // A read shorter than asked for emptied the socket: the next bytes will raise a new
        // readiness edge, so there is no need for a read that only says WouldBlock.
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
            if c.pending_out() >= self.opts.max_pending_output || *budget == 0 {
                return Flow::Continue;
            }
            // Process what is buffered before reading more.
            if let Flow::Close(r) = self.process_buffered(slot) {
                return Flow::Close(r);
            }
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.pending_out() >= self.opts.max_pending_output {
                continue;
            }
            if drained {
                return self.flush(slot);
            }
            let want = scratch.len().min(*budget);
            match c.stream.read(&mut scratch[..want]) {
                Ok(0) => return Flow::Close(String::new()),
                Ok(n) => {
                    drained = n < want;
                    *budget -= n.min(*budget);
                    if c.rbuf.len() + n > self.opts.limits.max_request_bytes + SCRATCH {
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
        let mut consumed = 0;
        let flow = loop {
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.close_after_flush || c.pending_out() >= self.opts.max_pending_output {
                break Flow::Continue;
            }
            let avail = c.rbuf.len() - consumed;
            if avail < c.need.max(1) {
                break Flow::Continue;
            }
            match decode_request(&c.rbuf[consumed..], &self.opts.limits) {
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

    fn reply(&mut self, slot: usize, f: impl FnOnce(&mut Vec<u8>)) {
        if let Some(c) = self.conns[slot].as_mut() {
            f(&mut c.wbuf);
        }
    }

    fn wake_key(&mut self, key: &[u8], only_one: bool) {
        let Some(mut regs) = self.core.waiters.remove(key) else {
            return;
        };
        let mut i = 0;
        while i < regs.len() {
            let (slot, gen, id) = regs[i];
            let valid = self.gens.get(slot) == Some(&gen)
                && self.conns[slot]
                    .as_ref()
                    .and_then(|c| c.wait.as_ref())
                    .is_some_and(|w| w.id == id);
            if !valid {
                regs.swap_remove(i);
                continue;
            }
            let c = self.conns[slot].as_mut().expect("checked");
            let w = c.wait.as_mut().expect("checked");
            w.remaining -= 1;
            if w.remaining == 0 {
                let w = c.wait.take().expect("checked");
                c.wbuf.push(WaitResponse::StopWaiting as u8);
                if let Some(keys) = &w.then_get {
                    put_values(&mut c.wbuf, &self.core.kv, keys);
                }
                self.dirty.push(slot);
                // Drop its other registrations (keys that were already satisfied are gone).
                for k in &w.keys {
                    if k.as_slice() != key {
                        if let Some(v) = self.core.waiters.get_mut(k) {
                            v.retain(|r| !(r.0 == slot && r.2 == w.id));
                            if v.is_empty() {
                                self.core.waiters.remove(k);
                            }
                        }
                    }
                }
            }
            if only_one {
                regs.remove(i);
                if !regs.is_empty() {
                    self.core.waiters.insert(key.to_vec(), regs);
                }
                return;
            }
            i += 1;
        }
    }

    /// `WAIT` (and `WAIT_GET` with `then_get`): answers at once when every key exists,
    /// otherwise registers the connection as a waiter of each missing key.
    fn wait(&mut self, slot: usize, keys: Vec<Vec<u8>>, then_get: Option<Vec<Vec<u8>>>) -> Flow {
        if self.conns[slot].as_ref().expect("live").wait.is_some() {
            return Flow::Close("WAIT while another WAIT is pending".into());
        }
        let mut missing: Vec<Vec<u8>> =
            keys.into_iter().filter(|k| !self.core.present(k)).collect();
        if missing.is_empty() {
            let c = self.conns[slot].as_mut().expect("live");
            c.wbuf.push(WaitResponse::StopWaiting as u8);
            if let Some(keys) = &then_get {
                put_values(&mut c.wbuf, &self.core.kv, keys);
            }
            return Flow::Continue;
        }
        self.core.next_wait += 1;
        let id = self.core.next_wait;
        let gen = self.gens[slot];
        missing.sort_unstable();
        missing.dedup();
        for k in &missing {
            self.core
                .waiters
                .entry(k.clone())
                .or_default()
                .push((slot, gen, id));
        }
        let c = self.conns[slot].as_mut().expect("live");
        c.wait = Some(Waiting {
            id,
            remaining: missing.len(),
            keys: missing,
            then_get,
        });
        Flow::Continue
    }

    fn exec(&mut self, slot: usize, req: Request) -> Flow {
        let phase = self.conns[slot].as_ref().expect("live").phase;
        match (phase, &req) {
            (Phase::New, Request::Validate { magic }) => {
                if *magic != VALIDATION_MAGIC {
                    return Flow::Close(format!("bad validation magic {magic:#x}"));
                }
                let c = self.conns[slot].as_mut().expect("live");
                c.phase = if self.opts.token.is_some() {
                    Phase::NeedAuth
                } else {
                    Phase::Ready
                };
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
                    .opts
                    .token
                    .as_deref()
                    .is_some_and(|t| crate::auth::ct_eq(t, token));
                let c = self.conns[slot].as_mut().expect("live");
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
                if !self.opts.extensions =>
            {
                return Flow::Close(format!("unknown query type {:?}", req.query_type()))
            }
            (Phase::Ready, _) => {}
        }
        match req {
            Request::Validate { .. } => {}
            Request::Auth { token } => {
                let ok = match &self.opts.token {
                    Some(t) => crate::auth::ct_eq(t, &token),
                    None => true,
                };
                self.reply(slot, |w| w.push(if ok { 0 } else { 1 }));
            }
            Request::Ping { nonce } => {
                self.reply(slot, |w| w.extend_from_slice(&nonce.to_le_bytes()))
            }
            Request::Set { key, value } => {
                self.core.kv.insert(key.clone(), value);
                self.wake_key(&key, false);
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let out = match self.core.kv.get_mut(&key) {
                    None if expected.is_empty() => {
                        self.core.kv.insert(key.clone(), desired.clone());
                        self.wake_key(&key, false);
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
                self.reply(slot, |w| put_blob(w, &out));
            }
            Request::Get { key } => {
                let empty = Vec::new();
                let c = self.conns[slot].as_mut().expect("live");
                put_blob(&mut c.wbuf, self.core.kv.get(&key).unwrap_or(&empty));
            }
            Request::Add { key, delta } => {
                let cur = match self.core.kv.get(&key) {
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
                self.core.kv.insert(key.clone(), n.to_string().into_bytes());
                self.reply(slot, |w| put_i64(w, n));
                self.wake_key(&key, false);
            }
            Request::Check { keys } => {
                let ready = keys.iter().all(|k| self.core.present(k));
                let b = if ready {
                    CheckResponse::Ready
                } else {
                    CheckResponse::NotReady
                };
                self.reply(slot, |w| w.push(b as u8));
            }
            Request::Hello { .. } => self.reply(slot, |w| {
                w.extend_from_slice(&FEATURE_WAIT_GET.to_le_bytes())
            }),
            Request::Wait { keys } => return self.wait(slot, keys, None),
            Request::WaitGet { keys } => {
                let then = keys.clone();
                return self.wait(slot, keys, Some(then));
            }
            Request::CancelWait => {
                let w = self.conns[slot].as_mut().expect("live").wait.take();
                if let Some(w) = w {
                    self.unregister_wait(slot, &w);
                }
                self.reply(slot, |w| w.push(WaitResponse::WaitCanceled as u8));
            }
            Request::GetNumKeys => {
                let n = self.core.kv.len() as i64;
                self.reply(slot, |w| put_i64(w, n));
            }
            Request::DeleteKey { key } => {
                let n = self.core.kv.remove(&key).is_some() as i64;
                self.reply(slot, |w| put_i64(w, n));
            }
            Request::Append { key, value } => {
                self.core
                    .kv
                    .entry(key.clone())
                    .or_default()
                    .extend_from_slice(&value);
                self.wake_key(&key, false);
            }
            Request::MultiGet { keys } => {
                let empty = Vec::new();
                let c = self.conns[slot].as_mut().expect("live");
                for k in &keys {
                    put_blob(&mut c.wbuf, self.core.kv.get(k).unwrap_or(&empty));
                }
            }
            Request::MultiSet { pairs } => {
                for (k, v) in pairs {
                    self.core.kv.insert(k.clone(), v);
                    self.wake_key(&k, false);
                }
            }
            Request::QueuePush { key, value } => {
                self.core
                    .queues
                    .entry(key.clone())
                    .or_default()
                    .push_back(value);
                self.wake_key(&key, true);
            }
            Request::QueuePop { key } => {
                let q = self.core.queues.get_mut(&key);
                let len = q.as_ref().map_or(0, |q| q.len());
                let item = q.and_then(|q| q.pop_front());
                if self.core.queues.get(&key).is_some_and(|q| q.is_empty()) {
                    self.core.queues.remove(&key);
                }
                self.reply(slot, |w| {
                    put_i64(w, len as i64);
                    if let Some(it) = item {
                        put_blob(w, &it);
                    }
                });
            }
            Request::QueueLen { key } => {
                let n = self.core.queues.get(&key).map_or(0, |q| q.len()) as i64;
                self.reply(slot, |w| put_i64(w, n));
            }
        }
        Flow::Continue
    }
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
