//! The all-reduce benchmark of the GPU backends (`dist-cuda`'s `cuda_bench`, `dist-rocm`'s
//! `rocm_bench`), written once over any `GpuRuntime`: event-timed on the communicator's stream,
//! in the table format of `ci/device/cuda_bench_torch.py` so the tables sit side by side.
//! Each backend's example includes this file with `#[path]`.

#![allow(dead_code)]

use std::time::Instant;

use dist_core::{DType, DeviceCommunicator, Error, ReduceOp, Result};
use dist_nccl::{GpuGraph, GpuRuntime, NcclCommunicator};

/// How each call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `all_reduce_in_place` of a backend tensor (what torch's `dist.all_reduce(t)` does).
    InPlace,
    /// `all_reduce` into a new tensor, dropped after the call (the allocation cache reuses it).
    OutOfPlace,
    /// `GRAPH_CALLS` out-of-place calls captured in one graph, timed per replayed call.
    Graph,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "in-place" => Ok(Mode::InPlace),
            "out-of-place" => Ok(Mode::OutOfPlace),
            "graph" => Ok(Mode::Graph),
            m => Err(format!("unknown --mode {m}")),
        }
    }
}

/// Calls captured per graph in [`Mode::Graph`].
pub const GRAPH_CALLS: usize = 10;

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Message size.
    pub bytes: usize,
    /// Timed calls.
    pub iters: usize,
    /// Device time per call (event time / calls).
    pub gpu_us: f64,
    /// Host time to enqueue one call.
    pub host_us: f64,
    /// bytes / device time.
    pub algbw_gbs: f64,
    /// algbw · 2(n−1)/n (nccl-tests' bus bandwidth; 0 at one rank).
    pub busbw_gbs: f64,
}

/// Message sizes 8 B, 32 B, … (×4) up to `max_bytes`.
pub fn sizes(max_bytes: usize) -> Vec<usize> {
    std::iter::successors(Some(8usize), |b| b.checked_mul(4))
        .take_while(|b| *b <= max_bytes)
        .collect()
}

/// Calls per size: about 2 GB of traffic, between 20 and 200.
pub fn iters_for(bytes: usize) -> usize {
    (2_000_000_000 / bytes.max(1)).clamp(20, 200)
}

/// What a benchmark program starts from: the sizes and modes asked for, the rank's
/// environment and the job's context.
pub struct Start {
    pub max_bytes: usize,
    pub modes: Vec<String>,
    pub env: dist_store::RankEnv,
    pub ctx: dist_core::CommunicatorContext,
}

/// `--worlds` prints the world sizes and exits; else `--max-bytes N` (default 512 MiB) and
/// `--mode M` (any number of times; default `in-place`), under torchrun's environment.
pub fn start() -> std::result::Result<Start, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1");
        std::process::exit(0);
    }
    let (mut max_bytes, mut modes) = (512 << 20, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--max-bytes" => max_bytes = it.next().ok_or("--max-bytes needs a value")?.parse()?,
            "--mode" => modes.push(it.next().ok_or("--mode needs a value")?.clone()),
            _ => {}
        }
    }
    if modes.is_empty() {
        modes.push("in-place".into());
    }
    let env = dist_store::RankEnv::from_env()?;
    let ctx = env.job_context("bench", std::time::Duration::from_secs(60))?;
    Ok(Start {
        max_bytes,
        modes,
        env,
        ctx,
    })
}

/// Times `iters` rounds of `call` (each `calls` collectives) between two events on the
/// communicator's stream, after 5 warm-up rounds; the row of `bytes`.
pub fn time<R: GpuRuntime>(
    comm: &NcclCommunicator<R>,
    bytes: usize,
    iters: usize,
    calls: usize,
    mut call: impl FnMut() -> Result<()>,
) -> Result<Row> {
    let dev = comm.context();
    let (e0, e1) = (dev.new_event(true)?, dev.new_event(true)?);
    for _ in 0..5 {
        call()?;
    }
    comm.synchronize()?;
    let s = comm.stream();
    let h0 = Instant::now();
    // SAFETY: the communicator's stream, alive while it is; bound by synchronize.
    unsafe { dev.record(&e0, s) }?;
    for _ in 0..iters {
        call()?;
    }
    dev.bind()?;
    // SAFETY: as above.
    unsafe { dev.record(&e1, s) }?;
    let host = h0.elapsed();
    comm.synchronize()?;
    let ms = dev.elapsed_ms(&e0, &e1)?;
    let n = iters * calls;
    let gpu_us = ms as f64 * 1000.0 / n as f64;
    if !gpu_us.is_finite() || gpu_us <= 0.0 {
        return Err(Error::protocol(format!(
            "bench: event time {ms} ms for {n} calls"
        )));
    }
    let world = comm.world_size() as f64;
    let algbw = bytes as f64 / (gpu_us * 1e-6) / 1e9;
    Ok(Row {
        bytes,
        iters: n,
        gpu_us,
        host_us: host.as_secs_f64() * 1e6 / n as f64,
        algbw_gbs: algbw,
        busbw_gbs: algbw * 2.0 * (world - 1.0) / world,
    })
}

/// Times fp32 sum all-reduces of each size on the backend's own tensors.
pub fn sweep<R: GpuRuntime>(
    comm: &NcclCommunicator<R>,
    sizes: &[usize],
    mode: Mode,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        dist_core::ensure_arg!(
            bytes % 4 == 0,
            "bench size {bytes} is not a multiple of 4 (fp32)"
        );
        let mut t = comm.empty(DType::F32, &[bytes / 4])?;
        let iters = iters_for(bytes);
        let row = match mode {
            Mode::InPlace => time(comm, bytes, iters, 1, || {
                comm.all_reduce_in_place(&mut t.view_mut(), ReduceOp::Sum)
            })?,
            Mode::OutOfPlace => time(comm, bytes, iters, 1, || {
                comm.all_reduce(&t, ReduceOp::Sum).map(drop)
            })?,
            Mode::Graph => {
                for _ in 0..3 {
                    drop(comm.all_reduce(&t, ReduceOp::Sum)?);
                }
                comm.synchronize()?;
                comm.begin_capture()?;
                let g = GpuGraph::capture(comm.context(), || {
                    (0..GRAPH_CALLS)
                        .map(|_| comm.all_reduce(&t, ReduceOp::Sum))
                        .collect::<Result<Vec<_>>>()
                });
                comm.end_capture()?;
                let (g, _outs) = g?;
                time(
                    comm,
                    bytes,
                    iters.div_ceil(GRAPH_CALLS),
                    GRAPH_CALLS,
                    || g.replay(),
                )?
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// Prints `title`, the header (the columns of `ci/device/cuda_bench_torch.py`) and the rows.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("# {title}");
    println!(
        "{:>12} {:>10} {:>10} {:>10} {:>10}",
        "bytes", "gpu_us", "host_us", "algbw_GBs", "busbw_GBs"
    );
    for r in rows {
        println!(
            "{:>12} {:>10.2} {:>10.2} {:>10.3} {:>10.3}",
            r.bytes, r.gpu_us, r.host_us, r.algbw_gbs, r.busbw_gbs
        );
    }
}
