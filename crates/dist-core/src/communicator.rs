//! The device communicator trait and the [`Backend`] trait family that ties a tensor type to it.

use std::sync::Arc;
use std::time::Duration;

use crate::tensor::{normalize_dim, with_dim};
use crate::{DType, Device, Error, HostGroup, HostTensor, ReduceOp, Result, Store, Tensor};

/// Default deadline of collective calls (`DIST_TIMEOUT` overrides it where the facade reads the environment).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Collectives on a backend's tensors among the ranks of one group.
///
/// Ranks (`src`, `dst`) are ranks within the group. Every call is bounded by [`Self::timeout`]:
/// a peer that does not arrive in time is an [`Error::Timeout`] naming it, a peer that died is
/// [`Error::PeerLost`]. Results have vLLM's layouts (see [`crate::reference`], which is the
/// oracle for every implementation). Methods take `&self`: implementations keep their mutable
/// state behind their own lock so that a coordinator can be shared process-wide.
pub trait DeviceCommunicator: Send + Sync + std::fmt::Debug {
    /// The backend's tensor type.
    type Tensor: Tensor;

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

    /// Reduces `input` over all ranks into a new tensor (the input is unchanged).
    fn all_reduce(&self, input: &Self::Tensor, op: ReduceOp) -> Result<Self::Tensor>;
    /// Reduces `tensor` over all ranks in place.
    fn all_reduce_in_place(&self, tensor: &mut Self::Tensor, op: ReduceOp) -> Result<()>;
    /// `cat([x_0 … x_{n-1}], dim)`.
    fn all_gather(&self, input: &Self::Tensor, dim: isize) -> Result<Self::Tensor>;
    /// `cat` along `dim` of inputs whose lengths there are `sizes[r]`.
    fn all_gatherv(
        &self,
        input: &Self::Tensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<Self::Tensor>;
    /// This rank's chunk along `dim` of the reduction (`shape[dim]` divisible by the world size).
    fn reduce_scatter(
        &self,
        input: &Self::Tensor,
        dim: isize,
        op: ReduceOp,
    ) -> Result<Self::Tensor>;
    /// This rank's chunk of `sizes[rank]` along `dim` of the reduction.
    fn reduce_scatterv(
        &self,
        input: &Self::Tensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<Self::Tensor>;
    /// `dst` gets `Some(cat(inputs, dim))`, the others `None`.
    fn gather(&self, input: &Self::Tensor, dst: usize, dim: isize) -> Result<Option<Self::Tensor>>;
    /// Overwrites `tensor` with `src`'s, in place.
    fn broadcast(&self, tensor: &mut Self::Tensor, src: usize) -> Result<()>;
    /// Sends `tensor` to `dst`.
    fn send(&self, tensor: &Self::Tensor, dst: usize) -> Result<()>;
    /// Receives from `src` into `tensor`, whose dtype and shape must match the sender's.
    fn recv(&self, tensor: &mut Self::Tensor, src: usize) -> Result<()>;

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
#[derive(Debug)]
pub struct LocalCommunicator {
    timeout: std::sync::Mutex<Duration>,
}

impl Default for LocalCommunicator {
    fn default() -> Self {
        LocalCommunicator {
            timeout: std::sync::Mutex::new(DEFAULT_TIMEOUT),
        }
    }
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

impl DeviceCommunicator for LocalCommunicator {
    type Tensor = HostTensor;
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
    }
    fn device(&self) -> Device {
        Device::CPU
    }
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<HostTensor> {
        Ok(HostTensor::zeros(dtype, shape))
    }
    fn all_reduce(&self, input: &HostTensor, op: ReduceOp) -> Result<HostTensor> {
        crate::ensure_arg!(
            input.dtype().is_reducible(),
            "cannot reduce {}",
            input.dtype()
        );
        let _ = op;
        Ok(input.clone())
    }
    fn all_reduce_in_place(&self, tensor: &mut HostTensor, _op: ReduceOp) -> Result<()> {
        crate::ensure_arg!(
            tensor.dtype().is_reducible(),
            "cannot reduce {}",
            tensor.dtype()
        );
        Ok(())
    }
    fn all_gather(&self, input: &HostTensor, dim: isize) -> Result<HostTensor> {
        check_collective_dim(input.shape(), dim, "all_gather")?;
        Ok(input.clone())
    }
    fn all_gatherv(&self, input: &HostTensor, dim: isize, sizes: &[usize]) -> Result<HostTensor> {
        let d = check_collective_dim(input.shape(), dim, "all_gatherv")?;
        crate::ensure_arg!(
            sizes == [input.shape()[d]],
            "all_gatherv: sizes {sizes:?} do not match the input"
        );
        Ok(input.clone())
    }
    fn reduce_scatter(&self, input: &HostTensor, dim: isize, _op: ReduceOp) -> Result<HostTensor> {
        check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        Ok(input.clone())
    }
    fn reduce_scatterv(
        &self,
        input: &HostTensor,
        dim: isize,
        sizes: &[usize],
        _op: ReduceOp,
    ) -> Result<HostTensor> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        reduce_scatterv_shape(input.shape(), d, sizes, 1, 0)?;
        Ok(input.clone())
    }
    fn gather(&self, input: &HostTensor, dst: usize, dim: isize) -> Result<Option<HostTensor>> {
        only_rank_zero(dst, "gather dst")?;
        check_collective_dim(input.shape(), dim, "gather")?;
        Ok(Some(input.clone()))
    }
    fn broadcast(&self, _tensor: &mut HostTensor, src: usize) -> Result<()> {
        only_rank_zero(src, "broadcast src")
    }
    fn send(&self, _tensor: &HostTensor, dst: usize) -> Result<()> {
        Err(Error::invalid(format!(
            "send to {dst}: a world-size-1 group has no peer"
        )))
    }
    fn recv(&self, _tensor: &mut HostTensor, src: usize) -> Result<()> {
        Err(Error::invalid(format!(
            "recv from {src}: a world-size-1 group has no peer"
        )))
    }
    fn destroy(&self) -> Result<()> {
        Ok(())
    }
}
