//! Device test of dist-cuda, one process per rank (torchrun's environment).
//!
//! - One GPU per rank (world 1 on a machine with one GPU): the checks every GPU backend shares
//!   (`dist-nccl/examples/common/checks.rs`: dist-core's conformance suite, graph replay), then an
//!   engine's cudarc memory on the engine's stream — with the communicator on its own stream
//!   (fenced by events) and on the engine's (`engine::use_stream`), in place and through the
//!   re-layout, a CUDA graph captured on the engine's stream and replayed on new inputs, and a
//!   slice of a non-primary context refused.
//! - World 2, 4, 6, 8 on one GPU (processes sharing it through CUDA IPC; NCCL is off since it
//!   refuses two ranks on one GPU): `create_shared_buffer`-style buffer sharing, then the
//!   custom all-reduce eager and graph paths, one-shot and two-shot, fp32/fp16/bf16, 16 B to
//!   8 MiB, against the oracle; inputs that do not qualify are refused; the same on an
//!   engine's cudarc memory, in place and not, and captured in a graph on the engine's stream.
//! - `--dead-peer`: the last rank exits after set-up; the others must get a `Timeout` naming it.
//!
//! Exits 0 when every check passed, 77 without a CUDA device. `--worlds` prints the world sizes.

#[path = "../../dist-nccl/examples/common/checks.rs"]
mod checks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use checks::{inputs, Checks};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use dist_core::half::bf16;
use dist_core::{
    reference, DType, DeviceCommunicator, Element, Error, HostTensor, ReduceOp, Result, Tensor,
};
use dist_cuda::custom_ar::Algo;
use dist_cuda::{engine, Communicator, CudaGraph, CudaTensor, DeviceContext, GpuRuntime, Options};

const SIZES: [usize; 7] = [
    16,
    1 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    (8 << 20) - 16,
];
const GRAPH_SIZES: [usize; 3] = [16, 64 << 10, 2 << 20];

fn drv(e: cudarc::driver::DriverError) -> Error {
    dist_cuda::driver::cuda_err("cudarc", e)
}

/// The engine's side: a cudarc context (the device's primary one) and a stream of its own.
struct Engine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Engine {
    fn new(ordinal: usize, tracking: bool) -> Result<Engine> {
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        if !tracking {
            // SAFETY: this engine orders its one stream itself (and captures graphs on it).
            unsafe { ctx.disable_event_tracking() };
        }
        let stream = ctx.new_stream().map_err(drv)?;
        Ok(Engine { ctx, stream })
    }
    fn upload<T: Element + DeviceRepr>(&self, t: &HostTensor) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(t.as_slice::<T>()?).map_err(drv)
    }
    fn write<T: Element + DeviceRepr>(&self, t: &HostTensor, s: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memcpy_htod(t.as_slice::<T>()?, s).map_err(drv)
    }
    fn download<T: Element + DeviceRepr>(
        &self,
        s: &CudaSlice<T>,
        shape: &[usize],
    ) -> Result<HostTensor> {
        let v = self.stream.clone_dtoh(s).map_err(drv)?;
        HostTensor::from_vec(shape, v)
    }
}

/// An engine's cudarc memory through the collectives at world 1 (one GPU per rank, NCCL).
fn engine_nccl(comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let (w, me) = (comm.world_size(), comm.rank());
    let ord = comm.context().ordinal();
    let eng = Engine::new(ord, true)?;
    // The communicator on its own stream, the engine's views on the engine's: fenced by events.
    for round in 0..2 {
        if round == 1 {
            engine::use_stream(comm, &eng.stream)?;
        }
        let how = ["fenced", "on the engine's stream"][round as usize];
        let xs = checks::rank_inputs(DType::F32, |_| vec![4, 6, 5], 70 + round, w);
        let mut x = eng.upload::<f32>(&xs[me])?;
        let r = comm.all_reduce_in_place(
            &mut engine::view_mut(&mut x, &eng.stream)?.reshape(&[4, 6, 5])?,
            ReduceOp::Sum,
        );
        ck.pass(&format!("engine in-place all_reduce ({how})"), r);
        let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
        ck.close(
            || format!("engine in-place all_reduce ({how})"),
            eng.download(&x, &[4, 6, 5]),
            &want,
            w,
        );
        // all_gather(dim 1): NCCL into a temporary on the op's stream, re-laid out into the
        // engine's output, the temporary parked until the engine's stream has run.
        let mut y = eng.stream.alloc_zeros::<f32>(4 * 6 * w * 5).map_err(drv)?;
        let shape = [4, 6 * w, 5];
        let r = comm.all_gather_into(
            &engine::view(&x, &eng.stream)?.reshape(&[4, 6, 5])?,
            &mut engine::view_mut(&mut y, &eng.stream)?.reshape(&shape)?,
            1,
        );
        ck.pass(&format!("engine all_gather_into dim 1 ({how})"), r);
        let got = eng.download(&x, &[4, 6, 5]);
        ck.eq(|| format!("engine input unchanged ({how})"), got, &want);
        let want_ag = reference::all_gather(&vec![want.clone(); w], 1)?;
        ck.eq(
            || format!("engine all_gather_into dim 1 ({how})"),
            eng.download(&y, &shape),
            &want_ag,
        );
    }
    comm.reset_stream()?;
    // A slice of another context of the same device is refused, not used.
    let other = CudaContext::new_non_primary(ord, 0).map_err(drv)?;
    let os = other.new_stream().map_err(drv)?;
    let z = os.alloc_zeros::<f32>(16).map_err(drv)?;
    let refused = |s| engine::view(&z, s).map(|v| v.nbytes());
    ck.err("a slice of a non-primary context", refused(&os));
    ck.err(
        "another context's slice on the engine's stream",
        refused(&eng.stream),
    );
    drop((z, os, other));
    eng.ctx.bind_to_thread().map_err(drv)?;
    engine_graph(comm, ck, 90)
}

/// A CUDA graph captured on the engine's stream around an in-place all-reduce of the engine's
/// memory (the custom all-reduce's copy-in path on several ranks, NCCL at world 1), replayed on
/// new inputs; fp32 and bf16.
fn engine_graph(comm: &Communicator, ck: &mut Checks, seed: u64) -> Result<()> {
    let eng = Engine::new(comm.context().ordinal(), false)?;
    engine::use_stream(comm, &eng.stream)?;
    graph_on_engine::<f32>(comm, ck, &eng, seed)?;
    graph_on_engine::<bf16>(comm, ck, &eng, seed + 10)?;
    comm.reset_stream()
}

fn graph_on_engine<T: Element + DeviceRepr + ValidAsZeroBits>(
    comm: &Communicator,
    ck: &mut Checks,
    eng: &Engine,
    seed: u64,
) -> Result<()> {
    let (w, me, n) = (comm.world_size(), comm.rank(), 8192);
    let mut x = eng.stream.alloc_zeros::<T>(n).map_err(drv)?;
    eng.stream.synchronize().map_err(drv)?;
    comm.begin_capture()?;
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
    eng.stream.begin_capture(mode).map_err(drv)?;
    let r = engine::view_mut(&mut x, &eng.stream)
        .and_then(|mut v| comm.all_reduce_in_place(&mut v, ReduceOp::Sum));
    let g = eng
        .stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(drv);
    comm.end_capture()?;
    r?;
    let g = g?.ok_or_else(|| Error::protocol("the engine's capture recorded nothing"))?;
    for rep in 0..3 {
        let xs = inputs(T::DTYPE, n, seed + rep, w);
        eng.write(&xs[me], &mut x)?;
        g.launch().map_err(drv)?;
        let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
        let what = || format!("engine-stream graph replay {rep} {}", T::DTYPE);
        ck.close(what, eng.download(&x, &[n]), &want, w);
    }
    Ok(())
}

/// The custom all-reduce (several processes on one GPU): buffer sharing, every algorithm, dtype
/// and size, eager and graph, against the oracle.
fn custom_ar(comm: &Communicator, ck: &mut Checks) -> Result<()> {
    if !comm.has_custom_ar() {
        ck.fail("custom all-reduce not created".into());
        return Ok(());
    }
    let (w, me) = (comm.world_size(), comm.rank());
    let dev = comm.context().clone();
    let hg = comm.host_group().clone();
    let reg0 = comm.with_custom_ar(|ca| ca.registered()).unwrap_or(0);

    // create_shared_buffer: each rank writes its pattern into its own buffer, every rank reads
    // every peer's through its mapping.
    let (local, ptrs) = comm
        .with_custom_ar(|ca| {
            (
                ca.shared_buffers().1.local(),
                ca.shared_buffers().1.ptrs().to_vec(),
            )
        })
        .unwrap_or_default();
    dev.bind()?;
    // SAFETY: the registered buffer holds max_size >= 4096 bytes; waited for below.
    unsafe { dev.copy_h2d(local, &vec![me as u8 + 1; 4096], dev.stream()) }?;
    dev.synchronize()?;
    hg.barrier()?;
    for (r, p) in ptrs.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        dev.bind()?;
        // SAFETY: rank r's buffer, mapped here, holds max_size >= 4096 bytes; waited for below.
        unsafe { dev.copy_d2h(&mut got, *p, dev.stream()) }?;
        dev.synchronize()?;
        if got.iter().all(|b| *b == r as u8 + 1) {
            ck.ok += 1
        } else {
            ck.fail(format!("shared buffer of rank {r} read by rank {me}"))
        }
    }
    hg.barrier()?;

    let mut case = 0u64;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for algo in [Algo::OneShot, Algo::TwoShot] {
            comm.with_custom_ar(|ca| ca.force_algo(Some(algo)));
            for bytes in SIZES {
                case += 1;
                let xs = inputs(dtype, bytes / dtype.size(), case, w);
                let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
                let dx = CudaTensor::from_host(&xs[me], dev.ordinal())?;
                let got = comm
                    .all_reduce(&dx, ReduceOp::Sum)
                    .and_then(|t| t.to_host());
                ck.close(
                    || format!("eager {algo:?} {dtype} {bytes} B"),
                    got,
                    &want,
                    w,
                );
                let mut t = dx.clone();
                let r = comm.all_reduce_in_place(&mut t.view_mut(), ReduceOp::Sum);
                ck.pass(&format!("eager in place {algo:?} {dtype} {bytes} B"), r);
                ck.close(
                    || format!("eager in place {algo:?} {dtype} {bytes} B"),
                    t.to_host(),
                    &want,
                    w,
                );
            }
            for bytes in GRAPH_SIZES {
                let n = bytes / dtype.size();
                let inp = CudaTensor::zeros(&dev, dtype, &[n])?;
                let mut inplace = CudaTensor::zeros(&dev, dtype, &[n])?;
                comm.begin_capture()?;
                let (g, out) = CudaGraph::capture(&dev, || {
                    comm.all_reduce_in_place(&mut inplace.view_mut(), ReduceOp::Sum)?;
                    comm.all_reduce(&inp, ReduceOp::Sum)
                })?;
                comm.end_capture()?;
                for rep in 0..2 {
                    case += 1;
                    let xs = inputs(dtype, n, case, w);
                    let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
                    inp.clone().copy_from_host(&xs[me])?;
                    inplace.copy_from_host(&xs[me])?;
                    g.replay()?;
                    comm.synchronize()?;
                    ck.close(
                        || format!("graph {algo:?} {dtype} {bytes} B replay {rep}"),
                        out.to_host(),
                        &want,
                        w,
                    );
                    ck.close(
                        || format!("graph in place {algo:?} {dtype} {bytes} B replay {rep}"),
                        inplace.to_host(),
                        &want,
                        w,
                    );
                }
            }
        }
    }
    comm.with_custom_ar(|ca| ca.force_algo(None));
    // Not eligible for the custom kernel: NCCL takes them where it exists, else they are refused.
    for (what, dtype, n) in [
        ("8 MiB (not < max_size)", DType::F32, 2usize << 20),
        ("20 B (not a multiple of 16)", DType::F32, 5),
        ("f64", DType::F64, 16),
    ] {
        case += 1;
        let xs = inputs(dtype, n, case, w);
        let r = comm.all_reduce(
            &CudaTensor::from_host(&xs[me], dev.ordinal())?,
            ReduceOp::Sum,
        );
        if comm.has_nccl() {
            let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
            ck.close(
                || format!("{what} by NCCL"),
                r.and_then(|t| t.to_host()),
                &want,
                w,
            );
        } else {
            ck.err(&format!("{what} without NCCL"), r);
        }
    }
    // Two registrations per graph (in place and not) for every dtype, algorithm and size.
    let reg = comm.with_custom_ar(|ca| ca.registered()).unwrap_or(0);
    if reg == reg0 + 3 * 2 * 2 * GRAPH_SIZES.len() {
        ck.ok += 1
    } else {
        ck.fail(format!("{reg} rank-data entries registered"))
    }
    custom_ar_engine(comm, ck)
}

/// The custom all-reduce on an engine's cudarc memory (the copy-in path: the engine's
/// allocations are not shareable over CUDA IPC), in place and not, fenced and on the engine's
/// stream, then captured in a graph on the engine's stream.
fn custom_ar_engine(comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let (w, me) = (comm.world_size(), comm.rank());
    let eng = Engine::new(comm.context().ordinal(), true)?;
    let mut case = 300u64;
    for round in 0..2 {
        if round == 1 {
            engine::use_stream(comm, &eng.stream)?;
        }
        for bytes in [16usize, 64 << 10, 1 << 20, (8 << 20) - 16] {
            case += 1;
            let n = bytes / 4;
            let xs = inputs(DType::F32, n, case, w);
            let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
            let x = eng.upload::<f32>(&xs[me])?;
            let mut y = eng.stream.alloc_zeros::<f32>(n).map_err(drv)?;
            let r = comm.all_reduce_into(
                &engine::view(&x, &eng.stream)?,
                &mut engine::view_mut(&mut y, &eng.stream)?,
                ReduceOp::Sum,
            );
            ck.pass(
                &format!("custom AR into engine memory, {bytes} B, round {round}"),
                r,
            );
            ck.close(
                || format!("custom AR into engine memory, {bytes} B, round {round}"),
                eng.download(&y, &[n]),
                &want,
                w,
            );
            let mut x = x;
            let r = comm
                .all_reduce_in_place(&mut engine::view_mut(&mut x, &eng.stream)?, ReduceOp::Sum);
            ck.pass(
                &format!("custom AR in place on engine memory, {bytes} B, round {round}"),
                r,
            );
            ck.close(
                || format!("custom AR in place on engine memory, {bytes} B, round {round}"),
                eng.download(&x, &[n]),
                &want,
                w,
            );
        }
    }
    comm.reset_stream()?;
    engine_graph(comm, ck, 400)
}

/// `--dead-peer`: the last rank exits after set-up; the others' custom all-reduce must end in a
/// `Timeout` naming it within the deadline (the kernels' barrier deadline), not hang.
fn dead_peer(comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let (w, me) = (comm.world_size(), comm.rank());
    let last = w - 1;
    comm.host_group().barrier()?;
    if me == last {
        println!("rank {last}: exiting without a word");
        std::process::exit(0);
    }
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Duration::from_secs(3);
    comm.set_timeout(deadline);
    let t0 = Instant::now();
    let x = CudaTensor::from_host(
        &HostTensor::random(DType::F32, &[1024], 7),
        comm.context().ordinal(),
    )?;
    let r = comm
        .all_reduce(&x, ReduceOp::Sum)
        .and_then(|_| comm.synchronize());
    let took = t0.elapsed();
    match &r {
        Err(Error::Timeout { missing_ranks, .. }) if missing_ranks == &vec![last] && took < deadline * 3 => ck.ok += 1,
        other => ck.fail(format!(
            "dead peer: expected a Timeout naming rank {last} within {:?}, got {other:?} after {took:?}",
            deadline * 3
        )),
    }
    if me == 0 {
        println!(
            "dead peer: rank 0 got after {took:.2?}: {}",
            r.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
    ck.err(
        "custom all-reduce after a fault",
        comm.all_reduce(&x, ReduceOp::Sum).and_then(|t| t.to_host()),
    );
    Ok(())
}

/// World 1 or one GPU per rank: the shared NCCL suite and the engine checks; several ranks on
/// one GPU: the custom all-reduce with NCCL off.
fn run(e: &dist_store::RankEnv, ck: &mut Checks) -> Result<()> {
    let per_gpu = e.world == 1 || dist_cuda::device_count() >= e.world;
    let opts = Options {
        device: Some(if per_gpu { e.local_rank } else { 0 }),
        nccl: per_gpu,
        custom_all_reduce: e.world > 1,
        custom_ar_max_size: None,
    };
    let ctx = e.job_context("tp:0", Duration::from_secs(120))?;
    let t0 = Instant::now();
    let comm = Communicator::new(&ctx, &opts)?;
    if e.rank == 0 {
        println!(
            "world {}: {} GPU(s) in use, NCCL {}, custom all-reduce {}; set up in {:?}",
            e.world,
            if per_gpu { e.world } else { 1 },
            comm.has_nccl(),
            comm.has_custom_ar(),
            t0.elapsed()
        );
    }
    if std::env::args().any(|a| a == "--dead-peer") {
        return dead_peer(&comm, ck);
    }
    if comm.has_nccl() {
        checks::nccl_suite(&comm, ck)?;
        engine_nccl(&comm, ck)?;
    }
    if e.world > 1 {
        custom_ar(&comm, ck)?;
    }
    checks::destroy_then_refused(&comm, ck)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1,2,4,6,8");
        return;
    }
    let e = dist_store::RankEnv::from_env().expect("torchrun environment");
    if let Err(err) = DeviceContext::get(0) {
        eprintln!("rank {}: SKIPPED: no CUDA device ({err})", e.rank);
        std::process::exit(77); // xtask test-multiproc: skipped, never passed
    }
    let mut ck = Checks::default();
    let t0 = Instant::now();
    let r = run(&e, &mut ck);
    checks::finish(e.rank, e.world, ck, r, t0)
}
