//! `dist kv-events publish|subscribe`: try a subscriber against a vLLM-compatible KV-event
//! stream, or see what a stream carries.
//!
//! `publish` sends `dist_kv::events::sample_batch`es (every event type and field); `subscribe`
//! prints what a stream carries as JSON lines:
//!
//! ```text
//! {"source":"live","topic":"kv","seq":0,"ts":1700000000.0,"data_parallel_rank":0,"events":[{"type":"BlockStored",...}]}
//! ```
//!
//! Integers are JSON numbers, byte strings `{"bytes":"<hex>"}`. A message that cannot be decoded
//! is printed as `{"source":...,"error":"..."}` and the subscriber goes on. So is a message over
//! `--max-message-mib`: libzmq drops the connection for it, the subscriber says so (naming the
//! endpoint and the limit), connects again and goes on; the batches sent meanwhile are missing
//! from the output, as their sequence numbers show.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dist_kv::events::{
    global_context, sample_batch, EventPublisher, KvEventSubscriber, KvEventsConfig,
    SubscriberOptions, WireFormat, ZmqEventPublisher, ZmqPublisherOptions,
};
use dist_kv::Error;
use serde_json::json;

/// `dist kv-events ...`.
#[derive(Debug, Subcommand)]
pub enum KvEventsCmd {
    /// Publish sample batches that use every event type and field.
    Publish(PublishArgs),
    /// Print received batches as JSON lines.
    Subscribe(SubscribeArgs),
}

/// Arguments of `dist kv-events publish`.
#[derive(Debug, Clone, Args)]
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
#[derive(Debug, Clone, Args)]
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
    /// Largest message accepted, in MiB (0: no limit). A larger one is reported and skipped.
    #[arg(long, default_value_t = 64)]
    pub max_message_mib: u64,
}

/// Runs a `kv-events` command; the value is the process exit code.
pub fn run(cmd: KvEventsCmd) -> anyhow::Result<u8> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        KvEventsCmd::Publish(a) => publish(a, out)?,
        KvEventsCmd::Subscribe(a) => subscribe(a, out)?,
    }
    Ok(0)
}

/// Runs `publish`, writing `{"endpoint":…}` first and `{"published":N,…}` last to `out`.
fn publish(args: PublishArgs, out: &mut dyn Write) -> anyhow::Result<()> {
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
    use std::sync::atomic::Ordering::Relaxed;
    let deadline = Instant::now() + Duration::from_secs(10);
    while publisher.stats().sent.load(Relaxed) < args.batches
        && publisher.stats().send_errors.load(Relaxed) == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    publisher.shutdown()?;
    let stats = publisher.stats();
    line(
        out,
        json!({"published": stats.sent.load(Relaxed),
               "send_errors": stats.send_errors.load(Relaxed),
               "replays_served": stats.replays.load(Relaxed)}),
    )
}

/// Errors that end one message, not the stream: undecodable bytes, and a connection libzmq
/// dropped for an oversized message (the subscriber has reconnected).
fn per_message(e: &Error) -> bool {
    matches!(
        e,
        Error::Decode(_) | Error::Encode(_) | Error::Dropped { .. }
    )
}

/// Runs `subscribe`, printing one JSON line per batch (or per message it could not take).
fn subscribe(args: SubscribeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let max = match args.max_message_mib {
        0 => -1,
        m => i64::try_from(m << 20).context("--max-message-mib is too large")?,
    };
    let sub = KvEventSubscriber::connect_with(
        &global_context(),
        &args.endpoint,
        args.replay_endpoint.as_deref(),
        &args.topic,
        SubscriberOptions {
            max_message_bytes: max,
        },
    )?;
    let mut printed = 0u64;
    let done = |n: u64| args.count.is_some_and(|c| n >= c);
    let mut last_replayed: Option<u64> = None;
    if let Some(from) = args.from {
        sub.request_replay(from)?;
        match sub.recv_replay(Instant::now() + Duration::from_millis(args.replay_timeout_ms)) {
            Ok(replayed) => {
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
            Err(e) if per_message(&e) => {
                line(out, json!({"source": "replay", "error": e.to_string()}))?
            }
            Err(e) => return Err(e.into()),
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
            Err(e) if per_message(&e) => {
                idle_since = Instant::now();
                line(out, json!({"source": "live", "error": e.to_string()}))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn line(out: &mut dyn Write, v: serde_json::Value) -> anyhow::Result<()> {
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .context("write output")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use dist_kv::events::{BlockStored, KvCacheEvent, KvEventBatch};
    use serde_json::Value;
    use std::sync::mpsc::{self, Receiver, Sender};

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
        assert_eq!(s.args.max_message_mib, 64);
        assert!(
            Sub::try_parse_from(["x", "--from", "3"]).is_err(),
            "--from needs --replay-endpoint"
        );
        let s =
            Sub::try_parse_from(["x", "--replay-endpoint", "tcp://h:1", "--from", "3"]).unwrap();
        assert_eq!(s.args.from, Some(3));
    }

    /// A `Write` that sends each complete line over a channel.
    struct Lines {
        buf: Vec<u8>,
        tx: Sender<String>,
    }

    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            while let Some(i) = self.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let _ = self
                    .tx
                    .send(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn next(rx: &Receiver<String>, what: &str) -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no {what} line: {e}"));
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{what} line {line:?} is not JSON: {e}"))
    }

    fn run_subscribe(args: SubscribeArgs) -> Vec<Value> {
        let mut out = Vec::new();
        subscribe(args, &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn sub_args(endpoint: &str, replay: Option<&str>) -> SubscribeArgs {
        SubscribeArgs {
            endpoint: endpoint.into(),
            replay_endpoint: replay.map(str::to_string),
            from: None,
            topic: "kv".into(),
            count: None,
            idle_timeout_ms: Some(8000),
            replay_timeout_ms: 5000,
            max_message_mib: 64,
        }
    }

    #[test]
    fn publish_then_subscribe_live_and_replay() {
        let (tx, rx) = mpsc::channel();
        let args = PublishArgs {
            endpoint: "tcp://127.0.0.1:*".into(),
            replay_endpoint: Some("tcp://127.0.0.1:*".into()),
            topic: "kv".into(),
            batches: 5,
            dp_rank: 0,
            interval_ms: 20,
            wait_ms: 10_000,
            wait_subscribers: 1,
            hold_ms: 1500,
            wire_format: WireFormat::Array,
            buffer_steps: 100,
            hwm: 1000,
        };
        let publisher = std::thread::spawn(move || {
            let mut out = Lines {
                buf: Vec::new(),
                tx,
            };
            publish(args, &mut out)
        });
        let start = next(&rx, "endpoint");
        let endpoint = start["endpoint"].as_str().unwrap().to_owned();
        let replay = start["replay_endpoint"].as_str().unwrap().to_owned();

        let sub = |from: Option<u64>, count: u64| SubscribeArgs {
            from,
            count: Some(count),
            ..sub_args(&endpoint, Some(&replay))
        };
        let live = run_subscribe(sub(None, 5));
        assert_eq!(live.len(), 5);
        for (i, line) in live.iter().enumerate() {
            let mut want = sample_batch(i as u64, Some(0)).to_json();
            want["source"] = json!("live");
            want["topic"] = json!("kv");
            want["seq"] = json!(i);
            assert_eq!(line, &want, "line {i}");
        }
        // During --hold-ms the replay is still served.
        let replayed = run_subscribe(sub(Some(2), 3));
        let seqs: Vec<u64> = replayed
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert!(replayed.iter().all(|l| l["source"] == "replay"));
        assert_eq!(
            replayed[0]["events"][0]["block_hashes"][2]["bytes"]
                .as_str()
                .unwrap()
                .len(),
            64
        );

        publisher.join().unwrap().unwrap();
        let end = next(&rx, "summary");
        assert_eq!(end["published"], 5);
        assert_eq!(end["send_errors"], 0);
        assert_eq!(end["replays_served"], 1);
    }

    #[test]
    fn subscribe_idle_timeout_ends_a_quiet_stream() {
        let args = SubscribeArgs {
            topic: String::new(),
            idle_timeout_ms: Some(300),
            replay_timeout_ms: 1000,
            // Binds; nobody publishes.
            ..sub_args("tcp://127.0.0.1:*", None)
        };
        let t = Instant::now();
        assert!(run_subscribe(args).is_empty());
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    /// A batch over `--max-message-mib` is reported as an error line naming the limit, and the
    /// batches after it are printed (the old subscriber printed nothing more and exited 0).
    #[test]
    fn an_oversized_batch_is_reported_and_the_stream_goes_on() {
        let config = KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://127.0.0.1:*".into(),
            topic: "kv".into(),
            ..Default::default()
        };
        let publisher = ZmqEventPublisher::new(0, &config, ZmqPublisherOptions::default()).unwrap();
        let endpoint = publisher.bound_endpoint().to_string();
        // About 2 MiB of token ids (5 bytes each on the wire).
        let big = KvEventBatch {
            ts: 1.0,
            events: vec![KvCacheEvent::BlockStored(BlockStored {
                token_ids: vec![1_000_000_000; 400_000],
                ..match &sample_batch(0, None).events[0] {
                    KvCacheEvent::BlockStored(b) => b.clone(),
                    e => panic!("{e:?}"),
                }
            })],
            data_parallel_rank: None,
        };
        let feeder = std::thread::spawn(move || {
            publisher
                .wait_for_subscribers(1, Instant::now() + Duration::from_secs(10))
                .unwrap();
            publisher.publish(sample_batch(0, None)).unwrap();
            publisher.publish(big).unwrap();
            // Keep publishing until the subscriber is back (it reconnects after the drop).
            for i in 1..100 {
                std::thread::sleep(Duration::from_millis(50));
                publisher.publish(sample_batch(i, None)).unwrap();
            }
            publisher.shutdown().unwrap();
        });
        let lines = run_subscribe(SubscribeArgs {
            count: Some(3),
            max_message_mib: 1,
            ..sub_args(&endpoint, None)
        });
        feeder.join().unwrap();
        assert_eq!(lines[0]["seq"], 0, "{lines:?}");
        let err = lines[1]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            err.contains(&endpoint) && err.contains("1048576-byte limit"),
            "{err}"
        );
        assert!(lines[2]["seq"].as_u64().unwrap() > 1, "{lines:?}");
        assert!(lines.len() == 4 && lines[3]["seq"].is_u64(), "{lines:?}");
    }
}
