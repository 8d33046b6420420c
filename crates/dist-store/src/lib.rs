//! # dist-store: PyTorch's TCP store in Rust, the stateless process group, and the launcher
//!
//! This crate is the rendezvous layer of the `dist` workspace. It sits beside the hardware
//! backends, on top of `dist-core` (whose [`Store`](dist_core::Store) and
//! [`HostGroup`](dist_core::HostGroup) traits it implements), and needs no accelerator.
//!
//! ```text
//!   launch (dist run)                  serve (dist store serve)
//!        │                                    │
//!   StatelessProcessGroup ── TcpStoreClient ── TCP ── StoreServer (mio loops: the socket shell)
//!        (HostGroup)            (Store)                    │            guard (limits)
//!                                 │                   state (Session per connection,
//!                                 │                          StoreState: keys, queues, waits)
//!                                 └──────── proto (sans-IO codec) ────────┘
//! ```
//!
//! ## Design
//! - **Wire compatibility.** [`proto`] is PyTorch's `TCPStore` protocol of the libuv era
//!   (PyTorch ≥ 2.4), byte for byte: a PyTorch process can use [`StoreServer`] as its store
//!   (`is_master=False`), and [`TcpStoreClient`] works against a PyTorch master. The protocol is
//!   written down in `docs/STORE_PROTOCOL.md`; golden byte transcripts in `tests/store_golden.rs`
//!   pin it without PyTorch.
//! - **Sans-IO codec and state machines, thin socket shell.** [`proto`] decodes requests and
//!   replies from byte buffers that may be partial, checking every length against
//!   [`proto::Limits`] before allocating. [`state`] holds what the commands mean: a
//!   [`state::Session`] per connection (handshake, token, decoding, its wait and cancel, the
//!   handshake and whole-message deadlines) over one [`state::StoreState`] (keys, queues, waits
//!   indexed by key), requests in, replies and wake-ups out, time passed in. Both are tested
//!   without sockets and fuzzed (`fuzz/`).
//! - **An event-driven server.** [`StoreServer`] runs a few `mio` event loops (one per thread,
//!   4 at most by default) that only move bytes between sockets and sessions; the shared
//!   [`state::StoreState`] is locked for one request at a time; wakes cross loops through
//!   per-loop inboxes. A hostile peer meets the limits of [`guard`]: a memory budget for
//!   partial requests across connections, a whole-message deadline, a connection cap below the
//!   open-file limit, delayed answers to wrong tokens, a rate-limited log (`docs/SECURITY.md`).
//! - **One round trip per `get`** against our server: the client probes with `HELLO` and then
//!   uses `WAIT_GET` (our extension); against PyTorch's server it falls back by itself.
//! - **Deadlines everywhere.** Every client call has one; `wait` cancels on the server
//!   (`CANCEL_WAIT`) and its error names the keys still missing; connecting retries with backoff.
//! - **Optional authentication** (our extension): with a token, the server serves nothing
//!   before `AUTH <token>`. Off by default, so PyTorch clients work unchanged.
//! - **Typed objects only.** [`StatelessProcessGroup`] moves serde values encoded with postcard
//!   and size-capped (never pickles), puts the sender in send/recv keys, and enforces the
//!   barrier's deadline even while a store read blocks.
//! - **Barriers in O(1) requests per rank.** [`group::store_barrier`] is a counter and one
//!   release key (as PyTorch's store barrier), not a wait on every rank's key.
//! - **The launcher is a library** ([`launch`]): `dist run` (in the `dist` binary, which holds
//!   the command-line flags and the store benchmark) is a thin front over [`launch::run`], with
//!   torchrun's environment contract; its ranks die with it.
//!
//! Errors are `dist_core::Error` (re-exported here): the store and the group surface through
//! `dist-core`'s traits, and a second error enum would only be converted back.
//!
//! ## Example
//! ```
//! use std::time::Duration;
//! use dist_core::Store;
//! use dist_store::{ClientOptions, ServerOptions, StoreServer, TcpStoreClient};
//!
//! let server = StoreServer::start(ServerOptions::default()).unwrap(); // 127.0.0.1, free port
//! let a = TcpStoreClient::connect("127.0.0.1", server.port(), ClientOptions::default()).unwrap();
//! let b = a.try_clone().unwrap();
//! a.set("hello", b"world").unwrap();
//! assert_eq!(b.get("hello", Duration::from_secs(5)).unwrap(), b"world");
//! assert_eq!(b.add("n", 2).unwrap(), 2);
//! let err = b.wait(&["never"], Duration::from_millis(50)).unwrap_err();
//! assert!(err.to_string().contains("never"));
//! ```

pub mod auth;
pub mod client;
pub mod group;
pub mod guard;
pub mod launch;
pub mod proto;
pub mod server;
pub mod state;
mod sys;

pub use client::{ClientOptions, TcpStoreClient};
pub use dist_core::{Error, Result};
pub use group::{RankEnv, StatelessProcessGroup};
pub use server::{ServerOptions, ServerStats, StoreServer};

/// Raises this process's soft open-file limit to its hard limit (a process holding thousands
/// of store connections needs more than the common 1,024); returns the limit then in force.
pub fn raise_open_file_limit() -> Option<u64> {
    sys::raise_nofile_limit()
}
