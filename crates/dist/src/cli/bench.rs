//! `dist bench`: every collective over a size sweep **through `GroupCoordinator`** (the path an
//! engine calls), checked against the oracles, timed, and printed with nccl-tests' columns: the
//! out-of-place form (`*_into` a caller's output buffer) and, for the ops that have one, the
//! in-place form (`all_reduce_in_place`, `broadcast_in_place`).
//!
//! Outside a launcher it starts its own ranks (`--world`, default 4) under `dist run` and runs as
//! one of them; rank 0 prints. Bus bandwidth follows nccl-tests: all-reduce `algbw·2(n−1)/n`,
//! all-gather / reduce-scatter / gather / all-to-all and their v-variants `algbw·(n−1)/n`, broadcast
//! and send/recv `algbw`. Sizes are nccl-tests' too: the larger of the input and output buffers.
//!
//! On the host backends a copy probe runs in the same sweep: every rank copies a buffer of the
//! size with the helper threads its communicator uses, all at once; its rate is the memory bound
//! printed as `%bound` (the best busbw of the row over it). `--peer torch` runs torch's gloo (host)
//! or NCCL (GPU) on the same ops, sizes and ranks after the sweep and prints the ratios.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use dist_core::communicator::{Comm, View, ViewMut};
use dist_core::{
    reference, Backend, DType, DeviceCommunicator, Error, GroupCoordinator, HostGroup,
    HostGroupExt, HostTensor, ParallelConfig, ReduceOp, Result,
};
use serde::{Deserialize, Serialize};

use dist::{BackendKind, DistEnv, InitOptions};

/// The collectives `dist bench` knows.
pub const ALL_OPS: [&str; 9] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "gather",
    "all_gatherv",
    "reduce_scatterv",
    "all_to_all_v",
    "sendrecv",
];

/// Options of `dist bench` (collectives).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Backend: cpu (shared memory), host (over the store), cuda, rocm, tpu (when built with those
    /// features). Default: DIST_BACKEND, else cpu.
    #[arg(long)]
    pub backend: Option<String>,
    /// Ranks to launch when not already under `dist run`.
    #[arg(long, default_value_t = 4)]
    pub world: usize,
    /// Tensor-parallel size (the group the collectives run on). Default: world / pp.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Comma-separated ops (default: all of them).
    #[arg(long, value_delimiter = ',')]
    pub ops: Vec<String>,
    /// Sizes: a list (`4K,1M`) or a range `MIN:MAX` stepped by `--step-factor`.
    #[arg(long, default_value = "1K:64M")]
    pub sizes: String,
    /// Multiplier between sizes of a range.
    #[arg(long, default_value_t = 4)]
    pub step_factor: usize,
    /// Element type.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Reduction of all_reduce (the coordinator's reduce-scatters sum, as vLLM's do).
    #[arg(long, default_value = "sum")]
    pub redop: String,
    /// Timed iterations per size (default: from 1,000 at small sizes down to 5 at 64 MiB).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed iterations before timing (the first call of each form is checked).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw busbw against size per op into FILE (.svg, or .png).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
    /// Skip the oracle check (timings only; the table then says nothing about correctness). The
    /// check counts, in `#wrong`, elements that differ from the oracle: exactly for data
    /// movement, within 1e-5 relative (2e-2 for f16/bf16) for floating-point reductions.
    #[arg(long)]
    pub no_check: bool,
    /// Also run torch.distributed (gloo for host tensors, NCCL for CUDA) on the same ops, sizes
    /// and ranks after the sweep, and print the ratios (`torch`; needs python3 with torch, or the
    /// interpreter in DIST_BENCH_PYTHON).
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// Seconds the peer may run before it is stopped.
    #[arg(long, default_value_t = 600.0)]
    pub peer_timeout: f64,
    /// Seconds the launched job may run before it is killed.
    #[arg(long, default_value_t = 600.0)]
    pub job_timeout: f64,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Operation.
    pub op: String,
    /// Backend name.
    pub backend: String,
    /// Ranks in the group.
    pub world: usize,
    /// Bytes (the larger of input and output).
    pub bytes: usize,
    /// Elements (of that buffer).
    pub count: usize,
    /// Element type.
    pub dtype: String,
    /// Reduction, or "none".
    pub redop: String,
    /// Root rank, or -1.
    pub root: i64,
    /// Out of place: time per call, µs (the slowest rank's mean), for the ops that have the form.
    pub time_us: Option<f64>,
    /// Out of place: algorithm bandwidth, GB/s.
    pub algbw: Option<f64>,
    /// Out of place: bus bandwidth, GB/s.
    pub busbw: Option<f64>,
    /// In place: time per call, µs, for the ops that have the form.
    pub ip_time_us: Option<f64>,
    /// In place: bus bandwidth, GB/s.
    pub ip_busbw: Option<f64>,
    /// Elements that differ from the oracle, over all ranks and both forms; `None` (JSON `null`)
    /// when not checked (`--no-check`).
    pub wrong: Option<i64>,
    /// The copy probe's rate at this size, GB/s (host backends; the memory bound).
    pub bound_gbps: Option<f64>,
}

impl Row {
    /// The best bus bandwidth of the row (in place or out of place).
    pub fn best_busbw(&self) -> f64 {
        self.busbw.unwrap_or(0.0).max(self.ip_busbw.unwrap_or(0.0))
    }
}

/// Parses `4K`, `1M`, `64M`, `1G`, `123`.
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| Error::invalid(format!("bad size {s:?} (examples: 4096, 4K, 1M, 1G)")))
}

/// The sizes of `--sizes` / `--step-factor`.
pub fn parse_sizes(spec: &str, factor: usize) -> Result<Vec<usize>> {
    if let Some((a, b)) = spec.split_once(':') {
        let (lo, hi) = (parse_size(a)?, parse_size(b)?);
        dist_core::ensure_arg!(lo <= hi && lo > 0, "size range {spec}: need 0 < MIN <= MAX");
        dist_core::ensure_arg!(factor >= 2, "--step-factor must be at least 2");
        let mut v = vec![];
        let mut s = lo;
        while s <= hi {
            v.push(s);
            s = s.saturating_mul(factor);
        }
        Ok(v)
    } else {
        spec.split(',').map(parse_size).collect()
    }
}

fn default_iters(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(5, 1000)
}

fn bus_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        "broadcast" | "sendrecv" => 1.0,
        _ => (n - 1.0) / n,
    }
}

/// Entry point of `dist bench`: launches the ranks, or runs as one.
pub fn run(args: &BenchArgs) -> anyhow::Result<u8> {
    if std::env::var_os("RANK").is_none() {
        return launch(args);
    }
    if let Some(p) = &args.peer {
        anyhow::ensure!(p == "torch", "--peer {p}: the peer known is torch");
    }
    let kind = match &args.backend {
        Some(b) => BackendKind::parse(b)?,
        None => BackendKind::from_env()?,
    };
    #[cfg(feature = "rocm")]
    if kind == BackendKind::Rocm {
        // Say plainly when there is no ROCm device (or no HIP runtime) and stop.
        if let Err(e) = dist_rocm::probe() {
            eprintln!("dist bench --backend rocm: {e}");
            return Ok(1);
        }
    }
    let env = DistEnv::init(&InitOptions {
        device_kind: kind.device_kind(),
        ..InitOptions::default()
    })?;
    let rows = match kind {
        BackendKind::Cpu => run_rank::<dist_cpu::CpuBackend>(&env, args, kind)?,
        BackendKind::Host => run_rank::<dist_core::host_comm::HostBackend>(&env, args, kind)?,
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => run_rank::<dist_cuda::CudaBackend>(&env, args, kind)?,
        #[cfg(feature = "rocm")]
        BackendKind::Rocm => run_rank::<dist_rocm::RocmBackend>(&env, args, kind)?,
        #[cfg(feature = "tpu")]
        BackendKind::Tpu => run_rank::<dist_tpu::TpuBackend>(&env, args, kind)?,
        other => anyhow::bail!("dist bench: no benchmark for backend {}", other.name()),
    };
    let wrong: i64 = rows.iter().filter_map(|r| r.wrong).sum();
    let rank0 = env.world().rank == 0;
    if rank0 {
        if let Some(p) = &args.plot {
            let png = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
            let bytes = if png {
                super::plot::png(&rows)
            } else {
                super::plot::svg(&rows).into_bytes()
            };
            std::fs::write(p, bytes)?;
            eprintln!("plot written to {}", p.display());
        }
    }
    env.world_group().barrier()?;
    if rank0 && args.peer.is_some() {
        match std::env::var_os(ROWS_ENV) {
            // Launched by `dist bench` itself: the launcher runs the peer once the ranks are done.
            Some(path) => std::fs::write(path, serde_json::to_vec(&rows)?)?,
            None => peer_torch(kind, &rows, args.peer_timeout)?,
        }
    }
    Ok(if wrong > 0 { 1 } else { 0 })
}

/// Where rank 0 leaves its rows for the launcher's peer run.
const ROWS_ENV: &str = "DIST_BENCH_ROWS";

fn launch(args: &BenchArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.world >= 1, "--world must be at least 1");
    if let Some(p) = &args.peer {
        anyhow::ensure!(p == "torch", "--peer {p}: the peer known is torch");
    }
    let exe = std::env::current_exe()?;
    let mut program: Vec<std::ffi::OsString> = vec![exe.into_os_string()];
    program.extend(std::env::args_os().skip(1));
    let mut opts = dist_store::launch::LaunchOptions::new(args.world, program);
    opts.no_prefix = true;
    opts.timeout = Some(args.job_timeout);
    let rows_file =
        std::env::temp_dir().join(format!("dist_bench_rows_{}.json", std::process::id()));
    if args.peer.is_some() {
        std::env::set_var(ROWS_ENV, &rows_file);
    }
    let code = dist_store::launch::run(&opts)?;
    if args.peer.is_some() {
        let rows = std::fs::read(&rows_file).ok();
        let _ = std::fs::remove_file(&rows_file);
        match rows.and_then(|b| serde_json::from_slice::<Vec<Row>>(&b).ok()) {
            Some(rows) => {
                let kind = match &args.backend {
                    Some(b) => BackendKind::parse(b)?,
                    None => BackendKind::from_env()?,
                };
                peer_torch(kind, &rows, args.peer_timeout)?;
            }
            None => println!("# peer torch: not run (the sweep left no rows)"),
        }
    }
    Ok(code.clamp(0, 255) as u8)
}

/// Runs the sweep as one rank of a job and returns the rows (complete on rank 0).
pub fn run_rank<B: Backend>(
    env: &DistEnv,
    args: &BenchArgs,
    kind: BackendKind,
) -> Result<Vec<Row>> {
    let world = env.world().world_size;
    dist_core::ensure_arg!(
        args.pp >= 1 && world % args.pp == 0,
        "--pp {} does not divide world {world}",
        args.pp
    );
    let tp = args.tp.unwrap_or(world / args.pp);
    let cfg = ParallelConfig {
        tp,
        pp: args.pp,
        ..ParallelConfig::new(world)
    };
    let state = env.initialize_model_parallel::<B>(cfg)?;
    let tpg = state.tp().clone();
    let n = tpg.world_size();
    let dtype: DType = args.dtype.parse()?;
    let redop: ReduceOp = args.redop.parse()?;
    let ops: Vec<String> = if args.ops.is_empty() {
        ALL_OPS.iter().map(|s| s.to_string()).collect()
    } else {
        args.ops.clone()
    };
    for op in &ops {
        dist_core::ensure_arg!(
            ALL_OPS.contains(&op.as_str()),
            "unknown op {op:?}; ops: {}",
            ALL_OPS.join(",")
        );
    }
    let sizes = parse_sizes(&args.sizes, args.step_factor)?;
    let me = env.world().rank;
    let printer = me == 0;
    let host = tpg.host_group().clone();
    let threads = match kind {
        BackendKind::Cpu => Some(dist_cpu::ShmConfig::for_world(n).resolved_threads(n)),
        BackendKind::Host => Some(1),
        #[allow(unreachable_patterns)]
        _ => None,
    };
    let total = ops.len() * sizes.len();
    let tty = printer && !args.json && std::io::stderr().is_terminal();
    if printer && !args.json {
        println!(
            "# dist bench: backend {} | world {world} | tp {tp} pp {} | dtype {dtype} | {} ranks per group | through GroupCoordinator",
            kind.name(),
            args.pp,
            n
        );
        println!("#");
        println!(
            "# {:>12} {:>10} {:>5} {:>5} {:>4}  {:>10} {:>8} {:>8}  {:>10} {:>8}  {:>6} {:>6}   op",
            "", "", "", "", "", "out-of-place", "", "", "in-place", "", "", ""
        );
        println!(
            "# {:>12} {:>10} {:>5} {:>5} {:>4}  {:>10} {:>8} {:>8}  {:>10} {:>8}  {:>6} {:>6}",
            "size",
            "count",
            "type",
            "redop",
            "root",
            "time",
            "algbw",
            "busbw",
            "time",
            "busbw",
            "#wrong",
            "%bound"
        );
        println!(
            "# {:>12} {:>10} {:>5} {:>5} {:>4}  {:>10} {:>8} {:>8}  {:>10} {:>8}  {:>6} {:>6}",
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "(us)", "(GB/s)", "", ""
        );
    }
    let mut rows = vec![];
    let mut done = 0;
    let mut probes: Vec<(usize, f64)> = vec![];
    for op in &ops {
        if op == "sendrecv" && n == 1 {
            continue;
        }
        for &bytes in &sizes {
            done += 1;
            if tty {
                let w = 30 * done / total.max(1);
                eprint!(
                    "\r[{}{}] {op} {bytes} B   ",
                    "#".repeat(w),
                    ".".repeat(30 - w)
                );
                let _ = std::io::stderr().flush();
            }
            let mut row = bench_one::<B>(&tpg, host.as_ref(), op, bytes, dtype, redop, args, kind)?;
            if let Some(t) = threads {
                let b = match probes.iter().find(|(s, _)| *s == row.bytes) {
                    Some((_, b)) => *b,
                    None => {
                        let b = copy_probe(host.as_ref(), row.bytes, t)?;
                        probes.push((row.bytes, b));
                        b
                    }
                };
                row.bound_gbps = Some(b);
            }
            if printer {
                if tty {
                    eprint!("\r{}\r", " ".repeat(60));
                }
                print_row(&row, args.json);
            }
            rows.push(row);
        }
    }
    if printer && !args.json {
        if args.no_check {
            // nothing here may read as a verdict on the results
            println!("# correctness: not checked (--no-check); timings only");
        } else {
            let wrong: i64 = rows.iter().filter_map(|r| r.wrong).sum();
            println!(
                "# Out of bounds values : {wrong} {}",
                if wrong == 0 { "OK" } else { "FAILED" }
            );
        }
        if threads.is_some() {
            println!(
                "# %bound: best busbw over a copy of the same bytes by every rank at once with {} thread(s) each",
                threads.unwrap_or(1)
            );
        }
    }
    state.destroy()?;
    Ok(rows)
}

/// The memory bound at `bytes`: every rank copies a buffer of that size with `threads` threads,
/// all at once (after a barrier); the median rate of five trials, slowest rank, GB/s.
fn copy_probe(host: &dyn HostGroup, bytes: usize, threads: usize) -> Result<f64> {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let reps = ((64usize << 20) / bytes.max(1)).clamp(1, 2000);
    let per = bytes.div_ceil(threads.clamp(1, 64)).max(1);
    let mut trials = vec![];
    for _ in 0..5 {
        host.barrier()?;
        let start = Instant::now();
        // Each thread copies its part `reps` times (threads started once per trial).
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || {
                    for _ in 0..reps {
                        d.copy_from_slice(c);
                        std::hint::black_box(&mut *d);
                    }
                });
            }
        });
        trials.push(start.elapsed().as_secs_f64() / reps as f64);
    }
    trials.sort_by(f64::total_cmp);
    let mine = trials[trials.len() / 2];
    let all: Vec<f64> = host.all_gather_obj(&mine)?;
    let slowest = all.iter().cloned().fold(0.0, f64::max);
    Ok(bytes as f64 / slowest.max(1e-12) / 1e9)
}

fn print_row(r: &Row, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let f = |x: Option<f64>, prec: usize| match x {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".to_string(),
    };
    let bound = r
        .bound_gbps
        .filter(|b| *b > 0.0 && r.bytes >= 1 << 20)
        .map(|b| 100.0 * r.best_busbw() / b);
    println!(
        "  {:>12} {:>10} {:>5} {:>5} {:>4}  {:>10} {:>8} {:>8}  {:>10} {:>8}  {:>6} {:>6}   {}",
        r.bytes,
        r.count,
        r.dtype,
        r.redop,
        r.root,
        f(r.time_us, 2),
        f(r.algbw, 3),
        f(r.busbw, 3),
        f(r.ip_time_us, 2),
        f(r.ip_busbw, 3),
        r.wrong.map_or("-".to_string(), |w| w.to_string()),
        f(bound, 0),
        r.op
    );
}

/// Runs the torch peer (gloo on the host, NCCL on GPUs) on the same ops, sizes, ranks and dtype,
/// and prints its figures beside ours with the ratios.
fn peer_torch(kind: BackendKind, ours: &[Row], timeout_s: f64) -> anyhow::Result<()> {
    use std::io::BufRead;
    let backend = match kind {
        BackendKind::Cpu | BackendKind::Host => "gloo",
        #[allow(unreachable_patterns)]
        _ => "nccl",
    };
    let py = std::env::var("DIST_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let tdtype = match ours.first().map(|r| r.dtype.as_str()).unwrap_or("f32") {
        "f16" => "float16",
        "bf16" => "bfloat16",
        "f64" => "float64",
        "i32" => "int32",
        "i64" => "int64",
        "u8" => "uint8",
        "i8" => "int8",
        _ => "float32",
    };
    let mut ops: Vec<&str> = vec![];
    let mut sizes: Vec<usize> = vec![];
    for r in ours {
        if !ops.contains(&r.op.as_str()) && r.op != "all_gatherv" && r.op != "reduce_scatterv" {
            ops.push(&r.op);
        }
        if !sizes.contains(&r.bytes) {
            sizes.push(r.bytes);
        }
    }
    let world = ours.first().map_or(1, |r| r.world);
    let script = std::env::temp_dir().join(format!("dist_bench_torch_{}.py", std::process::id()));
    std::fs::write(&script, include_str!("bench_torch.py"))?;
    println!("#");
    println!("# peer: torch.distributed {backend}, same ops, sizes, ranks ({world}) and dtype, run after the sweep");
    let child = std::process::Command::new(&py)
        .arg(&script)
        .args(["--backend", backend, "--world", &world.to_string()])
        .args(["--dtype", tdtype, "--ops", &ops.join(",")])
        .arg("--sizes")
        .arg(
            sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&script);
            println!("# peer torch: not run ({py}: {e})");
            return Ok(());
        }
    };
    // The peer is stopped at its deadline, whatever it is doing.
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        let limit = std::time::Duration::from_secs_f64(timeout_s.max(1.0));
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on our own child's pid; a stale pid is at worst an ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    let stderr = child.stderr.take();
    let err_tail = std::thread::spawn(move || {
        let mut last = String::new();
        if let Some(e) = stderr {
            for l in std::io::BufReader::new(e).lines().map_while(|l| l.ok()) {
                if !l.trim().is_empty() {
                    last = l;
                }
            }
        }
        last
    });
    println!(
        "# {:>16} {:>12} {:>12} {:>12} {:>9} {:>7}   op",
        "size(B)", "dist busbw", "torch busbw", "torch time", "ratio", "#wrong"
    );
    let mut any = false;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            any = true;
            let op = v["op"].as_str().unwrap_or("?");
            if let Some(why) = v["unsupported"].as_str() {
                println!("# {op}: torch {backend} lacks it ({why})");
                continue;
            }
            let bytes = v["bytes"].as_u64().unwrap_or(0) as usize;
            let theirs = v["busbw"].as_f64().unwrap_or(f64::NAN);
            let mine = ours
                .iter()
                .find(|r| r.op == op && r.bytes == bytes)
                .map(Row::best_busbw);
            println!(
                "  {:>16} {:>12} {:>12.3} {:>12.2} {:>9} {:>7}   {op}",
                bytes,
                mine.map_or("-".into(), |m| format!("{m:.3}")),
                theirs,
                v["time_us"].as_f64().unwrap_or(f64::NAN),
                mine.map_or("-".into(), |m| format!("{:.2}x", m / theirs)),
                v["wrong"].as_i64().unwrap_or(-1)
            );
            let _ = std::io::stdout().flush();
        }
    }
    let status = child.wait();
    let _ = done_tx.send(());
    let killed = killer.join().unwrap_or(false);
    let last = err_tail.join().unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    match status {
        _ if killed => println!("# peer torch: stopped after {timeout_s} s"),
        Ok(s) if s.success() => {}
        Ok(s) => println!(
            "# peer torch: {} ({py} exited {s}: {last})",
            if any { "incomplete" } else { "not run" }
        ),
        Err(e) => println!("# peer torch: {e}"),
    }
    Ok(())
}

/// Elements of `got` that differ from the oracle `want`: bit-exact for data movement and integer
/// reductions; for floating-point reductions within a relative tolerance (1e-5 for f32/f64, 2e-2
/// for f16/bf16), because libraries such as gloo and NCCL add ranks in other orders than the
/// oracle (the shared-memory backend is bit-exact; its own tests check that exactly).
fn count_wrong(want: &HostTensor, got: &HostTensor, reduction: bool) -> i64 {
    if want.dtype() != got.dtype() || want.shape() != got.shape() {
        return want.numel().max(1) as i64;
    }
    if reduction && want.dtype().is_float() {
        let tol = match want.dtype() {
            DType::F16 | DType::BF16 => 2e-2,
            _ => 1e-5,
        };
        if let (Ok(w), Ok(g)) = (
            dist_core::conformance::to_f64(want),
            dist_core::conformance::to_f64(got),
        ) {
            return w
                .iter()
                .zip(&g)
                .filter(|(a, b)| {
                    let d = (*a - *b).abs();
                    d.is_nan() || d > tol * (1.0 + a.abs())
                })
                .count() as i64;
        }
    }
    let es = want.dtype().size().max(1);
    want.as_bytes()
        .chunks(es)
        .zip(got.as_bytes().chunks(es))
        .filter(|(a, b)| a != b)
        .count() as i64
}

/// Uneven per-rank lengths summing to `total` (rank r gets a share ∝ r+1), for the v-variants.
fn uneven(total: usize, n: usize) -> Vec<usize> {
    let weight: usize = (1..=n).sum();
    let mut v: Vec<usize> = (0..n).map(|r| total * (r + 1) / weight).collect();
    let s: usize = v.iter().sum();
    v[n - 1] += total - s;
    v
}

fn seed(op: &str, bytes: usize, rank: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in op.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x1000_0000_01b3);
    }
    h ^ (bytes as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rank as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The inputs and outputs of one op at one size, and how to call it both ways.
struct Case<B: Backend> {
    input: B::Tensor,
    /// The out-of-place output (absent for ops without that form, and on gather's non-roots).
    out: Option<B::Tensor>,
    /// The in-place buffer of all_reduce / broadcast.
    inplace: Option<B::Tensor>,
}

#[allow(clippy::too_many_arguments)]
fn bench_one<B: Backend>(
    g: &GroupCoordinator<B>,
    host: &dyn HostGroup,
    op: &str,
    bytes: usize,
    dtype: DType,
    redop: ReduceOp,
    args: &BenchArgs,
    kind: BackendKind,
) -> Result<Row> {
    let n = g.world_size();
    let r = g.rank_in_group();
    let es = dtype.size();
    // Elements of the larger buffer, rounded down to a multiple of the group size.
    let count = ((bytes / es) / n * n).max(n);
    let per = count / n;
    let dev = g.device();
    let sizes = uneven(count, n);
    let shape_of = |q: usize| -> Vec<usize> {
        match op {
            "all_gather" | "gather" => vec![per],
            "all_gatherv" => vec![sizes[q]],
            _ => vec![count],
        }
    };
    let out_shape: Option<Vec<usize>> = match op {
        "all_reduce" | "all_gather" | "all_gatherv" | "all_to_all_v" | "sendrecv" => {
            Some(vec![count])
        }
        "gather" => (r == 0).then(|| vec![count]),
        "reduce_scatter" => Some(vec![per]),
        "reduce_scatterv" => Some(vec![sizes[r]]),
        _ => None,
    };
    let reduction = matches!(op, "all_reduce" | "reduce_scatter" | "reduce_scatterv");
    let gen = |rank: usize| HostTensor::random(dtype, &shape_of(rank), seed(op, bytes, rank));
    let host_in = gen(r);
    let up = |h: &HostTensor| B::from_host(h, dev);
    let zeros = |shape: &[usize]| up(&HostTensor::zeros(dtype, shape));
    let mut case = Case::<B> {
        input: up(&host_in)?,
        out: out_shape.as_deref().map(zeros).transpose()?,
        inplace: matches!(op, "all_reduce" | "broadcast")
            .then(|| up(&host_in))
            .transpose()?,
    };
    let counts = vec![per; n];
    let root = 0usize;
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let oop = |c: &mut Case<B>| -> Result<()> {
        let iv: View<'_, B> = Comm::<B>::view(&c.input);
        let mut ov: Option<ViewMut<'_, B>> = c.out.as_mut().map(Comm::<B>::view_mut);
        match (op, ov.as_mut()) {
            ("all_reduce", Some(o)) => g.all_reduce_into_op(&iv, o, redop),
            ("all_gather", Some(o)) => g.all_gather_into(&iv, o, 0),
            ("reduce_scatter", Some(o)) => g.reduce_scatter_into(&iv, o, 0),
            ("all_gatherv", Some(o)) => g.all_gatherv_into(&iv, o, 0, &sizes),
            ("reduce_scatterv", Some(o)) => g.reduce_scatterv_into(&iv, o, 0, &sizes),
            ("all_to_all_v", Some(o)) => g.all_to_all_v_into(&iv, &counts, o, &counts),
            ("gather", o) => g.gather_into(&iv, o, root, 0),
            ("sendrecv", Some(o)) => {
                if r % 2 == 0 {
                    g.send_view(&iv, Some(next))?;
                    g.recv_into(o, Some(prev))
                } else {
                    g.recv_into(o, Some(prev))?;
                    g.send_view(&iv, Some(next))
                }
            }
            _ => Ok(()),
        }
    };
    let inplace = |c: &mut Case<B>| -> Result<()> {
        let Some(t) = c.inplace.as_mut() else {
            return Ok(());
        };
        let mut v = Comm::<B>::view_mut(t);
        match op {
            "all_reduce" => g.all_reduce_in_place_op(&mut v, redop),
            "broadcast" => g.broadcast_in_place(&mut v, root),
            _ => Ok(()),
        }
    };
    let has_oop = case.out.is_some() || op == "gather";
    // Check the first call of each form against the oracle.
    let mut wrong = None;
    if !args.no_check {
        let all: Vec<HostTensor> = (0..n).map(gen).collect();
        let want: Option<HostTensor> = match op {
            "all_reduce" => Some(reference::all_reduce(&all, redop)?),
            "all_gather" => Some(reference::all_gather(&all, 0)?),
            "reduce_scatter" => {
                Some(reference::reduce_scatter(&all, 0, ReduceOp::Sum)?.swap_remove(r))
            }
            "broadcast" => Some(all[root].clone()),
            "gather" => (r == root)
                .then(|| reference::all_gather(&all, 0))
                .transpose()?,
            "all_gatherv" => Some(reference::all_gatherv(&all, 0, &sizes)?),
            "reduce_scatterv" => {
                Some(reference::reduce_scatterv(&all, 0, &sizes, ReduceOp::Sum)?.swap_remove(r))
            }
            "all_to_all_v" => {
                Some(reference::all_to_all_v(&all, &vec![counts.clone(); n])?.swap_remove(r))
            }
            "sendrecv" => Some(all[prev].clone()),
            _ => None,
        };
        let mut mine = 0i64;
        if has_oop {
            oop(&mut case)?;
            let got = case.out.as_ref().map(B::to_host).transpose()?;
            mine += match (&want, &got) {
                (Some(w), Some(g)) => count_wrong(w, g, reduction),
                (None, None) => 0,
                (Some(w), None) => w.numel() as i64,
                (None, Some(_)) => 1,
            };
        }
        if case.inplace.is_some() {
            inplace(&mut case)?;
            let got = case.inplace.as_ref().map(B::to_host).transpose()?;
            mine += match (&want, &got) {
                (Some(w), Some(g)) => count_wrong(w, g, reduction),
                _ => 1,
            };
        }
        wrong = Some(host.all_gather_obj(&mine)?.iter().sum());
    }
    // Time on zeros in place (a buffer reduced again and again would overflow).
    if op == "all_reduce" {
        case.inplace = Some(zeros(&[count])?);
    }
    let iters = args.iters.unwrap_or_else(|| default_iters(bytes)).max(1);
    let sync = || g.device_communicator().map_or(Ok(()), |c| c.synchronize());
    let time = |f: &dyn Fn(&mut Case<B>) -> Result<()>, c: &mut Case<B>| -> Result<f64> {
        for _ in 0..args.warmup {
            f(c)?;
        }
        sync()?;
        host.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            f(c)?;
        }
        sync()?;
        let mine = t0.elapsed().as_secs_f64() / iters as f64;
        let times: Vec<f64> = host.all_gather_obj(&mine)?;
        Ok(times.iter().cloned().fold(0.0, f64::max))
    };
    let t_oop = if has_oop {
        Some(time(&oop, &mut case)?)
    } else {
        None
    };
    let t_ip = if case.inplace.is_some() {
        Some(time(&inplace, &mut case)?)
    } else {
        None
    };
    let nbytes = (count * es) as f64;
    let bw = |t: f64| nbytes / t / 1e9;
    let algbw = t_oop.map(bw);
    Ok(Row {
        op: op.to_string(),
        backend: kind.name().to_string(),
        world: n,
        bytes: count * es,
        count,
        dtype: dtype.name().to_string(),
        redop: match op {
            "all_reduce" => redop.name().to_string(),
            "reduce_scatter" | "reduce_scatterv" => "sum".into(),
            _ => "none".into(),
        },
        root: if matches!(op, "broadcast" | "gather") {
            root as i64
        } else {
            -1
        },
        time_us: t_oop.map(|t| t * 1e6),
        algbw,
        busbw: algbw.map(|a| a * bus_factor(op, n)),
        ip_time_us: t_ip.map(|t| t * 1e6),
        ip_busbw: t_ip.map(|t| bw(t) * bus_factor(op, n)),
        wrong,
        bound_gbps: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_sizes("1K:16K", 4).unwrap(), vec![1024, 4096, 16384]);
        assert_eq!(parse_sizes("8,1K", 2).unwrap(), vec![8, 1024]);
        assert!(parse_sizes("1K:x", 2).is_err());
        assert!(parse_sizes("4K:1K", 2).is_err());
    }

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(bus_factor("all_reduce", 4), 1.5);
        assert_eq!(bus_factor("all_gather", 4), 0.75);
        assert_eq!(bus_factor("broadcast", 4), 1.0);
    }

    #[test]
    fn uneven_sums() {
        for (t, n) in [(100, 4), (7, 3), (4, 4)] {
            let v = uneven(t, n);
            assert_eq!(v.iter().sum::<usize>(), t);
            assert_eq!(v.len(), n);
        }
    }
}
