//! The conformance suite every backend runs: each collective on random data, in several dtypes
//! and shapes (empty and odd sizes included), checked against the [`reference`](mod@crate::reference)
//! oracles.
//!
//! Every rank calls [`check_all`] with its own communicator. Inputs are generated from
//! `(seed, rank)`, so each rank can rebuild every other rank's input and compute the expected
//! result locally — no extra communication is needed to check.

use crate::{reference, Backend, DType, DeviceCommunicator, Error, HostTensor, ReduceOp, Result};

/// What to run.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Element types to test.
    pub dtypes: Vec<DType>,
    /// Element counts for the 1-D all-reduce / broadcast / send checks.
    pub lengths: Vec<usize>,
    /// Shapes for the dim-wise checks (all_gather, reduce_scatter, gather, v-variants).
    pub shapes: Vec<Vec<usize>>,
    /// Reduction operators for all_reduce.
    pub ops: Vec<ReduceOp>,
    /// Require bit-identical results (host backends that reduce in rank order); otherwise floats
    /// are compared with a tolerance (device libraries reduce in other orders).
    pub exact: bool,
    /// Seed of the random inputs.
    pub seed: u64,
}

impl Suite {
    /// A quick suite: every reducible dtype, small sizes including 0 and odd lengths.
    pub fn quick(exact: bool) -> Self {
        Suite {
            dtypes: vec![
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::F64,
                DType::I8,
                DType::U8,
                DType::I32,
                DType::I64,
            ],
            lengths: vec![0, 1, 7, 1024, (1 << 18) + 3],
            shapes: vec![vec![0, 3], vec![2, 3, 4], vec![3, 1, 5, 2]],
            ops: ReduceOp::ALL.to_vec(),
            exact,
            seed: 1234,
        }
    }
}

fn input(seed: u64, rank: usize, tag: u64, dtype: DType, shape: &[usize]) -> HostTensor {
    HostTensor::random(
        dtype,
        shape,
        seed ^ (rank as u64).wrapping_mul(0x9E37_79B9) ^ tag.wrapping_mul(0x85EB_CA6B),
    )
}

fn all_inputs(seed: u64, world: usize, tag: u64, dtype: DType, shape: &[usize]) -> Vec<HostTensor> {
    (0..world)
        .map(|r| input(seed, r, tag, dtype, shape))
        .collect()
}

/// Compares `got` with `want`: bit-exact, or for floats within a tolerance when `exact` is false.
pub fn compare(what: &str, want: &HostTensor, got: &HostTensor, exact: bool) -> Result<()> {
    if want.dtype() != got.dtype() || want.shape() != got.shape() {
        return Err(Error::Backend {
            backend: "conformance",
            code: None,
            message: format!(
                "{what}: expected {} {:?}, got {} {:?}",
                want.dtype(),
                want.shape(),
                got.dtype(),
                got.shape()
            ),
        });
    }
    if want.as_bytes() == got.as_bytes() {
        return Ok(());
    }
    let wrong = if exact || !want.dtype().is_float() {
        let es = want.dtype().size();
        want.as_bytes()
            .chunks(es)
            .zip(got.as_bytes().chunks(es))
            .filter(|(a, b)| a != b)
            .count()
    } else {
        let tol = match want.dtype() {
            DType::F16 | DType::BF16 => 2e-2,
            DType::F32 => 1e-5,
            _ => 1e-12,
        };
        let w = to_f64(want)?;
        let g = to_f64(got)?;
        w.iter()
            .zip(&g)
            .filter(|(a, b)| (*a - *b).abs() > tol * (1.0 + a.abs()))
            .count()
    };
    if wrong == 0 {
        return Ok(());
    }
    Err(Error::Backend {
        backend: "conformance",
        code: None,
        message: format!(
            "{what}: {wrong} of {} elements differ from the oracle",
            want.numel()
        ),
    })
}

/// The elements as f64 (for tolerance checks and benchmarks' `#wrong` counts).
pub fn to_f64(t: &HostTensor) -> Result<Vec<f64>> {
    crate::dispatch_dtype!(t.dtype(), T => {
        Ok(t.as_slice::<T>()?.iter().map(|x| crate::Element::to_f64(*x)).collect())
    })
}

/// Runs the suite on `comm` (this rank's communicator of backend `B`). Collective: every rank of
/// the group must call it with the same suite. Returns how many checks passed.
pub fn check_all<B: Backend>(comm: &B::Communicator, suite: &Suite) -> Result<usize> {
    let world = comm.world_size();
    let rank = comm.rank();
    let dev = comm.device();
    let up = |h: &HostTensor| B::from_host(h, dev);
    let down = |t: &B::Tensor| B::to_host(t);
    let mut checks = 0usize;
    let mut tag = 0u64;
    for &dtype in &suite.dtypes {
        for &len in &suite.lengths {
            tag += 1;
            let ins = all_inputs(suite.seed, world, tag, dtype, &[len]);
            let mine = up(&ins[rank])?;
            for &op in &suite.ops {
                let want = reference::all_reduce(&ins, op)?;
                let got = down(&comm.all_reduce(&mine, op)?)?;
                compare(
                    &format!("all_reduce {op} {dtype} [{len}]"),
                    &want,
                    &got,
                    suite.exact,
                )?;
                // the input must be unchanged
                compare(
                    &format!("all_reduce {op} {dtype} [{len}] input untouched"),
                    &ins[rank],
                    &down(&mine)?,
                    true,
                )?;
                let mut inplace = up(&ins[rank])?;
                comm.all_reduce_in_place(&mut inplace, op)?;
                compare(
                    &format!("all_reduce_in_place {op} {dtype} [{len}]"),
                    &want,
                    &down(&inplace)?,
                    suite.exact,
                )?;
                checks += 2;
            }
            for src in 0..world {
                let mut t = if rank == src {
                    up(&ins[rank])?
                } else {
                    comm.empty(dtype, &[len])?
                };
                comm.broadcast(&mut t, src)?;
                compare(
                    &format!("broadcast from {src} {dtype} [{len}]"),
                    &ins[src],
                    &down(&t)?,
                    true,
                )?;
                checks += 1;
            }
            if world > 1 {
                // ring send/recv: even ranks send first to avoid relying on buffering
                let next = (rank + 1) % world;
                let prev = (rank + world - 1) % world;
                let mut got = comm.empty(dtype, &[len])?;
                if rank % 2 == 0 {
                    comm.send(&mine, next)?;
                    comm.recv(&mut got, prev)?;
                } else {
                    comm.recv(&mut got, prev)?;
                    comm.send(&mine, next)?;
                }
                compare(
                    &format!("send/recv ring {dtype} [{len}]"),
                    &ins[prev],
                    &down(&got)?,
                    true,
                )?;
                checks += 1;
            }
        }
        for shape in &suite.shapes {
            tag += 1;
            let ins = all_inputs(suite.seed, world, tag, dtype, shape);
            let mine = up(&ins[rank])?;
            for d in 0..shape.len() {
                let dim = d as isize;
                let want = reference::all_gather(&ins, dim)?;
                compare(
                    &format!("all_gather dim {d} {dtype} {shape:?}"),
                    &want,
                    &down(&comm.all_gather(&mine, dim)?)?,
                    true,
                )?;
                let neg = dim - shape.len() as isize;
                compare(
                    &format!("all_gather dim {neg} {dtype} {shape:?}"),
                    &want,
                    &down(&comm.all_gather(&mine, neg)?)?,
                    true,
                )?;
                for dst in 0..world {
                    let g = comm.gather(&mine, dst, dim)?;
                    match (rank == dst, g) {
                        (true, Some(g)) => compare(
                            &format!("gather to {dst} dim {d} {dtype}"),
                            &want,
                            &down(&g)?,
                            true,
                        )?,
                        (false, None) => {}
                        (me, g) => {
                            return Err(Error::Backend {
                                backend: "conformance",
                                code: None,
                                message: format!(
                                    "gather to {dst}: rank {rank} (dst: {me}) got a result: {}",
                                    g.is_some()
                                ),
                            })
                        }
                    }
                }
                checks += 2 + world;
                // reduce_scatter along d, over an input whose dim d is scaled to divide by world
                let mut rs_shape = shape.clone();
                rs_shape[d] = shape[d] * world;
                tag += 1;
                let rs_ins = all_inputs(suite.seed, world, tag, dtype, &rs_shape);
                let rs_want = reference::reduce_scatter(&rs_ins, dim, ReduceOp::Sum)?;
                let got = comm.reduce_scatter(&up(&rs_ins[rank])?, dim, ReduceOp::Sum)?;
                compare(
                    &format!("reduce_scatter dim {d} {dtype} {rs_shape:?}"),
                    &rs_want[rank],
                    &down(&got)?,
                    suite.exact,
                )?;
                // v-variants: rank r has r+1 (or 0 for rank 1) rows along d
                let sizes: Vec<usize> =
                    (0..world).map(|r| if r == 1 { 0 } else { r + 1 }).collect();
                tag += 1;
                let v_ins: Vec<HostTensor> = (0..world)
                    .map(|r| {
                        let mut s = shape.clone();
                        s[d] = sizes[r];
                        input(suite.seed, r, tag, dtype, &s)
                    })
                    .collect();
                let v_want = reference::all_gatherv(&v_ins, dim, &sizes)?;
                let got = comm.all_gatherv(&up(&v_ins[rank])?, dim, &sizes)?;
                compare(
                    &format!("all_gatherv dim {d} {dtype} sizes {sizes:?}"),
                    &v_want,
                    &down(&got)?,
                    true,
                )?;
                let mut rsv_shape = shape.clone();
                rsv_shape[d] = sizes.iter().sum();
                tag += 1;
                let rsv_ins = all_inputs(suite.seed, world, tag, dtype, &rsv_shape);
                let rsv_want = reference::reduce_scatterv(&rsv_ins, dim, &sizes, ReduceOp::Sum)?;
                let got = comm.reduce_scatterv(&up(&rsv_ins[rank])?, dim, &sizes, ReduceOp::Sum)?;
                compare(
                    &format!("reduce_scatterv dim {d} {dtype} sizes {sizes:?}"),
                    &rsv_want[rank],
                    &down(&got)?,
                    suite.exact,
                )?;
                checks += 3;
            }
        }
    }
    // fp8 moves as bytes: broadcast and all_gather work, reductions are refused clearly.
    tag += 1;
    let f8 = all_inputs(suite.seed, world, tag, DType::F8E4M3, &[5]);
    let got = comm.all_gather(&up(&f8[rank])?, 0)?;
    compare(
        "all_gather fp8e4m3",
        &reference::all_gather(&f8, 0)?,
        &down(&got)?,
        true,
    )?;
    if world > 1 {
        match comm.all_reduce(&up(&f8[rank])?, ReduceOp::Sum) {
            Err(Error::InvalidArgument(_)) | Err(Error::Unsupported(_)) => {}
            Err(e) => return Err(e),
            Ok(_) => {
                return Err(Error::Backend {
                    backend: "conformance",
                    code: None,
                    message: "all_reduce of fp8 on the host should be refused".into(),
                })
            }
        }
    }
    checks += 2;
    // argument errors are errors, not hangs
    let t = up(&HostTensor::zeros(DType::F32, &[3]))?;
    if comm.all_gather(&t, 1).is_ok() || comm.gather(&t, world, 0).is_ok() {
        return Err(Error::Backend {
            backend: "conformance",
            code: None,
            message: "a bad dim or dst was accepted".into(),
        });
    }
    Ok(checks + 1)
}
