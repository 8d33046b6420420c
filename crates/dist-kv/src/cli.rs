//! `dist kv-events publish|subscribe`, as a library the `dist` binary mounts.
//!
//! `publish` sends [`sample_batch`]es (every event type and field) so a subscriber can be tried
//! against a vLLM-compatible stream; `subscribe` prints what a stream carries as JSON lines:
//!
//! ```text
//! {"source":"live","topic":"kv","seq":0,"ts":1700000000.0,"data_parallel_rank":0,"events":[{"type":"BlockStored",...}]}
//! ```
//!
//! Integers are JSON numbers, byte strings `{"bytes":"<hex>"}`. A message that cannot be decoded is
//! printed as `{"source":...,"error":"..."}` and the subscriber goes on.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{Error, Result};
use crate::events::{
    sample_batch, EventPublisher, KvEventSubscriber, KvEventsConfig, WireFormat, ZmqEventPublisher,
    ZmqPublisherOptions,
};

/// Arguments of `dist kv-events publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// PUB endpoint; bound if it contains `*` or `::` or is ipc:// or inproc://, else connected
    /// (vLLM's rule). `tcp://127.0.0.1:*` binds a free port and prints it.
    #[arg(long, default_value = "tcp://*:5557")]
    pub endpoint: String,
    /// ROUTER endpoint that serves replay requests.
    #[arg(long)]
    pub replay_endpoint: Option<String>,
    /// Topic frame of every message.
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Number of sample batches to publish.
    #[arg(long, default_value_t = 10)]
    pub batches: u64,
    /// Data-parallel rank: offsets TCP ports by K, suffixes inproc names with `_dpK`, stamps batches.
    #[arg(long, default_value_t = 0)]
    pub dp_rank: usize,
    /// Pause between batches, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Wait before the first batch so subscribers can connect (a publisher drops what nobody has
    /// subscribed to yet). With --wait-subscribers, the most to wait for them.
    #[arg(long, default_value_t = 500)]
    pub wait_ms: u64,
    /// Before the first batch, wait (up to --wait-ms, else fail) until this many subscriptions
    /// have reached the publisher.
    #[arg(long, default_value_t = 0)]
    pub wait_subscribers: u64,
    /// Keep serving replay requests this long after the last batch.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Event layout: `array` (vLLM's array_like structs) or `map` (tagged maps, vLLM after PR #42892).
    #[arg(long, default_value = "array")]
    pub wire_format: WireFormat,
    /// Batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    pub buffer_steps: usize,
    /// High-water mark of the PUB socket.
    #[arg(long, default_value_t = 100_000)]
    pub hwm: i32,
}

/// Arguments of `dist kv-events subscribe`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubscribeArgs {
    /// Publisher's PUB endpoint to connect to (bound instead if it contains `*`, for a publisher
    /// that connects).
    #[arg(long, default_value = "tcp://127.0.0.1:5557")]
    pub endpoint: String,
    /// Publisher's ROUTER endpoint, for replay.
    #[arg(long)]
    pub replay_endpoint: Option<String>,
    /// First ask for every buffered batch with seq >= SEQ (needs --replay-endpoint).
    #[arg(long = "from", value_name = "SEQ", requires = "replay_endpoint")]
    pub from: Option<u64>,
    /// Topic prefix to subscribe to (empty: everything).
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Exit after printing this many batches (replayed ones included).
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit when nothing arrives for this many milliseconds (default: wait for ever).
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Deadline for the whole replay answer, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub replay_timeout_ms: u64,
}

/// Runs `publish`, writing progress lines to stdout.
pub fn run_publish(args: PublishArgs) -> Result<()> {
    run_publish_to(args, &mut std::io::stdout().lock())
}

/// Runs `publish`, writing `{"endpoint":…}` first and `{"published":N,…}` last to `out`.
pub fn run_publish_to(args: PublishArgs, out: &mut dyn Write) -> Result<()> {
    let config = KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: None,
        endpoint: args.endpoint.clone(),
        replay_endpoint: args.replay_endpoint.clone(),
        buffer_steps: args.buffer_steps,
        hwm: args.hwm,
        max_queue_size: 100_000,
        topic: args.topic.clone(),
    };
    let options = ZmqPublisherOptions {
        wire_format: args.wire_format,
        // Give the last batches time to leave before the sockets close.
        linger: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let publisher = ZmqEventPublisher::new(args.dp_rank, &config, options)?;
    line(
        out,
        json!({"endpoint": publisher.bound_endpoint(), "replay_endpoint": publisher.bound_replay_endpoint(),
               "topic": args.topic, "dp_rank": args.dp_rank}),
    )?;
    if args.wait_subscribers > 0 {
        publisher.wait_for_subscribers(
            args.wait_subscribers,
            Instant::now() + Duration::from_millis(args.wait_ms),
        )?;
    } else {
        std::thread::sleep(Duration::from_millis(args.wait_ms));
    }
    for i in 0..args.batches {
        publisher.publish(sample_batch(i, None))?;
        if i + 1 < args.batches {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    // Wait (bounded) until the thread has sent everything, then hold for replay requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    while publisher
        .stats()
        .sent
        .load(std::sync::atomic::Ordering::Relaxed)
        < args.batches
        && publisher
            .stats()
            .send_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    publisher.shutdown()?;
    let stats = publisher.stats();
    line(
        out,
        json!({"published": stats.sent.load(std::sync::atomic::Ordering::Relaxed),
               "send_errors": stats.send_errors.load(std::sync::atomic::Ordering::Relaxed),
               "replays_served": stats.replays.load(std::sync::atomic::Ordering::Relaxed)}),
    )
}

/// Runs `subscribe`, printing JSON lines to stdout.
pub fn run_subscribe(args: SubscribeArgs) -> Result<()> {
    run_subscribe_to(args, &mut std::io::stdout().lock())
}

/// Runs `subscribe`, printing one JSON line per batch (or undecodable message) to `out`.
pub fn run_subscribe_to(args: SubscribeArgs, out: &mut dyn Write) -> Result<()> {
    let sub =
        KvEventSubscriber::connect(&args.endpoint, args.replay_endpoint.as_deref(), &args.topic)?;
    let mut printed = 0u64;
    let done = |n: u64| args.count.is_some_and(|c| n >= c);
    let mut last_replayed: Option<u64> = None;
    if let Some(from) = args.from {
        sub.request_replay(from)?;
        let replayed =
            sub.recv_replay(Instant::now() + Duration::from_millis(args.replay_timeout_ms))?;
        for (seq, batch) in replayed {
            if done(printed) {
                return Ok(());
            }
            let mut j = batch.to_json();
            j["source"] = json!("replay");
            j["seq"] = json!(seq);
            line(out, j)?;
            printed += 1;
            last_replayed = Some(seq);
        }
    }
    let slice = Duration::from_millis(200);
    let mut idle_since = Instant::now();
    while !done(printed) {
        if let Some(ms) = args.idle_timeout_ms {
            if idle_since.elapsed() >= Duration::from_millis(ms) {
                break;
            }
        }
        let wait = match args.idle_timeout_ms {
            Some(ms) => slice.min(Duration::from_millis(ms).saturating_sub(idle_since.elapsed())),
            None => slice,
        };
        match sub.recv(wait) {
            Ok(None) => continue,
            Ok(Some(r)) => {
                idle_since = Instant::now();
                if last_replayed.is_some_and(|l| r.seq <= l) {
                    continue; // already printed from the replay
                }
                let mut j = r.batch.to_json();
                j["source"] = json!("live");
                j["topic"] = json!(String::from_utf8_lossy(&r.topic));
                j["seq"] = json!(r.seq);
                line(out, j)?;
                printed += 1;
            }
            Err(e @ (Error::Decode(_) | Error::Encode(_))) => {
                idle_since = Instant::now();
                line(out, json!({"source": "live", "error": e.to_string()}))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn line(out: &mut dyn Write, v: serde_json::Value) -> Result<()> {
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            context: "write output".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Pub {
        #[command(flatten)]
        args: PublishArgs,
    }

    #[derive(Debug, Parser)]
    struct Sub {
        #[command(flatten)]
        args: SubscribeArgs,
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let p = Pub::try_parse_from([
            "x",
            "--endpoint",
            "tcp://*:6000",
            "--batches",
            "3",
            "--dp-rank",
            "1",
        ])
        .unwrap();
        assert_eq!(p.args.endpoint, "tcp://*:6000");
        assert_eq!((p.args.batches, p.args.dp_rank), (3, 1));
        assert_eq!(p.args.wire_format, WireFormat::Array);
        assert!(Pub::try_parse_from(["x", "--wire-format", "json"]).is_err());
        let s = Sub::try_parse_from(["x"]).unwrap();
        assert_eq!(s.args.endpoint, "tcp://127.0.0.1:5557");
        assert!(
            Sub::try_parse_from(["x", "--from", "3"]).is_err(),
            "--from needs --replay-endpoint"
        );
        let s =
            Sub::try_parse_from(["x", "--replay-endpoint", "tcp://h:1", "--from", "3"]).unwrap();
        assert_eq!(s.args.from, Some(3));
    }
}
