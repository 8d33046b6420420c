//! [`Communicator`]: every `DeviceCommunicator` op over RCCL (through the NCCL-ABI layer
//! `dist-nccl`) on HIP device buffers. vLLM's custom all-reduce and quick all-reduce for ROCm
//! are not built yet: every all-reduce goes to RCCL.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::{
    CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error, HostGroup, ReduceOp,
    Result, Tensor,
};
use dist_nccl::ops::{self, NcclDevice};
use dist_nccl::{Comm, Flavor, UniqueId};

use crate::driver::{copy_2d, copy_d2d, vptr, DeviceContext};
use crate::hip::safe::Graph;
use crate::tensor::RocmTensor;

/// [`dist_nccl::ops::rank_major_to_cat`] on `dev`'s stream.
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
    let copy = |d: u64, dp: usize, s: u64, sp: usize, w: usize, h: usize| {
        // SAFETY: forwarded contract: both buffers are live on `dev`.
        unsafe { copy_2d(dev.runtime(), d, dp, s, sp, w, h, dev.stream()) }
    };
    // SAFETY: forwarded contract.
    unsafe { ops::rank_major_to_cat(copy, dst, src, outer, inner, lens, es) }
}

/// [`dist_nccl::ops::cat_to_rank_major`] on `dev`'s stream.
///
/// # Safety
/// `src` and `dst` are live device buffers of `outer * sum(lens) * inner * es` bytes on `dev`.
pub unsafe fn cat_to_rank_major(
    dev: &DeviceContext,
    dst: u64,
    src: u64,
    outer: usize,
    inner: usize,
    lens: &[usize],
    es: usize,
) -> Result<()> {
    let copy = |d: u64, dp: usize, s: u64, sp: usize, w: usize, h: usize| {
        // SAFETY: forwarded contract: both buffers are live on `dev`.
        unsafe { copy_2d(dev.runtime(), d, dp, s, sp, w, h, dev.stream()) }
    };
    // SAFETY: forwarded contract.
    unsafe { ops::cat_to_rank_major(copy, dst, src, outer, inner, lens, es) }
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

/// One grouped point-to-point operation of [`Communicator::batch_send_recv_owned`].
pub type P2pOp<'a> = ops::P2pOp<'a, RocmTensor>;

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

    /// Grouped sends and receives (vLLM's `batch_isend_irecv`), in one group; fp8 travels as bytes.
    pub fn batch_send_recv_owned(&self, p2p: &mut [P2pOp<'_>]) -> Result<()> {
        for o in p2p.iter() {
            let t = match o {
                ops::P2pOp::Send(t, _) => &**t,
                ops::P2pOp::Recv(t, _) => &**t,
            };
            self.check_tensor(t, "batch_send_recv")?;
        }
        ops::batch_send_recv(self, p2p)
    }

    fn nccl_all_reduce(
        &self,
        src: u64,
        dst: u64,
        dtype: DType,
        numel: usize,
        op: ReduceOp,
    ) -> Result<()> {
        ops::all_reduce_ptrs(self, src, dst, dtype, numel, op)
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

impl NcclDevice for Communicator {
    type Tensor = RocmTensor;
    fn group_name(&self) -> &str {
        &self.name
    }
    fn group_rank(&self) -> usize {
        self.rank
    }
    fn group_size(&self) -> usize {
        self.world
    }
    fn nccl_version_code(&self) -> i32 {
        self.nccl_version
    }
    fn new_tensor(&self, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        RocmTensor::uninit(&self.dev, dtype, shape)
    }
    fn device_ptr(t: &RocmTensor) -> u64 {
        t.ptr()
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
    unsafe fn copy_2d(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe {
            copy_2d(
                self.dev.runtime(),
                dst,
                dst_pitch,
                src,
                src_pitch,
                width,
                height,
                self.dev.stream(),
            )
        }
    }
    unsafe fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { copy_d2d(self.dev.runtime(), dst, src, bytes, self.dev.stream()) }
    }
}

/// Copies `src` into `dst` (same byte count) on the device's stream.
fn copy_into(dev: &DeviceContext, dst: &RocmTensor, src: &RocmTensor) -> Result<()> {
    dist_core::ensure_arg!(
        src.dtype() == dst.dtype() && src.numel() == dst.numel(),
        "copy of {} {:?} into {} {:?}",
        src.dtype(),
        src.shape(),
        dst.dtype(),
        dst.shape()
    );
    if src.nbytes() == 0 {
        return Ok(());
    }
    // SAFETY: both tensors are live device buffers of nbytes on this device; the copy is ordered
    // on the device's stream, which every later use of either follows.
    unsafe {
        copy_d2d(
            dev.runtime(),
            dst.ptr(),
            src.ptr(),
            src.nbytes(),
            dev.stream(),
        )
    }
}

impl Communicator {
    /// Runs an out-of-place op that makes its result, then moves the result into the caller's
    /// output on the device (the shared NCCL ops allocate their outputs; one device copy).
    fn write_output(
        &self,
        op: &str,
        output: &mut RocmTensor,
        f: impl FnOnce() -> Result<RocmTensor>,
    ) -> Result<()> {
        self.check_tensor(output, op)?;
        let r = f()?;
        dist_core::communicator::check_output(op, &*output, r.dtype(), r.shape())?;
        copy_into(&self.dev, output, &r)?;
        self.retire(Some(r))
    }
}

impl DeviceCommunicator for Communicator {
    type Tensor = RocmTensor;
    type View<'a> = RocmTensor;
    type ViewMut<'a> = &'a mut RocmTensor;

    fn view(t: &RocmTensor) -> RocmTensor {
        t.clone()
    }
    fn view_mut(t: &mut RocmTensor) -> &mut RocmTensor {
        t
    }
    fn copy(src: &RocmTensor, dst: &mut &mut RocmTensor) -> Result<()> {
        let dev = src.context().clone();
        dev.bind()?;
        copy_into(&dev, dst, src)
    }
    fn narrow<'a>(v: &Self::View<'a>, start: usize, len: usize) -> Result<Self::View<'a>> {
        v.narrow(start, len)
    }
    fn synchronize(&self) -> Result<()> {
        Communicator::synchronize(self)
    }
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
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<RocmTensor> {
        RocmTensor::uninit(&self.dev, dtype, shape)
    }

    fn all_reduce(&self, input: &RocmTensor, op: ReduceOp) -> Result<RocmTensor> {
        self.all_reduce_impl(input, op)
    }
    fn all_reduce_into(
        &self,
        input: &RocmTensor,
        output: &mut &mut RocmTensor,
        op: ReduceOp,
    ) -> Result<()> {
        self.live("all_reduce")?;
        self.check_tensor(input, "all_reduce")?;
        self.check_tensor(output, "all_reduce")?;
        dist_core::communicator::ensure_reducible(input.dtype(), "all_reduce")?;
        dist_core::communicator::check_output(
            "all_reduce",
            &**output,
            input.dtype(),
            input.shape(),
        )?;
        self.nccl_all_reduce(input.ptr(), output.ptr(), input.dtype(), input.numel(), op)
    }

    fn all_reduce_in_place(&self, tensor: &mut &mut RocmTensor, op: ReduceOp) -> Result<()> {
        self.live("all_reduce_in_place")?;
        self.check_tensor(tensor, "all_reduce_in_place")?;
        dist_core::communicator::ensure_reducible(tensor.dtype(), "all_reduce")?;
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
        ops::all_gather(self, input, dim)
    }
    fn all_gather_into(
        &self,
        input: &RocmTensor,
        output: &mut &mut RocmTensor,
        dim: isize,
    ) -> Result<()> {
        self.write_output("all_gather", output, || self.all_gather(input, dim))
    }
    fn all_gatherv(&self, input: &RocmTensor, dim: isize, sizes: &[usize]) -> Result<RocmTensor> {
        self.live("all_gatherv")?;
        self.check_tensor(input, "all_gatherv")?;
        ops::all_gatherv(self, input, dim, sizes)
    }
    fn all_gatherv_into(
        &self,
        input: &RocmTensor,
        output: &mut &mut RocmTensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.write_output("all_gatherv", output, || {
            self.all_gatherv(input, dim, sizes)
        })
    }
    fn reduce_scatter(&self, input: &RocmTensor, dim: isize, op: ReduceOp) -> Result<RocmTensor> {
        self.live("reduce_scatter")?;
        self.check_tensor(input, "reduce_scatter")?;
        ops::reduce_scatter(self, input, dim, op)
    }
    fn reduce_scatter_into(
        &self,
        input: &RocmTensor,
        output: &mut &mut RocmTensor,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        self.write_output("reduce_scatter", output, || {
            self.reduce_scatter(input, dim, op)
        })
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
        ops::reduce_scatterv(self, input, dim, sizes, op)
    }
    fn reduce_scatterv_into(
        &self,
        input: &RocmTensor,
        output: &mut &mut RocmTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.write_output("reduce_scatterv", output, || {
            self.reduce_scatterv(input, dim, sizes, op)
        })
    }
    fn gather(&self, input: &RocmTensor, dst: usize, dim: isize) -> Result<Option<RocmTensor>> {
        self.live("gather")?;
        self.check_tensor(input, "gather")?;
        ops::gather(self, input, dst, dim)
    }
    fn gather_into(
        &self,
        input: &RocmTensor,
        output: Option<&mut &mut RocmTensor>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        dist_core::ensure_arg!(
            output.is_some() == (self.rank == dst),
            "{} gather to {dst}: only the destination passes an output",
            self.name
        );
        match output {
            Some(o) => self.write_output("gather", o, || {
                self.gather(input, dst, dim)?
                    .ok_or_else(|| Error::invalid("gather: the destination got no result"))
            }),
            None => self.gather(input, dst, dim).map(|_| ()),
        }
    }
    fn broadcast(&self, tensor: &mut &mut RocmTensor, src: usize) -> Result<()> {
        self.live("broadcast")?;
        self.check_tensor(tensor, "broadcast")?;
        ops::broadcast(self, tensor, src)
    }
    fn send(&self, tensor: &RocmTensor, dst: usize) -> Result<()> {
        self.check_tensor(tensor, "send")?;
        self.batch_send_recv_owned(&mut [ops::P2pOp::Send(tensor, dst)])
    }
    fn recv(&self, tensor: &mut &mut RocmTensor, src: usize) -> Result<()> {
        self.check_tensor(tensor, "recv")?;
        self.batch_send_recv_owned(&mut [ops::P2pOp::Recv(tensor, src)])
    }
    fn batch_send_recv(
        &self,
        p2p: &mut [dist_core::communicator::P2pOp<'_, RocmTensor, &mut RocmTensor>],
    ) -> Result<()> {
        let mut list: Vec<P2pOp<'_>> = p2p
            .iter_mut()
            .map(|o| match o {
                dist_core::communicator::P2pOp::Send(t, p) => ops::P2pOp::Send(&**t, *p),
                dist_core::communicator::P2pOp::Recv(t, p) => ops::P2pOp::Recv(&mut ***t, *p),
            })
            .collect();
        self.batch_send_recv_owned(&mut list)
    }
    /// Grouped sends and receives of each peer's rows (narrowed views of the input and output,
    /// no copies), the own rows by a device copy.
    fn all_to_all_v_into(
        &self,
        input: &RocmTensor,
        send_counts: &[usize],
        output: &mut &mut RocmTensor,
        recv_counts: &[usize],
    ) -> Result<()> {
        self.live("all_to_all_v")?;
        self.check_tensor(input, "all_to_all_v")?;
        self.check_tensor(output, "all_to_all_v")?;
        let row = dist_core::communicator::check_all_to_all_v(
            input,
            send_counts,
            &**output,
            recv_counts,
            self.world,
        )?;
        let es = input.dtype().size();
        let per = row / es.max(1);
        let cut = |t: &RocmTensor, counts: &[usize]| -> Result<Vec<RocmTensor>> {
            let mut off = 0;
            counts
                .iter()
                .map(|&c| {
                    let v = t.narrow(off * per, c * per);
                    off += c;
                    v
                })
                .collect()
        };
        let ins = cut(input, send_counts)?;
        let mut outs = cut(output, recv_counts)?;
        let me = self.rank;
        copy_into(&self.dev, &outs[me], &ins[me])?;
        let mut list: Vec<P2pOp<'_>> = Vec::new();
        for (p, t) in ins.iter().enumerate() {
            if p != me && t.numel() > 0 {
                list.push(ops::P2pOp::Send(t, p));
            }
        }
        for (p, t) in outs.iter_mut().enumerate() {
            if p != me && t.numel() > 0 {
                list.push(ops::P2pOp::Recv(t, p));
            }
        }
        self.batch_send_recv_owned(&mut list)
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
