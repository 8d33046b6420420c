//! Device test of dist-cuda, one process per rank (torchrun's environment).
//!
//! - World 1: NCCL for every op and every dtype against `dist_core::reference`; the device-side
//!   re-layout (rank-major ↔ cat) against `concat_along`; capture + replay of all_reduce.
//! - World 2, 4, 8 (processes sharing one GPU through CUDA IPC; NCCL is off since it refuses two
//!   ranks on one GPU): `create_shared_buffer`-style buffer sharing, then the custom all-reduce
//!   eager and graph paths, one-shot and two-shot, fp32/fp16/bf16, 16 B to 8 MiB, against the
//!   oracle; inputs that do not qualify are refused.
//!
//! Exits 0 when every check passed. `--worlds` prints the supported world sizes.

use std::time::Duration;

use dist_core::half::{bf16, f16};
use dist_core::tensor::concat_along;
use dist_core::{reference, DType, DeviceCommunicator, HostTensor, ReduceOp, Result};
use dist_cuda::communicator::{cat_to_rank_major, rank_major_to_cat};
use dist_cuda::custom_ar::Algo;
use dist_cuda::driver::{copy_d2h, copy_h2d};
use dist_cuda::{Communicator, CudaGraph, CudaTensor, DeviceContext, Options, P2pOp};

#[derive(Default)]
struct Checks {
    ok: usize,
    bad: Vec<String>,
    exact: usize,
}

impl Checks {
    fn fail(&mut self, what: String) {
        self.bad.push(what);
    }
    fn eq(&mut self, what: impl FnOnce() -> String, got: Result<HostTensor>, want: &HostTensor) {
        match got {
            Ok(g)
                if g.dtype() == want.dtype()
                    && g.shape() == want.shape()
                    && g.as_bytes() == want.as_bytes() =>
            {
                self.ok += 1
            }
            Ok(g) => self.fail(format!(
                "{}: got {} {:?}, want {} {:?} (bytes differ: {})",
                what(),
                g.dtype(),
                g.shape(),
                want.dtype(),
                want.shape(),
                g.shape() == want.shape()
            )),
            Err(e) => self.fail(format!("{}: error {e}", what())),
        }
    }
    fn err(&mut self, what: &str, r: Result<impl std::fmt::Debug>) {
        match r {
            Err(_) => self.ok += 1,
            Ok(v) => self.fail(format!("{what}: expected an error, got {v:?}")),
        }
    }
    /// Float comparison with a tolerance scaled by the world size; counts bit-exact matches.
    fn close(
        &mut self,
        what: impl FnOnce() -> String,
        got: Result<HostTensor>,
        want: &HostTensor,
        world: usize,
    ) {
        let g = match got {
            Ok(g) => g,
            Err(e) => return self.fail(format!("{}: error {e}", what())),
        };
        if g.dtype() != want.dtype() || g.shape() != want.shape() {
            return self.fail(format!(
                "{}: got {:?}, want {:?}",
                what(),
                g.shape(),
                want.shape()
            ));
        }
        if g.as_bytes() == want.as_bytes() {
            self.ok += 1;
            self.exact += 1;
            return;
        }
        let (a, b, rtol): (Vec<f32>, Vec<f32>, f32) = match g.dtype() {
            DType::F32 => (
                g.to_vec::<f32>().unwrap(),
                want.to_vec::<f32>().unwrap(),
                1e-5,
            ),
            DType::F16 => (
                g.to_vec::<f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                want.to_vec::<f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                2e-3,
            ),
            DType::BF16 => (
                g.to_vec::<bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                want.to_vec::<bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                1.6e-2,
            ),
            d => return self.fail(format!("{}: {d} differs bytewise", what())),
        };
        let atol = rtol * 2.0 * world as f32;
        let mut worst = (0usize, 0f32);
        let mut nbad = 0;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let d = (x - y).abs();
            if d.is_nan() || d > atol + rtol * y.abs() {
                nbad += 1;
                if d > worst.1 || d.is_nan() {
                    worst = (i, d);
                }
            }
        }
        if nbad == 0 {
            self.ok += 1;
        } else {
            self.fail(format!(
                "{}: {nbad} of {} elements off, worst at {}: got {} want {}",
                what(),
                a.len(),
                worst.0,
                a[worst.0],
                b[worst.0]
            ));
        }
    }
}

/// Every rank's input for case `seed`: the same on every rank, so each computes the oracle.
fn rank_inputs(
    dtype: DType,
    shape_of: impl Fn(usize) -> Vec<usize>,
    seed: u64,
    world: usize,
) -> Vec<HostTensor> {
    (0..world)
        .map(|r| HostTensor::random(dtype, &shape_of(r), seed * 1000 + r as u64))
        .collect()
}

/// NCCL: every op and every dtype against the oracles, at any world size (one GPU per rank).
fn nccl_suite(e: &dist_store::RankEnv, comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let (w, me) = (e.world, e.rank);
    let lib = dist_nccl::library(dist_nccl::Flavor::Nccl)?;
    if me == 0 {
        println!("NCCL {} loaded from {}", lib.version(), lib.path);
    }
    let dev = comm.context().clone();
    let ord = dev.ordinal();
    let shape = [2 * w, 2 * w, 3];
    let up = |t: &HostTensor| CudaTensor::from_host(t, ord);
    let mut seed = 1u64;
    for dtype in DType::ALL {
        seed += 1;
        let xs = rank_inputs(dtype, |_| shape.to_vec(), seed, w);
        let x = &xs[me];
        let dx = up(x)?;
        if dtype.is_reducible() {
            for op in ReduceOp::ALL {
                let want = reference::all_reduce(&xs, op)?;
                let tol = |g: Result<HostTensor>, ck: &mut Checks, what: String| {
                    if dtype.is_float() && w > 1 {
                        ck.close(|| what, g, &want, w)
                    } else {
                        ck.eq(|| what, g, &want)
                    }
                };
                tol(
                    comm.all_reduce(&dx, op).and_then(|t| t.to_host()),
                    ck,
                    format!("all_reduce {dtype} {op}"),
                );
                let mut t = up(x)?;
                tol(
                    comm.all_reduce_in_place(&mut &mut t, op)
                        .and_then(|_| t.to_host()),
                    ck,
                    format!("all_reduce_in_place {dtype} {op}"),
                );
            }
            ck.eq(
                || format!("all_reduce input unchanged {dtype}"),
                dx.to_host(),
                x,
            );
        } else {
            ck.err(
                &format!("all_reduce of {dtype} refused"),
                comm.all_reduce(&dx, ReduceOp::Sum),
            );
        }
        for dim in [0isize, 1, 2, -1, -3] {
            let d = if dim < 0 {
                (dim + 3) as usize
            } else {
                dim as usize
            };
            ck.eq(
                || format!("all_gather {dtype} dim {dim}"),
                comm.all_gather(&dx, dim).and_then(|t| t.to_host()),
                &reference::all_gather(&xs, dim)?,
            );
            let dst = w - 1;
            let g = comm.gather(&dx, dst, dim);
            match (me == dst, g) {
                (true, Ok(Some(t))) => ck.eq(
                    || format!("gather {dtype} dim {dim}"),
                    t.to_host(),
                    reference::gather(&xs, dst, dim)?[dst].as_ref().unwrap(),
                ),
                (false, Ok(None)) => ck.ok += 1,
                (_, other) => ck.fail(format!("gather {dtype} dim {dim} to {dst}: {other:?}")),
            }
            // Unequal lengths along dim: rank r has (r % 3) + 1.
            let sizes: Vec<usize> = (0..w).map(|r| r % 3 + 1).collect();
            let vs = rank_inputs(
                dtype,
                |r| {
                    let mut s = shape.to_vec();
                    s[d] = sizes[r];
                    s
                },
                seed + 50,
                w,
            );
            ck.eq(
                || format!("all_gatherv {dtype} dim {dim}"),
                comm.all_gatherv(&up(&vs[me])?, dim, &sizes)
                    .and_then(|t| t.to_host()),
                &reference::all_gatherv(&vs, dim, &sizes)?,
            );
            if dtype.is_reducible() {
                for op in [ReduceOp::Sum, ReduceOp::Max] {
                    let cmp = |g: Result<HostTensor>,
                               want: &HostTensor,
                               ck: &mut Checks,
                               what: String| {
                        if dtype.is_float() && w > 1 && op == ReduceOp::Sum {
                            ck.close(|| what, g, want, w)
                        } else {
                            ck.eq(|| what, g, want)
                        }
                    };
                    if shape[d] % w == 0 {
                        cmp(
                            comm.reduce_scatter(&dx, dim, op).and_then(|t| t.to_host()),
                            &reference::reduce_scatter(&xs, dim, op)?[me],
                            ck,
                            format!("reduce_scatter {dtype} {op} dim {dim}"),
                        );
                    }
                    let total: usize = sizes.iter().sum();
                    let rs = rank_inputs(
                        dtype,
                        |_| {
                            let mut s = shape.to_vec();
                            s[d] = total;
                            s
                        },
                        seed + 70,
                        w,
                    );
                    cmp(
                        comm.reduce_scatterv(&up(&rs[me])?, dim, &sizes, op)
                            .and_then(|t| t.to_host()),
                        &reference::reduce_scatterv(&rs, dim, &sizes, op)?[me],
                        ck,
                        format!("reduce_scatterv {dtype} {op} dim {dim}"),
                    );
                }
            }
        }
        let src = w - 1;
        let mut b = up(x)?;
        ck.eq(
            || format!("broadcast {dtype}"),
            comm.broadcast(&mut &mut b, src).and_then(|_| b.to_host()),
            &reference::broadcast(&xs, src)?,
        );
        // Ring exchange in one group: send to the next rank, receive from the previous.
        let mut r = comm.empty(dtype, &shape)?;
        let res = comm
            .batch_send_recv_owned(&mut [
                P2pOp::Send(&dx, (me + 1) % w),
                P2pOp::Recv(&mut r, (me + w - 1) % w),
            ])
            .and_then(|_| r.to_host());
        ck.eq(
            || format!("grouped send/recv ring {dtype}"),
            res,
            &xs[(me + w - 1) % w],
        );
        if w > 1 {
            // Plain send/recv: rank 0 -> rank 1.
            if me == 0 {
                if let Err(err) = comm.send(&dx, 1) {
                    ck.fail(format!("send {dtype}: {err}"))
                } else {
                    ck.ok += 1
                }
            } else if me == 1 {
                let mut r = comm.empty(dtype, &shape)?;
                ck.eq(
                    || format!("recv {dtype}"),
                    comm.recv(&mut &mut r, 0).and_then(|_| r.to_host()),
                    &xs[0],
                );
            }
        }
    }
    ck.err(
        "send to rank w (out of range)",
        comm.send(&up(&HostTensor::zeros(DType::F32, &[4]))?, w),
    );
    ck.err(
        "all_gatherv with wrong sizes",
        comm.all_gatherv(&up(&HostTensor::zeros(DType::F32, &[4]))?, 0, &vec![3; w]),
    );

    // Device-side re-layout with three parts of unequal lengths, as all_gatherv(dim=1) does.
    for dtype in [DType::U8, DType::BF16, DType::F32, DType::F64] {
        let lens = [1usize, 2, 3];
        let parts: Vec<HostTensor> = lens
            .iter()
            .enumerate()
            .map(|(i, l)| HostTensor::random(dtype, &[2, *l, 3], 100 + i as u64))
            .collect();
        let rank_major: Vec<u8> = parts.iter().flat_map(|p| p.as_bytes().to_vec()).collect();
        let want = concat_along(
            &parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>(),
            &[2, 6, 3],
            1,
            &lens,
            dtype.size(),
        )?;
        let src = CudaTensor::uninit(&dev, DType::U8, &[rank_major.len()])?;
        copy_h2d(&dev, src.ptr(), &rank_major)?;
        let dst = CudaTensor::zeros(&dev, DType::U8, &[rank_major.len()])?;
        // SAFETY: both buffers hold 2*6*3 elements of dtype.
        unsafe { rank_major_to_cat(&dev, dst.ptr(), src.ptr(), 2, 3, &lens, dtype.size())? };
        let mut got = vec![0u8; want.len()];
        copy_d2h(&dev, &mut got, dst.ptr())?;
        if got == want {
            ck.ok += 1
        } else {
            ck.fail(format!("rank_major_to_cat {dtype}"))
        }
        let back = CudaTensor::zeros(&dev, DType::U8, &[rank_major.len()])?;
        // SAFETY: as above.
        unsafe { cat_to_rank_major(&dev, back.ptr(), dst.ptr(), 2, 3, &lens, dtype.size())? };
        copy_d2h(&dev, &mut got, back.ptr())?;
        if got == rank_major {
            ck.ok += 1
        } else {
            ck.fail(format!("cat_to_rank_major {dtype}"))
        }
    }

    // CUDA graph: capture an all_reduce (NCCL; custom AR where active) and an all_gather(dim 1), replay on new inputs.
    for dtype in [DType::F32, DType::BF16] {
        let inp = CudaTensor::zeros(&dev, dtype, &[64, 32])?;
        comm.begin_capture()?;
        let (g, (out, ag)) = CudaGraph::capture(&dev, || {
            Ok((
                comm.all_reduce(&inp, ReduceOp::Sum)?,
                comm.all_gather(&inp, 1)?,
            ))
        })?;
        comm.end_capture()?;
        for rep in 0..3u64 {
            let ys = rank_inputs(dtype, |_| vec![64, 32], 500 + rep, w);
            let mut inp2 = inp.clone();
            inp2.copy_from_host(&ys[me])?;
            g.replay()?;
            comm.synchronize()?;
            ck.close(
                || format!("graph replay {rep} all_reduce {dtype}"),
                out.to_host(),
                &reference::all_reduce(&ys, ReduceOp::Sum)?,
                w,
            );
            ck.eq(
                || format!("graph replay {rep} all_gather {dtype}"),
                ag.to_host(),
                &reference::all_gather(&ys, 1)?,
            );
        }
    }
    Ok(())
}

const SIZES: [usize; 7] = [
    16,
    1024,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    (8 << 20) - 16,
];
const GRAPH_SIZES: [usize; 3] = [16, 64 << 10, 2 << 20];

fn inputs(dtype: DType, n: usize, seed: u64, world: usize) -> Vec<HostTensor> {
    (0..world)
        .map(|r| HostTensor::random(dtype, &[n], seed * 1000 + r as u64))
        .collect()
}

fn custom_ar(e: &dist_store::RankEnv, comm: &Communicator, ck: &mut Checks) -> Result<()> {
    if !comm.has_custom_ar() {
        ck.fail("custom all-reduce not created".into());
        return Ok(());
    }
    let dev = comm.context().clone();
    let hg = comm.host_group().clone();
    let reg0 = comm.with_custom_ar(|ca| ca.registered()).unwrap();
    let w = e.world;

    // create_shared_buffer: each rank writes its pattern into its own buffer, every rank reads every peer's.
    let ptrs = comm
        .with_custom_ar(|ca| {
            (
                ca.shared_buffers().1.local(),
                ca.shared_buffers().1.ptrs().to_vec(),
            )
        })
        .unwrap();
    copy_h2d(&dev, ptrs.0, &vec![e.rank as u8 + 1; 4096])?;
    hg.barrier()?;
    for (r, p) in ptrs.1.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        copy_d2h(&dev, &mut got, *p)?;
        if got.iter().all(|b| *b == r as u8 + 1) {
            ck.ok += 1
        } else {
            ck.fail(format!("shared buffer of rank {r} read by rank {}", e.rank))
        }
    }
    hg.barrier()?;

    let mut case = 0u64;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for algo in [Algo::OneShot, Algo::TwoShot] {
            comm.with_custom_ar(|ca| ca.force_algo(Some(algo)));
            for bytes in SIZES {
                case += 1;
                let n = bytes / dtype.size();
                let xs = inputs(dtype, n, case, w);
                let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
                let dx = CudaTensor::from_host(&xs[e.rank], dev.ordinal())?;
                let got = comm
                    .all_reduce(&dx, ReduceOp::Sum)
                    .and_then(|t| t.to_host());
                ck.close(
                    || format!("eager {algo:?} {dtype} {bytes} B"),
                    got,
                    &want,
                    w,
                );
            }
            for bytes in GRAPH_SIZES {
                let n = bytes / dtype.size();
                let inp = CudaTensor::zeros(&dev, dtype, &[n])?;
                comm.begin_capture()?;
                let (g, out) = CudaGraph::capture(&dev, || comm.all_reduce(&inp, ReduceOp::Sum))?;
                comm.end_capture()?;
                for rep in 0..2 {
                    case += 1;
                    let xs = inputs(dtype, n, case, w);
                    let want = reference::all_reduce(&xs, ReduceOp::Sum)?;
                    let mut i2 = inp.clone();
                    i2.copy_from_host(&xs[e.rank])?;
                    g.replay()?;
                    comm.synchronize()?;
                    ck.close(
                        || format!("graph {algo:?} {dtype} {bytes} B replay {rep}"),
                        out.to_host(),
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
            &CudaTensor::from_host(&xs[e.rank], dev.ordinal())?,
            ReduceOp::Sum,
        );
        if comm.has_nccl() {
            ck.close(
                || format!("{what} by NCCL"),
                r.and_then(|t| t.to_host()),
                &reference::all_reduce(&xs, ReduceOp::Sum)?,
                w,
            );
        } else {
            ck.err(&format!("{what} without NCCL"), r);
        }
    }
    let reg = comm.with_custom_ar(|ca| ca.registered()).unwrap();
    if reg == reg0 + 3 * 2 * GRAPH_SIZES.len() {
        ck.ok += 1
    } else {
        ck.fail(format!("{reg} rank-data entries registered"))
    }
    Ok(())
}

/// `--dead-peer`: the last rank exits after set-up; the others' custom all-reduce must end in a
/// `Timeout` naming it within the deadline (the kernels' barrier deadline), not hang.
fn dead_peer(e: &dist_store::RankEnv, comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let last = e.world - 1;
    comm.host_group().barrier()?;
    if e.rank == last {
        println!("rank {last}: exiting without a word");
        std::process::exit(0);
    }
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Duration::from_secs(3);
    comm.set_timeout(deadline);
    let t0 = std::time::Instant::now();
    let x = CudaTensor::from_host(
        &HostTensor::random(DType::F32, &[1024], 7),
        comm.context().ordinal(),
    )?;
    let r = comm
        .all_reduce(&x, ReduceOp::Sum)
        .and_then(|_| comm.synchronize());
    let took = t0.elapsed();
    match &r {
        Err(dist_core::Error::Timeout { missing_ranks, .. }) if missing_ranks == &vec![last] && took < deadline * 3 => ck.ok += 1,
        other => ck.fail(format!("dead peer: expected a Timeout naming rank {last} within {:?}, got {other:?} after {took:?}", deadline * 3)),
    }
    if e.rank == 0 {
        println!(
            "dead peer: rank 0 got after {took:.2?}: {}",
            r.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
    // Refused from now on.
    ck.err(
        "custom all-reduce after a fault",
        comm.all_reduce(&x, ReduceOp::Sum).and_then(|t| t.to_host()),
    );
    Ok(())
}

/// World 1: NCCL suite. Several ranks: one GPU each when there are enough (NCCL suite, then the
/// custom all-reduce with NCCL beside it), else all on GPU 0 with NCCL off (custom all-reduce only).
fn run(e: &dist_store::RankEnv, ck: &mut Checks) -> Result<()> {
    let per_gpu = e.world == 1 || dist_cuda::device_count() >= e.world;
    let opts = Options {
        device: Some(if per_gpu { e.local_rank } else { 0 }),
        nccl: per_gpu,
        custom_all_reduce: e.world > 1,
        custom_ar_max_size: None,
    };
    let ctx = e.job_context("tp:0", Duration::from_secs(120))?;
    let t0 = std::time::Instant::now();
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
        return dead_peer(e, &comm, ck);
    }
    if comm.has_nccl() {
        nccl_suite(e, &comm, ck)?;
        // dist-core's conformance suite through the Backend trait (from_host/to_host included).
        let n = dist_core::conformance::check_all::<dist_cuda::CudaBackend>(
            &comm,
            &dist_core::conformance::Suite::quick(false),
        )?;
        if e.rank == 0 {
            println!("dist-core conformance suite: {n} checks passed");
        }
        ck.ok += n;
    }
    if e.world > 1 {
        custom_ar(e, &comm, ck)?;
    }
    comm.destroy()?;
    ck.err(
        "all_reduce after destroy",
        comm.all_reduce(
            &CudaTensor::zeros(comm.context(), DType::F32, &[4])?,
            ReduceOp::Sum,
        ),
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1,2,4,6,8");
        return;
    }
    let e = dist_store::RankEnv::from_env().expect("torchrun environment");
    if DeviceContext::get(0).is_err() {
        eprintln!(
            "rank {}: SKIPPED: no CUDA device ({})",
            e.rank,
            DeviceContext::get(0).unwrap_err()
        );
        std::process::exit(77); // xtask test-multiproc: skipped, never passed
    }
    let mut ck = Checks::default();
    let t0 = std::time::Instant::now();
    let r = run(&e, &mut ck);
    if let Err(err) = r {
        ck.fail(format!("aborted: {err}"));
    }
    for b in ck.bad.iter().take(25) {
        println!("rank {}/{} FAIL {b}", e.rank, e.world);
    }
    if e.rank == 0 || !ck.bad.is_empty() {
        println!(
            "rank {}/{}: {} passed, {} failed ({} bit-exact float results) in {:.1?}",
            e.rank,
            e.world,
            ck.ok,
            ck.bad.len(),
            ck.exact,
            t0.elapsed()
        );
    }
    std::process::exit(if ck.bad.is_empty() { 0 } else { 1 });
}
