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

use crate::communicator::check_collective_dim;
use crate::diag::{find_mismatch, CallDescriptor, Diagnostics};
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

/// vLLM's `dict[str, Tensor | Any]`, in insertion order.
pub type TensorDict<T> = Vec<(String, DictValue<T>)>;

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
        args: String,
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
                args,
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

    /// Sum over the group. **Use the return value**: it is the result (the input is consumed).
    pub fn all_reduce(&self, x: B::Tensor) -> Result<B::Tensor> {
        self.all_reduce_op(x, ReduceOp::Sum)
    }

    /// [`Self::all_reduce`] with another operator.
    pub fn all_reduce_op(&self, x: B::Tensor, op: ReduceOp) -> Result<B::Tensor> {
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        self.run_op(
            "all_reduce",
            Some((x.dtype(), x.shape())),
            op.name().into(),
            true,
            || self.comm("all_reduce")?.all_reduce(&x, op),
        )
    }

    /// `cat` over the group along `dim` (negative dims count from the end).
    pub fn all_gather(&self, x: B::Tensor, dim: isize) -> Result<B::Tensor> {
        check_collective_dim(x.shape(), dim, "all_gather")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        self.run_op(
            "all_gather",
            Some((x.dtype(), x.shape())),
            format!("dim {dim}"),
            true,
            || self.comm("all_gather")?.all_gather(&x, dim),
        )
    }

    /// `cat` along `dim` of per-rank tensors whose lengths there are `sizes`.
    pub fn all_gatherv(&self, x: B::Tensor, dim: isize, sizes: &[usize]) -> Result<B::Tensor> {
        let d = check_collective_dim(x.shape(), dim, "all_gatherv")?;
        crate::ensure_arg!(
            sizes.len() == self.world_size() && sizes[self.rank_in_group] == x.shape()[d],
            "all_gatherv: sizes {sizes:?} do not match this rank's {} rows for group size {}",
            x.shape()[d],
            self.world_size()
        );
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        let shape = with_dim0(x.shape(), d);
        self.run_op(
            "all_gatherv",
            Some((x.dtype(), &shape)),
            format!("dim {dim} sizes {sizes:?}"),
            true,
            || self.comm("all_gatherv")?.all_gatherv(&x, dim, sizes),
        )
    }

    /// This rank's chunk along `dim` of the sum over the group.
    pub fn reduce_scatter(&self, x: B::Tensor, dim: isize) -> Result<B::Tensor> {
        check_collective_dim(x.shape(), dim, "reduce_scatter")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        self.run_op(
            "reduce_scatter",
            Some((x.dtype(), x.shape())),
            format!("dim {dim}"),
            true,
            || {
                self.comm("reduce_scatter")?
                    .reduce_scatter(&x, dim, ReduceOp::Sum)
            },
        )
    }

    /// This rank's `sizes[rank]`-long chunk along `dim` of the sum over the group.
    pub fn reduce_scatterv(&self, x: B::Tensor, dim: isize, sizes: &[usize]) -> Result<B::Tensor> {
        check_collective_dim(x.shape(), dim, "reduce_scatterv")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(x);
        }
        self.run_op(
            "reduce_scatterv",
            Some((x.dtype(), x.shape())),
            format!("dim {dim} sizes {sizes:?}"),
            true,
            || {
                self.comm("reduce_scatterv")?
                    .reduce_scatterv(&x, dim, sizes, ReduceOp::Sum)
            },
        )
    }

    /// `dst` (group rank) gets `Some(cat(x over ranks, dim))`; the others `None`.
    pub fn gather(&self, x: B::Tensor, dst: usize, dim: isize) -> Result<Option<B::Tensor>> {
        self.check_group_rank(dst, "gather dst")?;
        check_collective_dim(x.shape(), dim, "gather")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(Some(x));
        }
        self.run_op(
            "gather",
            Some((x.dtype(), x.shape())),
            format!("dst {dst} dim {dim}"),
            true,
            || self.comm("gather")?.gather(&x, dst, dim),
        )
    }

    /// Overwrites `x` with group rank `src`'s tensor.
    pub fn broadcast(&self, x: &mut B::Tensor, src: usize) -> Result<()> {
        self.check_group_rank(src, "broadcast src")?;
        self.live()?;
        if self.world_size() == 1 {
            return Ok(());
        }
        let (dtype, shape) = (x.dtype(), x.shape().to_vec());
        self.run_op(
            "broadcast",
            Some((dtype, &shape)),
            format!("src {src}"),
            true,
            || self.comm("broadcast")?.broadcast(x, src),
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
        self.run_op("barrier", None, String::new(), true, || self.host.barrier())
    }

    /// Sends a tensor to group rank `dst` (default: the next rank).
    pub fn send(&self, t: &B::Tensor, dst: Option<usize>) -> Result<()> {
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_group_rank(dst, "send dst")?;
        crate::ensure_arg!(dst != self.rank_in_group, "send: dst {dst} is this rank");
        self.run_op(
            "send",
            Some((t.dtype(), t.shape())),
            format!("dst {dst}"),
            false,
            || self.comm("send")?.send(t, dst),
        )
    }

    /// Receives a tensor of `dtype` and `shape` from group rank `src` (default: the previous rank).
    pub fn recv(&self, dtype: DType, shape: &[usize], src: Option<usize>) -> Result<B::Tensor> {
        let ws = self.world_size();
        let src = src.unwrap_or((self.rank_in_group + ws - 1) % ws);
        self.check_group_rank(src, "recv src")?;
        crate::ensure_arg!(src != self.rank_in_group, "recv: src {src} is this rank");
        let comm = self.comm("recv")?;
        let mut t = comm.empty(dtype, shape)?;
        self.run_op(
            "recv",
            Some((dtype, shape)),
            format!("src {src}"),
            false,
            || comm.recv(&mut t, src),
        )?;
        Ok(t)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<B::Tensor> {
        match &self.comm {
            Some(c) => c.empty(dtype, shape),
            None => B::from_host(&crate::HostTensor::zeros(dtype, shape), self.device),
        }
    }

    fn split_dict(dict: &TensorDict<B::Tensor>) -> Vec<(String, MetaItem)> {
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
            let meta = DictMeta {
                items: Self::split_dict(&dict),
                all_gathered: vec![],
            };
            self.broadcast_object(Some(&meta), src)?;
            for (_, v) in dict.iter_mut() {
                if let DictValue::Tensor(t) = v {
                    if t.numel() > 0 {
                        self.broadcast_one(t, src)?;
                    }
                }
            }
            Ok(dict)
        } else {
            let meta: DictMeta = self.broadcast_object(None, src)?;
            let mut out = Vec::with_capacity(meta.items.len());
            for (k, m) in meta.items {
                match m {
                    MetaItem::Value(v) => out.push((k, DictValue::Value(v))),
                    MetaItem::Tensor { dtype, shape } => {
                        let mut t = self.alloc(dtype, &shape)?;
                        if t.numel() > 0 {
                            self.broadcast_one(&mut t, src)?;
                        }
                        out.push((k, DictValue::Tensor(t)));
                    }
                }
            }
            Ok(out)
        }
    }

    fn broadcast_one(&self, t: &mut B::Tensor, src: usize) -> Result<()> {
        match &self.comm {
            Some(c) => c.broadcast(t, src),
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
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_group_rank(dst, "send_tensor_dict dst")?;
        crate::ensure_arg!(
            dst != self.rank_in_group,
            "send_tensor_dict: dst {dst} is this rank"
        );
        let ag = all_gather_group.filter(|g| g.world_size() > 1);
        let all_gathered: Vec<bool> = dict
            .iter()
            .map(|(k, v)| match v {
                DictValue::Tensor(t) => Self::use_all_gather(k, t.numel(), ag, all_gather_tensors),
                DictValue::Value(_) => false,
            })
            .collect();
        let meta = DictMeta {
            items: Self::split_dict(dict),
            all_gathered: all_gathered.clone(),
        };
        self.send_object(&meta, dst)?;
        for ((_, v), agd) in dict.iter().zip(all_gathered) {
            let DictValue::Tensor(t) = v else { continue };
            if t.numel() == 0 {
                continue;
            }
            if agd {
                let ag = ag.expect("all_gathered implies a group");
                let n = t.numel() / ag.world_size();
                let slice = B::flat_slice(t, ag.rank_in_group() * n, n)?;
                self.send_tensor_any(&slice, dst)?;
            } else {
                self.send_tensor_any(t, dst)?;
            }
        }
        Ok(())
    }

    /// Receives a dict from group rank `src` (default: previous); see [`Self::send_tensor_dict`].
    pub fn recv_tensor_dict(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
    ) -> Result<TensorDict<B::Tensor>> {
        self.live()?;
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
        let mut out = Vec::with_capacity(meta.items.len());
        for (i, (k, m)) in meta.items.into_iter().enumerate() {
            match m {
                MetaItem::Value(v) => out.push((k, DictValue::Value(v))),
                MetaItem::Tensor { dtype, shape } => {
                    let numel: usize = shape.iter().product();
                    if numel == 0 {
                        out.push((k, DictValue::Tensor(self.alloc(dtype, &shape)?)));
                        continue;
                    }
                    if meta.all_gathered.get(i).copied().unwrap_or(false) {
                        let ag = ag.ok_or_else(|| {
                            Error::invalid(format!(
                                "recv_tensor_dict: the sender all-gather-sliced '{k}' but no all_gather_group was given"
                            ))
                        })?;
                        crate::ensure_arg!(
                            numel % ag.world_size() == 0,
                            "recv_tensor_dict: '{k}' has {numel} elements, not divisible by the all-gather group size {}",
                            ag.world_size()
                        );
                        let mut slice = self.alloc(dtype, &[numel / ag.world_size()])?;
                        self.recv_tensor_any(&mut slice, src)?;
                        let full = ag.all_gather(slice, 0)?;
                        out.push((k, DictValue::Tensor(B::reshape(full, &shape)?)));
                    } else {
                        let mut t = self.alloc(dtype, &shape)?;
                        self.recv_tensor_any(&mut t, src)?;
                        out.push((k, DictValue::Tensor(t)));
                    }
                }
            }
        }
        Ok(out)
    }

    fn send_tensor_any(&self, t: &B::Tensor, dst: usize) -> Result<()> {
        match &self.comm {
            Some(c) => c.send(t, dst),
            None => self.host.send_bytes(B::to_host(t)?.as_bytes(), dst),
        }
    }

    fn recv_tensor_any(&self, t: &mut B::Tensor, src: usize) -> Result<()> {
        match &self.comm {
            Some(c) => c.recv(t, src),
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
