//! KV-cache events: what vLLM's `vllm/distributed/kv_events.py` does, wire-compatible with it.
//!
//! A vLLM scheduler reports, after each step, which KV-cache blocks became resident
//! ([`BlockStored`]), which were evicted ([`BlockRemoved`]) and when the cache was emptied
//! ([`KvCacheEvent::AllBlocksCleared`]). Routers and cache managers outside the engine subscribe to
//! that stream to route requests to the engine that already holds their prefix.
//!
//! * [`types`]: the events and [`KvEventBatch`], with vLLM's fields, order and defaults.
//! * [`wire`]: MessagePack exactly as msgspec writes it (positional arrays with the tag first, or
//!   tagged maps as newer vLLM writes them), and a bounded decoder that reads both.
//! * [`KvEventAggregator`]: the events every worker reported.
//! * [`EventPublisher`], [`NullEventPublisher`], [`ZmqEventPublisher`] and [`create_publisher`]:
//!   PUB `[topic, seq, payload]` from a publisher thread, replay over ROUTER, data-parallel offsets.
//! * [`KvEventSubscriber`]: the consumer side, used by `dist kv-events subscribe` and the tests.
//! * [`KvEventsConfig`]: vLLM's `KVEventsConfig`.
//!
//! ```no_run
//! use dist_kv::events::*;
//! let config = KvEventsConfig {
//!     enable_kv_cache_events: true,
//!     endpoint: "tcp://*:5557".into(),
//!     replay_endpoint: Some("tcp://*:5558".into()),
//!     ..Default::default()
//! };
//! let publisher = create_publisher(Some(&config), 0, ZmqPublisherOptions::default())?;
//! publisher.publish(KvEventBatch::now(vec![KvCacheEvent::AllBlocksCleared]))?;
//! publisher.shutdown()?;
//! # Ok::<(), dist_kv::Error>(())
//! ```

pub mod aggregator;
pub mod config;
pub mod endpoint;
pub mod publisher;
mod queue;
pub mod sample;
pub mod subscriber;
pub mod types;
pub mod wire;

pub use aggregator::{KvConnectorKvEvents, KvEventAggregator};
pub use config::{KvEventsConfig, PublisherKind};
pub use endpoint::{offset_endpoint_port, should_bind};
pub use publisher::{
    create_publisher, global_context, EventPublisher, NullEventPublisher, PublisherStats,
    ZmqEventPublisher, ZmqPublisherOptions, END_SEQ, SHUTDOWN_TIMEOUT,
};
pub use sample::sample_batch;
pub use subscriber::{
    KvEventSubscriber, ReceivedBatch, SubscriberOptions, DEFAULT_MAX_MESSAGE, DROP_GRACE,
};
pub use types::{
    BlockHash, BlockRemoved, BlockStored, KvCacheEvent, KvEventBatch, Value, MEDIUM_GPU,
};
pub use wire::{decode_batch, decode_batch_with, encode_batch, DecodeLimits, WireFormat};
