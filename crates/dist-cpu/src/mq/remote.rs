//! The TCP side of the MessageQueue (readers on other nodes): the socket shells around the
//! sans-IO parts ([`FrameDecoder`] here, the hello and the admission of connections in
//! `admission.rs`).
//!
//! Wire format, writer → reader: frames of `u64 LE length` then `length` bytes, whose first byte
//! is the kind ([`KIND_MSG`], [`KIND_READY`], [`KIND_SHUTDOWN`]); `length` is checked against the
//! queue's message cap before anything is allocated. Reader → writer: one hello right after
//! connecting (`admission.rs`), then nothing; the writer treats bytes or EOF from an admitted
//! reader as the reader going away.
//!
//! The writer's listener runs one thread ([`Acceptor`]) that polls the listener and every
//! connection still sending its hello, feeds what arrives to an `Admission` (one deadline for
//! the whole hello, a bounded table from which new connections push out the oldest), and starts
//! a [`Link`] for each reader admitted. It stops listening once every reader is in. Each link
//! has a bounded queue and a sender thread, so `enqueue` never blocks on a socket: it waits (with
//! its deadline) for room in every reader's queue and hands each sender an `Arc` of the encoded
//! frame. The reader keeps a partial frame across calls ([`FrameDecoder`], no I/O), so a
//! `dequeue` that times out halfway through a frame loses nothing.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use super::admission::{encode_hello, Admission, Outcome, RateLimit, Secrets, MAX_HELLO};

/// A message.
pub(crate) const KIND_MSG: u8 = 0;
/// The writer has every reader: `wait_until_ready` may return.
pub(crate) const KIND_READY: u8 = 1;
/// The writer shut the queue down.
pub(crate) const KIND_SHUTDOWN: u8 = 2;

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

/// New connections taken per turn of the accept loop, so that a flood cannot push a reader
/// whose hello is on its way out of the table before it is read.
const ACCEPT_BATCH: usize = 16;
/// Longest sleep of the accept loop: how soon it notices `stop`.
const ACCEPT_TICK: Duration = Duration::from_millis(50);
/// At most one line a second about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// The writer's listener state: the links of the readers that have connected so far.
#[derive(Debug)]
pub(crate) struct Acceptor {
    pub links: Mutex<Vec<Option<Arc<Link>>>>,
    pub cv: Condvar,
    stop: AtomicBool,
}

/// The accept loop's state (its thread owns it).
struct Door {
    acc: Arc<Acceptor>,
    ranks: Vec<usize>,
    secrets: Secrets,
    link_cap: usize,
    tag: String,
    admission: Admission<u64>,
    conns: HashMap<u64, (TcpStream, SocketAddr)>,
    next_id: u64,
    refusals: RateLimit,
}

impl Acceptor {
    /// Starts accepting on `listener` for the readers `ranks`, each proving `secrets`. Stops once
    /// all are connected or [`Acceptor::stop`] is called.
    pub fn start(
        listener: TcpListener,
        ranks: Vec<usize>,
        secrets: Secrets,
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
        let door = Door {
            acc: acc.clone(),
            ranks,
            secrets,
            link_cap,
            tag,
            admission: Admission::new(),
            conns: HashMap::new(),
            next_id: 0,
            refusals: RateLimit::new(REFUSAL_LOG_EVERY),
        };
        std::thread::Builder::new()
            .name("mq-accept".into())
            .spawn(move || door.run(listener))
            .map_err(|e| Error::io("mq: spawning the accept thread", e))?;
        Ok(acc)
    }

    /// Stops accepting.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.cv.notify_all();
    }
}

impl Door {
    fn run(mut self, listener: TcpListener) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(1 + super::admission::MAX_PENDING);
        loop {
            if self.acc.stop.load(Ordering::Acquire)
                || lock(&self.acc.links).iter().all(Option::is_some)
            {
                break;
            }
            let keys: Vec<u64> = self.admission.keys().collect();
            fds.clear();
            fds.push(libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for k in &keys {
                fds.push(libc::pollfd {
                    fd: self.conns[k].0.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let now = Instant::now();
            let wait = self
                .admission
                .next_deadline()
                .map_or(ACCEPT_TICK, |d| d.saturating_duration_since(now))
                .clamp(Duration::from_millis(1), ACCEPT_TICK);
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the
            // call; each descriptor is owned by `listener` or a stream in `self.conns`.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_millis() as libc::c_int,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(queue = %self.tag, "mq: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            // Hellos first, then deadlines, then new connections: a reader accepted last turn
            // is read before anyone new can push it out.
            for (k, f) in keys.iter().zip(&fds[1..]) {
                if f.revents != 0 {
                    self.read_hello(*k);
                }
            }
            for (k, why) in self.admission.expire(Instant::now()) {
                self.refuse(k, &why);
            }
            if fds[0].revents != 0 {
                self.accept(&listener);
            }
        }
        let left: Vec<u64> = self.conns.keys().copied().collect();
        for k in left {
            self.close(k);
        }
        let held = self.refusals.held();
        if held > 0 {
            tracing::warn!(queue = %self.tag, "mq: {held} more connections dropped since the last report");
        }
    }

    fn accept(&mut self, listener: &TcpListener) {
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((s, peer)) => {
                    if let Err(e) = s.set_nonblocking(true) {
                        tracing::debug!(queue = %self.tag, %peer, "mq: set_nonblocking: {e}");
                        continue;
                    }
                    let k = self.next_id;
                    self.next_id += 1;
                    self.conns.insert(k, (s, peer));
                    if let Some(old) = self.admission.arrive(k, Instant::now()) {
                        self.refuse(
                            old,
                            "pushed out by newer connections (too many pending hellos)",
                        );
                    }
                    // The hello often came with the connection: take it now.
                    self.read_hello(k);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors and the like: not this reader's fault; try again soon.
                    if let Some(held) = self.refusals.allow(Instant::now()) {
                        tracing::warn!(queue = %self.tag, held, "mq: accept failed: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    return;
                }
            }
        }
    }

    /// Reads what connection `k` has sent of its hello, without blocking.
    fn read_hello(&mut self, k: u64) {
        let mut buf = [0u8; MAX_HELLO];
        loop {
            let want = self.admission.want(k);
            let Some((s, _)) = self.conns.get_mut(&k) else {
                return;
            };
            if want == 0 {
                return;
            }
            let got = s.read(&mut buf[..want]);
            match got {
                Ok(0) => {
                    self.admission.gone(k);
                    self.refuse(k, "closed before finishing its hello");
                    return;
                }
                Ok(n) => {
                    let links = &self.acc.links;
                    let ranks = &self.ranks;
                    let expected = |r: usize| {
                        ranks
                            .iter()
                            .position(|&x| x == r)
                            .is_some_and(|i| lock(links)[i].is_none())
                    };
                    match self
                        .admission
                        .data(k, &buf[..n], Instant::now(), &self.secrets, expected)
                    {
                        None => {}
                        Some(Outcome::Admitted(rank)) => return self.admit(k, rank),
                        Some(Outcome::Dropped(why)) => return self.refuse(k, &why),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.admission.gone(k);
                    self.refuse(k, &format!("connection error: {e}"));
                    return;
                }
            }
        }
    }

    fn admit(&mut self, k: u64, rank: usize) {
        let Some((s, peer)) = self.conns.remove(&k) else {
            return;
        };
        let i = self
            .ranks
            .iter()
            .position(|&x| x == rank)
            .expect("checked by the admission");
        let mut links = lock(&self.acc.links);
        if links[i].is_some() || self.acc.stop.load(Ordering::Acquire) {
            drop(links);
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        let started = s
            .set_nonblocking(false)
            .map_err(|e| Error::io("mq: set_nonblocking", e))
            .and_then(|()| Link::start(rank, self.link_cap, s));
        match started {
            Ok(link) => {
                tracing::debug!(queue = %self.tag, rank, %peer, "mq remote reader connected");
                links[i] = Some(link);
                drop(links);
                self.acc.cv.notify_all();
            }
            Err(e) => tracing::warn!(queue = %self.tag, rank, "mq: {e}"),
        }
    }

    fn close(&mut self, k: u64) -> Option<SocketAddr> {
        self.admission.gone(k);
        let (s, peer) = self.conns.remove(&k)?;
        let _ = s.shutdown(Shutdown::Both);
        Some(peer)
    }

    /// Drops connection `k`, logging why at a bounded rate.
    fn refuse(&mut self, k: u64, why: &str) {
        let Some(peer) = self.close(k) else {
            return;
        };
        if let Some(held) = self.refusals.allow(Instant::now()) {
            if held > 0 {
                tracing::warn!(queue = %self.tag, %peer, "mq: dropped a connection: {why} ({held} more dropped since the last report)");
            } else {
                tracing::warn!(queue = %self.tag, %peer, "mq: dropped a connection: {why}");
            }
        }
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
}
