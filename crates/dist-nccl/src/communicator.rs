//! [`NcclCommunicator`]: every `DeviceCommunicator` op over the NCCL ABI, on any
//! [`GpuRuntime`], written once — bootstrap, per-op checks, the collectives and their device
//! re-layouts, grouped point-to-point, the fast all-reduce in front of NCCL's, destroy and drop.
//!
//! ## Streams
//! Every op is enqueued on the communicator's stream: the runtime's own stream unless an
//! engine gave its own ([`NcclCommunicator::set_stream`]). A view ordered on another stream is
//! fenced both ways with events (the communicator's stream waits for the view's stream before
//! the op, the view's stream waits for the op after it), so the memory is used in its owner's
//! order and the communicator's calls run on the device in call order, as NCCL requires; when
//! every view is on the communicator's stream there is no event at all. No call waits on the
//! host for the device; [`NcclCommunicator::synchronize`] does, with the deadline.
//!
//! Temporaries (the re-layout buffers of `all_gather(dim)` and `reduce_scatter(dim)` when the
//! dims before `dim` are not all 1) come from the runtime's allocation cache; on another stream
//! than the runtime's own they are parked there until an event says the op has run, and while
//! the stream is capturing a graph they are kept for as long as the communicator lives (the
//! graph reuses their addresses on every replay).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::communicator::{
    all_gather_shape, all_gatherv_shape, check_all_to_all_v, check_collective_dim, check_output,
    ensure_reducible, reduce_scatter_shape, reduce_scatterv_shape, P2pOp,
};
use dist_core::tensor::split_dims;
use dist_core::{
    CommunicatorContext, DType, Device, DeviceCommunicator, Error, HostGroup, ReduceOp, Result,
    Tensor,
};

use crate::layout::Parts;
use crate::memory::{DeviceBuffer, GpuTensor};
use crate::runtime::{
    annotate, wait_stream, CommOptions, FastAllReduce, GpuRuntime, RawStream, Strided,
};
use crate::view::{GpuView, GpuViewMut, Keep};
use crate::{check_reduction, nccl_dtype, nccl_op, sys, wire_dtype, Comm, UniqueId};

/// How a communicator is built, for runtimes with nothing more to decide.
#[derive(Debug, Clone)]
pub struct Options {
    /// Device index; `None`: the context's `local_rank` (vLLM's `cuda:{local_rank}`).
    pub device: Option<usize>,
    /// Create the NCCL/RCCL communicator (off: only memory and copies work; every collective
    /// is then [`Error::Unsupported`]).
    pub nccl: bool,
}

impl CommOptions for Options {
    fn common(&self) -> Options {
        self.clone()
    }
    fn from_env() -> Self {
        Options {
            device: None,
            nccl: true,
        }
    }
}

/// What the communicator's lock guards: everything an op touches.
struct State<R: GpuRuntime> {
    nccl: Option<Comm>,
    fast: Option<R::FastPath>,
    /// The stream ops are enqueued on, and what keeps it alive when it is an engine's.
    stream: RawStream,
    stream_keep: Option<Keep<'static>>,
    /// Orders one stream after another (recorded and waited for in sequence: a wait uses the
    /// record made just before it).
    event: Option<R::Event>,
    /// Temporaries of ops captured into graphs.
    graph_keep: Vec<DeviceBuffer<R>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn vptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

/// The device communicator of one group on runtime `R`; see the module docs.
pub struct NcclCommunicator<R: GpuRuntime> {
    name: String,
    rank: usize,
    world: usize,
    dev: Arc<R>,
    host: Arc<dyn HostGroup>,
    timeout: Mutex<Duration>,
    version: i32,
    destroyed: AtomicBool,
    state: Mutex<State<R>>,
}

impl<R: GpuRuntime> std::fmt::Debug for NcclCommunicator<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("NcclCommunicator")
            .field("group", &self.name)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field(
                "device",
                &format_args!("{}:{}", R::NAME, self.dev.ordinal()),
            )
            .field("nccl", &st.nccl.is_some())
            .field("fast_all_reduce", &st.fast.is_some())
            .field("stream", &st.stream)
            .finish()
    }
}

impl<R: GpuRuntime> NcclCommunicator<R> {
    /// Builds the communicator of `ctx`'s group. The device comes first (no device: the
    /// runtime's error, before NCCL is looked for); then, collective over `ctx.host_group`:
    /// rank 0 makes the NCCL unique id and broadcasts its 128 bytes; NCCL init (bounded by
    /// `ctx.timeout`) on a helper thread with the device current; a warm-up all-reduce; and the
    /// runtime's fast all-reduce where the group qualifies.
    pub fn new(ctx: &CommunicatorContext, opts: &R::Options) -> Result<Self> {
        let host = ctx.host_group.clone();
        let (world, rank) = (host.world_size(), host.rank());
        dist_core::ensure_arg!(
            world == ctx.ranks.len() && rank == ctx.rank_in_group,
            "group {}: host group is rank {rank} of {world}, context says {} of {}",
            ctx.group_name,
            ctx.rank_in_group,
            ctx.ranks.len()
        );
        let common = opts.common();
        let dev = R::device(common.device.unwrap_or(ctx.local_rank))?;
        let (nccl, version) = if common.nccl {
            let (c, v) = init_nccl(&dev, ctx, world, rank)?;
            (Some(c), v)
        } else {
            (None, 0)
        };
        let fast = if world > 1 {
            R::fast_path(&dev, ctx, opts)?
        } else {
            None
        };
        Ok(NcclCommunicator {
            name: ctx.group_name.clone(),
            rank,
            world,
            host,
            timeout: Mutex::new(ctx.timeout),
            version,
            destroyed: AtomicBool::new(false),
            state: Mutex::new(State {
                nccl,
                fast,
                stream: dev.stream(),
                stream_keep: None,
                event: None,
                graph_keep: Vec::new(),
            }),
            dev,
        })
    }

    /// The device context.
    pub fn context(&self) -> &Arc<R> {
        &self.dev
    }
    /// The group's name.
    pub fn group_name(&self) -> &str {
        &self.name
    }
    /// The host group.
    pub fn host_group(&self) -> &Arc<dyn HostGroup> {
        &self.host
    }
    /// True when an NCCL communicator exists.
    pub fn has_nccl(&self) -> bool {
        lock(&self.state).nccl.is_some()
    }
    /// True when the runtime's fast all-reduce (vLLM's custom all-reduce on CUDA) is active.
    pub fn has_custom_ar(&self) -> bool {
        lock(&self.state).fast.is_some()
    }
    /// Runs `f` on the fast all-reduce, if any (tests, forcing the algorithm).
    pub fn with_custom_ar<T>(&self, f: impl FnOnce(&mut R::FastPath) -> T) -> Option<T> {
        lock(&self.state).fast.as_mut().map(f)
    }
    /// The stream ops are enqueued on.
    pub fn stream(&self) -> RawStream {
        lock(&self.state).stream
    }

    /// Enqueues later ops on `stream` (an engine's), ordered after everything enqueued so far;
    /// `keep` holds the stream alive for as long as the communicator uses it.
    ///
    /// # Safety
    /// `stream` is a stream of this communicator's device and context, alive while `keep` is.
    pub unsafe fn set_stream(&self, stream: RawStream, keep: Keep<'static>) -> Result<()> {
        self.live("set_stream")?;
        let mut st = lock(&self.state);
        let old = st.stream;
        // SAFETY: the old stream is alive (held by the old keep, or the runtime's own); the new
        // one by the caller's contract; bound by `live`.
        unsafe { self.fence(&mut st, old, stream) }?;
        st.stream = stream;
        let previous = st.stream_keep.replace(keep);
        drop(st);
        drop(previous);
        Ok(())
    }
    /// Goes back to the runtime's own stream (ordered after what was enqueued so far).
    pub fn reset_stream(&self) -> Result<()> {
        self.live("reset_stream")?;
        let mut st = lock(&self.state);
        let (old, own) = (st.stream, self.dev.stream());
        // SAFETY: both streams are alive (the old one held by its keep until dropped below).
        unsafe { self.fence(&mut st, old, own) }?;
        st.stream = own;
        let previous = st.stream_keep.take();
        drop(st);
        drop(previous);
        Ok(())
    }

    /// Waits until the work enqueued so far has run, at most the communicator's timeout; polls
    /// NCCL's asynchronous error and the runtime's device faults meanwhile (a peer that never
    /// arrived is a `Timeout` naming it). Spins briefly, then sleeps.
    pub fn synchronize(&self) -> Result<()> {
        let (s, keep) = {
            let st = lock(&self.state);
            (st.stream, st.stream_keep.clone())
        };
        let r = self.wait_on(s, "synchronize");
        drop(keep);
        r
    }
    /// [`NcclCommunicator::synchronize`] for the stream `view` is ordered on (an engine's).
    pub fn synchronize_view(&self, view: &GpuView<'_, R>) -> Result<()> {
        self.wait_on(view.stream(), "synchronize")
    }
    fn wait_on(&self, s: RawStream, op: &str) -> Result<()> {
        self.dev.bind()?;
        let st = &self.state;
        // SAFETY: `s` is alive (the caller holds its keep or its view); bound above.
        unsafe {
            wait_stream(
                &*self.dev,
                s,
                &format!("{} {op}", self.name),
                self.timeout(),
                || match lock(st).nccl.as_ref() {
                    Some(c) => c.check_async_error(),
                    None => Ok(()),
                },
            )
        }
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

    fn check(&self, t: &impl Tensor, op: &str) -> Result<()> {
        let want = Device::new(R::KIND, self.dev.ordinal());
        dist_core::ensure_arg!(
            t.device() == want,
            "{} {op}: tensor on {}, communicator on {want}",
            self.name,
            t.device()
        );
        Ok(())
    }

    /// Orders later work on `to` after the work enqueued on `from` so far.
    ///
    /// # Safety
    /// Both are live streams of the device; the context is current.
    unsafe fn fence(&self, st: &mut State<R>, from: RawStream, to: RawStream) -> Result<()> {
        if from == to {
            return Ok(());
        }
        if st.event.is_none() {
            st.event = Some(self.dev.new_event(false)?);
        }
        let ev = st.event.as_ref().expect("made above");
        // SAFETY: forwarded contract.
        unsafe {
            self.dev.record(ev, from)?;
            self.dev.wait_event(to, ev)
        }
    }

    /// Runs `f` on the communicator's stream with the state locked and the context bound, the
    /// streams of the op's views fenced around it; errors name the group and the op.
    fn run(
        &self,
        op: &str,
        views: &[RawStream],
        f: impl FnOnce(&mut State<R>, RawStream) -> Result<()>,
    ) -> Result<()> {
        self.live(op)?;
        let mut st = lock(&self.state);
        let s = st.stream;
        // The views' streams other than the communicator's, each once.
        let foreign = |i: usize| views[i] != s && !views[..i].contains(&views[i]);
        for i in (0..views.len()).filter(|i| foreign(*i)) {
            // SAFETY: the views borrow their streams for the whole call; the communicator's
            // stream is alive (its keep is in `st`); bound by `live`.
            unsafe { self.fence(&mut st, views[i], s) }?;
        }
        let r = f(&mut st, s);
        let mut after = Ok(());
        for i in (0..views.len()).filter(|i| foreign(*i)) {
            if after.is_ok() {
                // SAFETY: as above.
                after = unsafe { self.fence(&mut st, s, views[i]) };
            }
        }
        r.and(after)
            .map_err(|e| annotate(e, &format!("{} {op}", self.name)))
    }

    /// A temporary of `bytes` for an op on `s` (context current).
    fn temp(&self, bytes: usize) -> Result<DeviceBuffer<R>> {
        // SAFETY: only called inside `run`, which bound the context.
        unsafe { DeviceBuffer::alloc_bound(&self.dev, bytes) }
    }

    /// Releases an op's temporary: kept while `s` captures a graph, parked until the op has run
    /// when `s` is not the runtime's own stream, else back to the cache.
    fn retire(&self, st: &mut State<R>, tmp: DeviceBuffer<R>, s: RawStream) -> Result<()> {
        // SAFETY: `s` is the communicator's live stream; bound inside `run`.
        if unsafe { self.dev.is_capturing(s) }? {
            st.graph_keep.push(tmp);
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { self.dev.pool().defer(tmp, s) }
    }

    fn nccl<'s>(&self, st: &'s mut State<R>, op: &str) -> Result<&'s mut Comm> {
        st.nccl.as_mut().ok_or_else(|| {
            Error::unsupported(format!(
                "{} {op}: this communicator has no {}",
                self.name,
                R::FLAVOR.library().trim_start_matches("lib").to_uppercase()
            ))
        })
    }

    /// Runs `f` on the buffer an op's NCCL step fills in rank-major order — the output itself
    /// when the dims before the op's dim are all 1, else a temporary then re-laid out into the
    /// output (`cat` along the dim) and retired.
    fn with_rank_major_output(
        &self,
        st: &mut State<R>,
        s: RawStream,
        p: &Parts<'_>,
        out: u64,
        f: impl FnOnce(&mut State<R>, u64) -> Result<()>,
    ) -> Result<()> {
        if p.outer == 1 {
            return f(st, out);
        }
        let tmp = self.temp(p.bytes())?;
        f(st, tmp.ptr())?;
        // SAFETY: tmp and the output hold p.bytes(); copies on `s`.
        unsafe { p.relayout(self.copy_2d(s), true, out, tmp.ptr()) }?;
        self.retire(st, tmp, s)
    }

    /// Runs `f` on `input` in rank-major order: the input itself when the dims before the op's
    /// dim are all 1, else a temporary it is re-laid out into first.
    fn with_rank_major_input(
        &self,
        st: &mut State<R>,
        s: RawStream,
        p: &Parts<'_>,
        input: u64,
        f: impl FnOnce(&mut State<R>, u64) -> Result<()>,
    ) -> Result<()> {
        if p.outer == 1 {
            return f(st, input);
        }
        let tmp = self.temp(p.bytes())?;
        // SAFETY: the input and tmp hold p.bytes(); copies on `s`.
        unsafe { p.relayout(self.copy_2d(s), false, tmp.ptr(), input) }?;
        f(st, tmp.ptr())?;
        self.retire(st, tmp, s)
    }

    /// A strided device copy on `s` (context current): contiguous ones as one plain copy.
    fn copy_2d(&self, s: RawStream) -> impl FnMut(Strided) -> Result<()> + '_ {
        move |c| {
            // SAFETY: the re-layouts address only the two buffers of their op, live on `s`.
            unsafe {
                match (c.width * c.height, c.is_contiguous()) {
                    (0, _) => Ok(()),
                    (n, true) => self.dev.copy_d2d(c.dst, c.src, n, s),
                    (_, false) => self.dev.copy_2d(&c, s),
                }
            }
        }
    }

    /// Sum (or another reduction) of `numel` elements at `src` into `dst` (`src == dst`: in
    /// place): the fast path where it accepts, else NCCL.
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_raw(
        &self,
        st: &mut State<R>,
        s: RawStream,
        src: u64,
        dst: u64,
        dtype: DType,
        numel: usize,
        op: ReduceOp,
    ) -> Result<()> {
        if st.nccl.is_some() {
            check_reduction(dtype, op, self.version)?;
        }
        if numel == 0 {
            return Ok(());
        }
        let nbytes = numel * dtype.size();
        if op == ReduceOp::Sum {
            if let Some(fast) = st.fast.as_mut().filter(|f| f.accepts(dtype, nbytes)) {
                // SAFETY: src/dst are the op's views (nbytes each, equal or disjoint by the
                // borrow rules), alive until the call returns and ordered on `s`; bound.
                return unsafe { fast.all_reduce(&self.dev, src, dst, dtype, nbytes, s) };
            }
        }
        let dt = nccl_dtype(dtype)?;
        let c = self.nccl(st, "all_reduce")?;
        // SAFETY: as above; NCCL reads and writes numel elements of each.
        unsafe { c.all_reduce(vptr(src), vptr(dst), numel, dt, nccl_op(op), s.as_raw()) }
    }

    /// Grouped sends (`true`) and receives of `(address, dtype, numel, peer)`, fp8 as bytes.
    fn p2p(
        &self,
        st: &mut State<R>,
        s: RawStream,
        op: &str,
        list: &[(bool, u64, DType, usize, usize)],
    ) -> Result<()> {
        let c = self.nccl(st, op)?;
        c.group(|c| {
            for &(send, p, dtype, numel, peer) in list {
                let (dt, n) = wire_dtype(dtype, numel)?;
                if n == 0 {
                    continue; // both sides skip: shapes match
                }
                // SAFETY: every entry is a view of the op (or a block of one), alive until
                // the call returns and ordered on `s`.
                unsafe {
                    if send {
                        c.send(vptr(p), n, dt, peer, s.as_raw())
                    } else {
                        c.recv(vptr(p), n, dt, peer, s.as_raw())
                    }
                }?;
            }
            Ok(())
        })
    }
}

/// `(outer, len, inner)` of `t` around `dim`.
fn split(t: &impl Tensor, dim: isize, op: &str) -> Result<(usize, usize, usize)> {
    let d = check_collective_dim(t.shape(), dim, op)?;
    Ok(split_dims(t.shape(), d))
}

/// The re-layout of ranks' parts of `lens[r]` rows along `dim` of tensors shaped like `t`.
fn parts<'l>(t: &impl Tensor, dim: isize, lens: &'l [usize], op: &str) -> Result<Parts<'l>> {
    let (outer, _, inner) = split(t, dim, op)?;
    Ok(Parts {
        outer,
        inner,
        lens,
        es: t.dtype().size(),
    })
}

/// NCCL init for one rank: the unique id over the host group, init with the deadline, a warm-up
/// all-reduce of one zero waited for (as pynccl does).
fn init_nccl<R: GpuRuntime>(
    dev: &Arc<R>,
    ctx: &CommunicatorContext,
    world: usize,
    rank: usize,
) -> Result<(Comm, i32)> {
    let lib = crate::library(R::FLAVOR)?;
    let host = &ctx.host_group;
    let id_bytes = if rank == 0 {
        host.broadcast_bytes(Some(&UniqueId::new(lib)?.to_bytes()), 0)?
    } else {
        host.broadcast_bytes(None, 0)?
    };
    let id = UniqueId::from_bytes(&id_bytes)?;
    let d2 = dev.clone();
    let mut comm = Comm::init_rank(lib, world, id, rank, ctx.timeout, move || d2.bind())?;
    let z = DeviceBuffer::zeroed(dev, 4)?;
    let s = dev.stream();
    // SAFETY: z is a live 1-element f32 device buffer, waited for before it drops; bound by zeroed.
    unsafe {
        comm.all_reduce(
            vptr(z.ptr()),
            vptr(z.ptr()),
            1,
            sys::ncclFloat32,
            sys::ncclSum,
            s.as_raw(),
        )
    }?;
    // SAFETY: the runtime's own stream; still bound.
    unsafe {
        wait_stream(&**dev, s, "NCCL warm-up", ctx.timeout, || {
            comm.check_async_error()
        })
    }?;
    tracing::info!(group = %ctx.group_name, rank, world, library = %lib.path, version = %lib.version(), "NCCL communicator ready");
    Ok((comm, lib.version_code))
}

impl<R: GpuRuntime> DeviceCommunicator for NcclCommunicator<R> {
    type Tensor = GpuTensor<R>;
    type View<'a> = GpuView<'a, R>;
    type ViewMut<'a> = GpuViewMut<'a, R>;

    fn view(t: &GpuTensor<R>) -> GpuView<'_, R> {
        t.view()
    }
    fn view_mut(t: &mut GpuTensor<R>) -> GpuViewMut<'_, R> {
        t.view_mut()
    }
    /// A device copy on `dst`'s stream, fenced with `src`'s when they differ.
    fn copy(src: &GpuView<'_, R>, dst: &mut GpuViewMut<'_, R>) -> Result<()> {
        dist_core::ensure_arg!(
            src.dtype() == dst.dtype()
                && src.numel() == dst.numel()
                && src.device() == dst.device(),
            "copy of {src:?} into {dst:?}"
        );
        if src.nbytes() == 0 {
            return Ok(());
        }
        let dev = src.context();
        dev.bind()?;
        let (a, b) = (src.stream(), dst.stream());
        let ev = if a != b {
            Some(dev.new_event(false)?)
        } else {
            None
        };
        // SAFETY: both views hold nbytes of this device, borrowed for the call, on live streams;
        // bound above; the event orders `b` after `a` and back.
        unsafe {
            if let Some(e) = &ev {
                dev.record(e, a)?;
                dev.wait_event(b, e)?;
            }
            dev.copy_d2d(dst.raw.ptr, src.raw.ptr, src.nbytes(), b)?;
            if let Some(e) = &ev {
                dev.record(e, b)?;
                dev.wait_event(a, e)?;
            }
        }
        Ok(())
    }
    fn narrow<'a>(v: &Self::View<'a>, start: usize, len: usize) -> Result<Self::View<'a>> {
        v.narrow(start, len)
    }
    fn device(&self) -> Device {
        Device::new(R::KIND, self.dev.ordinal())
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }
    /// Also the deadline of the fast all-reduce's device-side waits.
    fn set_timeout(&self, timeout: Duration) {
        *lock(&self.timeout) = timeout;
        if let Some(f) = lock(&self.state).fast.as_ref() {
            f.set_timeout(timeout);
        }
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<GpuTensor<R>> {
        GpuTensor::zeros(&self.dev, dtype, shape)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<GpuTensor<R>> {
        GpuTensor::uninit(&self.dev, dtype, shape)
    }
    fn synchronize(&self) -> Result<()> {
        NcclCommunicator::synchronize(self)
    }

    fn all_reduce_into(
        &self,
        input: &GpuView<'_, R>,
        output: &mut GpuViewMut<'_, R>,
        op: ReduceOp,
    ) -> Result<()> {
        let name = "all_reduce";
        self.check(input, name)?;
        self.check(output, name)?;
        ensure_reducible(input.dtype(), name)?;
        check_output(name, output, input.dtype(), input.shape())?;
        let (src, dst) = (input.raw.ptr, output.raw.ptr);
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            self.all_reduce_raw(st, s, src, dst, input.dtype(), input.numel(), op)
        })
    }

    fn all_reduce_in_place(&self, t: &mut GpuViewMut<'_, R>, op: ReduceOp) -> Result<()> {
        let name = "all_reduce";
        self.check(t, name)?;
        ensure_reducible(t.dtype(), name)?;
        let p = t.raw.ptr;
        self.run(name, &[t.stream()], |st, s| {
            self.all_reduce_raw(st, s, p, p, t.dtype(), t.numel(), op)
        })
    }

    /// NCCL all-gather rank-major, then a device re-layout unless the dims before `dim` are 1.
    fn all_gather_into(
        &self,
        input: &GpuView<'_, R>,
        output: &mut GpuViewMut<'_, R>,
        dim: isize,
    ) -> Result<()> {
        let name = "all_gather";
        self.check(input, name)?;
        self.check(output, name)?;
        let shape = all_gather_shape(input.shape(), dim, self.world, name)?;
        check_output(name, output, input.dtype(), &shape)?;
        let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
        let lens = vec![split(input, dim, name)?.1; self.world];
        let p = parts(input, dim, &lens, name)?;
        let (src, dst) = (input.raw.ptr, output.raw.ptr);
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            if n == 0 {
                return Ok(());
            }
            self.with_rank_major_output(st, s, &p, dst, |st, target| {
                let c = self.nccl(st, name)?;
                // SAFETY: the input holds n elements, target world * n; alive on `s`.
                unsafe { c.all_gather(vptr(src), vptr(target), n, dt, s.as_raw()) }
            })
        })
    }

    /// One NCCL broadcast per root inside a group (as vLLM's pynccl), equal sizes as the plain
    /// all-gather; any `dim` through the re-layout.
    fn all_gatherv_into(
        &self,
        input: &GpuView<'_, R>,
        output: &mut GpuViewMut<'_, R>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        let name = "all_gatherv";
        self.check(input, name)?;
        self.check(output, name)?;
        let shape = all_gatherv_shape(input.shape(), dim, sizes, self.world, self.rank)?;
        check_output(name, output, input.dtype(), &shape)?;
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.all_gather_into(input, output, dim);
        }
        let p = parts(input, dim, sizes, name)?;
        let (dt, _) = wire_dtype(input.dtype(), 0)?;
        let (src, dst, me) = (input.raw.ptr, output.raw.ptr, self.rank);
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            self.with_rank_major_output(st, s, &p, dst, |st, target| {
                self.nccl(st, name)?.group(|c| {
                    for (root, off, count) in p.blocks_by_rank() {
                        let send = if root == me {
                            vptr(src)
                        } else {
                            std::ptr::null_mut()
                        };
                        let recv = vptr(target + off);
                        // SAFETY: block `root` of target holds `count` elements; the input
                        // holds `count` on the root; all alive and ordered on `s`.
                        unsafe { c.broadcast(send, recv, count, dt, root, s.as_raw()) }?;
                    }
                    Ok(())
                })
            })
        })
    }

    /// A device re-layout to rank-major (unless the dims before `dim` are all 1), then NCCL
    /// reduce-scatter straight into the output.
    fn reduce_scatter_into(
        &self,
        input: &GpuView<'_, R>,
        output: &mut GpuViewMut<'_, R>,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        let name = "reduce_scatter";
        self.check(input, name)?;
        self.check(output, name)?;
        ensure_reducible(input.dtype(), name)?;
        let shape = reduce_scatter_shape(input.shape(), dim, self.world)?;
        check_output(name, output, input.dtype(), &shape)?;
        let lens = vec![split(input, dim, name)?.1 / self.world; self.world];
        let p = parts(input, dim, &lens, name)?;
        let (src, dst, count) = (input.raw.ptr, output.raw.ptr, output.numel());
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            check_reduction(input.dtype(), op, self.version)?;
            if count == 0 {
                return Ok(());
            }
            let dt = nccl_dtype(input.dtype())?;
            self.with_rank_major_input(st, s, &p, src, |st, from| {
                let c = self.nccl(st, name)?;
                let o = nccl_op(op);
                // SAFETY: `from` holds world * count elements, the output count; alive on `s`.
                unsafe { c.reduce_scatter(vptr(from), vptr(dst), count, dt, o, s.as_raw()) }
            })
        })
    }

    /// One NCCL reduce per root inside a group; each rank's block lands in its output.
    fn reduce_scatterv_into(
        &self,
        input: &GpuView<'_, R>,
        output: &mut GpuViewMut<'_, R>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let name = "reduce_scatterv";
        self.check(input, name)?;
        self.check(output, name)?;
        ensure_reducible(input.dtype(), name)?;
        let dd = check_collective_dim(input.shape(), dim, name)?;
        let shape = reduce_scatterv_shape(input.shape(), dd, sizes, self.world, self.rank)?;
        check_output(name, output, input.dtype(), &shape)?;
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.reduce_scatter_into(input, output, dim, op);
        }
        let p = parts(input, dim, sizes, name)?;
        let (src, dst) = (input.raw.ptr, output.raw.ptr);
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            check_reduction(input.dtype(), op, self.version)?;
            let dt = nccl_dtype(input.dtype())?;
            self.with_rank_major_input(st, s, &p, src, |st, from| {
                self.nccl(st, name)?.group(|c| {
                    for (root, off, count) in p.blocks_by_rank() {
                        let o = nccl_op(op);
                        // SAFETY: block `root` of `from` holds `count` elements; the output
                        // holds sizes[rank] rows (written on the root only); alive on `s`.
                        unsafe {
                            c.reduce(vptr(from + off), vptr(dst), count, dt, o, root, s.as_raw())
                        }?;
                    }
                    Ok(())
                })
            })
        })
    }

    /// Every other rank sends, `dst` receives each rank's block in a group (its own by a
    /// device copy), then the re-layout.
    fn gather_into(
        &self,
        input: &GpuView<'_, R>,
        output: Option<&mut GpuViewMut<'_, R>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        let name = "gather";
        self.check(input, name)?;
        dist_core::ensure_arg!(
            dst < self.world,
            "gather: dst {dst} out of range for world size {}",
            self.world
        );
        dist_core::ensure_arg!(
            output.is_some() == (self.rank == dst),
            "{} gather to {dst}: only the destination passes an output",
            self.name
        );
        let shape = all_gather_shape(input.shape(), dim, self.world, name)?;
        let (dt, n) = wire_dtype(input.dtype(), input.numel())?;
        let (src, nbytes, world) = (input.raw.ptr, input.nbytes(), self.world);
        let Some(out) = output else {
            return self.run(name, &[input.stream()], |st, s| {
                self.p2p(
                    st,
                    s,
                    name,
                    &[(true, src, input.dtype(), input.numel(), dst)],
                )
            });
        };
        self.check(&*out, name)?;
        check_output(name, &*out, input.dtype(), &shape)?;
        let lens = vec![split(input, dim, name)?.1; world];
        let p = parts(input, dim, &lens, name)?;
        let optr = out.raw.ptr;
        self.run(name, &[input.stream(), out.stream()], |st, s| {
            if n == 0 {
                return Ok(());
            }
            self.with_rank_major_output(st, s, &p, optr, |st, target| {
                // SAFETY: block `dst` of target holds nbytes; the input holds nbytes; on `s`.
                unsafe {
                    self.dev
                        .copy_d2d(target + (dst * nbytes) as u64, src, nbytes, s)
                }?;
                if world == 1 {
                    return Ok(());
                }
                self.nccl(st, name)?.group(|c| {
                    for r in (0..world).filter(|r| *r != dst) {
                        let at = vptr(target + (r * nbytes) as u64);
                        // SAFETY: block r of target holds n elements, alive on `s`.
                        unsafe { c.recv(at, n, dt, r, s.as_raw()) }?;
                    }
                    Ok(())
                })
            })
        })
    }

    /// In place: the root passes its buffer as send and receive, the others a null send.
    fn broadcast(&self, t: &mut GpuViewMut<'_, R>, src: usize) -> Result<()> {
        let name = "broadcast";
        self.check(t, name)?;
        dist_core::ensure_arg!(
            src < self.world,
            "broadcast: src {src} out of range for world size {}",
            self.world
        );
        let (dt, n) = wire_dtype(t.dtype(), t.numel())?;
        let (p, me) = (t.raw.ptr, self.rank);
        self.run(name, &[t.stream()], |st, s| {
            if n == 0 {
                return Ok(());
            }
            let send = if me == src {
                vptr(p) as *const c_void
            } else {
                std::ptr::null()
            };
            let c = self.nccl(st, name)?;
            // SAFETY: the view holds n elements, alive and ordered on `s`.
            unsafe { c.broadcast(send, vptr(p), n, dt, src, s.as_raw()) }
        })
    }

    fn send(&self, t: &GpuView<'_, R>, dst: usize) -> Result<()> {
        self.check(t, "send")?;
        crate::ensure_rank(dst, self.world, "send peer")?;
        self.run("send", &[t.stream()], |st, s| {
            self.p2p(
                st,
                s,
                "send",
                &[(true, t.raw.ptr, t.dtype(), t.numel(), dst)],
            )
        })
    }

    fn recv(&self, t: &mut GpuViewMut<'_, R>, src: usize) -> Result<()> {
        self.check(t, "recv")?;
        crate::ensure_rank(src, self.world, "recv peer")?;
        self.run("recv", &[t.stream()], |st, s| {
            self.p2p(
                st,
                s,
                "recv",
                &[(false, t.raw.ptr, t.dtype(), t.numel(), src)],
            )
        })
    }

    /// One NCCL group; fp8 travels as bytes.
    fn batch_send_recv(
        &self,
        ops: &mut [P2pOp<'_, GpuView<'_, R>, GpuViewMut<'_, R>>],
    ) -> Result<()> {
        let name = "batch_send_recv";
        let mut list = Vec::with_capacity(ops.len());
        let mut streams = Vec::with_capacity(ops.len());
        for o in ops.iter() {
            let (send, t, peer) = match o {
                P2pOp::Send(t, p) => (true, &t.raw, *p),
                P2pOp::Recv(t, p) => (false, &t.raw, *p),
            };
            dist_core::ensure_arg!(
                t.dev.ordinal() == self.dev.ordinal(),
                "{} {name}: tensor on {}:{}, communicator on {}:{}",
                self.name,
                R::NAME,
                t.dev.ordinal(),
                R::NAME,
                self.dev.ordinal()
            );
            crate::ensure_rank(peer, self.world, "batch_send_recv peer")?;
            list.push((send, t.ptr, t.dtype, t.bytes / t.dtype.size().max(1), peer));
            streams.push(t.stream);
        }
        if list.is_empty() {
            return Ok(());
        }
        self.run(name, &streams, |st, s| self.p2p(st, s, name, &list))
    }

    /// Grouped sends and receives of each peer's rows (blocks of the input and output, no
    /// copies), the own rows by a device copy.
    fn all_to_all_v_into(
        &self,
        input: &GpuView<'_, R>,
        send_counts: &[usize],
        output: &mut GpuViewMut<'_, R>,
        recv_counts: &[usize],
    ) -> Result<()> {
        let name = "all_to_all_v";
        self.check(input, name)?;
        self.check(output, name)?;
        let row = check_all_to_all_v(input, send_counts, output, recv_counts, self.world)?;
        let me = self.rank;
        dist_core::ensure_arg!(
            send_counts[me] == recv_counts[me],
            "{} {name}: this rank sends itself {} rows and expects {}",
            self.name,
            send_counts[me],
            recv_counts[me]
        );
        let offsets = |c: &[usize]| -> Vec<u64> {
            c.iter()
                .scan(0u64, |o, &n| {
                    let at = *o;
                    *o += (n * row) as u64;
                    Some(at)
                })
                .collect()
        };
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        let (src, dst) = (input.raw.ptr, output.raw.ptr);
        let mut list = Vec::with_capacity(2 * self.world);
        for p in (0..self.world).filter(|p| *p != me) {
            list.push((true, src + so[p], DType::U8, send_counts[p] * row, p));
        }
        for p in (0..self.world).filter(|p| *p != me) {
            list.push((false, dst + ro[p], DType::U8, recv_counts[p] * row, p));
        }
        self.run(name, &[input.stream(), output.stream()], |st, s| {
            let own = send_counts[me] * row;
            if own > 0 {
                // SAFETY: both blocks hold `own` bytes inside their views, alive on `s`.
                unsafe { self.dev.copy_d2d(dst + ro[me], src + so[me], own, s) }?;
            }
            if list.iter().any(|e| e.3 > 0) {
                self.p2p(st, s, name, &list)?;
            }
            Ok(())
        })
    }

    fn begin_capture(&self) -> Result<()> {
        self.live("begin_capture")
    }

    /// Graph-buffer registration of the fast all-reduce (collective over the host group).
    fn end_capture(&self) -> Result<()> {
        self.live("end_capture")?;
        if let Some(f) = lock(&self.state).fast.as_mut() {
            let n = f.end_capture(self.host.as_ref())?;
            tracing::debug!(group = %self.name, "registered {n} graph buffers");
        }
        Ok(())
    }

    fn destroy(&self) -> Result<()> {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Our work first (bounded); every step runs even when an earlier one failed, and the
        // first error is returned.
        let mut first = self.synchronize().err();
        let mut st = lock(&self.state);
        // NCCL next (as vLLM: abort, on a helper thread with a deadline): an abort also ends a
        // collective a dead peer left hanging.
        if let Some(mut c) = st.nccl.take() {
            if let Err(e) = c.abort() {
                first.get_or_insert(e);
            }
        }
        if let Some(f) = st.fast.take() {
            // Peers may still read our buffers: free them only once every rank is here.
            if let Err(e) = self.host.barrier() {
                first.get_or_insert(e);
            }
            drop(f);
        }
        first.map_or(Ok(()), Err)
    }
}

impl<R: GpuRuntime> Drop for NcclCommunicator<R> {
    fn drop(&mut self) {
        if !self.destroyed.swap(true, Ordering::AcqRel) {
            // No collective barrier in drop (a peer may be gone): free locally, bounded, never panic.
            let _ = self.synchronize();
            let mut st = lock(&self.state);
            if let Some(mut c) = st.nccl.take() {
                if let Err(e) = c.abort() {
                    tracing::warn!(group = %self.name, "dropping communicator: {e}");
                }
            }
            drop(st.fast.take());
        }
    }
}
