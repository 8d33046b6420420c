//! The device communicator trait and the [`Backend`] trait family that ties a tensor type to it.

use std::sync::Arc;
use std::time::Duration;

use crate::tensor::{normalize_dim, with_dim};
use crate::{
    DType, Device, Error, HostGroup, HostTensor, HostView, HostViewMut, ReduceOp, Result, Store,
    Tensor,
};

/// Default deadline of collective calls (`DIST_TIMEOUT` overrides it where the facade reads the environment).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One operation of a grouped point-to-point call ([`DeviceCommunicator::batch_send_recv`],
/// vLLM's `batch_isend_irecv`): send a view to a peer, or receive from a peer into a view.
#[derive(Debug)]
pub enum P2pOp<'v, V, M> {
    /// Send the tensor to the group rank.
    Send(&'v V, usize),
    /// Receive into the tensor from the group rank.
    Recv(&'v mut M, usize),
}

impl<V, M> P2pOp<'_, V, M> {
    /// The peer of the operation.
    pub fn peer(&self) -> usize {
        match self {
            P2pOp::Send(_, p) | P2pOp::Recv(_, p) => *p,
        }
    }
}

/// Collectives among the ranks of one group, on a backend's tensors.
///
/// Every op works on *views* — [`Self::View`] to read, [`Self::ViewMut`] to write — that borrow
/// memory somebody else owns: an engine's buffers (a host slice, a device allocation on the
/// engine's stream) or the backend's own tensors ([`Self::view`], [`Self::view_mut`]). The
/// outputs are the caller's too (`*_into`), so no op allocates its result; the owned forms
/// (`all_reduce`, `all_gather`, …) are provided on top, taking their outputs from
/// [`Self::alloc`] (a pool of touched buffers where the backend has one).
///
/// Ranks (`src`, `dst`) are ranks within the group. Every call is bounded by [`Self::timeout`]:
/// a peer that does not arrive in time is an [`Error::Timeout`] naming it, a peer that died is
/// [`Error::PeerLost`]. Results have vLLM's layouts (see [`crate::reference`], the oracle of
/// every implementation). A wrong output shape or dtype is [`Error::InvalidArgument`], checked
/// before any data moves. Methods take `&self`: implementations keep their mutable state behind
/// their own lock so a coordinator can be shared process-wide.
pub trait DeviceCommunicator: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's owned tensor type.
    type Tensor: Tensor;
    /// A borrowed tensor the ops read.
    type View<'a>: Tensor;
    /// A borrowed tensor the ops write.
    type ViewMut<'a>: Tensor;

    /// The read view of an owned tensor.
    fn view(t: &Self::Tensor) -> Self::View<'_>;
    /// The write view of an owned tensor.
    fn view_mut(t: &mut Self::Tensor) -> Self::ViewMut<'_>;
    /// Copies `src` into `dst` (same dtype and element count), on the device for device views
    /// (ordered on the views' stream). What a one-rank group's out-of-place ops do.
    fn copy(src: &Self::View<'_>, dst: &mut Self::ViewMut<'_>) -> Result<()>;
    /// Elements `[start, start + len)` of a dense view, as a 1-D view of the same memory (the PP
    /// tensor-dict protocol sends such slices). Backends whose views cannot be narrowed say so.
    fn narrow<'a>(v: &Self::View<'a>, start: usize, len: usize) -> Result<Self::View<'a>> {
        let _ = (v, start, len);
        Err(Error::unsupported(
            "this backend's views cannot be narrowed; send owned tensors",
        ))
    }

    /// This rank within the group.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Deadline of every blocking call.
    fn timeout(&self) -> Duration;
    /// Changes the deadline of later calls.
    fn set_timeout(&self, timeout: Duration);
    /// The device this communicator's tensors live on.
    fn device(&self) -> Device;

    /// A new zero-filled tensor on this communicator's device.
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<Self::Tensor>;
    /// A new tensor whose contents are unspecified (outputs every element of which an op
    /// writes). Host backends serve it from a pool of touched buffers; the default is [`Self::empty`].
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Self::Tensor> {
        self.empty(dtype, shape)
    }

    /// Reduces `input` over all ranks into `output` (same dtype and shape).
    fn all_reduce_into(
        &self,
        input: &Self::View<'_>,
        output: &mut Self::ViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()>;
    /// Reduces `tensor` over all ranks in place.
    fn all_reduce_in_place(&self, tensor: &mut Self::ViewMut<'_>, op: ReduceOp) -> Result<()>;
    /// `output = cat([x_0 … x_{n-1}], dim)`. The default is [`Self::all_gatherv_into`] with
    /// every rank's length along `dim` this rank's.
    fn all_gather_into(
        &self,
        input: &Self::View<'_>,
        output: &mut Self::ViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        let d = check_collective_dim(input.shape(), dim, "all_gather")?;
        let sizes = vec![input.shape()[d]; self.world_size()];
        self.all_gatherv_into(input, output, dim, &sizes)
    }
    /// `cat` along `dim` of inputs whose lengths there are `sizes[r]`.
    fn all_gatherv_into(
        &self,
        input: &Self::View<'_>,
        output: &mut Self::ViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()>;
    /// This rank's chunk along `dim` of the reduction (`shape[dim]` divisible by the world size).
    /// The default is [`Self::reduce_scatterv_into`] with equal chunks.
    fn reduce_scatter_into(
        &self,
        input: &Self::View<'_>,
        output: &mut Self::ViewMut<'_>,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.world_size();
        reduce_scatter_shape(input.shape(), dim, n)?;
        let d = check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        let sizes = vec![input.shape()[d] / n; n];
        self.reduce_scatterv_into(input, output, dim, &sizes, op)
    }
    /// This rank's chunk of `sizes[rank]` along `dim` of the reduction.
    fn reduce_scatterv_into(
        &self,
        input: &Self::View<'_>,
        output: &mut Self::ViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()>;
    /// `dst` receives `cat(inputs, dim)` into its `output` (which it must pass); the others pass `None`.
    fn gather_into(
        &self,
        input: &Self::View<'_>,
        output: Option<&mut Self::ViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()>;
    /// Overwrites `tensor` with `src`'s, in place.
    fn broadcast(&self, tensor: &mut Self::ViewMut<'_>, src: usize) -> Result<()>;
    /// Sends `tensor` to `dst`.
    fn send(&self, tensor: &Self::View<'_>, dst: usize) -> Result<()>;
    /// Receives from `src` into `tensor`, whose dtype and size must match the sender's.
    fn recv(&self, tensor: &mut Self::ViewMut<'_>, src: usize) -> Result<()>;
    /// Sends and receives as one grouped operation (vLLM's `batch_isend_irecv`): every rank passes
    /// its list; the call completes once all of them have, in any order, without deadlock
    /// whatever the pattern. At most one send and one receive per peer and direction pair is
    /// matched in list order.
    fn batch_send_recv(
        &self,
        ops: &mut [P2pOp<'_, Self::View<'_>, Self::ViewMut<'_>>],
    ) -> Result<()>;
    /// All-to-all with per-peer counts along dim 0: rows `[off_p, off_p + send_counts[p])` of
    /// `input` go to rank `p`; `output` receives `recv_counts[p]` rows from each `p`, in rank
    /// order. Every rank's `send_counts[q]` toward rank `q` must equal `q`'s `recv_counts` entry
    /// for it (exchange counts first, as [`crate::GroupCoordinator::all_to_all_v`] does).
    fn all_to_all_v_into(
        &self,
        input: &Self::View<'_>,
        send_counts: &[usize],
        output: &mut Self::ViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()>;

    /// Reduces `input` over all ranks into a new tensor (the input is unchanged).
    fn all_reduce(&self, input: &Self::Tensor, op: ReduceOp) -> Result<Self::Tensor> {
        let mut out = self.alloc(input.dtype(), input.shape())?;
        self.all_reduce_into(&Self::view(input), &mut Self::view_mut(&mut out), op)?;
        Ok(out)
    }
    /// `cat([x_0 … x_{n-1}], dim)` into a new tensor.
    fn all_gather(&self, input: &Self::Tensor, dim: isize) -> Result<Self::Tensor> {
        let shape = all_gather_shape(input.shape(), dim, self.world_size(), "all_gather")?;
        let mut out = self.alloc(input.dtype(), &shape)?;
        self.all_gather_into(&Self::view(input), &mut Self::view_mut(&mut out), dim)?;
        Ok(out)
    }
    /// `cat` along `dim` of inputs whose lengths there are `sizes[r]`, into a new tensor.
    fn all_gatherv(
        &self,
        input: &Self::Tensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<Self::Tensor> {
        let shape = all_gatherv_shape(input.shape(), dim, sizes, self.world_size(), self.rank())?;
        let mut out = self.alloc(input.dtype(), &shape)?;
        self.all_gatherv_into(
            &Self::view(input),
            &mut Self::view_mut(&mut out),
            dim,
            sizes,
        )?;
        Ok(out)
    }
    /// This rank's chunk along `dim` of the reduction, in a new tensor.
    fn reduce_scatter(
        &self,
        input: &Self::Tensor,
        dim: isize,
        op: ReduceOp,
    ) -> Result<Self::Tensor> {
        let shape = reduce_scatter_shape(input.shape(), dim, self.world_size())?;
        let mut out = self.alloc(input.dtype(), &shape)?;
        self.reduce_scatter_into(&Self::view(input), &mut Self::view_mut(&mut out), dim, op)?;
        Ok(out)
    }
    /// This rank's chunk of `sizes[rank]` along `dim` of the reduction, in a new tensor.
    fn reduce_scatterv(
        &self,
        input: &Self::Tensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<Self::Tensor> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        let shape = reduce_scatterv_shape(input.shape(), d, sizes, self.world_size(), self.rank())?;
        let mut out = self.alloc(input.dtype(), &shape)?;
        self.reduce_scatterv_into(
            &Self::view(input),
            &mut Self::view_mut(&mut out),
            dim,
            sizes,
            op,
        )?;
        Ok(out)
    }
    /// `dst` gets `Some(cat(inputs, dim))`, the others `None`.
    fn gather(&self, input: &Self::Tensor, dst: usize, dim: isize) -> Result<Option<Self::Tensor>> {
        crate::ensure_arg!(
            dst < self.world_size(),
            "gather: dst {dst} out of range for world size {}",
            self.world_size()
        );
        let shape = all_gather_shape(input.shape(), dim, self.world_size(), "gather")?;
        if self.rank() == dst {
            let mut out = self.alloc(input.dtype(), &shape)?;
            self.gather_into(
                &Self::view(input),
                Some(&mut Self::view_mut(&mut out)),
                dst,
                dim,
            )?;
            Ok(Some(out))
        } else {
            self.gather_into(&Self::view(input), None, dst, dim)?;
            Ok(None)
        }
    }

    /// Waits until every operation this communicator enqueued has finished on the device
    /// (benchmarks time with it). A no-op for host backends, whose calls return when done.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Enters a graph-capture scope (CUDA graphs); a no-op where the backend has no graphs.
    fn begin_capture(&self) -> Result<()> {
        Ok(())
    }
    /// Leaves a graph-capture scope; collective where the backend registers graph buffers.
    fn end_capture(&self) -> Result<()> {
        Ok(())
    }
    /// Releases the communicator's resources; later calls fail with [`Error::NotInitialized`].
    fn destroy(&self) -> Result<()>;
}

/// The communicator type of backend `B`.
pub type Comm<B> = <B as Backend>::Communicator;
/// The read view of backend `B` (what its collectives take as input).
pub type View<'a, B> = <Comm<B> as DeviceCommunicator>::View<'a>;
/// The write view of backend `B` (what its collectives write).
pub type ViewMut<'a, B> = <Comm<B> as DeviceCommunicator>::ViewMut<'a>;

/// Everything a backend needs to build the communicator of one group.
#[derive(Debug, Clone)]
pub struct CommunicatorContext {
    /// Unique group name (`"tp:0"`), used to name shared segments and in logs.
    pub group_name: String,
    /// Global ranks of the group, in group order.
    pub ranks: Vec<usize>,
    /// This process's rank within the group.
    pub rank_in_group: usize,
    /// This process's local rank (its device index).
    pub local_rank: usize,
    /// The group's host group, for rendezvous and handle exchange.
    pub host_group: Arc<dyn HostGroup>,
    /// The job's store.
    pub store: Arc<dyn Store>,
    /// Deadline of every blocking call.
    pub timeout: Duration,
}

/// One hardware backend: its tensor type and its communicator, and how to move tensors to and
/// from the host. Model code is generic over `B: Backend` and depends on `dist-core` alone.
pub trait Backend: Send + Sync + 'static {
    /// Name used by `DIST_BACKEND` and in tables (`"cpu"`, `"cuda"`…).
    const NAME: &'static str;
    /// The tensor type.
    type Tensor: Tensor + Clone;
    /// The communicator type.
    type Communicator: DeviceCommunicator<Tensor = Self::Tensor>;

    /// Builds the communicator of a group. Collective over the group's host group.
    fn create_communicator(ctx: &CommunicatorContext) -> Result<Self::Communicator>;
    /// Copies a tensor to the host.
    fn to_host(t: &Self::Tensor) -> Result<HostTensor>;
    /// Copies a host tensor to `device`.
    fn from_host(t: &HostTensor, device: Device) -> Result<Self::Tensor>;

    /// The same elements with another shape. The default goes through the host; backends
    /// whose tensors can be re-viewed in place override it.
    fn reshape(t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        let device = t.device();
        Self::from_host(&Self::to_host(&t)?.reshape(shape)?, device)
    }

    /// A 1-D copy of `len` elements starting at flat element `start` of a contiguous tensor.
    /// The default goes through the host; device backends override it with a device copy.
    fn flat_slice(t: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor> {
        crate::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= t.numel()),
            "flat_slice [{start}, {start}+{len}) out of range for {} elements",
            t.numel()
        );
        let h = Self::to_host(t)?;
        let es = h.dtype().size();
        let part = HostTensor::from_bytes(
            h.dtype(),
            &[len],
            &h.as_bytes()[start * es..(start + len) * es],
        )?;
        Self::from_host(&part, t.device())
    }
}

/// A one-writer, many-reader broadcast channel a coordinator uses for `broadcast_object`
/// (vLLM's MessageQueue broadcaster). The writer is group rank 0 of the coordinator.
pub trait Broadcaster: Send + Sync + std::fmt::Debug {
    /// True on the writer's rank.
    fn is_writer(&self) -> bool;
    /// Writer: publishes one message to every reader.
    fn enqueue_bytes(&self, data: &[u8]) -> Result<()>;
    /// Reader: the next message.
    fn dequeue_bytes(&self) -> Result<Vec<u8>>;
}

/// Checks the arguments every all-gather/reduce-scatter shares and returns the normalised dim.
pub fn check_collective_dim(shape: &[usize], dim: isize, op: &str) -> Result<usize> {
    crate::ensure_arg!(!shape.is_empty(), "{op}: a 0-d tensor has no dim to use");
    normalize_dim(dim, shape.len())
}

/// The output shape of `all_gather(dim)` over `world` ranks.
pub fn all_gather_shape(shape: &[usize], dim: isize, world: usize, op: &str) -> Result<Vec<usize>> {
    let d = check_collective_dim(shape, dim, op)?;
    let len = shape[d].checked_mul(world).ok_or_else(|| {
        Error::invalid(format!(
            "{op}: dim {d} of {shape:?} times {world} overflows"
        ))
    })?;
    Ok(with_dim(shape, d, len))
}

/// The output shape of `all_gatherv(dim, sizes)`, after checking `sizes` against the input.
pub fn all_gatherv_shape(
    shape: &[usize],
    dim: isize,
    sizes: &[usize],
    world: usize,
    rank: usize,
) -> Result<Vec<usize>> {
    let d = check_collective_dim(shape, dim, "all_gatherv")?;
    crate::ensure_arg!(
        sizes.len() == world,
        "all_gatherv: {} sizes for world size {world}",
        sizes.len()
    );
    crate::ensure_arg!(
        sizes[rank] == shape[d],
        "all_gatherv: this rank's input has {} along dim {d}, sizes say {}",
        shape[d],
        sizes[rank]
    );
    let total = sizes
        .iter()
        .try_fold(0usize, |a, &s| a.checked_add(s))
        .ok_or_else(|| Error::invalid(format!("all_gatherv: sizes {sizes:?} overflow")))?;
    Ok(with_dim(shape, d, total))
}

/// The output shape of `reduce_scatter(dim)` over `world` ranks (`shape[dim]` must divide).
pub fn reduce_scatter_shape(shape: &[usize], dim: isize, world: usize) -> Result<Vec<usize>> {
    let d = check_collective_dim(shape, dim, "reduce_scatter")?;
    crate::ensure_arg!(
        shape[d] % world == 0,
        "reduce_scatter: dim {d} of shape {shape:?} is not divisible by world size {world}"
    );
    Ok(with_dim(shape, d, shape[d] / world))
}

/// Checks an output view against the dtype and shape an op writes.
pub fn check_output(op: &str, out: &impl Tensor, dtype: DType, shape: &[usize]) -> Result<()> {
    crate::ensure_arg!(
        out.dtype() == dtype && out.shape() == shape,
        "{op}: the output is {} {:?}, the op writes {dtype} {shape:?}",
        out.dtype(),
        out.shape()
    );
    Ok(())
}

/// Checks `send_counts` / `recv_counts` of an all-to-all-v against the input and output
/// (dim-0 rows, the other dims equal) and returns the bytes of one row.
pub fn check_all_to_all_v(
    input: &impl Tensor,
    send_counts: &[usize],
    output: &impl Tensor,
    recv_counts: &[usize],
    world: usize,
) -> Result<usize> {
    let (i, o) = (input.shape(), output.shape());
    crate::ensure_arg!(
        !i.is_empty() && !o.is_empty(),
        "all_to_all_v: the input and output need a dim 0 (got {i:?} and {o:?})"
    );
    crate::ensure_arg!(
        input.dtype() == output.dtype() && i[1..] == o[1..],
        "all_to_all_v: input {} {i:?} and output {} {o:?} differ beyond dim 0",
        input.dtype(),
        output.dtype()
    );
    crate::ensure_arg!(
        send_counts.len() == world && recv_counts.len() == world,
        "all_to_all_v: {} send and {} receive counts for world size {world}",
        send_counts.len(),
        recv_counts.len()
    );
    let sum = |c: &[usize]| c.iter().try_fold(0usize, |a, &x| a.checked_add(x));
    crate::ensure_arg!(
        sum(send_counts) == Some(i[0]),
        "all_to_all_v: send counts {send_counts:?} do not sum to the input's {} rows",
        i[0]
    );
    crate::ensure_arg!(
        sum(recv_counts) == Some(o[0]),
        "all_to_all_v: receive counts {recv_counts:?} do not sum to the output's {} rows",
        o[0]
    );
    Ok(i[1..].iter().product::<usize>() * input.dtype().size())
}

/// The output shape of `reduce_scatterv`, after checking `sizes` against the input.
pub fn reduce_scatterv_shape(
    shape: &[usize],
    dim: usize,
    sizes: &[usize],
    world: usize,
    rank: usize,
) -> Result<Vec<usize>> {
    crate::ensure_arg!(
        sizes.len() == world,
        "reduce_scatterv: {} sizes for world size {world}",
        sizes.len()
    );
    crate::ensure_arg!(
        sizes.iter().sum::<usize>() == shape[dim],
        "reduce_scatterv: sizes {sizes:?} do not sum to {} (dim {dim} of {shape:?})",
        shape[dim]
    );
    Ok(with_dim(shape, dim, sizes[rank]))
}

/// The backend of a single process: host tensors and a world-size-1 communicator for which
/// every collective is the identity (as vLLM's coordinator does for `world_size == 1`).
///
/// It always compiles, so code generic over [`Backend`] type-checks with no hardware feature,
/// and it is what a one-rank group uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalBackend;

/// The communicator of [`LocalBackend`]: world size 1.
#[derive(Debug, Default)]
pub struct LocalCommunicator {
    timeout: TimeoutCell,
}

impl Backend for LocalBackend {
    const NAME: &'static str = "local";
    type Tensor = HostTensor;
    type Communicator = LocalCommunicator;
    fn create_communicator(ctx: &CommunicatorContext) -> Result<LocalCommunicator> {
        crate::ensure_arg!(
            ctx.ranks.len() == 1,
            "the local backend serves one rank, group {} has {}",
            ctx.group_name,
            ctx.ranks.len()
        );
        Ok(LocalCommunicator::default())
    }
    fn to_host(t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }
    fn from_host(t: &HostTensor, _device: Device) -> Result<HostTensor> {
        Ok(t.clone())
    }
}

fn only_rank_zero(r: usize, what: &str) -> Result<()> {
    crate::ensure_arg!(r == 0, "{what} {r} out of range for world size 1");
    Ok(())
}

/// The result of a one-rank collective: `output` gets `input`'s elements.
fn copy_whole(op: &str, input: &HostView<'_>, output: &mut HostViewMut<'_>) -> Result<()> {
    check_output(op, output, input.dtype(), input.shape())?;
    output.as_bytes_mut().copy_from_slice(input.as_bytes());
    Ok(())
}

/// The items every [`DeviceCommunicator`] on [`HostTensor`]s writes alike, for use inside its
/// `impl DeviceCommunicator for … { … }` block: the tensor and view types ([`HostTensor`],
/// [`HostView`], [`HostViewMut`]), `view`, `view_mut`, `copy` ([`host_copy`]), `narrow`,
/// `device` ([`Device::CPU`]) and `empty` (zeros).
///
/// `host_communicator_items!(timeout = t, pool = p)` adds `timeout` and `set_timeout` from the
/// communicator's [`TimeoutCell`] field `t`, and `alloc` from its [`crate::HostPool`] field `p`.
/// The communicator writes the rest: its ranks and its collectives.
#[macro_export]
macro_rules! host_communicator_items {
    () => {
        type Tensor = $crate::HostTensor;
        type View<'a> = $crate::HostView<'a>;
        type ViewMut<'a> = $crate::HostViewMut<'a>;
        fn view(t: &$crate::HostTensor) -> $crate::HostView<'_> {
            t.view()
        }
        fn view_mut(t: &mut $crate::HostTensor) -> $crate::HostViewMut<'_> {
            t.view_mut()
        }
        fn copy(
            src: &$crate::HostView<'_>,
            dst: &mut $crate::HostViewMut<'_>,
        ) -> $crate::Result<()> {
            $crate::communicator::host_copy(src, dst)
        }
        fn narrow<'a>(
            v: &Self::View<'a>,
            start: usize,
            len: usize,
        ) -> $crate::Result<Self::View<'a>> {
            v.narrow(start, len)
        }
        fn device(&self) -> $crate::Device {
            $crate::Device::CPU
        }
        fn empty(
            &self,
            dtype: $crate::DType,
            shape: &[usize],
        ) -> $crate::Result<$crate::HostTensor> {
            Ok($crate::HostTensor::zeros(dtype, shape))
        }
    };
    (timeout = $timeout:ident, pool = $pool:ident) => {
        $crate::host_communicator_items!();
        fn timeout(&self) -> std::time::Duration {
            self.$timeout.get()
        }
        fn set_timeout(&self, timeout: std::time::Duration) {
            self.$timeout.set(timeout)
        }
        fn alloc(
            &self,
            dtype: $crate::DType,
            shape: &[usize],
        ) -> $crate::Result<$crate::HostTensor> {
            self.$pool.tensor(dtype, shape)
        }
    };
}

/// A communicator's deadline, settable through `&self` ([`DeviceCommunicator::set_timeout`]).
#[derive(Debug)]
pub struct TimeoutCell(std::sync::atomic::AtomicU64);

impl TimeoutCell {
    /// A cell holding `timeout` (saturated at `u64::MAX` nanoseconds).
    pub fn new(timeout: Duration) -> Self {
        TimeoutCell(std::sync::atomic::AtomicU64::new(Self::nanos(timeout)))
    }
    /// The deadline.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
    /// Replaces the deadline.
    pub fn set(&self, timeout: Duration) {
        self.0
            .store(Self::nanos(timeout), std::sync::atomic::Ordering::Relaxed);
    }
    fn nanos(timeout: Duration) -> u64 {
        timeout.as_nanos().min(u64::MAX as u128) as u64
    }
}

impl Default for TimeoutCell {
    fn default() -> Self {
        TimeoutCell::new(DEFAULT_TIMEOUT)
    }
}

/// The checks of a `reduce_scatterv_into` before anything moves: `input`'s dtype reduces, `dim`
/// is one of its dims (returned, counted from 0), `sizes` splits it among `world` ranks and
/// `output` has the shape of `rank`'s chunk.
pub fn check_reduce_scatterv(
    input: &impl Tensor,
    output: &impl Tensor,
    dim: isize,
    sizes: &[usize],
    world: usize,
    rank: usize,
) -> Result<usize> {
    const OP: &str = "reduce_scatterv";
    ensure_reducible(input.dtype(), OP)?;
    let d = check_collective_dim(input.shape(), dim, OP)?;
    let shape = reduce_scatterv_shape(input.shape(), d, sizes, world, rank)?;
    check_output(OP, output, input.dtype(), &shape)?;
    Ok(d)
}

/// The check of a [`DeviceCommunicator::copy`]: `src` and `dst` have the same dtype and
/// element count.
pub fn check_copy(src: &impl Tensor, dst: &impl Tensor) -> Result<()> {
    crate::ensure_arg!(
        src.dtype() == dst.dtype() && src.numel() == dst.numel(),
        "copy of {} {:?} into {} {:?}",
        src.dtype(),
        src.shape(),
        dst.dtype(),
        dst.shape()
    );
    Ok(())
}

/// [`DeviceCommunicator::copy`] of host views.
pub fn host_copy(src: &HostView<'_>, dst: &mut HostViewMut<'_>) -> Result<()> {
    check_copy(src, dst)?;
    dst.as_bytes_mut().copy_from_slice(src.as_bytes());
    Ok(())
}

impl DeviceCommunicator for LocalCommunicator {
    crate::host_communicator_items!();
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        self.timeout.get()
    }
    fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout)
    }
    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        _op: ReduceOp,
    ) -> Result<()> {
        ensure_reducible(input.dtype(), "all_reduce")?;
        copy_whole("all_reduce", input, output)
    }
    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, _op: ReduceOp) -> Result<()> {
        ensure_reducible(tensor.dtype(), "all_reduce")
    }
    fn all_gather_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        check_collective_dim(input.shape(), dim, "all_gather")?;
        copy_whole("all_gather", input, output)
    }
    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        all_gatherv_shape(input.shape(), dim, sizes, 1, 0)?;
        copy_whole("all_gatherv", input, output)
    }
    fn reduce_scatter_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        _op: ReduceOp,
    ) -> Result<()> {
        ensure_reducible(input.dtype(), "reduce_scatter")?;
        check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        copy_whole("reduce_scatter", input, output)
    }
    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        _op: ReduceOp,
    ) -> Result<()> {
        check_reduce_scatterv(input, output, dim, sizes, 1, 0)?;
        copy_whole("reduce_scatterv", input, output)
    }
    fn gather_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        only_rank_zero(dst, "gather dst")?;
        check_collective_dim(input.shape(), dim, "gather")?;
        let out =
            output.ok_or_else(|| Error::invalid("gather: the destination must pass an output"))?;
        copy_whole("gather", input, out)
    }
    fn broadcast(&self, _tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        only_rank_zero(src, "broadcast src")
    }
    fn send(&self, _tensor: &HostView<'_>, dst: usize) -> Result<()> {
        Err(Error::invalid(format!(
            "send to {dst}: a world-size-1 group has no peer"
        )))
    }
    fn recv(&self, _tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        Err(Error::invalid(format!(
            "recv from {src}: a world-size-1 group has no peer"
        )))
    }
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        match ops.first() {
            None => Ok(()),
            Some(o) => Err(Error::invalid(format!(
                "batch_send_recv with peer {}: a world-size-1 group has no peer",
                o.peer()
            ))),
        }
    }
    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        check_all_to_all_v(input, send_counts, output, recv_counts, 1)?;
        output.as_bytes_mut().copy_from_slice(input.as_bytes());
        Ok(())
    }
    fn destroy(&self) -> Result<()> {
        Ok(())
    }
}

/// Refuses a reduction of a dtype that cannot be reduced (fp8 moves as bytes only).
pub fn ensure_reducible(dtype: DType, op: &str) -> Result<()> {
    if dtype.is_reducible() {
        return Ok(());
    }
    Err(Error::unsupported(format!(
        "{op}: {dtype} cannot be reduced (fp8 is moved as bytes only; convert to f16/bf16/f32 first)"
    )))
}
