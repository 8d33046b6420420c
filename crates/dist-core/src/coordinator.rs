//! `GroupCoordinator`: one process's view of one group (vLLM's `parallel_state.GroupCoordinator`).
//!
//! It holds the group's ranks, this process's place in it, the group's [`HostGroup`] (control
//! plane), its [`DeviceCommunicator`] (data plane, absent for one-rank groups or when disabled) and
//! an optional [`Broadcaster`] (the MessageQueue) for `broadcast_object`. Every operation of vLLM's
//! coordinator is here with the same semantics and result layouts; `src` and `dst` are ranks *within
//! the group*, as in vLLM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::communicator::{
    all_gather_shape, check_collective_dim, reduce_scatter_shape, reduce_scatterv_shape, Comm,
    P2pOp, View, ViewMut,
};
use crate::diag::{find_mismatch, CallDescriptor, Diagnostics};
use crate::tensor::with_dim;
use crate::{
    decode_obj, encode_obj, Backend, Broadcaster, DType, Device, DeviceCommunicator, Error,
    HostGroup, HostGroupExt, ReduceOp, Result, Tensor, TensorMeta,
};

/// A non-tensor value of a tensor dict: what vLLM would pickle, as a closed, typed set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// `None`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A map with string keys, in key order.
    Map(BTreeMap<String, Value>),
}

/// One entry of a tensor dict.
#[derive(Clone, Debug)]
pub enum DictValue<T> {
    /// A tensor, moved over the device communicator.
    Tensor(T),
    /// Anything else, passed through with the metadata.
    Value(Value),
}

/// One entry of a tensor dict: its key and value.
pub type DictEntry<T> = (String, DictValue<T>);

/// vLLM's `dict[str, Tensor | Any]`, in insertion order.
pub type TensorDict<T> = Vec<DictEntry<T>>;

/// The metadata of one entry, as sent over the host group (vLLM's `TensorMetadata` or the value).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum MetaItem {
    Tensor { dtype: DType, shape: Vec<usize> },
    Value(Value),
}

/// What the sender of a tensor dict tells the receiver, entry by entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DictMeta {
    items: Vec<(String, MetaItem)>,
    /// For send/recv: which tensors went as all-gather slices.
    all_gathered: Vec<bool>,
}

/// One process's handle of one group.
#[derive(Debug)]
pub struct GroupCoordinator<B: Backend> {
    unique_name: String,
    ranks: Vec<usize>,
    rank: usize,
    rank_in_group: usize,
    local_rank: usize,
    device: Device,
    host: Arc<dyn HostGroup>,
    comm: Option<B::Communicator>,
    mq: Option<Box<dyn Broadcaster>>,
    diag: Option<Arc<dyn Diagnostics>>,
    check_collectives: bool,
    seq: AtomicU64,
    destroyed: AtomicBool,
}

/// The parts a [`GroupCoordinator`] is assembled from.
#[derive(Debug)]
pub struct CoordinatorParts<B: Backend> {
    /// Unique name (`"tp:0"`).
    pub unique_name: String,
    /// The group's global ranks, in group order; must hold `rank`.
    pub ranks: Vec<usize>,
    /// This process's global rank.
    pub rank: usize,
    /// This process's local rank.
    pub local_rank: usize,
    /// The device of the group's tensors.
    pub device: Device,
    /// The group's host group.
    pub host: Arc<dyn HostGroup>,
    /// The device communicator; `None` for a one-rank group or a group without one.
    pub comm: Option<B::Communicator>,
    /// The MessageQueue broadcaster, if any.
    pub mq: Option<Box<dyn Broadcaster>>,
    /// The job's diagnostics (flight recorder and peer reports), if any.
    pub diag: Option<Arc<dyn Diagnostics>>,
    /// Check before each collective that every rank calls the same one (one host-group
    /// all-gather of a small descriptor per call).
    pub check_collectives: bool,
}

impl<B: Backend> GroupCoordinator<B> {
    /// Assembles a coordinator, checking that the parts agree on ranks and sizes.
    pub fn new(parts: CoordinatorParts<B>) -> Result<Self> {
        let CoordinatorParts {
            unique_name,
            ranks,
            rank,
            local_rank,
            device,
            host,
            comm,
            mq,
            diag,
            check_collectives,
        } = parts;
        let rank_in_group = ranks.iter().position(|&r| r == rank).ok_or_else(|| {
            Error::invalid(format!(
                "rank {rank} is not in group {unique_name} {ranks:?}"
            ))
        })?;
        crate::ensure_arg!(
            host.world_size() == ranks.len() && host.rank() == rank_in_group,
            "group {unique_name}: host group is rank {} of {}, expected {rank_in_group} of {}",
            host.rank(),
            host.world_size(),
            ranks.len()
        );
        if let Some(c) = &comm {
            crate::ensure_arg!(
                c.world_size() == ranks.len() && c.rank() == rank_in_group,
                "group {unique_name}: communicator is rank {} of {}, expected {rank_in_group} of {}",
                c.rank(),
                c.world_size(),
                ranks.len()
            );
        }
        Ok(GroupCoordinator {
            unique_name,
            ranks,
            rank,
            rank_in_group,
            local_rank,
            device,
            host,
            comm,
            mq,
            diag,
            check_collectives,
            seq: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
        })
    }

    /// The unique name (`"tp:0"`).
    pub fn unique_name(&self) -> &str {
        &self.unique_name
    }
    /// Global ranks of the group, in group order.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }
    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// This process's rank in the group.
    pub fn rank_in_group(&self) -> usize {
        self.rank_in_group
    }
    /// Number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }
    /// This process's local rank (device index).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// The device of this group's tensors.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Global rank of group rank 0.
    pub fn first_rank(&self) -> usize {
        self.ranks[0]
    }
    /// Global rank of the last group rank.
    pub fn last_rank(&self) -> usize {
        *self.ranks.last().expect("a group has ranks")
    }
    /// Is this process group rank 0?
    pub fn is_first_rank(&self) -> bool {
        self.rank == self.first_rank()
    }
    /// Is this process the last group rank?
    pub fn is_last_rank(&self) -> bool {
        self.rank == self.last_rank()
    }
    /// Global rank of the next rank in the ring.
    pub fn next_rank(&self) -> usize {
        self.ranks[(self.rank_in_group + 1) % self.world_size()]
    }
    /// Global rank of the previous rank in the ring.
    pub fn prev_rank(&self) -> usize {
        self.ranks[(self.rank_in_group + self.world_size() - 1) % self.world_size()]
    }
    /// The host group.
    pub fn host_group(&self) -> &Arc<dyn HostGroup> {
        &self.host
    }
    /// The device communicator, if the group has one.
    pub fn device_communicator(&self) -> Option<&B::Communicator> {
        self.comm.as_ref()
    }
    /// True when a MessageQueue broadcaster is attached.
    pub fn has_mq_broadcaster(&self) -> bool {
        self.mq.is_some()
    }

    fn live(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(Error::NotInitialized(format!(
                "group {} was destroyed",
                self.unique_name
            )));
        }
        Ok(())
    }

    fn comm(&self, op: &str) -> Result<&B::Communicator> {
        self.live()?;
        self.comm.as_ref().ok_or_else(|| {
            Error::NotInitialized(format!(
                "{op} on group {}: it has no device communicator",
                self.unique_name
            ))
        })
    }

    fn check_group_rank(&self, r: usize, what: &str) -> Result<()> {
        crate::ensure_arg!(
            r < self.world_size(),
            "{what} {r} out of range for group {} of size {}",
            self.unique_name,
            self.world_size()
        );
        Ok(())
    }

    /// Runs one call with the flight recorder, the optional mismatch check, and a timeout error
    /// enriched with what the missing ranks were last doing.
    fn run_op<R>(
        &self,
        op: &str,
        input: Option<(DType, &[usize])>,
        args: impl FnOnce() -> String,
        collective: bool,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        self.live()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = input.map_or(0, |(d, s)| (d.size() * s.iter().product::<usize>()) as u64);
        if let Some(d) = &self.diag {
            d.recorder().begin(&self.unique_name, op, seq, bytes);
        }
        let mut r = Ok(());
        if self.check_collectives && collective && self.world_size() > 1 {
            let desc = CallDescriptor {
                seq,
                op: op.to_string(),
                dtype: input.map(|(d, _)| d.name().to_string()).unwrap_or_default(),
                shape: input.map(|(_, s)| s.to_vec()).unwrap_or_default(),
                args: args(),
            };
            r = self.host.all_gather_obj(&desc).and_then(|all| {
                match find_mismatch(&self.unique_name, &all) {
                    None => Ok(()),
                    Some(m) => Err(Error::InvalidArgument(m)),
                }
            });
        }
        let r = r.and_then(|()| f());
        if let Some(d) = &self.diag {
            d.recorder().end(&self.unique_name, seq, r.is_ok());
        }
        r.map_err(|e| self.explain(e))
    }

    /// `op` prefixed with this group's name unless it already names it.
    fn qualify(&self, op: String) -> String {
        if op.contains(&self.unique_name) {
            op
        } else {
            format!("{} {op}", self.unique_name)
        }
    }

    /// Adds the diagnostics' report on the ranks a timeout or a lost peer names.
    fn explain(&self, e: Error) -> Error {
        let Some(d) = &self.diag else { return e };
        let global = |rs: &[usize]| -> Vec<usize> {
            rs.iter()
                .filter_map(|&r| self.ranks.get(r).copied())
                .collect()
        };
        match e {
            Error::Timeout {
                op,
                waited,
                missing_ranks,
                detail,
            } => {
                let who = if missing_ranks.is_empty() {
                    self.ranks
                        .iter()
                        .copied()
                        .filter(|&r| r != self.rank)
                        .collect()
                } else {
                    global(&missing_ranks)
                };
                let report = d.describe(&who);
                Error::Timeout {
                    op: self.qualify(op),
                    waited,
                    missing_ranks,
                    detail: if detail.is_empty() {
                        report
                    } else {
                        format!("{detail}; {report}")
                    },
                }
            }
            Error::PeerLost { rank, op, detail } => {
                let report = d.describe(&global(&[rank]));
                Error::PeerLost {
                    rank,
                    op: self.qualify(op),
                    detail: format!("{detail}; {report}"),
                }
            }
            other => other,
        }
    }

    /// Sum over the group. **Use the return value**: it is the result, computed in the input's
    /// own memory (the input is consumed, so no output is allocated).
    pub fn all_reduce(&self, x: B::Tensor) -> Result<B::Tensor> {
        self.all_reduce_op(x, ReduceOp::Sum)
    }

    /// [`Self::all_reduce`] with another operator.
    pub fn all_reduce_op(&self, mut x: B::Tensor, op: ReduceOp) -> Result<B::Tensor> {
        self.all_reduce_in_place_op(&mut Comm::<B>::view_mut(&mut x), op)?;
        Ok(x)
    }

    /// Sum over the group, in place, on memory the caller owns.
    pub fn all_reduce_in_place(&self, t: &mut ViewMut<'_, B>) -> Result<()> {
        self.all_reduce_in_place_op(t, ReduceOp::Sum)
    }

    /// [`Self::all_reduce_in_place`] with another operator.
    pub fn all_reduce_in_place_op(&self, t: &mut ViewMut<'_, B>, op: ReduceOp) -> Result<()> {
        self.live()?;
        if self.world_size() == 1 {
            return crate::communicator::ensure_reducible(t.dtype(), "all_reduce");
        }
        let (dtype, shape) = (t.dtype(), t.shape().to_vec());
        self.run_op(
            "all_reduce",
            Some((dtype, &shape)),
            || op.name().into(),
            true,
            || self.comm("all_reduce")?.all_reduce_in_place(t, op),
        )
    }

    /// Sum over the group of `input` into `output` (same dtype and shape), both the caller's.
    pub fn all_reduce_into(&self, input: &View<'_, B>, output: &mut ViewMut<'_, B>) -> Result<()> {
        self.all_reduce_into_op(input, output, ReduceOp::Sum)
    }

    /// [`Self::all_reduce_into`] with another operator.
    pub fn all_reduce_into_op(
        &self,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        op: ReduceOp,
    ) -> Result<()> {
        self.collective_into(
            "all_reduce",
            input,
            output,
            input.shape(),
            || op.name().into(),
            true,
            |c, i, o| c.all_reduce_into(i, o, op),
        )
    }

    /// `cat` over the group along `dim` (negative dims count from the end); the output comes from
    /// the communicator's pool and the input goes back to it.
    pub fn all_gather(&self, x: B::Tensor, dim: isize) -> Result<B::Tensor> {
        let shape = all_gather_shape(x.shape(), dim, self.world_size(), "all_gather")?;
        self.owned_collective(x, &shape, |i, o| self.all_gather_into(i, o, dim))
    }

    /// `output = cat` over the group of `input` along `dim`, both the caller's.
    pub fn all_gather_into(
        &self,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        dim: isize,
    ) -> Result<()> {
        check_collective_dim(input.shape(), dim, "all_gather")?;
        self.collective_into(
            "all_gather",
            input,
            output,
            input.shape(),
            || format!("dim {dim}"),
            false,
            |c, i, o| c.all_gather_into(i, o, dim),
        )
    }

    /// `cat` along `dim` of per-rank tensors whose lengths there are `sizes`.
    pub fn all_gatherv(&self, x: B::Tensor, dim: isize, sizes: &[usize]) -> Result<B::Tensor> {
        let shape = self.gatherv_shape(x.shape(), dim, sizes)?;
        self.owned_collective(x, &shape, |i, o| self.all_gatherv_into(i, o, dim, sizes))
    }

    /// [`Self::all_gatherv`] into the caller's `output`.
    pub fn all_gatherv_into(
        &self,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.gatherv_shape(input.shape(), dim, sizes)?;
        let d = check_collective_dim(input.shape(), dim, "all_gatherv")?;
        self.collective_into(
            "all_gatherv",
            input,
            output,
            &with_dim0(input.shape(), d),
            || format!("dim {dim} sizes {sizes:?}"),
            false,
            |c, i, o| c.all_gatherv_into(i, o, dim, sizes),
        )
    }

    fn gatherv_shape(&self, shape: &[usize], dim: isize, sizes: &[usize]) -> Result<Vec<usize>> {
        crate::communicator::all_gatherv_shape(
            shape,
            dim,
            sizes,
            self.world_size(),
            self.rank_in_group,
        )
    }

    /// This rank's chunk along `dim` of the sum over the group.
    pub fn reduce_scatter(&self, x: B::Tensor, dim: isize) -> Result<B::Tensor> {
        let shape = reduce_scatter_shape(x.shape(), dim, self.world_size())?;
        self.owned_collective(x, &shape, |i, o| self.reduce_scatter_into(i, o, dim))
    }

    /// [`Self::reduce_scatter`] into the caller's `output`.
    pub fn reduce_scatter_into(
        &self,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        dim: isize,
    ) -> Result<()> {
        reduce_scatter_shape(input.shape(), dim, self.world_size())?;
        self.collective_into(
            "reduce_scatter",
            input,
            output,
            input.shape(),
            || format!("dim {dim}"),
            true,
            |c, i, o| c.reduce_scatter_into(i, o, dim, ReduceOp::Sum),
        )
    }

    /// This rank's `sizes[rank]`-long chunk along `dim` of the sum over the group.
    pub fn reduce_scatterv(&self, x: B::Tensor, dim: isize, sizes: &[usize]) -> Result<B::Tensor> {
        let d = check_collective_dim(x.shape(), dim, "reduce_scatterv")?;
        let shape =
            reduce_scatterv_shape(x.shape(), d, sizes, self.world_size(), self.rank_in_group)?;
        self.owned_collective(x, &shape, |i, o| {
            self.reduce_scatterv_into(i, o, dim, sizes)
        })
    }

    /// [`Self::reduce_scatterv`] into the caller's `output`.
    pub fn reduce_scatterv_into(
        &self,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        reduce_scatterv_shape(
            input.shape(),
            d,
            sizes,
            self.world_size(),
            self.rank_in_group,
        )?;
        self.collective_into(
            "reduce_scatterv",
            input,
            output,
            input.shape(),
            || format!("dim {dim} sizes {sizes:?}"),
            true,
            |c, i, o| c.reduce_scatterv_into(i, o, dim, sizes, ReduceOp::Sum),
        )
    }

    /// `dst` (group rank) gets `Some(cat(x over ranks, dim))`; the others `None`.
    pub fn gather(&self, x: B::Tensor, dst: usize, dim: isize) -> Result<Option<B::Tensor>> {
        self.check_group_rank(dst, "gather dst")?;
        let shape = all_gather_shape(x.shape(), dim, self.world_size(), "gather")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(Some(x));
        }
        let mut out = match self.rank_in_group == dst {
            true => Some(self.alloc_out(x.dtype(), &shape)?),
            false => None,
        };
        let mut ov = out.as_mut().map(Comm::<B>::view_mut);
        self.gather_into(&Comm::<B>::view(&x), ov.as_mut(), dst, dim)?;
        drop(ov);
        Ok(out)
    }

    /// [`Self::gather`] into the caller's `output`, which `dst` passes and the others do not.
    pub fn gather_into(
        &self,
        input: &View<'_, B>,
        output: Option<&mut ViewMut<'_, B>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        self.check_group_rank(dst, "gather dst")?;
        check_collective_dim(input.shape(), dim, "gather")?;
        crate::ensure_arg!(
            output.is_some() == (self.rank_in_group == dst),
            "gather to {dst}: rank {} {} an output (the destination passes one, the others none)",
            self.rank_in_group,
            if output.is_some() {
                "passed"
            } else {
                "did not pass"
            }
        );
        self.live()?;
        self.run_op(
            "gather",
            Some((input.dtype(), input.shape())),
            || format!("dst {dst} dim {dim}"),
            true,
            || match (self.single()?, output) {
                (true, Some(o)) => self.local_copy("gather", input, o),
                (true, None) => Ok(()),
                (false, o) => self.comm("gather")?.gather_into(input, o, dst, dim),
            },
        )
    }

    /// Overwrites `x` with group rank `src`'s tensor.
    pub fn broadcast(&self, x: &mut B::Tensor, src: usize) -> Result<()> {
        self.broadcast_in_place(&mut Comm::<B>::view_mut(x), src)
    }

    /// Overwrites the caller's `t` with group rank `src`'s, in place.
    pub fn broadcast_in_place(&self, t: &mut ViewMut<'_, B>, src: usize) -> Result<()> {
        self.check_group_rank(src, "broadcast src")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(());
        }
        let (dtype, shape) = (t.dtype(), t.shape().to_vec());
        self.run_op(
            "broadcast",
            Some((dtype, &shape)),
            || format!("src {src}"),
            true,
            || self.comm("broadcast")?.broadcast(t, src),
        )
    }

    /// All-to-all with per-rank row counts along dim 0: rows `[off_p, off_p + send_counts[p])` of
    /// `x` go to group rank `p`. The counts are exchanged first over the host group; returns the
    /// rows received from every rank in rank order (from the pool) and how many came from each.
    pub fn all_to_all_v(
        &self,
        x: &View<'_, B>,
        send_counts: &[usize],
    ) -> Result<(B::Tensor, Vec<usize>)> {
        let recv_counts = self.exchange_counts(send_counts)?;
        crate::ensure_arg!(
            !x.shape().is_empty(),
            "all_to_all_v: a 0-d tensor has no rows"
        );
        let total = recv_counts.iter().sum::<usize>();
        let mut out = self.alloc_out(x.dtype(), &with_dim(x.shape(), 0, total))?;
        self.all_to_all_v_into(
            x,
            send_counts,
            &mut Comm::<B>::view_mut(&mut out),
            &recv_counts,
        )?;
        Ok((out, recv_counts))
    }

    /// Each rank's row counts toward every rank, exchanged over the host group: returns how many
    /// rows this rank receives from each.
    pub fn exchange_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>> {
        crate::ensure_arg!(
            send_counts.len() == self.world_size(),
            "all_to_all_v: {} send counts for group size {}",
            send_counts.len(),
            self.world_size()
        );
        self.live()?;
        if self.world_size() == 1 {
            return Ok(send_counts.to_vec());
        }
        let counts: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let all: Vec<Vec<u64>> =
            self.run_op("all_to_all_v counts", None, String::new, true, || {
                self.host.all_gather_obj(&counts)
            })?;
        all.iter()
            .enumerate()
            .map(|(r, c)| {
                let n = c.get(self.rank_in_group).copied().ok_or_else(|| {
                    Error::protocol(format!(
                        "all_to_all_v: rank {r} sent {} counts, group size {}",
                        c.len(),
                        self.world_size()
                    ))
                })?;
                usize::try_from(n).map_err(|_| {
                    Error::protocol(format!("all_to_all_v: rank {r} announced {n} rows"))
                })
            })
            .collect()
    }

    /// All-to-all with known counts into the caller's `output` (see
    /// [`DeviceCommunicator::all_to_all_v_into`]).
    pub fn all_to_all_v_into(
        &self,
        input: &View<'_, B>,
        send_counts: &[usize],
        output: &mut ViewMut<'_, B>,
        recv_counts: &[usize],
    ) -> Result<()> {
        crate::communicator::check_all_to_all_v(
            input,
            send_counts,
            output,
            recv_counts,
            self.world_size(),
        )?;
        self.live()?;
        let shape = with_dim0(input.shape(), 0);
        self.run_op(
            "all_to_all_v",
            Some((input.dtype(), &shape)),
            || format!("send {send_counts:?} recv {recv_counts:?}"),
            false,
            || match self.single()? {
                true => self.local_copy("all_to_all_v", input, output),
                false => self.comm("all_to_all_v")?.all_to_all_v_into(
                    input,
                    send_counts,
                    output,
                    recv_counts,
                ),
            },
        )
    }

    /// Grouped sends and receives (vLLM's `batch_isend_irecv`) among the group's ranks: completes
    /// once every operation of the list has, whatever the pattern. Only the ranks involved call it.
    pub fn batch_send_recv(
        &self,
        ops: &mut [P2pOp<'_, View<'_, B>, ViewMut<'_, B>>],
    ) -> Result<()> {
        for o in ops.iter() {
            self.check_group_rank(o.peer(), "batch_send_recv peer")?;
            crate::ensure_arg!(
                o.peer() != self.rank_in_group,
                "batch_send_recv: peer {} is this rank",
                o.peer()
            );
        }
        self.live()?;
        if ops.is_empty() {
            return Ok(());
        }
        let bytes: usize = ops
            .iter()
            .map(|o| match o {
                P2pOp::Send(t, _) => t.nbytes(),
                P2pOp::Recv(t, _) => t.nbytes(),
            })
            .sum();
        self.run_op(
            "batch_send_recv",
            Some((DType::U8, &[bytes])),
            String::new,
            false,
            || self.comm("batch_send_recv")?.batch_send_recv(ops),
        )
    }

    /// Broadcasts a typed object from group rank `src` (which passes `Some`). Uses the
    /// MessageQueue broadcaster when there is one and `src` is its writer (group rank 0), the host
    /// group otherwise.
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        src: usize,
    ) -> Result<T> {
        self.check_group_rank(src, "broadcast_object src")?;
        self.live()?;
        if self.world_size() == 1 {
            let o = obj.ok_or_else(|| {
                Error::invalid("broadcast_object: the source must pass an object")
            })?;
            return decode_obj(&encode_obj(o)?, self.host.max_object_bytes());
        }
        if let (Some(mq), 0) = (&self.mq, src) {
            if self.rank_in_group == src {
                let o = obj.ok_or_else(|| {
                    Error::invalid("broadcast_object: the source must pass an object")
                })?;
                let bytes = encode_obj(o)?;
                mq.enqueue_bytes(&bytes)?;
                return decode_obj(&bytes, usize::MAX);
            }
            let bytes = mq.dequeue_bytes()?;
            return decode_obj(&bytes, self.host.max_object_bytes());
        }
        self.host.broadcast_obj(obj, src)
    }

    /// Sends a typed object to group rank `dst` over the host group.
    pub fn send_object<T: Serialize>(&self, obj: &T, dst: usize) -> Result<()> {
        self.check_group_rank(dst, "send_object dst")?;
        crate::ensure_arg!(
            dst != self.rank_in_group,
            "send_object: dst {dst} is this rank"
        );
        self.live()?;
        self.host.send_obj(obj, dst)
    }

    /// Receives a typed object from group rank `src` over the host group.
    pub fn recv_object<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        self.check_group_rank(src, "recv_object src")?;
        crate::ensure_arg!(
            src != self.rank_in_group,
            "recv_object: src {src} is this rank"
        );
        self.live()?;
        self.host.recv_obj(src)
    }

    /// Waits for every rank of the group (over the host group, never the device).
    pub fn barrier(&self) -> Result<()> {
        self.run_op("barrier", None, String::new, true, || self.host.barrier())
    }

    /// Sends a tensor to group rank `dst` (default: the next rank).
    pub fn send(&self, t: &B::Tensor, dst: Option<usize>) -> Result<()> {
        self.send_view(&Comm::<B>::view(t), dst)
    }

    /// Sends the caller's `t` to group rank `dst` (default: the next rank).
    pub fn send_view(&self, t: &View<'_, B>, dst: Option<usize>) -> Result<()> {
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_group_rank(dst, "send dst")?;
        crate::ensure_arg!(dst != self.rank_in_group, "send: dst {dst} is this rank");
        self.run_op(
            "send",
            Some((t.dtype(), t.shape())),
            || format!("dst {dst}"),
            false,
            || self.comm("send")?.send(t, dst),
        )
    }

    /// Receives a tensor of `dtype` and `shape` from group rank `src` (default: the previous rank).
    pub fn recv(&self, dtype: DType, shape: &[usize], src: Option<usize>) -> Result<B::Tensor> {
        let mut t = self.comm("recv")?.alloc(dtype, shape)?;
        self.recv_into(&mut Comm::<B>::view_mut(&mut t), src)?;
        Ok(t)
    }

    /// Receives from group rank `src` (default: the previous rank) into the caller's `t`, whose
    /// dtype and size must match what the sender sends.
    pub fn recv_into(&self, t: &mut ViewMut<'_, B>, src: Option<usize>) -> Result<()> {
        let ws = self.world_size();
        let src = src.unwrap_or((self.rank_in_group + ws - 1) % ws);
        self.check_group_rank(src, "recv src")?;
        crate::ensure_arg!(src != self.rank_in_group, "recv: src {src} is this rank");
        let comm = self.comm("recv")?;
        let (dtype, shape) = (t.dtype(), t.shape().to_vec());
        self.run_op(
            "recv",
            Some((dtype, &shape)),
            || format!("src {src}"),
            false,
            || comm.recv(t, src),
        )
    }

    /// An output of `dtype` and `shape`: from the communicator's pool, or zeros on the host
    /// backend's device when the group has no communicator.
    fn alloc_out(&self, dtype: DType, shape: &[usize]) -> Result<B::Tensor> {
        match &self.comm {
            Some(c) => c.alloc(dtype, shape),
            None => B::from_host(&crate::HostTensor::zeros(dtype, shape), self.device),
        }
    }

    /// True for a one-rank group (its collectives are copies), an error for a larger group without
    /// a communicator.
    fn single(&self) -> Result<bool> {
        Ok(self.world_size() == 1)
    }

    /// A one-rank collective: the output gets the input's elements (a device copy for device views).
    fn local_copy(&self, op: &str, input: &View<'_, B>, output: &mut ViewMut<'_, B>) -> Result<()> {
        crate::communicator::check_output(op, output, input.dtype(), input.shape())?;
        Comm::<B>::copy(input, output)
    }

    /// The owned form of a collective whose output has `shape`: `x` itself on a one-rank group,
    /// else an output from [`Self::alloc_out`] that `into` (the `_into` form) fills from `x`.
    fn owned_collective(
        &self,
        x: B::Tensor,
        shape: &[usize],
        into: impl FnOnce(&View<'_, B>, &mut ViewMut<'_, B>) -> Result<()>,
    ) -> Result<B::Tensor> {
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        let mut out = self.alloc_out(x.dtype(), shape)?;
        into(&Comm::<B>::view(&x), &mut Comm::<B>::view_mut(&mut out))?;
        Ok(out)
    }

    /// A collective of `input` into `output` through [`Self::run_op`] (`shape` is what of the
    /// input must agree across ranks, `args` the rest of the call): on a one-rank group a copy
    /// (after checking that the dtype reduces, for a `reduction`), else `f` on the communicator.
    #[allow(clippy::too_many_arguments)]
    fn collective_into(
        &self,
        op: &str,
        input: &View<'_, B>,
        output: &mut ViewMut<'_, B>,
        shape: &[usize],
        args: impl FnOnce() -> String,
        reduction: bool,
        f: impl FnOnce(&B::Communicator, &View<'_, B>, &mut ViewMut<'_, B>) -> Result<()>,
    ) -> Result<()> {
        self.live()?;
        self.run_op(
            op,
            Some((input.dtype(), shape)),
            args,
            true,
            || match self.single()? {
                true => {
                    if reduction {
                        crate::communicator::ensure_reducible(input.dtype(), op)?;
                    }
                    self.local_copy(op, input, output)
                }
                false => f(self.comm(op)?, input, output),
            },
        )
    }

    fn split_dict<T: Tensor>(dict: &[(String, DictValue<T>)]) -> Vec<(String, MetaItem)> {
        dict.iter()
            .map(|(k, v)| {
                let m = match v {
                    DictValue::Tensor(t) => MetaItem::Tensor {
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                    },
                    DictValue::Value(v) => MetaItem::Value(v.clone()),
                };
                (k.clone(), m)
            })
            .collect()
    }

    /// Broadcasts a dict of tensors and values from group rank `src` (which passes `Some`).
    ///
    /// vLLM's protocol: the metadata (keys, dtypes, shapes, non-tensor values) goes with
    /// [`Self::broadcast_object`]; then each non-empty tensor, in dict order, over the device
    /// communicator (over the host group when the group has none). Empty tensors are not sent.
    /// The receivers' tensors come from the communicator's pool.
    pub fn broadcast_tensor_dict(
        &self,
        dict: Option<TensorDict<B::Tensor>>,
        src: usize,
    ) -> Result<TensorDict<B::Tensor>> {
        self.check_group_rank(src, "broadcast_tensor_dict src")?;
        self.live()?;
        let is_src = self.rank_in_group == src;
        if self.world_size() == 1 {
            return dict.ok_or_else(|| {
                Error::invalid("broadcast_tensor_dict: the source must pass a dict")
            });
        }
        if is_src {
            let mut dict = dict.ok_or_else(|| {
                Error::invalid("broadcast_tensor_dict: the source must pass a dict")
            })?;
            self.broadcast_dict_send(&mut dict, src, |t| self.broadcast_one(t, src))?;
            Ok(dict)
        } else {
            self.broadcast_dict_receive(src)
        }
    }

    /// [`Self::broadcast_tensor_dict`] whose source lends its tensors as views (nothing of them
    /// is copied on the source); the source gets `None`, the others the received dict.
    pub fn broadcast_tensor_dict_views(
        &self,
        dict: Option<&mut [DictEntry<ViewMut<'_, B>>]>,
        src: usize,
    ) -> Result<Option<TensorDict<B::Tensor>>> {
        self.check_group_rank(src, "broadcast_tensor_dict src")?;
        self.live()?;
        let is_src = self.rank_in_group == src;
        crate::ensure_arg!(
            dict.is_some() == is_src,
            "broadcast_tensor_dict: the source (rank {src}) and only it passes a dict"
        );
        match dict {
            Some(dict) => {
                if self.world_size() > 1 {
                    self.broadcast_dict_send(dict, src, |t| self.broadcast_in_place(t, src))?;
                }
                Ok(None)
            }
            None => self.broadcast_dict_receive(src).map(Some),
        }
    }

    /// The source's side of a tensor-dict broadcast: the metadata, then `send` of each non-empty
    /// tensor in dict order.
    fn broadcast_dict_send<T: Tensor>(
        &self,
        dict: &mut [DictEntry<T>],
        src: usize,
        mut send: impl FnMut(&mut T) -> Result<()>,
    ) -> Result<()> {
        let meta = DictMeta {
            items: Self::split_dict(dict),
            all_gathered: vec![],
        };
        self.broadcast_object(Some(&meta), src)?;
        for (_, v) in dict.iter_mut() {
            if let DictValue::Tensor(t) = v {
                if t.numel() > 0 {
                    send(t)?;
                }
            }
        }
        Ok(())
    }

    fn broadcast_dict_receive(&self, src: usize) -> Result<TensorDict<B::Tensor>> {
        let meta: DictMeta = self.broadcast_object(None, src)?;
        let mut out = Vec::with_capacity(meta.items.len());
        for (k, m) in meta.items {
            match m {
                MetaItem::Value(v) => out.push((k, DictValue::Value(v))),
                MetaItem::Tensor { dtype, shape } => {
                    let mut t = self.alloc_out(dtype, &shape)?;
                    if t.numel() > 0 {
                        self.broadcast_one(&mut t, src)?;
                    }
                    out.push((k, DictValue::Tensor(t)));
                }
            }
        }
        Ok(out)
    }

    fn broadcast_one(&self, t: &mut B::Tensor, src: usize) -> Result<()> {
        match &self.comm {
            Some(c) => c.broadcast(&mut Comm::<B>::view_mut(t), src),
            None => {
                let is_src = self.rank_in_group == src;
                let bytes = if is_src {
                    Some(B::to_host(t)?.as_bytes().to_vec())
                } else {
                    None
                };
                let got = self.host.broadcast_bytes(bytes.as_deref(), src)?;
                if !is_src {
                    let h = crate::HostTensor::from_bytes(t.dtype(), t.shape(), &got)?;
                    *t = B::from_host(&h, self.device)?;
                }
                Ok(())
            }
        }
    }

    fn use_all_gather(
        key: &str,
        numel: usize,
        ag: Option<&GroupCoordinator<B>>,
        overrides: Option<&BTreeMap<String, bool>>,
    ) -> bool {
        let Some(ag) = ag else { return false };
        if let Some(v) = overrides.and_then(|o| o.get(key)) {
            return *v;
        }
        numel % ag.world_size() == 0
    }

    /// The destination of a point-to-point dict call and its metadata (with which tensors go as
    /// all-gather slices).
    fn dict_plan<T: Tensor>(
        &self,
        op: &str,
        dict: &[(String, DictValue<T>)],
        dst: Option<usize>,
        ag: Option<&GroupCoordinator<B>>,
        overrides: Option<&BTreeMap<String, bool>>,
    ) -> Result<(usize, DictMeta)> {
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_group_rank(dst, &format!("{op} dst"))?;
        crate::ensure_arg!(dst != self.rank_in_group, "{op}: dst {dst} is this rank");
        let all_gathered = dict
            .iter()
            .map(|(k, v)| match v {
                DictValue::Tensor(t) => Self::use_all_gather(k, t.numel(), ag, overrides),
                DictValue::Value(_) => false,
            })
            .collect();
        Ok((
            dst,
            DictMeta {
                items: Self::split_dict(dict),
                all_gathered,
            },
        ))
    }

    /// Sends a dict to group rank `dst` (default: next). With `all_gather_group` (usually the TP
    /// group), a tensor whose element count divides by that group's size is sent as this rank's
    /// slice `t.reshape(ag_ws, -1)[ag_rank]` only (`all_gather_tensors` overrides per key), and the
    /// receiver's matching rank all-gathers the slices back.
    pub fn send_tensor_dict(
        &self,
        dict: &TensorDict<B::Tensor>,
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
        all_gather_tensors: Option<&BTreeMap<String, bool>>,
    ) -> Result<()> {
        self.live()?;
        if self.world_size() == 1 {
            return Ok(());
        }
        if self.comm.is_some() {
            let views: Vec<(String, DictValue<View<'_, B>>)> = dict
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        DictValue::Tensor(t) => DictValue::Tensor(Comm::<B>::view(t)),
                        DictValue::Value(v) => DictValue::Value(v.clone()),
                    };
                    (k.clone(), v)
                })
                .collect();
            return self.send_tensor_dict_views(&views, dst, all_gather_group, all_gather_tensors);
        }
        // No device communicator: the tensors go as host bytes over the host group.
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        let (dst, meta) = self.dict_plan("send_tensor_dict", dict, dst, ag, all_gather_tensors)?;
        self.send_object(&meta, dst)?;
        for ((_, v), agd) in dict.iter().zip(&meta.all_gathered) {
            let DictValue::Tensor(t) = v else { continue };
            if t.numel() == 0 {
                continue;
            }
            let h = B::to_host(t)?;
            let bytes = h.as_bytes();
            let part = match (agd, ag) {
                (true, Some(ag)) => {
                    let n = bytes.len() / ag.world_size();
                    &bytes[ag.rank_in_group() * n..(ag.rank_in_group() + 1) * n]
                }
                _ => bytes,
            };
            self.host.send_bytes(part, dst)?;
        }
        Ok(())
    }

    /// [`Self::send_tensor_dict`] of tensors the caller lends as views: nothing is copied beyond
    /// what the transport moves (an all-gather slice is a narrowed view of the caller's memory).
    pub fn send_tensor_dict_views(
        &self,
        dict: &[DictEntry<View<'_, B>>],
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
        all_gather_tensors: Option<&BTreeMap<String, bool>>,
    ) -> Result<()> {
        self.live()?;
        if self.world_size() == 1 {
            return Ok(());
        }
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        let (dst, meta) = self.dict_plan("send_tensor_dict", dict, dst, ag, all_gather_tensors)?;
        let comm = self.comm("send_tensor_dict")?;
        self.send_object(&meta, dst)?;
        for ((k, v), agd) in dict.iter().zip(&meta.all_gathered) {
            let DictValue::Tensor(t) = v else { continue };
            if t.numel() == 0 {
                continue;
            }
            let op = || format!("send_tensor_dict '{k}' to {dst}");
            match (agd, ag) {
                (true, Some(ag)) => {
                    let n = t.numel() / ag.world_size();
                    let slice = Comm::<B>::narrow(t, ag.rank_in_group() * n, n)?;
                    self.run_op("send", Some((t.dtype(), &[n])), op, false, || {
                        comm.send(&slice, dst)
                    })?;
                }
                _ => self.run_op("send", Some((t.dtype(), t.shape())), op, false, || {
                    comm.send(t, dst)
                })?,
            }
        }
        Ok(())
    }

    /// The metadata of a dict from `src`, checked: `src` resolved, the all-gather group present
    /// where the sender sliced.
    fn recv_dict_meta(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
    ) -> Result<(usize, DictMeta)> {
        crate::ensure_arg!(
            self.world_size() > 1,
            "recv_tensor_dict in a one-rank group"
        );
        let ws = self.world_size();
        let src = src.unwrap_or((self.rank_in_group + ws - 1) % ws);
        self.check_group_rank(src, "recv_tensor_dict src")?;
        crate::ensure_arg!(
            src != self.rank_in_group,
            "recv_tensor_dict: src {src} is this rank"
        );
        let meta: DictMeta = self.recv_object(src)?;
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        for (i, (k, m)) in meta.items.iter().enumerate() {
            if let MetaItem::Tensor { shape, .. } = m {
                if meta.all_gathered.get(i).copied().unwrap_or(false) {
                    let ag = ag.ok_or_else(|| {
                        Error::invalid(format!(
                            "recv_tensor_dict: the sender all-gather-sliced '{k}' but no all_gather_group was given"
                        ))
                    })?;
                    let numel: usize = shape.iter().product();
                    crate::ensure_arg!(
                        numel % ag.world_size() == 0,
                        "recv_tensor_dict: '{k}' has {numel} elements, not divisible by the all-gather group size {}",
                        ag.world_size()
                    );
                }
            }
        }
        Ok((src, meta))
    }

    /// Receives a dict from group rank `src` (default: previous); see [`Self::send_tensor_dict`].
    /// Tensors come from the communicator's pool.
    pub fn recv_tensor_dict(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
    ) -> Result<TensorDict<B::Tensor>> {
        self.live()?;
        let (src, meta) = self.recv_dict_meta(src, all_gather_group)?;
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        let mut out = Vec::with_capacity(meta.items.len());
        for (i, (k, m)) in meta.items.into_iter().enumerate() {
            match m {
                MetaItem::Value(v) => out.push((k, DictValue::Value(v))),
                MetaItem::Tensor { dtype, shape } => {
                    let numel: usize = shape.iter().product();
                    let agd = meta.all_gathered.get(i).copied().unwrap_or(false);
                    let t = match (numel, agd, ag) {
                        (0, _, _) => self.alloc_out(dtype, &shape)?,
                        (_, true, Some(ag)) => {
                            let mut slice = self.alloc_out(dtype, &[numel / ag.world_size()])?;
                            self.recv_tensor_any(&mut slice, src)?;
                            let full = ag.all_gather(slice, 0)?;
                            B::reshape(full, &shape)?
                        }
                        _ => {
                            let mut t = self.alloc_out(dtype, &shape)?;
                            self.recv_tensor_any(&mut t, src)?;
                            t
                        }
                    };
                    out.push((k, DictValue::Tensor(t)));
                }
            }
        }
        Ok(out)
    }

    /// Receives a dict from `src` into tensors the caller owns: every tensor entry the sender
    /// sends must have an output of the same key, dtype and shape in `outputs` (a missing or
    /// mismatched one is an error naming the key, and no output is left half-written by it);
    /// returns the non-tensor entries. Entries that went as all-gather slices are received into a
    /// pool temporary, all-gathered, and copied into the output.
    pub fn recv_tensor_dict_into(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
        outputs: &mut [(&str, ViewMut<'_, B>)],
    ) -> Result<Vec<(String, Value)>> {
        self.live()?;
        let (src, meta) = self.recv_dict_meta(src, all_gather_group)?;
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        let comm = self.comm("recv_tensor_dict")?;
        // Check every tensor against its output before anything is received.
        let mut slots = Vec::with_capacity(meta.items.len());
        for (k, m) in &meta.items {
            if let MetaItem::Tensor { dtype, shape } = m {
                let j = outputs.iter().position(|(name, _)| name == k).ok_or_else(|| {
                    Error::invalid(format!(
                        "recv_tensor_dict: the sender sent tensor '{k}' ({dtype} {shape:?}) and no output of that name was given"
                    ))
                })?;
                crate::communicator::check_output(
                    &format!("recv_tensor_dict '{k}'"),
                    &outputs[j].1,
                    *dtype,
                    shape,
                )?;
                slots.push(Some(j));
            } else {
                slots.push(None);
            }
        }
        let mut values = Vec::new();
        for (i, ((k, m), slot)) in meta.items.into_iter().zip(slots).enumerate() {
            let (dtype, shape) = match m {
                MetaItem::Value(v) => {
                    values.push((k, v));
                    continue;
                }
                MetaItem::Tensor { dtype, shape } => (dtype, shape),
            };
            let out = &mut outputs[slot.expect("tensor entries have slots")].1;
            let numel: usize = shape.iter().product();
            if numel == 0 {
                continue;
            }
            let op = || format!("recv_tensor_dict '{k}' from {src}");
            match (meta.all_gathered.get(i).copied().unwrap_or(false), ag) {
                (true, Some(ag)) => {
                    let n = numel / ag.world_size();
                    let mut slice = comm.alloc(dtype, &[n])?;
                    self.run_op("recv", Some((dtype, &[n])), op, false, || {
                        comm.recv(&mut Comm::<B>::view_mut(&mut slice), src)
                    })?;
                    let full = ag.all_gather(slice, 0)?;
                    Comm::<B>::copy(&Comm::<B>::view(&full), out)?;
                }
                _ => self.run_op("recv", Some((dtype, &shape)), op, false, || {
                    comm.recv(out, src)
                })?,
            }
        }
        Ok(values)
    }

    fn recv_tensor_any(&self, t: &mut B::Tensor, src: usize) -> Result<()> {
        match &self.comm {
            Some(c) => c.recv(&mut Comm::<B>::view_mut(t), src),
            None => {
                let got = self.host.recv_bytes(src)?;
                let h = crate::HostTensor::from_bytes(t.dtype(), t.shape(), &got)?;
                *t = B::from_host(&h, self.device)?;
                Ok(())
            }
        }
    }

    /// Runs `body` inside a graph-capture scope of this group's communicator (CUDA graphs; a plain
    /// call on backends without graphs). Leaving the scope may be collective (the custom all-reduce
    /// registers graph buffers), so every rank must call it.
    pub fn graph_capture<R>(&self, body: impl FnOnce() -> Result<R>) -> Result<R> {
        self.live()?;
        let Some(c) = &self.comm else { return body() };
        c.begin_capture()?;
        let r = body();
        let end = c.end_capture();
        let r = r?;
        end?;
        Ok(r)
    }

    /// MoE dispatch with the all-gather / reduce-scatter manager (vLLM's AgRs): every rank gets
    /// every rank's tokens, `cat` along dim 0 with per-rank token counts `sizes`. Identity without
    /// a communicator.
    pub fn dispatch(
        &self,
        hidden_states: B::Tensor,
        router_logits: B::Tensor,
        sizes: &[usize],
    ) -> Result<(B::Tensor, B::Tensor)> {
        if self.world_size() == 1 || self.comm.is_none() {
            return Ok((hidden_states, router_logits));
        }
        let h = self.all_gatherv(hidden_states, 0, sizes)?;
        let r = self.all_gatherv(router_logits, 0, sizes)?;
        Ok((h, r))
    }

    /// MoE combine (AgRs): each rank gets back its own `sizes[rank]` token rows, summed over ranks.
    pub fn combine(&self, hidden_states: B::Tensor, sizes: &[usize]) -> Result<B::Tensor> {
        if self.world_size() == 1 || self.comm.is_none() {
            return Ok(hidden_states);
        }
        self.reduce_scatterv(hidden_states, 0, sizes)
    }

    /// MoE dispatch of top-k routed tokens over this (EP) group with `cfg`'s all2all backend:
    /// all-gather, or all-to-all-v to the ranks of each token's experts
    /// ([`crate::moe::dispatch`]).
    pub fn moe_dispatch(
        &self,
        cfg: &crate::moe::MoeConfig,
        hidden: &View<'_, B>,
        routing: &crate::moe::Routing<'_>,
    ) -> Result<crate::moe::Dispatched<B>>
    where
        for<'a, 'b> ViewMut<'a, B>: crate::moe::RowKernels<View<'b, B>>,
    {
        crate::moe::dispatch(self, cfg, hidden, routing)
    }

    /// MoE combine of the experts' outputs (in expert order): router weights applied, each
    /// token's experts summed back on its rank ([`crate::moe::combine`]).
    pub fn moe_combine(
        &self,
        d: &crate::moe::Dispatched<B>,
        expert_out: &View<'_, B>,
    ) -> Result<B::Tensor>
    where
        for<'a, 'b> ViewMut<'a, B>: crate::moe::RowKernels<View<'b, B>>,
    {
        crate::moe::combine(self, d, expert_out)
    }

    /// Releases the communicator and the broadcaster; later calls fail with `NotInitialized`.
    pub fn destroy(&self) -> Result<()> {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match &self.comm {
            Some(c) => c.destroy(),
            None => Ok(()),
        }
    }

    /// The metadata of a tensor as the tensor-dict protocol sends it.
    pub fn tensor_meta(t: &B::Tensor) -> TensorMeta {
        t.meta()
    }
}

/// `shape` with dim `d` zeroed: the part of an all_gatherv input that must agree across ranks.
fn with_dim0(shape: &[usize], d: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[d] = 0;
    s
}
