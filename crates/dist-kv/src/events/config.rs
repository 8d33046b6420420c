//! `KVEventsConfig` (vLLM's `vllm/config/kv_events.py`), with vLLM's field names and defaults.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which publisher to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    /// [`NullEventPublisher`](crate::events::NullEventPublisher): drops everything.
    Null,
    /// [`ZmqEventPublisher`](crate::events::ZmqEventPublisher).
    Zmq,
}

/// Configuration of KV-cache event publishing; JSON with vLLM's names parses into it
/// (`{"enable_kv_cache_events": true, "topic": "kv-events"}`), unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    /// Publish events at all. Default `false`.
    pub enable_kv_cache_events: bool,
    /// The publisher; `None` means `zmq` when enabled, else `null`
    /// (see [`resolved_publisher`](Self::resolved_publisher)).
    pub publisher: Option<PublisherKind>,
    /// PUB endpoint: bound when it contains `*` or `::` or is `ipc://`/`inproc://`, else connected.
    /// Default `tcp://*:5557`.
    pub endpoint: String,
    /// ROUTER endpoint for replay requests. Default none.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay. Default 10,000.
    pub buffer_steps: usize,
    /// ZeroMQ send high-water mark of the PUB socket. Default 100,000.
    pub hwm: i32,
    /// Batches the publish queue holds before `publish` blocks. Default 100,000.
    pub max_queue_size: usize,
    /// Topic frame of every message. Default empty.
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// The publisher vLLM's `__post_init__` settles on: the explicit one, else `zmq` when enabled,
    /// else `null`.
    pub fn resolved_publisher(&self) -> PublisherKind {
        self.publisher.unwrap_or(if self.enable_kv_cache_events {
            PublisherKind::Zmq
        } else {
            PublisherKind::Null
        })
    }

    /// Parses vLLM's JSON form (`--kv-events-config '{...}'`).
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s)
            .map_err(|e| Error::InvalidArgument(format!("kv-events config: {e}")))
    }

    /// Checks values that cannot work (a zero-sized queue, a negative high-water mark).
    pub fn validate(&self) -> Result<()> {
        if self.max_queue_size == 0 {
            return Err(Error::InvalidArgument(
                "max_queue_size must be at least 1".into(),
            ));
        }
        if self.hwm < 0 {
            return Err(Error::InvalidArgument(format!(
                "hwm must be >= 0, got {}",
                self.hwm
            )));
        }
        if self.endpoint.is_empty() {
            return Err(Error::InvalidArgument("endpoint must not be empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vllms() {
        let c = KvEventsConfig::default();
        assert!(!c.enable_kv_cache_events);
        assert_eq!(c.endpoint, "tcp://*:5557");
        assert_eq!(c.replay_endpoint, None);
        assert_eq!(
            (c.buffer_steps, c.hwm, c.max_queue_size),
            (10_000, 100_000, 100_000)
        );
        assert_eq!(c.topic, "");
        assert_eq!(c.resolved_publisher(), PublisherKind::Null);
        assert_eq!(KvEventsConfig::from_json("{}").unwrap(), c);
    }

    #[test]
    fn json_with_vllm_names() {
        let c = KvEventsConfig::from_json(r#"{"enable_kv_cache_events":true,"topic":"kv-events"}"#)
            .unwrap();
        assert_eq!(c.resolved_publisher(), PublisherKind::Zmq);
        assert_eq!(c.topic, "kv-events");
        let c = KvEventsConfig::from_json(r#"{"enable_kv_cache_events":true,"publisher":"null"}"#)
            .unwrap();
        assert_eq!(c.resolved_publisher(), PublisherKind::Null);
        assert!(KvEventsConfig::from_json(r#"{"publisher":"unknown_publisher"}"#).is_err());
        assert!(KvEventsConfig::from_json(r#"{"no_such_field":1}"#).is_err());
    }
}
