//! Device test of dist-rocm, one process per rank (torchrun's environment).
//!
//! - Any world with one GPU per rank: RCCL for every op and every dtype against
//!   `dist_core::reference`; the device-side re-layout (rank-major <-> cat) against
//!   `concat_along`; capture + replay of all_reduce and all_gather in a HIP graph; dist-core's
//!   conformance suite through the `Backend` trait; refusals after `destroy`.
//! - `--hip-from-cudart` (the ABI test on NVIDIA machines, not a ROCm test): installs a HIP
//!   runtime served by `libcudart` (`common/cudart_shim.rs`) before anything else; with
//!   `DIST_NCCL_SO_PATH` pointing at `libnccl.so.2` the crate's RCCL entry point
//!   (`dist_nccl::library(Flavor::Rccl)`) loads NCCL, which has the same C ABI.
//!
//! Exits 0 when every check passed, 77 (skipped, with a line saying `SKIPPED`) when there is no
//! HIP runtime or no device for every rank. `--worlds` prints the supported world sizes.

#[path = "common/cudart_shim.rs"]
mod cudart_shim;

use std::time::Duration;

use dist_core::half::{bf16, f16};
use dist_core::tensor::concat_along;
use dist_core::{reference, DType, DeviceCommunicator, HostTensor, ReduceOp, Result};
use dist_rocm::communicator::{cat_to_rank_major, rank_major_to_cat};
use dist_rocm::driver::{copy_d2h, copy_h2d};
use dist_rocm::{Communicator, DeviceContext, Options, P2pOp, RocmGraph, RocmTensor};

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

/// RCCL: every op and every dtype against the oracles, at any world size (one GPU per rank).
fn nccl_suite(e: &dist_store::RankEnv, comm: &Communicator, ck: &mut Checks) -> Result<()> {
    let (w, me) = (e.world, e.rank);
    let lib = dist_nccl::library(dist_nccl::Flavor::Rccl)?;
    if me == 0 {
        println!(
            "RCCL entry point (Flavor::Rccl) loaded {} from {}",
            lib.version(),
            lib.path
        );
    }
    let dev = comm.context().clone();
    let ord = dev.ordinal();
    let shape = [2 * w, 2 * w, 3];
    let up = |t: &HostTensor| RocmTensor::from_host(t, ord);
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
        let src = RocmTensor::uninit(&dev, DType::U8, &[rank_major.len()])?;
        copy_h2d(&dev, src.ptr(), &rank_major)?;
        let dst = RocmTensor::zeros(&dev, DType::U8, &[rank_major.len()])?;
        // SAFETY: both buffers hold 2*6*3 elements of dtype.
        unsafe { rank_major_to_cat(&dev, dst.ptr(), src.ptr(), 2, 3, &lens, dtype.size())? };
        let mut got = vec![0u8; want.len()];
        copy_d2h(&dev, &mut got, dst.ptr())?;
        if got == want {
            ck.ok += 1
        } else {
            ck.fail(format!("rank_major_to_cat {dtype}"))
        }
        let back = RocmTensor::zeros(&dev, DType::U8, &[rank_major.len()])?;
        // SAFETY: as above.
        unsafe { cat_to_rank_major(&dev, back.ptr(), dst.ptr(), 2, 3, &lens, dtype.size())? };
        copy_d2h(&dev, &mut got, back.ptr())?;
        if got == rank_major {
            ck.ok += 1
        } else {
            ck.fail(format!("cat_to_rank_major {dtype}"))
        }
    }

    // HIP graph: capture an all_reduce and an all_gather(dim 1), replay on new inputs.
    for dtype in [DType::F32, DType::BF16] {
        let inp = RocmTensor::zeros(&dev, dtype, &[64, 32])?;
        comm.begin_capture()?;
        let (g, (out, ag)) = RocmGraph::capture(&dev, || {
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

/// World 1 or one GPU per rank: the RCCL suite, then the conformance suite; refusals after destroy.
fn run(e: &dist_store::RankEnv, ck: &mut Checks) -> Result<()> {
    let opts = Options {
        device: Some(e.local_rank),
        nccl: true,
    };
    let ctx = e.job_context("tp:0", Duration::from_secs(120))?;
    let t0 = std::time::Instant::now();
    let comm = Communicator::new(&ctx, &opts)?;
    if e.rank == 0 {
        let dev = comm.context();
        println!(
            "world {}: HIP runtime {} ({}), device {} '{}' bus {}; RCCL communicator set up in {:?}",
            e.world,
            dev.runtime().version(),
            dev.runtime().path,
            dev.ordinal(),
            dev.name().unwrap_or_default(),
            dev.pci_bus_id().unwrap_or_default(),
            t0.elapsed()
        );
    }
    nccl_suite(e, &comm, ck)?;
    // dist-core's conformance suite through the Backend trait (from_host/to_host included).
    let n = dist_core::conformance::check_all::<dist_rocm::RocmBackend>(
        &comm,
        &dist_core::conformance::Suite::quick(false),
    )?;
    if e.rank == 0 {
        println!("dist-core conformance suite: {n} checks passed");
    }
    ck.ok += n;
    comm.destroy()?;
    ck.err(
        "all_reduce after destroy",
        comm.all_reduce(
            &RocmTensor::zeros(comm.context(), DType::F32, &[4])?,
            ReduceOp::Sum,
        ),
    );
    Ok(())
}

/// The exit status `cargo xtask test-multiproc` counts as skipped.
const SKIP: i32 = 77;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1,2,4,8");
        return;
    }
    let e = dist_store::RankEnv::from_env().expect("torchrun environment");
    if args.iter().any(|a| a == "--hip-from-cudart") {
        match cudart_shim::install() {
            Ok(rt) => {
                if e.rank == 0 {
                    println!(
                        "ABI TEST (not a ROCm test): HIP runtime = {} version {}",
                        rt.path,
                        rt.version()
                    );
                }
            }
            Err(err) => {
                println!(
                    "rank {}: SKIPPED: no cudart for the ABI test ({err})",
                    e.rank
                );
                std::process::exit(SKIP);
            }
        }
    }
    // Every rank needs its own device (RCCL refuses two ranks on one GPU). Every rank decides
    // the same way, so no rank is left waiting for a peer that skipped.
    if let Err(err) = DeviceContext::get(e.local_rank) {
        println!(
            "rank {}: SKIPPED: no ROCm device for local rank {} ({err})",
            e.rank, e.local_rank
        );
        std::process::exit(SKIP);
    }
    let n = dist_rocm::device_count();
    if n < e.world {
        println!(
            "rank {}: SKIPPED: world {} needs one GPU per rank, {n} visible",
            e.rank, e.world
        );
        std::process::exit(SKIP);
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
