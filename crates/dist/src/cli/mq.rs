//! `dist bench mq`: the MessageQueue's paced latency and burst throughput, beside the machine's
//! floor (a raw cross-process flag ping-pong, measured first) and, when a vLLM source tree is
//! given, vLLM's own MessageQueue (`shm_broadcast.py`) run by `ci/device/mq_vllm_peer.py` with
//! the same sizes, reader counts and message counts, in the same run.
//!
//! Every rank is a process by default (vLLM's readers are processes): this binary starts itself
//! once per rank (`--child`, over a `StatelessProcessGroup` on a store this process hosts);
//! `--threads` runs ranks as threads of one process instead. For each reader count and size:
//!
//! - **paced latency**: the writer stamps the time into a message, enqueues it, waits until every
//!   reader has it (the ring's read counts; over TCP it can only wait the pause), pauses
//!   `--pace-us`, sends the next; a message's latency is from just before `enqueue` to the
//!   *last* reader's return from `dequeue`. p50 and p99 over `--paced-msgs` messages.
//! - **burst throughput**: messages back to back, from the first enqueue until the last reader
//!   has the last one.
//!
//! Times are wall-clock nanoseconds (`CLOCK_REALTIME`, one clock for every process of a node;
//! the peer script uses the same clock).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use dist_core::{Error, HostGroup, HostGroupExt, Result};
use dist_cpu::mq::{MessageQueue, Options};
use dist_cpu::shm::Segment;

/// `dist bench mq`'s options.
#[derive(Debug, Clone, Args)]
pub struct MqBenchArgs {
    /// Reader counts (with the writer: 2, 4 and 8 processes).
    #[arg(long, value_delimiter = ',', default_value = "1,3,7")]
    readers: Vec<usize>,
    /// Message sizes (4K, 1M…).
    #[arg(long, value_delimiter = ',', default_value = "64,1K,64K,1M")]
    sizes: Vec<String>,
    /// Paced messages per point.
    #[arg(long, default_value_t = 2000)]
    paced_msgs: usize,
    /// Pause between paced messages, after every reader has the last one (µs).
    #[arg(long, default_value_t = 100)]
    pace_us: u64,
    /// Messages in a burst (fewer for large messages: at most 512 MiB per reader).
    #[arg(long, default_value_t = 20000)]
    burst_msgs: usize,
    /// The queue's busy wait in µs (default: the queue's own, `Options::busy_wait`).
    #[arg(long)]
    busy_wait_us: Option<u64>,
    /// Readers over TCP (loopback) instead of shared memory.
    #[arg(long)]
    remote: bool,
    /// Ranks as threads of this process instead of processes.
    #[arg(long)]
    threads: bool,
    /// Round trips of the floor's ping-pong (0: skip it).
    #[arg(long, default_value_t = 20000)]
    floor_rounds: usize,
    /// A vLLM source tree (holding vllm/distributed/device_communicators/shm_broadcast.py):
    /// measure vLLM's MessageQueue in the same run. Default: `$VLLM_SRC` when set.
    #[arg(long)]
    vllm_src: Option<PathBuf>,
    /// The peer script that runs vLLM's MessageQueue.
    #[arg(long, default_value = "ci/device/mq_vllm_peer.py")]
    vllm_peer: PathBuf,
    /// Python for the peer script.
    #[arg(long, default_value = "python3")]
    python: String,
    /// (internal) run as one rank of the benchmark.
    #[arg(long, hide = true)]
    child: bool,
    /// (internal) the far end of the floor's ping-pong, on this segment.
    #[arg(long, hide = true)]
    floor_child: Option<String>,
}

/// One line of results.
#[derive(Debug, Clone, Copy)]
struct Row {
    readers: usize,
    bytes: usize,
    p50_ns: u64,
    p99_ns: u64,
    burst_msgs: usize,
    msgs_per_s: f64,
}

impl Row {
    fn to_line(self) -> String {
        format!(
            "ROW {} {} {} {} {} {}",
            self.readers, self.bytes, self.p50_ns, self.p99_ns, self.burst_msgs, self.msgs_per_s
        )
    }

    /// A `ROW readers bytes p50_ns p99_ns burst_msgs msgs_per_s` line (ours or the peer's).
    fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.trim().strip_prefix("ROW ")?.split(' ').collect();
        Some(Row {
            readers: f.first()?.parse().ok()?,
            bytes: f.get(1)?.parse().ok()?,
            p50_ns: f.get(2)?.parse().ok()?,
            p99_ns: f.get(3)?.parse().ok()?,
            burst_msgs: f.get(4)?.parse().ok()?,
            msgs_per_s: f.get(5)?.parse().ok()?,
        })
    }
}

/// The floor: one-way latency of a raw flag between two processes, p50 and p99.
#[derive(Debug, Clone, Copy)]
struct Floor {
    p50_ns: u64,
    p99_ns: u64,
    rounds: usize,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// The bench's ring for messages of `size` bytes: a chunk holds a whole message.
fn ring_for(size: usize) -> (usize, usize) {
    let chunk_bytes = size.max(4096);
    (chunk_bytes, ((64usize << 20) / chunk_bytes).clamp(8, 256))
}

/// Messages in the burst for `size` bytes: at most 512 MiB per reader, at least 200.
fn burst_for(size: usize, burst_msgs: usize) -> usize {
    burst_msgs.min(((512usize << 20) / size).max(200))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn sizes(a: &MqBenchArgs) -> anyhow::Result<Vec<usize>> {
    a.sizes
        .iter()
        .map(|s| Ok(super::bench::parse_size(s)?.max(8)))
        .collect()
}

/// One measurement of messages of `size` bytes on `group`: rank 0 writes, every other rank
/// reads. Collective; the row on rank 0, `None` elsewhere.
fn run_on_group(group: &dyn HostGroup, size: usize, a: &MqBenchArgs) -> Result<Option<Row>> {
    let n = group.world_size().saturating_sub(1);
    dist_core::ensure_arg!(n >= 1, "bench: at least one reader");
    let (chunk_bytes, chunks) = ring_for(size);
    let burst = burst_for(size, a.burst_msgs);
    let paced = a.paced_msgs;
    let pace = Duration::from_micros(a.pace_us);
    let mut opts = Options {
        max_chunk_bytes: chunk_bytes,
        max_chunks: chunks,
        timeout: Duration::from_secs(60),
        force_remote: a.remote,
        ..Options::default()
    };
    if let Some(b) = a.busy_wait_us {
        opts.busy_wait = Some(Duration::from_micros(b));
    }
    let mq = MessageQueue::create_from_group_with(group, 0, opts, true)?;
    let mut msg = vec![0u8; size];
    let mut lat = Vec::with_capacity(if mq.is_writer() { 0 } else { paced });
    let mut burst_start = 0;
    if mq.is_writer() {
        for _ in 0..paced {
            msg[..8].copy_from_slice(&now_ns().to_le_bytes());
            mq.enqueue_bytes(&msg)?;
            let t = Instant::now();
            if !a.remote {
                while !mq.stuck_readers().is_empty() {
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(Error::timeout("bench: paced message", t.elapsed(), ""));
                    }
                    std::thread::yield_now();
                }
            }
            let gap = Instant::now();
            while gap.elapsed() < pace {
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
    let mut lat: Vec<u64> = (0..paced)
        .map(|i| {
            all[1..]
                .iter()
                .map(|(l, _)| l.get(i).copied().unwrap_or(0))
                .max()
                .unwrap_or(0)
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
        p50_ns: percentile(&lat, 0.50),
        p99_ns: percentile(&lat, 0.99),
        burst_msgs: burst,
        msgs_per_s: burst as f64 / secs,
    }))
}

/// Kills and reaps its children when dropped (a failed run leaves no process behind).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Waits for every child, at most `timeout` in all; fails naming those that failed.
fn wait_all(kids: &mut Children, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    let mut failed = Vec::new();
    for (i, c) in kids.0.iter_mut().enumerate() {
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    failed.push(format!("rank {i}: {st}"));
                }
                break;
            }
            if Instant::now() >= end {
                bail!("bench mq: rank {i} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !failed.is_empty() {
        bail!("bench mq: {}", failed.join("; "));
    }
    Ok(())
}

/// The rows of `n` readers: one process per rank (this binary with `--child`).
fn processes(n: usize) -> anyhow::Result<Vec<Row>> {
    let server = dist_store::StoreServer::start(dist_store::ServerOptions {
        host: "127.0.0.1".into(),
        port: 0,
        ..Default::default()
    })?;
    let exe = std::env::current_exe()?;
    let world = n + 1;
    let mut kids = Children(Vec::new());
    let mut out = None;
    for rank in 0..world {
        let mut c = Command::new(&exe);
        c.args(std::env::args_os().skip(1))
            .arg("--child")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", server.port().to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = c.spawn().context("starting a bench rank")?;
        if rank == 0 {
            out = child.stdout.take();
        }
        kids.0.push(child);
    }
    let mut rows = Vec::new();
    if let Some(o) = out {
        for line in BufReader::new(o).lines() {
            rows.extend(Row::parse(&line?));
        }
    }
    wait_all(&mut kids, Duration::from_secs(600))?;
    Ok(rows)
}

/// A rank of [`processes`]: every size on the group; rank 0 prints a `ROW` line per size.
fn child(a: &MqBenchArgs) -> anyhow::Result<()> {
    let g = dist_store::StatelessProcessGroup::from_env(Duration::from_secs(120))?;
    for size in sizes(a)? {
        if let Some(r) = run_on_group(&g, size, a)? {
            println!("{}", r.to_line());
        }
    }
    // Nobody leaves while another rank may still need the store.
    g.barrier()?;
    Ok(())
}

const FLOOR_PING: usize = 0;
const FLOOR_PONG: usize = 64;
const FLOOR_READY: usize = 128;
/// Longest a floor spin may last before the run is declared stuck.
const FLOOR_STUCK: Duration = Duration::from_secs(10);

fn spin_until(w: &AtomicU64, v: u64) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut n = 0u32;
    while w.load(Ordering::Acquire) != v {
        std::hint::spin_loop();
        n = n.wrapping_add(1);
        if n % 4096 == 0 && t.elapsed() > FLOOR_STUCK {
            bail!("floor ping-pong: no answer for {FLOOR_STUCK:?}");
        }
    }
    Ok(())
}

/// The floor: this process and a child bounce a counter through two words on their own cache
/// lines of a shared segment, both spinning; one way is half a round trip.
fn floor(rounds: usize) -> anyhow::Result<Floor> {
    let seg = Segment::create(&format!("bench-floor.{}", now_ns()), 4096)?;
    let exe = std::env::current_exe()?;
    let mut kids = Children(vec![Command::new(exe)
        .args(["bench", "mq", "--floor-child", seg.name()])
        .stdout(Stdio::null())
        .spawn()?]);
    let ping: &AtomicU64 = seg.word(FLOOR_PING);
    let pong: &AtomicU64 = seg.word(FLOOR_PONG);
    spin_until(seg.word(FLOOR_READY), 1)?;
    seg.unlink();
    let warmup = rounds / 10 + 100;
    let mut one_way = Vec::with_capacity(rounds);
    for i in 1..=(warmup + rounds) as u64 {
        let t = Instant::now();
        ping.store(i, Ordering::Release);
        spin_until(pong, i)?;
        let rtt = t.elapsed().as_nanos() as u64;
        if i as usize > warmup {
            one_way.push(rtt / 2);
        }
    }
    ping.store(u64::MAX, Ordering::Release);
    wait_all(&mut kids, Duration::from_secs(30))?;
    one_way.sort_unstable();
    Ok(Floor {
        p50_ns: percentile(&one_way, 0.5),
        p99_ns: percentile(&one_way, 0.99),
        rounds,
    })
}

fn floor_child(name: &str) -> anyhow::Result<()> {
    let seg = Segment::open(name, 4096, Duration::from_secs(10))?;
    let ping: &AtomicU64 = seg.word(FLOOR_PING);
    let pong: &AtomicU64 = seg.word(FLOOR_PONG);
    seg.word::<AtomicU64>(FLOOR_READY)
        .store(1, Ordering::Release);
    let mut last = 0;
    loop {
        let t = Instant::now();
        let mut n = 0u32;
        let v = loop {
            let v = ping.load(Ordering::Acquire);
            if v != last {
                break v;
            }
            std::hint::spin_loop();
            n = n.wrapping_add(1);
            if n % 4096 == 0 && t.elapsed() > FLOOR_STUCK {
                bail!("floor ping-pong: no ping for {FLOOR_STUCK:?}");
            }
        };
        if v == u64::MAX {
            return Ok(());
        }
        pong.store(v, Ordering::Release);
        last = v;
    }
}

/// vLLM's MessageQueue through the peer script, with our sizes and counts.
fn vllm_peer(a: &MqBenchArgs, src: &std::path::Path) -> anyhow::Result<(String, Vec<Row>)> {
    let list = |v: &[usize]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new(&a.python)
        .arg(&a.vllm_peer)
        .arg("--vllm-src")
        .arg(src)
        .args(["--readers", &list(&a.readers)])
        .args(["--sizes", &list(&sizes(a)?)])
        .args(["--paced", &a.paced_msgs.to_string()])
        .args(["--burst", &a.burst_msgs.to_string()])
        .args(["--pace-us", &a.pace_us.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", a.python, a.vllm_peer.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("the vLLM peer failed ({}):\n{text}", out.status);
    }
    let about = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    Ok((about, text.lines().filter_map(Row::parse).collect()))
}

fn threads(a: &MqBenchArgs, n: usize, sizes: &[usize]) -> anyhow::Result<Vec<Row>> {
    let out = dist_core::local::run_threads(n + 1, Duration::from_secs(600), |_, g| {
        sizes
            .iter()
            .map(|&s| run_on_group(&g, s, a))
            .collect::<Result<Vec<_>>>()
    });
    let mut rows = Vec::new();
    for (rank, r) in out.into_iter().enumerate() {
        match r {
            Ok(v) => rows.extend(v?.into_iter().flatten()),
            Err(_) => bail!("bench mq: rank {rank} panicked"),
        }
    }
    Ok(rows)
}

/// `x / y` to two significant digits or more, or `-`.
fn ratio(x: f64, y: f64) -> String {
    if y <= 0.0 {
        return "-".into();
    }
    let r = x / y;
    if r >= 10.0 {
        format!("{r:.0}")
    } else if r >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.4}")
    }
}

/// Runs `dist bench mq`; the exit code.
pub fn run(a: MqBenchArgs) -> anyhow::Result<u8> {
    if let Some(name) = &a.floor_child {
        floor_child(name)?;
        return Ok(0);
    }
    if a.child {
        child(&a)?;
        return Ok(0);
    }
    let sizes = sizes(&a)?;
    if a.readers.contains(&0) {
        bail!("--readers: every count must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let busy = match a.busy_wait_us {
        Some(b) => format!("{b} µs"),
        None => format!(
            "default ({:?} spinning with two cores per process, else {:?} yielding)",
            dist_cpu::mq::AUTO_BUSY_SPIN,
            dist_cpu::mq::AUTO_BUSY_YIELD
        ),
    };
    println!(
        "# dist bench mq: 1 writer + N readers as {}, {}; {cores} cores; busy wait {busy}",
        if a.threads { "threads" } else { "processes" },
        if a.remote {
            "readers over TCP loopback"
        } else {
            "over shared memory"
        },
    );
    println!(
        "# paced: {} messages one at a time, {} µs apart; latency = enqueue to the last reader's dequeue. burst: up to {} back to back",
        a.paced_msgs, a.pace_us, a.burst_msgs
    );
    let fl = if a.floor_rounds > 0 {
        let f = floor(a.floor_rounds)?;
        println!(
            "# floor: raw cross-process flag ping-pong, one way = round trip / 2, {} rounds: p50 {:.2} µs, p99 {:.2} µs",
            f.rounds,
            us(f.p50_ns),
            us(f.p99_ns)
        );
        Some(f)
    } else {
        None
    };
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>11}",
        "readers",
        "bytes",
        "p50(us)",
        "p99(us)",
        "p50/floor",
        "p99/floor",
        "burst msg/s",
        "burst MB/s"
    );
    let mut ours = Vec::new();
    for &n in &a.readers {
        let rows = if a.threads {
            threads(&a, n, &sizes)?
        } else {
            processes(n)?
        };
        for r in &rows {
            let (f50, f99) = fl.map_or((0.0, 0.0), |f| (f.p50_ns as f64, f.p99_ns as f64));
            println!(
                "{:>7} {:>9} {:>9.1} {:>9.1} {:>9} {:>9} {:>12.0} {:>11.1}",
                r.readers,
                r.bytes,
                us(r.p50_ns),
                us(r.p99_ns),
                ratio(r.p50_ns as f64, f50),
                ratio(r.p99_ns as f64, f99),
                r.msgs_per_s,
                r.msgs_per_s * r.bytes as f64 / 1e6
            );
        }
        ours.extend(rows);
    }
    let src = a
        .vllm_src
        .clone()
        .or_else(|| std::env::var_os("VLLM_SRC").map(PathBuf::from));
    let Some(src) = &src else {
        println!("# no vLLM peer in this run (--vllm-src DIR or VLLM_SRC runs one)");
        return Ok(0);
    };
    if a.remote || a.threads {
        println!("# no vLLM peer: it runs only with readers as processes on shared memory");
        return Ok(0);
    }
    let (about, peer) = vllm_peer(&a, src).map_err(|e| anyhow!("vLLM peer: {e:#}"))?;
    println!("{about}");
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>12}   {:>9} {:>9} {:>9}",
        "readers",
        "bytes",
        "p50(us)",
        "p99(us)",
        "burst msg/s",
        "ours/p50",
        "ours/p99",
        "ours/msgs"
    );
    for p in &peer {
        let mine = ours
            .iter()
            .find(|o| o.readers == p.readers && o.bytes == p.bytes);
        let (rp50, rp99, rb) = match mine {
            Some(o) => (
                ratio(o.p50_ns as f64, p.p50_ns as f64),
                ratio(o.p99_ns as f64, p.p99_ns as f64),
                ratio(o.msgs_per_s, p.msgs_per_s),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>7} {:>9} {:>9.1} {:>9.1} {:>12.0}   {:>9} {:>9} {:>9}",
            p.readers,
            p.bytes,
            us(p.p50_ns),
            us(p.p99_ns),
            p.msgs_per_s,
            rp50,
            rp99,
            rb
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_roundtrip_and_junk_is_ignored() {
        let r = Row {
            readers: 3,
            bytes: 1024,
            p50_ns: 1500,
            p99_ns: 9000,
            burst_msgs: 20000,
            msgs_per_s: 1.5e6,
        };
        let back = Row::parse(&r.to_line()).unwrap();
        assert_eq!((back.readers, back.bytes, back.p99_ns), (3, 1024, 9000));
        assert!(Row::parse("# a comment").is_none());
        assert!(Row::parse("ROW 1 2").is_none());
    }

    #[test]
    fn ratios_keep_two_digits() {
        assert_eq!(ratio(10.2, 4375.6), "0.0023");
        assert_eq!(ratio(1.0, 4.0), "0.25");
        assert_eq!(ratio(3888.0, 0.35), "11109");
        assert_eq!(ratio(1.0, 0.0), "-");
    }

    #[test]
    fn ring_and_burst_sizes() {
        assert_eq!(ring_for(64), (4096, 256));
        assert_eq!(ring_for(1 << 20), (1 << 20, 64));
        assert_eq!(burst_for(1 << 20, 20000), 512);
        assert_eq!(burst_for(64, 20000), 20000);
    }

    /// A tiny run on threads: sane figures, one per size.
    #[test]
    fn a_tiny_threaded_run() {
        let a = MqBenchArgs {
            readers: vec![2],
            sizes: vec!["100".into(), "5000".into()],
            paced_msgs: 50,
            pace_us: 10,
            burst_msgs: 300,
            busy_wait_us: None,
            remote: false,
            threads: true,
            floor_rounds: 0,
            vllm_src: None,
            vllm_peer: PathBuf::new(),
            python: String::new(),
            child: false,
            floor_child: None,
        };
        let rows = threads(&a, 2, &[100, 5000]).unwrap();
        assert_eq!(rows.len(), 2);
        for r in rows {
            assert!(r.p50_ns > 0 && r.p99_ns >= r.p50_ns, "{r:?}");
            assert!(r.msgs_per_s > 0.0);
        }
    }
}
