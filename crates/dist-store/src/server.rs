//! The store server's socket shell: a few threads, each a `mio` event loop over its share of
//! the connections, every connection non-blocking. What the requests *mean* lives in
//! [`crate::state`] (a [`Session`] per connection, one [`StoreState`] for the server); this
//! module only moves bytes between sockets and sessions, keeps the sessions' timers, and
//! applies the limits of [`crate::guard`].
//!
//! The [`StoreState`] sits behind a mutex held only while one request executes (no I/O under
//! it). Loop 0 accepts and deals connections round-robin to the loops. A write that completes
//! another loop's wait leaves that wait's [`Wake`] in the owner's inbox (under the state lock, so
//! a later `CANCEL_WAIT` that finds its wait gone finds the wake there) and wakes the owner.
//!
//! What a connection can cost us, and how it is bounded:
//! - **reading**: each event reads at most [`READ_BUDGET`] bytes of one connection before the
//!   loop serves others; an edge-triggered read stops early only when the socket is drained and
//!   the peer has not closed (the FIN comes with the same edge as the bytes before it);
//! - **partial requests**: at most one incomplete request per connection, capped by
//!   [`crate::proto::Limits::max_request_bytes`], and across connections by
//!   [`ServerOptions::max_buffered_bytes`] ([`MemoryBudget`]); before the handshake only
//!   `VALIDATE`/`AUTH` may arrive, so an unauthenticated peer holds at most a key's worth;
//! - **time**: the handshake must be done within [`ServerOptions::handshake_timeout`] and each
//!   request must arrive whole within [`ServerOptions::message_timeout`] of its first byte;
//! - **replies**: a connection whose unsent replies pass [`ServerOptions::max_pending_output`]
//!   is not read from until it drains;
//! - **connections**: at most [`ServerOptions::max_connections`] (and fewer than the open-file
//!   limit), more are accepted and closed at once;
//! - **wrong tokens**: answered later and later per address, then closed unanswered
//!   ([`AuthPenalties`]);
//! - **the log**: a dropped connection is a `warn!` line, at most a few per second per loop;
//!   the rest are counted in the next line.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::guard::{AuthPenalties, LogLimiter, MemoryBudget, Verdict, STALL};
use crate::proto::Limits;
use crate::state::{ConnId, Refusal, Session, SessionConfig, StoreAccess, StoreState, Wake};
use crate::{Error, Result};

/// Bytes read from one connection per event before the loop serves others.
pub const READ_BUDGET: usize = 1 << 20;
const SCRATCH: usize = 256 * 1024;
const WAKER: Token = Token(usize::MAX);
const FIRST_CONN: usize = 64;
/// File descriptors kept free of connections (listeners, poll, wakers, the process's own).
const FD_RESERVE: u64 = 64;
/// How often connections waiting for the memory budget are retried.
const PARK_RETRY: Duration = Duration::from_millis(5);
/// How often large partial messages are checked for stalled senders (while the budget is
/// contended).
const STALL_SCAN: Duration = Duration::from_millis(100);

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
    /// Most live connections; more are accepted and closed at once. Lowered at start to the
    /// open-file limit less a reserve.
    pub max_connections: usize,
    /// A connection that has not completed the handshake within this is dropped.
    pub handshake_timeout: Duration,
    /// A request must arrive complete within this of its first byte, or the connection is
    /// dropped (a peer trickling bytes cannot hold memory or a connection for ever).
    pub message_timeout: Duration,
    /// Unread reply bytes at which a connection stops being read from.
    pub max_pending_output: usize,
    /// Bytes of partially received requests held across every connection; past it only small
    /// requests and the oldest large one are read (see [`MemoryBudget`]).
    pub max_buffered_bytes: usize,
    /// Serve our extensions (`HELLO`, `WAIT_GET`). `false` behaves as PyTorch's server does
    /// on them (closes the connection), which tests the clients' fallback.
    pub extensions: bool,
    /// Event-loop threads (1 to 255). The default is the machine's parallelism, at most 4.
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
            message_timeout: Duration::from_secs(60),
            max_pending_output: 64 << 20,
            max_buffered_bytes: 256 << 20,
            extensions: true,
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
        }
    }
}

/// A running server; dropping it stops the loops and joins their threads.
#[derive(Debug)]
pub struct StoreServer {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What a server holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Open connections.
    pub connections: usize,
    /// Bytes of partially received requests.
    pub buffered_bytes: usize,
    /// Keys held.
    pub keys: usize,
    /// Pending waits.
    pub pending_waits: usize,
    /// Entries of the waits' key index (live and not yet swept).
    pub wait_registrations: usize,
}

impl StoreServer {
    /// Binds and starts the loops on background threads named `dist-store-N`.
    pub fn start(opts: ServerOptions) -> Result<Self> {
        let mut opts = opts;
        if let Some(fds) = crate::sys::raise_nofile_limit() {
            let cap = fds.saturating_sub(FD_RESERVE).max(1) as usize;
            if cap < opts.max_connections {
                if opts.max_connections != ServerOptions::default().max_connections {
                    warn!(
                        asked = opts.max_connections,
                        cap,
                        open_file_limit = fds,
                        "store server: fewer connections than asked (open-file limit)"
                    );
                }
                opts.max_connections = cap;
            }
        }
        let listeners = bind_all(&opts.host, opts.port)?;
        let mut addrs = Vec::new();
        for l in &listeners {
            addrs.push(
                l.local_addr()
                    .map_err(|e| Error::io("store server: local_addr", e))?,
            );
        }
        let n = opts.threads.clamp(1, 255);
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
            state: Mutex::new(StoreState::new()),
            session: SessionConfig {
                token: opts.token.clone(),
                limits: opts.limits,
                extensions: opts.extensions,
                handshake_timeout: opts.handshake_timeout,
                message_timeout: opts.message_timeout,
                max_pending_output: opts.max_pending_output,
            },
            budget: MemoryBudget::new(opts.max_buffered_bytes),
            penalties: Mutex::new(AuthPenalties::default()),
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
        info!(
            addrs = ?addrs,
            threads = n,
            max_connections = shared.opts.max_connections,
            token = shared.opts.token.is_some(),
            "store server listening"
        );
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

    /// The options in force (`max_connections` as lowered to the open-file limit).
    pub fn options(&self) -> &ServerOptions {
        &self.shared.opts
    }

    /// Connections open now (accepted and not yet closed).
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// What the server holds now.
    pub fn stats(&self) -> ServerStats {
        let st = lock(&self.shared.state);
        ServerStats {
            connections: self.connections(),
            buffered_bytes: self.shared.budget.used(),
            keys: st.num_keys(),
            pending_waits: st.pending_waits(),
            wait_registrations: st.registrations(),
        }
    }

    /// Stops the loops, closes every connection and joins the threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
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

/// Where a connection lives: its loop, its slot there, and the slot's generation.
fn conn_id(lp: usize, slot: usize, gen: u64) -> ConnId {
    ConnId(((slot as u64) << 32) | ((lp as u64) << 24) | (gen & 0xff_ffff))
}

fn conn_place(id: ConnId) -> (usize, usize, u64) {
    (
        ((id.0 >> 24) & 0xff) as usize,
        (id.0 >> 32) as usize,
        id.0 & 0xff_ffff,
    )
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    session: Session,
    /// WRITABLE interest is registered only while replies are stuck in the session's output.
    want_writable: bool,
    /// An event said the peer closed its side (or the socket failed): read to the EOF even
    /// after a short read, since edge-triggered readiness reports data and FIN only once.
    read_closed: bool,
    /// The socket may hold bytes no new readiness edge will announce (we stopped reading for
    /// a reason of ours: output full, budget, a wake awaited): read when resuming.
    input_pending: bool,
    /// Partial-request bytes charged to the memory budget, and the large-message ticket.
    charged: usize,
    ticket: Option<u64>,
    /// Waiting for the budget (counted in it).
    parked: bool,
    /// Listed in the loop's large-message connections.
    listed_large: bool,
    /// When bytes last arrived.
    last_bytes: Instant,
    /// The earliest timer armed for this connection.
    timer: Option<Instant>,
    /// A wrong token's answer is held until then.
    answer_at: Option<Instant>,
    /// This connection is counted among its address's held refusals.
    held: bool,
    /// The wrong token was judged already.
    judged: bool,
}

/// Why a connection is closed.
enum Close {
    /// The peer closed, or we stop: nothing to report.
    Quiet,
    /// The peer broke the protocol or a limit.
    Refused(Refusal),
    /// A socket error.
    Io(String),
}

impl From<Refusal> for Close {
    fn from(r: Refusal) -> Self {
        Close::Refused(r)
    }
}

enum Msg {
    /// A connection dealt to this loop by loop 0.
    Conn(TcpStream, SocketAddr),
    /// A wait of one of this loop's connections completed on another loop.
    Wake(Wake),
}

struct Inbox {
    msgs: Mutex<Vec<Msg>>,
    waker: Waker,
}

struct Shared {
    state: Mutex<StoreState>,
    session: SessionConfig,
    budget: MemoryBudget,
    penalties: Mutex<AuthPenalties>,
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

/// The shell's [`StoreAccess`]: the shared state's lock; wakes for other loops are posted to
/// their inboxes before it is released, this loop's are kept for after.
struct Access<'a> {
    shared: &'a Shared,
    me: usize,
    scratch: &'a mut Vec<Wake>,
    local: &'a mut Vec<Wake>,
}

impl StoreAccess for Access<'_> {
    fn with<R>(&mut self, f: impl FnOnce(&mut StoreState, &mut Vec<Wake>) -> R) -> R {
        let mut st = lock(&self.shared.state);
        let r = f(&mut st, self.scratch);
        for w in self.scratch.drain(..) {
            let (owner, _, _) = conn_place(w.conn);
            if owner == self.me {
                self.local.push(w);
            } else if let Some(inbox) = self.shared.inboxes.get(owner) {
                let was_empty = {
                    let mut m = lock(&inbox.msgs);
                    let e = m.is_empty();
                    m.push(Msg::Wake(w));
                    e
                };
                if was_empty {
                    let _ = inbox.waker.wake();
                }
            }
        }
        drop(st);
        r
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
    /// Connections a wake gave output (or unblocked).
    dirty: Vec<usize>,
    /// Connections with more input to process (their read budget ran out).
    again: VecDeque<(usize, u64)>,
    /// Connections waiting for the memory budget, by their large-message ticket (the order in
    /// which the budget serves them).
    parked: BTreeMap<u64, (usize, u64)>,
    /// When `large` was last scanned for stalled senders.
    last_stall_scan: Instant,
    /// Connections with a large partial message (candidates for eviction when stalled).
    large: Vec<(usize, u64)>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    scratch: Vec<u8>,
    accept_retry: bool,
    next_loop: usize,
    refused_at_cap: u64,
    cap_log: LogLimiter,
    drop_log: LogLimiter,
    /// Wakes: scratch under the lock, and this loop's own to apply.
    wakes: Vec<Wake>,
    local: Vec<Wake>,
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
            parked: BTreeMap::new(),
            last_stall_scan: Instant::now(),
            large: Vec::new(),
            timers: BinaryHeap::new(),
            scratch: vec![0; SCRATCH],
            accept_retry: false,
            next_loop: 0,
            refused_at_cap: 0,
            cap_log: LogLimiter::new(1, Duration::from_secs(1)),
            drop_log: LogLimiter::new(5, Duration::from_secs(1)),
            wakes: Vec::new(),
            local: Vec::new(),
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shared.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let mut timeout = self
                .timers
                .peek()
                .map(|Reverse((t, _, _))| t.saturating_duration_since(now));
            let mut cap = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
            if !self.again.is_empty() {
                cap(Duration::ZERO);
            }
            if self.accept_retry {
                cap(Duration::from_millis(50));
            }
            if !self.parked.is_empty() {
                cap(PARK_RETRY);
            }
            if let Some(n) = self.drop_log.take_suppressed(now) {
                warn!("store server: {n} more connections dropped in the last second, not shown");
            }
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
                    let mut read = ev.is_readable();
                    if let Some(Some(c)) = self.conns.get_mut(slot) {
                        if ev.is_read_closed() || ev.is_error() {
                            c.read_closed = true;
                        }
                        read |= c.read_closed || c.input_pending;
                    }
                    self.handle(slot, read);
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
                    if self.live_conn(slot, gen) {
                        self.handle(slot, true);
                    }
                }
            }
            self.resume_parked();
            self.serve_dirty();
            self.expire_timers();
            if !self.large.is_empty()
                && self.last_stall_scan.elapsed() >= STALL_SCAN
                && self.shared.budget.contended()
            {
                self.last_stall_scan = Instant::now();
                self.evict_stalled();
            }
        }
        let slots: Vec<usize> = (0..self.conns.len())
            .filter(|s| self.conns[*s].is_some())
            .collect();
        let n = slots.len();
        for s in slots {
            self.close(s, Close::Quiet);
        }
        info!(
            thread = self.id,
            connections = n,
            "store server loop stopped"
        );
    }

    /// Memory was freed while connections wait for it: the other loops retry theirs now
    /// instead of at their next poll timeout.
    fn wake_other_loops(&self) {
        for (i, inbox) in self.shared.inboxes.iter().enumerate() {
            if i != self.id {
                let _ = inbox.waker.wake();
            }
        }
    }

    /// Retries connections waiting for the budget, oldest large message first, while the
    /// budget has room or the next one is the oldest overall; stops at the first refused.
    fn resume_parked(&mut self) {
        while let Some((&t, &(slot, gen))) = self.parked.first_key_value() {
            let current = self.live_conn(slot, gen)
                && self.conns[slot]
                    .as_ref()
                    .is_some_and(|c| c.ticket == Some(t));
            if !current {
                // Closed, or its large message ended: not waiting under this ticket any more.
                self.parked.remove(&t);
                continue;
            }
            if !self.shared.budget.has_room() && !self.shared.budget.is_head(t) {
                return;
            }
            self.parked.remove(&t);
            self.handle(slot, true);
            if self.parked.contains_key(&t) {
                return;
            }
        }
    }

    fn live_conn(&self, slot: usize, gen: u64) -> bool {
        self.gens.get(slot) == Some(&gen) && self.conns[slot].is_some()
    }

    /// Takes this loop's messages: new connections and completed waits.
    fn drain_inbox(&mut self) {
        let msgs = std::mem::take(&mut *lock(&self.shared.inboxes[self.id].msgs));
        for m in msgs {
            match m {
                Msg::Conn(stream, peer) => self.add_conn(stream, peer),
                Msg::Wake(w) => self.apply_wake(w),
            }
        }
    }

    fn apply_wake(&mut self, w: Wake) {
        let (_, slot, gen) = conn_place(w.conn);
        if self.gens.get(slot).map(|g| g & 0xff_ffff) != Some(gen) {
            return;
        }
        if let Some(c) = self.conns[slot].as_mut() {
            if c.session.on_wake(w.wait, &w.reply) {
                self.dirty.push(slot);
            }
        }
    }

    fn apply_local_wakes(&mut self) {
        while !self.local.is_empty() {
            for w in std::mem::take(&mut self.local) {
                self.apply_wake(w);
            }
        }
    }

    fn serve_dirty(&mut self) {
        while !self.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for slot in dirty {
                let read = match self.conns[slot].as_ref() {
                    Some(c) => c.input_pending || c.read_closed,
                    None => continue,
                };
                self.handle(slot, read);
            }
        }
    }

    fn accept(&mut self, li: usize) {
        let n = self.shared.inboxes.len();
        loop {
            match self.listeners[li].accept() {
                Ok((stream, peer)) => {
                    let max = self.shared.opts.max_connections;
                    if self.shared.live.load(Ordering::Relaxed) >= max {
                        self.refused_at_cap += 1;
                        if let Some(before) = self.cap_log.allow(Instant::now()) {
                            warn!(
                                %peer,
                                refused = self.refused_at_cap,
                                since_last_line = before + 1,
                                max,
                                "store server: connection limit reached; closing new connections"
                            );
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
                    if self.cap_log.allow(Instant::now()).is_some() {
                        warn!(error = %e, "store server: accept failed; retrying in 50 ms");
                    }
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
        let now = Instant::now();
        self.conns[slot] = Some(Conn {
            stream,
            peer,
            session: Session::new(conn_id(self.id, slot, self.gens[slot]), now),
            want_writable: false,
            read_closed: false,
            input_pending: false,
            charged: 0,
            ticket: None,
            parked: false,
            listed_large: false,
            last_bytes: now,
            timer: None,
            answer_at: None,
            held: false,
            judged: false,
        });
        self.arm(slot);
        debug!(%peer, slot, thread = self.id, "store server: connection accepted");
    }

    /// Arms the connection's earliest deadline (at most one pending timer that is earlier
    /// than the others; later ones are re-armed when it fires).
    fn arm(&mut self, slot: usize) {
        let gen = self.gens[slot];
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let d = match (c.session.deadline(&self.shared.session), c.answer_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(d) = d {
            if c.timer.map_or(true, |t| d < t) {
                c.timer = Some(d);
                self.timers.push(Reverse((d, slot, gen)));
            }
        }
    }

    fn expire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, slot, gen))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.live_conn(slot, gen) {
                continue;
            }
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.timer == Some(t) {
                c.timer = None;
            }
            if c.answer_at.is_some_and(|a| a <= now) {
                c.answer_at = None;
                self.handle(slot, false);
                continue;
            }
            if let Err(r) = c.session.check_deadlines(&self.shared.session, now) {
                self.close(slot, r.into());
                continue;
            }
            self.arm(slot);
        }
    }

    /// The budget is spent and others wait: drops large partial messages whose sender has
    /// sent nothing for [`STALL`] and has nothing waiting in the socket.
    fn evict_stalled(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.large.len() {
            let (slot, gen) = self.large[i];
            let Some(c) = self.conns[slot].as_mut().filter(|_| self.gens[slot] == gen) else {
                self.large.swap_remove(i);
                continue;
            };
            if c.ticket.is_none() {
                c.listed_large = false;
                self.large.swap_remove(i);
                continue;
            }
            i += 1;
            if now.saturating_duration_since(c.last_bytes) < STALL {
                continue;
            }
            let mut b = [0u8; 1];
            if matches!(c.stream.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                let why = format!(
                    "stalled for {:?} with {} bytes of a request received while the memory budget \
                     for partial requests ({} bytes) is spent and others wait",
                    now.saturating_duration_since(c.last_bytes),
                    c.session.buffered(),
                    self.shared.budget.limit()
                );
                self.close(slot, Close::Io(why));
            }
        }
    }

    fn close(&mut self, slot: usize, why: Close) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        let msg = match &why {
            Close::Quiet => None,
            Close::Refused(r) => Some(r.to_string()),
            Close::Io(e) => Some(e.clone()),
        };
        match msg {
            None => debug!(peer = %c.peer, "store server: connection closed"),
            Some(m) => {
                if let Some(before) = self.drop_log.allow(Instant::now()) {
                    if before > 0 {
                        warn!(peer = %c.peer, suppressed = before, "store server: dropping connection: {m} ({before} more dropped before, not shown)");
                    } else {
                        warn!(peer = %c.peer, "store server: dropping connection: {m}");
                    }
                }
            }
        }
        let mut access = Access {
            shared: &self.shared,
            me: self.id,
            scratch: &mut self.wakes,
            local: &mut self.local,
        };
        c.session.abandon(&mut access);
        if self.shared.budget.settle(c.charged, 0, &mut c.ticket) {
            self.wake_other_loops();
        }
        if c.parked {
            self.shared.budget.set_waiting(false);
        }
        if c.held {
            lock(&self.shared.penalties).release(c.peer.ip());
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.gens[slot] += 1;
        self.free.push(slot);
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Serves one connection: sends what is pending, runs complete requests, reads more when
    /// `read` (readiness said so, or bytes may be waiting unannounced).
    fn handle(&mut self, slot: usize, read: bool) {
        if self.conns.get(slot).map_or(true, |c| c.is_none()) {
            return;
        }
        let mut budget = READ_BUDGET;
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.serve(slot, read, &mut budget, &mut scratch);
        self.scratch = scratch;
        match r {
            Ok(()) => {
                let gen = self.gens[slot];
                let c = self.conns[slot].as_mut().expect("live connection");
                let now_buffered = c.session.buffered();
                let freed = self
                    .shared
                    .budget
                    .settle(c.charged, now_buffered, &mut c.ticket);
                c.charged = now_buffered;
                if c.ticket.is_some() && !c.listed_large {
                    c.listed_large = true;
                    self.large.push((slot, gen));
                }
                if freed {
                    self.wake_other_loops();
                }
                if budget == 0 {
                    self.again.push_back((slot, gen));
                }
                self.arm(slot);
            }
            Err(why) => self.close(slot, why),
        }
        self.apply_local_wakes();
    }

    fn serve(
        &mut self,
        slot: usize,
        mut read: bool,
        budget: &mut usize,
        scratch: &mut [u8],
    ) -> Result<(), Close> {
        let cfg = &self.shared.session;
        loop {
            let c = self.conns[slot].as_mut().expect("live connection");
            if c.answer_at.is_some() {
                return Ok(()); // a wrong token's answer is held
            }
            if let Some(r) = c.session.closing() {
                if !c.judged {
                    c.judged = true;
                    let v = lock(&self.shared.penalties).failure(c.peer.ip(), Instant::now());
                    match v {
                        Verdict::Answer => {}
                        Verdict::Delay(d) => {
                            c.held = true;
                            c.answer_at = Some(Instant::now() + d);
                            return Ok(());
                        }
                        Verdict::Drop => {
                            return Err(Close::Refused(r.clone()));
                        }
                    }
                }
                let r = r.clone();
                flush(&self.poll, slot, c)?;
                return if c.session.pending_output() == 0 {
                    Err(Close::Refused(r))
                } else {
                    Ok(())
                };
            }
            flush(&self.poll, slot, c)?;
            let now = Instant::now();
            {
                let mut access = Access {
                    shared: &self.shared,
                    me: self.id,
                    scratch: &mut self.wakes,
                    local: &mut self.local,
                };
                c.session.process(cfg, now, &mut access)?;
            }
            if c.session.closing().is_some() {
                continue;
            }
            flush(&self.poll, slot, c)?;
            if !c.session.wants_input(cfg) {
                c.input_pending |= read;
                return Ok(());
            }
            if !read {
                return Ok(());
            }
            if *budget == 0 {
                c.input_pending = true;
                return Ok(());
            }
            let want = scratch.len().min(*budget);
            // Charge what was buffered since the last settle before asking the budget.
            let have = c.session.buffered();
            let _ = self.shared.budget.settle(c.charged, have, &mut c.ticket);
            c.charged = have;
            let allowed = self.shared.budget.allowance(have, want, &mut c.ticket);
            if allowed == 0 {
                c.input_pending = true;
                if !c.parked {
                    c.parked = true;
                    self.shared.budget.set_waiting(true);
                }
                if let Some(t) = c.ticket {
                    self.parked.insert(t, (slot, self.gens[slot]));
                }
                return Ok(());
            }
            if c.parked {
                c.parked = false;
                self.shared.budget.set_waiting(false);
            }
            match c.stream.read(&mut scratch[..allowed]) {
                Ok(0) => {
                    // Best effort: replies to what the peer sent before its FIN.
                    let _ = flush(&self.poll, slot, c);
                    return Err(Close::Quiet);
                }
                Ok(n) => {
                    c.last_bytes = now;
                    *budget -= n.min(*budget);
                    c.session.receive(&scratch[..n], now);
                    // A short read drained the socket; unless the peer's FIN came with these
                    // bytes, the next bytes raise a new edge.
                    if n < allowed && !c.read_closed {
                        c.input_pending = false;
                        read = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.input_pending = false;
                    read = false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Close::Io(format!("read error: {e}"))),
            }
        }
    }
}

/// Writes what the session has to send; registers WRITABLE interest while output is stuck.
fn flush(poll: &Poll, slot: usize, c: &mut Conn) -> Result<(), Close> {
    while c.session.pending_output() > 0 {
        match c.stream.write(c.session.output()) {
            Ok(0) => return Err(Close::Io("peer stopped accepting data".into())),
            Ok(n) => c.session.sent(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !c.want_writable {
                    c.want_writable = true;
                    poll.registry()
                        .reregister(
                            &mut c.stream,
                            Token(FIRST_CONN + slot),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .map_err(|e| Close::Io(format!("reregister: {e}")))?;
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Close::Io(format!("write error: {e}"))),
        }
    }
    if c.want_writable {
        c.want_writable = false;
        poll.registry()
            .reregister(&mut c.stream, Token(FIRST_CONN + slot), Interest::READABLE)
            .map_err(|e| Close::Io(format!("reregister: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_round_trip() {
        for (lp, slot, gen) in [(0, 0, 1), (3, 70_000, 5), (254, 1 << 20, 0xff_ffff)] {
            assert_eq!(conn_place(conn_id(lp, slot, gen)), (lp, slot, gen));
        }
        // Generations wrap at 24 bits; the shell compares them masked.
        assert_eq!(conn_place(conn_id(1, 2, 1 << 24)).2, 0);
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
