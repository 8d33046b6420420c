//! [`Communicator`]: every `DeviceCommunicator` op over RCCL (through the NCCL-ABI layer
//! `dist-nccl`) on HIP device buffers. vLLM's custom all-reduce and quick all-reduce for ROCm
//! are not built yet: every all-reduce goes to RCCL.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::communicator::{check_collective_dim, reduce_scatterv_shape};
use dist_core::tensor::{split_dims, with_dim};
use dist_core::{
    CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error, HostGroup, ReduceOp,
    Result, Tensor,
};
use dist_nccl::{check_reduction, nccl_dtype, nccl_op, wire_dtype, Comm, Flavor, UniqueId};

use crate::driver::{copy_2d, copy_d2d, vptr, DeviceContext};
use crate::hip::safe::Graph;
use crate::tensor::RocmTensor;

/// Re-lays out a rank-major buffer (`parts[r]` = `(outer, lens[r], inner)` elements of `es`
/// bytes, contiguous) into `cat(parts, dim)`, with one strided device copy per rank on the
/// device's stream. The layout step of all_gather(dim) / all_gatherv / gather when `dim` is
/// not the outermost non-trivial dimension.
///
/// # Safety
/// `src` and `dst` are live device buffers of `outer * sum(lens) * inner * es` bytes on `dev`.
pub unsafe fn rank_major_to_cat(
    dev: &DeviceContext,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let total: usize = lens.iter().sum();
    let (mut src_off, mut col) = (0usize, 0usize);
    for &l in lens {
        let w = l * inner * es;
        // SAFETY: src holds outer*total*inner elements rank-major, dst the same count
        // interleaved; each strided copy stays inside both (callers size them so).
        unsafe {
            copy_2d(
                dev.runtime(),
                dst + col as u64,
                total * inner * es,
                src + src_off as u64,
                w,
                w,
                outer,
                dev.stream(),
            )
        }?;
        src_off += outer * w;
        col += w;
    }
    Ok(())
}

/// The inverse of [`rank_major_to_cat`]: `cat`-laid-out `src` into rank-major `dst` (the layout
/// step of reduce_scatter(dim) / reduce_scatterv).
///
/// # Safety
/// As [`rank_major_to_cat`].
pub unsafe fn cat_to_rank_major(
    dev: &DeviceContext,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let total: usize = lens.iter().sum();
    let (mut dst_off, mut col) = (0usize, 0usize);
    for &l in lens {
        let w = l * inner * es;
        // SAFETY: mirror of rank_major_to_cat.
        unsafe {
            copy_2d(
                dev.runtime(),
                dst + dst_off as u64,
                w,
                src + col as u64,
                total * inner * es,
                w,
                outer,
                dev.stream(),
            )
        }?;
        dst_off += outer * w;
        col += w;
    }
    Ok(())
}

/// How a communicator is built. [`Options::from_env`] is what [`crate::RocmBackend`] uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Device index; `None`: the context's `local_rank` (vLLM's `cuda:{local_rank}`, which
    /// torch on ROCm maps to the HIP device).
    pub device: Option<usize>,
    /// Create the RCCL communicator (off: only device memory and copies work; every
    /// collective is then [`Error::Unsupported`]).
    pub nccl: bool,
}

impl Options {
    /// Defaults. `DIST_DISABLE_CUSTOM_ALL_REDUCE` has nothing to turn off on ROCm yet.
    pub fn from_env() -> Options {
        Options {
            device: None,
            nccl: true,
        }
    }
}

/// One grouped point-to-point operation of [`Communicator::batch_send_recv`].
#[derive(Debug)]
pub enum P2pOp<'a> {
    /// Send the tensor to the peer.
    Send(&'a RocmTensor, usize),
    /// Receive into the tensor from the peer.
    Recv(&'a mut RocmTensor, usize),
}

/// The ROCm device communicator of one group.
///
/// Every op is enqueued on the device's stream ([`DeviceContext::stream`]) and returns without
/// waiting for the GPU, as vLLM's pynccl does; [`Communicator::synchronize`] waits with a deadline
/// and surfaces NCCL's asynchronous errors. Results are out of place except the `_in_place` and
/// `broadcast`/`recv` forms.
pub struct Communicator {
    name: String,
    rank: usize,
    world: usize,
    dev: Arc<DeviceContext>,
    host: Arc<dyn HostGroup>,
    timeout: Mutex<Duration>,
    nccl: Mutex<Option<Comm>>,
    nccl_version: i32,
    capture_scope: AtomicBool,
    destroyed: AtomicBool,
    /// Temporaries of ops captured into HIP graphs: a graph keeps using their addresses on
    /// every replay, so they live as long as the communicator (as torch's graph memory pool).
    graph_keep: Mutex<Vec<RocmTensor>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("group", &self.name)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.dev.ordinal())
            .field("rccl", &self.has_nccl())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Communicator {
    /// Builds the communicator of `ctx`'s group. The device comes first (no AMD GPU: "no ROCm
    /// device", before RCCL is looked for); then, collective over `ctx.host_group`: rank 0 makes
    /// the RCCL unique id and broadcasts its 128 bytes; RCCL init (bounded by `ctx.timeout`) on
    /// a helper thread with the device current, and a warm-up all-reduce.
    pub fn new(ctx: &CommunicatorContext, opts: &Options) -> Result<Communicator> {
        crate::driver::ensure_driver()?;
        let host = ctx.host_group.clone();
        let world = host.world_size();
        let rank = host.rank();
        dist_core::ensure_arg!(
            world == ctx.ranks.len() && rank == ctx.rank_in_group,
            "group {}: host group is rank {rank} of {world}, context says {} of {}",
            ctx.group_name,
            ctx.rank_in_group,
            ctx.ranks.len()
        );
        let ordinal = opts.device.unwrap_or(ctx.local_rank);
        let dev = DeviceContext::get(ordinal)?;
        let mut nccl_version = 0;
        let nccl = if opts.nccl {
            let lib = dist_nccl::library(Flavor::Rccl)?;
            nccl_version = lib.version_code;
            let id_bytes = if rank == 0 {
                let id = UniqueId::new(lib)?;
                host.broadcast_bytes(Some(&id.to_bytes()), 0)?
            } else {
                host.broadcast_bytes(None, 0)?
            };
            let id = UniqueId::from_bytes(&id_bytes)?;
            let d2 = dev.clone();
            let mut comm = Comm::init_rank(lib, world, id, rank, ctx.timeout, move || d2.bind())?;
            // Warm-up all-reduce of one zero, then a stream sync (as pynccl does).
            let z = RocmTensor::zeros(&dev, DType::F32, &[1])?;
            // SAFETY: z is a live 1-element f32 device buffer; we synchronise before it drops.
            unsafe {
                comm.all_reduce(
                    vptr(z.ptr()),
                    vptr(z.ptr()),
                    1,
                    dist_nccl::sys::ncclFloat32,
                    dist_nccl::sys::ncclSum,
                    dev.stream(),
                )
            }?;
            dev.synchronize()?;
            tracing::info!(group = %ctx.group_name, rank, world, rccl = %lib.version(), path = %lib.path, "RCCL communicator ready");
            Some(comm)
        } else {
            None
        };
        Ok(Communicator {
            name: ctx.group_name.clone(),
            rank,
            world,
            dev,
            host,
            timeout: Mutex::new(ctx.timeout),
            nccl: Mutex::new(nccl),
            nccl_version,
            capture_scope: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            graph_keep: Mutex::new(Vec::new()),
        })
    }

    /// The device context (its stream is where every op is enqueued).
    pub fn context(&self) -> &Arc<DeviceContext> {
        &self.dev
    }
    /// True when an NCCL communicator exists.
    pub fn has_nccl(&self) -> bool {
        lock(&self.nccl).is_some()
    }
    /// False: vLLM's custom (and quick) all-reduce for ROCm are not built yet.
    pub fn has_custom_ar(&self) -> bool {
        false
    }
    /// The host group.
    pub fn host_group(&self) -> &Arc<dyn HostGroup> {
        &self.host
    }

    /// Waits until the work enqueued so far has run, at most the communicator's timeout; polls
    /// RCCL's asynchronous error meanwhile. Spins briefly, then sleeps.
    pub fn synchronize(&self) -> Result<()> {
        let nccl = &self.nccl;
        self.dev.wait(
            &format!("{} synchronize", self.name),
            self.timeout(),
            || {
                if let Some(c) = lock(nccl).as_ref() {
                    c.check_async_error()?;
                }
                Ok(())
            },
        )
    }

    fn live(&self, op: &str) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(Error::NotInitialized(format!(
                "{} {op}: communicator destroyed",
                self.name
            )));
        }
        self.dev.bind()
    }

    fn check_tensor(&self, t: &RocmTensor, op: &str) -> Result<()> {
        let want = Device::new(DeviceKind::Rocm, self.dev.ordinal());
        dist_core::ensure_arg!(
            t.device() == want,
            "{} {op}: tensor on {}, communicator on {want}",
            self.name,
            t.device()
        );
        Ok(())
    }

    fn with_nccl<R>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Comm, *mut c_void) -> Result<R>,
    ) -> Result<R> {
        self.live(op)?;
        let mut g = lock(&self.nccl);
        let c = g.as_mut().ok_or_else(|| {
            Error::unsupported(format!("{} {op}: this communicator has no RCCL", self.name))
        })?;
        f(c, self.dev.stream()).map_err(|e| match e {
            Error::Backend {
                backend,
                code,
                message,
            } => Error::Backend {
                backend,
                code,
                message: format!("{} {op}: {message}", self.name),
            },
            e => e,
        })
    }

    /// Keeps an op's temporary alive when the stream is capturing (see `graph_keep`); otherwise
    /// drops it (its free waits for the device).
    fn retire(&self, tmp: Option<RocmTensor>) -> Result<()> {
        if let Some(t) = tmp {
            if self.dev.is_capturing()? {
                lock(&self.graph_keep).push(t);
            }
        }
        Ok(())
    }

    fn new_tensor(&self, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        RocmTensor::uninit(&self.dev, dtype, shape)
    }

    /// Grouped sends and receives (vLLM's `batch_isend_irecv`), in one NCCL group. fp8 travels as bytes.
    pub fn batch_send_recv(&self, ops: &mut [P2pOp<'_>]) -> Result<()> {
        for o in ops.iter() {
            let (t, peer) = match o {
                P2pOp::Send(t, p) => (&**t, *p),
                P2pOp::Recv(t, p) => (&**t, *p),
            };
            self.check_tensor(t, "batch_send_recv")?;
            dist_core::ensure_arg!(
                peer < self.world,
                "batch_send_recv: peer {peer} out of range for {}",
                self.world
            );
        }
        self.with_nccl("batch_send_recv", |c, s| {
            c.group(|c| {
                for o in ops.iter_mut() {
                    match o {
                        P2pOp::Send(t, p) => {
                            let (dt, n) = wire_dtype(t.dtype(), t.numel())?;
                            if n == 0 {
                                continue; // both sides skip: shapes match
                            }
                            // SAFETY: t is live until the group's work runs (the caller keeps it).
                            unsafe { c.send(vptr(t.ptr()), n, dt, *p, s) }?;
                        }
                        P2pOp::Recv(t, p) => {
                            let (dt, n) = wire_dtype(t.dtype(), t.numel())?;
                            if n == 0 {
                                continue;
                            }
                            // SAFETY: as above.
                            unsafe { c.recv(vptr(t.ptr()), n, dt, *p, s) }?;
                        }
                    }
                }
                Ok(())
            })
        })
    }

    fn nccl_all_reduce(
        &self,
        src: u64,
        dst: u64,
        dtype: DType,
        numel: usize,
        op: ReduceOp,
    ) -> Result<()> {
        check_reduction(dtype, op, self.nccl_version)?;
        let dt = nccl_dtype(dtype)?;
        if numel == 0 {
            return Ok(());
        }
        self.with_nccl("all_reduce", |c, s| {
            // SAFETY: src/dst hold numel elements and outlive the enqueued work (callers hold them).
            unsafe { c.all_reduce(vptr(src), vptr(dst), numel, dt, nccl_op(op), s) }
        })
    }

    fn all_reduce_impl(&self, input: &RocmTensor, op: ReduceOp) -> Result<RocmTensor> {
        self.live("all_reduce")?;
        self.check_tensor(input, "all_reduce")?;
        dist_core::ensure_arg!(
            input.dtype().is_reducible(),
            "{} all_reduce: cannot reduce {}",
            self.name,
            input.dtype()
        );
        let out = self.new_tensor(input.dtype(), input.shape())?;
        self.nccl_all_reduce(input.ptr(), out.ptr(), input.dtype(), input.numel(), op)?;
        Ok(out)
    }
}

impl DeviceCommunicator for Communicator {
    fn synchronize(&self) -> Result<()> {
        Communicator::synchronize(self)
    }
    type Tensor = RocmTensor;

    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }
    fn set_timeout(&self, timeout: Duration) {
        *lock(&self.timeout) = timeout;
    }
    fn device(&self) -> Device {
        Device::new(DeviceKind::Rocm, self.dev.ordinal())
    }
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        RocmTensor::zeros(&self.dev, dtype, shape)
    }

    fn all_reduce(&self, input: &RocmTensor, op: ReduceOp) -> Result<RocmTensor> {
        self.all_reduce_impl(input, op)
    }

    fn all_reduce_in_place(&self, tensor: &mut RocmTensor, op: ReduceOp) -> Result<()> {
        self.live("all_reduce_in_place")?;
        self.check_tensor(tensor, "all_reduce_in_place")?;
        dist_core::ensure_arg!(
            tensor.dtype().is_reducible(),
            "{} all_reduce_in_place: cannot reduce {}",
            self.name,
            tensor.dtype()
        );
        self.nccl_all_reduce(
            tensor.ptr(),
            tensor.ptr(),
            tensor.dtype(),
            tensor.numel(),
            op,
        )
    }

    fn all_gather(&self, input: &RocmTensor, dim: isize) -> Result<RocmTensor> {
        self.live("all_gather")?;
        self.check_tensor(input, "all_gather")?;
        let d = check_collective_dim(input.shape(), dim, "all_gather")?;
        let (outer, len, inner) = split_dims(input.shape(), d);
        let out = self.new_tensor(input.dtype(), &with_dim(input.shape(), d, len * self.world))?;
        let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
        if n == 0 {
            return Ok(out);
        }
        let es = input.dtype().size();
        let tmp = if outer == 1 {
            None
        } else {
            Some(self.new_tensor(input.dtype(), &[self.world * input.numel()])?)
        };
        let target = tmp.as_ref().map_or(out.ptr(), |t| t.ptr());
        self.with_nccl("all_gather", |c, s| {
            // SAFETY: input has n elements, target world*n; both outlive the enqueued work.
            unsafe { c.all_gather(vptr(input.ptr()), vptr(target), n, dt, s) }
        })?;
        if let Some(tmp) = &tmp {
            // SAFETY: tmp and out both hold the full gathered element count.
            unsafe {
                rank_major_to_cat(
                    &self.dev,
                    out.ptr(),
                    tmp.ptr(),
                    outer,
                    inner,
                    &vec![len; self.world],
                    es,
                )?;
            }
        }
        self.retire(tmp)?;
        Ok(out)
    }

    fn all_gatherv(&self, input: &RocmTensor, dim: isize, sizes: &[usize]) -> Result<RocmTensor> {
        self.live("all_gatherv")?;
        self.check_tensor(input, "all_gatherv")?;
        let d = check_collective_dim(input.shape(), dim, "all_gatherv")?;
        dist_core::ensure_arg!(
            sizes.len() == self.world,
            "all_gatherv: {} sizes for world size {}",
            sizes.len(),
            self.world
        );
        dist_core::ensure_arg!(
            sizes[self.rank] == input.shape()[d],
            "all_gatherv: rank {} has {} along dim {d}, sizes say {}",
            self.rank,
            input.shape()[d],
            sizes[self.rank]
        );
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.all_gather(input, dim);
        }
        let (outer, _, inner) = split_dims(input.shape(), d);
        let total: usize = sizes.iter().sum();
        let out = self.new_tensor(input.dtype(), &with_dim(input.shape(), d, total))?;
        let es = input.dtype().size();
        let tmp = if outer == 1 {
            None
        } else {
            Some(self.new_tensor(input.dtype(), &[outer * total * inner])?)
        };
        let target = tmp.as_ref().map_or(out.ptr(), |t| t.ptr());
        let (dt, _) = wire_dtype(input.dtype(), 0)?;
        let me = self.rank;
        self.with_nccl("all_gatherv", |c, s| {
            c.group(|c| {
                let mut off = 0usize;
                for (root, &l) in sizes.iter().enumerate() {
                    let count = outer * l * inner;
                    if count > 0 {
                        let send = if root == me {
                            vptr(input.ptr()) as *const c_void
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
            // SAFETY: tmp and out both hold the full gathered element count.
            unsafe {
                rank_major_to_cat(&self.dev, out.ptr(), tmp.ptr(), outer, inner, sizes, es)?;
            }
        }
        self.retire(tmp)?;
        Ok(out)
    }

    fn reduce_scatter(&self, input: &RocmTensor, dim: isize, op: ReduceOp) -> Result<RocmTensor> {
        self.live("reduce_scatter")?;
        self.check_tensor(input, "reduce_scatter")?;
        let d = check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        let (outer, len, inner) = split_dims(input.shape(), d);
        dist_core::ensure_arg!(
            len % self.world == 0,
            "reduce_scatter: dim {d} of shape {:?} is not divisible by world size {}",
            input.shape(),
            self.world
        );
        check_reduction(input.dtype(), op, self.nccl_version)?;
        let chunk = len / self.world;
        let out = self.new_tensor(input.dtype(), &with_dim(input.shape(), d, chunk))?;
        if input.numel() == 0 {
            return Ok(out);
        }
        let es = input.dtype().size();
        let tmp = if outer == 1 {
            None
        } else {
            let t = self.new_tensor(input.dtype(), &[input.numel()])?;
            // SAFETY: t and input both hold input.numel() elements.
            unsafe {
                cat_to_rank_major(
                    &self.dev,
                    t.ptr(),
                    input.ptr(),
                    outer,
                    inner,
                    &vec![chunk; self.world],
                    es,
                )?;
            }
            Some(t)
        };
        let src = tmp.as_ref().map_or(input.ptr(), |t| t.ptr());
        let dt = nccl_dtype(input.dtype())?;
        self.with_nccl("reduce_scatter", |c, s| {
            // SAFETY: src holds world*count elements, out count; both outlive the work.
            unsafe {
                c.reduce_scatter(
                    vptr(src),
                    vptr(out.ptr()),
                    outer * chunk * inner,
                    dt,
                    nccl_op(op),
                    s,
                )
            }
        })?;
        self.retire(tmp)?;
        Ok(out)
    }

    fn reduce_scatterv(
        &self,
        input: &RocmTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<RocmTensor> {
        self.live("reduce_scatterv")?;
        self.check_tensor(input, "reduce_scatterv")?;
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        let out_shape = reduce_scatterv_shape(input.shape(), d, sizes, self.world, self.rank)?;
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.reduce_scatter(input, dim, op);
        }
        check_reduction(input.dtype(), op, self.nccl_version)?;
        let (outer, _, inner) = split_dims(input.shape(), d);
        let out = self.new_tensor(input.dtype(), &out_shape)?;
        let es = input.dtype().size();
        let tmp = if outer == 1 {
            None
        } else {
            let t = self.new_tensor(input.dtype(), &[input.numel()])?;
            // SAFETY: t and input both hold input.numel() elements.
            unsafe {
                cat_to_rank_major(&self.dev, t.ptr(), input.ptr(), outer, inner, sizes, es)?;
            }
            Some(t)
        };
        let src = tmp.as_ref().map_or(input.ptr(), |t| t.ptr());
        let dt = nccl_dtype(input.dtype())?;
        self.with_nccl("reduce_scatterv", |c, s| {
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
                                vptr(out.ptr()),
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
        self.retire(tmp)?;
        Ok(out)
    }

    fn gather(&self, input: &RocmTensor, dst: usize, dim: isize) -> Result<Option<RocmTensor>> {
        self.live("gather")?;
        self.check_tensor(input, "gather")?;
        dist_core::ensure_arg!(
            dst < self.world,
            "gather: dst {dst} out of range for world size {}",
            self.world
        );
        let d = check_collective_dim(input.shape(), dim, "gather")?;
        let (outer, len, inner) = split_dims(input.shape(), d);
        let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
        let es = input.dtype().size();
        let nbytes = input.nbytes();
        if n == 0 {
            return if self.rank == dst {
                let shape = with_dim(input.shape(), d, len * self.world);
                self.new_tensor(input.dtype(), &shape).map(Some)
            } else {
                Ok(None)
            };
        }
        if self.rank != dst {
            self.with_nccl("gather", |c, s| {
                // SAFETY: input holds n elements and outlives the work.
                unsafe { c.send(vptr(input.ptr()), n, dt, dst, s) }
            })?;
            return Ok(None);
        }
        let out = self.new_tensor(input.dtype(), &with_dim(input.shape(), d, len * self.world))?;
        let tmp = if outer == 1 {
            None
        } else {
            Some(self.new_tensor(input.dtype(), &[self.world * input.numel()])?)
        };
        let target = tmp.as_ref().map_or(out.ptr(), |t| t.ptr());
        // SAFETY: block `dst` of target holds nbytes; input holds nbytes.
        unsafe {
            copy_d2d(
                self.dev.runtime(),
                target + (dst * nbytes) as u64,
                input.ptr(),
                nbytes,
                self.dev.stream(),
            )
        }?;
        if self.world > 1 {
            let world = self.world;
            self.with_nccl("gather", |c, s| {
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
            // SAFETY: tmp and out both hold the full gathered element count.
            unsafe {
                rank_major_to_cat(
                    &self.dev,
                    out.ptr(),
                    tmp.ptr(),
                    outer,
                    inner,
                    &vec![len; self.world],
                    es,
                )?;
            }
        }
        self.retire(tmp)?;
        Ok(Some(out))
    }

    fn broadcast(&self, tensor: &mut RocmTensor, src: usize) -> Result<()> {
        self.live("broadcast")?;
        self.check_tensor(tensor, "broadcast")?;
        dist_core::ensure_arg!(
            src < self.world,
            "broadcast: src {src} out of range for world size {}",
            self.world
        );
        let (dt, n) = wire_dtype(tensor.dtype(), tensor.numel())?;
        if n == 0 {
            return Ok(());
        }
        let me = self.rank;
        self.with_nccl("broadcast", |c, s| {
            let send = if me == src {
                vptr(tensor.ptr()) as *const c_void
            } else {
                std::ptr::null()
            };
            // SAFETY: tensor holds n elements and outlives the work.
            unsafe { c.broadcast(send, vptr(tensor.ptr()), n, dt, src, s) }
        })
    }

    fn send(&self, tensor: &RocmTensor, dst: usize) -> Result<()> {
        self.check_tensor(tensor, "send")?;
        self.batch_send_recv(&mut [P2pOp::Send(tensor, dst)])
    }

    fn recv(&self, tensor: &mut RocmTensor, src: usize) -> Result<()> {
        self.check_tensor(tensor, "recv")?;
        self.batch_send_recv(&mut [P2pOp::Recv(tensor, src)])
    }

    fn begin_capture(&self) -> Result<()> {
        self.live("begin_capture")?;
        self.capture_scope.store(true, Ordering::Release);
        Ok(())
    }

    fn end_capture(&self) -> Result<()> {
        self.live("end_capture")?;
        self.capture_scope.store(false, Ordering::Release);
        Ok(())
    }

    fn destroy(&self) -> Result<()> {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = self.dev.bind();
        let t = self.timeout();
        // Our work first (bounded); every step runs even when an earlier one failed, and the
        // first error is returned.
        let mut first: Option<Error> = self
            .dev
            .wait(&format!("{} destroy", self.name), t, || Ok(()))
            .err();
        // RCCL next (as vLLM: abort, on a helper thread with a deadline): an abort also ends a
        // collective a dead peer left hanging.
        if let Some(mut c) = lock(&self.nccl).take() {
            if let Err(e) = c.abort() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.destroyed.swap(true, Ordering::AcqRel) {
            // No collective barrier in drop (a peer may be gone): free locally, bounded, never panic.
            let _ = self
                .dev
                .wait(&format!("{} drop", self.name), self.timeout(), || Ok(()));
            if let Some(mut c) = lock(&self.nccl).take() {
                if let Err(e) = c.abort() {
                    tracing::warn!(group = %self.name, "dropping communicator: {e}");
                }
            }
        }
    }
}

/// A captured HIP graph of the work enqueued on a device's stream, replayable.
pub struct RocmGraph {
    dev: Arc<DeviceContext>,
    graph: Graph,
}

impl std::fmt::Debug for RocmGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RocmGraph(rocm:{})", self.dev.ordinal())
    }
}

impl RocmGraph {
    /// Captures what `f` enqueues on `dev`'s stream (relaxed capture mode, so allocations in `f`
    /// are allowed) and instantiates it. The stream's capture is ended even when `f` fails.
    pub fn capture<R>(
        dev: &Arc<DeviceContext>,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<(RocmGraph, R)> {
        dev.bind()?;
        let (graph, r) = Graph::capture(dev.stream_handle(), f)?;
        Ok((
            RocmGraph {
                dev: dev.clone(),
                graph,
            },
            r,
        ))
    }

    /// Enqueues one replay on the device's stream.
    pub fn replay(&self) -> Result<()> {
        self.graph.launch(self.dev.stream_handle())
    }
}

/// The ROCm backend: [`RocmTensor`] and [`Communicator`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RocmBackend;

impl dist_core::Backend for RocmBackend {
    const NAME: &'static str = "rocm";
    type Tensor = RocmTensor;
    type Communicator = Communicator;

    fn create_communicator(ctx: &CommunicatorContext) -> Result<Communicator> {
        Communicator::new(ctx, &Options::from_env())
    }
    fn to_host(t: &RocmTensor) -> Result<dist_core::HostTensor> {
        t.to_host()
    }
    fn from_host(t: &dist_core::HostTensor, device: Device) -> Result<RocmTensor> {
        dist_core::ensure_arg!(
            device.kind == DeviceKind::Rocm,
            "the ROCm backend cannot place a tensor on {device}"
        );
        RocmTensor::from_host(t, device.index)
    }
    /// The same storage re-viewed (no copy, as torch's `view`).
    fn reshape(t: RocmTensor, shape: &[usize]) -> Result<RocmTensor> {
        t.reshape(shape)
    }
    /// A device-to-device copy on the device's stream (no trip through the host).
    fn flat_slice(t: &RocmTensor, start: usize, len: usize) -> Result<RocmTensor> {
        dist_core::ensure_arg!(
            start.checked_add(len).is_some_and(|e| e <= t.numel()),
            "flat_slice [{start}, {start}+{len}) out of range for {} elements",
            t.numel()
        );
        let dev = t.context();
        let out = RocmTensor::uninit(dev, t.dtype(), &[len])?;
        let es = t.dtype().size() as u64;
        // SAFETY: [start, start+len) lies inside t (checked above) and out holds len elements;
        // both are ordered on the device's stream, which later uses of `out` follow.
        unsafe {
            copy_d2d(
                dev.runtime(),
                out.ptr(),
                t.ptr() + start as u64 * es,
                len * t.dtype().size(),
                dev.stream(),
            )
        }?;
        Ok(out)
    }
}
