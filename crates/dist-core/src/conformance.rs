//! The conformance suite every backend runs: each collective on random data, in several dtypes
//! and shapes (empty and odd sizes included), checked against the [`reference`](mod@crate::reference)
//! oracles.
//!
//! Every rank calls [`check_all`] with its own communicator. Inputs are generated from
//! `(seed, rank)`, so each rank can rebuild every other rank's input and compute the expected
//! result locally — no extra communication is needed to check.

use crate::communicator::{Comm, P2pOp, View, ViewMut};
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
///
/// In both modes a float element of `got` that is NaN or infinite where `want`'s is finite is a
/// mismatch (a tolerance test alone is false for NaN), and a NaN or infinite expected element
/// must be matched by the same class of value. In exact mode a zero matches a zero of either sign
/// (the sign of a zero `Max`/`Min` picks is not specified); everything else must be the same bits.
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
    let (wrong, not_finite) = if !want.dtype().is_reducible() || !want.dtype().is_float() {
        // integers and fp8 (moved as bytes): element by element, bit for bit
        let es = want.dtype().size();
        let wrong = want
            .as_bytes()
            .chunks(es)
            .zip(got.as_bytes().chunks(es))
            .filter(|(a, b)| a != b)
            .count();
        (wrong, 0)
    } else {
        let tol = match want.dtype() {
            DType::F16 | DType::BF16 => 2e-2,
            DType::F32 => 1e-5,
            _ => 1e-12,
        };
        let w = to_f64(want)?;
        let g = to_f64(got)?;
        let mut wrong = 0;
        let mut not_finite = 0;
        for (a, b) in w.iter().zip(&g) {
            let ok = if a.is_finite() {
                if !b.is_finite() {
                    not_finite += 1;
                    false
                } else if exact {
                    a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)
                } else {
                    (a - b).abs() <= tol * (1.0 + a.abs())
                }
            } else if a.is_nan() {
                b.is_nan()
            } else {
                a == b
            };
            if !ok {
                wrong += 1;
            }
        }
        (wrong, not_finite)
    };
    if wrong == 0 {
        return Ok(());
    }
    let nf = if not_finite > 0 {
        format!(" ({not_finite} NaN or infinite where the oracle is finite)")
    } else {
        String::new()
    };
    Err(Error::Backend {
        backend: "conformance",
        code: None,
        message: format!(
            "{what}: {wrong} of {} elements differ from the oracle{nf}",
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

fn fail(message: String) -> Error {
    Error::Backend {
        backend: "conformance",
        code: None,
        message,
    }
}

/// A tensor of `dtype` and `shape` whose bytes are all 0xA5: an output filled with it before a
/// call shows every element the call failed to write.
fn poison(dtype: DType, shape: &[usize]) -> Result<HostTensor> {
    let mut t = HostTensor::zeros(dtype, shape);
    t.as_bytes_mut().fill(0xA5);
    Ok(t)
}

/// One rank's run of the suite.
struct Checker<'c, B: Backend> {
    comm: &'c B::Communicator,
    suite: &'c Suite,
    world: usize,
    rank: usize,
    checks: usize,
    tag: u64,
}

impl<B: Backend> Checker<'_, B> {
    fn up(&self, h: &HostTensor) -> Result<B::Tensor> {
        B::from_host(h, self.comm.device())
    }
    fn down(&self, t: &B::Tensor) -> Result<HostTensor> {
        B::to_host(t)
    }
    fn next_tag(&mut self) -> u64 {
        self.tag += 1;
        self.tag
    }
    /// Compares and counts one check.
    fn expect(
        &mut self,
        what: &str,
        want: &HostTensor,
        got: &B::Tensor,
        exact: bool,
    ) -> Result<()> {
        compare(what, want, &self.down(got)?, exact)?;
        self.checks += 1;
        Ok(())
    }

    /// all_reduce (owned, in place, into a caller's output), broadcast, send/recv on 1-D tensors.
    fn pointwise(&mut self, dtype: DType, len: usize) -> Result<()> {
        let (world, rank, exact) = (self.world, self.rank, self.suite.exact);
        let tag = self.next_tag();
        let ins = all_inputs(self.suite.seed, world, tag, dtype, &[len]);
        let mine = self.up(&ins[rank])?;
        for &op in &self.suite.ops.clone() {
            let want = reference::all_reduce(&ins, op)?;
            let got = self.comm.all_reduce(&mine, op)?;
            self.expect(
                &format!("all_reduce {op} {dtype} [{len}]"),
                &want,
                &got,
                exact,
            )?;
            // the input must be unchanged
            self.expect(
                &format!("all_reduce {op} {dtype} [{len}] input untouched"),
                &ins[rank],
                &mine,
                true,
            )?;
            let mut inplace = self.up(&ins[rank])?;
            self.comm
                .all_reduce_in_place(&mut Comm::<B>::view_mut(&mut inplace), op)?;
            self.expect(
                &format!("all_reduce_in_place {op} {dtype} [{len}]"),
                &want,
                &inplace,
                exact,
            )?;
            let mut out = self.up(&poison(dtype, &[len])?)?;
            self.comm.all_reduce_into(
                &Comm::<B>::view(&mine),
                &mut Comm::<B>::view_mut(&mut out),
                op,
            )?;
            self.expect(
                &format!("all_reduce_into {op} {dtype} [{len}]"),
                &want,
                &out,
                exact,
            )?;
        }
        for src in 0..world {
            let mut t = if rank == src {
                self.up(&ins[rank])?
            } else {
                self.up(&poison(dtype, &[len])?)?
            };
            self.comm.broadcast(&mut Comm::<B>::view_mut(&mut t), src)?;
            self.expect(
                &format!("broadcast from {src} {dtype} [{len}]"),
                &ins[src],
                &t,
                true,
            )?;
        }
        if world > 1 {
            // ring send/recv: even ranks send first to avoid relying on buffering
            let next = (rank + 1) % world;
            let prev = (rank + world - 1) % world;
            let mut got = self.up(&poison(dtype, &[len])?)?;
            let v = Comm::<B>::view(&mine);
            if rank % 2 == 0 {
                self.comm.send(&v, next)?;
                self.comm.recv(&mut Comm::<B>::view_mut(&mut got), prev)?;
            } else {
                self.comm.recv(&mut Comm::<B>::view_mut(&mut got), prev)?;
                self.comm.send(&v, next)?;
            }
            self.expect(
                &format!("send/recv ring {dtype} [{len}]"),
                &ins[prev],
                &got,
                true,
            )?;
        }
        Ok(())
    }

    /// all_gather(v), gather, reduce_scatter(v) along every dim, owned and into poisoned outputs.
    fn dimwise(&mut self, dtype: DType, shape: &[usize]) -> Result<()> {
        let (world, rank, exact, seed) = (self.world, self.rank, self.suite.exact, self.suite.seed);
        let tag = self.next_tag();
        let ins = all_inputs(seed, world, tag, dtype, shape);
        let mine = self.up(&ins[rank])?;
        for d in 0..shape.len() {
            let dim = d as isize;
            let want = reference::all_gather(&ins, dim)?;
            let got = self.comm.all_gather(&mine, dim)?;
            self.expect(
                &format!("all_gather dim {d} {dtype} {shape:?}"),
                &want,
                &got,
                true,
            )?;
            let neg = dim - shape.len() as isize;
            let got = self.comm.all_gather(&mine, neg)?;
            self.expect(
                &format!("all_gather dim {neg} {dtype} {shape:?}"),
                &want,
                &got,
                true,
            )?;
            let mut out = self.up(&poison(dtype, want.shape())?)?;
            self.comm.all_gather_into(
                &Comm::<B>::view(&mine),
                &mut Comm::<B>::view_mut(&mut out),
                dim,
            )?;
            self.expect(
                &format!("all_gather_into dim {d} {dtype} {shape:?}"),
                &want,
                &out,
                true,
            )?;
            for dst in 0..world {
                let g = self.comm.gather(&mine, dst, dim)?;
                match (rank == dst, g) {
                    (true, Some(g)) => {
                        self.expect(&format!("gather to {dst} dim {d} {dtype}"), &want, &g, true)?
                    }
                    (false, None) => {}
                    (me, g) => {
                        return Err(fail(format!(
                            "gather to {dst}: rank {rank} (dst: {me}) got a result: {}",
                            g.is_some()
                        )))
                    }
                }
            }
            let dst = world - 1;
            let mut out = self.up(&poison(dtype, want.shape())?)?;
            let mut ov = (rank == dst).then(|| Comm::<B>::view_mut(&mut out));
            self.comm
                .gather_into(&Comm::<B>::view(&mine), ov.as_mut(), dst, dim)?;
            drop(ov);
            if rank == dst {
                self.expect(
                    &format!("gather_into {dst} dim {d} {dtype}"),
                    &want,
                    &out,
                    true,
                )?;
            }
            // reduce_scatter along d, over an input whose dim d is scaled to divide by world
            let mut rs_shape = shape.to_vec();
            rs_shape[d] = shape[d] * world;
            let tag = self.next_tag();
            let rs_ins = all_inputs(seed, world, tag, dtype, &rs_shape);
            let rs_want = reference::reduce_scatter(&rs_ins, dim, ReduceOp::Sum)?;
            let rs_mine = self.up(&rs_ins[rank])?;
            let got = self.comm.reduce_scatter(&rs_mine, dim, ReduceOp::Sum)?;
            self.expect(
                &format!("reduce_scatter dim {d} {dtype} {rs_shape:?}"),
                &rs_want[rank],
                &got,
                exact,
            )?;
            let mut out = self.up(&poison(dtype, rs_want[rank].shape())?)?;
            self.comm.reduce_scatter_into(
                &Comm::<B>::view(&rs_mine),
                &mut Comm::<B>::view_mut(&mut out),
                dim,
                ReduceOp::Sum,
            )?;
            self.expect(
                &format!("reduce_scatter_into dim {d} {dtype} {rs_shape:?}"),
                &rs_want[rank],
                &out,
                exact,
            )?;
            // v-variants: rank r has r+1 (or 0 for rank 1) rows along d
            let sizes: Vec<usize> = (0..world).map(|r| if r == 1 { 0 } else { r + 1 }).collect();
            let tag = self.next_tag();
            let v_ins: Vec<HostTensor> = (0..world)
                .map(|r| {
                    let mut s = shape.to_vec();
                    s[d] = sizes[r];
                    input(seed, r, tag, dtype, &s)
                })
                .collect();
            let v_want = reference::all_gatherv(&v_ins, dim, &sizes)?;
            let v_mine = self.up(&v_ins[rank])?;
            let got = self.comm.all_gatherv(&v_mine, dim, &sizes)?;
            self.expect(
                &format!("all_gatherv dim {d} {dtype} sizes {sizes:?}"),
                &v_want,
                &got,
                true,
            )?;
            let mut out = self.up(&poison(dtype, v_want.shape())?)?;
            self.comm.all_gatherv_into(
                &Comm::<B>::view(&v_mine),
                &mut Comm::<B>::view_mut(&mut out),
                dim,
                &sizes,
            )?;
            self.expect(
                &format!("all_gatherv_into dim {d} {dtype} sizes {sizes:?}"),
                &v_want,
                &out,
                true,
            )?;
            let mut rsv_shape = shape.to_vec();
            rsv_shape[d] = sizes.iter().sum();
            let tag = self.next_tag();
            let rsv_ins = all_inputs(seed, world, tag, dtype, &rsv_shape);
            let rsv_want = reference::reduce_scatterv(&rsv_ins, dim, &sizes, ReduceOp::Sum)?;
            let rsv_mine = self.up(&rsv_ins[rank])?;
            let got = self
                .comm
                .reduce_scatterv(&rsv_mine, dim, &sizes, ReduceOp::Sum)?;
            self.expect(
                &format!("reduce_scatterv dim {d} {dtype} sizes {sizes:?}"),
                &rsv_want[rank],
                &got,
                exact,
            )?;
            let mut out = self.up(&poison(dtype, rsv_want[rank].shape())?)?;
            self.comm.reduce_scatterv_into(
                &Comm::<B>::view(&rsv_mine),
                &mut Comm::<B>::view_mut(&mut out),
                dim,
                &sizes,
                ReduceOp::Sum,
            )?;
            self.expect(
                &format!("reduce_scatterv_into dim {d} {dtype} sizes {sizes:?}"),
                &rsv_want[rank],
                &out,
                exact,
            )?;
        }
        Ok(())
    }

    /// all_to_all_v with skewed counts (zeros among them), all zero, one rank receiving
    /// everything, and only the diagonal; rows of one element and of three.
    fn all_to_all_v(&mut self, dtype: DType) -> Result<()> {
        let (n, rank, seed) = (self.world, self.rank, self.suite.seed);
        type Pattern = fn(usize, usize) -> usize;
        let patterns: [(&str, Pattern); 4] = [
            ("skewed", |s, d| (s * 7 + d * 3) % 5),
            ("zero", |_, _| 0),
            ("one receiver", |s, d| if d == 0 { s + 2 } else { 0 }),
            ("diagonal", |s, d| if s == d { 3 } else { 0 }),
        ];
        for (name, f) in patterns {
            let counts: Vec<Vec<usize>> =
                (0..n).map(|s| (0..n).map(|d| f(s, d)).collect()).collect();
            for rest in [&[][..], &[3][..]] {
                let tag = self.next_tag();
                let shape_of = |rows: usize| {
                    let mut s = vec![rows];
                    s.extend_from_slice(rest);
                    s
                };
                let ins: Vec<HostTensor> = (0..n)
                    .map(|s| input(seed, s, tag, dtype, &shape_of(counts[s].iter().sum())))
                    .collect();
                let want = reference::all_to_all_v(&ins, &counts)?;
                let recv: Vec<usize> = (0..n).map(|s| counts[s][rank]).collect();
                let mine = self.up(&ins[rank])?;
                let mut out = self.up(&poison(dtype, want[rank].shape())?)?;
                self.comm.all_to_all_v_into(
                    &Comm::<B>::view(&mine),
                    &counts[rank],
                    &mut Comm::<B>::view_mut(&mut out),
                    &recv,
                )?;
                self.expect(
                    &format!("all_to_all_v {name} {dtype} rows of {rest:?}"),
                    &want[rank],
                    &out,
                    true,
                )?;
            }
        }
        Ok(())
    }

    /// batch_send_recv: every rank sends to and receives from every other in one call, with
    /// messages of several chunks (a cycle that deadlocks if sends block), list orders differing
    /// between ranks.
    fn batch_p2p(&mut self) -> Result<()> {
        let (n, rank, seed) = (self.world, self.rank, self.suite.seed);
        if n == 1 {
            return Ok(());
        }
        for dtype in [DType::F32, DType::BF16] {
            let tag = self.next_tag();
            let len = |s: usize, d: usize| (1 << 18) + 3 * s + 5 * d;
            let msg = |s: usize, d: usize| {
                input(seed, s, tag ^ ((d as u64 + 1) << 32), dtype, &[len(s, d)])
            };
            let peers: Vec<usize> = (0..n).filter(|&p| p != rank).collect();
            let sends: Vec<B::Tensor> = peers
                .iter()
                .map(|&p| self.up(&msg(rank, p)))
                .collect::<Result<_>>()?;
            let mut recvs: Vec<B::Tensor> = peers
                .iter()
                .map(|&p| self.up(&poison(dtype, &[len(p, rank)])?))
                .collect::<Result<_>>()?;
            {
                let sv: Vec<View<'_, B>> = sends.iter().map(Comm::<B>::view).collect();
                let mut rv: Vec<ViewMut<'_, B>> =
                    recvs.iter_mut().map(Comm::<B>::view_mut).collect();
                let mut ops: Vec<P2pOp<'_, View<'_, B>, ViewMut<'_, B>>> = Vec::new();
                let mut s_ops: Vec<_> = sv
                    .iter()
                    .zip(&peers)
                    .map(|(v, &p)| P2pOp::Send(v, p))
                    .collect();
                let mut r_ops: Vec<_> = rv
                    .iter_mut()
                    .zip(&peers)
                    .map(|(v, &p)| P2pOp::Recv(v, p))
                    .collect();
                if rank % 2 == 0 {
                    ops.append(&mut s_ops);
                    ops.append(&mut r_ops);
                } else {
                    ops.append(&mut r_ops);
                    ops.append(&mut s_ops);
                    ops.reverse();
                }
                self.comm.batch_send_recv(&mut ops)?;
            }
            for (t, &p) in recvs.iter().zip(&peers) {
                self.expect(
                    &format!("batch_send_recv {dtype} from {p}"),
                    &msg(p, rank),
                    t,
                    true,
                )?;
            }
        }
        Ok(())
    }
}

/// Runs the suite on `comm` (this rank's communicator of backend `B`). Collective: every rank of
/// the group must call it with the same suite. Returns how many checks passed.
///
/// Every op is checked in its owned form and into a caller's output filled with a poison pattern
/// first (an element the op does not write shows), against the [`reference`](mod@crate::reference)
/// oracles; then grouped point-to-point and all-to-all-v patterns, fp8 (moved as bytes, refused
/// by reductions), and argument errors that must be errors on every rank, not hangs.
pub fn check_all<B: Backend>(comm: &B::Communicator, suite: &Suite) -> Result<usize> {
    let world = comm.world_size();
    let rank = comm.rank();
    let mut c = Checker::<B> {
        comm,
        suite,
        world,
        rank,
        checks: 0,
        tag: 0,
    };
    for &dtype in &suite.dtypes {
        for &len in &suite.lengths {
            c.pointwise(dtype, len)?;
        }
        for shape in &suite.shapes {
            c.dimwise(dtype, shape)?;
        }
        c.all_to_all_v(dtype)?;
    }
    c.batch_p2p()?;
    // fp8 moves as bytes: broadcast and all_gather work, reductions are refused clearly.
    let tag = c.next_tag();
    let f8 = all_inputs(suite.seed, world, tag, DType::F8E4M3, &[5]);
    let got = comm.all_gather(&c.up(&f8[rank])?, 0)?;
    c.expect(
        "all_gather fp8e4m3",
        &reference::all_gather(&f8, 0)?,
        &got,
        true,
    )?;
    if world > 1 {
        match comm.all_reduce(&c.up(&f8[rank])?, ReduceOp::Sum) {
            Err(Error::InvalidArgument(_)) | Err(Error::Unsupported(_)) => {}
            Err(e) => return Err(e),
            Ok(_) => return Err(fail("all_reduce of fp8 should be refused".into())),
        }
    }
    c.checks += 1;
    // argument errors are errors, not hangs (every rank passes the same bad argument)
    let t = c.up(&HostTensor::zeros(DType::F32, &[3]))?;
    if comm.all_gather(&t, 1).is_ok() || comm.gather(&t, world, 0).is_ok() {
        return Err(fail("a bad dim or dst was accepted".into()));
    }
    let mut wrong = c.up(&HostTensor::zeros(DType::F32, &[3 * world + 1]))?;
    match comm.all_gather_into(
        &Comm::<B>::view(&t),
        &mut Comm::<B>::view_mut(&mut wrong),
        0,
    ) {
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => return Err(e),
        Ok(()) => {
            return Err(fail(
                "all_gather_into a wrongly shaped output was accepted".into(),
            ))
        }
    }
    let mut wrong_dtype = c.up(&HostTensor::zeros(DType::I32, &[3]))?;
    match comm.all_reduce_into(
        &Comm::<B>::view(&t),
        &mut Comm::<B>::view_mut(&mut wrong_dtype),
        ReduceOp::Sum,
    ) {
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => return Err(e),
        Ok(()) => {
            return Err(fail(
                "all_reduce_into an output of another dtype was accepted".into(),
            ))
        }
    }
    Ok(c.checks + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn f32s(v: &[f32]) -> HostTensor {
        HostTensor::from_slice(&[v.len()], v).unwrap()
    }

    #[test]
    fn nan_and_inf_are_mismatches_in_every_mode() {
        let want = f32s(&[1.0, 2.0, 3.0]);
        for exact in [true, false] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let got = f32s(&[1.0, bad, 3.0]);
                let e = compare("x", &want, &got, exact).unwrap_err().to_string();
                assert!(
                    e.contains("1 of 3 elements") && e.contains("NaN or infinite"),
                    "exact {exact}, {bad}: {e}"
                );
            }
            // the half types, through their own conversion
            let hw = HostTensor::from_vec(&[2], vec![f16::ONE, f16::ONE]).unwrap();
            let hg = HostTensor::from_vec(&[2], vec![f16::ONE, f16::NAN]).unwrap();
            assert!(compare("h", &hw, &hg, exact).is_err(), "exact {exact}");
            // an expected NaN or infinity is matched only by the same
            let nw = f32s(&[f32::NAN, f32::INFINITY]);
            assert!(compare("n", &nw, &f32s(&[f32::NAN, f32::INFINITY]), exact).is_ok());
            assert!(compare("n", &nw, &f32s(&[1.0, f32::INFINITY]), exact).is_err());
            assert!(compare("n", &nw, &f32s(&[f32::NAN, f32::NEG_INFINITY]), exact).is_err());
        }
    }

    #[test]
    fn tolerance_and_exactness() {
        let want = f32s(&[1.0, 0.0, -2.0]);
        let near = f32s(&[1.0 + 1e-7, -0.0, -2.0]);
        assert!(compare("t", &want, &near, false).is_ok());
        // exact: a zero of the other sign is equal, one ulp is not
        assert!(compare("t", &want, &f32s(&[1.0, -0.0, -2.0]), true).is_ok());
        assert!(compare("t", &want, &near, true).is_err());
        assert!(compare("t", &want, &f32s(&[1.1, 0.0, -2.0]), false).is_err());
        let i = HostTensor::from_vec(&[2], vec![1i32, 2]).unwrap();
        let j = HostTensor::from_vec(&[2], vec![1i32, 3]).unwrap();
        assert!(compare("i", &i, &j, false).is_err());
    }
}
