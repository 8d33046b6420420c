//! The error type of KV transfer.
//!
//! It is separate from [`crate::Error`] (the events' error) because a transfer error is usually
//! about one *request* of a batch: [`Error::Request`] wraps the cause with the request id, so an
//! engine can fail that request and go on with the others.

use std::time::Duration;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a connector can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller passed something the operation cannot accept (a block id out of range, a shape).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A blocking call passed its deadline.
    #[error("{op}: timed out after {waited:?}{}{}",
        peer.as_ref().map(|p| format!(" waiting for peer {p}")).unwrap_or_default(),
        if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Timeout {
        /// The operation (`"kv p2p recv req-1#layer.0"`).
        op: String,
        /// How long the call waited.
        waited: Duration,
        /// The peer instance (`ip:port`) that did not answer, where one was awaited.
        peer: Option<String>,
        /// Anything else that helps (buffer fill, queue length).
        detail: String,
    },
    /// The peer instance closed its connection or died.
    #[error("peer {peer} lost during {op}: {detail}")]
    PeerLost {
        /// The peer's address (`ip:port`).
        peer: String,
        /// The operation in flight.
        op: String,
        /// What was observed.
        detail: String,
    },
    /// Bytes that do not follow the control protocol, or a peer's answer that makes no sense.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A peer did not prove it holds the shared secret, or this side could not prove it (one
    /// side has a secret and the other none, or they hold different ones).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A stored KV file that is partial, damaged or not the expected tensor; nothing was loaded from it.
    #[error("corrupt KV file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something a request needs is not there (a KV file, a tensor the producer does not hold).
    #[error("not found: {0}")]
    NotFound(String),
    /// A buffer cannot take a tensor, even when empty.
    #[error("capacity: {0}")]
    Capacity(String),
    /// The engine was shut down while the call was waiting.
    #[error("shut down: {0}")]
    Shutdown(String),
    /// The backend failed: a device call, a missing library (CUDA, NCCL), device memory.
    #[error("backend: {0}")]
    Backend(String),
    /// An operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The transfer of one request failed; the engine should fail or recompute that request only.
    #[error("request {request_id}: {source}")]
    Request {
        /// The request's id.
        request_id: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
    /// Wraps `self` as the failure of `request_id` (unless it already names that request).
    pub fn for_request(self, request_id: &str) -> Self {
        match self {
            Error::Request {
                request_id: ref r, ..
            } if r == request_id => self,
            e => Error::Request {
                request_id: request_id.to_string(),
                source: Box::new(e),
            },
        }
    }
    /// The request this error is about, if it names one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Error::Request { request_id, .. } => Some(request_id),
            _ => None,
        }
    }
    /// A copy for reporting the same failure in two places (`std::io::Error` is not `Clone`:
    /// an I/O error is copied with its kind and message).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::Timeout {
                op,
                waited,
                peer,
                detail,
            } => Error::Timeout {
                op: op.clone(),
                waited: *waited,
                peer: peer.clone(),
                detail: detail.clone(),
            },
            Error::PeerLost { peer, op, detail } => Error::PeerLost {
                peer: peer.clone(),
                op: op.clone(),
                detail: detail.clone(),
            },
            Error::Protocol(s) => Error::Protocol(s.clone()),
            Error::Auth(s) => Error::Auth(s.clone()),
            Error::Corrupt { path, reason } => Error::Corrupt {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::NotFound(s) => Error::NotFound(s.clone()),
            Error::Capacity(s) => Error::Capacity(s.clone()),
            Error::Shutdown(s) => Error::Shutdown(s.clone()),
            Error::Backend(s) => Error::Backend(s.clone()),
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Request { request_id, source } => Error::Request {
                request_id: request_id.clone(),
                source: Box::new(source.duplicate()),
            },
        }
    }
}

impl From<dist_core::Error> for Error {
    fn from(e: dist_core::Error) -> Self {
        match e {
            dist_core::Error::InvalidArgument(s) => Error::InvalidArgument(s),
            dist_core::Error::Protocol(s) => Error::Protocol(s),
            dist_core::Error::Timeout {
                op,
                waited,
                missing_ranks,
                detail,
            } => Error::Timeout {
                op,
                waited,
                peer: None,
                detail: if missing_ranks.is_empty() {
                    detail
                } else {
                    format!("ranks {missing_ranks:?} did not answer; {detail}")
                },
            },
            other => Error::Backend(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_error_names_request_and_cause() {
        let e = Error::PeerLost {
            peer: "10.0.0.2:14580".into(),
            op: "kv p2p put".into(),
            detail: "connection reset".into(),
        }
        .for_request("cmpl-7");
        let s = e.to_string();
        assert!(s.contains("cmpl-7") && s.contains("10.0.0.2:14580"), "{s}");
        assert_eq!(e.request_id(), Some("cmpl-7"));
        // Wrapping twice for the same request does not nest.
        let again = e.for_request("cmpl-7");
        assert!(
            matches!(&again, Error::Request { source, .. } if !matches!(**source, Error::Request { .. }))
        );
        assert_eq!(again.duplicate().to_string(), again.to_string());
    }
}
