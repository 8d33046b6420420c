//! The one error type of the workspace's traits.

use std::time::Duration;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a collective, a store or a group can fail with.
///
/// Variants name what a caller can act on: which operation timed out and which ranks did
/// not answer, which peer was lost, which library could not be found and where it was looked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A blocking call passed its deadline.
    #[error(
        "{op}: timed out after {waited:?}{}{}",
        fmt_ranks(missing_ranks),
        fmt_detail(detail)
    )]
    Timeout {
        /// The operation, with its group where known (`"tp:0 all_reduce"`).
        op: String,
        /// How long the call waited.
        waited: Duration,
        /// Ranks (in the group) that did not arrive; empty when unknown.
        missing_ranks: Vec<usize>,
        /// Anything else that helps: missing store keys, what the ranks were last doing.
        detail: String,
    },
    /// A peer closed its connection, died or was shut down.
    #[error("peer rank {rank} lost during {op}: {detail}")]
    PeerLost {
        /// The rank (in the group) that was lost.
        rank: usize,
        /// The operation in flight.
        op: String,
        /// What was observed.
        detail: String,
    },
    /// A caller passed something the operation cannot accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation is not implemented by this backend (yet); the docs list what is.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A shared library could not be loaded.
    #[error("library {library} not found (tried: {})", tried.join(", "))]
    LibraryNotFound {
        /// The library's common name, e.g. `libnccl`.
        library: String,
        /// Every path or name that was tried, each with the loader's reason.
        tried: Vec<String>,
    },
    /// A vendor library or a backend reported an error; the message is the library's own.
    #[error("{backend} error{}: {message}", code.map(|c| format!(" {c}")).unwrap_or_default())]
    Backend {
        /// Which backend or library (`"nccl"`, `"cuda"`, `"gloo"`, `"shm"`).
        backend: &'static str,
        /// The library's status code, where it has one.
        code: Option<i64>,
        /// The library's own message.
        message: String,
    },
    /// Bytes that do not follow the protocol: a malformed frame, an oversized length, a bad object.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A group, a communicator or the process-wide state is not initialised, or already destroyed.
    #[error("not initialized: {0}")]
    NotInitialized(String),
    /// The object was shut down while the call was waiting.
    #[error("shut down: {0}")]
    Shutdown(String),
    /// An operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn fmt_ranks(r: &[usize]) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!("; ranks that did not answer: {r:?}")
    }
}

fn fmt_detail(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!("; {d}")
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
    /// Shorthand for [`Error::Protocol`].
    pub fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
    /// Shorthand for a [`Error::Timeout`] without known ranks.
    pub fn timeout(op: impl Into<String>, waited: Duration, detail: impl Into<String>) -> Self {
        Error::Timeout {
            op: op.into(),
            waited,
            missing_ranks: Vec::new(),
            detail: detail.into(),
        }
    }
    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// The same error with `op` (`"tp:0 all_reduce"`) named first, unless its message already
    /// starts with it: how a layer says which call a lower layer's failure belongs to. The variant
    /// is kept, so callers still match on it.
    pub fn context(self, op: impl std::fmt::Display) -> Error {
        let op = op.to_string();
        let pre = |m: String| {
            if m.starts_with(&op) {
                m
            } else {
                format!("{op}: {m}")
            }
        };
        match self {
            Error::Timeout {
                op: o,
                waited,
                missing_ranks,
                detail,
            } => Error::Timeout {
                op: if o.starts_with(&op) {
                    o
                } else {
                    format!("{op} {o}")
                },
                waited,
                missing_ranks,
                detail,
            },
            Error::PeerLost {
                rank,
                op: o,
                detail,
            } => Error::PeerLost {
                rank,
                op: if o.starts_with(&op) {
                    o
                } else {
                    format!("{op} {o}")
                },
                detail,
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(pre(m)),
            Error::Unsupported(m) => Error::Unsupported(pre(m)),
            Error::Backend {
                backend,
                code,
                message,
            } => Error::Backend {
                backend,
                code,
                message: pre(message),
            },
            Error::Protocol(m) => Error::Protocol(pre(m)),
            Error::NotInitialized(m) => Error::NotInitialized(pre(m)),
            Error::Shutdown(m) => Error::Shutdown(pre(m)),
            Error::Io { context, source } => Error::Io {
                context: pre(context),
                source,
            },
            other @ Error::LibraryNotFound { .. } => other,
        }
    }
}

/// Checks a condition, returning [`Error::InvalidArgument`] with a formatted message when it fails.
#[macro_export]
macro_rules! ensure_arg {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::InvalidArgument(format!($($fmt)+)));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_the_op_once_and_keeps_the_variant() {
        let e = Error::Backend {
            backend: "nccl",
            code: Some(3),
            message: "unhandled system error".into(),
        }
        .context("tp:0 all_reduce");
        assert!(matches!(e, Error::Backend { code: Some(3), .. }));
        assert_eq!(
            e.to_string(),
            "nccl error 3: tp:0 all_reduce: unhandled system error"
        );
        let again = e.context("tp:0 all_reduce");
        assert_eq!(
            again.to_string(),
            "nccl error 3: tp:0 all_reduce: unhandled system error"
        );
        let t = Error::timeout("all_gather", Duration::from_secs(1), "").context("tp:1");
        assert!(
            t.to_string().starts_with("tp:1 all_gather: timed out"),
            "{t}"
        );
        assert!(matches!(
            Error::invalid("bad dim").context("pp:0 send"),
            Error::InvalidArgument(m) if m == "pp:0 send: bad dim"
        ));
    }

    #[test]
    fn timeout_message_names_op_ranks_and_time() {
        let e = Error::Timeout {
            op: "tp:0 all_reduce".into(),
            waited: Duration::from_millis(1500),
            missing_ranks: vec![3],
            detail: String::new(),
        };
        let s = e.to_string();
        assert!(s.contains("tp:0 all_reduce"), "{s}");
        assert!(s.contains("1.5s"), "{s}");
        assert!(s.contains("[3]"), "{s}");
    }

    #[test]
    fn library_not_found_lists_tries() {
        let e = Error::LibraryNotFound {
            library: "libnccl".into(),
            tried: vec![
                "libnccl.so.2: no such file".into(),
                "libnccl.so: no such file".into(),
            ],
        };
        assert!(e
            .to_string()
            .contains("libnccl.so.2: no such file, libnccl.so"));
    }
}
