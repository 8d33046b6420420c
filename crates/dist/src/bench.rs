//! `dist bench`: every collective over a size sweep, checked against the oracles, timed, and
//! printed with nccl-tests' columns (size, count, type, redop, root, time, algbw, busbw, #wrong).
//!
//! Outside a launcher it starts its own ranks (`--world`, default 4) under `dist run` and runs as
//! one of them; rank 0 prints. Bus bandwidth follows nccl-tests: all-reduce `algbw·2(n−1)/n`,
//! all-gather / reduce-scatter / gather and their v-variants `algbw·(n−1)/n`, broadcast and
//! send/recv `algbw`. Sizes are nccl-tests' too: the larger of the input and output buffers.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use dist_core::{
    reference, Backend, DType, DeviceCommunicator, Error, HostGroup, HostGroupExt, HostTensor,
    ParallelConfig, ReduceOp, Result,
};
use serde::{Deserialize, Serialize};

use crate::{BackendKind, DistEnv, InitOptions};

/// The collectives `dist bench` knows.
pub const ALL_OPS: [&str; 8] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "gather",
    "all_gatherv",
    "reduce_scatterv",
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
    /// Reduction of all_reduce / reduce_scatter(v).
    #[arg(long, default_value = "sum")]
    pub redop: String,
    /// Timed iterations per size (default: from 1,000 at small sizes down to 5 at 64 MiB).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed iterations before timing (the first one is checked).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw busbw against size per op into FILE (.svg, or .png).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
    /// Skip the oracle check (timings only). The check counts, in `#wrong`, elements that differ
    /// from the oracle: exactly for data movement, within 1e-5 relative (2e-2 for f16/bf16) for
    /// floating-point reductions.
    #[arg(long)]
    pub no_check: bool,
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
    /// Time per call, µs (the slowest rank's mean).
    pub time_us: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw: f64,
    /// Bus bandwidth, GB/s.
    pub busbw: f64,
    /// Elements that differ from the oracle, over all ranks (-1: not checked).
    pub wrong: i64,
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
    };
    let wrong: i64 = rows.iter().map(|r| r.wrong.max(0)).sum();
    if env.world().rank == 0 {
        if let Some(p) = &args.plot {
            let png = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
            let bytes = if png {
                crate::plot::png(&rows)
            } else {
                crate::plot::svg(&rows).into_bytes()
            };
            std::fs::write(p, bytes)?;
            eprintln!("plot written to {}", p.display());
        }
    }
    env.world_group().barrier()?;
    Ok(if wrong > 0 { 1 } else { 0 })
}

fn launch(args: &BenchArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.world >= 1, "--world must be at least 1");
    let exe = std::env::current_exe()?;
    let mut program: Vec<std::ffi::OsString> = vec![exe.into_os_string()];
    program.extend(std::env::args_os().skip(1));
    let mut opts = dist_store::launch::LaunchOptions::new(args.world, program);
    opts.no_prefix = true;
    opts.timeout = Some(args.job_timeout);
    let code = dist_store::launch::run(&opts)?;
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
    // A one-rank group has no communicator (as in vLLM); the bench makes one anyway so the
    // backend's own path is measured (at world 1 that is per-call overhead).
    let own;
    let comm = match tpg.device_communicator() {
        Some(c) => Some(c),
        None => {
            own = B::create_communicator(&dist_core::CommunicatorContext {
                group_name: format!("{}/bench", tpg.unique_name()),
                ranks: tpg.ranks().to_vec(),
                rank_in_group: tpg.rank_in_group(),
                local_rank: env.world().local_rank,
                host_group: host.clone(),
                store: env.store().clone(),
                timeout: env.world().timeout,
            })?;
            Some(&own)
        }
    };
    let total = ops.len() * sizes.len();
    let tty = printer && !args.json && std::io::stderr().is_terminal();
    if printer && !args.json {
        println!(
            "# dist bench: backend {} | world {world} | tp {tp} pp {} | dtype {dtype} | {} ranks per group",
            kind.name(),
            args.pp,
            n
        );
        println!("#");
        println!(
            "# {:>16} {:>12} {:>6} {:>6} {:>5} {:>11} {:>9} {:>9} {:>7}   op",
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong"
        );
        println!(
            "# {:>16} {:>12} {:>6} {:>6} {:>5} {:>11} {:>9} {:>9} {:>7}",
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", ""
        );
    }
    let mut rows = vec![];
    let mut done = 0;
    for op in &ops {
        let Some(comm) = comm else {
            if printer {
                println!("# {op}: skipped, the TP group has one rank");
            }
            continue;
        };
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
            let row = bench_one::<B>(comm, host.as_ref(), op, bytes, dtype, redop, args, kind)?;
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
        let wrong: i64 = rows.iter().map(|r| r.wrong.max(0)).sum();
        println!(
            "# Out of bounds values : {wrong} {}",
            if wrong == 0 { "OK" } else { "FAILED" }
        );
    }
    state.destroy()?;
    Ok(rows)
}

fn print_row(r: &Row, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        println!(
            "  {:>16} {:>12} {:>6} {:>6} {:>5} {:>11.2} {:>9.3} {:>9.3} {:>7}   {}",
            r.bytes,
            r.count,
            r.dtype,
            r.redop,
            r.root,
            r.time_us,
            r.algbw,
            r.busbw,
            if r.wrong < 0 {
                "N/A".to_string()
            } else {
                r.wrong.to_string()
            },
            r.op
        );
    }
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

#[allow(clippy::too_many_arguments)]
fn bench_one<B: Backend>(
    comm: &B::Communicator,
    host: &dyn HostGroup,
    op: &str,
    bytes: usize,
    dtype: DType,
    redop: ReduceOp,
    args: &BenchArgs,
    kind: BackendKind,
) -> Result<Row> {
    let n = comm.world_size();
    let r = comm.rank();
    let es = dtype.size();
    // Elements of the larger buffer, rounded down to a multiple of the group size.
    let count = ((bytes / es) / n * n).max(n);
    let per = count / n;
    let dev = comm.device();
    let sizes = uneven(count, n);
    let input_shape: Vec<usize> = match op {
        "all_gather" | "gather" => vec![per],
        "all_gatherv" => vec![sizes[r]],
        _ => vec![count],
    };
    let gen =
        |rank: usize, shape: &[usize]| HostTensor::random(dtype, shape, seed(op, bytes, rank));
    let host_in = gen(r, &input_shape);
    let input = B::from_host(&host_in, dev)?;
    let root = 0usize;
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let mut scratch = comm.empty(dtype, &input_shape)?;
    let mut run_once = |check: bool| -> Result<Option<HostTensor>> {
        let out: Option<B::Tensor> = match op {
            "all_reduce" => Some(comm.all_reduce(&input, redop)?),
            "all_gather" => Some(comm.all_gather(&input, 0)?),
            "reduce_scatter" => Some(comm.reduce_scatter(&input, 0, redop)?),
            "broadcast" => {
                if r == root && check {
                    scratch = B::from_host(&host_in, dev)?;
                }
                comm.broadcast(
                    &mut dist_core::communicator::Comm::<B>::view_mut(&mut scratch),
                    root,
                )?;
                None
            }
            "gather" => comm.gather(&input, root, 0)?,
            "all_gatherv" => Some(comm.all_gatherv(&input, 0, &sizes)?),
            "reduce_scatterv" => Some(comm.reduce_scatterv(&input, 0, &sizes, redop)?),
            "sendrecv" => {
                if r % 2 == 0 {
                    comm.send(&dist_core::communicator::Comm::<B>::view(&input), next)?;
                    comm.recv(
                        &mut dist_core::communicator::Comm::<B>::view_mut(&mut scratch),
                        prev,
                    )?;
                } else {
                    comm.recv(
                        &mut dist_core::communicator::Comm::<B>::view_mut(&mut scratch),
                        prev,
                    )?;
                    comm.send(&dist_core::communicator::Comm::<B>::view(&input), next)?;
                }
                None
            }
            other => return Err(Error::invalid(format!("unknown op {other}"))),
        };
        if !check {
            return Ok(None);
        }
        let got = match out {
            Some(t) => Some(B::to_host(&t)?),
            None if op == "broadcast" || op == "sendrecv" => Some(B::to_host(&scratch)?),
            None => None,
        };
        Ok(got)
    };
    // Check (first warm-up call).
    let mut wrong: i64 = -1;
    let first = run_once(!args.no_check)?;
    if !args.no_check {
        let all: Vec<HostTensor> = (0..n)
            .map(|q| {
                let shape = match op {
                    "all_gather" | "gather" => vec![per],
                    "all_gatherv" => vec![sizes[q]],
                    _ => vec![count],
                };
                gen(q, &shape)
            })
            .collect();
        let want: Option<HostTensor> = match op {
            "all_reduce" => Some(reference::all_reduce(&all, redop)?),
            "all_gather" => Some(reference::all_gather(&all, 0)?),
            "reduce_scatter" => Some(reference::reduce_scatter(&all, 0, redop)?.swap_remove(r)),
            "broadcast" => Some(all[root].clone()),
            "gather" => (r == root)
                .then(|| reference::all_gather(&all, 0))
                .transpose()?,
            "all_gatherv" => Some(reference::all_gatherv(&all, 0, &sizes)?),
            "reduce_scatterv" => {
                Some(reference::reduce_scatterv(&all, 0, &sizes, redop)?.swap_remove(r))
            }
            "sendrecv" => Some(all[prev].clone()),
            _ => None,
        };
        let mine = match (&want, &first) {
            (Some(w), Some(g)) => count_wrong(
                w,
                g,
                matches!(op, "all_reduce" | "reduce_scatter" | "reduce_scatterv"),
            ),
            (None, None) => 0,
            (Some(w), None) => w.numel() as i64,
            (None, Some(_)) => 1,
        };
        wrong = host.all_gather_obj(&mine)?.iter().sum();
    }
    for _ in 1..args.warmup {
        run_once(false)?;
    }
    let iters = args.iters.unwrap_or_else(|| default_iters(bytes)).max(1);
    comm.synchronize()?;
    host.barrier()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        run_once(false)?;
    }
    comm.synchronize()?;
    let mine = t0.elapsed().as_secs_f64() / iters as f64;
    let times: Vec<f64> = host.all_gather_obj(&mine)?;
    let t = times.iter().cloned().fold(0.0, f64::max);
    let algbw = (count * es) as f64 / t / 1e9;
    Ok(Row {
        op: op.to_string(),
        backend: kind.name().to_string(),
        world: n,
        bytes: count * es,
        count,
        dtype: dtype.name().to_string(),
        redop: if matches!(op, "all_reduce" | "reduce_scatter" | "reduce_scatterv") {
            redop.name().to_string()
        } else {
            "none".into()
        },
        root: if matches!(op, "broadcast" | "gather") {
            root as i64
        } else {
            -1
        },
        time_us: t * 1e6,
        algbw,
        busbw: algbw * bus_factor(op, n),
        wrong,
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
