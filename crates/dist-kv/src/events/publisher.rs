//! Publishers: the trait, the null publisher, the ZMQ publisher with replay, and the factory.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::events::config::{KvEventsConfig, PublisherKind};
use crate::events::endpoint::{offset_endpoint_port, should_bind};
use crate::events::queue::{BoundedQueue, Pop, PushError};
use crate::events::types::KvEventBatch;
use crate::events::wire::{encode_batch, WireFormat};

/// The end-of-replay sequence frame: −1 as an 8-byte signed big-endian integer.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// vLLM's `SHUTDOWN_TIMEOUT`: how long shutdown waits for the queue to drain, and then for the
/// publisher thread.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// The process-wide ZeroMQ context (vLLM uses `zmq.Context.instance()`); `inproc://` endpoints only
/// reach sockets of the same context.
pub fn global_context() -> zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new).clone()
}

/// Something that emits KV-event batches in order (vLLM's `EventPublisher`).
///
/// Each data-parallel rank runs its own publisher, which stamps its rank on batches that have none.
pub trait EventPublisher: Send + Sync + fmt::Debug {
    /// Queues `batch` for publishing. Fails after [`shutdown`](Self::shutdown), or when the queue
    /// stays full past the publisher's deadline.
    fn publish(&self, batch: KvEventBatch) -> Result<()>;
    /// Publishes what is queued (within a deadline), stops and releases the sockets. Idempotent.
    fn shutdown(&self) -> Result<()>;
    /// The data-parallel rank this publisher stamps.
    fn data_parallel_rank(&self) -> usize;
    /// Which kind of publisher this is.
    fn kind(&self) -> PublisherKind;
}

/// Does nothing: what vLLM uses when events are disabled.
#[derive(Debug, Default, Clone)]
pub struct NullEventPublisher {
    /// The data-parallel rank (reported, never used).
    pub data_parallel_rank: usize,
}

impl EventPublisher for NullEventPublisher {
    fn publish(&self, _batch: KvEventBatch) -> Result<()> {
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        Ok(())
    }

    fn data_parallel_rank(&self) -> usize {
        self.data_parallel_rank
    }

    fn kind(&self) -> PublisherKind {
        PublisherKind::Null
    }
}

/// Knobs of the ZMQ publisher that vLLM's config does not have.
#[derive(Clone)]
pub struct ZmqPublisherOptions {
    /// Event layout on the wire (vLLM's positional arrays by default).
    pub wire_format: WireFormat,
    /// How long [`publish`](EventPublisher::publish) waits for room in a full queue (vLLM waits
    /// forever; this returns [`Error::Timeout`]). Default 10 s.
    pub publish_timeout: Duration,
    /// How long shutdown waits for the queue to drain and then for the thread. Default
    /// [`SHUTDOWN_TIMEOUT`] each.
    pub shutdown_timeout: Duration,
    /// `ZMQ_LINGER` when the sockets close: how long unsent messages may still go out. vLLM uses 0.
    pub linger: Duration,
    /// The context; default [`global_context`].
    pub context: Option<zmq::Context>,
}

impl Default for ZmqPublisherOptions {
    fn default() -> Self {
        ZmqPublisherOptions {
            wire_format: WireFormat::Array,
            publish_timeout: Duration::from_secs(10),
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            linger: Duration::ZERO,
            context: None,
        }
    }
}

impl fmt::Debug for ZmqPublisherOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZmqPublisherOptions")
            .field("wire_format", &self.wire_format)
            .field("publish_timeout", &self.publish_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("linger", &self.linger)
            .field("context", &self.context.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// Counters of a [`ZmqEventPublisher`].
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Batches handed to the PUB socket (each took one sequence number).
    pub sent: AtomicU64,
    /// Batches whose send failed (their sequence number was used up, as in vLLM).
    pub send_errors: AtomicU64,
    /// Replay requests served.
    pub replays: AtomicU64,
    /// Replay requests ignored as malformed.
    pub bad_replay_requests: AtomicU64,
    /// Subscription messages the publishing socket has taken in (one per topic per subscriber).
    pub subscriptions: AtomicU64,
    /// Unsubscription messages it has taken in.
    pub unsubscriptions: AtomicU64,
}

/// vLLM's `ZmqEventPublisher`: a PUB socket fed by a thread from a bounded queue, with the last
/// `buffer_steps` batches kept for replay over a ROUTER socket.
///
/// The socket is an XPUB with `ZMQ_XPUB_VERBOSE`: on the wire it is a publisher that any SUB (pyzmq,
/// vLLM's consumers) subscribes to exactly as to a PUB, and it also hands the subscriptions it
/// receives to the publisher thread, which counts them ([`PublisherStats::subscriptions`],
/// [`wait_for_subscribers`](Self::wait_for_subscribers)), so a caller can know that a subscriber
/// will get the next batch instead of sleeping and hoping, as vLLM's tests do.
///
/// Messages are `[topic, seq as 8-byte big-endian, msgpack payload]`, `seq` counting from 0 per
/// publisher. A replay request `[client, "", start_seq (8 bytes BE)]` on the ROUTER is answered with
/// `[client, "", seq, payload]` for every buffered batch with `seq >= start_seq`, then
/// `[client, "", END_SEQ, ""]`; a REQ socket, or a DEALER that sends an empty delimiter frame first,
/// makes such requests.
pub struct ZmqEventPublisher {
    dp_rank: usize,
    endpoint: String,
    replay_endpoint: Option<String>,
    bound_endpoint: String,
    bound_replay_endpoint: Option<String>,
    format: WireFormat,
    publish_timeout: Duration,
    shutdown_timeout: Duration,
    queue: Arc<BoundedQueue<Vec<u8>>>,
    running: AtomicBool,
    abort: Arc<AtomicBool>,
    stats: Arc<PublisherStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    finished: Arc<(Mutex<bool>, Condvar)>,
}

impl fmt::Debug for ZmqEventPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZmqEventPublisher")
            .field("dp_rank", &self.dp_rank)
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .field("bound_endpoint", &self.bound_endpoint)
            .field("format", &self.format)
            .field("queued", &self.queue.len())
            .field("running", &self.running.load(Ordering::Relaxed))
            .field("stats", &self.stats)
            .finish()
    }
}

struct Worker {
    publisher: zmq::Socket,
    replay: Option<zmq::Socket>,
    topic: Vec<u8>,
    buffer: VecDeque<(u64, Vec<u8>)>,
    buffer_steps: usize,
    next_seq: u64,
    queue: Arc<BoundedQueue<Vec<u8>>>,
    abort: Arc<AtomicBool>,
    stats: Arc<PublisherStats>,
    linger: Duration,
    endpoint: String,
}

/// How long the thread waits on the queue between replay polls when a ROUTER socket exists (vLLM
/// waits 100 ms; a replay request waits at most this long when no batches flow).
const REPLAY_POLL: Duration = Duration::from_millis(20);
/// Queue wait when there is no replay socket (only bounds how often the abort flag is read).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Back-off after a failed send, as in vLLM.
const SEND_BACKOFF: Duration = Duration::from_millis(100);

impl ZmqEventPublisher {
    /// Opens the sockets for data-parallel rank `dp_rank` (endpoints offset by
    /// [`offset_endpoint_port`]) and starts the `zmq-publisher` thread. Bind and connect errors are
    /// returned here, naming the endpoint.
    pub fn new(
        dp_rank: usize,
        config: &KvEventsConfig,
        options: ZmqPublisherOptions,
    ) -> Result<Self> {
        config.validate()?;
        let endpoint = offset_endpoint_port(Some(&config.endpoint), dp_rank)?
            .unwrap_or_else(|| config.endpoint.clone());
        let replay_endpoint = offset_endpoint_port(config.replay_endpoint.as_deref(), dp_rank)?;
        let ctx = options.context.clone().unwrap_or_else(global_context);

        let publisher = ctx
            .socket(zmq::XPUB)
            .map_err(Error::zmq("create XPUB socket"))?;
        publisher
            .set_xpub_verbose(true)
            .map_err(Error::zmq("set ZMQ_XPUB_VERBOSE"))?;
        // Linger 0 until the thread closes it with the configured linger, so an error below
        // releases the socket at once.
        publisher
            .set_linger(0)
            .map_err(Error::zmq("set PUB linger"))?;
        publisher
            .set_sndhwm(config.hwm)
            .map_err(Error::zmq(format!(
                "set PUB high-water mark {}",
                config.hwm
            )))?;
        let bound_endpoint = if should_bind(&endpoint) {
            publisher
                .bind(&endpoint)
                .map_err(Error::zmq(format!("bind PUB {endpoint}")))?;
            last_endpoint(&publisher).unwrap_or_else(|| endpoint.clone())
        } else {
            publisher
                .connect(&endpoint)
                .map_err(Error::zmq(format!("connect PUB {endpoint}")))?;
            endpoint.clone()
        };

        let (replay, bound_replay_endpoint) = match &replay_endpoint {
            None => (None, None),
            Some(ep) => {
                let s = ctx
                    .socket(zmq::ROUTER)
                    .map_err(Error::zmq("create ROUTER socket"))?;
                // Room for a whole replay (0 stays "no limit"); an unreachable client is
                // reported, not silently dropped.
                let whole = i32::try_from(config.buffer_steps)
                    .unwrap_or(i32::MAX)
                    .saturating_add(1);
                let hwm = if config.hwm == 0 {
                    0
                } else {
                    config.hwm.max(whole)
                };
                s.set_sndhwm(hwm)
                    .map_err(Error::zmq("set ROUTER high-water mark"))?;
                s.set_linger(0).map_err(Error::zmq("set ROUTER linger"))?;
                s.set_router_mandatory(true)
                    .map_err(Error::zmq("set ROUTER_MANDATORY"))?;
                s.bind(ep)
                    .map_err(Error::zmq(format!("bind ROUTER {ep}")))?;
                let bound = last_endpoint(&s).unwrap_or_else(|| ep.clone());
                (Some(s), Some(bound))
            }
        };

        let queue = Arc::new(BoundedQueue::new(config.max_queue_size));
        let abort = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PublisherStats::default());
        let finished = Arc::new((Mutex::new(false), Condvar::new()));
        let worker = Worker {
            publisher,
            replay,
            topic: config.topic.as_bytes().to_vec(),
            buffer: VecDeque::with_capacity(config.buffer_steps.min(1 << 16)),
            buffer_steps: config.buffer_steps,
            next_seq: 0,
            queue: queue.clone(),
            abort: abort.clone(),
            stats: stats.clone(),
            linger: options.linger,
            endpoint: bound_endpoint.clone(),
        };
        let done = finished.clone();
        let thread = std::thread::Builder::new()
            .name("zmq-publisher".into())
            .spawn(move || {
                worker.run();
                let (lock, cv) = &*done;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            })
            .map_err(|source| Error::Io {
                context: "spawn zmq-publisher thread".into(),
                source,
            })?;
        tracing::info!(endpoint = %bound_endpoint, replay = ?bound_replay_endpoint, dp_rank, "started ZMQ KV-event publisher");
        Ok(ZmqEventPublisher {
            dp_rank,
            endpoint,
            replay_endpoint,
            bound_endpoint,
            bound_replay_endpoint,
            format: options.wire_format,
            publish_timeout: options.publish_timeout,
            shutdown_timeout: options.shutdown_timeout,
            queue,
            running: AtomicBool::new(true),
            abort,
            stats,
            thread: Mutex::new(Some(thread)),
            finished,
        })
    }

    /// The PUB endpoint after the DP offset, as configured (`tcp://*:5558` for rank 1 of
    /// `tcp://*:5557`); vLLM's `get_publisher_config().endpoint`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The ROUTER endpoint after the DP offset, as configured.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The PUB endpoint as libzmq bound it (`tcp://127.0.0.1:*` shows the port it got, `*` shows
    /// `0.0.0.0`); the configured endpoint when the socket connects.
    pub fn bound_endpoint(&self) -> &str {
        &self.bound_endpoint
    }

    /// The ROUTER endpoint as libzmq bound it.
    pub fn bound_replay_endpoint(&self) -> Option<&str> {
        self.bound_replay_endpoint.as_deref()
    }

    /// The counters.
    pub fn stats(&self) -> &PublisherStats {
        &self.stats
    }

    /// Batches waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Like [`publish`](EventPublisher::publish) with an explicit deadline for room in the queue.
    pub fn publish_with_deadline(&self, mut batch: KvEventBatch, deadline: Instant) -> Result<()> {
        if !self.running.load(Ordering::Acquire) {
            return Err(Error::Closed("KV-event publisher is shut down".into()));
        }
        if batch.data_parallel_rank.is_none() {
            batch.data_parallel_rank = Some(self.dp_rank as i64);
        }
        let payload = encode_batch(&batch, self.format)?;
        let start = Instant::now();
        match self.queue.push(payload, deadline) {
            Ok(()) => Ok(()),
            Err(PushError::Closed(_)) => {
                Err(Error::Closed("KV-event publisher is shut down".into()))
            }
            Err(PushError::Full(_)) => Err(Error::Timeout {
                op: "kv-events publish".into(),
                waited: start.elapsed(),
                detail: format!(
                    "queue full with {} batches; the publisher thread on {} is not keeping up",
                    self.queue.len(),
                    self.bound_endpoint
                ),
            }),
        }
    }

    /// Waits until the publishing socket has taken in at least `n` subscriptions in all (one per
    /// topic prefix per subscriber), so batches published next reach those subscribers.
    /// [`Error::Timeout`] at `deadline`, with the count seen.
    pub fn wait_for_subscribers(&self, n: u64, deadline: Instant) -> Result<()> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let seen = self.stats.subscriptions.load(Ordering::Acquire);
            if seen >= n {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: format!("kv-events wait for {n} subscribers"),
                    waited: start.elapsed(),
                    detail: format!("{seen} subscriptions seen on {}", self.bound_endpoint),
                });
            }
            // Spin a little, then sleep: the publisher thread needs the core.
            spins += 1;
            if spins < 16 {
                std::thread::yield_now();
            } else {
                std::thread::sleep((deadline - now).min(Duration::from_millis(2)));
            }
        }
    }

    fn wait_finished(&self, deadline: Instant) -> bool {
        let (lock, cv) = &*self.finished;
        let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

fn last_endpoint(s: &zmq::Socket) -> Option<String> {
    s.get_last_endpoint().ok().and_then(|r| r.ok())
}

impl EventPublisher for ZmqEventPublisher {
    fn publish(&self, batch: KvEventBatch) -> Result<()> {
        self.publish_with_deadline(batch, Instant::now() + self.publish_timeout)
    }

    fn shutdown(&self) -> Result<()> {
        if !self.running.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let start = Instant::now();
        // The thread publishes what is queued, then exits (vLLM's sentinel).
        self.queue.close();
        let drained = self.wait_finished(start + self.shutdown_timeout);
        let finished = drained || {
            // Give up on what is left, as vLLM does after its timeout: the thread exits at its next
            // iteration and closes the sockets.
            let left = self.queue.len();
            tracing::warn!(
                left,
                "KV-event queue not drained after {:?}; dropping",
                self.shutdown_timeout
            );
            self.abort.store(true, Ordering::Release);
            self.wait_finished(Instant::now() + self.shutdown_timeout)
        };
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if finished {
            if let Some(h) = handle {
                if h.join().is_err() {
                    return Err(Error::Closed("zmq-publisher thread panicked".into()));
                }
            }
            Ok(())
        } else {
            Err(Error::Timeout {
                op: "kv-events publisher shutdown".into(),
                waited: start.elapsed(),
                detail: format!(
                    "zmq-publisher thread for {} did not exit; left detached",
                    self.endpoint
                ),
            })
        }
    }

    fn data_parallel_rank(&self) -> usize {
        self.dp_rank
    }

    fn kind(&self) -> PublisherKind {
        PublisherKind::Zmq
    }
}

impl Drop for ZmqEventPublisher {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("dropping KV-event publisher: {e}");
        }
    }
}

impl Worker {
    fn run(mut self) {
        let wait = if self.replay.is_some() {
            REPLAY_POLL
        } else {
            IDLE_POLL
        };
        while !self.abort.load(Ordering::Acquire) {
            self.take_subscriptions();
            self.serve_replays();
            match self.queue.pop(wait) {
                Pop::Item(payload) => self.send(payload),
                Pop::Empty => {}
                Pop::Closed => break,
            }
        }
        // Serve a request that raced with shutdown, then close with the configured linger.
        self.serve_replays();
        let linger = i32::try_from(self.linger.as_millis()).unwrap_or(i32::MAX);
        for s in std::iter::once(&self.publisher).chain(self.replay.as_ref()) {
            if let Err(e) = s.set_linger(linger) {
                tracing::warn!("set linger on KV-event socket: {e}");
            }
        }
        tracing::debug!(endpoint = %self.endpoint, sent = self.next_seq, "zmq-publisher thread exits");
    }

    fn send(&mut self, payload: Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frames: [&[u8]; 3] = [&self.topic, &seq.to_be_bytes(), &payload];
        match self.publisher.send_multipart(frames, 0) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                if self.buffer_steps > 0 {
                    if self.buffer.len() == self.buffer_steps {
                        self.buffer.pop_front();
                    }
                    self.buffer.push_back((seq, payload));
                }
            }
            Err(e) => {
                self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq, endpoint = %self.endpoint, "KV-event send failed: {e}");
                std::thread::sleep(SEND_BACKOFF);
            }
        }
    }

    /// Reads the (un)subscription messages the XPUB socket queued for the application.
    fn take_subscriptions(&mut self) {
        loop {
            match self.publisher.recv_bytes(zmq::DONTWAIT) {
                Ok(m) => match m.first() {
                    Some(1) => {
                        self.stats.subscriptions.fetch_add(1, Ordering::Release);
                    }
                    Some(0) => {
                        self.stats.unsubscriptions.fetch_add(1, Ordering::Release);
                    }
                    _ => tracing::debug!("ignored a non-subscription message on the XPUB socket"),
                },
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("KV-event XPUB receive: {e}");
                    return;
                }
            }
        }
    }

    fn serve_replays(&mut self) {
        let Some(replay) = &self.replay else { return };
        // Serve what is waiting now, a bounded number per call so live batches are not starved.
        for _ in 0..16 {
            match replay.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => {
                    // Counted first, so a client that has its answer sees the count.
                    if frames.len() == 3 && frames[1].is_empty() && frames[2].len() == 8 {
                        self.stats.replays.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats
                            .bad_replay_requests
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(e) = serve_one(replay, &frames, &self.buffer) {
                        tracing::warn!("KV-event replay: {e}");
                    }
                }
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("KV-event replay receive: {e}");
                    return;
                }
            }
        }
    }
}

/// Answers one replay request (or ignores it, with a warning, when malformed).
fn serve_one(
    replay: &zmq::Socket,
    frames: &[Vec<u8>],
    buffer: &VecDeque<(u64, Vec<u8>)>,
) -> Result<()> {
    let [client, delim, start] = frames else {
        return Err(Error::Decode(format!(
            "ignored replay request of {} frames (expected [client, \"\", start_seq])",
            frames.len()
        )));
    };
    if !delim.is_empty() {
        return Err(Error::Decode(
            "ignored replay request: second frame is not the empty delimiter".into(),
        ));
    }
    let Ok(start) = <[u8; 8]>::try_from(start.as_slice()) else {
        return Err(Error::Decode(format!(
            "ignored replay request: start_seq has {} bytes, expected 8",
            start.len()
        )));
    };
    let start = u64::from_be_bytes(start);
    let op = |seq: u64| {
        format!(
            "replay seq {seq} to client {}",
            crate::events::types::hex(client)
        )
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let frames: [&[u8]; 4] = [client, b"", &seq.to_be_bytes(), payload];
        replay
            .send_multipart(frames, zmq::DONTWAIT)
            .map_err(Error::zmq(op(*seq)))?;
    }
    let frames: [&[u8]; 4] = [client, b"", &END_SEQ, b""];
    replay
        .send_multipart(frames, zmq::DONTWAIT)
        .map_err(Error::zmq(op(u64::MAX)))
}

/// vLLM's `EventPublisherFactory.create`: a [`NullEventPublisher`] when there is no config, events
/// are disabled or the publisher is `null`; else a [`ZmqEventPublisher`] for `dp_rank`.
pub fn create_publisher(
    config: Option<&KvEventsConfig>,
    dp_rank: usize,
    options: ZmqPublisherOptions,
) -> Result<Box<dyn EventPublisher>> {
    match config {
        Some(c) if c.enable_kv_cache_events && c.resolved_publisher() == PublisherKind::Zmq => {
            Ok(Box::new(ZmqEventPublisher::new(dp_rank, c, options)?))
        }
        _ => Ok(Box::new(NullEventPublisher {
            data_parallel_rank: dp_rank,
        })),
    }
}
