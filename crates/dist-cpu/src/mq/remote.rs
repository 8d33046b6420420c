//! The TCP side of the MessageQueue: readers on other nodes.
//!
//! Wire format, writer → reader: frames of `u64 LE length` then `length` bytes, whose first byte
//! is the kind ([`KIND_MSG`], [`KIND_READY`], [`KIND_SHUTDOWN`]); `length` is checked against the
//! queue's message cap before anything is allocated. Reader → writer: one hello right after
//! connecting — magic `DISTMQH1`, the reader's rank (u64 LE), the queue's 16-byte random token
//! (from the [`Handle`](super::Handle)), then a u16 LE length and the optional store token. The
//! writer accepts each expected reader once; any other connection, a wrong token or a malformed
//! hello is dropped with a log line. After the hello the reader sends nothing; the writer treats
//! bytes or EOF from it as the reader going away.
//!
//! The writer keeps one bounded queue and one sender thread per remote reader, so `enqueue` never
//! blocks on a socket: it waits (with its deadline) for room in every reader's queue and hands each
//! sender an `Arc` of the encoded frame. The reader keeps a partial frame across calls
//! ([`FrameDecoder`], a state machine with no I/O), so a `dequeue` that times out halfway through
//! a frame loses nothing.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use super::proc::ct_eq;

/// A message.
pub(crate) const KIND_MSG: u8 = 0;
/// The writer has every reader: `wait_until_ready` may return.
pub(crate) const KIND_READY: u8 = 1;
/// The writer shut the queue down.
pub(crate) const KIND_SHUTDOWN: u8 = 2;

pub(crate) const HELLO_MAGIC: [u8; 8] = *b"DISTMQH1";
/// Longest store token a hello may carry.
pub(crate) const MAX_STORE_TOKEN: usize = 4096;
/// How long an accepted connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Encodes one frame: length, kind, payload.
pub(crate) fn encode_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u64 + 1).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(payload);
    f
}

/// Encodes the hello a reader sends after connecting.
pub(crate) fn encode_hello(rank: usize, token: &[u8; 16], store_token: Option<&[u8]>) -> Vec<u8> {
    let st = store_token.unwrap_or_default();
    let mut h = Vec::with_capacity(34 + st.len());
    h.extend_from_slice(&HELLO_MAGIC);
    h.extend_from_slice(&(rank as u64).to_le_bytes());
    h.extend_from_slice(token);
    h.extend_from_slice(&(st.len().min(u16::MAX as usize) as u16).to_le_bytes());
    h.extend_from_slice(st);
    h
}

/// Reads and checks a hello; returns the reader's rank. `expected` answers whether a rank is an
/// expected reader not yet connected.
pub(crate) fn read_hello(
    s: &mut impl Read,
    token: &[u8; 16],
    store_token: Option<&[u8]>,
    expected: impl Fn(usize) -> bool,
) -> Result<usize> {
    let mut fixed = [0u8; 34];
    s.read_exact(&mut fixed)
        .map_err(|e| Error::io("mq: reading a remote reader's hello", e))?;
    if fixed[..8] != HELLO_MAGIC {
        return Err(Error::protocol("mq hello: bad magic"));
    }
    let rank = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
    let tlen = u16::from_le_bytes([fixed[32], fixed[33]]) as usize;
    if tlen > MAX_STORE_TOKEN {
        return Err(Error::protocol(format!(
            "mq hello: store token of {tlen} bytes over the cap of {MAX_STORE_TOKEN}"
        )));
    }
    let mut st = vec![0u8; tlen];
    s.read_exact(&mut st)
        .map_err(|e| Error::io("mq: reading a remote reader's store token", e))?;
    // Check both secrets before saying which one failed, so timing says nothing either.
    let tok_ok = ct_eq(&fixed[16..32], token);
    let st_ok = match store_token {
        Some(want) => ct_eq(&st, want),
        None => true,
    };
    if !(tok_ok && st_ok) {
        return Err(Error::protocol(format!(
            "mq hello from claimed rank {rank}: wrong queue token or store token"
        )));
    }
    let rank = usize::try_from(rank).map_err(|_| Error::protocol("mq hello: rank overflows"))?;
    if !expected(rank) {
        return Err(Error::protocol(format!(
            "mq hello: rank {rank} is not a remote reader of this queue, or is already connected"
        )));
    }
    Ok(rank)
}

/// What a [`FrameDecoder`] produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// Incremental frame decoder with no I/O: ask it for the buffer to fill ([`FrameDecoder::buf`]),
/// read into it, report how much arrived ([`FrameDecoder::advance`]). The body is read straight
/// into its final vector; its length is capped before the vector is allocated.
#[derive(Debug)]
pub(crate) struct FrameDecoder {
    cap: usize,
    hdr: [u8; 9],
    hdr_got: usize,
    body: Vec<u8>,
    body_got: usize,
}

impl FrameDecoder {
    /// `cap`: the largest payload accepted.
    pub fn new(cap: usize) -> Self {
        FrameDecoder {
            cap,
            hdr: [0; 9],
            hdr_got: 0,
            body: Vec::new(),
            body_got: 0,
        }
    }
    /// True when no partial frame is held.
    pub fn is_idle(&self) -> bool {
        self.hdr_got == 0
    }
    /// Where the next bytes go.
    pub fn buf(&mut self) -> &mut [u8] {
        if self.hdr_got < 9 {
            &mut self.hdr[self.hdr_got..]
        } else {
            &mut self.body[self.body_got..]
        }
    }
    /// Records `n` bytes read into [`FrameDecoder::buf`]; returns a frame once one is complete.
    pub fn advance(&mut self, n: usize) -> Result<Option<Frame>> {
        if self.hdr_got < 9 {
            self.hdr_got += n;
            if self.hdr_got < 9 {
                return Ok(None);
            }
            let len = u64::from_le_bytes(self.hdr[..8].try_into().expect("8 bytes"));
            let kind = self.hdr[8];
            if len == 0 || len - 1 > self.cap as u64 {
                return Err(Error::protocol(format!(
                    "mq frame of {len} bytes (cap {} + 1)",
                    self.cap
                )));
            }
            if kind > KIND_SHUTDOWN || (kind != KIND_MSG && len != 1) {
                return Err(Error::protocol(format!(
                    "mq frame of unknown kind {kind} or control frame with a payload ({len} bytes)"
                )));
            }
            self.body = vec![0u8; (len - 1) as usize];
            self.body_got = 0;
        } else {
            self.body_got += n;
        }
        if self.body_got == self.body.len() {
            self.hdr_got = 0;
            return Ok(Some(Frame {
                kind: self.hdr[8],
                payload: std::mem::take(&mut self.body),
            }));
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Writer side
// ---------------------------------------------------------------------------------------------

/// One queued frame: its message number, when it was queued, the bytes.
#[derive(Debug)]
struct Queued {
    msg_no: u64,
    at: Instant,
    frame: Arc<Vec<u8>>,
}

#[derive(Debug, Default)]
struct LinkState {
    queue: VecDeque<Queued>,
    /// Set when the connection failed: what happened.
    lost: Option<String>,
    /// The sender thread has exited.
    done: bool,
}

/// The writer's link to one remote reader: a bounded queue drained by a sender thread.
#[derive(Debug)]
pub(crate) struct Link {
    pub rank: usize,
    cap: usize,
    state: Mutex<LinkState>,
    cv: Condvar,
    stream: TcpStream,
    closing: AtomicBool,
}

/// A stuck remote reader: the oldest frame it has not taken, and for how long.
#[derive(Debug, Clone)]
pub(crate) struct LinkLag {
    pub msg_no: u64,
    pub waited: Duration,
    pub queued: usize,
}

impl Link {
    /// Starts the sender thread for an authenticated connection.
    pub fn start(rank: usize, cap: usize, stream: TcpStream) -> Result<Arc<Link>> {
        let _ = stream.set_nodelay(true);
        let out = stream
            .try_clone()
            .map_err(|e| Error::io("mq: cloning a remote reader's socket", e))?;
        let probe = stream
            .try_clone()
            .map_err(|e| Error::io("mq: cloning a remote reader's socket", e))?;
        let _ = probe.set_read_timeout(Some(Duration::from_millis(1)));
        let link = Arc::new(Link {
            rank,
            cap: cap.max(1),
            state: Mutex::new(LinkState::default()),
            cv: Condvar::new(),
            stream,
            closing: AtomicBool::new(false),
        });
        let l2 = link.clone();
        std::thread::Builder::new()
            .name(format!("mq-send-r{rank}"))
            .spawn(move || l2.run(out, probe))
            .map_err(|e| Error::io("mq: spawning a sender thread", e))?;
        Ok(link)
    }

    fn run(&self, mut out: TcpStream, mut probe: TcpStream) {
        let lost = |why: String| {
            let mut st = lock(&self.state);
            if st.lost.is_none() {
                st.lost = Some(why);
            }
        };
        loop {
            let next = {
                let mut st = lock(&self.state);
                loop {
                    if let Some(q) = st.queue.front() {
                        break Some(q.frame.clone());
                    }
                    if self.closing.load(Ordering::Acquire) || st.lost.is_some() {
                        break None;
                    }
                    st = self
                        .cv
                        .wait_timeout(st, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if st.queue.is_empty() {
                        drop(st);
                        // Idle: notice a reader that went away (EOF) or talks out of turn.
                        let mut b = [0u8; 1];
                        match probe.read(&mut b) {
                            Ok(0) => lost("the reader closed its connection".into()),
                            Ok(_) => lost("the reader sent unexpected bytes".into()),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(e) => lost(format!("connection error: {e}")),
                        }
                        st = lock(&self.state);
                    }
                }
            };
            let Some(frame) = next else { break };
            if let Err(e) = out.write_all(&frame) {
                lost(format!("send failed: {e}"));
                break;
            }
            let mut st = lock(&self.state);
            st.queue.pop_front();
            drop(st);
            self.cv.notify_all();
        }
        let mut st = lock(&self.state);
        st.done = true;
        st.queue.clear();
        drop(st);
        self.cv.notify_all();
    }

    /// Looks at the socket without blocking: a reader that closed its end (process exit, crash)
    /// or sent bytes out of turn marks the link lost now, not when the sender next writes.
    pub fn check_peer(&self) {
        use std::os::fd::AsRawFd;
        let mut b = [0u8; 1];
        // SAFETY: the descriptor is owned by `self.stream` and open for the duration of the
        // call; `b` is a valid 1-byte buffer; MSG_PEEK | MSG_DONTWAIT neither consumes data nor
        // blocks, and changes no state of the descriptor that the sender thread relies on.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let why = match n {
            0 => Some("the reader closed its connection".to_string()),
            n if n > 0 => Some("the reader sent unexpected bytes".to_string()),
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
                    _ => Some(format!("connection error: {e}")),
                }
            }
        };
        if let Some(why) = why {
            let mut st = lock(&self.state);
            if st.lost.is_none() {
                st.lost = Some(why);
            }
        }
    }

    /// Why the link failed, if it did.
    pub fn lost(&self) -> Option<String> {
        lock(&self.state).lost.clone()
    }

    /// True when a frame can be queued now.
    pub fn has_room(&self) -> bool {
        let st = lock(&self.state);
        st.lost.is_some() || st.queue.len() < self.cap
    }

    /// Waits until there is room or `deadline`; true when there is room (or the link is lost,
    /// which the caller checks next).
    pub fn wait_room(&self, deadline: Instant) -> bool {
        let mut st = lock(&self.state);
        loop {
            if st.lost.is_some() || st.queue.len() < self.cap {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Queues a frame (the caller checked for room; control frames may exceed the cap by one).
    pub fn push(&self, msg_no: u64, frame: Arc<Vec<u8>>) {
        let mut st = lock(&self.state);
        if st.done {
            return;
        }
        st.queue.push_back(Queued {
            msg_no,
            at: Instant::now(),
            frame,
        });
        drop(st);
        self.cv.notify_all();
    }

    /// The oldest frame not yet handed to the socket, when the queue is non-empty.
    pub fn lag(&self) -> Option<LinkLag> {
        let st = lock(&self.state);
        st.queue.front().map(|q| LinkLag {
            msg_no: q.msg_no,
            waited: q.at.elapsed(),
            queued: st.queue.len(),
        })
    }

    /// Stops the sender: waits up to `grace` for queued frames to go out, then closes the socket
    /// (which also unblocks a sender stuck in `write`).
    pub fn close(&self, grace: Duration) {
        self.closing.store(true, Ordering::Release);
        self.cv.notify_all();
        let deadline = Instant::now() + grace;
        let mut st = lock(&self.state);
        while !st.done && Instant::now() < deadline {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// At most this many connections may be sending their hello at once; more are dropped.
const MAX_PENDING_HELLOS: usize = 64;

/// What checking a hello needs.
#[derive(Debug)]
struct HelloParams {
    ranks: Vec<usize>,
    token: [u8; 16],
    store_token: Option<Vec<u8>>,
    link_cap: usize,
    tag: String,
}

/// The writer's listener state: the links of the readers that have connected so far.
#[derive(Debug)]
pub(crate) struct Acceptor {
    pub links: Mutex<Vec<Option<Arc<Link>>>>,
    pub cv: Condvar,
    stop: AtomicBool,
}

impl Acceptor {
    /// Starts accepting on `listener` for the readers `ranks`, each proving `token` (and the
    /// store token when one is set). Stops once all are connected or [`Acceptor::stop`] is called.
    pub fn start(
        listener: TcpListener,
        ranks: Vec<usize>,
        token: [u8; 16],
        store_token: Option<Vec<u8>>,
        link_cap: usize,
        tag: String,
    ) -> Result<Arc<Acceptor>> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("mq: listener set_nonblocking", e))?;
        let acc = Arc::new(Acceptor {
            links: Mutex::new(vec![None; ranks.len()]),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let a2 = acc.clone();
        std::thread::Builder::new()
            .name("mq-accept".into())
            .spawn(move || a2.run(listener, ranks, token, store_token, link_cap, tag))
            .map_err(|e| Error::io("mq: spawning the accept thread", e))?;
        Ok(acc)
    }

    fn run(
        self: Arc<Self>,
        listener: TcpListener,
        ranks: Vec<usize>,
        token: [u8; 16],
        store_token: Option<Vec<u8>>,
        link_cap: usize,
        tag: String,
    ) {
        let params = Arc::new(HelloParams {
            ranks,
            token,
            store_token,
            link_cap,
            tag,
        });
        let pending = Arc::new(AtomicUsize::new(0));
        let mut sleep = Duration::from_micros(100);
        while !self.stop.load(Ordering::Acquire) {
            if lock(&self.links).iter().all(Option::is_some) {
                break;
            }
            let (s, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(sleep);
                    sleep = (sleep * 2).min(Duration::from_millis(10));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(queue = %params.tag, "mq accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            sleep = Duration::from_micros(100);
            // Each hello is read on its own short-lived thread, so a silent or slow client
            // cannot hold the real readers up; at most MAX_PENDING_HELLOS at a time.
            if pending.load(Ordering::Acquire) >= MAX_PENDING_HELLOS {
                tracing::warn!(queue = %params.tag, %peer, "mq: too many pending connections; dropped one");
                continue;
            }
            pending.fetch_add(1, Ordering::AcqRel);
            let (me, p, pend) = (self.clone(), params.clone(), pending.clone());
            let spawned = std::thread::Builder::new()
                .name("mq-hello".into())
                .spawn(move || {
                    me.hello(s, peer, &p);
                    pend.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn hello(&self, mut s: TcpStream, peer: std::net::SocketAddr, p: &HelloParams) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(HELLO_TIMEOUT));
        let slot = |r: usize| p.ranks.iter().position(|&x| x == r);
        let expected = |r: usize| slot(r).is_some_and(|i| lock(&self.links)[i].is_none());
        let rank = match read_hello(&mut s, &p.token, p.store_token.as_deref(), expected) {
            Ok(rank) => rank,
            Err(e) => {
                tracing::warn!(queue = %p.tag, %peer, "mq: dropped a connection: {e}");
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        };
        let _ = s.set_read_timeout(None);
        let i = slot(rank).expect("checked by read_hello");
        let mut links = lock(&self.links);
        if links[i].is_some() || self.stop.load(Ordering::Acquire) {
            drop(links);
            tracing::warn!(queue = %p.tag, %peer, rank, "mq: dropped a second connection for a reader");
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        match Link::start(rank, p.link_cap, s) {
            Ok(link) => {
                tracing::debug!(queue = %p.tag, rank, %peer, "mq remote reader connected");
                links[i] = Some(link);
                drop(links);
                self.cv.notify_all();
            }
            Err(e) => tracing::warn!(queue = %p.tag, rank, "mq: {e}"),
        }
    }

    /// Stops accepting.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// Reader side
// ---------------------------------------------------------------------------------------------

/// A remote reader's connection: the socket and the partial frame.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub stream: TcpStream,
    pub dec: FrameDecoder,
}

/// How [`Inbound::next_frame`] ended without a frame.
#[derive(Debug)]
pub(crate) enum RecvEnd {
    /// The deadline passed (any partial frame is kept).
    TimedOut,
    /// The writer closed the connection.
    Eof,
    /// A socket error.
    Failed(std::io::Error),
    /// A malformed frame.
    Bad(Error),
}

impl Inbound {
    /// Connects to `addr` (retrying until `deadline`) and sends the hello.
    pub fn connect(
        addr: &str,
        rank: usize,
        token: &[u8; 16],
        store_token: Option<&[u8]>,
        cap: usize,
        deadline: Instant,
    ) -> Result<Inbound> {
        let mut sleep = Duration::from_millis(1);
        let start = Instant::now();
        let stream = loop {
            let e = match addr.parse::<std::net::SocketAddr>() {
                Ok(a) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                        Ok(s) => break s,
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => {
                    return Err(Error::invalid(format!(
                        "mq handle: bad address {addr:?}: {e}"
                    )))
                }
            };
            let waited = Instant::now();
            if waited >= deadline {
                return Err(Error::Timeout {
                    op: format!("mq connect to the writer at {addr}"),
                    waited: start.elapsed(),
                    missing_ranks: Vec::new(),
                    detail: format!("last error: {e}"),
                });
            }
            std::thread::sleep(sleep.min(deadline - waited));
            sleep = (sleep * 2).min(Duration::from_millis(100));
        };
        let _ = stream.set_nodelay(true);
        let mut s = stream;
        s.write_all(&encode_hello(rank, token, store_token))
            .map_err(|e| Error::io(format!("mq: sending the hello to {addr}"), e))?;
        Ok(Inbound {
            stream: s,
            dec: FrameDecoder::new(cap),
        })
    }

    /// Reads until a frame is complete or `deadline` (checking `stop` every `slice`).
    pub fn next_frame(
        &mut self,
        deadline: Instant,
        slice: Duration,
        stop: impl Fn() -> bool,
    ) -> std::result::Result<Frame, RecvEnd> {
        loop {
            let now = Instant::now();
            if now >= deadline || stop() {
                return Err(RecvEnd::TimedOut);
            }
            let wait = (deadline - now).min(slice).max(Duration::from_micros(100));
            let _ = self.stream.set_read_timeout(Some(wait));
            let buf = self.dec.buf();
            if buf.is_empty() {
                // A zero-length body: complete without reading.
                match self.dec.advance(0) {
                    Ok(Some(f)) => return Ok(f),
                    Ok(None) => continue,
                    Err(e) => return Err(RecvEnd::Bad(e)),
                }
            }
            match self.stream.read(buf) {
                Ok(0) => return Err(RecvEnd::Eof),
                Ok(n) => match self.dec.advance(n) {
                    Ok(Some(f)) => return Ok(f),
                    Ok(None) => {}
                    Err(e) => return Err(RecvEnd::Bad(e)),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(RecvEnd::Failed(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], cap: usize, step: usize) -> Result<Vec<Frame>> {
        let mut d = FrameDecoder::new(cap);
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let buf = d.buf();
            let n = buf.len().min(step).min(bytes.len() - i);
            buf[..n].copy_from_slice(&bytes[i..i + n]);
            i += n;
            if let Some(f) = d.advance(n)? {
                out.push(f);
            }
            // A zero-length body completes without more input.
            while !d.is_idle() && d.buf().is_empty() {
                if let Some(f) = d.advance(0)? {
                    out.push(f);
                }
            }
        }
        assert!(d.is_idle(), "trailing partial frame");
        Ok(out)
    }

    #[test]
    fn frames_roundtrip_in_any_split() {
        let mut wire = encode_frame(KIND_MSG, b"hello");
        wire.extend(encode_frame(KIND_MSG, b""));
        wire.extend(encode_frame(KIND_READY, b""));
        wire.extend(encode_frame(KIND_MSG, &[9u8; 1000]));
        for step in [1, 3, 9, 64, 4096] {
            let f = decode_all(&wire, 1000, step).unwrap();
            assert_eq!(f.len(), 4);
            assert_eq!(f[0].payload, b"hello");
            assert!(f[1].payload.is_empty() && f[1].kind == KIND_MSG);
            assert_eq!(f[2].kind, KIND_READY);
            assert_eq!(f[3].payload.len(), 1000);
        }
    }

    #[test]
    fn malformed_frames_are_refused_before_allocation() {
        // Claimed length far over the cap.
        let mut w = (1u64 << 60).to_le_bytes().to_vec();
        w.push(KIND_MSG);
        assert!(decode_all(&w, 1 << 20, 64).is_err());
        // Zero length, unknown kind, control frame with payload.
        let mut z = 0u64.to_le_bytes().to_vec();
        z.push(KIND_MSG);
        assert!(decode_all(&z, 16, 64).is_err());
        assert!(decode_all(&encode_frame(7, b""), 16, 64).is_err());
        assert!(decode_all(&encode_frame(KIND_READY, b"x"), 16, 64).is_err());
        assert!(decode_all(&encode_frame(KIND_MSG, &[0; 17]), 16, 64).is_err());
    }

    #[test]
    fn hello_checks_tokens_and_ranks() {
        let tok = [3u8; 16];
        let h = encode_hello(5, &tok, Some(b"secret"));
        let ok = |r: usize| r == 5;
        assert_eq!(
            read_hello(&mut &h[..], &tok, Some(b"secret"), ok).unwrap(),
            5
        );
        assert!(read_hello(&mut &h[..], &[4u8; 16], Some(b"secret"), ok).is_err());
        assert!(read_hello(&mut &h[..], &tok, Some(b"other"), ok).is_err());
        assert!(read_hello(&mut &h[..], &tok, Some(b"secret"), |_| false).is_err());
        let no_st = encode_hello(5, &tok, None);
        assert!(read_hello(&mut &no_st[..], &tok, Some(b"secret"), ok).is_err());
        assert_eq!(read_hello(&mut &no_st[..], &tok, None, ok).unwrap(), 5);
        let mut bad = h.clone();
        bad[0] = b'X';
        assert!(read_hello(&mut &bad[..], &tok, Some(b"secret"), ok).is_err());
        assert!(read_hello(&mut &h[..20], &tok, Some(b"secret"), ok).is_err());
    }
}
