//! Hang diagnosis: a flight recorder of recent collective calls, and the hooks a coordinator uses
//! to explain a timeout ("rank 3 was last in tp:0 all_reduce #41, started 12.3 s ago, still
//! running") and to detect ranks that call different collectives.
//!
//! This module holds the data structures; publishing records where other processes can read them
//! (the store, shared memory) is the job of a [`Diagnostics`] implementation in the facade.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where a recorded call stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    /// Entered, not returned.
    Running,
    /// Returned successfully.
    Done,
    /// Returned an error.
    Failed,
}

/// One collective call of one rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Group name (`"tp:0"`).
    pub group: String,
    /// Operation (`"all_reduce"`).
    pub op: String,
    /// The call's number in this group on this rank (from 1).
    pub seq: u64,
    /// Input bytes.
    pub bytes: u64,
    /// Wall-clock start, ms since the Unix epoch (comparable across processes of a node).
    pub started_ms: u64,
    /// Wall-clock end, when it ended.
    pub ended_ms: Option<u64>,
    /// State.
    pub state: OpState,
}

impl OpRecord {
    /// One line for a report: `tp:0 all_reduce #41 (4096 B) started 12.3 s ago, still running`.
    pub fn describe(&self, now_ms: u64) -> String {
        let ago = now_ms.saturating_sub(self.started_ms) as f64 / 1000.0;
        let state = match (self.state, self.ended_ms) {
            (OpState::Running, _) => "still running".to_string(),
            (OpState::Done, Some(e)) => {
                format!("done {:.1} s ago", now_ms.saturating_sub(e) as f64 / 1000.0)
            }
            (OpState::Failed, Some(e)) => format!(
                "failed {:.1} s ago",
                now_ms.saturating_sub(e) as f64 / 1000.0
            ),
            (s, None) => format!("{s:?}"),
        };
        format!(
            "{} {} #{} ({} B) started {ago:.1} s ago, {state}",
            self.group, self.op, self.seq, self.bytes
        )
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A ring of this process's most recent calls.
#[derive(Debug)]
pub struct FlightRecorder {
    cap: usize,
    ring: Mutex<VecDeque<OpRecord>>,
}

impl FlightRecorder {
    /// A recorder keeping the last `cap` calls.
    pub fn new(cap: usize) -> Self {
        FlightRecorder {
            cap: cap.max(1),
            ring: Mutex::new(VecDeque::with_capacity(cap.max(1))),
        }
    }
    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<OpRecord>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Records the start of a call.
    pub fn begin(&self, group: &str, op: &str, seq: u64, bytes: u64) {
        let mut r = self.ring();
        if r.len() == self.cap {
            r.pop_front();
        }
        r.push_back(OpRecord {
            group: group.to_string(),
            op: op.to_string(),
            seq,
            bytes,
            started_ms: now_ms(),
            ended_ms: None,
            state: OpState::Running,
        });
    }
    /// Records the end of the call `(group, seq)`.
    pub fn end(&self, group: &str, seq: u64, ok: bool) {
        let mut r = self.ring();
        if let Some(rec) = r
            .iter_mut()
            .rev()
            .find(|x| x.seq == seq && x.group == group)
        {
            rec.ended_ms = Some(now_ms());
            rec.state = if ok { OpState::Done } else { OpState::Failed };
        }
    }
    /// The last `n` records, oldest first.
    pub fn last(&self, n: usize) -> Vec<OpRecord> {
        let r = self.ring();
        r.iter().skip(r.len().saturating_sub(n)).cloned().collect()
    }
}

/// Store key under which rank `r` publishes its [`Snapshot`]: `dist/fr/{r}`.
pub fn snapshot_key(rank: usize) -> String {
    format!("dist/fr/{rank}")
}

/// A heartbeat older than this means the rank is stopped, hung in the kernel, or dead.
pub const STALE_HEARTBEAT_MS: u64 = 3_000;

/// What a rank publishes about itself, periodically, for the others and the launcher to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Global rank.
    pub rank: usize,
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// When this snapshot was written, ms since the Unix epoch.
    pub heartbeat_ms: u64,
    /// The most recent calls, oldest first.
    pub records: Vec<OpRecord>,
}

impl Snapshot {
    /// `rank 3 (pid 42 on node-a, heartbeat 0.4 s ago): last tp:0 all_reduce #41 … still running`.
    pub fn describe(&self, now_ms: u64) -> String {
        let age = now_ms.saturating_sub(self.heartbeat_ms);
        let beat = if age > STALE_HEARTBEAT_MS {
            format!(
                "no heartbeat for {:.1} s: stopped or dead",
                age as f64 / 1000.0
            )
        } else {
            format!("heartbeat {:.1} s ago", age as f64 / 1000.0)
        };
        let last = match self.records.last() {
            Some(r) => format!("last {}", r.describe(now_ms)),
            None => "no collective call yet".to_string(),
        };
        format!(
            "rank {} (pid {} on {}, {beat}): {last}",
            self.rank, self.pid, self.host
        )
    }
}

/// What a coordinator reports to and asks of the job's diagnostics.
pub trait Diagnostics: Send + Sync + std::fmt::Debug {
    /// The recorder of this process.
    fn recorder(&self) -> &FlightRecorder;
    /// A report of what each of `global_ranks` was last doing (read from wherever the other
    /// processes publish their records), for an error message. Must return within about a second.
    fn describe(&self, global_ranks: &[usize]) -> String;
}

/// What a rank tells its group before a checked collective (the mismatch detector).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallDescriptor {
    /// The call's number in the group on this rank.
    pub seq: u64,
    /// Operation.
    pub op: String,
    /// Element type name.
    pub dtype: String,
    /// Shape of the input.
    pub shape: Vec<usize>,
    /// Op-specific arguments that must agree (root, dim, sizes).
    pub args: String,
}

impl std::fmt::Display for CallDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{} {}", self.seq, self.op)?;
        if !self.dtype.is_empty() {
            write!(f, " {} {:?}", self.dtype, self.shape)?;
        }
        if !self.args.is_empty() {
            write!(f, " ({})", self.args)?;
        }
        Ok(())
    }
}

/// Compares every rank's descriptor of one call; `None` when they agree, else a message naming
/// the ranks that differ from the majority.
pub fn find_mismatch(group: &str, descs: &[CallDescriptor]) -> Option<String> {
    let first = descs.first()?;
    if descs.iter().all(|d| d == first) {
        return None;
    }
    // The most common descriptor is taken as what the group meant to call.
    let mut best = first;
    let mut best_n = 0;
    for d in descs {
        let n = descs.iter().filter(|x| *x == d).count();
        if n > best_n {
            best = d;
            best_n = n;
        }
    }
    let odd: Vec<String> = descs
        .iter()
        .enumerate()
        .filter(|(_, d)| *d != best)
        .map(|(r, d)| format!("rank {r} called {d}"))
        .collect();
    Some(format!(
        "collective mismatch in group {group}: {} of {} ranks called {best}, but {}",
        best_n,
        descs.len(),
        odd.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_ring_and_states() {
        let r = FlightRecorder::new(2);
        r.begin("tp:0", "all_reduce", 1, 16);
        r.end("tp:0", 1, true);
        r.begin("tp:0", "all_gather", 2, 32);
        r.begin("tp:0", "barrier", 3, 0);
        let last = r.last(10);
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].op, "all_gather");
        assert_eq!(last[1].state, OpState::Running);
        assert!(last[1].describe(now_ms()).contains("still running"));
    }

    #[test]
    fn mismatch_names_the_odd_rank() {
        let d = |op: &str, shape: Vec<usize>| CallDescriptor {
            seq: 5,
            op: op.into(),
            dtype: "f32".into(),
            shape,
            args: String::new(),
        };
        assert!(find_mismatch(
            "tp:0",
            &[d("all_reduce", vec![4]), d("all_reduce", vec![4])]
        )
        .is_none());
        let m = find_mismatch(
            "tp:0",
            &[
                d("all_reduce", vec![4]),
                d("all_reduce", vec![4]),
                d("all_reduce", vec![8]),
            ],
        )
        .unwrap();
        assert!(m.contains("rank 2 called #5 all_reduce f32 [8]"), "{m}");
        let m = find_mismatch(
            "pp:0",
            &[d("all_reduce", vec![4]), d("all_gather", vec![4])],
        )
        .unwrap();
        assert!(m.contains("rank 1 called #5 all_gather"), "{m}");
    }
}
