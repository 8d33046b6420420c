//! A device communicator over any [`HostGroup`]: every collective moves host-tensor bytes through
//! the host group and computes its result on the host with the workspace's layout and reduction
//! kernels ([`crate::tensor::concat_along_into`], [`crate::reduce_bytes`]).
//!
//! It is what vLLM's base communicator over a gloo group is: correct for every op, dtype and world
//! size, and as fast as the host group (the store, for a `StatelessProcessGroup`). It lets every
//! coordinator operation run with nothing but a store, and it is the baseline the shared-memory
//! backend is measured against.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::communicator::{
    all_gather_shape, all_gatherv_shape, check_all_to_all_v, check_collective_dim, check_output,
    check_reduce_scatterv, ensure_reducible, P2pOp,
};
use crate::tensor::{concat_along_into, split_along};
use crate::{
    reduce_bytes, Backend, CommunicatorContext, DType, Device, DeviceCommunicator, Error,
    HostGroup, HostTensor, HostView, HostViewMut, ReduceOp, Result, Tensor,
};

/// [`Backend`] of host tensors whose communicator is a [`HostCommunicator`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HostBackend;

/// Collectives over a host group; see the module docs.
#[derive(Debug)]
pub struct HostCommunicator {
    host: Arc<dyn HostGroup>,
    timeout: crate::communicator::TimeoutCell,
    destroyed: std::sync::atomic::AtomicBool,
    /// Outputs of the owned calls, kept touched.
    buffers: Arc<crate::HostPool>,
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
            timeout: crate::communicator::TimeoutCell::new(timeout),
            destroyed: std::sync::atomic::AtomicBool::new(false),
            buffers: crate::HostPool::new(crate::HostPool::DEFAULT_LIMIT),
        }
    }

    fn live(&self) -> Result<()> {
        if self.destroyed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::NotInitialized("host communicator destroyed".into()));
        }
        Ok(())
    }

    /// Every rank's elements, checked to be `dtype` with `shape` outside dim `free_dim`
    /// (`None`: the whole shape must agree).
    fn gather_all(&self, t: &HostView<'_>, free_dim: Option<usize>) -> Result<Vec<HostTensor>> {
        self.live()?;
        let w = Wire {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.as_bytes().to_vec(),
        };
        let all = self.host.all_gather_bytes(&crate::encode_obj(&w)?)?;
        let mine = |s: &[usize]| match free_dim {
            Some(d) => crate::tensor::with_dim(s, d, 0),
            None => s.to_vec(),
        };
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                let w: Wire = crate::decode_obj(b, usize::MAX)?;
                crate::ensure_arg!(
                    w.dtype == t.dtype()
                        && w.shape.len() == t.shape().len()
                        && mine(&w.shape) == mine(t.shape())
                        && crate::tensor::checked_nbytes(w.dtype, &w.shape)? == w.data.len(),
                    "rank {r} passed {} {:?}, this rank {} {:?}",
                    w.dtype,
                    w.shape,
                    t.dtype(),
                    t.shape()
                );
                // Aligned storage for the element type (the wire bytes are not).
                HostTensor::from_bytes(w.dtype, &w.shape, &w.data)
            })
            .collect()
    }

    /// The element-wise reduction of every rank's `input`, as bytes.
    fn reduce_all(&self, input: &HostView<'_>, op: ReduceOp) -> Result<HostTensor> {
        let all = self.gather_all(input, None)?;
        let ins: Vec<&[u8]> = all.iter().map(HostTensor::as_bytes).collect();
        let mut out = HostTensor::zeros(input.dtype(), input.shape());
        reduce_bytes(input.dtype(), out.as_bytes_mut(), &ins, op)?;
        Ok(out)
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
    crate::host_communicator_items!(timeout = timeout, pool = buffers);
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        ensure_reducible(input.dtype(), "all_reduce")?;
        check_output("all_reduce", output, input.dtype(), input.shape())?;
        let r = self.reduce_all(input, op)?;
        output.as_bytes_mut().copy_from_slice(r.as_bytes());
        Ok(())
    }
    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        ensure_reducible(tensor.dtype(), "all_reduce")?;
        let r = self.reduce_all(&tensor.as_view(), op)?;
        tensor.as_bytes_mut().copy_from_slice(r.as_bytes());
        Ok(())
    }
    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        let shape = all_gatherv_shape(input.shape(), dim, sizes, self.world_size(), self.rank())?;
        check_output("all_gatherv", output, input.dtype(), &shape)?;
        let d = check_collective_dim(input.shape(), dim, "all_gatherv")?;
        let all = self.gather_all(input, Some(d))?;
        let parts: Vec<&[u8]> = all.iter().map(HostTensor::as_bytes).collect();
        concat_along_into(
            output.as_bytes_mut(),
            &parts,
            &shape,
            d,
            sizes,
            input.dtype().size(),
        )
    }
    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let d = check_reduce_scatterv(input, output, dim, sizes, self.world_size(), self.rank())?;
        let r = self.reduce_all(input, op)?;
        let mut pieces = split_along(r.as_bytes(), input.shape(), d, sizes, input.dtype().size())?;
        output
            .as_bytes_mut()
            .copy_from_slice(&pieces.swap_remove(self.rank()));
        Ok(())
    }
    fn gather_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        crate::ensure_arg!(dst < self.world_size(), "gather: dst {dst} out of range");
        let shape = all_gather_shape(input.shape(), dim, self.world_size(), "gather")?;
        let d = check_collective_dim(input.shape(), dim, "gather")?;
        let out = match (self.rank() == dst, output) {
            (true, Some(o)) => {
                check_output("gather", o, input.dtype(), &shape)?;
                Some(o)
            }
            (true, None) => {
                return Err(Error::invalid(
                    "gather: the destination must pass an output",
                ))
            }
            (false, _) => None,
        };
        let all = self.gather_all(input, None)?;
        if let Some(o) = out {
            let parts: Vec<&[u8]> = all.iter().map(HostTensor::as_bytes).collect();
            let sizes = vec![input.shape()[d]; self.world_size()];
            concat_along_into(
                o.as_bytes_mut(),
                &parts,
                &shape,
                d,
                &sizes,
                input.dtype().size(),
            )?;
        }
        Ok(())
    }
    fn broadcast(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
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
    fn send(&self, tensor: &HostView<'_>, dst: usize) -> Result<()> {
        self.live()?;
        self.host.send_bytes(tensor.as_bytes(), dst)
    }
    fn recv(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
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
    /// Sends first, then receives: the host groups' sends are buffered (store keys, channels,
    /// shared-memory slots up to two chunks), so any pattern completes; a pattern of large
    /// messages in a cycle over a group whose sends block ends at the deadline, not in a hang.
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        for o in ops.iter() {
            crate::ensure_arg!(
                o.peer() < self.world_size() && o.peer() != self.rank(),
                "batch_send_recv: peer {} is out of range or this rank (world size {})",
                o.peer(),
                self.world_size()
            );
        }
        for o in ops.iter() {
            if let P2pOp::Send(t, p) = o {
                self.send(t, *p)?;
            }
        }
        for o in ops.iter_mut() {
            if let P2pOp::Recv(t, p) = o {
                self.recv(t, *p)?;
            }
        }
        Ok(())
    }
    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        let n = self.world_size();
        let row = check_all_to_all_v(input, send_counts, output, recv_counts, n)?;
        self.live()?;
        let me = self.rank();
        let offsets = |c: &[usize]| {
            c.iter()
                .scan(0usize, |o, &x| {
                    let r = *o;
                    *o += x * row;
                    Some(r)
                })
                .collect::<Vec<_>>()
        };
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        for p in (0..n).filter(|&p| p != me) {
            self.host
                .send_bytes(&input.as_bytes()[so[p]..so[p] + send_counts[p] * row], p)?;
        }
        let out = output.as_bytes_mut();
        out[ro[me]..ro[me] + recv_counts[me] * row]
            .copy_from_slice(&input.as_bytes()[so[me]..so[me] + send_counts[me] * row]);
        for p in (0..n).filter(|&p| p != me) {
            let got = self.host.recv_bytes(p)?;
            crate::ensure_arg!(
                got.len() == recv_counts[p] * row,
                "all_to_all_v: rank {p} sent {} bytes, {} rows of {row} bytes were expected",
                got.len(),
                recv_counts[p]
            );
            out[ro[p]..ro[p] + got.len()].copy_from_slice(&got);
        }
        Ok(())
    }
    fn destroy(&self) -> Result<()> {
        self.destroyed
            .store(true, std::sync::atomic::Ordering::Release);
        self.buffers.close();
        Ok(())
    }
}
