//! The error type of `dist-kv`'s KV-cache events (KV transfer has its own,
//! [`crate::transfer::Error`], whose errors name the request they fail).

use std::time::Duration;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything KV-cache events can fail with.
///
/// Variants say what the caller can act on: a malformed payload (with where it went wrong), a socket
/// that could not be bound or connected (with the endpoint), a full queue or a late shutdown (with the
/// operation and how long it waited), a publisher used after shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller passed something the operation cannot accept (an endpoint, a config value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Bytes that are not a valid KV-event batch or frame; the message says where and why.
    #[error("decode error: {0}")]
    Decode(String),
    /// A value that cannot be written as MessagePack (an integer outside `i64::MIN..=u64::MAX`, a
    /// length above `u32::MAX`).
    #[error("encode error: {0}")]
    Encode(String),
    /// A blocking call passed its deadline.
    #[error("{op}: timed out after {waited:?}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Timeout {
        /// The operation (`"kv-events publish"`, `"kv-events replay from 10"`).
        op: String,
        /// How long the call waited.
        waited: Duration,
        /// Anything else that helps (queue length, endpoint).
        detail: String,
    },
    /// libzmq dropped a subscriber's connection and would not have reconnected: the publisher
    /// sent a message over the subscriber's size limit (or malformed framing). The subscriber
    /// has connected again; the messages sent in between are lost.
    #[error(
        "{endpoint}: libzmq dropped the connection after a message over the {limit}-byte limit \
         (ZMQ_MAXMSGSIZE) or malformed framing, and would not reconnect; reconnected (messages \
         sent meanwhile are lost: replay recovers those that fit)"
    )]
    Dropped {
        /// The publisher's endpoint.
        endpoint: String,
        /// The size limit in bytes (-1: none).
        limit: i64,
    },
    /// The publisher was shut down, or its thread is gone.
    #[error("closed: {0}")]
    Closed(String),
    /// libzmq reported an error; `op` says what was being done and on which endpoint.
    #[error("zmq {op}: {source}")]
    Zmq {
        /// What was being done (`"bind PUB tcp://*:5557"`).
        op: String,
        /// libzmq's own error.
        #[source]
        source: zmq::Error,
    },
    /// An operating-system error (spawning the publisher thread, writing output).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps a libzmq error with the operation it interrupted.
    pub(crate) fn zmq(op: impl Into<String>) -> impl FnOnce(zmq::Error) -> Error {
        let op = op.into();
        move |source| Error::Zmq { op, source }
    }
}
