//! The checks the multi-process GPU programs share (`dist-cuda`'s `mp_cuda`, `dist-rocm`'s
//! `mp_rocm`), written once over any `GpuRuntime`; each includes this file with `#[path]`.
//!
//! Inputs come from `(seed, rank)`, so every rank computes every oracle itself.

#![allow(dead_code)]

use std::time::Instant;

use dist_core::half::{bf16, f16};
use dist_core::{reference, DType, DeviceCommunicator, HostTensor, ReduceOp, Result};
use dist_nccl::{GpuBackend, GpuGraph, GpuRuntime, GpuTensor, NcclCommunicator};

/// Passed and failed checks of one rank.
#[derive(Default)]
pub struct Checks {
    pub ok: usize,
    pub bad: Vec<String>,
    pub exact: usize,
}

impl Checks {
    pub fn fail(&mut self, what: String) {
        self.bad.push(what);
    }
    /// `ok` when `cond` holds, else a failure `what()`.
    pub fn check(&mut self, cond: bool, what: impl FnOnce() -> String) {
        if cond {
            self.ok += 1
        } else {
            self.fail(what())
        }
    }
    /// Checks made so far.
    pub fn total(&self) -> usize {
        self.ok + self.bad.len()
    }
    /// `ok` when `r` is `Ok(())`, else a failure naming `what`.
    pub fn pass(&mut self, what: &str, r: Result<()>) {
        match r {
            Ok(()) => self.ok += 1,
            Err(e) => self.fail(format!("{what}: {e}")),
        }
    }
    /// Bit-exact comparison.
    pub fn eq(
        &mut self,
        what: impl FnOnce() -> String,
        got: Result<HostTensor>,
        want: &HostTensor,
    ) {
        match got {
            Ok(g)
                if g.dtype() == want.dtype()
                    && g.shape() == want.shape()
                    && g.as_bytes() == want.as_bytes() =>
            {
                self.ok += 1
            }
            Ok(g) => self.fail(format!(
                "{}: got {} {:?}, want {} {:?} (bytes differ)",
                what(),
                g.dtype(),
                g.shape(),
                want.dtype(),
                want.shape(),
            )),
            Err(e) => self.fail(format!("{}: error {e}", what())),
        }
    }
    /// An error was expected.
    pub fn err(&mut self, what: &str, r: Result<impl std::fmt::Debug>) {
        match r {
            Err(_) => self.ok += 1,
            Ok(v) => self.fail(format!("{what}: expected an error, got {v:?}")),
        }
    }
    /// Float comparison with a tolerance scaled by the world size; counts bit-exact matches.
    pub fn close(
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
        let floats = |t: &HostTensor| -> Option<Vec<f32>> {
            Some(match t.dtype() {
                DType::F32 => t.to_vec::<f32>().ok()?,
                DType::F16 => t.to_vec::<f16>().ok()?.iter().map(|x| x.to_f32()).collect(),
                DType::BF16 => t
                    .to_vec::<bf16>()
                    .ok()?
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                _ => return None,
            })
        };
        let rtol = match g.dtype() {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            _ => 1.6e-2,
        };
        let (Some(a), Some(b)) = (floats(&g), floats(want)) else {
            return self.fail(format!("{}: {} differs bytewise", what(), g.dtype()));
        };
        let atol = rtol * 2.0 * world as f32;
        let bad: Vec<usize> = (0..a.len())
            .filter(|&i| {
                let d = (a[i] - b[i]).abs();
                d.is_nan() || d > atol + rtol * b[i].abs()
            })
            .collect();
        match bad.first() {
            None => self.ok += 1,
            Some(&i) => self.fail(format!(
                "{}: {} of {} elements off, first at {i}: got {} want {}",
                what(),
                bad.len(),
                a.len(),
                a[i],
                b[i]
            )),
        }
    }
}

/// Every rank's input for case `seed`, of shape `shape_of(rank)`.
pub fn rank_inputs(
    dtype: DType,
    shape_of: impl Fn(usize) -> Vec<usize>,
    seed: u64,
    world: usize,
) -> Vec<HostTensor> {
    (0..world)
        .map(|r| HostTensor::random(dtype, &shape_of(r), seed * 1000 + r as u64))
        .collect()
}

/// Every rank's 1-D input of `n` elements for case `seed`.
pub fn inputs(dtype: DType, n: usize, seed: u64, world: usize) -> Vec<HostTensor> {
    rank_inputs(dtype, |_| vec![n], seed, world)
}

/// With NCCL (one GPU per rank): dist-core's conformance suite through the `Backend` trait (every
/// op owned and into poisoned outputs, every dtype, empty and odd sizes, all-to-all-v, grouped
/// point-to-point, argument errors), then graph capture and replay of an all-reduce and an
/// all-gather along dim 1 (the re-layout) on new inputs.
pub fn nccl_suite<R: GpuRuntime>(comm: &NcclCommunicator<R>, ck: &mut Checks) -> Result<()> {
    let (w, me) = (comm.world_size(), comm.rank());
    let n = dist_core::conformance::check_all::<GpuBackend<R>>(
        comm,
        &dist_core::conformance::Suite::quick(false),
    )?;
    if me == 0 {
        println!("dist-core conformance suite: {n} checks passed");
    }
    ck.ok += n;
    let dev = comm.context().clone();
    for dtype in [DType::F32, DType::BF16] {
        let inp = GpuTensor::zeros(&dev, dtype, &[64, 32])?;
        comm.begin_capture()?;
        let (g, (out, ag)) = GpuGraph::capture(&dev, || {
            Ok((
                comm.all_reduce(&inp, ReduceOp::Sum)?,
                comm.all_gather(&inp, 1)?,
            ))
        })?;
        comm.end_capture()?;
        for rep in 0..3u64 {
            let ys = rank_inputs(dtype, |_| vec![64, 32], 500 + rep, w);
            inp.clone().copy_from_host(&ys[me])?;
            g.replay()?;
            comm.synchronize()?;
            let want = reference::all_reduce(&ys, ReduceOp::Sum)?;
            ck.close(
                || format!("graph replay {rep} all_reduce {dtype}"),
                out.to_host(),
                &want,
                w,
            );
            let want = reference::all_gather(&ys, 1)?;
            ck.eq(
                || format!("graph replay {rep} all_gather(1) {dtype}"),
                ag.to_host(),
                &want,
            );
        }
    }
    Ok(())
}

/// `destroy`, then every op refused.
pub fn destroy_then_refused<R: GpuRuntime>(
    comm: &NcclCommunicator<R>,
    ck: &mut Checks,
) -> Result<()> {
    comm.destroy()?;
    let t = GpuTensor::zeros(comm.context(), DType::F32, &[4])?;
    ck.err(
        "all_reduce after destroy",
        comm.all_reduce(&t, ReduceOp::Sum),
    );
    ck.err("all_gather after destroy", comm.all_gather(&t, 0));
    Ok(())
}

/// Prints the failures and a summary line, then exits 0 (every check passed) or 1.
pub fn finish(rank: usize, world: usize, mut ck: Checks, run: Result<()>, t0: Instant) -> ! {
    if let Err(err) = run {
        ck.fail(format!("aborted: {err}"));
    }
    for b in ck.bad.iter().take(25) {
        println!("rank {rank}/{world} FAIL {b}");
    }
    if rank == 0 || !ck.bad.is_empty() {
        println!(
            "rank {rank}/{world}: {} passed, {} failed ({} bit-exact float results) in {:.1?}",
            ck.ok,
            ck.bad.len(),
            ck.exact,
            t0.elapsed()
        );
    }
    std::process::exit(if ck.bad.is_empty() { 0 } else { 1 });
}
