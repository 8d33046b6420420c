//! The MessageQueue benchmark behind `dist bench mq` and `examples/bench_mq.rs`.
//!
//! One writer and `n` readers: [`bench()`] runs the ranks as threads of this process,
//! [`run_on_group`] runs one measurement on any [`HostGroup`] — `examples/bench_mq.rs` uses it
//! with one process per rank over a `StatelessProcessGroup`. The ring, the futex waits and the
//! copies are the same either way. For each reader count and message size it measures:
//!
//! - **paced latency**: the writer sends one message, waits until every reader has it, pauses
//!   [`BenchOptions::pace`], sends the next; the latency of a message is from just before
//!   `enqueue` to the *last* reader's return from `dequeue` (the writer stamps the send time in
//!   the message). p50 and p99 over [`BenchOptions::paced_msgs`] messages.
//! - **burst throughput**: the writer enqueues messages back to back; messages per second from the
//!   first enqueue until the last reader has the last message.

use std::time::{Duration, Instant};

use dist_core::local::run_threads;
use dist_core::{Error, HostGroup, HostGroupExt, Result};

use super::{MessageQueue, Options};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Reader counts (default 1, 3, 7: with the writer, 2, 4 and 8 ranks).
    pub readers: Vec<usize>,
    /// Message sizes in bytes (default 64 B, 1 KiB, 64 KiB, 1 MiB).
    pub sizes: Vec<usize>,
    /// Messages measured one at a time (default 2,000).
    pub paced_msgs: usize,
    /// Pause between paced messages, after every reader has the last one (default 100 µs).
    pub pace: Duration,
    /// Messages in the burst (default 20,000; fewer for large messages so a run moves at most
    /// about 512 MiB per reader).
    pub burst_msgs: usize,
    /// The readers' and writer's [`Options::busy_wait`] (default: the queue's default).
    pub busy_wait: Duration,
    /// Send every reader over TCP (loopback) instead of shared memory.
    pub remote: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            readers: vec![1, 3, 7],
            sizes: vec![64, 1 << 10, 64 << 10, 1 << 20],
            paced_msgs: 2000,
            pace: Duration::from_micros(100),
            burst_msgs: 20_000,
            busy_wait: Options::default().busy_wait,
            remote: false,
        }
    }
}

/// One line of results.
#[derive(Debug, Clone)]
pub struct Row {
    /// Number of readers.
    pub readers: usize,
    /// Message size in bytes.
    pub bytes: usize,
    /// Ring chunk size and count used.
    pub chunk_bytes: usize,
    /// Ring chunks.
    pub chunks: usize,
    /// Median paced latency, enqueue to the last reader's dequeue.
    pub p50: Duration,
    /// 99th percentile of the same.
    pub p99: Duration,
    /// Messages in the burst.
    pub burst_msgs: usize,
    /// Burst throughput, messages per second.
    pub msgs_per_s: f64,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7} {:>9} {:>11.1} {:>11.1} {:>13.0} {:>11.1}",
            self.readers,
            self.bytes,
            self.p50.as_secs_f64() * 1e6,
            self.p99.as_secs_f64() * 1e6,
            self.msgs_per_s,
            self.msgs_per_s * self.bytes as f64 / 1e6
        )
    }
}

/// The header line matching [`Row`]'s `Display`.
pub const HEADER: &str = "readers     bytes   p50 (µs)    p99 (µs)  burst msg/s  burst MB/s";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark for every reader count and size, ranks as threads of this process.
pub fn bench(opts: &BenchOptions) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &n in &opts.readers {
        crate::ensure_arg!(n >= 1, "bench: at least one reader");
        let results = run_threads(n + 1, Duration::from_secs(120), |_, group| {
            opts.sizes
                .iter()
                .map(|&size| run_on_group(&group, size, opts))
                .collect::<Result<Vec<_>>>()
        });
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(Ok(v)) => rows.extend(v.into_iter().flatten()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::invalid(format!("bench: rank {rank} panicked"))),
            }
        }
    }
    Ok(rows)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One measurement of messages of `size` bytes on `group` (threads or processes): rank 0
/// writes, every other rank reads. Collective; returns the row on rank 0, `None` elsewhere.
///
/// Times are wall-clock nanoseconds (`SystemTime`, one clock for every process of a node), so
/// the same code measures ranks as threads and as processes. Paced messages are sent one at a
/// time: the writer waits until every local reader has read the last one (the ring's read
/// sequence numbers, no extra channel; over TCP it can only wait [`BenchOptions::pace`]), then
/// pauses [`BenchOptions::pace`].
pub fn run_on_group(
    group: &dyn HostGroup,
    size: usize,
    opts: &BenchOptions,
) -> Result<Option<Row>> {
    let n = group.world_size().saturating_sub(1);
    crate::ensure_arg!(n >= 1, "bench: at least one reader");
    let size = size.max(8);
    let chunk_bytes = size.max(4096);
    let chunks = ((64usize << 20) / chunk_bytes).clamp(8, 256);
    let burst = opts.burst_msgs.min(((512usize << 20) / size).max(200));
    let paced = opts.paced_msgs;
    let mq_opts = Options {
        max_chunk_bytes: chunk_bytes,
        max_chunks: chunks,
        timeout: Duration::from_secs(60),
        busy_wait: opts.busy_wait,
        force_remote: opts.remote,
        ..Options::default()
    };
    let mq = MessageQueue::create_from_group_with(group, 0, mq_opts, true)?;
    let mut msg = vec![0u8; size];
    let mut lat = Vec::with_capacity(if mq.is_writer() { 0 } else { paced });
    let mut burst_start = 0;
    if mq.is_writer() {
        for _ in 0..paced {
            msg[..8].copy_from_slice(&now_ns().to_le_bytes());
            mq.enqueue_bytes(&msg)?;
            let t = Instant::now();
            if !opts.remote {
                while !mq.stuck_readers().is_empty() {
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(Error::timeout("bench: paced message", t.elapsed(), ""));
                    }
                    std::thread::yield_now();
                }
            }
            let gap = Instant::now();
            while gap.elapsed() < opts.pace {
                std::thread::yield_now();
            }
        }
        burst_start = now_ns();
        for _ in 0..burst {
            mq.enqueue_bytes(&msg)?;
        }
    } else {
        for _ in 0..paced {
            let m = mq.dequeue_bytes()?;
            let now = now_ns();
            let t = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
            lat.push(now.saturating_sub(t));
        }
        for _ in 0..burst {
            let m = mq.dequeue_bytes()?;
            if m.len() != size {
                return Err(Error::protocol(format!(
                    "bench: got {} bytes, sent {size}",
                    m.len()
                )));
            }
        }
    }
    let end = now_ns();
    let all = group.gather_obj(&(lat, end), 0)?;
    let Some(all) = all else { return Ok(None) };
    // Latency of message i: the slowest reader's.
    let mut lat: Vec<Duration> = (0..paced)
        .map(|i| {
            Duration::from_nanos(
                all[1..]
                    .iter()
                    .map(|(l, _)| l.get(i).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0),
            )
        })
        .collect();
    lat.sort_unstable();
    let burst_end = all[1..]
        .iter()
        .map(|(_, e)| *e)
        .max()
        .unwrap_or(burst_start);
    let secs = (burst_end.saturating_sub(burst_start) as f64 / 1e9).max(1e-9);
    Ok(Some(Row {
        readers: n,
        bytes: size,
        chunk_bytes,
        chunks,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        burst_msgs: burst,
        msgs_per_s: burst as f64 / secs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_produces_sane_rows() {
        let rows = bench(&BenchOptions {
            readers: vec![2],
            sizes: vec![100, 5000],
            paced_msgs: 50,
            burst_msgs: 300,
            pace: Duration::from_micros(10),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(rows.len(), 2);
        for r in rows {
            assert!(r.p50 > Duration::ZERO && r.p99 >= r.p50, "{r:?}");
            assert!(r.msgs_per_s > 0.0);
        }
    }
}
