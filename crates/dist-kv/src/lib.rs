//! # dist-kv: the KV-cache side of the distributed layer
//!
//! vLLM's `vllm.distributed` has two pieces that deal with the KV cache rather than with
//! collectives: **KV-cache events** (`kv_events.py`), a stream that tells routers and cache
//! managers outside the engine which blocks each engine holds, and **KV transfer**
//! (`kv_transfer/`), which moves cache blocks between prefill and decode instances. This crate holds
//! both: the events in [`events`], KV transfer in [`transfer`].
//!
//! ## Where it sits
//!
//! `dist-kv` depends on `dist-core` for the workspace's vocabulary and on libzmq (Debian's
//! `libzmq3-dev`, through the `zmq` crate) for sockets. It has no `unsafe` code of its own, and no
//! command line: the `dist` binary's `dist kv-events publish|subscribe` is built on it.
//!
//! ## Design choices
//!
//! * **The wire format is the contract.** Existing subscribers decode vLLM's stream with Python's
//!   msgspec against vLLM's classes, so the encoder writes the bytes msgspec writes (positional
//!   arrays, the tag first, every field written, smallest integer forms, float64), checked
//!   byte for byte against msgspec in the cross-language test. The decoder reads every vLLM
//!   release's form, including the tagged maps vLLM switched to in 2026 (PR #42892), which the
//!   encoder can also write ([`events::WireFormat::Map`]).
//! * **Hostile bytes are an error, never a crash or an unbounded allocation**: lengths are checked
//!   against the bytes that remain before anything is allocated, nesting depth and value count are
//!   capped, and the subscriber's sockets refuse oversized messages (`ZMQ_MAXMSGSIZE`).
//! * **Same behaviour as vLLM's publisher** (sequence numbers from 0, bind-or-connect rule, DP-rank
//!   port offsets and inproc suffixes, replay protocol, one-second shutdown), with deadlines where
//!   vLLM blocks forever: a full queue makes `publish` fail after its timeout instead of hanging the
//!   scheduler.
//! * **One thread owns the sockets.** ZeroMQ sockets are not thread-safe; the publisher creates them
//!   (so bind errors reach the caller) and moves them into its `zmq-publisher` thread.
//!
//! ## KV transfer
//!
//! [`transfer`] is vLLM's `KVConnectorBase_V1` as two traits, one per role
//! ([`transfer::KvConnectorScheduler`] in the scheduler, [`transfer::KvConnectorWorker`] in each
//! worker), with serde metadata between them and an engine-neutral model of what they touch
//! (requests, a paged KV cache per layer in NHD or HND layout over a `HostTensor`). Two
//! connectors implement it: the shared-storage connector ([`transfer::storage`]: vLLM's cache key,
//! one safetensors file per layer carrying a SHA-256 of its data, every file checked before
//! anything is written, so a damaged file fails its request and never loads wrong data) and the
//! P2P connector ([`transfer::p2p`]: the peer's address in the request id as vLLM does, a typed
//! control channel, PUT / PUT_ASYNC / GET, bounded buffers with back-pressure, and the
//! finished-request tracking vLLM leaves as a TODO). The P2P data path is TCP on the CPU behind a
//! small trait ([`transfer::p2p::DataPath`]), with NCCL and CUDA IPC paths for device caches
//! (feature `cuda`). The engine's bookkeeping is a state machine without I/O under a thin socket
//! shell, and its port is built for hostile peers (a shared-secret challenge-response, replies
//! bound to connections, bounded connections, frames and buffers; docs/SECURITY.md). Every wait
//! has a deadline; a failed transfer is an error naming its request.
//!
//! ## Example
//!
//! ```
//! use dist_kv::events::{sample_batch, EventPublisher, KvEventSubscriber, KvEventsConfig,
//!     ZmqEventPublisher, ZmqPublisherOptions};
//! use std::time::{Duration, Instant};
//!
//! let config = KvEventsConfig {
//!     enable_kv_cache_events: true,
//!     endpoint: "tcp://127.0.0.1:*".into(), // libzmq picks a free port
//!     ..Default::default()
//! };
//! let publisher = ZmqEventPublisher::new(0, &config, ZmqPublisherOptions::default())?;
//! let subscriber = KvEventSubscriber::connect(publisher.bound_endpoint(), None, "")?;
//! // A publisher drops what nobody has subscribed to yet: wait for the subscription.
//! publisher.wait_for_subscribers(1, Instant::now() + Duration::from_secs(5))?;
//! publisher.publish(sample_batch(0, None))?;
//! let got = subscriber.recv(Duration::from_secs(5))?.expect("a batch");
//! assert_eq!(got.seq, 0);
//! # Ok::<(), dist_kv::Error>(())
//! ```

#![forbid(unsafe_code)]

mod error;
pub mod events;
mod ratelog;
pub mod transfer;

pub use error::{Error, Result};
