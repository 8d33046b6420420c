//! The shared-memory communicator: every collective of [`DeviceCommunicator`] on host tensors
//! among processes (or threads) of one node.
//!
//! ## Protocol
//! Each rank owns one segment ([`region`]) with two collective *halves* of `H` bytes and, per
//! peer, two point-to-point slots. Collectives run in *rounds*; every rank runs the same rounds
//! in the same order, numbered by a counter `g` that lives as long as the communicator. Round `g`
//! uses half `g % 2` of every segment, so round `g + 1` can fill the other half while slow peers
//! still read this one (double buffering). A rank publishes, in its header, `written = g + 1`
//! once its half holds the round's data, `reduced = g + 1` once its reduced slice is written back
//! (all-reduce), and `consumed = g + 1` once it has read all it needs from every peer. Before
//! writing half `g % 2` it waits until every peer has `consumed >= g - 1` (round `g - 2`, the
//! last user of that half, is done). Waits spin, yield, then sleep on the peer's doorbell futex.
//!
//! ## Reductions
//! All-reduce of a chunk: every rank copies its chunk into its half; then rank `r` reduces slice
//! `r` of the chunk from all ranks' halves **in rank order** with `dist_core::reduce_bytes`
//! (the kernel the oracles use: bit-identical results everywhere), writes it back into its half,
//! and finally copies every other slice from its reducer. Small chunks skip the second phase:
//! every rank reduces the whole chunk itself, in rank order (same bits, one wait fewer).
//! Reduce-scatter fills rank `j`'s region of each half with a piece of the part rank `j` owns, so
//! the reduction work is balanced and needs no write-back.
//!
//! ## Failure
//! Every wait has the op's deadline. While sleeping, a waiter polls the peer it waits for: a dead
//! process (its pid and start time), a closed communicator or a peer that failed (it blames a rank in its
//! header) end the wait with [`Error::PeerLost`]; the deadline with [`Error::Timeout`] naming
//! every peer that had not arrived. A failed communicator marks itself failed (so its peers stop
//! waiting at once) and refuses later calls: its round counters no longer agree with its peers'.

mod host_group;
mod layout;
mod pool;
pub(crate) mod region;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::Arc;

use dist_core::communicator::{
    all_gatherv_shape, check_all_to_all_v, check_collective_dim, check_output,
    check_reduce_scatterv, ensure_reducible, P2pOp,
};
use dist_core::{
    reduce_bytes, DType, DeviceCommunicator, Error, HostGroup, HostGroupExt, HostPool, HostTensor,
    HostView, HostViewMut, ReduceOp, Result, Tensor,
};

use crate::shm::{remove_stale_segments, WaitOutcome};
pub use host_group::ShmHostGroup;
use layout::PartMap;
use pool::{share, Pool};
pub use region::MAX_WORLD;
use region::{Header, RankSeg, SlotHeader, STATE_CLOSED, STATE_FAILED};

/// How often a sleeping waiter checks that the peer it waits for is alive.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// All-reduce chunks of at most this many bytes times the world size are reduced whole by every
/// rank (one wait fewer than reduce-scatter + all-gather). Measured on 16 cores: at 4 ranks the
/// whole-chunk path wins at 4-8 KiB (5-9 us) and loses from 64 KiB (42 vs ~30 us).
const SMALL_REDUCE_BYTES: usize = 32 << 10;
/// Work of at least this many bytes per phase is split among the rank's helper threads.
const PAR_MIN_BYTES: usize = 256 << 10;
/// Largest metadata message of [`ShmCommunicator::recv_list`].
const MAX_LIST_META_BYTES: usize = 1 << 20;
/// Most tensors in one [`ShmCommunicator::send_list`].
pub const MAX_LIST_TENSORS: usize = 4096;
/// Largest total a [`ShmCommunicator::recv_list`] allocates (16 GiB).
pub const MAX_LIST_BYTES: u64 = 16 << 30;

/// Sizes of the shared buffers of a communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmConfig {
    /// Bytes of each of the two collective halves per rank: the chunk size of collectives.
    pub half_bytes: usize,
    /// Bytes of each of the two point-to-point slots per (rank, peer) pair.
    pub slot_bytes: usize,
    /// Threads this rank uses for the copies and reductions of large all-reduce chunks; 0 picks
    /// `DIST_CPU_THREADS` or else the cores available to the process divided by the group's
    /// size (at most 8). Local to each rank (rank 0's sizes above are used by all).
    pub threads: usize,
}

impl ShmConfig {
    /// The defaults for `world` ranks: halves of 32 MiB / world clamped to [256 KiB, 4 MiB],
    /// slots of 256 KiB up to 8 ranks and 64 KiB beyond; `DIST_CPU_SHM_CHUNK_BYTES` overrides
    /// the half size (rounded down to 4 KiB, at least 4 KiB).
    pub fn for_world(world: usize) -> Self {
        let mut half = ((32usize << 20) / world.max(1)).clamp(256 << 10, 4 << 20);
        if let Some(v) = std::env::var("DIST_CPU_SHM_CHUNK_BYTES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            half = v.clamp(4096, 1 << 30);
        }
        ShmConfig {
            half_bytes: half / 4096 * 4096,
            slot_bytes: if world <= 8 { 256 << 10 } else { 64 << 10 },
            threads: 0,
        }
    }

    /// The helper-thread count [`ShmConfig::threads`] resolves to for `world` ranks.
    pub fn resolved_threads(&self, world: usize) -> usize {
        if self.threads > 0 {
            return self.threads.min(64);
        }
        if let Some(t) = std::env::var("DIST_CPU_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|t| *t > 0)
        {
            return t.min(64);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / world.max(1)).clamp(1, 8)
    }
}

/// Per-rank state of the calls in flight; one call at a time holds it.
#[derive(Debug)]
struct OpState {
    /// Next collective round.
    round: u64,
    /// Chunks published to each destination.
    sent: Vec<u64>,
    /// Chunks consumed from each source.
    recvd: Vec<u64>,
    /// Why the communicator cannot be used any more.
    broken: Option<String>,
}

/// One call: its name for errors and its deadline.
struct Op {
    name: String,
    start: Instant,
    deadline: Instant,
}

/// Which round counter of a header.
#[derive(Clone, Copy, Debug)]
enum Counter {
    Written,
    Reduced,
    Consumed,
}

impl Counter {
    fn of(self, h: &Header) -> &AtomicU64 {
        match self {
            Counter::Written => &h.written.0,
            Counter::Reduced => &h.reduced.0,
            Counter::Consumed => &h.consumed.0,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Counter::Written => "its data",
            Counter::Reduced => "its reduced slice",
            Counter::Consumed => "it to finish reading",
        }
    }
}

/// Collectives on [`HostTensor`]s among the ranks of one group on one node, through shared memory.
///
/// Build it with [`crate::CpuBackend`] (or [`ShmCommunicator::new`] from any
/// [`HostGroup`]). Calls are serialised by an internal lock. See the module docs for the protocol.
#[derive(Debug)]
pub struct ShmCommunicator {
    group: String,
    rank: usize,
    world: usize,
    cfg: ShmConfig,
    /// Every rank's segment, ours at `rank`.
    segs: Vec<RankSeg>,
    pid: u32,
    pool: Pool,
    /// Outputs of the owned (allocating) calls, kept touched between calls.
    buffers: Arc<HostPool>,
    timeout: dist_core::communicator::TimeoutCell,
    state: Mutex<OpState>,
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    if s.is_empty() {
        "group".into()
    } else {
        s
    }
}

/// A random 64-bit id (std's per-process random hash keys, mixed with the time and pid).
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn dtype_code(d: DType) -> u64 {
    DType::ALL
        .iter()
        .position(|x| *x == d)
        .unwrap_or(usize::MAX) as u64
}

/// `buf` cut as [`share`] cuts it into `t` pieces, each behind its own (uncontended) lock so
/// pool members can take theirs.
fn split_mut(buf: &mut [u8], t: usize) -> Vec<Mutex<&mut [u8]>> {
    let len = buf.len();
    let mut rest = buf;
    let mut out = Vec::with_capacity(t);
    for i in 0..t {
        let (x, y) = share(len, t, i);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(y - x);
        out.push(Mutex::new(head));
        rest = tail;
    }
    out
}

/// `[s, e)` of slice `p` when `len` bytes are cut into `n` slices of 64-byte multiples.
fn slice_of(len: usize, n: usize, p: usize) -> (usize, usize) {
    let per = len.div_ceil(n).div_ceil(64) * 64;
    ((p * per).min(len), ((p + 1) * per).min(len))
}

/// A message on its way out: its chunks go through our slots for `dst`.
struct Outgoing<'d> {
    dst: usize,
    data: &'d [u8],
    dtype: DType,
    /// Next chunk to publish.
    next: usize,
    chunks: usize,
}

impl<'d> Outgoing<'d> {
    fn new(dst: usize, data: &'d [u8], dtype: DType, slot: usize) -> Self {
        Outgoing {
            dst,
            data,
            dtype,
            next: 0,
            chunks: data.len().div_ceil(slot).max(1),
        }
    }
    fn done(&self) -> bool {
        self.next >= self.chunks
    }
}

/// Where an incoming message goes: the caller's buffer of the exact size, or a new vector of at
/// most the given bytes.
enum Target<'d> {
    Into(&'d mut [u8]),
    Owned(Option<Vec<u8>>, usize),
}

/// A message on its way in from `src`.
struct Incoming<'d> {
    src: usize,
    target: Target<'d>,
    dtype: DType,
    /// Next chunk to take, and the message's size (from its first chunk).
    next: u64,
    total: u64,
    done: bool,
    /// Why the message does not fit the receiver (it is drained all the same).
    mismatch: Option<String>,
}

impl<'d> Incoming<'d> {
    fn new(src: usize, target: Target<'d>, dtype: DType) -> Self {
        Incoming {
            src,
            target,
            dtype,
            next: 0,
            total: 0,
            done: false,
            mismatch: None,
        }
    }
}

impl ShmCommunicator {
    /// Builds the communicator of the group whose control plane is `host_group`, named
    /// `group_name` (segment names and errors use it). Collective over `host_group`.
    pub fn new(host_group: &dyn HostGroup, group_name: &str, timeout: Duration) -> Result<Self> {
        Self::with_config(host_group, group_name, timeout, None)
    }

    /// [`ShmCommunicator::new`] with buffer sizes of the caller's choice (rank 0's choice is
    /// used by all; `None` means [`ShmConfig::for_world`]). Small halves make chunking visible
    /// in tests; large ones suit large tensors.
    pub fn with_config(
        host_group: &dyn HostGroup,
        group_name: &str,
        timeout: Duration,
        config: Option<ShmConfig>,
    ) -> Result<Self> {
        let world = host_group.world_size();
        let rank = host_group.rank();
        crate::ensure_arg!(
            (1..=MAX_WORLD).contains(&world),
            "the shared-memory communicator serves 1 to {MAX_WORLD} ranks, group {group_name} has {world}"
        );
        let local = config.unwrap_or_else(|| ShmConfig::for_world(world));
        let proposal = (rank == 0).then(|| {
            let c = local;
            (random_id(), c.half_bytes as u64, c.slot_bytes as u64)
        });
        let (job, half, slot): (u64, u64, u64) = host_group.broadcast_obj(proposal.as_ref(), 0)?;
        let cfg = ShmConfig {
            half_bytes: half as usize,
            slot_bytes: slot as usize,
            threads: local.resolved_threads(world),
        };
        crate::ensure_arg!(
            cfg.half_bytes >= 4096
                && cfg.half_bytes % 4096 == 0
                && cfg.half_bytes / world >= 64
                && cfg.slot_bytes % 64 == 0
                && cfg.slot_bytes >= 64
                && cfg.half_bytes <= 1 << 30
                && cfg.slot_bytes <= 1 << 30,
            "rank 0 proposed bad shared buffer sizes {cfg:?}"
        );
        let nodes = crate::shm::node_keys(host_group)?;
        if let Some(r) = nodes.iter().position(|n| *n != nodes[rank]) {
            return Err(Error::unsupported(format!(
                "group {group_name}: rank {r} is on another node ({}) than rank {rank} ({}); shared memory needs one node (gloo serves several)",
                nodes[r], nodes[rank]
            )));
        }
        let removed = remove_stale_segments();
        if removed > 0 {
            tracing::info!(
                group = group_name,
                rank,
                removed,
                "removed stale shared segments of dead jobs"
            );
        }
        let tag = format!("cpu.{job:016x}.{}.{rank}", sanitize(group_name));
        let mine = RankSeg::create(&tag, rank, world, cfg.half_bytes, cfg.slot_bytes);
        // Every rank reports success or failure, so nobody waits for a segment that will never exist.
        let report: std::result::Result<String, String> = match &mine {
            Ok(s) => Ok(s.name().to_string()),
            Err(e) => Err(e.to_string()),
        };
        let names: Vec<std::result::Result<String, String>> = host_group.all_gather_obj(&report)?;
        let mut mine = Some(mine?);
        if let Some((r, Err(e))) = names.iter().enumerate().find(|(_, n)| n.is_err()) {
            return Err(Error::Backend {
                backend: "shm",
                code: None,
                message: format!("group {group_name}: rank {r} could not create its segment: {e}"),
            });
        }
        let mut segs = Vec::with_capacity(world);
        for (r, n) in names.iter().enumerate() {
            if r == rank {
                segs.push(mine.take().expect("own segment"));
            } else {
                let name = n.as_ref().map_err(|e| Error::invalid(e.clone()))?;
                segs.push(RankSeg::open(
                    name,
                    r,
                    world,
                    cfg.half_bytes,
                    cfg.slot_bytes,
                    timeout,
                )?);
            }
        }
        host_group.barrier()?;
        // Everyone has mapped every segment: drop the names now, so a crash leaves nothing behind.
        segs[rank].unlink();
        tracing::debug!(
            group = group_name,
            rank,
            world,
            ?cfg,
            "shared-memory communicator ready"
        );
        Ok(ShmCommunicator {
            group: group_name.to_string(),
            rank,
            world,
            cfg,
            segs,
            pid: std::process::id(),
            pool: Pool::new(cfg.threads),
            buffers: HostPool::new(HostPool::DEFAULT_LIMIT),
            timeout: dist_core::communicator::TimeoutCell::new(timeout),
            state: Mutex::new(OpState {
                round: 0,
                sent: vec![0; world],
                recvd: vec![0; world],
                broken: None,
            }),
        })
    }

    /// The buffer sizes in use.
    pub fn config(&self) -> ShmConfig {
        self.cfg
    }

    /// The group's name.
    pub fn group_name(&self) -> &str {
        &self.group
    }

    fn me(&self) -> &Header {
        self.segs[self.rank].hdr()
    }

    fn lock(&self) -> MutexGuard<'_, OpState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one call under the lock with its deadline; a lost peer or a timeout breaks the communicator.
    fn run<T>(&self, op: &str, f: impl FnOnce(&mut OpState, &Op) -> Result<T>) -> Result<T> {
        let mut st = self.lock();
        if let Some(why) = &st.broken {
            return Err(Error::NotInitialized(format!(
                "{} {op}: the communicator can no longer be used ({why})",
                self.group
            )));
        }
        let start = Instant::now();
        let o = Op {
            name: format!("{} {op}", self.group),
            start,
            deadline: start + self.timeout(),
        };
        let r = f(&mut st, &o);
        if let Err(e) = &r {
            let blamed = match e {
                Error::Timeout { missing_ranks, .. } => {
                    Some(missing_ranks.first().copied().unwrap_or(self.rank))
                }
                Error::PeerLost { rank, .. } => Some(*rank),
                Error::Protocol(_) => Some(self.rank),
                _ => None,
            };
            if let Some(b) = blamed {
                st.broken = Some(e.to_string());
                let h = self.me();
                h.cause.store(b as u32 + 1, Ordering::Relaxed);
                h.state.0.store(STATE_FAILED, Ordering::Release);
                h.bell.ring();
            }
        }
        r
    }

    /// Checks that peer `p` can still answer.
    fn check_peer(&self, o: &Op, p: usize) -> Result<()> {
        let h = self.segs[p].hdr();
        match h.state.0.load(Ordering::Acquire) {
            STATE_CLOSED => {
                return Err(Error::PeerLost {
                    rank: p,
                    op: o.name.clone(),
                    detail: "it destroyed its communicator".into(),
                })
            }
            STATE_FAILED => {
                let c = h.cause.load(Ordering::Relaxed) as usize;
                let blamed = if c == 0 || c > self.world { p } else { c - 1 };
                return Err(Error::PeerLost {
                    rank: blamed,
                    op: o.name.clone(),
                    detail: format!("rank {p} failed its call waiting for rank {blamed}"),
                });
            }
            _ => {}
        }
        let pid = h.pid.load(Ordering::Relaxed);
        if pid != self.pid
            && crate::shm::Segment::creator_of(self.segs[p].name())
                .is_some_and(|c| c.liveness().is_dead())
        {
            return Err(Error::PeerLost {
                rank: p,
                op: o.name.clone(),
                detail: format!("its process {pid} is gone"),
            });
        }
        Ok(())
    }

    /// Waits until `ready(peer header)` or the deadline; `what` describes the wait for errors.
    fn wait_peer(
        &self,
        o: &Op,
        p: usize,
        mut ready: impl FnMut(&Header) -> bool,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let h = self.segs[p].hdr();
        match h.bell.wait_until(
            o.deadline,
            POLL_EVERY,
            || ready(h),
            || self.check_peer(o, p),
        )? {
            WaitOutcome::Ready => Ok(()),
            WaitOutcome::TimedOut => Err(Error::Timeout {
                op: o.name.clone(),
                waited: o.start.elapsed(),
                missing_ranks: vec![p],
                detail: what(),
            }),
        }
    }

    /// Waits until every peer `p` with `which(p)` has published `c >= v`.
    fn wait_all(&self, o: &Op, c: Counter, v: u64, which: impl Fn(usize) -> bool) -> Result<()> {
        for p in (0..self.world).filter(|&p| p != self.rank && which(p)) {
            let r = self.wait_peer(o, p, |h| c.of(h).load(Ordering::Acquire) >= v, String::new);
            if let Err(Error::Timeout { op, waited, .. }) = r {
                let missing = (0..self.world)
                    .filter(|&q| q != self.rank && which(q))
                    .filter(|&q| c.of(self.segs[q].hdr()).load(Ordering::Acquire) < v)
                    .collect();
                return Err(Error::Timeout {
                    op,
                    waited,
                    missing_ranks: missing,
                    detail: format!("waiting for {} in round {}", c.name(), v - 1),
                });
            }
            r?;
        }
        Ok(())
    }

    fn publish(&self, c: Counter, v: u64) {
        let h = self.me();
        c.of(h).store(v, Ordering::Release);
        h.bell.ring();
    }

    /// Starts round `g`: waits until half `g % 2` of our segment is free (every peer finished round `g - 2`).
    fn begin_round(&self, o: &Op, g: u64) -> Result<usize> {
        if g >= 2 {
            self.wait_all(o, Counter::Consumed, g - 1, |_| true)?;
        }
        Ok((g % 2) as usize)
    }

    /// All-reduce into `buf` (bytes of `dtype` elements): of `input` when given (same length;
    /// it is only read, in the first phase of each chunk), else of `buf` itself, in place.
    fn all_reduce_bytes(
        &self,
        st: &mut OpState,
        o: &Op,
        input: Option<&[u8]>,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        debug_assert!(input.map_or(true, |i| i.len() == buf.len()));
        if self.world == 1 {
            // A one-rank reduction is the identity for every op (avg divides by one exactly).
            if let Some(i) = input {
                buf.copy_from_slice(i);
            }
            return Ok(());
        }
        let n = self.world;
        let chunk = self.cfg.half_bytes;
        let small = buf.len() <= chunk && buf.len() * n <= SMALL_REDUCE_BYTES;
        let mut a = 0;
        while a < buf.len() {
            let b = (a + chunk).min(buf.len());
            let len = b - a;
            let g = st.round;
            let h = self.begin_round(o, g)?;
            let me = &self.segs[self.rank];
            let t = if len >= PAR_MIN_BYTES {
                self.pool.threads()
            } else {
                1
            };
            {
                let src = match input {
                    Some(i) => &i[a..b],
                    None => &buf[a..b],
                };
                self.pool_run(t, &|i| {
                    let (x, y) = share(len, t, i);
                    // SAFETY: every peer finished round g-2, the last reader of half h
                    // (begin_round); members write disjoint ranges.
                    unsafe { me.write_half(h, x, &src[x..y]) };
                });
            }
            self.publish(Counter::Written, g + 1);
            self.wait_all(o, Counter::Written, g + 1, |_| true)?;
            if small {
                // SAFETY: every peer published half h for round g; nobody writes it before round g+2,
                // which waits for our `consumed` below.
                let ins: Vec<&[u8]> = self
                    .segs
                    .iter()
                    .map(|s| unsafe { s.read_half(h, 0, len) })
                    .collect();
                reduce_bytes(dtype, &mut buf[a..b], &ins, op)?;
            } else {
                let (s, e) = slice_of(len, n, self.rank);
                let tr = if e - s >= PAR_MIN_BYTES {
                    self.pool.threads()
                } else {
                    1
                };
                let pieces = split_mut(&mut buf[a + s..a + e], tr);
                let failed = Mutex::new(None);
                self.pool_run(tr, &|i| {
                    let (x, y) = share(e - s, tr, i);
                    if y <= x {
                        return;
                    }
                    let mut out = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
                    // SAFETY: every peer published half h for round g; slice [s, e) of each half
                    // is read by us alone and nobody rewrites it before round g+2.
                    let ins: Vec<&[u8]> = self
                        .segs
                        .iter()
                        .map(|sg| unsafe { sg.read_half(h, s + x, y - x) })
                        .collect();
                    if let Err(err) = reduce_bytes(dtype, &mut out, &ins, op) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                    }
                    drop(ins);
                    // SAFETY: only we read slice [s, e) of our half in this round, and the reads
                    // of this range are done; members write disjoint ranges.
                    unsafe { me.write_half(h, s + x, &out) };
                });
                drop(pieces);
                if let Some(err) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    return Err(err);
                }
                self.publish(Counter::Reduced, g + 1);
                self.wait_all(o, Counter::Reduced, g + 1, |_| true)?;
                let pieces = split_mut(&mut buf[a..b], t);
                self.pool_run(t, &|i| {
                    let (x, y) = share(len, t, i);
                    let mut out = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
                    for p in (0..n).filter(|&p| p != self.rank) {
                        let (s, e) = slice_of(len, n, p);
                        let (lo, hi) = (s.max(x), e.min(y));
                        if hi > lo {
                            // SAFETY: peer p published its reduced slice; it is not rewritten
                            // before round g+2, which waits for our `consumed`.
                            let src = unsafe { self.segs[p].read_half(h, lo, hi - lo) };
                            out[lo - x..hi - x].copy_from_slice(src);
                        }
                    }
                });
            }
            self.publish(Counter::Consumed, g + 1);
            st.round += 1;
            a = b;
        }
        Ok(())
    }

    /// Runs `f` on `t` members of the pool (`t == 1`: on the caller alone).
    fn pool_run(&self, t: usize, f: &(dyn Fn(usize) + Sync)) {
        if t <= 1 {
            f(0);
        } else {
            debug_assert_eq!(t, self.pool.threads());
            self.pool.run(f);
        }
    }

    /// Reduce-scatter: `input` is the whole tensor of `shape`; `out` receives this rank's part
    /// (`sizes[rank]` along `dim`).
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter_bytes(
        &self,
        st: &mut OpState,
        o: &Op,
        input: &[u8],
        shape: &[usize],
        dim: usize,
        sizes: &[usize],
        dtype: DType,
        op: ReduceOp,
        out: &mut [u8],
    ) -> Result<()> {
        let n = self.world;
        let el = dtype.size();
        let parts: Vec<PartMap> = (0..n)
            .map(|j| PartMap::new(shape, dim, sizes, j, el))
            .collect();
        debug_assert_eq!(out.len(), parts[self.rank].len());
        if n == 1 {
            parts[0].gather(input, 0, out);
            return Ok(());
        }
        let c = self.cfg.half_bytes / n / 64 * 64;
        let rounds = parts.iter().map(|p| p.len().div_ceil(c)).max().unwrap_or(0);
        for k in 0..rounds {
            let s = k * c;
            let g = st.round;
            let h = self.begin_round(o, g)?;
            let me = &self.segs[self.rank];
            for (j, part) in parts.iter().enumerate() {
                if s < part.len() {
                    let e = (s + c).min(part.len());
                    // SAFETY: our half h is free (begin_round); region j is ours to fill.
                    let dst = unsafe { me.half_mut(h, j * c, e - s) };
                    part.gather(input, s, dst);
                }
            }
            self.publish(Counter::Written, g + 1);
            self.wait_all(o, Counter::Written, g + 1, |_| true)?;
            let mine = parts[self.rank].len();
            if s < mine {
                let e = (s + c).min(mine);
                // SAFETY: every peer published half h of round g; region `rank` is read by us alone.
                let ins: Vec<&[u8]> = self
                    .segs
                    .iter()
                    .map(|sg| unsafe { sg.read_half(h, self.rank * c, e - s) })
                    .collect();
                reduce_bytes(dtype, &mut out[s..e], &ins, op)?;
            }
            self.publish(Counter::Consumed, g + 1);
            st.round += 1;
        }
        Ok(())
    }

    /// All-gather (`dst == None`) or gather to `dst`: each rank's `input` is its part of the
    /// output of shape `out_shape` cut along `dim` into `sizes`.
    #[allow(clippy::too_many_arguments)]
    fn gather_bytes(
        &self,
        st: &mut OpState,
        o: &Op,
        input: &[u8],
        out_shape: &[usize],
        dim: usize,
        sizes: &[usize],
        elem: usize,
        mut out: Option<&mut [u8]>,
    ) -> Result<()> {
        let n = self.world;
        let parts: Vec<PartMap> = (0..n)
            .map(|j| PartMap::new(out_shape, dim, sizes, j, elem))
            .collect();
        debug_assert_eq!(input.len(), parts[self.rank].len());
        if n == 1 {
            if let Some(out) = out {
                parts[0].scatter(out, 0, input);
            }
            return Ok(());
        }
        let c = self.cfg.half_bytes;
        let rounds = parts.iter().map(|p| p.len().div_ceil(c)).max().unwrap_or(0);
        for k in 0..rounds {
            let s = k * c;
            let g = st.round;
            let h = self.begin_round(o, g)?;
            if s < input.len() {
                let e = (s + c).min(input.len());
                // SAFETY: our half h is free (begin_round).
                unsafe { self.segs[self.rank].write_half(h, 0, &input[s..e]) };
            }
            self.publish(Counter::Written, g + 1);
            if let Some(out) = out.as_deref_mut() {
                for (j, part) in parts.iter().enumerate() {
                    if s >= part.len() {
                        continue;
                    }
                    let e = (s + c).min(part.len());
                    if j == self.rank {
                        part.scatter(out, s, &input[s..e]);
                    } else {
                        self.wait_all(o, Counter::Written, g + 1, |p| p == j)?;
                        // SAFETY: peer j published half h of round g; it is not rewritten before
                        // round g+2, which waits for our `consumed`.
                        let src = unsafe { self.segs[j].read_half(h, 0, e - s) };
                        part.scatter(out, s, src);
                    }
                }
            }
            self.publish(Counter::Consumed, g + 1);
            st.round += 1;
        }
        Ok(())
    }

    /// Broadcast of `buf` from `src`, in place.
    fn broadcast_bytes(&self, st: &mut OpState, o: &Op, buf: &mut [u8], src: usize) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let c = self.cfg.half_bytes;
        let mut s = 0;
        while s < buf.len() {
            let e = (s + c).min(buf.len());
            let g = st.round;
            let h = self.begin_round(o, g)?;
            if self.rank == src {
                // SAFETY: our half h is free (begin_round).
                unsafe { self.segs[src].write_half(h, 0, &buf[s..e]) };
                self.publish(Counter::Written, g + 1);
            } else {
                self.publish(Counter::Written, g + 1);
                self.wait_all(o, Counter::Written, g + 1, |p| p == src)?;
                // SAFETY: src published half h of round g; not rewritten before round g+2.
                buf[s..e].copy_from_slice(unsafe { self.segs[src].read_half(h, 0, e - s) });
            }
            self.publish(Counter::Consumed, g + 1);
            st.round += 1;
            s = e;
        }
        Ok(())
    }

    /// Sends one message of `data` (elements of `dtype`) to `dst` through our slots for `dst`.
    /// Returns once the last chunk is published (messages up to two slots never block on the receiver).
    fn send_message(
        &self,
        st: &mut OpState,
        o: &Op,
        data: &[u8],
        dtype: DType,
        dst: usize,
    ) -> Result<()> {
        self.p2p(
            st,
            o,
            &mut [Outgoing::new(dst, data, dtype, self.cfg.slot_bytes)],
            &mut [],
        )
    }

    /// Receives one message from `src`. With `Some(buf)` the message must be `dtype` and exactly
    /// `buf.len()` bytes (a mismatch is drained and reported); with `None` it is returned as a
    /// new vector of at most `max` bytes.
    fn recv_message(
        &self,
        st: &mut OpState,
        o: &Op,
        buf: Option<&mut [u8]>,
        dtype: DType,
        src: usize,
        max: usize,
    ) -> Result<Option<Vec<u8>>> {
        let target = match buf {
            Some(b) => Target::Into(b),
            None => Target::Owned(None, max),
        };
        let mut r = [Incoming::new(src, target, dtype)];
        self.p2p(st, o, &mut [], &mut r)?;
        let [r] = r;
        if let Some(why) = r.mismatch {
            return Err(Error::invalid(format!("{}: {why}", o.name)));
        }
        Ok(match r.target {
            Target::Owned(v, _) => Some(v.unwrap_or_default()),
            Target::Into(_) => None,
        })
    }

    /// Moves every message of `sends` and `recvs` through the point-to-point slots, making
    /// progress on whichever can move (so any pattern completes: a cycle of large messages
    /// too). Messages to one peer go in list order, as do messages from one peer. Waits sleep on
    /// this rank's doorbell, which peers ring when they publish a chunk or an acknowledgement for
    /// it; a mismatched incoming message is drained and reported in its `mismatch`.
    fn p2p(
        &self,
        st: &mut OpState,
        o: &Op,
        sends: &mut [Outgoing<'_>],
        recvs: &mut [Incoming<'_>],
    ) -> Result<()> {
        loop {
            let mut moved = false;
            let mut busy = vec![false; self.world];
            for s in sends.iter_mut().filter(|s| !s.done()) {
                if std::mem::replace(&mut busy[s.dst], true) {
                    continue;
                }
                while !s.done() && self.try_send_chunk(st, s) {
                    moved = true;
                }
            }
            busy.fill(false);
            for r in recvs.iter_mut().filter(|r| !r.done) {
                if std::mem::replace(&mut busy[r.src], true) {
                    continue;
                }
                while !r.done && self.try_recv_chunk(st, o, r)? {
                    moved = true;
                }
            }
            let pending: Vec<usize> = sends
                .iter()
                .filter(|s| !s.done())
                .map(|s| s.dst)
                .chain(recvs.iter().filter(|r| !r.done).map(|r| r.src))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if moved {
                continue;
            }
            let me = self.rank;
            let ready = || {
                let send_ready = sends.iter().filter(|s| !s.done()).any(|s| {
                    let m = st.sent[s.dst];
                    m < 2 || self.segs[s.dst].hdr().acked[me].load(Ordering::Acquire) >= m - 1
                });
                send_ready
                    || recvs.iter().filter(|r| !r.done).any(|r| {
                        self.segs[r.src].hdr().sent[me].load(Ordering::Acquire) > st.recvd[r.src]
                    })
            };
            let outcome = self
                .me()
                .bell
                .wait_until(o.deadline, POLL_EVERY, ready, || {
                    pending.iter().try_for_each(|&p| self.check_peer(o, p))
                })?;
            if outcome == WaitOutcome::TimedOut {
                let mut missing = pending.clone();
                missing.sort_unstable();
                missing.dedup();
                let what: Vec<String> = sends
                    .iter()
                    .filter(|s| !s.done())
                    .map(|s| {
                        format!(
                            "rank {} to receive chunk {} of {} of a {}-byte message",
                            s.dst,
                            s.next,
                            s.chunks,
                            s.data.len()
                        )
                    })
                    .chain(
                        recvs
                            .iter()
                            .filter(|r| !r.done)
                            .map(|r| format!("chunk {} of a message from rank {}", r.next, r.src)),
                    )
                    .collect();
                return Err(Error::Timeout {
                    op: o.name.clone(),
                    waited: o.start.elapsed(),
                    missing_ranks: missing,
                    detail: format!("waiting for {}", what.join(", ")),
                });
            }
        }
    }

    /// Publishes the next chunk of `s` if the slot half it needs is free; true if it did.
    fn try_send_chunk(&self, st: &mut OpState, s: &mut Outgoing<'_>) -> bool {
        let slot = self.cfg.slot_bytes;
        let (dst, m) = (s.dst, st.sent[s.dst]);
        let peer = self.segs[dst].hdr();
        if m >= 2 && peer.acked[self.rank].load(Ordering::Acquire) < m - 1 {
            return false;
        }
        let i = s.next;
        let start = i * slot;
        let end = (start + slot).min(s.data.len());
        let hdr = SlotHeader {
            total: s.data.len() as u64,
            len: (end - start) as u64,
            dtype: dtype_code(s.dtype),
            index: i as u64,
        };
        let me = &self.segs[self.rank];
        // SAFETY: dst acknowledged chunk m-2, the last user of this slot half (checked above).
        unsafe { me.write_slot(dst, (m % 2) as usize, hdr, &s.data[start..end]) };
        st.sent[dst] = m + 1;
        me.hdr().sent[dst].store(m + 1, Ordering::Release);
        me.hdr().bell.ring();
        peer.bell.ring();
        s.next += 1;
        true
    }

    /// Takes the next chunk of `r` if its sender published it; true if it did.
    fn try_recv_chunk(&self, st: &mut OpState, o: &Op, r: &mut Incoming<'_>) -> Result<bool> {
        let slot = self.cfg.slot_bytes as u64;
        let (src, m) = (r.src, st.recvd[r.src]);
        let peer = &self.segs[src];
        if peer.hdr().sent[self.rank].load(Ordering::Acquire) <= m {
            return Ok(false);
        }
        let h = (m % 2) as usize;
        let i = r.next;
        // SAFETY: src published chunk m in this slot half (sent > m, read with Acquire).
        let sh = unsafe { peer.read_slot_header(self.rank, h) };
        if i == 0 {
            r.total = sh.total;
        }
        let expect_len = r.total.saturating_sub(i * slot).min(slot);
        if sh.index != i || sh.total != r.total || sh.len != expect_len {
            return Err(Error::protocol(format!(
                "{}: bad chunk from rank {src}: {sh:?}, expected index {i} of a {}-byte message",
                o.name, r.total
            )));
        }
        if i == 0 {
            if sh.dtype != dtype_code(r.dtype) {
                let got = DType::ALL
                    .get(sh.dtype as usize)
                    .map(|d| d.to_string())
                    .unwrap_or("?".into());
                r.mismatch = Some(format!(
                    "rank {src} sent {got}, the receiver expects {}",
                    r.dtype
                ));
            }
            match &mut r.target {
                Target::Into(b) if b.len() as u64 != r.total => {
                    r.mismatch.get_or_insert(format!(
                        "rank {src} sent {} bytes, the receiving tensor holds {}",
                        r.total,
                        b.len()
                    ));
                }
                Target::Owned(_, max) if r.total > *max as u64 => {
                    r.mismatch.get_or_insert(format!(
                        "rank {src} sent {} bytes, more than the cap of {max}",
                        r.total
                    ));
                }
                Target::Owned(v, _) => *v = Some(Vec::with_capacity(r.total as usize)),
                Target::Into(_) => {}
            }
        }
        if r.mismatch.is_none() {
            // SAFETY: published as above; the slice is dropped before we acknowledge.
            let data = unsafe { peer.read_slot(self.rank, h, sh.len as usize) };
            let off = (i * slot) as usize;
            match &mut r.target {
                Target::Into(b) => b[off..off + data.len()].copy_from_slice(data),
                Target::Owned(Some(v), _) => v.extend_from_slice(data),
                Target::Owned(None, _) => {}
            }
        }
        st.recvd[src] = m + 1;
        self.me().acked[src].store(m + 1, Ordering::Release);
        self.me().bell.ring();
        peer.hdr().bell.ring();
        r.next += 1;
        r.done = r.next * slot >= r.total;
        Ok(true)
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        crate::ensure_arg!(
            r < self.world,
            "{what} {r} out of range for world size {}",
            self.world
        );
        Ok(())
    }

    fn check_peer_rank(&self, r: usize, what: &str) -> Result<()> {
        self.check_rank(r, what)?;
        crate::ensure_arg!(r != self.rank, "{what} {r} is this rank itself");
        Ok(())
    }

    /// Sends a list of tensors to `dst` (any count up to [`MAX_LIST_TENSORS`], any dtypes and
    /// shapes): a metadata message, then each tensor. Pair with [`ShmCommunicator::recv_list`].
    pub fn send_list(&self, tensors: &[HostTensor], dst: usize) -> Result<()> {
        self.check_peer_rank(dst, "send_list dst")?;
        crate::ensure_arg!(
            tensors.len() <= MAX_LIST_TENSORS,
            "send_list: {} tensors, at most {MAX_LIST_TENSORS}",
            tensors.len()
        );
        let meta: Vec<(DType, Vec<usize>)> = tensors
            .iter()
            .map(|t| (t.dtype(), t.shape().to_vec()))
            .collect();
        let bytes = dist_core::encode_obj(&meta)?;
        crate::ensure_arg!(
            bytes.len() <= MAX_LIST_META_BYTES,
            "send_list: metadata too large"
        );
        self.run("send_list", |st, o| {
            self.send_message(st, o, &bytes, DType::U8, dst)?;
            for t in tensors {
                self.send_message(st, o, t.as_bytes(), t.dtype(), dst)?;
            }
            Ok(())
        })
    }

    /// Receives a list of tensors sent by [`ShmCommunicator::send_list`] from `src`.
    /// The sizes are checked against [`MAX_LIST_BYTES`] before anything is allocated.
    pub fn recv_list(&self, src: usize) -> Result<Vec<HostTensor>> {
        self.check_peer_rank(src, "recv_list src")?;
        self.run("recv_list", |st, o| {
            let bytes = self
                .recv_message(st, o, None, DType::U8, src, MAX_LIST_META_BYTES)?
                .unwrap_or_default();
            let meta: Vec<(DType, Vec<usize>)> = dist_core::decode_obj(&bytes, MAX_LIST_META_BYTES)
                .map_err(|e| Error::protocol(format!("{}: bad list metadata from rank {src}: {e}", o.name)))?;
            let mut total = 0u64;
            for (d, shape) in &meta {
                let numel = shape.iter().try_fold(1u64, |a, &x| a.checked_mul(x as u64));
                let nb = numel.and_then(|n| n.checked_mul(d.size() as u64));
                total = nb.and_then(|b| total.checked_add(b)).unwrap_or(u64::MAX);
            }
            if meta.len() > MAX_LIST_TENSORS || total > MAX_LIST_BYTES {
                return Err(Error::protocol(format!(
                    "{}: rank {src} announced {} tensors of {total} bytes, over the caps ({MAX_LIST_TENSORS}, {MAX_LIST_BYTES})",
                    o.name,
                    meta.len()
                )));
            }
            let mut out = Vec::with_capacity(meta.len());
            for (d, shape) in meta {
                let mut t = HostTensor::zeros(d, &shape);
                self.recv_message(st, o, Some(t.as_bytes_mut()), d, src, 0)?;
                out.push(t);
            }
            Ok(out)
        })
    }

    /// All-gather (`out` for every rank) or gather (`out` for `dst` only) of `input` along `dim`
    /// with per-rank lengths `sizes`, into the caller's output.
    #[allow(clippy::too_many_arguments)]
    fn gather_into_impl(
        &self,
        opname: &str,
        input: &HostView<'_>,
        out: Option<&mut HostViewMut<'_>>,
        dim: isize,
        sizes: &[usize],
        dst: Option<usize>,
    ) -> Result<()> {
        let out_shape = all_gatherv_shape(input.shape(), dim, sizes, self.world, self.rank)?;
        let d = check_collective_dim(input.shape(), dim, opname)?;
        let want = dst.map_or(true, |x| x == self.rank);
        let out = match (want, out) {
            (true, Some(o)) => {
                check_output(opname, o, input.dtype(), &out_shape)?;
                Some(o)
            }
            (true, None) => {
                return Err(Error::invalid(format!(
                    "{opname}: this rank receives the result and passed no output"
                )))
            }
            (false, _) => None,
        };
        self.run(opname, |st, o| {
            self.gather_bytes(
                st,
                o,
                input.as_bytes(),
                &out_shape,
                d,
                sizes,
                input.dtype().size(),
                out.map(|t| t.as_bytes_mut()),
            )
        })
    }
}

impl DeviceCommunicator for ShmCommunicator {
    dist_core::host_communicator_items!(timeout = timeout, pool = buffers);
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        ensure_reducible(input.dtype(), "all_reduce")?;
        check_output("all_reduce", output, input.dtype(), input.shape())?;
        let dtype = input.dtype();
        self.run("all_reduce", |st, o| {
            self.all_reduce_bytes(
                st,
                o,
                Some(input.as_bytes()),
                output.as_bytes_mut(),
                dtype,
                op,
            )
        })
    }

    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        ensure_reducible(tensor.dtype(), "all_reduce")?;
        let dtype = tensor.dtype();
        self.run("all_reduce", |st, o| {
            self.all_reduce_bytes(st, o, None, tensor.as_bytes_mut(), dtype, op)
        })
    }

    fn all_gather_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        let d = check_collective_dim(input.shape(), dim, "all_gather")?;
        let sizes = vec![input.shape()[d]; self.world];
        self.gather_into_impl("all_gather", input, Some(output), dim, &sizes, None)
    }

    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.gather_into_impl("all_gatherv", input, Some(output), dim, sizes, None)
    }

    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let d = check_reduce_scatterv(input, output, dim, sizes, self.world, self.rank)?;
        self.run("reduce_scatter", |st, o| {
            self.reduce_scatter_bytes(
                st,
                o,
                input.as_bytes(),
                input.shape(),
                d,
                sizes,
                input.dtype(),
                op,
                output.as_bytes_mut(),
            )
        })
    }

    fn gather_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        self.check_rank(dst, "gather dst")?;
        let d = check_collective_dim(input.shape(), dim, "gather")?;
        let sizes = vec![input.shape()[d]; self.world];
        self.gather_into_impl("gather", input, output, dim, &sizes, Some(dst))
    }

    fn broadcast(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        self.check_rank(src, "broadcast src")?;
        self.run("broadcast", |st, o| {
            self.broadcast_bytes(st, o, tensor.as_bytes_mut(), src)
        })
    }

    fn send(&self, tensor: &HostView<'_>, dst: usize) -> Result<()> {
        self.check_peer_rank(dst, "send dst")?;
        self.run("send", |st, o| {
            self.send_message(st, o, tensor.as_bytes(), tensor.dtype(), dst)
        })
    }

    fn recv(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        self.check_peer_rank(src, "recv src")?;
        let dtype = tensor.dtype();
        self.run("recv", |st, o| {
            self.recv_message(st, o, Some(tensor.as_bytes_mut()), dtype, src, 0)
                .map(|_| ())
        })
    }

    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        for op in ops.iter() {
            self.check_peer_rank(op.peer(), "batch_send_recv peer")?;
        }
        let slot = self.cfg.slot_bytes;
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for op in ops.iter_mut() {
            match op {
                P2pOp::Send(t, p) => sends.push(Outgoing::new(*p, t.as_bytes(), t.dtype(), slot)),
                P2pOp::Recv(t, p) => {
                    let dtype = t.dtype();
                    recvs.push(Incoming::new(*p, Target::Into(t.as_bytes_mut()), dtype))
                }
            }
        }
        self.run("batch_send_recv", |st, o| {
            self.p2p(st, o, &mut sends, &mut recvs)?;
            match recvs.iter().find_map(|r| r.mismatch.as_ref()) {
                Some(why) => Err(Error::invalid(format!("{}: {why}", o.name))),
                None => Ok(()),
            }
        })
    }

    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        let row = check_all_to_all_v(input, send_counts, output, recv_counts, self.world)?;
        let (me, slot, dtype) = (self.rank, self.cfg.slot_bytes, input.dtype());
        // Every pair exchanges a message, empty ones too, so counts that disagree between two
        // ranks are a size mismatch, not a hang.
        let mut sends = Vec::with_capacity(self.world);
        let mut off = 0;
        let src = input.as_bytes();
        let mut own_in = 0..0;
        for (p, &c) in send_counts.iter().enumerate() {
            let part = off..off + c * row;
            off += c * row;
            if p == me {
                own_in = part;
            } else {
                sends.push(Outgoing::new(p, &src[part], dtype, slot));
            }
        }
        let mut recvs = Vec::with_capacity(self.world);
        let mut rest = output.as_bytes_mut();
        let mut own_out: &mut [u8] = &mut [];
        for (p, &c) in recv_counts.iter().enumerate() {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(c * row);
            rest = tail;
            if p == me {
                own_out = part;
            } else {
                recvs.push(Incoming::new(p, Target::Into(part), dtype));
            }
        }
        crate::ensure_arg!(
            own_in.len() == own_out.len(),
            "all_to_all_v: this rank sends itself {} rows and expects {}",
            send_counts[me],
            recv_counts[me]
        );
        own_out.copy_from_slice(&src[own_in]);
        if self.world == 1 {
            return Ok(());
        }
        self.run("all_to_all_v", |st, o| {
            self.p2p(st, o, &mut sends, &mut recvs)?;
            match recvs.iter().find_map(|r| r.mismatch.as_ref()) {
                Some(why) => Err(Error::invalid(format!("{}: {why}", o.name))),
                None => Ok(()),
            }
        })
    }

    fn destroy(&self) -> Result<()> {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some("destroyed".into());
        }
        let h = self.me();
        if h.state.0.load(Ordering::Relaxed) != STATE_FAILED {
            h.state.0.store(STATE_CLOSED, Ordering::Release);
        }
        h.bell.ring();
        self.buffers.close();
        Ok(())
    }
}

impl Drop for ShmCommunicator {
    fn drop(&mut self) {
        let h = self.me();
        if h.state.0.load(Ordering::Relaxed) != STATE_FAILED {
            h.state.0.store(STATE_CLOSED, Ordering::Release);
        }
        h.bell.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_and_align() {
        for len in [0usize, 1, 63, 64, 4096, 4096 + 3, 1 << 20] {
            for n in [1usize, 2, 3, 8, 64] {
                let mut next = 0;
                for p in 0..n {
                    let (s, e) = slice_of(len, n, p);
                    assert_eq!(s, next.min(len));
                    assert!(s % 64 == 0 || s == len);
                    next = e;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn hostile_slot_headers_are_protocol_errors() {
        use dist_core::local::run_threads;
        let t = Duration::from_secs(20);
        let out = run_threads(2, t, |r, g| {
            let c = ShmCommunicator::new(&g, "hostile", t).unwrap();
            if r == 0 {
                // Claim a chunk longer than the message and a huge total, then publish it.
                let bad = SlotHeader {
                    total: 1 << 60,
                    len: 1 << 40,
                    dtype: 7,
                    index: 0,
                };
                let me = &c.segs[0];
                // SAFETY: rank 1 has acknowledged nothing yet, so slot half 0 is free.
                unsafe { me.write_slot(1, 0, bad, &[]) };
                me.hdr().sent[1].store(1, Ordering::Release);
                me.hdr().bell.ring();
                g.barrier().unwrap();
                None
            } else {
                let mut x = HostTensor::zeros(DType::F32, &[4]);
                let e1 = c.recv(&mut x.view_mut(), 0).unwrap_err();
                g.barrier().unwrap();
                // The communicator is now unusable rather than out of step.
                let e2 = c.recv(&mut x.view_mut(), 0).unwrap_err();
                Some((e1, e2))
            }
        });
        let (e1, e2) = out.into_iter().nth(1).unwrap().unwrap().unwrap();
        assert!(matches!(e1, Error::Protocol(_)), "{e1}");
        assert!(matches!(e2, Error::NotInitialized(_)), "{e2}");
    }

    #[test]
    fn config_defaults() {
        let c = ShmConfig::for_world(4);
        assert_eq!(c.half_bytes % 4096, 0);
        assert!(c.half_bytes >= 256 << 10 && c.half_bytes <= 4 << 20);
        assert!(ShmConfig::for_world(64).half_bytes >= 256 << 10);
    }
}
