//! `dist bench store`: throughput of set+get with N client *processes* and the time of an
//! N-client rendezvous (N *threads*, each with its own connection: 1,024 processes would
//! measure process start-up, not the store).
//!
//! Client processes are this same executable re-executed with the same arguments and the
//! environment variable `DIST_STORE_BENCH_WORKER` set; [`run`] sees it and becomes a worker.
//! So any binary that mounts [`StoreBenchOptions`] and calls [`run`] (the `dist` CLI, the
//! `store_tool` example) benchmarks with processes, with no extra entry point.
//!
//! A set+get *pair* is one `SET` and one `get` (which, as PyTorch's client does, is a `WAIT`
//! then a `GET`): three round trips. Workers connect, wait for a start key, loop for the
//! duration, then add their count to a key the parent reads. Each figure is printed in a
//! table and as a `RESULT ...` line for scripts.

use std::io;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dist_core::Store;

use crate::{ClientOptions, ServerOptions, StoreServer, TcpStoreClient};

const WORKER_ENV: &str = "DIST_STORE_BENCH_WORKER";

/// Options of `dist bench store`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreBenchOptions {
    /// Benchmark the server at HOST:PORT (e.g. PyTorch's) instead of starting ours in-process.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// Client process counts for the set+get throughput runs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    pub clients: Vec<usize>,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 2.0)]
    pub duration: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// Rendezvous sizes (clients, each a thread with its own connection; comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub rendezvous: Vec<usize>,
    /// Times each rendezvous is repeated (the best and median are printed).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Event-loop threads of the in-process server (default: the server's default).
    #[arg(long)]
    pub server_threads: Option<usize>,
}

fn io_err(e: crate::Error) -> io::Error {
    io::Error::other(e.to_string())
}

fn split_addr(a: &str) -> io::Result<(String, u16)> {
    let (h, p) = a.rsplit_once(':').ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{a}: want HOST:PORT"))
    })?;
    let p = p
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{a}: bad port")))?;
    Ok((h.trim_matches(|c| c == '[' || c == ']').to_string(), p))
}

fn connect(host: &str, port: u16) -> io::Result<TcpStoreClient> {
    TcpStoreClient::connect(
        host,
        port,
        ClientOptions {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .map_err(io_err)
}

/// Runs the benchmark (or, with `DIST_STORE_BENCH_WORKER` set, one worker); returns the exit code.
pub fn run(opts: &StoreBenchOptions) -> io::Result<i32> {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        return worker(&spec);
    }
    let server = match &opts.addr {
        Some(_) => None,
        None => Some(
            StoreServer::start(ServerOptions {
                max_connections: 1 << 20,
                threads: opts
                    .server_threads
                    .unwrap_or_else(|| ServerOptions::default().threads),
                ..Default::default()
            })
            .map_err(io_err)?,
        ),
    };
    let (host, port) = match (&opts.addr, &server) {
        (Some(a), _) => split_addr(a)?,
        (None, Some(s)) => ("127.0.0.1".to_string(), s.port()),
        _ => unreachable!(),
    };
    let who = match &opts.addr {
        Some(a) => format!("server at {a}"),
        None => format!(
            "our server (in-process, {} loop threads)",
            opts.server_threads
                .unwrap_or_else(|| ServerOptions::default().threads)
        ),
    };
    println!(
        "dist bench store: {who}; our client; value {} B; {:.1} s per throughput run",
        opts.value_size, opts.duration
    );
    let ctl = connect(&host, port)?;
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    println!(
        "{:>8}  {:>14}  {:>14}",
        "clients", "set+get/s", "per client"
    );
    for (i, &n) in opts.clients.iter().enumerate() {
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
        ctl.wait(&refs, Duration::from_secs(120)).map_err(io_err)?;
        ctl.set(&format!("{tag}/go"), b"1").map_err(io_err)?;
        let done: Vec<String> = (0..n).map(|w| format!("{tag}/done/{w}")).collect();
        let refs: Vec<&str> = done.iter().map(|s| s.as_str()).collect();
        ctl.wait(&refs, Duration::from_secs_f64(opts.duration + 120.0))
            .map_err(io_err)?;
        let total: f64 = String::from_utf8_lossy(
            &ctl.get(&format!("{tag}/pairs"), Duration::from_secs(10))
                .map_err(io_err)?,
        )
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
    for &n in &opts.rendezvous {
        let mut times = Vec::new();
        for rep in 0..opts.repeat.max(1) {
            times.push(rendezvous(
                &host,
                port,
                n,
                &format!("rdv/{run_id}/{n}/{rep}"),
            )?);
        }
        times.sort();
        let best = times[0];
        let median = times[times.len() / 2];
        println!(
            "rendezvous of {n:>5} clients: best {:.1} ms, median {:.1} ms",
            best.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3
        );
        println!(
            "RESULT kind=rendezvous clients={n} best_ms={:.2} median_ms={:.2}",
            best.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3
        );
    }
    drop(server);
    Ok(0)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn worker(spec: &str) -> io::Result<i32> {
    let f: Vec<&str> = spec.split('|').collect();
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad {WORKER_ENV}: {spec}"),
        )
    };
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
    c.set(&format!("{tag}/ready/{w}"), b"1").map_err(io_err)?;
    c.wait(&[&format!("{tag}/go")], Duration::from_secs(120))
        .map_err(io_err)?;
    let end = Instant::now() + Duration::from_secs_f64(duration);
    let mut pairs: i64 = 0;
    while Instant::now() < end {
        for _ in 0..16 {
            c.set(&key, &value).map_err(io_err)?;
            let v = c.get(&key, Duration::from_secs(10)).map_err(io_err)?;
            if v.len() != size {
                return Err(io::Error::other("get returned a value of the wrong size"));
            }
            pairs += 1;
        }
    }
    c.add(&format!("{tag}/pairs"), pairs).map_err(io_err)?;
    c.set(&format!("{tag}/done/{w}"), b"1").map_err(io_err)?;
    Ok(0)
}

/// One rendezvous of `n` clients (threads, one connection each): each sets its key, then
/// waits for all `n` keys. Returns the time from the first client's start to the last return.
fn rendezvous(host: &str, port: u16, n: usize, tag: &str) -> io::Result<Duration> {
    let clients: Vec<TcpStoreClient> = (0..n)
        .map(|_| connect(host, port))
        .collect::<io::Result<_>>()?;
    let keys: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("{tag}/{i}")).collect());
    let go = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let keys = keys.clone();
            let go = go.clone();
            std::thread::Builder::new().stack_size(256 * 1024).spawn(
                move || -> io::Result<(Instant, Instant)> {
                    let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
                    go.wait();
                    let t0 = Instant::now();
                    c.set(&keys[i], b"1").map_err(io_err)?;
                    c.wait(&refs, Duration::from_secs(60)).map_err(io_err)?;
                    Ok((t0, Instant::now()))
                },
            )
        })
        .collect::<io::Result<_>>()?;
    go.wait();
    // From the first client's start to the last client's return (each thread reads its own
    // clock: this thread may be scheduled late).
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for h in handles {
        let (t0, t1) = h
            .join()
            .map_err(|_| io::Error::other("rendezvous thread panicked"))??;
        first = Some(first.map_or(t0, |f| f.min(t0)));
        last = Some(last.map_or(t1, |l| l.max(t1)));
    }
    Ok(last.zip(first).map_or(Duration::ZERO, |(l, f)| l - f))
}
