//! Cross-language: Python's msgspec with classes mirroring vLLM's (`tests/python/`) against the
//! Rust publisher and subscriber, over real ZeroMQ sockets on loopback.
//!
//! Runs when `DIST_KV_PYTHON` names a Python that has `pyzmq` and `msgspec`
//! (`python3 -m venv V && V/bin/pip install pyzmq msgspec`, then `DIST_KV_PYTHON=V/bin/python`).
//! Without it at build time the tests are `#[ignore]`d with a `SKIPPED: ...` reason (the build
//! script sets `cfg(dist_kv_python)`), so cargo counts them as ignored, not passed. Built with it,
//! they use `DIST_KV_PYTHON` of the run, else the build's; a Python that cannot run or lacks those
//! packages fails them.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use dist_kv::events::*;

const STEP: Duration = Duration::from_secs(20);

/// The Python of the cross-language tests: `DIST_KV_PYTHON` at run time, else the one the build
/// saw (these tests are ignored unless the build saw one). One that cannot run, or lacks pyzmq
/// or msgspec, fails the test: never a silent pass.
fn python() -> String {
    let p = std::env::var("DIST_KV_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .or_else(|| option_env!("DIST_KV_PYTHON").map(str::to_string))
        .filter(|p| !p.is_empty())
        .expect("DIST_KV_PYTHON was set at build time (cfg dist_kv_python) but is empty now");
    let ok = Command::new(&p)
        .args(["-c", "import zmq, msgspec"])
        .status()
        .unwrap_or_else(|e| panic!("DIST_KV_PYTHON={p} cannot be run: {e}"));
    assert!(ok.success(), "DIST_KV_PYTHON={p} lacks pyzmq or msgspec");
    p
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// A child process that is killed and reaped if the test ends early.
struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Guard {
    fn spawn(python: &str, script_name: &str, args: &[&str]) -> Guard {
        let mut child = Command::new(python)
            .arg(script(script_name))
            .args(args)
            .current_dir(script("."))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {python} {script_name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guard {
            child,
            stdin,
            lines,
        }
    }

    fn line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("python: no {what} line within {STEP:?}: {e}"))
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to python");
    }

    /// Waits (bounded) for the exit status, then collects what it printed last.
    fn finish(mut self) -> (bool, Vec<String>) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let rest: Vec<String> = self.lines.try_iter().collect();
                return (status.success(), rest);
            }
            assert!(
                Instant::now() < deadline,
                "python did not exit within {STEP:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rust_to_python(format: WireFormat, fmt: &str) {
    let python = python();
    let cfg = KvEventsConfig {
        enable_kv_cache_events: true,
        endpoint: "tcp://127.0.0.1:*".into(),
        replay_endpoint: Some("tcp://127.0.0.1:*".into()),
        topic: "kv".into(),
        ..Default::default()
    };
    let options = ZmqPublisherOptions {
        wire_format: format,
        ..Default::default()
    };
    let publisher = ZmqEventPublisher::new(0, &cfg, options).unwrap();
    let count = 6;
    let py = Guard::spawn(
        &python,
        "subscriber.py",
        &[
            "--endpoint",
            publisher.bound_endpoint(),
            "--replay-endpoint",
            publisher.bound_replay_endpoint().unwrap(),
            "--topic",
            "kv",
            "--count",
            &count.to_string(),
            "--format",
            fmt,
            "--dp-rank",
            "0",
            "--replay-from",
            "2",
        ],
    );
    assert_eq!(py.line("READY"), "READY");
    publisher
        .wait_for_subscribers(1, Instant::now() + STEP)
        .unwrap();
    for i in 0..count {
        publisher.publish(sample_batch(i, None)).unwrap();
    }
    let (ok, out) = py.finish();
    assert!(ok, "python subscriber failed; output: {out:?}");
    let summary = out.last().cloned().unwrap_or_default();
    println!("python subscriber: {summary}");
    assert_eq!(
        summary,
        format!("OK live={count} replay={} format={fmt}", count - 2)
    );
    publisher.shutdown().unwrap();
}

#[test]
#[cfg_attr(
    not(dist_kv_python),
    ignore = "SKIPPED: set DIST_KV_PYTHON to a python with pyzmq and msgspec"
)]
fn rust_publisher_to_python_subscriber_array_form() {
    rust_to_python(WireFormat::Array, "array");
}

#[test]
#[cfg_attr(
    not(dist_kv_python),
    ignore = "SKIPPED: set DIST_KV_PYTHON to a python with pyzmq and msgspec"
)]
fn rust_publisher_to_python_subscriber_map_form() {
    rust_to_python(WireFormat::Map, "map");
}

fn python_to_rust(fmt: &str) {
    let python = python();
    let count = 6u64;
    let mut py = Guard::spawn(
        &python,
        "publisher.py",
        &[
            "--count",
            &count.to_string(),
            "--format",
            fmt,
            "--dp-rank",
            "3",
            "--topic",
            "kv",
        ],
    );
    let line = py.line("ENDPOINT");
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "unexpected line {line:?}");
    let sub = KvEventSubscriber::connect(parts[1], Some(parts[2]), "kv").unwrap();
    py.say("GO"); // the script then waits for our subscription before it publishes
    for i in 0..count {
        let r = sub
            .recv(STEP)
            .unwrap()
            .unwrap_or_else(|| panic!("no batch {i} from python"));
        assert_eq!((r.topic.as_slice(), r.seq), (&b"kv"[..], i));
        assert_eq!(r.batch, sample_batch(i, Some(3)), "batch {i} ({fmt})");
        // The subscriber's JSON (what `dist kv-events subscribe` prints) carries every field.
        let j = r.batch.to_json();
        assert_eq!(
            j["events"][0]["block_hashes"][1],
            serde_json::json!(u64::MAX - i)
        );
    }
    sub.request_replay(4).unwrap();
    let replayed = sub.recv_replay(Instant::now() + STEP).unwrap();
    assert_eq!(
        replayed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![4, 5]
    );
    for (seq, batch) in replayed {
        assert_eq!(batch, sample_batch(seq, Some(3)));
    }
    py.say("DONE");
    let (ok, out) = py.finish();
    assert!(ok, "python publisher failed: {out:?}");
    println!("python publisher ({fmt}): {count} live batches and a replay decoded");
}

#[test]
#[cfg_attr(
    not(dist_kv_python),
    ignore = "SKIPPED: set DIST_KV_PYTHON to a python with pyzmq and msgspec"
)]
fn python_publisher_to_rust_subscriber_array_form() {
    python_to_rust("array");
}

#[test]
#[cfg_attr(
    not(dist_kv_python),
    ignore = "SKIPPED: set DIST_KV_PYTHON to a python with pyzmq and msgspec"
)]
fn python_publisher_to_rust_subscriber_map_form() {
    python_to_rust("map");
}
