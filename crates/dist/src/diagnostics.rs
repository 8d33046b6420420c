//! The job's diagnostics over the store: each rank publishes a [`Snapshot`] of its recent
//! collective calls (on its own store connection, from a background thread), and a rank that
//! times out reads the snapshots of the ranks that did not answer. `dist run` reads the same
//! keys to name the call a dead rank was in and to print what every rank was doing when it
//! tears a job down.
//!
//! The publisher looks at the flight recorder every [`WATCH_EVERY`] and publishes as soon as
//! the last call changed (a call began or ended), and at least every [`PUBLISH_EVERY`] as a
//! heartbeat. A rank that dies right after entering a call is thus reported in that call —
//! with a period alone, a rank killed in its first collective within 200 ms of the last
//! publish was reported as having made "no collective call yet". Publishing is a `SET` (no
//! reply) and happens at most once per [`WATCH_EVERY`], however fast the calls come.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dist_core::diag::{now_ms, snapshot_key, Diagnostics, FlightRecorder, OpRecord, Snapshot};
use dist_core::{decode_obj, encode_obj, Store};

/// How often a rank publishes its snapshot when nothing changes (the heartbeat).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// How often the publisher looks for a change of the last recorded call.
pub const WATCH_EVERY: Duration = Duration::from_millis(5);

/// Records kept in the ring / published in a snapshot.
const RING: usize = 64;
const PUBLISHED: usize = 8;

/// Flight recorder + snapshots over a store.
#[derive(Debug)]
pub struct StoreDiagnostics {
    store: Arc<dyn Store>,
    recorder: Arc<FlightRecorder>,
    stop: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn snapshot(rank: usize, recorder: &FlightRecorder, host: &str) -> Snapshot {
    Snapshot {
        rank,
        pid: std::process::id(),
        host: host.to_string(),
        heartbeat_ms: now_ms(),
        records: recorder.last(PUBLISHED),
    }
}

impl StoreDiagnostics {
    /// Starts publishing for `rank` on `store` (use a connection of its own: the publisher must
    /// not queue behind a blocked call of the main thread).
    pub fn start(rank: usize, store: Arc<dyn Store>) -> Arc<Self> {
        let recorder = Arc::new(FlightRecorder::new(RING));
        let (tx, rx) = channel::<()>();
        let (st, rec) = (store.clone(), recorder.clone());
        let handle = std::thread::Builder::new()
            .name(format!("dist-diag-{rank}"))
            .spawn(move || {
                let host = host_name();
                let mut published: Option<(Instant, Option<OpRecord>)> = None;
                loop {
                    let last = rec.last(1).pop();
                    let due = match &published {
                        None => true,
                        Some((at, seen)) => *seen != last || at.elapsed() >= PUBLISH_EVERY,
                    };
                    if due {
                        if let Ok(b) = encode_obj(&snapshot(rank, &rec, &host)) {
                            if let Err(e) = st.set(&snapshot_key(rank), &b) {
                                tracing::debug!(rank, "diagnostics: cannot publish snapshot: {e}");
                            }
                        }
                        published = Some((Instant::now(), last));
                    }
                    match rx.recv_timeout(WATCH_EVERY) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })
            .ok();
        Arc::new(StoreDiagnostics {
            store,
            recorder,
            stop: Mutex::new(handle.map(|h| (tx, h))),
        })
    }

    /// Stops the publisher (also done on drop).
    pub fn stop(&self) {
        if let Some((tx, h)) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
            let _ = h.join();
        }
    }
}

impl Drop for StoreDiagnostics {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads and describes the snapshots of `ranks` from `store` (each read bounded by `timeout`).
pub fn describe_ranks(store: &dyn Store, ranks: &[usize], timeout: Duration) -> String {
    let now = now_ms();
    let lines: Vec<String> = ranks
        .iter()
        .map(|&r| {
            let key = snapshot_key(r);
            match store.check(&[key.as_str()]) {
                Ok(true) => match store
                    .get(&key, timeout)
                    .and_then(|b| decode_obj::<Snapshot>(&b, 1 << 20))
                {
                    Ok(s) => s.describe(now),
                    Err(e) => format!("rank {r}: snapshot unreadable ({e})"),
                },
                Ok(false) => format!("rank {r}: never published a snapshot (not started?)"),
                Err(e) => format!("rank {r}: store unreachable ({e})"),
            }
        })
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("what they were doing: {}", lines.join(" | "))
    }
}

impl Diagnostics for StoreDiagnostics {
    fn recorder(&self) -> &FlightRecorder {
        &self.recorder
    }
    fn describe(&self, global_ranks: &[usize]) -> String {
        describe_ranks(
            self.store.as_ref(),
            global_ranks,
            Duration::from_millis(500),
        )
    }
}
