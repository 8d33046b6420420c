//! The P2P engine's bookkeeping, without I/O: requests, buffer bytes, lent tensors, which
//! connection each request belongs to, and every deadline of these. The engine's socket shell
//! ([`super::engine`]) feeds it events (a tensor to hold, a PUT offered, data arrived, a frame
//! from connection `c`, `c` lost, time passed) with the current time, and acts on what it
//! answers (send the data, refuse with this reason, close these connections, wait until then).
//! Nothing here blocks, reads a clock or touches a socket, so every rule is unit-tested below
//! on a virtual clock.
//!
//! The rules:
//!
//! * **Send buffer** (producer): tensors queued (PUT_ASYNC) or stored (GET) count against
//!   `send_cap` until sent or fetched; a tensor larger than the cap is refused, one that does
//!   not fit waits (the shell retries until its deadline).
//! * **Lending**: on a data path whose receiver reads the sender's memory, a sent tensor is
//!   kept, and counted, until that receiver's `Stored` / `GetDone` on *the connection it was
//!   sent over*, or that connection's loss. A request that fails meanwhile does not free it:
//!   the receiver may be copying out of it, and memory reused under the copy could be loaded
//!   as this request's.
//! * **Requests belong to connections.** A producer's request is bound to the connection its
//!   first tensor went over (PUT: once the consumer answered `Ready`; GET: the connection that
//!   fetched it). Only that connection's `Loaded` finishes it; its loss fails it. A consumer's
//!   request is bound to the connection its first tensor comes over: tensors of it from any
//!   other connection are refused, its `Loaded` / `Abort` go back on that connection, and that
//!   connection's loss fails the waits for its remaining tensors at once.
//! * **Receive buffer** (consumer): tensors held plus reservations for data arriving count
//!   against `recv_cap`. A PUT that does not fit waits; tensors nobody took within
//!   `done_timeout` are dropped to make room; and a reservation of *another* connection whose
//!   data has stalled (counted progress below [`MIN_RATE`] after [`STALL_GRACE`]) gives way:
//!   its connection is closed, so a peer that announces a large tensor and never sends it
//!   cannot hold up the others' PUTs for longer than the grace. Room that frees up goes first
//!   to connections that have delivered a tensor before, then to the longest waiting, so fresh
//!   connections that keep offering and stalling cannot keep a working producer waiting.
//! * **Deadlines**: a producer's request whose every layer was handed over fails when its
//!   consumer has not reported it loaded within `done_timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::Tensor;

use super::datapath::RecvProgress;
use super::engine::request_of;
use crate::transfer::error::Error;

/// A connection, as the engine numbers them (never reused within an engine).
pub(crate) type ConnId = u64;

/// Requests remembered as given up or lost, to refuse their late tensors (oldest forgotten).
pub(crate) const MAX_FORGOTTEN: usize = 4096;
/// How long a reservation's data may take to start before the reservation counts as stalled.
pub(crate) const STALL_GRACE: Duration = Duration::from_millis(100);
/// The slowest arrival (bytes per second after the grace) that does not count as stalled.
pub(crate) const MIN_RATE: u64 = 32 << 20;

/// The caps and timeouts the ledger enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Bytes held for sending (queued, stored, lent).
    pub send_cap: usize,
    /// Bytes received or reserved and not yet taken.
    pub recv_cap: usize,
    /// A handed-over request's time to be reported loaded; an unclaimed tensor's time to live.
    pub done_timeout: Duration,
    /// The data path lends the sender's memory.
    pub lends: bool,
}

/// A tensor to send.
#[derive(Debug)]
pub(crate) struct Outgoing<B> {
    pub request_id: String,
    pub tensor_id: String,
    pub tensor: B,
    /// The consumer's address.
    pub peer: String,
}

#[derive(Debug)]
struct ProdReq {
    peer: String,
    conn: Option<ConnId>,
    /// Tensors queued (PUT_ASYNC) or stored (GET) for it.
    pending: usize,
    /// When the worker said every layer was handed over.
    saved: Option<Instant>,
}

#[derive(Debug)]
struct Held<B> {
    tensor: B,
    from: String,
    at: Instant,
}

#[derive(Debug)]
struct Arriving {
    conn: ConnId,
    tensor_id: String,
    bytes: usize,
    since: Instant,
    progress: Arc<RecvProgress>,
    /// Its connection was told to close; its bytes are freed when its reader gives up.
    preempted: bool,
}

impl Arriving {
    /// When this reservation counts as stalled if no more bytes arrive; `None` for a link that
    /// does not count its bytes (bounded by its deadline only) or one already preempted.
    fn stalls_at(&self) -> Option<Instant> {
        if self.preempted {
            return None;
        }
        let got = self.progress.bytes()?;
        if got >= self.bytes as u64 {
            return None;
        }
        let allowed = Duration::from_secs_f64(got as f64 / MIN_RATE as f64);
        Some(self.since + STALL_GRACE + allowed)
    }
}

#[derive(Debug)]
struct Binding {
    conn: ConnId,
    from: String,
    last: Instant,
}

/// A bounded map of request ids, oldest forgotten first.
#[derive(Debug)]
struct Forgotten<V> {
    order: VecDeque<String>,
    why: HashMap<String, V>,
}

impl<V> Default for Forgotten<V> {
    fn default() -> Self {
        Forgotten {
            order: VecDeque::new(),
            why: HashMap::new(),
        }
    }
}

impl<V> Forgotten<V> {
    fn insert(&mut self, id: &str, why: V) {
        if self.why.insert(id.to_string(), why).is_none() {
            self.order.push_back(id.to_string());
            if self.order.len() > MAX_FORGOTTEN {
                if let Some(old) = self.order.pop_front() {
                    self.why.remove(&old);
                }
            }
        }
    }
    fn get(&self, id: &str) -> Option<&V> {
        self.why.get(id)
    }
    fn remove(&mut self, id: &str) {
        if self.why.remove(id).is_some() {
            self.order.retain(|o| o != id);
        }
    }
}

/// The answer to [`Ledger::hold`].
#[derive(Debug)]
pub(crate) enum Hold<B> {
    /// Queued or stored.
    Held,
    /// No room now: the tensor comes back; try again when the ledger changed.
    Full(Outgoing<B>),
    /// Larger than the whole send buffer.
    TooLarge { bytes: usize, cap: usize },
    /// The request already failed.
    Failed(String),
}

/// A granted reservation in the receive buffer.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub id: u64,
    /// Where the data link counts the bytes that arrived.
    pub progress: Arc<RecvProgress>,
}

/// The answer to [`Ledger::offer`].
#[derive(Debug)]
pub(crate) enum Offer {
    /// Room reserved: answer `Ready` and receive the data.
    Granted(Reservation),
    /// Refuse the PUT.
    Refused(String),
    /// No room yet. Close the connections in `preempt` (their stalled reservations give way),
    /// then offer again when the ledger changed, or at `recheck` at the latest.
    Wait {
        preempt: Vec<(ConnId, String)>,
        recheck: Option<Instant>,
    },
}

/// The answer to [`Ledger::take`].
#[derive(Debug)]
pub(crate) enum Take<B> {
    /// The tensor, the connection it came over and its producer's address.
    Ready { tensor: B, from: String },
    /// Its request's connection was lost before this tensor came.
    Lost { from: String, reason: String },
    /// Not here yet.
    Pending,
}

/// What [`Ledger::expire`] did.
#[derive(Debug, Default)]
pub(crate) struct Expired {
    /// Producer requests failed because their consumer did not report them loaded in time.
    pub failed: Vec<String>,
    /// Received tensors dropped because nobody took them in time.
    pub dropped: Vec<String>,
}

/// The bookkeeping of one engine; see the module docs.
#[derive(Debug)]
pub(crate) struct Ledger<B> {
    lim: Limits,
    // Producer.
    queue: VecDeque<Outgoing<B>>,
    store: HashMap<String, Outgoing<B>>,
    in_flight: usize,
    lent: HashMap<(ConnId, u64), Outgoing<B>>,
    send_bytes: usize,
    reqs: HashMap<String, ProdReq>,
    done: BTreeSet<String>,
    failed: BTreeMap<String, String>,
    // Consumer.
    held: HashMap<String, Held<B>>,
    arriving: HashMap<u64, Arriving>,
    next_reservation: u64,
    bound: HashMap<String, Binding>,
    /// Connections that delivered a tensor (they go first when room frees up).
    proven: BTreeSet<ConnId>,
    /// PUTs waiting for room, by connection (one at a time each): since when, how large.
    waiting: HashMap<ConnId, (Instant, usize)>,
    /// Consumer requests whose connection was lost: (producer, reason).
    lost: Forgotten<(String, String)>,
    discarded: Forgotten<()>,
    recv_bytes: usize,
}

impl<B: Tensor> Ledger<B> {
    /// An empty ledger.
    pub(crate) fn new(lim: Limits) -> Self {
        Ledger {
            lim,
            queue: VecDeque::new(),
            store: HashMap::new(),
            in_flight: 0,
            lent: HashMap::new(),
            send_bytes: 0,
            reqs: HashMap::new(),
            done: BTreeSet::new(),
            failed: BTreeMap::new(),
            held: HashMap::new(),
            arriving: HashMap::new(),
            next_reservation: 1,
            bound: HashMap::new(),
            proven: BTreeSet::new(),
            waiting: HashMap::new(),
            lost: Forgotten::default(),
            discarded: Forgotten::default(),
            recv_bytes: 0,
        }
    }

    // ---- producer ----

    /// Starts tracking `request_id` (to `peer`) unless it is tracked; `Err` with the reason
    /// when it already failed.
    pub(crate) fn begin(&mut self, request_id: &str, peer: &str) -> Result<(), String> {
        if let Some(why) = self.failed.get(request_id) {
            return Err(why.clone());
        }
        self.reqs
            .entry(request_id.to_string())
            .or_insert_with(|| ProdReq {
                peer: peer.to_string(),
                conn: None,
                pending: 0,
                saved: None,
            });
        Ok(())
    }

    /// Queues (PUT_ASYNC, `queue`) or stores (GET) `o` when it fits the send buffer.
    pub(crate) fn hold(&mut self, o: Outgoing<B>, queue: bool) -> Hold<B> {
        let n = o.tensor.nbytes();
        let cap = self.lim.send_cap;
        if let Some(why) = self.failed.get(&o.request_id) {
            return Hold::Failed(why.clone());
        }
        if n > cap {
            return Hold::TooLarge { bytes: n, cap };
        }
        if self.send_bytes + n > cap {
            return Hold::Full(o);
        }
        self.send_bytes += n;
        if let Some(r) = self.reqs.get_mut(&o.request_id) {
            r.pending += 1;
        }
        if queue {
            self.queue.push_back(o);
        } else if let Some(old) = self.store.insert(o.tensor_id.clone(), o) {
            self.send_bytes -= old.tensor.nbytes();
            if let Some(r) = self.reqs.get_mut(&old.request_id) {
                r.pending = r.pending.saturating_sub(1);
            }
        }
        Hold::Held
    }

    /// PUT_ASYNC: the next queued tensor, now in flight (still counted until [`Self::sent`]).
    pub(crate) fn next_to_send(&mut self) -> Option<Outgoing<B>> {
        let o = self.queue.pop_front()?;
        self.in_flight += 1;
        Some(o)
    }

    /// PUT_ASYNC: the in-flight tensor `o` went out (or failed; the shell fails its request).
    pub(crate) fn sent(&mut self, o: &Outgoing<B>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.send_bytes -= o.tensor.nbytes();
        if let Some(r) = self.reqs.get_mut(&o.request_id) {
            r.pending = r.pending.saturating_sub(1);
        }
    }

    /// True when nothing is queued or in flight.
    pub(crate) fn queue_drained(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }

    /// Queued tensors and the consumer of the first.
    pub(crate) fn queue_state(&self) -> (usize, Option<String>) {
        (self.queue.len(), self.queue.front().map(|o| o.peer.clone()))
    }

    /// PUT: the consumer answered `Ready` on `conn` for a tensor of `request_id`.
    pub(crate) fn bind_send(&mut self, request_id: &str, conn: ConnId) {
        if let Some(r) = self.reqs.get_mut(request_id) {
            r.conn.get_or_insert(conn);
        }
    }

    /// GET: hands the stored tensor `tensor_id` to the consumer on `conn` (binding its request
    /// there). Its bytes stay counted on a lending path (the shell then calls
    /// [`Self::lend_fetched`] or [`Self::fetch_failed`]).
    pub(crate) fn take_stored(&mut self, tensor_id: &str, conn: ConnId) -> Option<Outgoing<B>> {
        let o = self.store.remove(tensor_id)?;
        if !self.lim.lends {
            self.send_bytes -= o.tensor.nbytes();
        }
        if let Some(r) = self.reqs.get_mut(&o.request_id) {
            r.pending = r.pending.saturating_sub(1);
            r.conn.get_or_insert(conn);
        }
        Some(o)
    }

    /// GET on a lending path: the fetched `o` went out as the answer `seq` on `conn`; kept
    /// (still counted) until that connection's `GetDone`.
    pub(crate) fn lend_fetched(&mut self, conn: ConnId, seq: u64, o: Outgoing<B>) {
        self.lent.insert((conn, seq), o);
    }

    /// GET on a lending path: sending the fetched `o` failed before the receiver could read it.
    pub(crate) fn fetch_failed(&mut self, o: &Outgoing<B>) {
        if self.lim.lends {
            self.send_bytes -= o.tensor.nbytes();
        }
    }

    /// PUT on a lending path: a copy of the tensor goes out as `seq` on `conn`; kept, and
    /// counted, until that connection's `Stored`.
    pub(crate) fn lend_sent(&mut self, conn: ConnId, seq: u64, o: Outgoing<B>) {
        self.send_bytes += o.tensor.nbytes();
        self.lent.insert((conn, seq), o);
    }

    /// The receiver on `conn` has its copy of the lent tensor `seq` (or its data never went
    /// out): free it. False when `conn` lent nothing under `seq`.
    pub(crate) fn release_lent(&mut self, conn: ConnId, seq: u64) -> bool {
        match self.lent.remove(&(conn, seq)) {
            Some(o) => {
                self.send_bytes -= o.tensor.nbytes();
                true
            }
            None => false,
        }
    }

    /// Every layer of `request_id` was handed over at `now`: its consumer has `done_timeout`.
    pub(crate) fn mark_saved(&mut self, request_id: &str, now: Instant) {
        if let Some(r) = self.reqs.get_mut(request_id) {
            r.saved.get_or_insert(now);
        }
    }

    /// `Loaded{request_id}` arrived on `conn`: finishes the request when it is bound there.
    pub(crate) fn loaded(&mut self, conn: ConnId, request_id: &str) -> bool {
        if self
            .reqs
            .get(request_id)
            .is_some_and(|r| r.conn == Some(conn))
        {
            self.finish(request_id);
            true
        } else {
            false
        }
    }

    /// `Abort{request_id}` arrived on `conn`, whose peer calls itself `claimed`: fails the
    /// request when it is bound to `conn` or, not bound yet, sent to `claimed`.
    pub(crate) fn aborted(
        &mut self,
        conn: ConnId,
        claimed: &str,
        request_id: &str,
        reason: &str,
    ) -> bool {
        let Some(r) = self.reqs.get(request_id) else {
            return false;
        };
        let ours = match r.conn {
            Some(c) => c == conn,
            None => r.peer == claimed,
        };
        if ours {
            let e = Error::PeerLost {
                peer: claimed.to_string(),
                op: "kv p2p transfer".into(),
                detail: format!("the consumer aborted the request: {reason}"),
            };
            self.fail(request_id, &e.for_request(request_id).to_string());
        }
        ours
    }

    /// Fails `request_id` and frees what is queued or stored for it (not what is lent, nor
    /// what is in flight, which the sender frees).
    pub(crate) fn fail(&mut self, request_id: &str, why: &str) {
        self.reqs.remove(request_id);
        self.drop_buffers(request_id);
        if !self.done.contains(request_id) {
            self.failed
                .entry(request_id.to_string())
                .or_insert_with(|| why.to_string());
        }
    }

    fn finish(&mut self, request_id: &str) {
        self.reqs.remove(request_id);
        self.drop_buffers(request_id);
        if !self.failed.contains_key(request_id) {
            self.done.insert(request_id.to_string());
        }
    }

    fn drop_buffers(&mut self, request_id: &str) {
        let mut freed = 0;
        self.queue.retain(|o| {
            let keep = o.request_id != request_id;
            if !keep {
                freed += o.tensor.nbytes();
            }
            keep
        });
        self.store.retain(|_, o| {
            let keep = o.request_id != request_id;
            if !keep {
                freed += o.tensor.nbytes();
            }
            keep
        });
        self.send_bytes -= freed;
    }

    /// Requests finished and failed since the last call.
    pub(crate) fn take_finished(&mut self) -> (BTreeSet<String>, BTreeMap<String, String>) {
        (
            std::mem::take(&mut self.done),
            std::mem::take(&mut self.failed),
        )
    }

    /// Producer requests tracked.
    pub(crate) fn pending_requests(&self) -> usize {
        self.reqs.len()
    }

    /// Bytes held for sending (queued, stored, in flight, lent).
    pub(crate) fn send_bytes(&self) -> usize {
        self.send_bytes
    }

    // ---- consumer ----

    /// A PUT of `tensor_id` (`bytes` bytes) offered on `conn` by the producer that calls itself
    /// `from`, at `now`. Offered again while it waits; a shell that gives up on it calls
    /// [`Self::withdraw`].
    pub(crate) fn offer(
        &mut self,
        conn: ConnId,
        from: &str,
        tensor_id: &str,
        bytes: usize,
        now: Instant,
    ) -> Offer {
        let cap = self.lim.recv_cap;
        let request = request_of(tensor_id);
        let refused = |l: &mut Self, why: String| {
            l.waiting.remove(&conn);
            Offer::Refused(why)
        };
        if bytes > cap {
            return refused(
                self,
                format!("{tensor_id}: {bytes} bytes exceed the receive buffer of {cap} bytes"),
            );
        }
        if self.discarded.get(request).is_some() {
            return refused(self, format!("{tensor_id}: the request was given up here"));
        }
        if let Some((_, why)) = self.lost.get(request) {
            let why = format!("{tensor_id}: the request's connection was lost: {why}");
            return refused(self, why);
        }
        if self.bound.get(request).is_some_and(|b| b.conn != conn) {
            let why = format!("{tensor_id}: the request is being received from another connection");
            return refused(self, why);
        }
        let since = self.waiting.entry(conn).or_insert((now, bytes)).0;
        if self.recv_bytes + bytes > cap {
            self.expire_held(now);
        }
        // Room goes to the best-ranked waiter that fits: proven connections, then the oldest.
        let rank = |c: ConnId, since: Instant| (!self.proven.contains(&c), since, c);
        let mine = rank(conn, since);
        let outranked = self
            .waiting
            .iter()
            .any(|(&c, &(t, n))| c != conn && self.recv_bytes + n <= cap && rank(c, t) < mine);
        if self.recv_bytes + bytes <= cap && !outranked {
            self.waiting.remove(&conn);
            let id = self.next_reservation;
            self.next_reservation += 1;
            let progress = Arc::new(RecvProgress::default());
            self.arriving.insert(
                id,
                Arriving {
                    conn,
                    tensor_id: tensor_id.to_string(),
                    bytes,
                    since: now,
                    progress: progress.clone(),
                    preempted: false,
                },
            );
            self.recv_bytes += bytes;
            self.bind_recv(request, conn, from, now);
            return Offer::Granted(Reservation { id, progress });
        }
        if self.recv_bytes + bytes <= cap {
            // It fits, but a better-ranked waiter fits too and goes first.
            return Offer::Wait {
                preempt: Vec::new(),
                recheck: None,
            };
        }
        // Reservations of other connections whose data stalled give way, oldest first, as far
        // as this PUT needs.
        let mut need = self.recv_bytes + bytes - cap;
        let freeing: usize = self
            .arriving
            .values()
            .filter(|a| a.preempted)
            .map(|a| a.bytes)
            .sum();
        need = need.saturating_sub(freeing);
        let mut stalled: Vec<(Instant, u64)> = self
            .arriving
            .iter()
            .filter(|(_, a)| a.conn != conn)
            .filter_map(|(id, a)| a.stalls_at().filter(|&t| t <= now).map(|_| (a.since, *id)))
            .collect();
        stalled.sort();
        let mut preempt = Vec::new();
        if need > 0
            && stalled
                .iter()
                .map(|(_, id)| self.arriving[id].bytes)
                .sum::<usize>()
                >= need
        {
            for (_, id) in stalled {
                if need == 0 {
                    break;
                }
                let Some(a) = self.arriving.get_mut(&id) else {
                    continue;
                };
                a.preempted = true;
                need = need.saturating_sub(a.bytes);
                let got = a.progress.bytes().unwrap_or(0);
                preempt.push((
                    a.conn,
                    format!(
                        "its PUT of {} stalled ({got} of {} bytes in {:?}) while another \
                         peer's PUT waited for room",
                        a.tensor_id,
                        a.bytes,
                        now.saturating_duration_since(a.since)
                    ),
                ));
            }
        }
        // Wake up when the next reservation would stall or the next held tensor expires.
        let recheck = self
            .arriving
            .values()
            .filter(|a| a.conn != conn)
            .filter_map(Arriving::stalls_at)
            .chain(self.held.values().map(|h| h.at + self.lim.done_timeout))
            .filter(|&t| t > now)
            .min();
        Offer::Wait { preempt, recheck }
    }

    /// The PUT waiting on `conn` is given up (its deadline passed, the engine shuts down).
    pub(crate) fn withdraw(&mut self, conn: ConnId) {
        self.waiting.remove(&conn);
    }

    /// The data of reservation `id` arrived: the tensor is held until taken.
    pub(crate) fn arrived(&mut self, id: u64, tensor: B, now: Instant) {
        let Some(a) = self.arriving.remove(&id) else {
            return;
        };
        self.proven.insert(a.conn);
        let request = request_of(&a.tensor_id).to_string();
        if self.discarded.get(&request).is_some() {
            // Given up while its data was arriving.
            self.recv_bytes -= a.bytes;
            return;
        }
        // The reservation's bytes become the tensor's.
        self.recv_bytes = self.recv_bytes - a.bytes + tensor.nbytes();
        let from = self
            .bound
            .get_mut(&request)
            .map(|b| {
                b.last = now;
                b.from.clone()
            })
            .unwrap_or_default();
        if let Some(old) = self.held.insert(
            a.tensor_id,
            Held {
                tensor,
                from,
                at: now,
            },
        ) {
            self.recv_bytes -= old.tensor.nbytes();
        }
    }

    /// Reservation `id`'s data will not come (an error, a preempted or closed connection).
    pub(crate) fn abandon(&mut self, id: u64) {
        if let Some(a) = self.arriving.remove(&id) {
            self.recv_bytes -= a.bytes;
        }
    }

    /// Binds `request_id` to `conn` (first binding wins) at `now`; GET: the answer came there.
    pub(crate) fn bind_recv(&mut self, request_id: &str, conn: ConnId, from: &str, now: Instant) {
        self.bound
            .entry(request_id.to_string())
            .or_insert_with(|| Binding {
                conn,
                from: from.to_string(),
                last: now,
            })
            .last = now;
    }

    /// Takes the received tensor `tensor_id`.
    pub(crate) fn take(&mut self, tensor_id: &str) -> Take<B> {
        if let Some(h) = self.held.remove(tensor_id) {
            self.recv_bytes -= h.tensor.nbytes();
            return Take::Ready {
                tensor: h.tensor,
                from: h.from,
            };
        }
        match self.lost.get(request_of(tensor_id)) {
            Some((from, reason)) => Take::Lost {
                from: from.clone(),
                reason: reason.clone(),
            },
            None => Take::Pending,
        }
    }

    /// Every layer of `request_id` was loaded: the connection to tell (the request's tensors
    /// came over it) and the producer's address; the request is forgotten here.
    pub(crate) fn loaded_here(&mut self, request_id: &str) -> Option<(ConnId, String)> {
        self.bound.remove(request_id).map(|b| (b.conn, b.from))
    }

    /// The connection `request_id`'s tensors come over, if any came.
    pub(crate) fn recv_conn(&self, request_id: &str) -> Option<ConnId> {
        self.bound.get(request_id).map(|b| b.conn)
    }

    /// Gives up `request_id` here: drops its tensors, refuses its later ones.
    pub(crate) fn discard(&mut self, request_id: &str) {
        self.discarded.insert(request_id, ());
        self.bound.remove(request_id);
        self.lost.remove(request_id);
        let mut freed = 0;
        self.held.retain(|id, h| {
            let keep = request_of(id) != request_id;
            if !keep {
                freed += h.tensor.nbytes();
            }
            keep
        });
        self.recv_bytes -= freed;
    }

    /// Bytes held or reserved in the receive buffer.
    pub(crate) fn recv_bytes(&self) -> usize {
        self.recv_bytes
    }

    /// Tensors held.
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }

    fn expire_held(&mut self, now: Instant) -> Vec<String> {
        let ttl = self.lim.done_timeout;
        let mut freed = 0;
        let mut dropped = Vec::new();
        self.held.retain(|id, h| {
            let keep = now.saturating_duration_since(h.at) <= ttl;
            if !keep {
                freed += h.tensor.nbytes();
                dropped.push(id.clone());
            }
            keep
        });
        self.recv_bytes -= freed;
        dropped
    }

    // ---- both ----

    /// Time passed: fails handed-over requests whose consumer did not report in time, drops
    /// received tensors nobody took, forgets idle bindings.
    pub(crate) fn expire(&mut self, now: Instant) -> Expired {
        let t = self.lim.done_timeout;
        let late: Vec<(String, String)> = self
            .reqs
            .iter()
            .filter(|(_, r)| {
                r.saved
                    .is_some_and(|s| now.saturating_duration_since(s) > t)
            })
            .map(|(id, r)| (id.clone(), r.peer.clone()))
            .collect();
        let mut out = Expired::default();
        for (id, peer) in late {
            let e = Error::Timeout {
                op: "kv p2p wait for the consumer to load".into(),
                waited: t,
                peer: Some(peer),
                detail: String::new(),
            };
            self.fail(&id, &e.for_request(&id).to_string());
            out.failed.push(id);
        }
        out.dropped = self.expire_held(now);
        let busy: BTreeSet<String> = self
            .held
            .keys()
            .chain(self.arriving.values().map(|a| &a.tensor_id))
            .map(|id| request_of(id).to_string())
            .collect();
        self.bound
            .retain(|id, b| busy.contains(id) || now.saturating_duration_since(b.last) <= t);
        out
    }

    /// `conn` was lost (`reason`): frees what was lent over it, fails the producer requests
    /// bound to it, and marks the consumer requests bound to it lost. Returns the failed ones.
    pub(crate) fn conn_lost(&mut self, conn: ConnId, peer: &str, reason: &str) -> Vec<String> {
        self.proven.remove(&conn);
        self.waiting.remove(&conn);
        let mut freed = 0;
        self.lent.retain(|(c, _), o| {
            let keep = *c != conn;
            if !keep {
                freed += o.tensor.nbytes();
            }
            keep
        });
        self.send_bytes -= freed;
        let ids: Vec<String> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.conn == Some(conn))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            let e = Error::PeerLost {
                peer: peer.to_string(),
                op: "kv p2p transfer".into(),
                detail: reason.to_string(),
            };
            self.fail(id, &e.for_request(id).to_string());
        }
        let lost: Vec<(String, String)> = self
            .bound
            .iter()
            .filter(|(_, b)| b.conn == conn)
            .map(|(id, b)| (id.clone(), b.from.clone()))
            .collect();
        for (id, from) in lost {
            self.bound.remove(&id);
            self.lost.insert(&id, (from, reason.to_string()));
        }
        ids
    }

    /// True while `conn` carries something: a request bound to it (either side), a tensor
    /// lent over it, or a reservation whose data comes over it. An idle connection may be
    /// closed without anyone losing anything.
    pub(crate) fn busy(&self, conn: ConnId) -> bool {
        self.reqs.values().any(|r| r.conn == Some(conn))
            || self.lent.keys().any(|(c, _)| *c == conn)
            || self.arriving.values().any(|a| a.conn == conn)
            || self.bound.values().any(|b| b.conn == conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::{DType, HostTensor};

    const MS: Duration = Duration::from_millis(1);

    fn lim(lends: bool) -> Limits {
        Limits {
            send_cap: 1000,
            recv_cap: 1000,
            done_timeout: 100 * MS,
            lends,
        }
    }

    fn t(n: usize) -> HostTensor {
        HostTensor::zeros(DType::U8, &[n])
    }

    fn out(req: &str, layer: usize, n: usize) -> Outgoing<HostTensor> {
        Outgoing {
            request_id: req.into(),
            tensor_id: format!("{req}#l{layer}"),
            tensor: t(n),
            peer: "cons:1".into(),
        }
    }

    /// A PUT as the shell does it: tracked, sent on `conn` as `seq`, Ready answered.
    fn put(l: &mut Ledger<HostTensor>, conn: ConnId, seq: u64, req: &str, n: usize) {
        l.begin(req, "cons:1").unwrap();
        l.bind_send(req, conn);
        if l.lim.lends {
            l.lend_sent(conn, seq, out(req, seq as usize, n));
        }
    }

    #[test]
    fn a_lent_tensor_is_freed_only_by_its_receivers_ack_or_its_connections_loss() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(true));
        put(&mut l, 1, 10, "a", 300);
        put(&mut l, 1, 11, "a", 200);
        put(&mut l, 2, 12, "b", 100);
        assert_eq!(l.send_bytes(), 600);
        // The request fails while the receiver may still copy: nothing is freed.
        l.fail("a", "gave up");
        assert_eq!(l.send_bytes(), 600);
        assert!(l.busy(1));
        // A Stored for seq 10 from another connection frees nothing; from connection 1 it does.
        assert!(!l.release_lent(2, 10));
        assert_eq!(l.send_bytes(), 600);
        assert!(l.release_lent(1, 10));
        assert_eq!(l.send_bytes(), 300);
        assert!(!l.release_lent(1, 10), "once");
        // Connection 1's loss frees the rest of what it lent, not connection 2's.
        l.conn_lost(1, "cons:1", "reset");
        assert_eq!(l.send_bytes(), 100);
        assert!(!l.busy(1));
        assert!(l.busy(2));
        // GET: the fetched tensor stays counted until GetDone on the fetching connection.
        l.begin("g", "cons:1").unwrap();
        assert!(matches!(l.hold(out("g", 0, 50), false), Hold::Held));
        let o = l.take_stored("g#l0", 3).unwrap();
        assert_eq!(l.send_bytes(), 150);
        l.lend_fetched(3, 77, o);
        l.fail("g", "gave up");
        assert_eq!(l.send_bytes(), 150);
        assert!(l.release_lent(3, 77));
        assert_eq!(l.send_bytes(), 100);
    }

    #[test]
    fn a_request_belongs_to_the_connection_it_went_over() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        put(&mut l, 1, 1, "a", 10);
        put(&mut l, 2, 2, "b", 10);
        // Another connection's Loaded (an impostor claiming the consumer's address) is ignored.
        assert!(!l.loaded(2, "a"));
        assert_eq!(l.pending_requests(), 2);
        assert!(l.loaded(1, "a"));
        // An Abort counts from the bound connection only, once bound.
        assert!(!l.aborted(3, "cons:1", "b", "no"));
        assert!(l.aborted(2, "cons:1", "b", "no"));
        let (done, failed) = l.take_finished();
        assert_eq!(done, ["a".to_string()].into());
        assert!(failed["b"].contains("aborted"), "{failed:?}");
        // Not bound yet (nothing sent): an Abort from a connection of the consumer's address.
        l.begin("c", "cons:1").unwrap();
        assert!(!l.aborted(4, "other:1", "c", "no"));
        assert!(l.aborted(4, "cons:1", "c", "no"));
        // A connection's loss fails what is bound to it, nothing else.
        put(&mut l, 5, 3, "d", 10);
        put(&mut l, 6, 4, "e", 10);
        l.begin("f", "cons:1").unwrap();
        assert_eq!(l.conn_lost(5, "cons:1", "reset"), vec!["d".to_string()]);
        let (_, failed) = l.take_finished();
        assert!(failed["d"].contains("reset") && failed["d"].contains("request d"));
        assert!(!failed.contains_key("e") && !failed.contains_key("f"));
        assert_eq!(l.pending_requests(), 2);
    }

    #[test]
    fn a_handed_over_request_fails_when_its_consumer_does_not_report_in_time() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        put(&mut l, 1, 1, "a", 10);
        put(&mut l, 1, 2, "b", 10);
        l.mark_saved("a", t0);
        assert!(l.expire(t0 + 100 * MS).failed.is_empty(), "not yet");
        let e = l.expire(t0 + 101 * MS);
        assert_eq!(e.failed, vec!["a".to_string()]);
        let (_, failed) = l.take_finished();
        assert!(failed["a"].contains("consumer to load"), "{failed:?}");
        // b was never marked saved: it waits for as long as it takes.
        assert!(l.expire(t0 + Duration::from_secs(3600)).failed.is_empty());
        // A failed request refuses its later tensors.
        l.fail("b", "broken");
        assert!(matches!(l.hold(out("b", 1, 1), true), Hold::Failed(w) if w == "broken"));
    }

    #[test]
    fn the_send_buffer_is_capped_and_failing_frees_what_is_queued_not_what_is_in_flight() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        l.begin("a", "cons:1").unwrap();
        assert!(matches!(
            l.hold(out("a", 0, 1001), true),
            Hold::TooLarge {
                bytes: 1001,
                cap: 1000
            }
        ));
        assert!(matches!(l.hold(out("a", 0, 600), true), Hold::Held));
        let back = match l.hold(out("a", 1, 600), true) {
            Hold::Full(o) => o,
            h => panic!("{h:?}"),
        };
        // The sender takes the first: still counted while in flight.
        let first = l.next_to_send().unwrap();
        assert!(!l.queue_drained());
        assert!(matches!(l.hold(back, true), Hold::Full(_)));
        l.sent(&first);
        assert!(l.queue_drained());
        assert!(matches!(l.hold(out("a", 1, 600), true), Hold::Held));
        assert!(matches!(l.hold(out("a", 2, 300), true), Hold::Held));
        let inflight = l.next_to_send().unwrap();
        l.fail("a", "x");
        assert_eq!(
            l.send_bytes(),
            600,
            "the queued tensor freed, the in-flight one not"
        );
        l.sent(&inflight);
        assert_eq!(l.send_bytes(), 0);
        // GET: storing under a tensor id again replaces (and uncounts) the old tensor.
        l.begin("g", "cons:1").unwrap();
        assert!(matches!(l.hold(out("g", 0, 400), false), Hold::Held));
        assert!(matches!(l.hold(out("g", 0, 300), false), Hold::Held));
        assert_eq!(l.send_bytes(), 300);
        assert!(l.take_stored("g#l9", 1).is_none());
        assert!(l.take_stored("g#l0", 1).is_some());
        assert_eq!(l.send_bytes(), 0);
        assert!(
            l.busy(1),
            "the GET bound the request to the fetching connection"
        );
    }

    fn granted(o: Offer) -> Reservation {
        match o {
            Offer::Granted(r) => r,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn the_receive_buffer_counts_reservations_and_expires_unclaimed_tensors() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        assert!(matches!(
            l.offer(1, "p:1", "r#l0", 1001, t0),
            Offer::Refused(_)
        ));
        let r = granted(l.offer(1, "p:1", "r#l0", 600, t0));
        assert_eq!(l.recv_bytes(), 600);
        // No room for another 600 (the reservation counts); no stall to preempt (not counted).
        match l.offer(2, "q:1", "s#l0", 600, t0 + 10 * MS) {
            Offer::Wait { preempt, .. } => assert!(preempt.is_empty()),
            o => panic!("{o:?}"),
        }
        l.arrived(r.id, t(600), t0 + 20 * MS);
        assert_eq!((l.recv_bytes(), l.held_count()), (600, 1));
        // The held tensor expires after done_timeout and gives its room.
        match l.offer(2, "q:1", "s#l0", 600, t0 + 50 * MS) {
            Offer::Wait { recheck, .. } => assert_eq!(recheck, Some(t0 + 120 * MS)),
            o => panic!("{o:?}"),
        }
        let r2 = granted(l.offer(2, "q:1", "s#l0", 600, t0 + 121 * MS));
        assert!(matches!(l.take("r#l0"), Take::Pending), "dropped");
        l.abandon(r2.id);
        assert_eq!(l.recv_bytes(), 0);
    }

    #[test]
    fn a_stalled_reservation_gives_way_to_another_peers_put() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        // A liar takes the whole buffer and its data never comes.
        let liar = granted(l.offer(9, "liar:1", "x#l", 1000, t0));
        liar.progress.start();
        let wait = |l: &mut Ledger<HostTensor>, at| match l.offer(1, "p:1", "r#l", 10, at) {
            Offer::Wait { preempt, recheck } => (preempt, recheck),
            o => panic!("{o:?}"),
        };
        // Within the grace it is not stalled: wait, and look again when it would be.
        let (p, recheck) = wait(&mut l, t0 + STALL_GRACE / 2);
        assert!(p.is_empty());
        assert_eq!(recheck, Some(t0 + STALL_GRACE));
        let (p, _) = wait(&mut l, t0 + STALL_GRACE + MS);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, 9);
        assert!(p[0].1.contains("stalled (0 of 1000 bytes"), "{}", p[0].1);
        // Preempted once; its bytes are freed when its reader gives up.
        let (p, _) = wait(&mut l, t0 + STALL_GRACE + 2 * MS);
        assert!(p.is_empty());
        l.abandon(liar.id);
        granted(l.offer(1, "p:1", "r#l", 10, t0 + STALL_GRACE + 3 * MS));

        // A sender keeping up with the minimum rate is not stalled; one that falls behind is.
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let slow = granted(l.offer(9, "s:1", "y#l", 1000, t0));
        slow.progress.add(999);
        // 999 bytes are what MIN_RATE allows in 999 / MIN_RATE seconds after the grace.
        let allowed = Duration::from_secs_f64(999.0 / MIN_RATE as f64);
        let at = t0 + STALL_GRACE + allowed / 2;
        let (p, recheck) = wait(&mut l, at);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(recheck, Some(t0 + STALL_GRACE + allowed));
        let (p, _) = wait(&mut l, t0 + STALL_GRACE + allowed + MS);
        assert_eq!(p.len(), 1, "fell behind");
        // A link that does not count its bytes is bounded by its deadline, never preempted.
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        granted(l.offer(9, "d:1", "z#l", 1000, t0));
        let (p, recheck) = wait(&mut l, t0 + Duration::from_secs(3600));
        assert!(p.is_empty() && recheck.is_none());
        // A connection's own reservation never preempts for it.
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let own = granted(l.offer(1, "p:1", "w#l", 1000, t0));
        own.progress.start();
        match l.offer(1, "p:1", "r#l", 10, t0 + Duration::from_secs(5)) {
            Offer::Wait { preempt, .. } => assert!(preempt.is_empty()),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn freed_room_goes_to_a_proven_connection_then_to_the_longest_waiting() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        // Connection 1 delivers a tensor: proven.
        let r = granted(l.offer(1, "p:1", "a#l", 10, t0));
        l.arrived(r.id, t(10), t0);
        assert!(matches!(l.take("a#l"), Take::Ready { .. }));
        // A liar (2) holds the whole buffer; 3 (fresh) waits first, then 1 (proven).
        let liar = granted(l.offer(2, "x:1", "x#l", 1000, t0));
        assert!(matches!(
            l.offer(3, "y:1", "y#l", 500, t0 + MS),
            Offer::Wait { .. }
        ));
        assert!(matches!(
            l.offer(1, "p:1", "b#l", 500, t0 + 2 * MS),
            Offer::Wait { .. }
        ));
        l.abandon(liar.id);
        // 3 waited longer but 1 is proven: 3 waits, 1 gets the room.
        assert!(matches!(
            l.offer(3, "y:1", "y#l", 500, t0 + 3 * MS),
            Offer::Wait { .. }
        ));
        let b = granted(l.offer(1, "p:1", "b#l", 500, t0 + 4 * MS));
        // Then 3, the only waiter, as soon as it fits.
        let _ = granted(l.offer(3, "y:1", "y#l", 500, t0 + 5 * MS));
        l.abandon(b.id);
        // Among unproven waiters the oldest first; a waiter that withdrew or was lost no
        // longer holds anyone up.
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let full = granted(l.offer(9, "z:1", "z#l", 1000, t0));
        assert!(matches!(
            l.offer(4, "u:1", "u#l", 600, t0 + MS),
            Offer::Wait { .. }
        ));
        assert!(matches!(
            l.offer(5, "v:1", "v#l", 600, t0 + 2 * MS),
            Offer::Wait { .. }
        ));
        l.abandon(full.id);
        assert!(matches!(
            l.offer(5, "v:1", "v#l", 600, t0 + 3 * MS),
            Offer::Wait { .. }
        ));
        l.withdraw(4);
        granted(l.offer(5, "v:1", "v#l", 600, t0 + 4 * MS));
        assert!(matches!(
            l.offer(6, "w:1", "w#l", 600, t0 + 5 * MS),
            Offer::Wait { .. }
        ));
        l.conn_lost(6, "w:1", "reset");
        assert!(l.waiting.is_empty());
    }

    #[test]
    fn a_consumer_request_belongs_to_the_connection_its_tensors_come_over() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        let r = granted(l.offer(1, "prod:1", "r#l0", 10, t0));
        // Another connection cannot add tensors to the request.
        assert!(
            matches!(l.offer(2, "prod:1", "r#l1", 10, t0), Offer::Refused(w) if w.contains("another connection"))
        );
        l.arrived(r.id, t(10), t0);
        assert!(l.busy(1));
        assert_eq!(l.recv_conn("r"), Some(1));
        match l.take("r#l0") {
            Take::Ready { from, .. } => assert_eq!(from, "prod:1"),
            t => panic!("{t:?}"),
        }
        // Layer 1 arrives, then the connection breaks: the held layer is still taken, the
        // missing one fails at once, and later tensors of the request are refused.
        let r1 = granted(l.offer(1, "prod:1", "r#l1", 10, t0));
        l.arrived(r1.id, t(10), t0);
        l.conn_lost(1, "prod:1", "connection reset");
        assert!(matches!(l.take("r#l1"), Take::Ready { .. }));
        match l.take("r#l2") {
            Take::Lost { from, reason } => {
                assert_eq!(
                    (from.as_str(), reason.as_str()),
                    ("prod:1", "connection reset")
                )
            }
            t => panic!("{t:?}"),
        }
        assert!(matches!(
            l.offer(3, "prod:1", "r#l2", 10, t0),
            Offer::Refused(_)
        ));
        assert!(!l.busy(1));
        // Loaded goes back on the bound connection, and frees the binding.
        let s = granted(l.offer(4, "prod:1", "s#l0", 10, t0));
        l.arrived(s.id, t(10), t0);
        assert!(matches!(l.take("s#l0"), Take::Ready { .. }));
        assert_eq!(l.loaded_here("s"), Some((4, "prod:1".to_string())));
        assert!(!l.busy(4));
        // A discarded request drops its tensors and refuses later ones, even mid-arrival.
        let u = granted(l.offer(5, "prod:1", "u#l0", 10, t0));
        let v = granted(l.offer(5, "prod:1", "u#l1", 10, t0));
        l.arrived(u.id, t(10), t0);
        l.discard("u");
        l.arrived(v.id, t(10), t0);
        assert_eq!(l.recv_bytes(), 0);
        assert!(
            matches!(l.offer(5, "prod:1", "u#l2", 10, t0), Offer::Refused(w) if w.contains("given up"))
        );
    }

    #[test]
    fn idle_bindings_are_forgotten_and_forgotten_sets_are_bounded() {
        let mut l: Ledger<HostTensor> = Ledger::new(lim(false));
        let t0 = Instant::now();
        l.bind_recv("g", 7, "prod:1", t0);
        assert!(l.busy(7));
        l.expire(t0 + 100 * MS);
        assert!(l.busy(7));
        l.expire(t0 + 101 * MS);
        assert!(!l.busy(7));
        for i in 0..MAX_FORGOTTEN + 10 {
            l.discard(&format!("d{i}"));
        }
        assert_eq!(l.discarded.order.len(), MAX_FORGOTTEN);
        assert!(l.discarded.get("d0").is_none() && l.discarded.get("d9999").is_none());
        assert!(l
            .discarded
            .get(&format!("d{}", MAX_FORGOTTEN + 9))
            .is_some());
    }
}
