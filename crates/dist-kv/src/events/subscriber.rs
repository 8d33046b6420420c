//! A subscriber of the event stream: SUB for live batches, DEALER for replay.

use std::fmt;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::events::publisher::{global_context, END_SEQ};
use crate::events::types::KvEventBatch;
use crate::events::wire::{decode_batch_with, DecodeLimits};

/// Largest message the subscriber's sockets accept (`ZMQ_MAXMSGSIZE`); a peer sending more is
/// disconnected by libzmq before the message is allocated.
pub const DEFAULT_MAX_MESSAGE: i64 = 64 << 20;

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
    replay: Option<zmq::Socket>,
    limits: DecodeLimits,
    endpoint: String,
}

impl fmt::Debug for KvEventSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvEventSubscriber")
            .field("endpoint", &self.endpoint)
            .field("replay", &self.replay.is_some())
            .finish()
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
        let sub = ctx
            .socket(zmq::SUB)
            .map_err(Error::zmq("create SUB socket"))?;
        sub.set_maxmsgsize(DEFAULT_MAX_MESSAGE)
            .map_err(Error::zmq("set SUB max message size"))?;
        sub.set_rcvhwm(100_000)
            .map_err(Error::zmq("set SUB high-water mark"))?;
        sub.set_linger(0).map_err(Error::zmq("set SUB linger"))?;
        sub.set_subscribe(topic.as_bytes())
            .map_err(Error::zmq(format!("subscribe to {topic:?}")))?;
        let endpoint = if endpoint.contains('*') {
            sub.bind(endpoint)
                .map_err(Error::zmq(format!("bind SUB {endpoint}")))?;
            sub.get_last_endpoint()
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_else(|| endpoint.to_owned())
        } else {
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
                s.set_maxmsgsize(DEFAULT_MAX_MESSAGE)
                    .map_err(Error::zmq("set DEALER max message size"))?;
                s.set_rcvhwm(0)
                    .map_err(Error::zmq("set DEALER high-water mark"))?;
                s.set_linger(0).map_err(Error::zmq("set DEALER linger"))?;
                s.connect(ep)
                    .map_err(Error::zmq(format!("connect DEALER {ep}")))?;
                Some(s)
            }
        };
        Ok(KvEventSubscriber {
            sub,
            replay,
            limits: DecodeLimits::default(),
            endpoint,
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
    /// malformed message (which is consumed, so the next call reads the next one).
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

    /// Waits up to `timeout` for one live multipart message, undecoded.
    pub fn recv_raw(&self, timeout: Duration) -> Result<Option<Vec<Vec<u8>>>> {
        if poll_in(&self.sub, timeout, "poll SUB")? {
            self.sub
                .recv_multipart(zmq::DONTWAIT)
                .map(Some)
                .map_err(Error::zmq(format!("receive from SUB {}", self.endpoint)))
        } else {
            Ok(None)
        }
    }

    /// Asks the publisher for every buffered batch with `seq >= start_seq`.
    pub fn request_replay(&self, start_seq: u64) -> Result<()> {
        let s = self.replay_socket()?;
        let frames: [&[u8]; 2] = [b"", &start_seq.to_be_bytes()];
        s.send_multipart(frames, 0)
            .map_err(Error::zmq(format!("send replay request from {start_seq}")))
    }

    /// Receives the answer to [`request_replay`](Self::request_replay) up to the end marker, waiting
    /// at most `deadline` in all.
    pub fn recv_replay(&self, deadline: Instant) -> Result<Vec<(u64, KvEventBatch)>> {
        let s = self.replay_socket()?;
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_in(s, left, "poll DEALER")? {
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

    fn replay_socket(&self) -> Result<&zmq::Socket> {
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

fn poll_in(s: &zmq::Socket, timeout: Duration, op: &str) -> Result<bool> {
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    // EINTR (a signal) counts as "nothing yet"; the caller's deadline still holds.
    match s.poll(zmq::POLLIN, ms) {
        Ok(n) => Ok(n > 0),
        Err(zmq::Error::EINTR) => Ok(false),
        Err(e) => Err(Error::Zmq {
            op: op.into(),
            source: e,
        }),
    }
}
