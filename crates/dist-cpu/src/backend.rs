//! [`CpuBackend`]: the `dist_core::Backend` of host tensors, and [`CpuCommunicator`], which is
//! shared memory for ranks of one node and gloo (feature `gloo`) otherwise.

use std::time::Duration;

use dist_core::communicator::P2pOp;
use dist_core::{
    Backend, CommunicatorContext, DType, Device, DeviceCommunicator, Error, HostTensor, HostView,
    HostViewMut, ReduceOp, Result, DEFAULT_TIMEOUT,
};

#[cfg(feature = "gloo")]
use crate::gloo::GlooCommunicator;
use crate::ShmCommunicator;

/// The CPU backend: host tensors; shared memory among ranks of one node, gloo across nodes.
///
/// `DIST_CPU_BACKEND=shm|gloo` forces a path (tests use `gloo` to run the gloo path on one
/// machine); unset, the ranks compare their node keys ([`crate::shm::NodeKey`]) and use shared
/// memory when all agree. Without the `gloo` feature, a group across nodes is
/// [`Error::Unsupported`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// The communicator [`CpuBackend`] builds.
#[derive(Debug)]
#[non_exhaustive]
pub enum CpuCommunicator {
    /// Shared memory (ranks on one node).
    Shm(ShmCommunicator),
    /// gloo over TCP (ranks on several nodes, or forced).
    #[cfg(feature = "gloo")]
    Gloo(GlooCommunicator),
}

macro_rules! each {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            CpuCommunicator::Shm($c) => $e,
            #[cfg(feature = "gloo")]
            CpuCommunicator::Gloo($c) => $e,
        }
    };
}

impl CpuCommunicator {
    /// `"shm"` or `"gloo"`.
    pub fn kind(&self) -> &'static str {
        match self {
            CpuCommunicator::Shm(_) => "shm",
            #[cfg(feature = "gloo")]
            CpuCommunicator::Gloo(_) => "gloo",
        }
    }
    /// The shared-memory communicator, when that is the path in use.
    pub fn as_shm(&self) -> Option<&ShmCommunicator> {
        match self {
            CpuCommunicator::Shm(c) => Some(c),
            #[cfg(feature = "gloo")]
            CpuCommunicator::Gloo(_) => None,
        }
    }
}

impl DeviceCommunicator for CpuCommunicator {
    dist_core::host_communicator_items!();
    fn rank(&self) -> usize {
        each!(self, c => c.rank())
    }
    fn world_size(&self) -> usize {
        each!(self, c => c.world_size())
    }
    fn timeout(&self) -> Duration {
        each!(self, c => c.timeout())
    }
    fn set_timeout(&self, timeout: Duration) {
        each!(self, c => c.set_timeout(timeout))
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<HostTensor> {
        each!(self, c => c.alloc(dtype, shape))
    }
    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        each!(self, c => c.all_reduce_into(input, output, op))
    }
    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        each!(self, c => c.all_reduce_in_place(tensor, op))
    }
    fn all_gather_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        each!(self, c => c.all_gather_into(input, output, dim))
    }
    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        each!(self, c => c.all_gatherv_into(input, output, dim, sizes))
    }
    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        each!(self, c => c.reduce_scatterv_into(input, output, dim, sizes, op))
    }
    fn gather_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        each!(self, c => c.gather_into(input, output, dst, dim))
    }
    fn broadcast(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        each!(self, c => c.broadcast(tensor, src))
    }
    fn send(&self, tensor: &HostView<'_>, dst: usize) -> Result<()> {
        each!(self, c => c.send(tensor, dst))
    }
    fn recv(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        each!(self, c => c.recv(tensor, src))
    }
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        each!(self, c => c.batch_send_recv(ops))
    }
    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        each!(self, c => c.all_to_all_v_into(input, send_counts, output, recv_counts))
    }
    fn destroy(&self) -> Result<()> {
        each!(self, c => c.destroy())
    }
}

impl Backend for CpuBackend {
    const NAME: &'static str = "cpu";
    type Tensor = HostTensor;
    type Communicator = CpuCommunicator;

    fn create_communicator(ctx: &CommunicatorContext) -> Result<CpuCommunicator> {
        let hg = &ctx.host_group;
        crate::ensure_arg!(
            ctx.ranks.len() == hg.world_size() && ctx.rank_in_group == hg.rank(),
            "group {}: {} ranks and rank {} in the context, the host group has {} ranks and rank {}",
            ctx.group_name,
            ctx.ranks.len(),
            ctx.rank_in_group,
            hg.world_size(),
            hg.rank()
        );
        let timeout = if ctx.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            ctx.timeout
        };
        let gloo = match std::env::var("DIST_CPU_BACKEND").as_deref() {
            Ok("shm") => false,
            Ok("gloo") => true,
            Err(_) | Ok("") => {
                let nodes = crate::shm::node_keys(hg.as_ref())?;
                nodes.iter().any(|n| *n != nodes[0])
            }
            Ok(other) => {
                return Err(Error::invalid(format!(
                    "DIST_CPU_BACKEND={other}: expected shm or gloo"
                )))
            }
        };
        if gloo {
            #[cfg(feature = "gloo")]
            {
                return GlooCommunicator::new(
                    ctx.store.clone(),
                    &ctx.group_name,
                    ctx.rank_in_group,
                    ctx.ranks.len(),
                    timeout,
                )
                .map(CpuCommunicator::Gloo);
            }
            #[cfg(not(feature = "gloo"))]
            return Err(Error::unsupported(format!(
                "group {}: gloo is needed (ranks on several nodes, or DIST_CPU_BACKEND=gloo) but dist-cpu was built without the `gloo` feature",
                ctx.group_name
            )));
        }
        ShmCommunicator::new(hg.as_ref(), &ctx.group_name, timeout).map(CpuCommunicator::Shm)
    }

    fn to_host(t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }

    fn from_host(t: &HostTensor, device: Device) -> Result<HostTensor> {
        crate::ensure_arg!(
            device.kind == dist_core::DeviceKind::Cpu,
            "the cpu backend holds host tensors, asked for {device}"
        );
        Ok(t.clone())
    }

    fn reshape(t: HostTensor, shape: &[usize]) -> Result<HostTensor> {
        t.reshape(shape)
    }

    fn flat_slice(t: &HostTensor, start: usize, len: usize) -> Result<HostTensor> {
        let v = t.view().narrow(start, len)?;
        HostTensor::from_bytes(v.dtype(), &[len], v.as_bytes())
    }
}
