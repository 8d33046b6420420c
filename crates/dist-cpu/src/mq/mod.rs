//! # MessageQueue: one writer broadcasting messages to `n` readers
//!
//! The Rust counterpart of vLLM's `shm_broadcast.MessageQueue` (SPEC §3.7): the engine's
//! scheduler (the writer) broadcasts each step's work to every worker (the readers). Readers on
//! the writer's node read a ring in shared memory; readers on other nodes get the same messages
//! over TCP. Messages are bytes or typed serde values (postcard, size-capped): nothing untyped is
//! ever deserialised — vLLM unpickles whatever arrives (CVE-2024-11041, SPEC §9.11).
//!
//! ## The ring
//! One [`Segment`](crate::shm::Segment) holds `max_chunks` chunks of `max_chunk_bytes`, a header
//! per chunk, one 128-byte slot per local reader and a few futex words (layout in `ring.rs`).
//! Instead of vLLM's per-chunk `written`/`read` flag bytes, state is two kinds of monotonic
//! sequence numbers:
//!
//! - `write_seq`: chunks the writer has published; chunk `k` lives in slot `k % max_chunks`;
//! - `read_seq[i]`: chunks reader `i` has consumed.
//!
//! Chunk `k` is readable by reader `i` when `write_seq > k == read_seq[i]`; the writer may fill
//! chunk `k` when every `read_seq[i] > k - max_chunks`. This makes the diagnosis vLLM lacks
//! (SPEC §9.1) a subtraction: a reader with `read_seq[i] < write_seq` has not read chunk
//! `read_seq[i]`, published at a time the writer remembers — see [`MessageQueue::stuck_readers`],
//! logged every `warn_interval` while the writer waits and put in its timeout error.
//!
//! ## Messages larger than a chunk
//! They are split across consecutive chunks, each header saying `FIRST`/`LAST` and the total
//! length. Order is kept for free (the chunks are in the one sequence), nothing goes through a
//! second channel (vLLM sends them over a ZMQ socket), and a message larger than the whole ring
//! streams through it: readers consume chunk `k` while the writer fills `k + 1`. The writer waits
//! for room for `min(chunks of the message, max_chunks)` chunks before writing the first one, so
//! a message that fits in the ring is never left half-written by a timeout; only a message larger
//! than the ring can time out in the middle, and that aborts the queue (readers get
//! [`Error::Shutdown`] instead of waiting for a tail that will not come). A reader whose dequeue
//! times out in the middle of a message keeps what it has and resumes on the next call.
//!
//! ## Waiting
//! Both sides spin a few hundred iterations, yield for [`Options::busy_wait`], then sleep on a
//! futex word in the segment: the data word (the writer bumps it after publishing, readers sleep
//! on it) and the space word (readers bump it after consuming, the writer sleeps on it). Wakes are
//! system calls, so each side counts its sleepers and the other side only calls `FUTEX_WAKE` when
//! someone sleeps (a store–fence–load handshake on both sides rules out lost wake-ups). Sleeps are
//! sliced (10 ms) so that a wait also notices shutdown, a dead peer and its deadline.
//!
//! ## Liveness
//! Each local reader records its pid, start time and pid namespace in its slot when it attaches;
//! the writer checks them (in `/proc`) at most every 10 ms on enqueue and on every slice of a wait,
//! so a reader killed mid-stream makes the writer's next enqueue fail with
//! [`Error::PeerLost`] naming its rank, well within the deadline. Readers check the writer the
//! same way. Remote readers are watched through their socket (EOF or an error).
//!
//! ## Readers on other nodes
//! The writer listens on TCP (std::net; frames of `u64` length + bytes, capped before allocation).
//! Each remote reader connects and proves itself with the queue's random 16-byte token from the
//! [`Handle`] (and the store's shared secret when one is configured); the writer accepts each
//! expected reader once and drops everything else. A sender thread per remote reader drains a
//! bounded queue (`max_chunks` messages), so a slow remote reader applies back-pressure exactly
//! like a slow local one and shows up in the same stuck-reader report. The token travels in
//! clear text, like the store's: the link is meant for a trusted cluster network.
//!
//! ## Building one
//! [`MessageQueue::create_from_group`] is collective over a [`HostGroup`]: the writer creates the
//! ring and broadcasts its name; every other rank tries to open it (the definition of "same node":
//! it can open the segment and finds the right token in it — no hostname guessing), the results
//! are all-gathered, the writer starts a listener if anyone could not, and broadcasts the final
//! [`Handle`]. Then [`MessageQueue::wait_until_ready`] (collective) waits until every reader has
//! attached or connected. [`Options::force_remote`] (or `DIST_MQ_FORCE_REMOTE=1`) sends every
//! reader over TCP, for tests. Without a group: [`MessageQueue::create_writer`] +
//! [`MessageQueue::handle`] + [`MessageQueue::open_reader`].
//!
//! ## Shutdown
//! [`MessageQueue::shutdown`] on a reader wakes that reader's blocked `dequeue` (from another
//! thread) with [`Error::Shutdown`]; later calls fail the same way. On the writer it closes the
//! queue: readers first drain what was published, then get [`Error::Shutdown`]. Dropping the
//! writer shuts it down. A reader that shuts down (or is dropped) will not read again, so it
//! tells the writer (its ring slot is marked as left; a TCP reader closes its socket) and the
//! writer's next enqueue fails with [`Error::PeerLost`] naming it instead of filling up and
//! timing out.
//!
//! ## Example
//! ```
//! use std::time::Duration;
//! use dist_core::local::run_threads;
//! use dist_cpu::mq::MessageQueue;
//!
//! let out = run_threads(3, Duration::from_secs(10), |rank, group| {
//!     let mq = MessageQueue::create_from_group(&group, 0, 1 << 16, 4).unwrap();
//!     if mq.is_writer() {
//!         mq.enqueue(&vec![1u64, 2, 3]).unwrap();
//!         vec![1, 2, 3]
//!     } else {
//!         mq.dequeue::<Vec<u64>>().unwrap()
//!     }
//! });
//! assert!(out.into_iter().all(|r| r.unwrap() == vec![1, 2, 3]));
//! ```

pub mod bench;
mod proc;
mod remote;
mod ring;

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dist_core::{decode_obj, encode_obj, Error, HostGroup, HostGroupExt, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::shm::{futex_wait, futex_wake, SPIN_ITERS};
use proc::{Liveness, ProcId};
use remote::{Acceptor, Inbound, Link, RecvEnd, KIND_MSG, KIND_READY, KIND_SHUTDOWN};
use ring::{Geometry, Ring, FLAG_FIRST, FLAG_LAST};

/// Longest single sleep inside a wait: the period at which a wait notices shutdown, dead peers,
/// warnings and its deadline.
const POLL_SLICE: Duration = Duration::from_millis(10);
/// How often an enqueue that does not wait checks that the readers are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(10);
/// Hard cap on any message, whatever the options say (16 GiB).
const HARD_MAX_MESSAGE: usize = 16 << 30;

/// Settings of a queue. Everything has a default; the writer's chunk settings travel in the
/// [`Handle`], the waiting settings are each side's own.
#[derive(Clone)]
pub struct Options {
    /// Bytes per ring chunk (vLLM's `max_chunk_bytes`). Default 4 MiB (vLLM's GroupCoordinator).
    pub max_chunk_bytes: usize,
    /// Chunks in the ring (vLLM's `max_chunks`). Default 6.
    pub max_chunks: usize,
    /// Deadline of `enqueue_bytes`, `dequeue_bytes` and the typed calls without an explicit
    /// timeout, and of setting up. Default 300 s.
    pub timeout: Duration,
    /// While a writer waits for a free chunk, it logs the stuck readers this often. Default 60 s,
    /// or `VLLM_RINGBUFFER_WARNING_INTERVAL` (seconds) when set.
    pub warn_interval: Duration,
    /// Largest message accepted (checked before anything is allocated). Default 1 GiB.
    pub max_message_bytes: usize,
    /// How long a wait yields the CPU in a loop before it sleeps on the futex. Longer lowers
    /// latency when cores are free and wastes CPU when they are not. Default 50 µs.
    pub busy_wait: Duration,
    /// Every reader goes over TCP, even on the writer's node (tests). `DIST_MQ_FORCE_REMOTE=1`
    /// does the same.
    pub force_remote: bool,
    /// Address the writer listens on for remote readers. Default: `DIST_HOST_IP` or
    /// `VLLM_HOST_IP`, else the address of the interface that routes to `MASTER_ADDR`, else
    /// loopback.
    pub bind_ip: Option<IpAddr>,
    /// The store's shared secret, when the job uses one: remote readers must present it too.
    /// Default: the contents of `DIST_STORE_TOKEN_FILE` when set.
    pub store_token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("max_chunk_bytes", &self.max_chunk_bytes)
            .field("max_chunks", &self.max_chunks)
            .field("timeout", &self.timeout)
            .field("warn_interval", &self.warn_interval)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("busy_wait", &self.busy_wait)
            .field("force_remote", &self.force_remote)
            .field("bind_ip", &self.bind_ip)
            .field(
                "store_token",
                &self.store_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        let warn = std::env::var("VLLM_RINGBUFFER_WARNING_INTERVAL")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(Duration::from_secs(60));
        Options {
            max_chunk_bytes: 4 << 20,
            max_chunks: 6,
            timeout: dist_core::DEFAULT_TIMEOUT,
            warn_interval: warn,
            max_message_bytes: 1 << 30,
            busy_wait: Duration::from_micros(50),
            force_remote: false,
            bind_ip: None,
            store_token: store_token_from_env(),
        }
    }
}

/// The store's shared secret named by `DIST_STORE_TOKEN_FILE` (set by `dist run --token-file`),
/// trailing whitespace removed; `None` when unset or unreadable.
fn store_token_from_env() -> Option<Vec<u8>> {
    use std::io::Read;
    let path = std::env::var_os("DIST_STORE_TOKEN_FILE")?;
    let mut t = Vec::new();
    std::fs::File::open(&path)
        .ok()?
        .take(remote::MAX_STORE_TOKEN as u64)
        .read_to_end(&mut t)
        .ok()?;
    while t.last().is_some_and(|b| b.is_ascii_whitespace()) {
        t.pop();
    }
    Some(t)
}

/// What a rank needs to open its side of a queue; the writer makes it, a group broadcasts it.
/// Its `Debug` form hides the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// The writer's rank.
    pub writer_rank: usize,
    /// Readers that read the shared-memory ring, in slot order.
    pub local_reader_ranks: Vec<usize>,
    /// Readers that connect over TCP.
    pub remote_reader_ranks: Vec<usize>,
    /// Name of the ring's segment (none without local readers).
    pub segment: Option<String>,
    /// Reader slots in the ring (at least the number of local readers).
    pub slots: u64,
    /// Chunks in the ring.
    pub max_chunks: u64,
    /// Bytes per chunk.
    pub max_chunk_bytes: u64,
    /// Largest message.
    pub max_message_bytes: u64,
    /// `ip:port` the writer listens on for remote readers.
    pub remote_addr: Option<String>,
    /// The queue's secret: in the ring's header and in every remote reader's hello.
    pub token: [u8; 16],
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("writer_rank", &self.writer_rank)
            .field("local_reader_ranks", &self.local_reader_ranks)
            .field("remote_reader_ranks", &self.remote_reader_ranks)
            .field("segment", &self.segment)
            .field("slots", &self.slots)
            .field("max_chunks", &self.max_chunks)
            .field("max_chunk_bytes", &self.max_chunk_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("remote_addr", &self.remote_addr)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Handle {
    fn geometry(&self) -> Result<Geometry> {
        Geometry::new(
            usize::try_from(self.slots).map_err(|_| Error::invalid("mq handle: slots"))?,
            usize::try_from(self.max_chunks).map_err(|_| Error::invalid("mq handle: chunks"))?,
            usize::try_from(self.max_chunk_bytes)
                .map_err(|_| Error::invalid("mq handle: chunk bytes"))?,
        )
    }
}

/// What the writer broadcasts first in [`MessageQueue::create_from_group`]: where its ring is, so
/// every rank can try to open it.
#[derive(Serialize, Deserialize)]
struct RingInfo {
    name: String,
    slots: u64,
    chunks: u64,
    chunk_bytes: u64,
    token: [u8; 16],
}

/// A reader holding up the writer: what it has not read, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckReader {
    /// The reader's rank.
    pub rank: usize,
    /// True for a reader over TCP (then `oldest_unread` counts messages, not chunks).
    pub remote: bool,
    /// The oldest chunk (local) or message (remote) it has not read.
    pub oldest_unread: u64,
    /// How many chunks (local) or messages (remote) it has not read.
    pub unread: u64,
    /// How long ago the oldest unread one was published.
    pub waited: Duration,
}

impl std::fmt::Display for StuckReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.remote {
            write!(
                f,
                "remote reader rank {} has not taken message {} ({} queued) for {:.3?}",
                self.rank, self.oldest_unread, self.unread, self.waited
            )
        } else {
            write!(
                f,
                "reader rank {} has not read chunk {} ({} unread) for {:.3?}",
                self.rank, self.oldest_unread, self.unread, self.waited
            )
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
}

/// Wakes every sleeper of `word` after bumping it.
fn bump_and_wake(word: &AtomicU32) {
    word.fetch_add(1, Ordering::Release);
    futex_wake(word, i32::MAX);
}

/// Spin, yield for `busy`, then sleep on `word` (announcing the sleep in `sleepers`) in slices
/// of [`POLL_SLICE`], calling `poll` between slices. `Ok(true)`: `ready()` became true;
/// `Ok(false)`: the deadline passed.
fn wait_on(
    word: &AtomicU32,
    sleepers: &AtomicU32,
    deadline: Instant,
    busy: Duration,
    mut ready: impl FnMut() -> bool,
    mut poll: impl FnMut() -> Result<()>,
) -> Result<bool> {
    for _ in 0..SPIN_ITERS {
        if ready() {
            return Ok(true);
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    while start.elapsed() < busy {
        if ready() {
            return Ok(true);
        }
        std::thread::yield_now();
    }
    loop {
        // Ready wins over whatever `poll` would report (e.g. data published before a shutdown).
        if ready() {
            return Ok(true);
        }
        poll()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(ready());
        }
        sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let s = word.load(Ordering::SeqCst);
        if ready() {
            sleepers.fetch_sub(1, Ordering::SeqCst);
            return Ok(true);
        }
        futex_wait(word, s, (deadline - now).min(POLL_SLICE));
        sleepers.fetch_sub(1, Ordering::SeqCst);
        if ready() {
            return Ok(true);
        }
    }
}

/// The IP the writer listens on by default (see [`Options::bind_ip`]).
fn default_ip() -> IpAddr {
    for var in ["DIST_HOST_IP", "VLLM_HOST_IP"] {
        if let Some(ip) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
            return ip;
        }
    }
    if let Ok(master) = std::env::var("MASTER_ADDR") {
        let target = format!("{}:80", master.trim());
        if let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&target) {
            for a in addrs {
                let any: IpAddr = if a.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                // A UDP "connect" sends nothing; it only picks the route and the local address.
                if let Ok(s) = std::net::UdpSocket::bind((any, 0)) {
                    if s.connect(a).is_ok() {
                        if let Ok(l) = s.local_addr() {
                            return l.ip();
                        }
                    }
                }
            }
        }
    }
    Ipv4Addr::LOCALHOST.into()
}

// -------------------------------------------------------------------------------------------
// The three roles
// -------------------------------------------------------------------------------------------

#[derive(Debug)]
struct WriterState {
    /// Next chunk sequence number.
    next_seq: u64,
    /// A lower bound of `min(read_seq)`, refreshed when it is not enough.
    min_read: u64,
    /// Messages enqueued so far.
    msg_no: u64,
    last_live_check: Instant,
    /// Why the queue cannot be used any more.
    broken: Option<String>,
}

#[derive(Debug)]
struct Writer {
    ring: Option<Ring>,
    acceptor: Option<Arc<Acceptor>>,
    state: Mutex<WriterState>,
    /// When each slot's chunk was published, in ns since `epoch` (for the stuck report).
    published_ns: Vec<AtomicU64>,
    epoch: Instant,
}

#[derive(Debug)]
struct ReaderState {
    next_seq: u64,
    /// A message being assembled: bytes so far and the total length.
    partial: Option<(Vec<u8>, u64)>,
    broken: Option<String>,
}

#[derive(Debug)]
struct LocalReader {
    ring: Ring,
    slot: usize,
    state: Mutex<ReaderState>,
    writer_id: ProcId,
}

#[derive(Debug)]
struct RemoteState {
    inbound: Inbound,
    /// Messages that arrived while waiting for READY.
    stash: std::collections::VecDeque<Vec<u8>>,
    ready: bool,
    broken: Option<String>,
}

#[derive(Debug)]
struct RemoteReader {
    state: Mutex<RemoteState>,
    /// A clone of the socket, to unblock a pending read on shutdown.
    control: TcpStream,
}

#[derive(Debug)]
enum Role {
    Writer(Writer),
    Local(LocalReader),
    Remote(RemoteReader),
}

/// One rank's side of a broadcast queue: the writer or one of the readers.
///
/// The writer calls [`MessageQueue::enqueue_bytes`] / [`MessageQueue::enqueue`]; readers call
/// [`MessageQueue::dequeue_bytes`] / [`MessageQueue::dequeue`]. Every call has a deadline
/// ([`Options::timeout`] or an explicit one). All methods take `&self`; calls on one side are
/// serialised internally, and [`MessageQueue::shutdown`] may be called from another thread to
/// wake a blocked call.
#[derive(Debug)]
pub struct MessageQueue {
    rank: usize,
    handle: Handle,
    opts: Options,
    role: Role,
    cancel: AtomicBool,
    me: ProcId,
}

static QUEUE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl MessageQueue {
    /// Collective over `group`: makes a queue whose writer is `writer_rank` and whose readers are
    /// all the other ranks, with `max_chunks` chunks of `max_chunk_bytes`; returns once every
    /// reader is attached ([`MessageQueue::wait_until_ready`]). Deadlines: `group.timeout()`.
    pub fn create_from_group(
        group: &dyn HostGroup,
        writer_rank: usize,
        max_chunk_bytes: usize,
        max_chunks: usize,
    ) -> Result<MessageQueue> {
        let opts = Options {
            max_chunk_bytes,
            max_chunks,
            timeout: group.timeout(),
            ..Options::default()
        };
        Self::create_from_group_with(group, writer_rank, opts, true)
    }

    /// [`MessageQueue::create_from_group`] with every option; `blocking = false` skips
    /// [`MessageQueue::wait_until_ready`] (each rank must then call it).
    pub fn create_from_group_with(
        group: &dyn HostGroup,
        writer_rank: usize,
        opts: Options,
        blocking: bool,
    ) -> Result<MessageQueue> {
        let ws = group.world_size();
        let rank = group.rank();
        crate::ensure_arg!(
            writer_rank < ws,
            "mq: writer rank {writer_rank} out of range for world size {ws}"
        );
        let readers: Vec<usize> = (0..ws).filter(|&r| r != writer_rank).collect();
        let force_remote = opts.force_remote || env_flag("DIST_MQ_FORCE_REMOTE");

        // 1. The writer makes a ring with a slot for every possible reader and says where it is.
        type Probe = std::result::Result<Option<RingInfo>, String>;
        let mut my_ring = None;
        let mut token = [0u8; 16];
        let probe: Option<Probe> = (rank == writer_rank).then(|| {
            let made = (|| -> Result<Option<RingInfo>> {
                token =
                    proc::random_token().map_err(|e| Error::io("mq: reading /dev/urandom", e))?;
                if readers.is_empty() || force_remote {
                    return Ok(None);
                }
                let geo = Geometry::new(readers.len(), opts.max_chunks, opts.max_chunk_bytes)?;
                crate::shm::remove_stale_segments();
                let ring = Ring::create(&Self::segment_tag(), geo, &token, &proc::me())?;
                let p = RingInfo {
                    name: ring.name().to_string(),
                    slots: geo.slots as u64,
                    chunks: geo.chunks as u64,
                    chunk_bytes: geo.chunk_bytes as u64,
                    token,
                };
                my_ring = Some(ring);
                Ok(Some(p))
            })();
            made.map_err(|e| e.to_string())
        });
        let probe: Probe = group.broadcast_obj(probe.as_ref(), writer_rank)?;
        let probe = probe.map_err(|e| Error::Backend {
            backend: "shm",
            code: None,
            message: format!("mq: the writer (rank {writer_rank}) could not make the queue: {e}"),
        })?;

        // 2. Every reader tries to open it: "same node" means exactly that.
        let mut opened = None;
        if rank != writer_rank && !force_remote {
            if let Some(p) = &probe {
                let geo =
                    Geometry::new(p.slots as usize, p.chunks as usize, p.chunk_bytes as usize)?;
                opened = Ring::open(&p.name, geo, &p.token, Duration::ZERO).ok();
            }
        }
        let local_flags: Vec<bool> = group.all_gather_obj(&opened.is_some())?;

        // 3. The writer splits the readers, starts the listener if needed and sends the handle.
        let local: Vec<usize> = readers
            .iter()
            .copied()
            .filter(|&r| local_flags[r])
            .collect();
        let remote: Vec<usize> = readers
            .iter()
            .copied()
            .filter(|&r| !local_flags[r])
            .collect();
        let mut writer = None;
        let handle: Option<std::result::Result<Handle, String>> =
            (rank == writer_rank).then(|| {
                match Self::new_writer(
                    rank,
                    my_ring.take(),
                    local.clone(),
                    remote.clone(),
                    token,
                    opts.clone(),
                ) {
                    Ok(w) => {
                        let h = w.handle.clone();
                        writer = Some(w);
                        Ok(h)
                    }
                    Err(e) => Err(e.to_string()),
                }
            });
        let handle: std::result::Result<Handle, String> =
            group.broadcast_obj(handle.as_ref(), writer_rank)?;
        let handle = handle.map_err(|e| Error::Backend {
            backend: "shm",
            code: None,
            message: format!("mq: the writer (rank {writer_rank}) could not start the queue: {e}"),
        })?;
        let mq = match writer {
            Some(w) => w,
            None => Self::open_reader_with(&handle, rank, opts.clone(), opened)?,
        };
        if blocking {
            mq.wait_until_ready(opts.timeout)?;
        }
        Ok(mq)
    }

    fn segment_tag() -> String {
        let salt = proc::random_token().map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
        format!(
            "mq.{}.{salt:08x}",
            QUEUE_COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Makes the writer's side without a group: `local_reader_ranks` read shared memory (on this
    /// node), `remote_reader_ranks` connect over TCP. Give [`MessageQueue::handle`] to the readers.
    pub fn create_writer(
        writer_rank: usize,
        local_reader_ranks: &[usize],
        remote_reader_ranks: &[usize],
        opts: Options,
    ) -> Result<MessageQueue> {
        let mut all: Vec<usize> = local_reader_ranks
            .iter()
            .chain(remote_reader_ranks)
            .copied()
            .collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        crate::ensure_arg!(
            all.len() == n && !all.contains(&writer_rank),
            "mq: reader ranks must be distinct and differ from the writer's ({writer_rank})"
        );
        let token = proc::random_token().map_err(|e| Error::io("mq: reading /dev/urandom", e))?;
        let ring = if local_reader_ranks.is_empty() {
            None
        } else {
            let geo = Geometry::new(
                local_reader_ranks.len(),
                opts.max_chunks,
                opts.max_chunk_bytes,
            )?;
            crate::shm::remove_stale_segments();
            Some(Ring::create(
                &Self::segment_tag(),
                geo,
                &token,
                &proc::me(),
            )?)
        };
        Self::new_writer(
            writer_rank,
            ring,
            local_reader_ranks.to_vec(),
            remote_reader_ranks.to_vec(),
            token,
            opts,
        )
    }

    fn new_writer(
        writer_rank: usize,
        ring: Option<Ring>,
        local: Vec<usize>,
        remote: Vec<usize>,
        token: [u8; 16],
        opts: Options,
    ) -> Result<MessageQueue> {
        crate::ensure_arg!(
            opts.max_message_bytes <= HARD_MAX_MESSAGE,
            "mq: max_message_bytes {} over the hard cap {HARD_MAX_MESSAGE}",
            opts.max_message_bytes
        );
        let geo = Geometry::new(local.len(), opts.max_chunks, opts.max_chunk_bytes)?;
        let ring = if local.is_empty() { None } else { ring };
        crate::ensure_arg!(
            local.is_empty() || ring.is_some(),
            "mq: local readers need a ring"
        );
        let (acceptor, remote_addr) = if remote.is_empty() {
            (None, None)
        } else {
            let ip = opts.bind_ip.unwrap_or_else(default_ip);
            let l = TcpListener::bind((ip, 0))
                .map_err(|e| Error::io(format!("mq: listening on {ip} for remote readers"), e))?;
            let addr = l
                .local_addr()
                .map_err(|e| Error::io("mq: listener address", e))?
                .to_string();
            let acc = Acceptor::start(
                l,
                remote.clone(),
                token,
                opts.store_token.clone(),
                opts.max_chunks,
                format!("writer rank {writer_rank}"),
            )?;
            (Some(acc), Some(addr))
        };
        let handle = Handle {
            writer_rank,
            local_reader_ranks: local,
            remote_reader_ranks: remote,
            segment: ring.as_ref().map(|r| r.name().to_string()),
            slots: ring.as_ref().map_or(geo.slots, |r| r.geo.slots) as u64,
            max_chunks: geo.chunks as u64,
            max_chunk_bytes: geo.chunk_bytes as u64,
            max_message_bytes: opts.max_message_bytes as u64,
            remote_addr,
            token,
        };
        let chunks = geo.chunks;
        Ok(MessageQueue {
            rank: writer_rank,
            handle,
            opts,
            role: Role::Writer(Writer {
                ring,
                acceptor,
                state: Mutex::new(WriterState {
                    next_seq: 0,
                    min_read: 0,
                    msg_no: 0,
                    last_live_check: Instant::now(),
                    broken: None,
                }),
                published_ns: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
                epoch: Instant::now(),
            }),
            cancel: AtomicBool::new(false),
            me: proc::me(),
        })
    }

    /// Opens reader `rank`'s side from the writer's handle: the ring if `rank` is a local reader,
    /// a TCP connection otherwise.
    pub fn open_reader(handle: &Handle, rank: usize, opts: Options) -> Result<MessageQueue> {
        Self::open_reader_with(handle, rank, opts, None)
    }

    fn open_reader_with(
        handle: &Handle,
        rank: usize,
        mut opts: Options,
        opened: Option<Ring>,
    ) -> Result<MessageQueue> {
        let geo = handle.geometry()?;
        crate::ensure_arg!(
            handle.max_message_bytes as usize <= HARD_MAX_MESSAGE,
            "mq handle: max_message_bytes {} over the hard cap",
            handle.max_message_bytes
        );
        opts.max_message_bytes = handle.max_message_bytes as usize;
        opts.max_chunks = geo.chunks;
        opts.max_chunk_bytes = geo.chunk_bytes;
        let me = proc::me();
        let deadline = Instant::now() + opts.timeout;
        let role = if let Some(slot) = handle.local_reader_ranks.iter().position(|&r| r == rank) {
            let name = handle
                .segment
                .as_deref()
                .ok_or_else(|| Error::invalid("mq handle: local readers but no segment"))?;
            crate::ensure_arg!(
                slot < geo.slots,
                "mq handle: {} local readers but {} slots",
                handle.local_reader_ranks.len(),
                geo.slots
            );
            let ring = match opened {
                Some(r) => r,
                None => Ring::open(name, geo, &handle.token, opts.timeout)?,
            };
            // Attach: say who we are, then tell a writer that may be waiting for us.
            ring.set_reader_id(slot, &me);
            ring.attached(slot)
                .store(ring::SLOT_ATTACHED, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if ring.writer_waiting().load(Ordering::SeqCst) != 0 {
                bump_and_wake(ring.space_futex());
            }
            let writer_id = ring.writer_id();
            Role::Local(LocalReader {
                ring,
                slot,
                state: Mutex::new(ReaderState {
                    next_seq: 0,
                    partial: None,
                    broken: None,
                }),
                writer_id,
            })
        } else if handle.remote_reader_ranks.contains(&rank) {
            let addr = handle
                .remote_addr
                .as_deref()
                .ok_or_else(|| Error::invalid("mq handle: remote readers but no address"))?;
            let inbound = Inbound::connect(
                addr,
                rank,
                &handle.token,
                opts.store_token.as_deref(),
                opts.max_message_bytes,
                deadline,
            )?;
            let control = inbound
                .stream
                .try_clone()
                .map_err(|e| Error::io("mq: cloning the reader's socket", e))?;
            Role::Remote(RemoteReader {
                state: Mutex::new(RemoteState {
                    inbound,
                    stash: Default::default(),
                    ready: false,
                    broken: None,
                }),
                control,
            })
        } else {
            return Err(Error::invalid(format!(
                "mq: rank {rank} is not a reader of this queue (writer {}, local readers {:?}, remote readers {:?})",
                handle.writer_rank, handle.local_reader_ranks, handle.remote_reader_ranks
            )));
        };
        Ok(MessageQueue {
            rank,
            handle: handle.clone(),
            opts,
            role,
            cancel: AtomicBool::new(false),
            me,
        })
    }

    /// The handle readers open this queue with.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// True on the writer's side.
    pub fn is_writer(&self) -> bool {
        matches!(self.role, Role::Writer(_))
    }
    /// True for a reader that reads over TCP.
    pub fn is_remote_reader(&self) -> bool {
        matches!(self.role, Role::Remote(_))
    }
    /// This side's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The options this side runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn op(&self, what: &str) -> String {
        if self.is_writer() {
            format!("mq {what} (writer rank {})", self.rank)
        } else {
            format!(
                "mq {what} (reader rank {}, writer rank {})",
                self.rank, self.handle.writer_rank
            )
        }
    }

    // ---------------------------------------------------------------------------------------
    // Readiness
    // ---------------------------------------------------------------------------------------

    /// Collective: the writer waits until every reader has attached (local) or connected and
    /// proved its token (remote), then releases them; readers wait for that. Fails after
    /// `timeout` naming the ranks that did not come.
    pub fn wait_until_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let op = self.op("wait_until_ready");
        match &self.role {
            Role::Writer(w) => {
                if let Some(ring) = &w.ring {
                    let n = self.handle.local_reader_ranks.len();
                    let all_attached = || {
                        (0..n).all(|i| ring.attached(i).load(Ordering::SeqCst) != ring::SLOT_EMPTY)
                    };
                    let ok = wait_on(
                        ring.space_futex(),
                        ring.writer_waiting(),
                        deadline,
                        self.opts.busy_wait,
                        all_attached,
                        || self.check_cancel(&op),
                    )?;
                    if !ok {
                        let missing = (0..n)
                            .filter(|&i| {
                                ring.attached(i).load(Ordering::SeqCst) == ring::SLOT_EMPTY
                            })
                            .map(|i| self.handle.local_reader_ranks[i])
                            .collect();
                        return Err(Error::Timeout {
                            op,
                            waited: start.elapsed(),
                            missing_ranks: missing,
                            detail: "local readers did not attach to the ring".into(),
                        });
                    }
                }
                if let Some(acc) = &w.acceptor {
                    let mut links = lock(&acc.links);
                    while links.iter().any(Option::is_none) {
                        self.check_cancel(&op)?;
                        let now = Instant::now();
                        if now >= deadline {
                            let missing = links
                                .iter()
                                .zip(&self.handle.remote_reader_ranks)
                                .filter(|(l, _)| l.is_none())
                                .map(|(_, &r)| r)
                                .collect();
                            return Err(Error::Timeout {
                                op,
                                waited: start.elapsed(),
                                missing_ranks: missing,
                                detail: format!(
                                    "remote readers did not connect to {} with the queue's token",
                                    self.handle.remote_addr.as_deref().unwrap_or("?")
                                ),
                            });
                        }
                        links = acc
                            .cv
                            .wait_timeout(links, (deadline - now).min(POLL_SLICE))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    let ready = Arc::new(remote::encode_frame(KIND_READY, &[]));
                    for l in links.iter().flatten() {
                        l.push(u64::MAX, ready.clone());
                    }
                }
                if let Some(ring) = &w.ring {
                    ring.ready().store(1, Ordering::SeqCst);
                    bump_and_wake(ring.data_futex());
                }
                Ok(())
            }
            Role::Local(r) => {
                let ring = &r.ring;
                let ok = wait_on(
                    ring.data_futex(),
                    ring.readers_sleeping(),
                    deadline,
                    self.opts.busy_wait,
                    || ring.ready().load(Ordering::SeqCst) != 0,
                    || {
                        self.check_cancel(&op)?;
                        if ring.shutdown().load(Ordering::Acquire) != ring::SHUTDOWN_NONE {
                            return Err(Error::Shutdown(format!(
                                "{op}: the writer shut the queue down"
                            )));
                        }
                        self.check_writer_alive(&r.writer_id, &op)
                    },
                )?;
                if ok {
                    Ok(())
                } else {
                    Err(Error::Timeout {
                        op,
                        waited: start.elapsed(),
                        missing_ranks: vec![self.handle.writer_rank],
                        detail: "the writer did not release the readers (are all readers up?)"
                            .into(),
                    })
                }
            }
            Role::Remote(r) => {
                let mut st = lock(&r.state);
                while !st.ready {
                    let f = self.recv_frame(&mut st, deadline, start, &op)?;
                    match f {
                        Some(p) => st.stash.push_back(p),
                        None => st.ready = true,
                    }
                }
                Ok(())
            }
        }
    }

    fn check_cancel(&self, op: &str) -> Result<()> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(Error::Shutdown(format!("{op}: this queue was shut down")));
        }
        Ok(())
    }

    fn check_writer_alive(&self, writer: &ProcId, op: &str) -> Result<()> {
        if let Liveness::Dead(why) = proc::liveness(writer, &self.me) {
            return Err(Error::PeerLost {
                rank: self.handle.writer_rank,
                op: op.to_string(),
                detail: format!("the writer's {why}"),
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Writer
    // ---------------------------------------------------------------------------------------

    /// Broadcasts `data` to every reader, waiting at most [`Options::timeout`] for room.
    pub fn enqueue_bytes(&self, data: &[u8]) -> Result<()> {
        self.enqueue_bytes_timeout(data, self.opts.timeout)
    }

    /// Broadcasts a typed value (postcard).
    pub fn enqueue<T: Serialize + ?Sized>(&self, obj: &T) -> Result<()> {
        self.enqueue_bytes(&encode_obj(obj)?)
    }

    /// Broadcasts a typed value, waiting at most `timeout`.
    pub fn enqueue_timeout<T: Serialize + ?Sized>(&self, obj: &T, timeout: Duration) -> Result<()> {
        self.enqueue_bytes_timeout(&encode_obj(obj)?, timeout)
    }

    /// Broadcasts `data`, waiting at most `timeout` for room in the ring and in every remote
    /// reader's queue. On a timeout the error names the readers holding the writer up and what
    /// they have not read; the message was not sent (except for a message larger than the whole
    /// ring cut in the middle, which aborts the queue).
    pub fn enqueue_bytes_timeout(&self, data: &[u8], timeout: Duration) -> Result<()> {
        let Role::Writer(w) = &self.role else {
            return Err(Error::invalid(format!(
                "mq: rank {} is a reader; only the writer (rank {}) enqueues",
                self.rank, self.handle.writer_rank
            )));
        };
        let op = self.op("enqueue");
        crate::ensure_arg!(
            data.len() <= self.opts.max_message_bytes,
            "{op}: message of {} bytes over the cap of {} bytes",
            data.len(),
            self.opts.max_message_bytes
        );
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = lock(&w.state);
        self.check_cancel(&op)?;
        if let Some(b) = &st.broken {
            return Err(Error::Shutdown(format!("{op}: {b}")));
        }
        if st.last_live_check.elapsed() >= LIVENESS_EVERY {
            self.check_readers(w, &st, None, &op)?;
            st.last_live_check = Instant::now();
        }
        let mut next_warn = start + self.opts.warn_interval;

        // Room in every remote reader's queue first: once there, it stays (only we push).
        let links: Vec<Arc<Link>> = match &w.acceptor {
            None => Vec::new(),
            Some(acc) => {
                let mut links = lock(&acc.links);
                loop {
                    if links.iter().all(Option::is_some) {
                        break links.iter().flatten().cloned().collect();
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        let missing: Vec<usize> = links
                            .iter()
                            .zip(&self.handle.remote_reader_ranks)
                            .filter(|(l, _)| l.is_none())
                            .map(|(_, &r)| r)
                            .collect();
                        return Err(Error::Timeout {
                            op,
                            waited: start.elapsed(),
                            missing_ranks: missing,
                            detail: "remote readers have not connected".into(),
                        });
                    }
                    links = acc
                        .cv
                        .wait_timeout(links, (deadline - now).min(POLL_SLICE))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        };
        for l in &links {
            loop {
                if let Some(why) = l.lost() {
                    return Err(Error::PeerLost {
                        rank: l.rank,
                        op,
                        detail: why,
                    });
                }
                if l.has_room() {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(self.stuck_timeout(w, &st, op, start, None));
                }
                if now >= next_warn {
                    self.warn_stuck(w, &st, start);
                    next_warn += self.opts.warn_interval;
                }
                self.check_cancel(&op)?;
                l.wait_room(deadline.min(now + POLL_SLICE));
            }
        }

        // The ring.
        if let Some(ring) = &w.ring {
            let cb = ring.geo.chunk_bytes;
            let n_chunks = data.len().div_ceil(cb).max(1) as u64;
            let reserve = n_chunks.min(ring.geo.chunks as u64);
            let first = st.next_seq;
            self.wait_space(
                w,
                ring,
                &mut st,
                first + reserve - 1,
                deadline,
                start,
                &mut next_warn,
                &op,
            )?;
            for i in 0..n_chunks {
                let k = st.next_seq;
                if i >= reserve {
                    if let Err(e) =
                        self.wait_space(w, ring, &mut st, k, deadline, start, &mut next_warn, &op)
                    {
                        let why = format!(
                            "the writer gave up in the middle of a {}-byte message (chunk {i} of {n_chunks}): {e}",
                            data.len()
                        );
                        st.broken = Some(why.clone());
                        ring.shutdown()
                            .store(ring::SHUTDOWN_ABORTED, Ordering::SeqCst);
                        bump_and_wake(ring.data_futex());
                        return Err(e);
                    }
                }
                let lo = (i as usize) * cb;
                let hi = (lo + cb).min(data.len());
                let mut flags = 0;
                if i == 0 {
                    flags |= FLAG_FIRST;
                }
                if i + 1 == n_chunks {
                    flags |= FLAG_LAST;
                }
                ring.write_chunk(k, &data[lo..hi], data.len() as u64, flags);
                w.published_ns[(k % ring.geo.chunks as u64) as usize]
                    .store(w.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                ring.write_seq().store(k + 1, Ordering::Release);
                fence(Ordering::SeqCst);
                if ring.readers_sleeping().load(Ordering::SeqCst) != 0 {
                    bump_and_wake(ring.data_futex());
                }
                st.next_seq = k + 1;
            }
        }

        if !links.is_empty() {
            let frame = Arc::new(remote::encode_frame(KIND_MSG, data));
            for l in &links {
                l.push(st.msg_no, frame.clone());
            }
        }
        st.msg_no += 1;
        Ok(())
    }

    /// Waits until every local reader is done with the chunk that chunk `k` replaces.
    #[allow(clippy::too_many_arguments)]
    fn wait_space(
        &self,
        w: &Writer,
        ring: &Ring,
        st: &mut WriterState,
        k: u64,
        deadline: Instant,
        start: Instant,
        next_warn: &mut Instant,
        op: &str,
    ) -> Result<()> {
        let chunks = ring.geo.chunks as u64;
        let need = (k + 1).saturating_sub(chunks);
        if st.min_read >= need {
            return Ok(());
        }
        let n = self.handle.local_reader_ranks.len();
        let write_seq = st.next_seq;
        let min_read = || {
            (0..n)
                .map(|i| ring.read_seq(i).load(Ordering::Acquire).min(write_seq))
                .min()
                .unwrap_or(write_seq)
        };
        let m = min_read();
        if m >= need {
            st.min_read = m;
            return Ok(());
        }
        let mut last_live = Instant::now();
        let ok = wait_on(
            ring.space_futex(),
            ring.writer_waiting(),
            deadline,
            self.opts.busy_wait,
            || min_read() >= need,
            || {
                self.check_cancel(op)?;
                let now = Instant::now();
                if now.duration_since(last_live) >= POLL_SLICE {
                    last_live = now;
                    self.check_readers(w, st, Some(need), op)?;
                }
                if now >= *next_warn {
                    self.warn_stuck(w, st, start);
                    *next_warn += self.opts.warn_interval;
                }
                Ok(())
            },
        )?;
        if !ok {
            return Err(self.stuck_timeout(w, st, op.to_string(), start, Some(need)));
        }
        st.min_read = min_read();
        Ok(())
    }

    /// Fails with [`Error::PeerLost`] for a reader that is gone (only among those that have not
    /// read up to `need` chunks, when given).
    fn check_readers(
        &self,
        w: &Writer,
        st: &WriterState,
        need: Option<u64>,
        op: &str,
    ) -> Result<()> {
        if let Some(ring) = &w.ring {
            for (i, &rank) in self.handle.local_reader_ranks.iter().enumerate() {
                let read = ring.read_seq(i).load(Ordering::Acquire);
                if need.is_some_and(|n| read >= n) {
                    continue;
                }
                let progress = format!("it had read {read} of {} chunks", st.next_seq);
                match ring.attached(i).load(Ordering::Acquire) {
                    ring::SLOT_LEFT => {
                        return Err(Error::PeerLost {
                            rank,
                            op: op.to_string(),
                            detail: format!("the reader closed its end of the queue; {progress}"),
                        })
                    }
                    ring::SLOT_ATTACHED => {
                        if let Liveness::Dead(why) = proc::liveness(&ring.reader_id(i), &self.me) {
                            return Err(Error::PeerLost {
                                rank,
                                op: op.to_string(),
                                detail: format!("the reader's {why}; {progress}"),
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(acc) = &w.acceptor {
            for l in lock(&acc.links).iter().flatten() {
                l.check_peer();
                if let Some(why) = l.lost() {
                    return Err(Error::PeerLost {
                        rank: l.rank,
                        op: op.to_string(),
                        detail: why,
                    });
                }
            }
        }
        Ok(())
    }

    fn stuck_report(&self, w: &Writer, next_seq: u64) -> Vec<StuckReader> {
        let mut out = Vec::new();
        if let Some(ring) = &w.ring {
            let now = w.epoch.elapsed().as_nanos() as u64;
            for (i, &rank) in self.handle.local_reader_ranks.iter().enumerate() {
                let read = ring.read_seq(i).load(Ordering::Acquire).min(next_seq);
                if read < next_seq {
                    let at = w.published_ns[(read % ring.geo.chunks as u64) as usize]
                        .load(Ordering::Relaxed);
                    out.push(StuckReader {
                        rank,
                        remote: false,
                        oldest_unread: read,
                        unread: next_seq - read,
                        waited: Duration::from_nanos(now.saturating_sub(at)),
                    });
                }
            }
        }
        if let Some(acc) = &w.acceptor {
            for l in lock(&acc.links).iter().flatten() {
                if let Some(lag) = l.lag() {
                    out.push(StuckReader {
                        rank: l.rank,
                        remote: true,
                        oldest_unread: lag.msg_no,
                        unread: lag.queued as u64,
                        waited: lag.waited,
                    });
                }
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.waited));
        out
    }

    /// On the writer: every reader that has not read everything published, oldest first — which
    /// chunk (or remote message) it has not read and for how long. Empty on a reader. This is
    /// what the writer logs every [`Options::warn_interval`] while it waits for room.
    pub fn stuck_readers(&self) -> Vec<StuckReader> {
        match &self.role {
            Role::Writer(w) => {
                let next = w
                    .ring
                    .as_ref()
                    .map_or(0, |r| r.write_seq().load(Ordering::Acquire));
                self.stuck_report(w, next)
            }
            _ => Vec::new(),
        }
    }

    fn warn_stuck(&self, w: &Writer, st: &WriterState, start: Instant) {
        let report = self.stuck_report(w, st.next_seq);
        let list: Vec<String> = report.iter().map(ToString::to_string).collect();
        tracing::warn!(
            writer = self.rank,
            waited = ?start.elapsed(),
            "mq: no free chunk for {:.1?}; {}",
            start.elapsed(),
            if list.is_empty() { "no reader is behind (remote readers connecting?)".to_string() } else { list.join("; ") }
        );
    }

    fn stuck_timeout(
        &self,
        w: &Writer,
        st: &WriterState,
        op: String,
        start: Instant,
        need: Option<u64>,
    ) -> Error {
        let report = self.stuck_report(w, st.next_seq);
        let blocking: Vec<&StuckReader> = report
            .iter()
            .filter(|s| s.remote || need.map_or(true, |n| s.oldest_unread < n))
            .collect();
        Error::Timeout {
            op,
            waited: start.elapsed(),
            missing_ranks: blocking.iter().map(|s| s.rank).collect(),
            detail: blocking
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Readers
    // ---------------------------------------------------------------------------------------

    /// Receives the next message, waiting at most [`Options::timeout`].
    pub fn dequeue_bytes(&self) -> Result<Vec<u8>> {
        self.dequeue_bytes_timeout(self.opts.timeout)
    }

    /// Receives the next message as a typed value (postcard, capped).
    pub fn dequeue<T: DeserializeOwned>(&self) -> Result<T> {
        let b = self.dequeue_bytes()?;
        decode_obj(&b, self.opts.max_message_bytes)
    }

    /// Receives the next typed value, waiting at most `timeout`.
    pub fn dequeue_timeout<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        let b = self.dequeue_bytes_timeout(timeout)?;
        decode_obj(&b, self.opts.max_message_bytes)
    }

    /// Receives the next message, waiting at most `timeout`. A timeout in the middle of a
    /// message keeps what arrived; the next call continues it.
    pub fn dequeue_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let deadline = start + timeout;
        match &self.role {
            Role::Writer(_) => Err(Error::invalid(format!(
                "mq: rank {} is the writer; readers dequeue",
                self.rank
            ))),
            Role::Local(r) => self.dequeue_local(r, deadline, start),
            Role::Remote(r) => {
                let op = self.op("dequeue");
                let mut st = lock(&r.state);
                if let Some(m) = st.stash.pop_front() {
                    return Ok(m);
                }
                loop {
                    match self.recv_frame(&mut st, deadline, start, &op)? {
                        Some(m) => return Ok(m),
                        None => st.ready = true,
                    }
                }
            }
        }
    }

    fn dequeue_local(&self, r: &LocalReader, deadline: Instant, start: Instant) -> Result<Vec<u8>> {
        let ring = &r.ring;
        let op = self.op("dequeue");
        let mut st = lock(&r.state);
        self.check_cancel(&op)?;
        if let Some(b) = &st.broken {
            return Err(Error::protocol(format!("{op}: {b}")));
        }
        loop {
            let k = st.next_seq;
            let ready = || ring.write_seq().load(Ordering::Acquire) > k;
            if !ready() {
                let mut last_live = Instant::now();
                let ok = wait_on(
                    ring.data_futex(),
                    ring.readers_sleeping(),
                    deadline,
                    self.opts.busy_wait,
                    ready,
                    || {
                        self.check_cancel(&op)?;
                        if ready() {
                            return Ok(());
                        }
                        match ring.shutdown().load(Ordering::Acquire) {
                            ring::SHUTDOWN_NONE => {}
                            ring::SHUTDOWN_ABORTED => {
                                return Err(Error::Shutdown(format!(
                                    "{op}: the writer aborted the queue in the middle of a message"
                                )))
                            }
                            _ => {
                                return Err(Error::Shutdown(format!(
                                    "{op}: the writer shut the queue down"
                                )))
                            }
                        }
                        let now = Instant::now();
                        if now.duration_since(last_live) >= POLL_SLICE {
                            last_live = now;
                            self.check_writer_alive(&r.writer_id, &op)?;
                        }
                        Ok(())
                    },
                )?;
                if !ok {
                    let detail = match &st.partial {
                        Some((b, total)) => format!(
                            "no chunk {k} from the writer; {} of a {total}-byte message received, the rest is kept",
                            b.len()
                        ),
                        None => format!("no message from the writer (waiting for chunk {k})"),
                    };
                    return Err(Error::Timeout {
                        op,
                        waited: start.elapsed(),
                        missing_ranks: vec![self.handle.writer_rank],
                        detail,
                    });
                }
            }
            let (len, msg_len, flags) = match ring.chunk_header(k) {
                Ok(h) => h,
                Err(e) => {
                    st.broken = Some(e.to_string());
                    return Err(e);
                }
            };
            let bad = |st: &mut ReaderState, why: String| {
                let e = format!("{op}: corrupt chunk {k}: {why}");
                st.broken = Some(e.clone());
                Err(Error::protocol(e))
            };
            match st.partial.as_mut() {
                None => {
                    if flags & FLAG_FIRST == 0 {
                        return bad(&mut st, "a message continues where none started".into());
                    }
                    if msg_len > self.opts.max_message_bytes as u64 {
                        return bad(
                            &mut st,
                            format!(
                                "message of {msg_len} bytes over the cap {}",
                                self.opts.max_message_bytes
                            ),
                        );
                    }
                    if (len as u64) > msg_len || (flags & FLAG_LAST != 0 && len as u64 != msg_len) {
                        return bad(
                            &mut st,
                            format!("chunk of {len} bytes in a {msg_len}-byte message"),
                        );
                    }
                    st.partial = Some((Vec::with_capacity(msg_len as usize), msg_len));
                }
                Some((buf, total)) => {
                    let have = buf.len() as u64 + len as u64;
                    if flags & FLAG_FIRST != 0
                        || msg_len != *total
                        || have > *total
                        || (flags & FLAG_LAST != 0 && have != *total)
                    {
                        return bad(
                            &mut st,
                            "chunk does not continue the message in progress".into(),
                        );
                    }
                }
            }
            let (buf, _) = st.partial.as_mut().expect("set above");
            ring.read_chunk_into(k, len, buf);
            // Release the chunk; wake the writer if it sleeps waiting for room.
            ring.read_seq(r.slot).store(k + 1, Ordering::Release);
            fence(Ordering::SeqCst);
            if ring.writer_waiting().load(Ordering::SeqCst) != 0 {
                bump_and_wake(ring.space_futex());
            }
            st.next_seq = k + 1;
            if flags & FLAG_LAST != 0 {
                return Ok(st.partial.take().expect("set above").0);
            }
        }
    }

    /// Next frame on a remote reader: `Some(message)` or `None` for READY.
    fn recv_frame(
        &self,
        st: &mut RemoteState,
        deadline: Instant,
        start: Instant,
        op: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.check_cancel(op)?;
        if let Some(b) = &st.broken {
            return Err(Error::Shutdown(format!("{op}: {b}")));
        }
        let cancelled = || self.cancel.load(Ordering::Acquire);
        let writer = self.handle.writer_rank;
        match st.inbound.next_frame(deadline, POLL_SLICE, cancelled) {
            Ok(f) => match f.kind {
                KIND_MSG => Ok(Some(f.payload)),
                KIND_READY => Ok(None),
                KIND_SHUTDOWN => {
                    st.broken = Some("the writer shut the queue down".into());
                    Err(Error::Shutdown(format!(
                        "{op}: the writer shut the queue down"
                    )))
                }
                k => Err(Error::protocol(format!("{op}: frame kind {k}"))),
            },
            Err(_) if cancelled() => {
                Err(Error::Shutdown(format!("{op}: this queue was shut down")))
            }
            Err(RecvEnd::TimedOut) => Err(Error::Timeout {
                op: op.to_string(),
                waited: start.elapsed(),
                missing_ranks: vec![writer],
                detail: if st.inbound.dec.is_idle() {
                    "no message from the writer".into()
                } else {
                    "a message is partly received; the rest is kept".into()
                },
            }),
            Err(RecvEnd::Eof) => {
                st.broken = Some("the writer closed the connection".into());
                Err(Error::PeerLost {
                    rank: writer,
                    op: op.to_string(),
                    detail: "the writer closed the connection".into(),
                })
            }
            Err(RecvEnd::Failed(e)) => {
                st.broken = Some(format!("connection error: {e}"));
                Err(Error::PeerLost {
                    rank: writer,
                    op: op.to_string(),
                    detail: format!("connection error: {e}"),
                })
            }
            Err(RecvEnd::Bad(e)) => {
                st.broken = Some(e.to_string());
                let _ = st.inbound.stream.shutdown(std::net::Shutdown::Both);
                Err(e)
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Shutdown
    // ---------------------------------------------------------------------------------------

    /// Shuts this side down; may be called from any thread. On a reader: a `dequeue` blocked in
    /// another thread returns [`Error::Shutdown`] at once, as does every later call, and the
    /// writer's next enqueue reports this reader as gone ([`Error::PeerLost`]). On the
    /// writer: readers get [`Error::Shutdown`] once they have read what was already published;
    /// a blocked `enqueue` returns [`Error::Shutdown`].
    pub fn shutdown(&self) {
        if self.cancel.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.role {
            Role::Writer(w) => {
                if let Some(ring) = &w.ring {
                    let _ = ring.shutdown().compare_exchange(
                        ring::SHUTDOWN_NONE,
                        ring::SHUTDOWN_CLOSED,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                    bump_and_wake(ring.data_futex());
                    bump_and_wake(ring.space_futex());
                }
                if let Some(acc) = &w.acceptor {
                    acc.stop();
                    let bye = Arc::new(remote::encode_frame(KIND_SHUTDOWN, &[]));
                    for l in lock(&acc.links).iter().flatten() {
                        l.push(u64::MAX, bye.clone());
                    }
                }
            }
            Role::Local(r) => {
                // This reader will not read again: let the writer know (it names us on its
                // next enqueue) and wake our own blocked dequeue.
                r.ring
                    .attached(r.slot)
                    .store(ring::SLOT_LEFT, Ordering::SeqCst);
                bump_and_wake(r.ring.space_futex());
                bump_and_wake(r.ring.data_futex());
            }
            Role::Remote(r) => {
                let _ = r.control.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for MessageQueue {
    fn drop(&mut self) {
        self.shutdown();
        match &self.role {
            Role::Writer(w) => {
                if let Some(acc) = &w.acceptor {
                    for l in lock(&acc.links).iter().flatten() {
                        l.close(Duration::from_millis(200));
                    }
                }
            }
            Role::Local(_) | Role::Remote(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::local::run_threads;

    fn opts(chunk: usize, chunks: usize, timeout_ms: u64) -> Options {
        Options {
            max_chunk_bytes: chunk,
            max_chunks: chunks,
            timeout: Duration::from_millis(timeout_ms),
            ..Options::default()
        }
    }

    #[test]
    fn one_local_reader_in_order_with_multichunk_messages() {
        let w = MessageQueue::create_writer(0, &[1], &[], opts(64, 2, 5000)).unwrap();
        let r = MessageQueue::open_reader(w.handle(), 1, opts(64, 2, 5000)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| w.wait_until_ready(Duration::from_secs(5)).unwrap());
            r.wait_until_ready(Duration::from_secs(5)).unwrap();
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                for n in 0..300usize {
                    let msg: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
                    w.enqueue_bytes(&msg).unwrap();
                }
            });
            for n in 0..300usize {
                let got = r.dequeue_bytes().unwrap();
                assert_eq!(got.len(), n);
                assert!(got.iter().enumerate().all(|(i, &b)| b == (i * 7 + n) as u8));
            }
        });
        assert!(w.stuck_readers().is_empty());
    }

    #[test]
    fn roles_are_enforced_and_caps_checked() {
        let w = MessageQueue::create_writer(0, &[1], &[], opts(64, 2, 200)).unwrap();
        let r = MessageQueue::open_reader(w.handle(), 1, opts(64, 2, 200)).unwrap();
        assert!(matches!(w.dequeue_bytes(), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            r.enqueue_bytes(b"x"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(MessageQueue::open_reader(w.handle(), 7, opts(64, 2, 200)).is_err());
        assert!(MessageQueue::create_writer(0, &[1, 1], &[], opts(64, 2, 200)).is_err());
        assert!(MessageQueue::create_writer(0, &[0], &[], opts(64, 2, 200)).is_err());
        let small = Options {
            max_message_bytes: 10,
            ..opts(64, 2, 200)
        };
        let w2 = MessageQueue::create_writer(0, &[], &[], small).unwrap();
        assert!(matches!(
            w2.enqueue_bytes(&[0; 11]),
            Err(Error::InvalidArgument(_))
        ));
        // Typed: a wrong type is an error, not garbage.
        w.enqueue(&5u8).unwrap();
        assert!(r.dequeue::<String>().is_err());
    }

    #[test]
    fn handle_roundtrips_and_hides_its_token() {
        let w = MessageQueue::create_writer(3, &[0], &[1], opts(128, 2, 200)).unwrap();
        let h = w.handle().clone();
        let back: Handle = decode_obj(&encode_obj(&h).unwrap(), 1 << 16).unwrap();
        assert_eq!(back, h);
        assert!(h.remote_addr.is_some() && h.segment.is_some());
        assert!(!format!("{h:?}").contains(&format!("{:?}", h.token)));
    }

    #[test]
    fn group_of_one_and_group_of_two() {
        let out = run_threads(1, Duration::from_secs(5), |_, g| {
            let mq = MessageQueue::create_from_group(&g, 0, 1024, 2).unwrap();
            mq.enqueue_bytes(b"nobody listens").unwrap();
        });
        out.into_iter().for_each(|r| r.unwrap());
        let out = run_threads(2, Duration::from_secs(5), |_, g| {
            let mq = MessageQueue::create_from_group(&g, 1, 1024, 2).unwrap();
            if mq.is_writer() {
                mq.enqueue(&"hi").unwrap();
                String::new()
            } else {
                mq.dequeue::<String>().unwrap()
            }
        });
        assert_eq!(out[0].as_ref().unwrap(), "hi");
    }

    #[test]
    fn a_writer_that_cannot_build_the_queue_fails_every_rank_at_once() {
        let t = Instant::now();
        let out = run_threads(3, Duration::from_secs(20), |_, g| {
            MessageQueue::create_from_group(&g, 1, 8, 2)
                .map(|_| ())
                .unwrap_err()
        });
        for e in out {
            let e = e.unwrap();
            assert!(e.to_string().contains("max_chunk_bytes"), "{e}");
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_queue_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<MessageQueue>();
    }

    /// Garbage in the ring (a buggy or hostile writer) is a protocol error for the reader: no
    /// crash, no allocation of a claimed size over the cap.
    #[test]
    fn corrupt_chunks_are_protocol_errors() {
        for (flags, msg_len) in [
            (0, 3),
            (FLAG_FIRST | FLAG_LAST, 1 << 62),
            (FLAG_FIRST | FLAG_LAST, 2),
        ] {
            let w = MessageQueue::create_writer(0, &[1], &[], opts(64, 2, 500)).unwrap();
            let r = MessageQueue::open_reader(w.handle(), 1, opts(64, 2, 500)).unwrap();
            let Role::Writer(wr) = &w.role else {
                unreachable!()
            };
            let ring = wr.ring.as_ref().unwrap();
            ring.write_chunk(0, b"abc", msg_len, flags);
            ring.write_seq().store(1, Ordering::Release);
            let e = r.dequeue_bytes().unwrap_err();
            assert!(matches!(e, Error::Protocol(_)), "{e}");
            assert!(e.to_string().contains("corrupt chunk 0"), "{e}");
            // The reader stays broken rather than guessing where the next message starts.
            assert!(matches!(r.dequeue_bytes(), Err(Error::Protocol(_))));
        }
    }
}
