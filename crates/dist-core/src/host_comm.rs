//! A device communicator over any [`HostGroup`]: every collective moves host-tensor bytes through
//! the host group and computes its result with the [`reference`](mod@crate::reference) functions.
//!
//! It is what vLLM's base communicator over a gloo group is: correct for every op, dtype and world
//! size, and as fast as the host group (the store, for a `StatelessProcessGroup`). It lets every
//! coordinator operation run with nothing but a store, and it is the baseline the shared-memory
//! backend is measured against.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::communicator::{check_collective_dim, reduce_scatterv_shape};
use crate::{
    reference, Backend, CommunicatorContext, DType, Device, DeviceCommunicator, Error, HostGroup,
    HostTensor, ReduceOp, Result,
};

/// [`Backend`] of host tensors whose communicator is a [`HostCommunicator`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HostBackend;

/// Collectives over a host group; see the module docs.
#[derive(Debug)]
pub struct HostCommunicator {
    host: Arc<dyn HostGroup>,
    timeout: Mutex<Duration>,
    destroyed: std::sync::atomic::AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostCommunicator {
    /// A communicator over `host`.
    pub fn new(host: Arc<dyn HostGroup>, timeout: Duration) -> Self {
        HostCommunicator {
            host,
            timeout: Mutex::new(timeout),
            destroyed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn live(&self) -> Result<()> {
        if self.destroyed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::NotInitialized("host communicator destroyed".into()));
        }
        Ok(())
    }

    fn gather_all(&self, t: &HostTensor) -> Result<Vec<HostTensor>> {
        self.live()?;
        let w = Wire {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.as_bytes().to_vec(),
        };
        let all = self.host.all_gather_bytes(&crate::encode_obj(&w)?)?;
        all.iter()
            .map(|b| {
                let w: Wire = crate::decode_obj(b, usize::MAX)?;
                HostTensor::from_bytes(w.dtype, &w.shape, &w.data)
            })
            .collect()
    }
}

impl Backend for HostBackend {
    const NAME: &'static str = "host";
    type Tensor = HostTensor;
    type Communicator = HostCommunicator;
    fn create_communicator(ctx: &CommunicatorContext) -> Result<HostCommunicator> {
        Ok(HostCommunicator::new(ctx.host_group.clone(), ctx.timeout))
    }
    fn to_host(t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }
    fn from_host(t: &HostTensor, _device: Device) -> Result<HostTensor> {
        Ok(t.clone())
    }
    fn reshape(t: HostTensor, shape: &[usize]) -> Result<HostTensor> {
        t.reshape(shape)
    }
}

impl DeviceCommunicator for HostCommunicator {
    type Tensor = HostTensor;
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
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
            "all_reduce: cannot reduce {}",
            input.dtype()
        );
        reference::all_reduce(&self.gather_all(input)?, op)
    }
    fn all_reduce_in_place(&self, tensor: &mut HostTensor, op: ReduceOp) -> Result<()> {
        *tensor = self.all_reduce(tensor, op)?;
        Ok(())
    }
    fn all_gather(&self, input: &HostTensor, dim: isize) -> Result<HostTensor> {
        check_collective_dim(input.shape(), dim, "all_gather")?;
        reference::all_gather(&self.gather_all(input)?, dim)
    }
    fn all_gatherv(&self, input: &HostTensor, dim: isize, sizes: &[usize]) -> Result<HostTensor> {
        check_collective_dim(input.shape(), dim, "all_gatherv")?;
        reference::all_gatherv(&self.gather_all(input)?, dim, sizes)
    }
    fn reduce_scatter(&self, input: &HostTensor, dim: isize, op: ReduceOp) -> Result<HostTensor> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        let n = self.world_size();
        crate::ensure_arg!(
            input.shape()[d] % n == 0,
            "reduce_scatter: dim {d} of {:?} is not divisible by world size {n}",
            input.shape()
        );
        let mut r = reference::reduce_scatter(&self.gather_all(input)?, dim, op)?;
        Ok(r.swap_remove(self.rank()))
    }
    fn reduce_scatterv(
        &self,
        input: &HostTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<HostTensor> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        reduce_scatterv_shape(input.shape(), d, sizes, self.world_size(), self.rank())?;
        let mut r = reference::reduce_scatterv(&self.gather_all(input)?, dim, sizes, op)?;
        Ok(r.swap_remove(self.rank()))
    }
    fn gather(&self, input: &HostTensor, dst: usize, dim: isize) -> Result<Option<HostTensor>> {
        check_collective_dim(input.shape(), dim, "gather")?;
        crate::ensure_arg!(dst < self.world_size(), "gather: dst {dst} out of range");
        let all = self.gather_all(input)?;
        if self.rank() == dst {
            Ok(Some(reference::all_gather(&all, dim)?))
        } else {
            Ok(None)
        }
    }
    fn broadcast(&self, tensor: &mut HostTensor, src: usize) -> Result<()> {
        self.live()?;
        let me = self.rank() == src;
        let got = self
            .host
            .broadcast_bytes(me.then(|| tensor.as_bytes()), src)?;
        if !me {
            crate::ensure_arg!(
                got.len() == tensor.nbytes(),
                "broadcast: {} bytes from rank {src}, this rank's tensor has {}",
                got.len(),
                tensor.nbytes()
            );
            tensor.as_bytes_mut().copy_from_slice(&got);
        }
        Ok(())
    }
    fn send(&self, tensor: &HostTensor, dst: usize) -> Result<()> {
        self.live()?;
        self.host.send_bytes(tensor.as_bytes(), dst)
    }
    fn recv(&self, tensor: &mut HostTensor, src: usize) -> Result<()> {
        self.live()?;
        let got = self.host.recv_bytes(src)?;
        crate::ensure_arg!(
            got.len() == tensor.nbytes(),
            "recv: {} bytes from rank {src}, expected {} for {} {:?}",
            got.len(),
            tensor.nbytes(),
            tensor.dtype(),
            tensor.shape()
        );
        tensor.as_bytes_mut().copy_from_slice(&got);
        Ok(())
    }
    fn destroy(&self) -> Result<()> {
        self.destroyed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
