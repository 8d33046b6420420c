//! [`CandleGroup`]: a group's collectives on candle tensors.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use dist_core::communicator::{
    all_gather_shape, all_gatherv_shape, check_collective_dim, reduce_scatter_shape,
    reduce_scatterv_shape, View, ViewMut,
};
use dist_core::{DictEntry, DictValue, GroupCoordinator, Value};

use crate::dtype::{ensure_reducible, ensure_same};
use crate::{CandleBackend, Result};

/// One group's collectives on candle tensors: a thin handle over the group's
/// [`GroupCoordinator`], whose view calls it makes with the tensors' own memory.
///
/// `*_into` and `*_in_place` forms write the caller's tensors (which must be contiguous: the
/// op writes their storage, and every tensor sharing that storage sees it, as with candle's own
/// in-place ops); the other forms return new tensors. Inputs that are not contiguous are made
/// contiguous once, a copy; contiguous inputs are read where they are. Ranks (`src`, `dst`) are
/// ranks within the group; dims may be negative (counted from the end).
#[derive(Debug)]
pub struct CandleGroup<'g, B: CandleBackend> {
    group: &'g GroupCoordinator<B>,
}

impl<B: CandleBackend> Clone for CandleGroup<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: CandleBackend> Copy for CandleGroup<'_, B> {}

impl<'g, B: CandleBackend> CandleGroup<'g, B> {
    /// The candle handle of `group`.
    pub fn new(group: &'g GroupCoordinator<B>) -> Self {
        CandleGroup { group }
    }
    /// The group's coordinator (ranks, host-group objects, the owned-tensor forms).
    pub fn group(&self) -> &'g GroupCoordinator<B> {
        self.group
    }
    /// This process's rank within the group.
    pub fn rank_in_group(&self) -> usize {
        self.group.rank_in_group()
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// The owned form of a collective: `t` itself on a one-rank group, else a new tensor of
    /// `shape` that `into` (the `_into` form) fills.
    fn owned(
        &self,
        op: &'static str,
        t: &Tensor,
        shape: &[usize],
        into: impl FnOnce(&Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(t.clone());
        }
        let out = B::alloc(op, t.dtype(), shape, t.device())?;
        into(&out)?;
        Ok(out)
    }

    /// A collective from `input` into `output` (of the same dtype): `f` on the views of them
    /// that candle lends.
    fn lend_into(
        &self,
        op: &'static str,
        input: &Tensor,
        output: &Tensor,
        f: impl for<'v> FnOnce(&View<'v, B>, &mut ViewMut<'v, B>) -> dist_core::Result<()>,
    ) -> Result<()> {
        ensure_same(op, input.dtype(), output.dtype())?;
        B::lend(op, &[input], &[output], |r, mut w| f(&r[0], &mut w[0]))
    }

    /// Sums `t` over the group in its own storage (`t` must be contiguous).
    pub fn all_reduce_in_place(&self, t: &Tensor) -> Result<()> {
        const OP: &str = "all_reduce";
        ensure_reducible(OP, t.dtype())?;
        B::lend(OP, &[], &[t], |_, mut w| {
            self.group.all_reduce_in_place(&mut w[0])
        })
    }

    /// Sums `t` over the group and returns it: in `t`'s own storage when `t` is contiguous (the
    /// returned tensor shares it), else in a contiguous copy made once.
    pub fn all_reduce(&self, t: Tensor) -> Result<Tensor> {
        // candle's `contiguous` is `t` itself (an Arc clone) when it already is.
        let t = t.contiguous()?;
        self.all_reduce_in_place(&t)?;
        Ok(t)
    }

    /// Sum over the group of `input` into `output` (same dtype and shape).
    pub fn all_reduce_into(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        const OP: &str = "all_reduce";
        ensure_reducible(OP, input.dtype())?;
        self.lend_into(OP, input, output, |i, o| self.group.all_reduce_into(i, o))
    }

    /// `cat` over the group of `t` along `dim`, in a new tensor (a one-rank group returns `t`).
    pub fn all_gather(&self, t: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let shape = all_gather_shape(t.dims(), dim, self.world_size(), OP)?;
        self.owned(OP, t, &shape, |out| self.all_gather_into(t, out, dim))
    }

    /// `cat` over the group of `input` along `dim`, written into `output`.
    pub fn all_gather_into(&self, input: &Tensor, output: &Tensor, dim: isize) -> Result<()> {
        const OP: &str = "all_gather";
        self.lend_into(OP, input, output, |i, o| {
            self.group.all_gather_into(i, o, dim)
        })
    }

    /// `cat` along `dim` of per-rank tensors whose lengths there are `sizes`, in a new tensor.
    pub fn all_gatherv(&self, t: &Tensor, dim: isize, sizes: &[usize]) -> Result<Tensor> {
        const OP: &str = "all_gatherv";
        let shape = all_gatherv_shape(
            t.dims(),
            dim,
            sizes,
            self.world_size(),
            self.rank_in_group(),
        )?;
        self.owned(OP, t, &shape, |out| {
            self.all_gatherv_into(t, out, dim, sizes)
        })
    }

    /// [`Self::all_gatherv`] into `output`.
    pub fn all_gatherv_into(
        &self,
        input: &Tensor,
        output: &Tensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        const OP: &str = "all_gatherv";
        self.lend_into(OP, input, output, |i, o| {
            self.group.all_gatherv_into(i, o, dim, sizes)
        })
    }

    /// This rank's chunk along `dim` of the sum over the group, in a new tensor.
    pub fn reduce_scatter(&self, t: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "reduce_scatter";
        ensure_reducible(OP, t.dtype())?;
        let shape = reduce_scatter_shape(t.dims(), dim, self.world_size())?;
        self.owned(OP, t, &shape, |out| self.reduce_scatter_into(t, out, dim))
    }

    /// This rank's chunk along `dim` of the sum over the group, written into `output`.
    pub fn reduce_scatter_into(&self, input: &Tensor, output: &Tensor, dim: isize) -> Result<()> {
        const OP: &str = "reduce_scatter";
        ensure_reducible(OP, input.dtype())?;
        self.lend_into(OP, input, output, |i, o| {
            self.group.reduce_scatter_into(i, o, dim)
        })
    }

    /// This rank's `sizes[rank]`-long chunk along `dim` of the sum over the group, in a new tensor.
    pub fn reduce_scatterv(&self, t: &Tensor, dim: isize, sizes: &[usize]) -> Result<Tensor> {
        const OP: &str = "reduce_scatterv";
        ensure_reducible(OP, t.dtype())?;
        let d = check_collective_dim(t.dims(), dim, OP)?;
        let shape =
            reduce_scatterv_shape(t.dims(), d, sizes, self.world_size(), self.rank_in_group())?;
        self.owned(OP, t, &shape, |out| {
            self.reduce_scatterv_into(t, out, dim, sizes)
        })
    }

    /// [`Self::reduce_scatterv`] into `output`.
    pub fn reduce_scatterv_into(
        &self,
        input: &Tensor,
        output: &Tensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        const OP: &str = "reduce_scatterv";
        ensure_reducible(OP, input.dtype())?;
        self.lend_into(OP, input, output, |i, o| {
            self.group.reduce_scatterv_into(i, o, dim, sizes)
        })
    }

    /// `dst` gets `Some(cat over the group of t along dim)` in a new tensor, the others `None`.
    pub fn gather(&self, t: &Tensor, dst: usize, dim: isize) -> Result<Option<Tensor>> {
        const OP: &str = "gather";
        let shape = all_gather_shape(t.dims(), dim, self.world_size(), OP)?;
        let out = match self.rank_in_group() == dst {
            true => Some(B::alloc(OP, t.dtype(), &shape, t.device())?),
            false => None,
        };
        self.gather_into(t, out.as_ref(), dst, dim)?;
        Ok(out)
    }

    /// [`Self::gather`] into `output`, which `dst` passes and the others do not.
    pub fn gather_into(
        &self,
        input: &Tensor,
        output: Option<&Tensor>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        const OP: &str = "gather";
        match output {
            Some(o) => {
                ensure_same(OP, input.dtype(), o.dtype())?;
                B::lend(OP, &[input], &[o], |r, mut w| {
                    self.group.gather_into(&r[0], Some(&mut w[0]), dst, dim)
                })
            }
            None => B::lend(OP, &[input], &[], |r, _| {
                self.group.gather_into(&r[0], None, dst, dim)
            }),
        }
    }

    /// Overwrites `t` (contiguous) with group rank `src`'s, in its own storage.
    pub fn broadcast_in_place(&self, t: &Tensor, src: usize) -> Result<()> {
        B::lend("broadcast", &[], &[t], |_, mut w| {
            self.group.broadcast_in_place(&mut w[0], src)
        })
    }

    /// Sends `t` to group rank `dst` (default: the next rank).
    pub fn send(&self, t: &Tensor, dst: Option<usize>) -> Result<()> {
        B::lend("send", &[t], &[], |r, _| self.group.send_view(&r[0], dst))
    }

    /// Receives from group rank `src` (default: the previous rank) into `t` (contiguous), whose
    /// dtype and size must be the sender's.
    pub fn recv_into(&self, t: &Tensor, src: Option<usize>) -> Result<()> {
        B::lend("recv", &[], &[t], |_, mut w| {
            self.group.recv_into(&mut w[0], src)
        })
    }

    /// Receives a new `dtype` tensor of `shape` on `device` from group rank `src` (default: the
    /// previous rank).
    pub fn recv(
        &self,
        dtype: DType,
        shape: &[usize],
        device: &Device,
        src: Option<usize>,
    ) -> Result<Tensor> {
        let t = B::alloc("recv", dtype, shape, device)?;
        self.recv_into(&t, src)?;
        Ok(t)
    }

    /// Sends a dict of tensors and values to group rank `dst` (default: next), vLLM's PP
    /// protocol ([`GroupCoordinator::send_tensor_dict_views`]): the tensors are read where they
    /// are; with `all_gather_group` (the TP group) each rank sends only its slice.
    pub fn send_tensor_dict(
        &self,
        dict: &[DictEntry<Tensor>],
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
        all_gather_tensors: Option<&BTreeMap<String, bool>>,
    ) -> Result<()> {
        let tensors: Vec<&Tensor> = dict
            .iter()
            .filter_map(|(_, v)| match v {
                DictValue::Tensor(t) => Some(t),
                DictValue::Value(_) => None,
            })
            .collect();
        B::lend("send_tensor_dict", &tensors, &[], |r, _| {
            let mut views = r.into_iter();
            let entries: Vec<_> = dict
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        DictValue::Tensor(_) => {
                            DictValue::Tensor(views.next().expect("one view per tensor"))
                        }
                        DictValue::Value(v) => DictValue::Value(v.clone()),
                    };
                    (k.clone(), v)
                })
                .collect();
            self.group
                .send_tensor_dict_views(&entries, dst, all_gather_group, all_gather_tensors)
        })
    }

    /// Receives a dict from group rank `src` (default: previous) into the caller's tensors, by
    /// key: every tensor the sender sends must have an output of the same key, dtype and shape
    /// (else an error naming the key, before anything is received). Returns the non-tensor entries.
    pub fn recv_tensor_dict_into(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator<B>>,
        outputs: &[(&str, &Tensor)],
    ) -> Result<Vec<(String, Value)>> {
        let tensors: Vec<&Tensor> = outputs.iter().map(|(_, t)| *t).collect();
        B::lend("recv_tensor_dict", &[], &tensors, |_, w| {
            let mut outs: Vec<_> = outputs.iter().map(|(k, _)| *k).zip(w).collect();
            self.group
                .recv_tensor_dict_into(src, all_gather_group, &mut outs)
        })
    }
}
