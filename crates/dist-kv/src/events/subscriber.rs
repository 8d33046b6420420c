//! A subscriber of the event stream: SUB for live batches, DEALER for replay.
//!
//! **An oversized message is reported, and the subscriber reconnects.** The sockets refuse
//! messages over a limit (`ZMQ_MAXMSGSIZE`, [`DEFAULT_MAX_MESSAGE`]) before allocating them;
//! libzmq then drops the connection as a protocol error and, unlike after any other
//! disconnect, never reconnects: a connecting subscriber would hear nothing more, silently. So
//! each connecting socket watches its libzmq monitor: a disconnect that is not followed by
//! libzmq's own reconnect within [`DROP_GRACE`] is such a drop. The next `recv` (or
//! `recv_replay`) returns [`Error::Dropped`] naming the endpoint and the limit, after the
//! subscriber has connected again; the batches sent meanwhile are lost, which their sequence
//! numbers show (vLLM's subscribers ask the replay socket for a gap). A bound SUB (a publisher
//! that connects) needs none of this: the publisher reconnects on its own.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::events::publisher::{global_context, END_SEQ};
use crate::events::types::KvEventBatch;
use crate::events::wire::{decode_batch_with, DecodeLimits};

/// Largest message the subscriber's sockets accept by default (`ZMQ_MAXMSGSIZE`); a peer
/// sending more is disconnected by libzmq before the message is allocated.
pub const DEFAULT_MAX_MESSAGE: i64 = 64 << 20;

/// How long after a disconnect libzmq's own reconnect must show before the disconnect counts as
/// a drop that libzmq will not repair (it shows within a millisecond when it comes).
pub const DROP_GRACE: Duration = Duration::from_millis(300);

/// Settings of a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// Largest message accepted, in bytes (`ZMQ_MAXMSGSIZE`; -1: no limit).
    pub max_message_bytes: i64,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            max_message_bytes: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// What libzmq's monitor said about one connecting socket, without I/O: whether its
/// connection was dropped for good (a disconnect without a reconnect attempt after it).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DropWatch {
    disconnected_at: Option<Instant>,
}

/// The monitor events a [`DropWatch`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// The connection closed.
    Disconnected,
    /// libzmq is (re)connecting: a retry scheduled, a connect in progress, connected.
    Connecting,
}

impl DropWatch {
    /// An event at `now`.
    pub(crate) fn on_event(&mut self, e: LinkEvent, now: Instant) {
        self.disconnected_at = match e {
            LinkEvent::Disconnected => Some(now),
            LinkEvent::Connecting => None,
        };
    }
    /// True when the connection was dropped and libzmq did not start reconnecting within
    /// [`DROP_GRACE`].
    pub(crate) fn dropped(&self, now: Instant) -> bool {
        self.disconnected_at
            .is_some_and(|t| now.saturating_duration_since(t) >= DROP_GRACE)
    }
    /// When to look again, while a disconnect is unexplained.
    pub(crate) fn check_at(&self) -> Option<Instant> {
        self.disconnected_at.map(|t| t + DROP_GRACE)
    }
    /// Forgets the disconnect (the subscriber reconnected).
    pub(crate) fn reset(&mut self) {
        self.disconnected_at = None;
    }
}

/// A connecting socket's monitor: libzmq writes its events to a PAIR socket with a blocking
/// send (a PAIR that is gone, or full, would stall the context's I/O thread), so a small thread
/// owns that socket and drains it into a [`DropWatch`] continuously; the subscriber reads the
/// watch and does any reconnecting on its own thread.
struct Watched {
    state: Arc<Mutex<DropWatch>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

static MONITORS: AtomicU64 = AtomicU64::new(0);

fn monitor_endpoint() -> String {
    format!(
        "inproc://dist-kv-monitor-{}-{}",
        std::process::id(),
        MONITORS.fetch_add(1, Ordering::Relaxed)
    )
}

fn lock(m: &Mutex<DropWatch>) -> std::sync::MutexGuard<'_, DropWatch> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watched {
    /// Starts monitoring `sock` (before it connects).
    fn new(ctx: &zmq::Context, sock: &zmq::Socket, what: &str) -> Result<Self> {
        let ep = monitor_endpoint();
        let events = zmq::SocketEvent::DISCONNECTED.to_raw()
            | zmq::SocketEvent::CONNECT_RETRIED.to_raw()
            | zmq::SocketEvent::CONNECT_DELAYED.to_raw()
            | zmq::SocketEvent::CONNECTED.to_raw()
            | zmq::SocketEvent::HANDSHAKE_SUCCEEDED.to_raw();
        sock.monitor(&ep, i32::from(events))
            .map_err(Error::zmq(format!("monitor {what}")))?;
        let pair = ctx
            .socket(zmq::PAIR)
            .map_err(Error::zmq("create monitor socket"))?;
        pair.set_linger(0)
            .map_err(Error::zmq("set monitor linger"))?;
        pair.connect(&ep)
            .map_err(Error::zmq(format!("connect monitor {ep}")))?;
        let state = Arc::new(Mutex::new(DropWatch::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kv-events-monitor".into())
            .spawn(move || {
                while !sp.load(Ordering::Acquire) {
                    if !matches!(pair.poll(zmq::POLLIN, 100), Ok(n) if n > 0) {
                        continue;
                    }
                    while let Ok(frames) = pair.recv_multipart(zmq::DONTWAIT) {
                        let Some(ev) = frames.first().filter(|f| f.len() >= 2) else {
                            continue;
                        };
                        let ev = u16::from_le_bytes([ev[0], ev[1]]);
                        let e = if ev == zmq::SocketEvent::DISCONNECTED.to_raw() {
                            LinkEvent::Disconnected
                        } else {
                            LinkEvent::Connecting
                        };
                        lock(&st).on_event(e, Instant::now());
                    }
                }
            })
            .map_err(|source| Error::Io {
                context: "spawn kv-events-monitor".into(),
                source,
            })?;
        Ok(Watched {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// When to look at the watch again (a disconnect not yet explained).
    fn check_at(&self) -> Option<Instant> {
        lock(&self.state).check_at()
    }

    /// `Err(Dropped)`, having connected `sock` to `endpoint` again, when the connection was
    /// dropped for good.
    fn check(&self, sock: &zmq::Socket, endpoint: &str, limit: i64, now: Instant) -> Result<()> {
        {
            let mut w = lock(&self.state);
            if !w.dropped(now) {
                return Ok(());
            }
            w.reset();
        }
        // libzmq forgot the endpoint's session; the disconnect only tidies up if it did not.
        let _ = sock.disconnect(endpoint);
        sock.connect(endpoint)
            .map_err(Error::zmq(format!("reconnect to {endpoint}")))?;
        tracing::warn!(%endpoint, limit,
            "kv-events: libzmq dropped the connection (a message over the size limit, or \
             malformed framing) and would not reconnect; reconnected");
        Err(Error::Dropped {
            endpoint: endpoint.to_string(),
            limit,
        })
    }

    /// Switches `sock`'s monitor off (libzmq then sends it nothing more) and ends the thread.
    fn stop(&mut self, sock: &zmq::Socket) {
        // A new monitor with no events replaces the old one, which libzmq closes.
        let _ = sock.monitor(&monitor_endpoint(), 0);
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One live batch: its topic, sequence number and contents.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedBatch {
    /// The topic frame.
    pub topic: Vec<u8>,
    /// The sequence number.
    pub seq: u64,
    /// The decoded batch.
    pub batch: KvEventBatch,
}

/// Subscribes to a KV-event stream (what vLLM's consumers, such as KV-aware routers, do).
///
/// The SUB socket connects to the publisher's endpoint, or binds it when the endpoint contains `*`
/// (for a publisher that connects). Replay goes over a DEALER socket that sends
/// `["", start_seq]`, which the publisher's ROUTER sees as `[client, "", start_seq]`.
pub struct KvEventSubscriber {
    sub: zmq::Socket,
    /// The SUB socket's monitor when it connects (a bound one needs none).
    sub_watch: Option<Watched>,
    replay: Option<(zmq::Socket, Watched, String)>,
    limits: DecodeLimits,
    endpoint: String,
    max_message: i64,
}

impl fmt::Debug for KvEventSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvEventSubscriber")
            .field("endpoint", &self.endpoint)
            .field("replay", &self.replay.is_some())
            .finish()
    }
}

impl Drop for KvEventSubscriber {
    fn drop(&mut self) {
        if let Some(w) = &mut self.sub_watch {
            w.stop(&self.sub);
        }
        if let Some((s, w, _)) = &mut self.replay {
            w.stop(s);
        }
    }
}

impl KvEventSubscriber {
    /// Subscribes to `topic` (a prefix, as ZeroMQ matches it) on `endpoint`, with an optional replay
    /// endpoint, in the [`global_context`].
    pub fn connect(endpoint: &str, replay_endpoint: Option<&str>, topic: &str) -> Result<Self> {
        Self::connect_in(&global_context(), endpoint, replay_endpoint, topic)
    }

    /// As [`connect`](Self::connect), in the context `ctx`.
    pub fn connect_in(
        ctx: &zmq::Context,
        endpoint: &str,
        replay_endpoint: Option<&str>,
        topic: &str,
    ) -> Result<Self> {
        Self::connect_with(
            ctx,
            endpoint,
            replay_endpoint,
            topic,
            SubscriberOptions::default(),
        )
    }

    /// As [`connect_in`](Self::connect_in), with `options`.
    pub fn connect_with(
        ctx: &zmq::Context,
        endpoint: &str,
        replay_endpoint: Option<&str>,
        topic: &str,
        options: SubscriberOptions,
    ) -> Result<Self> {
        let max = options.max_message_bytes;
        if max == 0 || max < -1 {
            return Err(Error::InvalidArgument(format!(
                "max message size {max}: positive, or -1 for no limit"
            )));
        }
        let sub = ctx
            .socket(zmq::SUB)
            .map_err(Error::zmq("create SUB socket"))?;
        sub.set_maxmsgsize(max)
            .map_err(Error::zmq("set SUB max message size"))?;
        sub.set_rcvhwm(100_000)
            .map_err(Error::zmq("set SUB high-water mark"))?;
        sub.set_linger(0).map_err(Error::zmq("set SUB linger"))?;
        sub.set_subscribe(topic.as_bytes())
            .map_err(Error::zmq(format!("subscribe to {topic:?}")))?;
        let mut sub_watch = None;
        let endpoint = if endpoint.contains('*') {
            sub.bind(endpoint)
                .map_err(Error::zmq(format!("bind SUB {endpoint}")))?;
            sub.get_last_endpoint()
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_else(|| endpoint.to_owned())
        } else {
            sub_watch = Some(Watched::new(ctx, &sub, "SUB")?);
            sub.connect(endpoint)
                .map_err(Error::zmq(format!("connect SUB {endpoint}")))?;
            endpoint.to_owned()
        };
        let replay = match replay_endpoint {
            None => None,
            Some(ep) => {
                let s = ctx
                    .socket(zmq::DEALER)
                    .map_err(Error::zmq("create DEALER socket"))?;
                s.set_maxmsgsize(max)
                    .map_err(Error::zmq("set DEALER max message size"))?;
                s.set_rcvhwm(0)
                    .map_err(Error::zmq("set DEALER high-water mark"))?;
                s.set_linger(0).map_err(Error::zmq("set DEALER linger"))?;
                let w = Watched::new(ctx, &s, "DEALER")?;
                s.connect(ep)
                    .map_err(Error::zmq(format!("connect DEALER {ep}")))?;
                Some((s, w, ep.to_owned()))
            }
        };
        Ok(KvEventSubscriber {
            sub,
            sub_watch,
            replay,
            limits: DecodeLimits::default(),
            endpoint,
            max_message: max,
        })
    }

    /// The endpoint the SUB socket connected to, or bound (with the port libzmq chose for `*`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Replaces the decoder's caps.
    pub fn set_limits(&mut self, limits: DecodeLimits) {
        self.limits = limits;
    }

    /// Waits up to `timeout` for one live message. `Ok(None)` when none came; an error for a
    /// malformed message (which is consumed, so the next call reads the next one), and
    /// [`Error::Dropped`] once for a connection libzmq dropped (the subscriber has reconnected;
    /// the next call goes on).
    pub fn recv(&self, timeout: Duration) -> Result<Option<ReceivedBatch>> {
        let Some(frames) = self.recv_raw(timeout)? else {
            return Ok(None);
        };
        let [topic, seq, payload]: [Vec<u8>; 3] =
            frames.try_into().map_err(|f: Vec<Vec<u8>>| {
                Error::Decode(format!(
                    "live message of {} frames, expected [topic, seq, payload]",
                    f.len()
                ))
            })?;
        let seq = seq_of(&seq)?;
        let batch = decode_batch_with(&payload, self.limits)?;
        Ok(Some(ReceivedBatch { topic, seq, batch }))
    }

    /// Waits up to `timeout` for one live multipart message, undecoded (errors as
    /// [`recv`](Self::recv)).
    pub fn recv_raw(&self, timeout: Duration) -> Result<Option<Vec<Vec<u8>>>> {
        let deadline = Instant::now() + timeout;
        let ready = wait_readable(
            &self.sub,
            self.sub_watch.as_ref(),
            &self.endpoint,
            self.max_message,
            deadline,
            "poll SUB",
        )?;
        if ready {
            self.sub
                .recv_multipart(zmq::DONTWAIT)
                .map(Some)
                .map_err(Error::zmq(format!("receive from SUB {}", self.endpoint)))
        } else {
            Ok(None)
        }
    }

    /// The largest message accepted, in bytes (-1: no limit).
    pub fn max_message_bytes(&self) -> i64 {
        self.max_message
    }

    /// Asks the publisher for every buffered batch with `seq >= start_seq`.
    pub fn request_replay(&self, start_seq: u64) -> Result<()> {
        let (s, _, _) = self.replay_socket()?;
        let frames: [&[u8]; 2] = [b"", &start_seq.to_be_bytes()];
        s.send_multipart(frames, 0)
            .map_err(Error::zmq(format!("send replay request from {start_seq}")))
    }

    /// Receives the answer to [`request_replay`](Self::request_replay) up to the end marker, waiting
    /// at most `deadline` in all.
    pub fn recv_replay(&self, deadline: Instant) -> Result<Vec<(u64, KvEventBatch)>> {
        let (s, watch, ep) = self.replay_socket()?;
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            if !wait_readable(
                s,
                Some(watch),
                ep,
                self.max_message,
                deadline,
                "poll DEALER",
            )? {
                return Err(Error::Timeout {
                    op: "kv-events replay".into(),
                    waited: start.elapsed(),
                    detail: format!("{} batches received, no end marker", out.len()),
                });
            }
            let frames = s
                .recv_multipart(zmq::DONTWAIT)
                .map_err(Error::zmq("receive replay"))?;
            let [delim, seq, payload]: [Vec<u8>; 3] =
                frames.try_into().map_err(|f: Vec<Vec<u8>>| {
                    Error::Decode(format!(
                        "replay message of {} frames, expected [\"\", seq, payload]",
                        f.len()
                    ))
                })?;
            if !delim.is_empty() {
                return Err(Error::Decode(
                    "replay message without the empty delimiter".into(),
                ));
            }
            if seq == END_SEQ && payload.is_empty() {
                return Ok(out);
            }
            out.push((seq_of(&seq)?, decode_batch_with(&payload, self.limits)?));
        }
    }

    fn replay_socket(&self) -> Result<&(zmq::Socket, Watched, String)> {
        self.replay
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("subscriber has no replay endpoint".into()))
    }
}

fn seq_of(b: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Decode(format!("sequence frame of {} bytes, expected 8", b.len())))
}

/// Waits until `s` has a message (true) or `deadline` passes (false), looking at its monitor's
/// watch at least every [`DROP_GRACE`]: a connection dropped for good is connected again and
/// reported as [`Error::Dropped`].
fn wait_readable(
    s: &zmq::Socket,
    watch: Option<&Watched>,
    endpoint: &str,
    limit: i64,
    deadline: Instant,
    op: &str,
) -> Result<bool> {
    loop {
        let now = Instant::now();
        let mut until = deadline;
        if let Some(w) = watch {
            w.check(s, endpoint, limit, now)?;
            until = until.min(w.check_at().unwrap_or(now + DROP_GRACE).max(now));
        }
        let ms =
            i64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(i64::MAX);
        // EINTR (a signal) counts as "nothing yet"; the caller's deadline still holds.
        match s.poll(zmq::POLLIN, ms) {
            Ok(n) if n > 0 => return Ok(true),
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => {
                return Err(Error::Zmq {
                    op: op.into(),
                    source: e,
                })
            }
        }
        if Instant::now() >= deadline {
            if let Some(w) = watch {
                w.check(s, endpoint, limit, Instant::now())?;
            }
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnect_without_a_reconnect_is_a_drop() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = DropWatch::default();
        assert!(!w.dropped(t0) && w.check_at().is_none());
        // libzmq's ordinary reconnect follows its disconnect at once.
        w.on_event(LinkEvent::Connecting, t0);
        w.on_event(LinkEvent::Disconnected, t0 + ms(1));
        w.on_event(LinkEvent::Connecting, t0 + ms(1));
        assert!(!w.dropped(t0 + ms(10_000)));
        // After an oversized message nothing follows the disconnect.
        w.on_event(LinkEvent::Disconnected, t0 + ms(20));
        assert_eq!(w.check_at(), Some(t0 + ms(20) + DROP_GRACE));
        assert!(!w.dropped(t0 + ms(20) + DROP_GRACE - ms(1)));
        assert!(w.dropped(t0 + ms(20) + DROP_GRACE));
        w.reset();
        assert!(!w.dropped(t0 + ms(20_000)));
    }
}
