//! The collectives both GPU backends run over the NCCL ABI, written once: all_gather(dim) and
//! reduce_scatter(dim) with their device re-layout, the v-variants as grouped broadcasts /
//! reduces (as vLLM's pynccl does them), gather, broadcast and grouped send/recv.
//!
//! A backend plugs in by implementing [`NcclDevice`] for its communicator (its tensor type, how to
//! allocate, copy and reach the NCCL communicator on its stream); it keeps its own argument checks
//! (`live`, device placement) and its extras (the custom all-reduce on CUDA).

use std::ffi::c_void;

use dist_core::communicator::{check_collective_dim, reduce_scatterv_shape};
use dist_core::tensor::{split_dims, with_dim};
use dist_core::{DType, ReduceOp, Result, Tensor};

use crate::{check_reduction, nccl_dtype, nccl_op, wire_dtype, Comm};

/// A device address as NCCL's `void*`.
pub fn vptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

/// What the shared collectives need from a backend's communicator.
pub trait NcclDevice {
    /// The backend's tensor type.
    type Tensor: Tensor;
    /// Group name, for errors.
    fn group_name(&self) -> &str;
    /// This rank in the group.
    fn group_rank(&self) -> usize;
    /// Ranks in the group.
    fn group_size(&self) -> usize;
    /// The loaded library's version code (for [`check_reduction`]).
    fn nccl_version_code(&self) -> i32;
    /// A new, uninitialised tensor on the communicator's device.
    fn new_tensor(&self, dtype: DType, shape: &[usize]) -> Result<Self::Tensor>;
    /// The tensor's device address.
    fn device_ptr(t: &Self::Tensor) -> u64;
    /// Runs `f` with the NCCL communicator and the device's stream; errors name the group and op.
    fn with_nccl<R>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Comm, *mut c_void) -> Result<R>,
    ) -> Result<R>;
    /// Keeps an op's temporary alive while the stream is capturing a graph, else drops it.
    fn retire(&self, tmp: Option<Self::Tensor>) -> Result<()>;
    /// A strided device copy on the stream: `height` rows of `width` bytes.
    ///
    /// # Safety
    /// Both ranges are live device memory of the communicator's device, large enough.
    unsafe fn copy_2d(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<()>;
    /// A contiguous device copy on the stream.
    ///
    /// # Safety
    /// Both ranges are live device memory of `bytes` bytes.
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
}

/// One grouped point-to-point operation of [`batch_send_recv`].
#[derive(Debug)]
pub enum P2pOp<'a, T> {
    /// Send the tensor to the peer.
    Send(&'a T, usize),
    /// Receive into the tensor from the peer.
    Recv(&'a mut T, usize),
}

/// The blocks of a re-layout between rank-major and `cat` order: for each rank, its offset in the
/// rank-major buffer, its column offset in a `cat` row, and its width, all in bytes.
fn blocks(
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
    lens.iter().scan((0usize, 0usize), move |(off, col), &l| {
        let w = l * inner * es;
        let b = (*off as u64, *col as u64, w);
        *off += outer * w;
        *col += w;
        Some(b)
    })
}

/// Re-lays out a rank-major buffer (`parts[r]` = `(outer, lens[r], inner)` elements of `es` bytes,
/// contiguous) into `cat(parts, dim)` with one strided copy per rank (`copy_2d(dst, dst_pitch,
/// src, src_pitch, width, height)`). The layout step of all_gather(dim) / all_gatherv / gather
/// when `dim` is not the outermost non-trivial dimension.
///
/// # Safety
/// `copy_2d` must be a device copy; `src` and `dst` are live buffers of
/// `outer * sum(lens) * inner * es` bytes.
pub unsafe fn rank_major_to_cat(
    mut copy_2d: impl FnMut(u64, usize, u64, usize, usize, usize) -> Result<()>,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let row = lens.iter().sum::<usize>() * inner * es;
    for (off, col, w) in blocks(outer, inner, lens, es) {
        copy_2d(dst + col, row, src + off, w, w, outer)?;
    }
    Ok(())
}

/// The inverse of [`rank_major_to_cat`]: `cat`-laid-out `src` into rank-major `dst` (the layout
/// step of reduce_scatter(dim) / reduce_scatterv).
///
/// # Safety
/// As [`rank_major_to_cat`].
pub unsafe fn cat_to_rank_major(
    mut copy_2d: impl FnMut(u64, usize, u64, usize, usize, usize) -> Result<()>,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let row = lens.iter().sum::<usize>() * inner * es;
    for (off, col, w) in blocks(outer, inner, lens, es) {
        copy_2d(dst + off, w, src + col, row, w, outer)?;
    }
    Ok(())
}

/// [`rank_major_to_cat`] (`to_cat`) or [`cat_to_rank_major`] with `d`'s device copy.
#[allow(clippy::too_many_arguments)]
fn relayout<D: NcclDevice>(
    d: &D,
    to_cat: bool,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let copy = |dst: u64, dp: usize, src: u64, sp: usize, w: usize, h: usize| {
        // SAFETY: forwarded: the callers of this function pass live buffers of d's device.
        unsafe { d.copy_2d(dst, dp, src, sp, w, h) }
    };
    // SAFETY: callers pass buffers of the full size on d's device; `copy` is d's device copy.
    unsafe {
        if to_cat {
            rank_major_to_cat(copy, dst, src, outer, inner, lens, es)
        } else {
            cat_to_rank_major(copy, dst, src, outer, inner, lens, es)
        }
    }
}

/// NCCL all-reduce of `numel` elements from `src` into `dst` (may be equal: in place).
pub fn all_reduce_ptrs<D: NcclDevice>(
    d: &D,
    src: u64,
    dst: u64,
    dtype: DType,
    numel: usize,
    op: ReduceOp,
) -> Result<()> {
    check_reduction(dtype, op, d.nccl_version_code())?;
    let dt = nccl_dtype(dtype)?;
    if numel == 0 {
        return Ok(());
    }
    d.with_nccl("all_reduce", |c, s| {
        // SAFETY: src/dst hold numel elements and outlive the enqueued work (callers hold them).
        unsafe { c.all_reduce(vptr(src), vptr(dst), numel, dt, nccl_op(op), s) }
    })
}

/// Grouped sends and receives (vLLM's `batch_isend_irecv`), in one NCCL group; fp8 as bytes.
pub fn batch_send_recv<D: NcclDevice>(d: &D, ops: &mut [P2pOp<'_, D::Tensor>]) -> Result<()> {
    for o in ops.iter() {
        let peer = match o {
            P2pOp::Send(_, p) | P2pOp::Recv(_, p) => *p,
        };
        dist_core::ensure_arg!(
            peer < d.group_size(),
            "batch_send_recv: peer {peer} out of range for {}",
            d.group_size()
        );
    }
    d.with_nccl("batch_send_recv", |c, s| {
        c.group(|c| {
            for o in ops.iter_mut() {
                match o {
                    P2pOp::Send(t, p) => {
                        let (dt, n) = wire_dtype(t.dtype(), t.numel())?;
                        if n == 0 {
                            continue; // both sides skip: shapes match
                        }
                        // SAFETY: t is live until the group's work runs (the caller keeps it).
                        unsafe { c.send(vptr(D::device_ptr(t)), n, dt, *p, s) }?;
                    }
                    P2pOp::Recv(t, p) => {
                        let (dt, n) = wire_dtype(t.dtype(), t.numel())?;
                        if n == 0 {
                            continue;
                        }
                        // SAFETY: as above.
                        unsafe { c.recv(vptr(D::device_ptr(t)), n, dt, *p, s) }?;
                    }
                }
            }
            Ok(())
        })
    })
}

/// `cat([x_0 … x_{n-1}], dim)`: NCCL all-gather rank-major, then a device re-layout unless the
/// dims before `dim` are all 1.
pub fn all_gather<D: NcclDevice>(d: &D, input: &D::Tensor, dim: isize) -> Result<D::Tensor> {
    let world = d.group_size();
    let dd = check_collective_dim(input.shape(), dim, "all_gather")?;
    let (outer, len, inner) = split_dims(input.shape(), dd);
    let out = d.new_tensor(input.dtype(), &with_dim(input.shape(), dd, len * world))?;
    let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
    if n == 0 {
        return Ok(out);
    }
    let es = input.dtype().size();
    let tmp = if outer == 1 {
        None
    } else {
        Some(d.new_tensor(input.dtype(), &[world * input.numel()])?)
    };
    let target = tmp.as_ref().map_or(D::device_ptr(&out), D::device_ptr);
    d.with_nccl("all_gather", |c, s| {
        // SAFETY: input has n elements, target world*n; both outlive the enqueued work.
        unsafe { c.all_gather(vptr(D::device_ptr(input)), vptr(target), n, dt, s) }
    })?;
    if let Some(tmp) = &tmp {
        relayout(
            d,
            true,
            D::device_ptr(&out),
            D::device_ptr(tmp),
            outer,
            inner,
            &vec![len; world],
            es,
        )?;
    }
    d.retire(tmp)?;
    Ok(out)
}

/// `cat` along `dim` of per-rank lengths `sizes`: one NCCL broadcast per root in a group.
pub fn all_gatherv<D: NcclDevice>(
    d: &D,
    input: &D::Tensor,
    dim: isize,
    sizes: &[usize],
) -> Result<D::Tensor> {
    let (world, me) = (d.group_size(), d.group_rank());
    let dd = check_collective_dim(input.shape(), dim, "all_gatherv")?;
    dist_core::ensure_arg!(
        sizes.len() == world,
        "all_gatherv: {} sizes for world size {world}",
        sizes.len()
    );
    dist_core::ensure_arg!(
        sizes[me] == input.shape()[dd],
        "all_gatherv: rank {me} has {} along dim {dd}, sizes say {}",
        input.shape()[dd],
        sizes[me]
    );
    if sizes.iter().all(|s| *s == sizes[0]) {
        return all_gather(d, input, dim);
    }
    let (outer, _, inner) = split_dims(input.shape(), dd);
    let total: usize = sizes.iter().sum();
    let out = d.new_tensor(input.dtype(), &with_dim(input.shape(), dd, total))?;
    let es = input.dtype().size();
    let tmp = if outer == 1 {
        None
    } else {
        Some(d.new_tensor(input.dtype(), &[outer * total * inner])?)
    };
    let target = tmp.as_ref().map_or(D::device_ptr(&out), D::device_ptr);
    let (dt, _) = wire_dtype(input.dtype(), 0)?;
    let src = D::device_ptr(input);
    d.with_nccl("all_gatherv", |c, s| {
        c.group(|c| {
            let mut off = 0usize;
            for (root, &l) in sizes.iter().enumerate() {
                let count = outer * l * inner;
                if count > 0 {
                    let send = if root == me {
                        vptr(src) as *const c_void
                    } else {
                        std::ptr::null()
                    };
                    // SAFETY: block `root` of target holds `count` elements; input holds
                    // `count` on the root; all outlive the enqueued work.
                    unsafe {
                        c.broadcast(send, vptr(target + (off * es) as u64), count, dt, root, s)
                    }?;
                }
                off += count;
            }
            Ok(())
        })
    })?;
    if let Some(tmp) = &tmp {
        relayout(
            d,
            true,
            D::device_ptr(&out),
            D::device_ptr(tmp),
            outer,
            inner,
            sizes,
            es,
        )?;
    }
    d.retire(tmp)?;
    Ok(out)
}

/// This rank's chunk along `dim` of the reduction: a device re-layout to rank-major (unless the
/// dims before `dim` are all 1), then NCCL reduce-scatter.
pub fn reduce_scatter<D: NcclDevice>(
    d: &D,
    input: &D::Tensor,
    dim: isize,
    op: ReduceOp,
) -> Result<D::Tensor> {
    let world = d.group_size();
    let dd = check_collective_dim(input.shape(), dim, "reduce_scatter")?;
    let (outer, len, inner) = split_dims(input.shape(), dd);
    dist_core::ensure_arg!(
        len % world == 0,
        "reduce_scatter: dim {dd} of shape {:?} is not divisible by world size {world}",
        input.shape()
    );
    check_reduction(input.dtype(), op, d.nccl_version_code())?;
    let chunk = len / world;
    let out = d.new_tensor(input.dtype(), &with_dim(input.shape(), dd, chunk))?;
    if input.numel() == 0 {
        return Ok(out);
    }
    let es = input.dtype().size();
    let tmp = if outer == 1 {
        None
    } else {
        let t = d.new_tensor(input.dtype(), &[input.numel()])?;
        relayout(
            d,
            false,
            D::device_ptr(&t),
            D::device_ptr(input),
            outer,
            inner,
            &vec![chunk; world],
            es,
        )?;
        Some(t)
    };
    let src = tmp.as_ref().map_or(D::device_ptr(input), D::device_ptr);
    let dt = nccl_dtype(input.dtype())?;
    let dst = D::device_ptr(&out);
    d.with_nccl("reduce_scatter", |c, s| {
        // SAFETY: src holds world*count elements, out count; both outlive the work.
        unsafe {
            c.reduce_scatter(
                vptr(src),
                vptr(dst),
                outer * chunk * inner,
                dt,
                nccl_op(op),
                s,
            )
        }
    })?;
    d.retire(tmp)?;
    Ok(out)
}

/// This rank's `sizes[rank]` rows along `dim` of the reduction: one NCCL reduce per root in a group.
pub fn reduce_scatterv<D: NcclDevice>(
    d: &D,
    input: &D::Tensor,
    dim: isize,
    sizes: &[usize],
    op: ReduceOp,
) -> Result<D::Tensor> {
    let dd = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
    let out_shape =
        reduce_scatterv_shape(input.shape(), dd, sizes, d.group_size(), d.group_rank())?;
    if sizes.iter().all(|s| *s == sizes[0]) {
        return reduce_scatter(d, input, dim, op);
    }
    check_reduction(input.dtype(), op, d.nccl_version_code())?;
    let (outer, _, inner) = split_dims(input.shape(), dd);
    let out = d.new_tensor(input.dtype(), &out_shape)?;
    let es = input.dtype().size();
    let tmp = if outer == 1 {
        None
    } else {
        let t = d.new_tensor(input.dtype(), &[input.numel()])?;
        relayout(
            d,
            false,
            D::device_ptr(&t),
            D::device_ptr(input),
            outer,
            inner,
            sizes,
            es,
        )?;
        Some(t)
    };
    let src = tmp.as_ref().map_or(D::device_ptr(input), D::device_ptr);
    let dt = nccl_dtype(input.dtype())?;
    let dst = D::device_ptr(&out);
    d.with_nccl("reduce_scatterv", |c, s| {
        c.group(|c| {
            let mut off = 0usize;
            for (root, &l) in sizes.iter().enumerate() {
                let count = outer * l * inner;
                if count > 0 {
                    // SAFETY: block `root` of src holds `count` elements; out holds
                    // sizes[rank] rows (read on the root only); all outlive the work.
                    unsafe {
                        c.reduce(
                            vptr(src + (off * es) as u64),
                            vptr(dst),
                            count,
                            dt,
                            nccl_op(op),
                            root,
                            s,
                        )
                    }?;
                }
                off += count;
            }
            Ok(())
        })
    })?;
    d.retire(tmp)?;
    Ok(out)
}

/// `dst` gets `cat(x over ranks, dim)`: every other rank sends, `dst` receives in a group.
pub fn gather<D: NcclDevice>(
    d: &D,
    input: &D::Tensor,
    dst: usize,
    dim: isize,
) -> Result<Option<D::Tensor>> {
    let (world, me) = (d.group_size(), d.group_rank());
    dist_core::ensure_arg!(
        dst < world,
        "gather: dst {dst} out of range for world size {world}"
    );
    let dd = check_collective_dim(input.shape(), dim, "gather")?;
    let (outer, len, inner) = split_dims(input.shape(), dd);
    let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
    let es = input.dtype().size();
    let nbytes = input.nbytes();
    if n == 0 {
        return if me == dst {
            d.new_tensor(input.dtype(), &with_dim(input.shape(), dd, len * world))
                .map(Some)
        } else {
            Ok(None)
        };
    }
    let src = D::device_ptr(input);
    if me != dst {
        d.with_nccl("gather", |c, s| {
            // SAFETY: input holds n elements and outlives the work.
            unsafe { c.send(vptr(src), n, dt, dst, s) }
        })?;
        return Ok(None);
    }
    let out = d.new_tensor(input.dtype(), &with_dim(input.shape(), dd, len * world))?;
    let tmp = if outer == 1 {
        None
    } else {
        Some(d.new_tensor(input.dtype(), &[world * input.numel()])?)
    };
    let target = tmp.as_ref().map_or(D::device_ptr(&out), D::device_ptr);
    // SAFETY: block `dst` of target holds nbytes; input holds nbytes.
    unsafe { d.copy_d2d(target + (dst * nbytes) as u64, src, nbytes) }?;
    if world > 1 {
        d.with_nccl("gather", |c, s| {
            c.group(|c| {
                for r in (0..world).filter(|r| *r != dst) {
                    // SAFETY: block r of target holds n elements and outlives the work.
                    unsafe { c.recv(vptr(target + (r * nbytes) as u64), n, dt, r, s) }?;
                }
                Ok(())
            })
        })?;
    }
    if let Some(tmp) = &tmp {
        relayout(
            d,
            true,
            D::device_ptr(&out),
            D::device_ptr(tmp),
            outer,
            inner,
            &vec![len; world],
            es,
        )?;
    }
    d.retire(tmp)?;
    Ok(Some(out))
}

/// Overwrites `tensor` with `src`'s, in place (the root passes its buffer as send and receive).
pub fn broadcast<D: NcclDevice>(d: &D, tensor: &mut D::Tensor, src: usize) -> Result<()> {
    let (world, me) = (d.group_size(), d.group_rank());
    dist_core::ensure_arg!(
        src < world,
        "broadcast: src {src} out of range for world size {world}"
    );
    let (dt, n) = wire_dtype(tensor.dtype(), tensor.numel())?;
    if n == 0 {
        return Ok(());
    }
    let p = D::device_ptr(tensor);
    d.with_nccl("broadcast", |c, s| {
        let send = if me == src {
            vptr(p) as *const c_void
        } else {
            std::ptr::null()
        };
        // SAFETY: tensor holds n elements and outlives the work.
        unsafe { c.broadcast(send, vptr(p), n, dt, src, s) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::tensor::{concat_along, split_along};

    /// The re-layouts, run with a host-memory `copy_2d`, equal dist-core's concat/split.
    #[test]
    fn relayouts_match_concat_and_split() {
        let host_copy_2d = |dst: u64, dp: usize, src: u64, sp: usize, w: usize, h: usize| {
            for r in 0..h {
                // SAFETY: the test's buffers hold every row the re-layout addresses.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src as usize + r * sp) as *const u8,
                        (dst as usize + r * dp) as *mut u8,
                        w,
                    )
                };
            }
            Ok(())
        };
        let (outer, inner, es) = (3usize, 2usize, 4usize);
        let lens = [1usize, 0, 3, 2];
        let total: usize = lens.iter().sum();
        let parts: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(r, l)| {
                (0..outer * l * inner * es)
                    .map(|i| (r * 50 + i) as u8)
                    .collect()
            })
            .collect();
        let rank_major: Vec<u8> = parts.concat();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let want = concat_along(&refs, &[outer, 0, inner], 1, &lens, es).unwrap();
        let mut cat = vec![0u8; rank_major.len()];
        // SAFETY: both buffers hold outer*total*inner*es bytes; the copy is a host copy.
        unsafe {
            rank_major_to_cat(
                host_copy_2d,
                cat.as_mut_ptr() as u64,
                rank_major.as_ptr() as u64,
                outer,
                inner,
                &lens,
                es,
            )
        }
        .unwrap();
        assert_eq!(cat, want);
        let mut back = vec![0u8; cat.len()];
        // SAFETY: as above.
        unsafe {
            cat_to_rank_major(
                host_copy_2d,
                back.as_mut_ptr() as u64,
                cat.as_ptr() as u64,
                outer,
                inner,
                &lens,
                es,
            )
        }
        .unwrap();
        assert_eq!(back, rank_major);
        let split = split_along(&cat, &[outer, total, inner], 1, &lens, es).unwrap();
        assert_eq!(split.concat(), rank_major);
    }
}
