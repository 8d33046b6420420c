//! Mutation check of the conformance suite: the real shared-memory communicator, wrapped so that
//! one collective's result is corrupted the way a backend bug would corrupt it, must fail
//! `dist_core::conformance::check_all`, and the check that catches it is the one for that op.
//!
//! Each test prints `mutation <name>: caught by <check>`; an unwrapped (identity) run of the same
//! wrapper passes the whole suite, so what fails is the mutation, not the wrapper.

use std::time::Duration;

use dist_core::communicator::P2pOp;
use dist_core::conformance::{check_all, Suite};
use dist_core::local::run_threads;
use dist_core::{
    Backend, CommunicatorContext, DType, Device, DeviceCommunicator, Error, HostTensor, HostView,
    HostViewMut, ReduceOp, Result, Tensor,
};
use dist_cpu::{CpuCommunicator, ShmCommunicator};

/// How the wrapped communicator corrupts its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    /// No corruption (the control run).
    Identity,
    /// all_reduce computes `Min` when asked for `Max`.
    MaxIsMin,
    /// all_reduce `Sum` leaves out the last rank's contribution.
    SumDropsLastRank,
    /// all_reduce writes 0 over the middle element of its result.
    ZeroesOneElement,
    /// all_gather leaves the last element of its output unwritten.
    GatherDropsLastElement,
    /// all_gather puts rank 1's block before rank 0's.
    AllGatherRanksSwapped,
    /// gather (to any dst) puts rank 1's block before rank 0's.
    GatherRanksSwapped,
    /// reduce_scatter reads its chunk one element too far (offset + 1).
    ReduceScatterOffByOne,
    /// all_to_all_v places received rows one element too early (offset - 1).
    AllToAllOffByOne,
    /// all_reduce returns NaN in its first element.
    NanInAllReduce,
}

/// The real shared-memory communicator with one [`Mutation`] applied to its results.
#[derive(Debug)]
struct Faulty {
    inner: CpuCommunicator,
    mutation: Mutation,
}

/// The backend whose communicator is [`Faulty`]; tensors are the CPU backend's host tensors.
struct FaultyBackend;

impl Backend for FaultyBackend {
    const NAME: &'static str = "faulty-cpu";
    type Tensor = HostTensor;
    type Communicator = Faulty;
    fn create_communicator(_: &CommunicatorContext) -> Result<Faulty> {
        Err(Error::unsupported("the test builds Faulty itself"))
    }
    fn to_host(t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }
    fn from_host(t: &HostTensor, _: Device) -> Result<HostTensor> {
        Ok(t.clone())
    }
}

fn axis(dim: isize, ndim: usize) -> usize {
    if dim < 0 {
        (dim + ndim as isize) as usize
    } else {
        dim as usize
    }
}

/// Swaps the blocks of ranks 0 and 1 along `dim` in an all-gather result of `world` equal blocks.
fn swap_rank_blocks(out: &mut HostViewMut<'_>, dim: isize, world: usize) {
    if world < 2 || out.numel() == 0 {
        return;
    }
    let shape = out.shape().to_vec();
    let d = axis(dim, shape.len());
    let es = out.dtype().size();
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product::<usize>() * es;
    let block = shape[d] / world * inner;
    let bytes = out.as_bytes_mut();
    for o in 0..outer {
        let base = o * world * block;
        let (a, b) = bytes[base..base + 2 * block].split_at_mut(block);
        a.swap_with_slice(b);
    }
}

/// `out[i] = out[i + 1]` for every element but the last: the result read one element too far.
fn shift_left(out: &mut HostViewMut<'_>) {
    let es = out.dtype().size();
    let bytes = out.as_bytes_mut();
    if bytes.len() > es {
        bytes.copy_within(es.., 0);
    }
}

/// `out[i + 1] = out[i]`: the result placed one element too late (its first element kept).
fn shift_right(out: &mut HostViewMut<'_>) {
    let es = out.dtype().size();
    let bytes = out.as_bytes_mut();
    if bytes.len() > es {
        let n = bytes.len();
        bytes.copy_within(..n - es, es);
    }
}

impl Faulty {
    fn is(&self, m: Mutation) -> bool {
        self.mutation == m
    }
    /// Applies the all_reduce mutations to `out`, the result of `op`.
    fn corrupt_reduction(&self, out: &mut HostViewMut<'_>) {
        let n = out.numel();
        if n == 0 {
            return;
        }
        let es = out.dtype().size();
        if self.is(Mutation::ZeroesOneElement) {
            let i = n / 2;
            out.as_bytes_mut()[i * es..(i + 1) * es].fill(0);
        }
        if self.is(Mutation::NanInAllReduce) {
            let nan: Vec<u8> = match out.dtype() {
                DType::F32 => f32::NAN.to_ne_bytes().to_vec(),
                DType::F64 => f64::NAN.to_ne_bytes().to_vec(),
                DType::F16 => dist_core::half::f16::NAN.to_ne_bytes().to_vec(),
                DType::BF16 => dist_core::half::bf16::NAN.to_ne_bytes().to_vec(),
                _ => return,
            };
            out.as_bytes_mut()[..es].copy_from_slice(&nan);
        }
    }
    fn op(&self, op: ReduceOp) -> ReduceOp {
        if self.is(Mutation::MaxIsMin) && op == ReduceOp::Max {
            ReduceOp::Min
        } else {
            op
        }
    }
    /// The last rank's input replaced by zeros, when its contribution is to be dropped.
    fn dropped_input(&self, input: &HostView<'_>, op: ReduceOp) -> Option<HostTensor> {
        (self.is(Mutation::SumDropsLastRank)
            && op == ReduceOp::Sum
            && self.rank() + 1 == self.world_size()
            && self.world_size() > 1)
            .then(|| HostTensor::zeros(input.dtype(), input.shape()))
    }
}

impl DeviceCommunicator for Faulty {
    // The items CpuCommunicator itself takes from this macro (views, copy, device, empty).
    dist_core::host_communicator_items!();
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<HostTensor> {
        self.inner.alloc(dtype, shape)
    }
    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        match self.dropped_input(input, op) {
            Some(z) => self.inner.all_reduce_into(&z.view(), output, op)?,
            None => self.inner.all_reduce_into(input, output, self.op(op))?,
        }
        self.corrupt_reduction(output);
        Ok(())
    }
    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        if self.dropped_input(&tensor.as_view(), op).is_some() {
            tensor.as_bytes_mut().fill(0);
        }
        self.inner.all_reduce_in_place(tensor, self.op(op))?;
        self.corrupt_reduction(tensor);
        Ok(())
    }
    fn all_gather_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        let es = output.dtype().size();
        let n = output.nbytes();
        let kept = output.as_bytes()[n.saturating_sub(es)..].to_vec();
        self.inner.all_gather_into(input, output, dim)?;
        if self.is(Mutation::GatherDropsLastElement) {
            output.as_bytes_mut()[n.saturating_sub(es)..].copy_from_slice(&kept);
        }
        if self.is(Mutation::AllGatherRanksSwapped) {
            swap_rank_blocks(output, dim, self.world_size());
        }
        Ok(())
    }
    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.inner.all_gatherv_into(input, output, dim, sizes)
    }
    fn reduce_scatter_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        self.inner.reduce_scatter_into(input, output, dim, op)?;
        if self.is(Mutation::ReduceScatterOffByOne) {
            shift_left(output);
        }
        Ok(())
    }
    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.inner
            .reduce_scatterv_into(input, output, dim, sizes, op)
    }
    fn gather_into(
        &self,
        input: &HostView<'_>,
        mut output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        self.inner
            .gather_into(input, output.as_deref_mut(), dst, dim)?;
        if let (true, Some(out)) = (self.is(Mutation::GatherRanksSwapped), output) {
            swap_rank_blocks(out, dim, self.world_size());
        }
        Ok(())
    }
    fn broadcast(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        self.inner.broadcast(tensor, src)
    }
    fn send(&self, tensor: &HostView<'_>, dst: usize) -> Result<()> {
        self.inner.send(tensor, dst)
    }
    fn recv(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        self.inner.recv(tensor, src)
    }
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        self.inner.batch_send_recv(ops)
    }
    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        self.inner
            .all_to_all_v_into(input, send_counts, output, recv_counts)?;
        if self.is(Mutation::AllToAllOffByOne) {
            shift_right(output);
        }
        Ok(())
    }
    fn destroy(&self) -> Result<()> {
        self.inner.destroy()
    }
}

/// Deadline of the control run's calls.
const T: Duration = Duration::from_secs(60);
/// Deadline of a mutated run's calls: ranks left blocked in a collective by a rank whose check
/// failed time out after this.
const T_MUTATED: Duration = Duration::from_secs(5);
const WORLD: usize = 3;

/// Runs the suite on `WORLD` thread ranks through [`Faulty`] with `mutation`; each rank's outcome.
fn run(mutation: Mutation, suite: &Suite) -> Vec<Result<usize>> {
    let name = format!("mut-{mutation:?}");
    let t = if mutation == Mutation::Identity {
        T
    } else {
        T_MUTATED
    };
    run_threads(WORLD, t, |_, g| {
        let inner = CpuCommunicator::Shm(ShmCommunicator::new(&g, &name, t)?);
        check_all::<FaultyBackend>(&Faulty { inner, mutation }, suite)
    })
    .into_iter()
    .enumerate()
    .map(|(r, x)| x.unwrap_or_else(|_| panic!("{mutation:?}: rank {r} panicked")))
    .collect()
}

/// Asserts the suite fails under `mutation`, caught on some rank by a conformance check whose
/// name starts with `check`; prints and returns that check.
fn assert_caught(name: &str, mutation: Mutation, suite: Suite, check: &str) {
    let outcomes = run(mutation, &suite);
    let caught: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Err(Error::Backend {
                backend: "conformance",
                message,
                ..
            }) => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "mutation {name} was not caught by any check: {outcomes:?}"
    );
    let first = &caught[0];
    assert!(
        first.starts_with(check),
        "mutation {name} caught by an unexpected check: {first}"
    );
    let by = first.split(": ").next().unwrap_or(first);
    println!("mutation {name}: caught by {by} ({first})");
}

#[test]
fn identity_wrapper_passes() {
    for r in run(Mutation::Identity, &Suite::quick(true)) {
        let checks = r.expect("the unmutated communicator passes the suite");
        assert!(checks > 100, "only {checks} checks");
    }
}

#[test]
fn mutation_max_is_min() {
    assert_caught(
        "max-is-min",
        Mutation::MaxIsMin,
        Suite::quick(true),
        "all_reduce max",
    );
}

#[test]
fn mutation_sum_drops_last_rank() {
    assert_caught(
        "sum-drops-last-rank",
        Mutation::SumDropsLastRank,
        Suite::quick(true),
        "all_reduce sum",
    );
}

#[test]
fn mutation_zeroes_one_element() {
    assert_caught(
        "all_reduce-zeroes-one-element",
        Mutation::ZeroesOneElement,
        Suite::quick(true),
        "all_reduce sum",
    );
}

#[test]
fn mutation_gather_drops_last_element() {
    assert_caught(
        "all_gather-drops-last-element",
        Mutation::GatherDropsLastElement,
        Suite::quick(true),
        "all_gather",
    );
}

#[test]
fn mutation_all_gather_ranks_swapped() {
    assert_caught(
        "all_gather-ranks-swapped",
        Mutation::AllGatherRanksSwapped,
        Suite::quick(true),
        "all_gather dim 0",
    );
}

#[test]
fn mutation_gather_ranks_swapped() {
    assert_caught(
        "gather-ranks-swapped",
        Mutation::GatherRanksSwapped,
        Suite::quick(true),
        "gather to 0",
    );
}

#[test]
fn mutation_reduce_scatter_off_by_one() {
    assert_caught(
        "reduce_scatter-offset-plus-one",
        Mutation::ReduceScatterOffByOne,
        Suite::quick(true),
        "reduce_scatter dim",
    );
}

#[test]
fn mutation_all_to_all_off_by_one() {
    assert_caught(
        "all_to_all_v-offset-minus-one",
        Mutation::AllToAllOffByOne,
        Suite::quick(true),
        "all_to_all_v",
    );
}

/// The device backends run the suite with a tolerance: NaN must still be a mismatch.
#[test]
fn mutation_nan_caught_with_tolerance() {
    assert_caught(
        "nan-in-all_reduce (tolerance mode)",
        Mutation::NanInAllReduce,
        Suite::quick(false),
        "all_reduce sum f32 [1]",
    );
}
