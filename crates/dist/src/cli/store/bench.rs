//! `dist bench store`: throughput of set+get with N client *processes*, and the time and server
//! memory of an N-client rendezvous (N *threads*, each with its own connection), beside
//! PyTorch's `TCPStore` measured in the same run when `python3 -c 'import torch'` works.
//!
//! Client processes are this same executable re-executed with the same arguments and the
//! environment variable `DIST_STORE_BENCH_WORKER` set; [`run`] sees it and becomes a worker.
//! Without `--addr`, the server is a `dist store serve` child process (a fresh one per
//! rendezvous size, so its peak RSS — `VmHWM` — is that size's), which also gives clients and
//! server a file-descriptor table each: 10,000 connections need 10,000 descriptors on each side.
//!
//! A set+get *pair* is one `SET` and one `get` (against our server one `WAIT_GET`, against
//! PyTorch's a `WAIT` then a `GET`). A rendezvous runs one of two patterns:
//! - `barrier`: `dist_store::group::store_barrier` (append to an arrival list, `ADD` a counter,
//!   the last sets the release key, all `WAIT` on it; then the departure) — O(1) requests per
//!   client. The torch peer runs the same requests through PyTorch's client.
//! - `keys`: each client sets its key, then `WAIT`s naming all N keys — what a client does that
//!   waits on per-rank keys; N² key bytes on the wire, whatever the server.
//!
//! Each figure is printed in a table and as a `RESULT ...` line for scripts.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use dist_core::Store;
use dist_store::{ClientOptions, TcpStoreClient};

const WORKER_ENV: &str = "DIST_STORE_BENCH_WORKER";
/// PyTorch's side of the rendezvous benchmark, written to a temporary file and run by Python.
const TORCH_PEER: &str = include_str!("torch_peer.py");

/// Flags of `dist bench store`.
#[derive(Debug, Clone, Args)]
pub struct StoreBenchArgs {
    /// Benchmark the server at HOST:PORT (e.g. PyTorch's) instead of starting ours.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// Client process counts for the set+get throughput runs (comma-separated; 0: none).
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    pub clients: Vec<usize>,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 2.0)]
    pub duration: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// Rendezvous sizes (clients, each a thread with its own connection; comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub rendezvous: Vec<usize>,
    /// Rendezvous patterns: `barrier` (counter + release key), `keys` (wait on all N keys).
    #[arg(long, value_delimiter = ',', default_value = "barrier")]
    pub patterns: Vec<String>,
    /// Times each rendezvous is repeated (the best and median are printed).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Event-loop threads of our server (default: the server's default).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Python with torch for the peer figures (default: $DIST_BENCH_PYTHON, else python3).
    #[arg(long, value_name = "PYTHON")]
    pub torch_python: Option<String>,
    /// Do not measure PyTorch's TCPStore.
    #[arg(long)]
    pub no_torch: bool,
}

fn split_addr(a: &str) -> anyhow::Result<(String, u16)> {
    let (h, p) = a
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{a}: want HOST:PORT"))?;
    let p = p.parse().with_context(|| format!("{a}: bad port"))?;
    Ok((h.trim_matches(|c| c == '[' || c == ']').to_string(), p))
}

/// The store to measure: `--addr` when given, else a fresh server child (returned, so that it
/// lives as long as the measurement), and its host and port.
fn server_for(opts: &StoreBenchArgs) -> anyhow::Result<(Option<ServerChild>, String, u16)> {
    match &opts.addr {
        Some(a) => {
            let (host, port) = split_addr(a)?;
            Ok((None, host, port))
        }
        None => {
            let s = ServerChild::start(opts.server_threads)?;
            let port = s.port;
            Ok((Some(s), "127.0.0.1".to_string(), port))
        }
    }
}

fn connect(host: &str, port: u16) -> anyhow::Result<TcpStoreClient> {
    Ok(TcpStoreClient::connect(
        host,
        port,
        ClientOptions {
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )?)
}

/// Our server as a child process (`dist store serve --port 0`), killed on drop.
struct ServerChild {
    child: Child,
    port: u16,
}

impl ServerChild {
    fn start(threads: Option<usize>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["store", "serve", "--host", "127.0.0.1", "--port", "0"])
            .env_remove(WORKER_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(t) = threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        let mut child = cmd.spawn().context("start `dist store serve`")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?)
            .read_line(&mut line)
            .context("read the server's address")?;
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("`dist store serve` printed {line:?}"))?;
        Ok(ServerChild { child, port })
    }

    /// The server's peak resident memory so far, KiB.
    fn peak_kib(&self) -> Option<u64> {
        peak_rss_kib(self.child.id())
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One rendezvous row: pattern, clients, best and median ms, server peak RSS (KiB).
#[derive(Debug, Clone, PartialEq)]
struct Row {
    pattern: String,
    clients: usize,
    best_ms: f64,
    median_ms: f64,
    peak_kib: Option<u64>,
    /// The server's resident memory before the clients connected, KiB.
    base_kib: Option<u64>,
}

/// Runs the benchmark (or, with `DIST_STORE_BENCH_WORKER` set, one worker); returns the exit code.
pub fn run(opts: &StoreBenchArgs) -> anyhow::Result<u8> {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        worker(&spec)?;
        return Ok(0);
    }
    for p in &opts.patterns {
        if p != "barrier" && p != "keys" {
            bail!("unknown rendezvous pattern {p:?} (barrier, keys)");
        }
    }
    dist_store::raise_open_file_limit();
    let threads = opts
        .server_threads
        .unwrap_or_else(|| dist_store::ServerOptions::default().threads);
    let who = match &opts.addr {
        Some(a) => format!("server at {a}"),
        None => format!("our server (`dist store serve`, {threads} loop threads)"),
    };
    println!(
        "dist bench store: {who}; our client; value {} B; {:.1} s per throughput run",
        opts.value_size, opts.duration
    );
    if opts.clients.iter().any(|n| *n > 0) {
        let (_server, host, port) = server_for(opts)?;
        throughput(opts, &host, port)?;
    }
    let mut ours = Vec::new();
    for pattern in &opts.patterns {
        for &n in &opts.rendezvous {
            let (server, host, port) = server_for(opts)?;
            let base_kib = server.as_ref().and_then(|s| rss_kib(s.child.id()));
            let tag = format!("rdv/{}/{pattern}/{n}", std::process::id());
            let mut times = Vec::new();
            for rep in 0..opts.repeat.max(1) {
                times.push(rendezvous(
                    &host,
                    port,
                    n,
                    pattern,
                    &format!("{tag}/{rep}/"),
                )?);
            }
            times.sort();
            let row = Row {
                pattern: pattern.clone(),
                clients: n,
                best_ms: times[0].as_secs_f64() * 1e3,
                median_ms: times[times.len() / 2].as_secs_f64() * 1e3,
                peak_kib: server.as_ref().and_then(|s| s.peak_kib()),
                base_kib,
            };
            print_row(if opts.addr.is_some() { "addr" } else { "ours" }, &row);
            ours.push(row);
        }
    }
    let (mixed, torch) = if opts.no_torch || opts.rendezvous.is_empty() || opts.patterns.is_empty()
    {
        (Vec::new(), Vec::new())
    } else {
        torch_peer(opts)
    };
    if !ours.is_empty() {
        let find = |v: &[Row], r: &Row| {
            v.iter()
                .find(|t| t.pattern == r.pattern && t.clients == r.clients)
                .cloned()
        };
        let ms = |r: &Option<Row>| {
            r.as_ref().map_or("n/a".into(), |t| {
                format!("{:.1} / {:.1}", t.best_ms, t.median_ms)
            })
        };
        let mib = |r: &Option<Row>| r.as_ref().map_or("n/a".into(), memory);
        println!();
        println!(
            "Rendezvous, best / median ms (server peak RSS, growth during the run); server/client:"
        );
        println!(
            "| pattern | clients | ours/ours | torch/ours | torch/torch | torch/ours ÷ ours/ours (median) |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &ours {
            let o = Some(r.clone());
            let (m, t) = (find(&mixed, r), find(&torch, r));
            println!(
                "| {} | {} | {} ({}) | {} ({}) | {} ({}) | {} |",
                r.pattern,
                r.clients,
                ms(&o),
                mib(&o),
                ms(&m),
                mib(&m),
                ms(&t),
                mib(&t),
                m.as_ref().map_or("n/a".into(), |m| format!(
                    "{:.2}",
                    m.median_ms / r.median_ms
                )),
            );
        }
    }
    Ok(0)
}

/// `peak 14 MiB, +8` (peak RSS, and its growth over the RSS before the clients came).
fn memory(r: &Row) -> String {
    let mib = |k: u64| k as f64 / 1024.0;
    match (r.peak_kib, r.base_kib) {
        (Some(p), Some(b)) => format!("peak {:.0} MiB, +{:.0}", mib(p), mib(p.saturating_sub(b))),
        (Some(p), None) => format!("peak {:.0} MiB", mib(p)),
        _ => "n/a".into(),
    }
}

fn print_row(who: &str, r: &Row) {
    println!(
        "{who:>17} rendezvous ({:>7}) of {:>6} clients: best {:9.1} ms, median {:9.1} ms, server {}",
        r.pattern,
        r.clients,
        r.best_ms,
        r.median_ms,
        memory(r)
    );
    println!(
        "RESULT kind=rendezvous server={who} pattern={} clients={} best_ms={:.2} median_ms={:.2} server_peak_kib={} server_base_kib={}",
        r.pattern,
        r.clients,
        r.best_ms,
        r.median_ms,
        r.peak_kib.map_or("nan".to_string(), |k| k.to_string()),
        r.base_kib.map_or("nan".to_string(), |k| k.to_string())
    );
}

fn throughput(opts: &StoreBenchArgs, host: &str, port: u16) -> anyhow::Result<()> {
    let ctl = connect(host, port)?;
    let run_id = format!("{}-{:?}", std::process::id(), Instant::now());
    println!(
        "{:>8}  {:>14}  {:>14}",
        "clients", "set+get/s", "per client"
    );
    for (i, &n) in opts.clients.iter().enumerate().filter(|(_, n)| **n > 0) {
        let tag = format!("bench/{run_id}/{i}");
        let exe = std::env::current_exe()?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let mut kids = Vec::new();
        for w in 0..n {
            let spec = format!(
                "{host}|{port}|{tag}|{w}|{}|{}",
                opts.duration, opts.value_size
            );
            let child = Command::new(&exe)
                .args(&args)
                .env(WORKER_ENV, spec)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            kids.push(KillOnDrop(child));
        }
        let ready: Vec<String> = (0..n).map(|w| format!("{tag}/ready/{w}")).collect();
        let refs: Vec<&str> = ready.iter().map(|s| s.as_str()).collect();
        ctl.wait(&refs, Duration::from_secs(120))?;
        ctl.set(&format!("{tag}/go"), b"1")?;
        let done: Vec<String> = (0..n).map(|w| format!("{tag}/done/{w}")).collect();
        let refs: Vec<&str> = done.iter().map(|s| s.as_str()).collect();
        ctl.wait(&refs, Duration::from_secs_f64(opts.duration + 120.0))?;
        let total: f64 =
            String::from_utf8_lossy(&ctl.get(&format!("{tag}/pairs"), Duration::from_secs(10))?)
                .parse()
                .unwrap_or(0.0);
        for mut k in kids {
            let st = k.0.wait()?;
            if !st.success() {
                eprintln!("dist bench store: a worker exited with {st}");
            }
        }
        let rate = total / opts.duration;
        println!("{n:>8}  {rate:>14.0}  {:>14.0}", rate / n as f64);
        println!("RESULT kind=setget clients={n} pairs_per_s={rate:.0}");
    }
    Ok(())
}

fn worker(spec: &str) -> anyhow::Result<()> {
    let f: Vec<&str> = spec.split('|').collect();
    let bad = || anyhow!("bad {WORKER_ENV}: {spec}");
    if f.len() != 6 {
        return Err(bad());
    }
    let port: u16 = f[1].parse().map_err(|_| bad())?;
    let (tag, w) = (f[2], f[3]);
    let duration: f64 = f[4].parse().map_err(|_| bad())?;
    let size: usize = f[5].parse().map_err(|_| bad())?;
    let c = connect(f[0], port)?;
    let value = vec![b'v'; size];
    let key = format!("{tag}/k/{w}");
    c.set(&format!("{tag}/ready/{w}"), b"1")?;
    c.wait(&[&format!("{tag}/go")], Duration::from_secs(120))?;
    let end = Instant::now() + Duration::from_secs_f64(duration);
    let mut pairs: i64 = 0;
    while Instant::now() < end {
        for _ in 0..16 {
            c.set(&key, &value)?;
            let v = c.get(&key, Duration::from_secs(10))?;
            if v.len() != size {
                bail!("get returned a value of the wrong size");
            }
            pairs += 1;
        }
    }
    c.add(&format!("{tag}/pairs"), pairs)?;
    c.set(&format!("{tag}/done/{w}"), b"1")?;
    Ok(())
}

/// One rendezvous of `n` clients (threads, one connection each, connected beforehand).
/// Returns the time from the first client's start to the last client's return.
fn rendezvous(
    host: &str,
    port: u16,
    n: usize,
    pattern: &str,
    prefix: &str,
) -> anyhow::Result<Duration> {
    let clients: Vec<TcpStoreClient> = (0..n)
        .map(|_| connect(host, port))
        .collect::<anyhow::Result<_>>()?;
    let keys: Arc<Vec<String>> = Arc::new(if pattern == "keys" {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    } else {
        Vec::new()
    });
    let go = Arc::new(Barrier::new(n + 1));
    let timeout = Duration::from_secs(600);
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let keys = keys.clone();
            let go = go.clone();
            let (pattern, prefix) = (pattern.to_string(), prefix.to_string());
            std::thread::Builder::new().stack_size(256 * 1024).spawn(
                move || -> anyhow::Result<(Instant, Instant)> {
                    let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
                    go.wait();
                    let t0 = Instant::now();
                    if pattern == "keys" {
                        c.set(&keys[i], b"1")?;
                        c.wait(&refs, timeout)?;
                    } else {
                        dist_store::group::store_barrier(
                            &c,
                            &prefix,
                            i,
                            n,
                            "bench rendezvous",
                            timeout,
                        )?;
                    }
                    Ok((t0, Instant::now()))
                },
            )
        })
        .collect::<std::io::Result<_>>()?;
    go.wait();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for h in handles {
        let (t0, t1) = h
            .join()
            .map_err(|_| anyhow!("rendezvous thread panicked"))??;
        first = Some(first.map_or(t0, |f| f.min(t0)));
        last = Some(last.map_or(t1, |l| l.max(t1)));
    }
    Ok(last.zip(first).map_or(Duration::ZERO, |(l, f)| l - f))
}

/// PyTorch's TCPStore (master and clients) through [`TORCH_PEER`], same sizes and
/// patterns; nothing (with a line saying why) when torch cannot be imported.
fn torch_peer(opts: &StoreBenchArgs) -> (Vec<Row>, Vec<Row>) {
    let py = opts
        .torch_python
        .clone()
        .or_else(|| std::env::var("DIST_BENCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch.distributed"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("torch: not importable with {py}; no peer figures (--torch-python PATH)");
        return (Vec::new(), Vec::new());
    }
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let script = std::env::temp_dir().join(format!("dist-bench-torch-{}.py", std::process::id()));
    if let Err(e) = std::fs::write(&script, TORCH_PEER) {
        println!("torch: cannot write {}: {e}", script.display());
        return (Vec::new(), Vec::new());
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(script.clone());
    // PyTorch's server with our client: the servers compared with the same client.
    let mut mixed = Vec::new();
    for pattern in &opts.patterns {
        for &n in &opts.rendezvous {
            match torch_server_our_client(&py, &script, n, pattern, opts.repeat.max(1)) {
                Ok(r) => {
                    print_row("torch-server/ours", &r);
                    mixed.push(r);
                }
                Err(e) => {
                    println!("torch: {pattern} rendezvous of {n} with our client failed: {e:#}")
                }
            }
        }
    }
    let child = Command::new(&py)
        .arg(&script)
        .arg("bench")
        .args(["--clients", &join(&opts.rendezvous)])
        .args(["--patterns", &opts.patterns.join(",")])
        .args(["--repeat", &opts.repeat.max(1).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => KillOnDrop(c),
        Err(e) => {
            println!("torch: cannot run {py}: {e}");
            return (mixed, Vec::new());
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.0.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let _ = child.0.wait();
    let rows: Vec<Row> = out.lines().filter_map(parse_torch_line).collect();
    for r in &rows {
        print_row("torch", r);
    }
    for l in out.lines().filter(|l| l.starts_with("torch:")) {
        println!("{l}");
    }
    (mixed, rows)
}

/// PyTorch's TCPStore master (`FILE master`, its own process) with our client threads.
fn torch_server_our_client(
    py: &str,
    script: &std::path::Path,
    n: usize,
    pattern: &str,
    repeat: usize,
) -> anyhow::Result<Row> {
    let mut m = KillOnDrop(
        Command::new(py)
            .arg(script)
            .arg("master")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(m.0.stdout.take().context("master stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("torch master printed {line:?}"))?;
    let base_kib = rss_kib(m.0.id());
    let mut times = Vec::new();
    for rep in 0..repeat {
        let prefix = format!("rdv/{}/{pattern}/{n}/{rep}/", std::process::id());
        times.push(rendezvous("127.0.0.1", port, n, pattern, &prefix)?);
    }
    times.sort();
    Ok(Row {
        pattern: pattern.to_string(),
        clients: n,
        best_ms: times[0].as_secs_f64() * 1e3,
        median_ms: times[times.len() / 2].as_secs_f64() * 1e3,
        peak_kib: peak_rss_kib(m.0.id()),
        base_kib,
    })
}

/// `RESULT kind=rendezvous server=torch pattern=P clients=N best_ms=B median_ms=M server_peak_kib=K`.
fn parse_torch_line(l: &str) -> Option<Row> {
    let rest = l.strip_prefix("RESULT kind=rendezvous server=torch ")?;
    let mut row = Row {
        pattern: String::new(),
        clients: 0,
        best_ms: f64::NAN,
        median_ms: f64::NAN,
        peak_kib: None,
        base_kib: None,
    };
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "pattern" => row.pattern = v.to_string(),
            "clients" => row.clients = v.parse().ok()?,
            "best_ms" => row.best_ms = v.parse().ok()?,
            "median_ms" => row.median_ms = v.parse().ok()?,
            "server_peak_kib" => row.peak_kib = v.parse().ok(),
            "server_base_kib" => row.base_kib = v.parse().ok(),
            _ => {}
        }
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_result_lines_parse() {
        let r = parse_torch_line(
            "RESULT kind=rendezvous server=torch pattern=barrier clients=1000 best_ms=12.50 median_ms=13.00 server_peak_kib=40960 server_base_kib=30000",
        )
        .unwrap();
        assert_eq!(
            r,
            Row {
                pattern: "barrier".into(),
                clients: 1000,
                best_ms: 12.5,
                median_ms: 13.0,
                peak_kib: Some(40960),
                base_kib: Some(30000)
            }
        );
        assert!(parse_torch_line("RESULT kind=setget clients=8 pairs_per_s=1").is_none());
    }
}
