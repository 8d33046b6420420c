//! # MessageQueue: one writer broadcasting messages to `n` readers
//!
//! The Rust counterpart of vLLM's `shm_broadcast.MessageQueue`: the engine's
//! scheduler (the writer) broadcasts each step's work to every worker (the readers). Readers on
//! the writer's node read a ring in shared memory; readers on other nodes get the same messages
//! over TCP. Messages are bytes or typed serde values (postcard, size-capped): nothing untyped is
//! ever deserialised — vLLM unpickles whatever arrives (CVE-2024-11041).
//!
//! ## Where things are
//! - `setup.rs`: building a queue (collectively over a group, or by hand) and readiness;
//! - `writer.rs`: `enqueue`, room in the ring and in remote readers' queues, the stuck-reader
//!   report, shutdown; `tracker.rs`: the writer's view of its readers as a state machine with no
//!   I/O (room, who is behind since when, who is gone, how a message is cut into chunks);
//! - `reader.rs`: `dequeue` for both kinds of reader; `assembly.rs`: chunks back into messages,
//!   checked, with no I/O;
//! - `ring.rs`: the segment's layout; `remote.rs`: the TCP shells; `admission.rs`: the hello and
//!   who may connect, with no I/O.
//!
//! ## The ring
//! One [`Segment`](crate::shm::Segment) holds `max_chunks` chunks of `max_chunk_bytes`, a header
//! per chunk, one 128-byte slot per local reader and two doorbells (layout in `ring.rs`).
//! Instead of vLLM's per-chunk `written`/`read` flag bytes, state is two kinds of monotonic
//! sequence numbers:
//!
//! - `write_seq`: chunks the writer has published; chunk `k` lives in slot `k % max_chunks`;
//! - `read_seq[i]`: chunks reader `i` has consumed.
//!
//! Chunk `k` is readable by reader `i` when `write_seq > k == read_seq[i]`; the writer may fill
//! chunk `k` when every `read_seq[i] > k - max_chunks`. This makes the diagnosis vLLM lacks
//! (which reader is behind) a subtraction: a reader with `read_seq[i] < write_seq` has not read chunk
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
//! Both sides stay awake for a while, then sleep on a doorbell in the segment
//! ([`Doorbell`](crate::shm::Doorbell): a futex word and a count of sleepers, so the other side
//! makes a system call only when someone sleeps): readers on the data bell (the writer rings it
//! after publishing), the writer on the space bell (readers ring it after consuming). How long
//! they stay awake is [`Options::busy_wait`]; by default 1 ms when the node has at least two
//! cores for each of the queue's local processes, spent spinning (no system call: a message
//! reaches a waiting reader in about the time a cache line takes to move), and otherwise 50 µs
//! spent yielding the core, so eight ranks on two cores give their cores to whoever has work.
//! vLLM's readers yield in a loop for a whole second after each message. Sleeps are sliced
//! (10 ms) so that a wait also notices shutdown, a dead peer and its deadline.
//!
//! ## Liveness
//! Each local reader records its [`ProcessId`](crate::shm::ProcessId) (pid, start time, pid
//! namespace) in its slot when it attaches; the writer watches it through a pidfd (one `poll`
//! for all readers at most every 10 ms on enqueue, and on every slice of a wait), so a reader killed
//! mid-stream makes the writer's next enqueue fail with [`Error::PeerLost`] naming its rank, well
//! within the deadline, and a reused pid cannot pass for it. Readers watch the writer, the
//! creator named in the segment, the same way while they sleep. Remote readers are watched
//! through their socket (EOF or an error).
//!
//! ## Nothing left behind
//! The ring's name is removed from `/dev/shm` as soon as every local reader has attached (in
//! [`MessageQueue::create_from_group`], right after the readers report that they have), so a
//! crash of any rank after that leaves nothing behind; the memory goes when the last process
//! unmaps it. A reader that finds the writer dead before that removes the name itself.
//!
//! ## Readers on other nodes
//! The writer listens on TCP (std::net; frames of `u64` length + bytes, capped before allocation).
//! Each remote reader connects and proves itself with the queue's random 16-byte token from the
//! [`Handle`] (and the store's shared secret when one is configured); the writer admits each
//! expected reader once and drops everything else. Connections still sending their hello have 5 s
//! for the whole of it and at most 64 wait at a time, a new one pushing out the oldest, so slow
//! or junk connections cannot keep a reader out; refusals are logged about once a second. A
//! sender thread per remote reader drains a bounded queue (`max_chunks` messages), so a slow
//! remote reader applies back-pressure exactly like a slow local one and shows up in the same
//! stuck-reader report. The token travels in clear text, like the store's: the link is meant for
//! a trusted cluster network (docs/SECURITY.md).
//!
//! ## Building one
//! [`MessageQueue::create_from_group`] is collective over a
//! [`HostGroup`](dist_core::HostGroup): ranks exchange their [`NodeKey`](crate::shm::NodeKey)s
//! (the workspace's one definition of "same node", as in [`crate::shm::same_node`]); the writer
//! creates the ring for the readers on its node and a listener for the others and broadcasts the
//! [`Handle`]; every reader opens its side and they all report success or failure, so a reader
//! that cannot open its side fails every rank at once, naming it. Then
//! [`MessageQueue::wait_until_ready`] (collective) releases the readers.
//! [`Options::force_remote`] (or `DIST_MQ_FORCE_REMOTE=1`) sends a rank over TCP even on the
//! writer's node (on the writer: every reader), for tests. Without a group: [`MessageQueue::create_writer`] + [`MessageQueue::handle`] +
//! [`MessageQueue::open_reader`].
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

mod admission;
mod assembly;
mod reader;
mod remote;
mod ring;
mod secret;
mod setup;
mod tracker;
mod writer;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use dist_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::shm::Spin;
use reader::{LocalReader, RemoteReader};
use ring::Geometry;
use writer::Writer;

/// Longest single sleep inside a wait: the period at which a wait notices shutdown, dead peers,
/// warnings and its deadline.
const POLL_SLICE: Duration = Duration::from_millis(10);
/// How often an enqueue that does not wait checks that the readers are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(10);
/// Hard cap on any message, whatever the options say (16 GiB).
const HARD_MAX_MESSAGE: usize = 16 << 30;
/// [`Options::busy_wait`] by default when the node has two cores for each local party (spun).
pub const AUTO_BUSY_SPIN: Duration = Duration::from_millis(1);
/// [`Options::busy_wait`] by default on a node with fewer cores (yielded).
pub const AUTO_BUSY_YIELD: Duration = Duration::from_micros(50);

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
    /// How long a wait stays awake before it sleeps on the futex; spinning when the node has at
    /// least two cores for each of the queue's local processes, yielding otherwise. `None` (the
    /// default, unless `DIST_MQ_BUSY_WAIT_US` is set): [`AUTO_BUSY_SPIN`] or [`AUTO_BUSY_YIELD`]
    /// by the same rule. Longer lowers the latency of messages that come further apart and
    /// keeps a core busy for longer after each.
    pub busy_wait: Option<Duration>,
    /// This rank reads over TCP even on the writer's node; set on the writer, every reader does
    /// (tests). `DIST_MQ_FORCE_REMOTE=1` does the same.
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
        let secs = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
        };
        Options {
            max_chunk_bytes: 4 << 20,
            max_chunks: 6,
            timeout: dist_core::DEFAULT_TIMEOUT,
            warn_interval: secs("VLLM_RINGBUFFER_WARNING_INTERVAL")
                .filter(|s| *s > 0.0)
                .map_or(Duration::from_secs(60), Duration::from_secs_f64),
            max_message_bytes: 1 << 30,
            busy_wait: secs("DIST_MQ_BUSY_WAIT_US").map(|us| Duration::from_secs_f64(us / 1e6)),
            force_remote: false,
            bind_ip: None,
            store_token: store_token_from_env(),
        }
    }
}

impl Options {
    /// How a side of a queue with `local_parties` processes on the ring (the writer and its local
    /// readers) waits: see [`Options::busy_wait`].
    pub fn spin(&self, local_parties: usize) -> Spin {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let plenty = local_parties.saturating_mul(2) <= cores;
        let busy = self.busy_wait.unwrap_or(if plenty {
            AUTO_BUSY_SPIN
        } else {
            AUTO_BUSY_YIELD
        });
        Spin::for_parties(local_parties, busy)
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
        .take(admission::MAX_STORE_TOKEN as u64)
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
    /// The timeout of `op` (begun at `start`) waiting for the remote readers whose link is still
    /// missing (`links` in [`Self::remote_reader_ranks`] order); `detail` says what they did not do.
    pub(crate) fn remote_readers_timeout<L>(
        &self,
        op: impl std::fmt::Display,
        start: std::time::Instant,
        links: &[Option<L>],
        detail: String,
    ) -> dist_core::Error {
        dist_core::Error::Timeout {
            op: op.to_string(),
            waited: start.elapsed(),
            missing_ranks: links
                .iter()
                .zip(&self.remote_reader_ranks)
                .filter(|(l, _)| l.is_none())
                .map(|(_, &r)| r)
                .collect(),
            detail,
        }
    }
    fn geometry(&self) -> Result<Geometry> {
        Geometry::new(
            usize::try_from(self.slots).map_err(|_| Error::invalid("mq handle: slots"))?,
            usize::try_from(self.max_chunks).map_err(|_| Error::invalid("mq handle: chunks"))?,
            usize::try_from(self.max_chunk_bytes)
                .map_err(|_| Error::invalid("mq handle: chunk bytes"))?,
        )
    }
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
    /// How this side waits (from [`Options::busy_wait`] and the number of local parties).
    spin: Spin,
    role: Role,
    cancel: AtomicBool,
}

/// The name of an operation on one side, made only when an error or a log line needs it.
#[derive(Clone, Copy)]
struct Op<'a> {
    mq: &'a MessageQueue,
    what: &'static str,
}

impl std::fmt::Display for Op<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mq.is_writer() {
            write!(f, "mq {} (writer rank {})", self.what, self.mq.rank)
        } else {
            write!(
                f,
                "mq {} (reader rank {}, writer rank {})",
                self.what, self.mq.rank, self.mq.handle.writer_rank
            )
        }
    }
}

impl MessageQueue {
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

    fn op(&self, what: &'static str) -> Op<'_> {
        Op { mq: self, what }
    }

    fn check_cancel(&self, op: Op<'_>) -> Result<()> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(Error::Shutdown(format!("{op}: this queue was shut down")));
        }
        Ok(())
    }

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
            Role::Writer(w) => w.shutdown(),
            Role::Local(r) => r.shutdown(),
            Role::Remote(r) => r.shutdown(),
        }
    }
}

impl Drop for MessageQueue {
    fn drop(&mut self) {
        self.shutdown();
        if let Role::Writer(w) = &self.role {
            w.close_links();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::local::run_threads;
    use dist_core::{decode_obj, encode_obj};
    use std::time::Instant;

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

    /// The group path removes the ring's name once the readers have attached.
    #[test]
    fn the_group_path_leaves_no_name_in_dev_shm() {
        let out = run_threads(3, Duration::from_secs(10), |_, g| {
            let mq = MessageQueue::create_from_group(&g, 0, 1024, 2).unwrap();
            let name = mq.handle().segment.clone().unwrap();
            let named = std::path::Path::new("/dev/shm").join(&name).exists();
            if mq.is_writer() {
                mq.enqueue_bytes(b"x").unwrap();
            } else {
                assert_eq!(mq.dequeue_bytes().unwrap(), b"x");
            }
            named
        });
        for named in out {
            assert!(!named.unwrap());
        }
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

    #[test]
    fn waiting_follows_the_cores() {
        let o = Options {
            busy_wait: None,
            ..Options::default()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            o.spin(cores + 1),
            Spin {
                spin: Duration::ZERO,
                yield_for: AUTO_BUSY_YIELD
            }
        );
        if cores >= 2 {
            assert_eq!(o.spin(1).spin, AUTO_BUSY_SPIN);
        }
        let fixed = Options {
            busy_wait: Some(Duration::from_micros(7)),
            ..o
        };
        assert_eq!(fixed.spin(cores + 1).yield_for, Duration::from_micros(7));
    }

    /// Garbage in the ring (a buggy or hostile writer) is a protocol error for the reader: no
    /// crash, no allocation of a claimed size over the cap.
    #[test]
    fn corrupt_chunks_are_protocol_errors() {
        use ring::{FLAG_FIRST, FLAG_LAST};
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
            let ring = wr.ring().unwrap();
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
