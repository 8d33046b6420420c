//! [`Communicator`]: every `DeviceCommunicator` op over NCCL on device buffers, with vLLM's
//! custom all-reduce in front of NCCL's for eligible tensors.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cudarc::driver::{result as cu, sys};
use dist_core::{
    CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error, HostGroup, ReduceOp,
    Result, Tensor,
};
use dist_nccl::ops::{self, NcclDevice};
use dist_nccl::{Comm, Flavor, UniqueId};

use crate::custom_ar::{policy, CustomAllreduce};
use crate::driver::{copy_2d, copy_d2d, cuda_err, vptr, DeviceContext};
use crate::tensor::CudaTensor;

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
        unsafe { copy_2d(d, dp, s, sp, w, h, dev.stream()) }
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
        unsafe { copy_2d(d, dp, s, sp, w, h, dev.stream()) }
    };
    // SAFETY: forwarded contract.
    unsafe { ops::cat_to_rank_major(copy, dst, src, outer, inner, lens, es) }
}

/// How a communicator is built. [`Options::from_env`] is what [`crate::CudaBackend`] uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Device index; `None`: the context's `local_rank` (vLLM's `cuda:{local_rank}`).
    pub device: Option<usize>,
    /// Create the NCCL communicator (NCCL refuses two ranks on one GPU, so tests of the custom
    /// all-reduce with several processes on one device turn it off).
    pub nccl: bool,
    /// Try the custom all-reduce (it still needs a `"tp"` group of 2/4/6/8 ranks with peer access).
    pub custom_all_reduce: bool,
    /// Custom all-reduce `max_size` override (default: vLLM's rule).
    pub custom_ar_max_size: Option<usize>,
}

impl Options {
    /// Defaults, with `DIST_DISABLE_CUSTOM_ALL_REDUCE` honoured.
    pub fn from_env() -> Options {
        Options {
            device: None,
            nccl: true,
            custom_all_reduce: !policy::env_flag(
                std::env::var(policy::DISABLE_ENV).ok().as_deref(),
            ),
            custom_ar_max_size: None,
        }
    }
}

/// One grouped point-to-point operation of [`Communicator::batch_send_recv_owned`].
pub type P2pOp<'a> = ops::P2pOp<'a, CudaTensor>;

/// The CUDA device communicator of one group.
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
    custom_ar: Mutex<Option<CustomAllreduce>>,
    capture_scope: AtomicBool,
    destroyed: AtomicBool,
    /// Temporaries of ops captured into CUDA graphs: a graph keeps using their addresses on
    /// every replay, so they live as long as the communicator (as torch's graph memory pool).
    graph_keep: Mutex<Vec<CudaTensor>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("group", &self.name)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.dev.ordinal())
            .field("nccl", &self.has_nccl())
            .field("custom_ar", &self.has_custom_ar())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Communicator {
    /// Builds the communicator of `ctx`'s group. Collective over `ctx.host_group`: rank 0 makes
    /// the NCCL unique id and broadcasts its 128 bytes; then NCCL init (bounded by `ctx.timeout`),
    /// a warm-up all-reduce, and the custom all-reduce where the group qualifies.
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
            let lib = dist_nccl::library(Flavor::Nccl)?;
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
            let z = CudaTensor::zeros(&dev, DType::F32, &[1])?;
            // SAFETY: z is a live 1-element f32 device buffer; we synchronise before it drops.
            unsafe {
                comm.all_reduce(
                    vptr(z.ptr()),
                    vptr(z.ptr()),
                    1,
                    dist_nccl::sys::ncclFloat32,
                    dist_nccl::sys::ncclSum,
                    dev.stream() as *mut c_void,
                )
            }?;
            dev.synchronize()?;
            tracing::info!(group = %ctx.group_name, rank, world, nccl = %lib.version(), "NCCL communicator ready");
            Some(comm)
        } else {
            None
        };
        let custom_ar = if opts.custom_all_reduce && world > 1 {
            CustomAllreduce::new(
                &dev,
                host.as_ref(),
                &ctx.group_name,
                opts.custom_ar_max_size,
                ctx.timeout,
            )?
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
            custom_ar: Mutex::new(custom_ar),
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
    /// True when the custom all-reduce is active.
    pub fn has_custom_ar(&self) -> bool {
        lock(&self.custom_ar).is_some()
    }
    /// Runs `f` on the custom all-reduce, if any (tests, forcing the algorithm).
    pub fn with_custom_ar<R>(&self, f: impl FnOnce(&mut CustomAllreduce) -> R) -> Option<R> {
        lock(&self.custom_ar).as_mut().map(f)
    }
    /// The host group.
    pub fn host_group(&self) -> &Arc<dyn HostGroup> {
        &self.host
    }

    /// Waits until the work enqueued so far has run, at most the communicator's timeout; polls
    /// NCCL's asynchronous error and the custom all-reduce's fault words meanwhile (a peer that
    /// never arrived is a `Timeout` naming it). Spins briefly, then sleeps.
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

    fn check_tensor(&self, t: &CudaTensor, op: &str) -> Result<()> {
        let want = Device::new(DeviceKind::Cuda, self.dev.ordinal());
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

    fn all_reduce_impl(&self, input: &CudaTensor, op: ReduceOp) -> Result<CudaTensor> {
        self.live("all_reduce")?;
        self.check_tensor(input, "all_reduce")?;
        dist_core::ensure_arg!(
            input.dtype().is_reducible(),
            "{} all_reduce: cannot reduce {}",
            self.name,
            input.dtype()
        );
        if op == ReduceOp::Sum {
            let mut ca = lock(&self.custom_ar);
            if let Some(ca) = ca.as_mut() {
                if ca.should(input) {
                    return ca.all_reduce(input);
                }
            }
        }
        let out = self.new_tensor(input.dtype(), input.shape())?;
        self.nccl_all_reduce(input.ptr(), out.ptr(), input.dtype(), input.numel(), op)?;
        Ok(out)
    }
}

impl NcclDevice for Communicator {
    type Tensor = CudaTensor;
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
    fn new_tensor(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        CudaTensor::uninit(&self.dev, dtype, shape)
    }
    fn device_ptr(t: &CudaTensor) -> u64 {
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
            Error::unsupported(format!("{} {op}: this communicator has no NCCL", self.name))
        })?;
        f(c, self.dev.stream() as *mut c_void).map_err(|e| match e {
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
    fn retire(&self, tmp: Option<CudaTensor>) -> Result<()> {
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
        unsafe { copy_d2d(dst, src, bytes, self.dev.stream()) }
    }
}

/// Copies `src` into `dst` (same byte count) on the device's stream.
fn copy_into(dev: &DeviceContext, dst: &CudaTensor, src: &CudaTensor) -> Result<()> {
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
    unsafe { copy_d2d(dst.ptr(), src.ptr(), src.nbytes(), dev.stream()) }
}

impl Communicator {
    /// Runs an out-of-place op that makes its result, then moves the result into the caller's
    /// output on the device (the shared NCCL ops allocate their outputs; one device copy).
    fn write_output(
        &self,
        op: &str,
        output: &mut CudaTensor,
        f: impl FnOnce() -> Result<CudaTensor>,
    ) -> Result<()> {
        self.check_tensor(output, op)?;
        let r = f()?;
        dist_core::communicator::check_output(op, &*output, r.dtype(), r.shape())?;
        copy_into(&self.dev, output, &r)?;
        self.retire(Some(r))
    }
}

impl DeviceCommunicator for Communicator {
    type Tensor = CudaTensor;
    type View<'a> = CudaTensor;
    type ViewMut<'a> = &'a mut CudaTensor;

    fn view(t: &CudaTensor) -> CudaTensor {
        t.clone()
    }
    fn view_mut(t: &mut CudaTensor) -> &mut CudaTensor {
        t
    }
    fn copy(src: &CudaTensor, dst: &mut &mut CudaTensor) -> Result<()> {
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
        if let Some(ca) = lock(&self.custom_ar).as_ref() {
            ca.set_timeout(timeout);
        }
    }
    fn device(&self) -> Device {
        Device::new(DeviceKind::Cuda, self.dev.ordinal())
    }
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        CudaTensor::zeros(&self.dev, dtype, shape)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        CudaTensor::uninit(&self.dev, dtype, shape)
    }

    fn all_reduce(&self, input: &CudaTensor, op: ReduceOp) -> Result<CudaTensor> {
        self.all_reduce_impl(input, op)
    }
    fn all_reduce_into(
        &self,
        input: &CudaTensor,
        output: &mut &mut CudaTensor,
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
        if op == ReduceOp::Sum {
            let mut ca = lock(&self.custom_ar);
            if let Some(ca) = ca.as_mut() {
                if ca.should(input) {
                    let r = ca.all_reduce(input)?;
                    copy_into(&self.dev, output, &r)?;
                    return self.retire(Some(r));
                }
            }
        }
        self.nccl_all_reduce(input.ptr(), output.ptr(), input.dtype(), input.numel(), op)
    }

    fn all_reduce_in_place(&self, tensor: &mut &mut CudaTensor, op: ReduceOp) -> Result<()> {
        self.live("all_reduce_in_place")?;
        self.check_tensor(tensor, "all_reduce_in_place")?;
        dist_core::communicator::ensure_reducible(tensor.dtype(), "all_reduce")?;
        let use_ca = op == ReduceOp::Sum
            && lock(&self.custom_ar)
                .as_ref()
                .is_some_and(|c| c.should(tensor));
        if use_ca {
            let out = self.all_reduce_impl(tensor, op)?;
            copy_into(&self.dev, tensor, &out)?;
            return self.retire(Some(out));
        }
        self.nccl_all_reduce(
            tensor.ptr(),
            tensor.ptr(),
            tensor.dtype(),
            tensor.numel(),
            op,
        )
    }

    fn all_gather(&self, input: &CudaTensor, dim: isize) -> Result<CudaTensor> {
        self.live("all_gather")?;
        self.check_tensor(input, "all_gather")?;
        ops::all_gather(self, input, dim)
    }
    fn all_gather_into(
        &self,
        input: &CudaTensor,
        output: &mut &mut CudaTensor,
        dim: isize,
    ) -> Result<()> {
        self.write_output("all_gather", output, || self.all_gather(input, dim))
    }
    fn all_gatherv(&self, input: &CudaTensor, dim: isize, sizes: &[usize]) -> Result<CudaTensor> {
        self.live("all_gatherv")?;
        self.check_tensor(input, "all_gatherv")?;
        ops::all_gatherv(self, input, dim, sizes)
    }
    fn all_gatherv_into(
        &self,
        input: &CudaTensor,
        output: &mut &mut CudaTensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.write_output("all_gatherv", output, || {
            self.all_gatherv(input, dim, sizes)
        })
    }
    fn reduce_scatter(&self, input: &CudaTensor, dim: isize, op: ReduceOp) -> Result<CudaTensor> {
        self.live("reduce_scatter")?;
        self.check_tensor(input, "reduce_scatter")?;
        ops::reduce_scatter(self, input, dim, op)
    }
    fn reduce_scatter_into(
        &self,
        input: &CudaTensor,
        output: &mut &mut CudaTensor,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        self.write_output("reduce_scatter", output, || {
            self.reduce_scatter(input, dim, op)
        })
    }
    fn reduce_scatterv(
        &self,
        input: &CudaTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<CudaTensor> {
        self.live("reduce_scatterv")?;
        self.check_tensor(input, "reduce_scatterv")?;
        ops::reduce_scatterv(self, input, dim, sizes, op)
    }
    fn reduce_scatterv_into(
        &self,
        input: &CudaTensor,
        output: &mut &mut CudaTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.write_output("reduce_scatterv", output, || {
            self.reduce_scatterv(input, dim, sizes, op)
        })
    }
    fn gather(&self, input: &CudaTensor, dst: usize, dim: isize) -> Result<Option<CudaTensor>> {
        self.live("gather")?;
        self.check_tensor(input, "gather")?;
        ops::gather(self, input, dst, dim)
    }
    fn gather_into(
        &self,
        input: &CudaTensor,
        output: Option<&mut &mut CudaTensor>,
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
    fn broadcast(&self, tensor: &mut &mut CudaTensor, src: usize) -> Result<()> {
        self.live("broadcast")?;
        self.check_tensor(tensor, "broadcast")?;
        ops::broadcast(self, tensor, src)
    }
    fn send(&self, tensor: &CudaTensor, dst: usize) -> Result<()> {
        self.check_tensor(tensor, "send")?;
        self.batch_send_recv_owned(&mut [ops::P2pOp::Send(tensor, dst)])
    }
    fn recv(&self, tensor: &mut &mut CudaTensor, src: usize) -> Result<()> {
        self.check_tensor(tensor, "recv")?;
        self.batch_send_recv_owned(&mut [ops::P2pOp::Recv(tensor, src)])
    }
    fn batch_send_recv(
        &self,
        p2p: &mut [dist_core::communicator::P2pOp<'_, CudaTensor, &mut CudaTensor>],
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
        input: &CudaTensor,
        send_counts: &[usize],
        output: &mut &mut CudaTensor,
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
        let cut = |t: &CudaTensor, counts: &[usize]| -> Result<Vec<CudaTensor>> {
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
        let mut g = lock(&self.custom_ar);
        if let Some(ca) = g.as_mut() {
            let n = ca.register_graph_buffers(self.host.as_ref())?;
            tracing::debug!(group = %self.name, "registered {n} graph buffers");
        }
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
        // NCCL next (as vLLM: abort, on a helper thread with a deadline): an abort also ends a
        // collective a dead peer left hanging.
        if let Some(mut c) = lock(&self.nccl).take() {
            if let Err(e) = c.abort() {
                first.get_or_insert(e);
            }
        }
        if let Some(ca) = lock(&self.custom_ar).take() {
            // Peers may still read our buffers: free them only once every rank is here.
            if let Err(e) = self.host.barrier() {
                first.get_or_insert(e);
            }
            drop(ca);
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
            drop(lock(&self.custom_ar).take());
        }
    }
}

/// A captured CUDA graph of the work enqueued on a device's stream, replayable.
pub struct CudaGraph {
    dev: Arc<DeviceContext>,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// SAFETY: graph handles may be used from any thread with the context current (we bind first).
unsafe impl Send for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraph(cuda:{})", self.dev.ordinal())
    }
}

impl CudaGraph {
    /// Captures what `f` enqueues on `dev`'s stream (relaxed capture mode, so allocations in `f`
    /// are allowed) and instantiates it. The stream's capture is ended even when `f` fails.
    pub fn capture<R>(
        dev: &Arc<DeviceContext>,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<(CudaGraph, R)> {
        dev.bind()?;
        // SAFETY: the stream is alive; relaxed mode.
        unsafe {
            cu::stream::begin_capture(
                dev.stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .map_err(|e| cuda_err("cuStreamBeginCapture", e))?;
        let r = f();
        // SAFETY: ends the capture begun above.
        let g = unsafe { cu::stream::end_capture(dev.stream()) };
        let r = r?;
        let graph = g.map_err(|e| cuda_err("cuStreamEndCapture", e))?;
        // SAFETY: graph is a valid captured graph.
        let exec = match unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
        {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: graph is ours and not instantiated.
                let _ = unsafe { cu::graph::destroy(graph) };
                return Err(cuda_err("cuGraphInstantiate", e));
            }
        };
        Ok((
            CudaGraph {
                dev: dev.clone(),
                graph,
                exec,
            },
            r,
        ))
    }

    /// Enqueues one replay on the device's stream.
    pub fn replay(&self) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: exec is a live instantiated graph; the stream is alive.
        unsafe { cu::graph::launch(self.exec, self.dev.stream()) }
            .map_err(|e| cuda_err("cuGraphLaunch", e))
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: handles are ours and destroyed once.
            unsafe {
                let _ = cu::graph::exec_destroy(self.exec);
                let _ = cu::graph::destroy(self.graph);
            }
        }
    }
}

/// The CUDA backend: [`CudaTensor`] and [`Communicator`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaBackend;

impl dist_core::Backend for CudaBackend {
    const NAME: &'static str = "cuda";
    type Tensor = CudaTensor;
    type Communicator = Communicator;

    fn create_communicator(ctx: &CommunicatorContext) -> Result<Communicator> {
        Communicator::new(ctx, &Options::from_env())
    }
    fn to_host(t: &CudaTensor) -> Result<dist_core::HostTensor> {
        t.to_host()
    }
    fn from_host(t: &dist_core::HostTensor, device: Device) -> Result<CudaTensor> {
        dist_core::ensure_arg!(
            device.kind == DeviceKind::Cuda,
            "the CUDA backend cannot place a tensor on {device}"
        );
        CudaTensor::from_host(t, device.index)
    }
}
