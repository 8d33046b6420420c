//! `dist kv-events publish` and `subscribe` (the library halves the `dist` binary mounts), run
//! against each other on loopback: live batches, then a replay during `--hold-ms`.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use dist_kv::cli::{run_publish_to, run_subscribe_to, PublishArgs, SubscribeArgs};
use dist_kv::events::{sample_batch, WireFormat};
use serde_json::{json, Value};

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
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what} line {line:?} is not JSON: {e}"))
}

fn subscribe(args: SubscribeArgs) -> Vec<Value> {
    let mut out = Vec::new();
    run_subscribe_to(args, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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
        run_publish_to(args, &mut out)
    });
    let start = next(&rx, "endpoint");
    let endpoint = start["endpoint"].as_str().unwrap().to_owned();
    let replay = start["replay_endpoint"].as_str().unwrap().to_owned();

    let sub = |from: Option<u64>, count: u64| SubscribeArgs {
        endpoint: endpoint.clone(),
        replay_endpoint: Some(replay.clone()),
        from,
        topic: "kv".into(),
        count: Some(count),
        idle_timeout_ms: Some(8000),
        replay_timeout_ms: 5000,
    };
    let live = subscribe(sub(None, 5));
    assert_eq!(live.len(), 5);
    for (i, line) in live.iter().enumerate() {
        let mut want = sample_batch(i as u64, Some(0)).to_json();
        want["source"] = json!("live");
        want["topic"] = json!("kv");
        want["seq"] = json!(i);
        assert_eq!(line, &want, "line {i}");
    }
    // During --hold-ms the replay is still served.
    let replayed = subscribe(sub(Some(2), 3));
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
        endpoint: "tcp://127.0.0.1:*".into(), // binds; nobody publishes
        replay_endpoint: None,
        from: None,
        topic: String::new(),
        count: None,
        idle_timeout_ms: Some(300),
        replay_timeout_ms: 1000,
    };
    let t = std::time::Instant::now();
    assert!(subscribe(args).is_empty());
    assert!(t.elapsed() < Duration::from_secs(3));
}
