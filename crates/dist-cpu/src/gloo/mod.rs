//! The gloo communicator (feature `gloo`): host-tensor collectives across nodes through
//! Debian's `libgloo-dev`, reached through a C shim (`shim.cc`) that catches every C++
//! exception. Rendezvous goes through the job's [`Store`], passed to gloo as callbacks.
//!
//! gloo's options API has all-reduce (ring), all-gather(v), broadcast and barrier, and
//! unbound-buffer send/recv. Here: reduce-scatter is an all-reduce followed by taking this
//! rank's part, gather an all-gather kept on `dst`; f16 and bf16 are reduced in f32 (gloo has no
//! bf16 and reduces fp16 scalar-wise); `avg` is a sum divided on the host. gloo's ring combines
//! ranks in its own order, so float results may differ from the rank-order oracle in the last
//! bits (integers are exact); every rank gets the same bits.
//!
//! Connecting keeps the communicator's deadline: the shim connects the full mesh itself (gloo's
//! keys, gloo's pairs) with one deadline for the whole of it, because gloo alone waits five times
//! its timeout for each pair, one pair after the other. A peer that never connects fails
//! [`GlooCommunicator::new`] with `Error::Timeout` naming it, within the timeout.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dist_core::communicator::{
    all_gatherv_shape, check_all_to_all_v, check_collective_dim, check_output,
    check_reduce_scatterv, ensure_reducible, P2pOp,
};
use dist_core::tensor::{concat_along_into, split_along, split_dims};
use dist_core::{
    DType, DeviceCommunicator, Element, Error, HostPool, HostTensor, HostView, HostViewMut,
    ReduceOp, Result, Store,
};

type SinkFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize);
type SetFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize, *const c_char, usize) -> c_int;
type GetFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize, *mut c_void, SinkFn) -> c_int;
type WaitFn =
    unsafe extern "C" fn(*mut c_void, *const *const c_char, *const usize, usize, i64) -> c_int;

extern "C" {
    fn dg_new(
        rank: c_int,
        size: c_int,
        user: *mut c_void,
        set: SetFn,
        get: GetFn,
        wait: WaitFn,
        prefix: *const c_char,
        timeout_ms: i64,
        hostname: *const c_char,
        iface: *const c_char,
        out: *mut *mut c_void,
        late_peer: *mut c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dg_free(ctx: *mut c_void);
    fn dg_allreduce(
        ctx: *mut c_void,
        ptr: *mut c_void,
        count: usize,
        dtype: c_int,
        op: c_int,
        ms: i64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dg_allgatherv(
        ctx: *mut c_void,
        input: *const c_void,
        in_bytes: usize,
        out: *mut c_void,
        counts: *const usize,
        ms: i64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dg_broadcast(
        ctx: *mut c_void,
        ptr: *mut c_void,
        bytes: usize,
        root: c_int,
        ms: i64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dg_barrier(ctx: *mut c_void, ms: i64, err: *mut c_char, errlen: usize) -> c_int;
    fn dg_send(
        ctx: *mut c_void,
        ptr: *const c_void,
        bytes: usize,
        dst: c_int,
        slot: u64,
        ms: i64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dg_recv(
        ctx: *mut c_void,
        ptr: *mut c_void,
        bytes: usize,
        src: c_int,
        slot: u64,
        ms: i64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// What the store callbacks see: the store and the connect's deadline, which bounds every
/// rendezvous wait.
struct StoreCtx {
    store: Arc<dyn Store>,
    deadline: Instant,
}

impl StoreCtx {
    /// Time left before the deadline (at least 1 ms, so a late call still asks once).
    fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }
}

/// The `n` bytes at `p` (none when `n == 0`, where `p` may be null).
///
/// # Safety
/// With `n > 0`, `p` must point to `n` readable bytes that outlive the returned slice.
unsafe fn bytes_of<'a>(p: *const c_char, n: usize) -> &'a [u8] {
    if n == 0 || p.is_null() {
        return &[];
    }
    // SAFETY: the caller's guarantee.
    unsafe { std::slice::from_raw_parts(p as *const u8, n) }
}

fn key_of(k: *const c_char, n: usize) -> String {
    // SAFETY: the shim passes a pointer to `n` bytes of a live std::string.
    String::from_utf8_lossy(unsafe { bytes_of(k, n) }).into_owned()
}

unsafe extern "C" fn cb_set(
    user: *mut c_void,
    k: *const c_char,
    kl: usize,
    v: *const c_char,
    vl: usize,
) -> c_int {
    std::panic::catch_unwind(|| {
        // SAFETY: `user` is the StoreCtx that outlives dg_new; v points to vl bytes.
        let s = unsafe { &*(user as *const StoreCtx) };
        // SAFETY: the shim passes `vl` bytes of a live vector (possibly null when empty).
        let val = unsafe { bytes_of(v, vl) };
        match s.store.set(&key_of(k, kl), val) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("gloo rendezvous: store set failed: {e}");
                1
            }
        }
    })
    .unwrap_or(1)
}

unsafe extern "C" fn cb_get(
    user: *mut c_void,
    k: *const c_char,
    kl: usize,
    sink: *mut c_void,
    put: SinkFn,
) -> c_int {
    std::panic::catch_unwind(|| {
        // SAFETY: `user` is the StoreCtx that outlives dg_new.
        let s = unsafe { &*(user as *const StoreCtx) };
        match s.store.get(&key_of(k, kl), s.left()) {
            Ok(v) => {
                // SAFETY: `put` copies v into the shim's vector `sink` before returning.
                unsafe { put(sink, v.as_ptr() as *const c_char, v.len()) };
                0
            }
            Err(e) => {
                tracing::warn!("gloo rendezvous: store get failed: {e}");
                1
            }
        }
    })
    .unwrap_or(1)
}

unsafe extern "C" fn cb_wait(
    user: *mut c_void,
    keys: *const *const c_char,
    lens: *const usize,
    n: usize,
    ms: i64,
) -> c_int {
    std::panic::catch_unwind(|| {
        // SAFETY: `user` is the StoreCtx; keys/lens are arrays of n entries from the shim.
        let s = unsafe { &*(user as *const StoreCtx) };
        let keys: Vec<String> = (0..n)
            // SAFETY: as above.
            .map(|i| unsafe { key_of(*keys.add(i), *lens.add(i)) })
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let t = if ms > 0 {
            Duration::from_millis(ms as u64).min(s.left())
        } else {
            s.left()
        };
        match s.store.wait(&refs, t) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("gloo rendezvous: store wait failed: {e}");
                1
            }
        }
    })
    .unwrap_or(1)
}

struct Inner {
    ctx: *mut c_void,
    sent: Vec<u64>,
    recvd: Vec<u64>,
}

// SAFETY: the gloo context is used only while the communicator's mutex is held, by one thread at a time.
unsafe impl Send for Inner {}

/// Collectives on [`HostTensor`]s through gloo (TCP), for ranks on several nodes.
pub struct GlooCommunicator {
    group: String,
    rank: usize,
    world: usize,
    timeout: dist_core::communicator::TimeoutCell,
    inner: Mutex<Inner>,
    /// Outputs of the owned calls and the reduce-scatter's temporaries, kept touched.
    buffers: Arc<HostPool>,
}

impl std::fmt::Debug for GlooCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlooCommunicator")
            .field("group", &self.group)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

const ERRLEN: usize = 1024;

fn dtype_code(d: DType) -> Option<c_int> {
    Some(match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::I8 => 2,
        DType::U8 => 3,
        DType::I32 => 4,
        DType::U32 => 5,
        DType::I64 => 6,
        DType::U64 => 7,
        _ => return None,
    })
}

impl GlooCommunicator {
    /// Connects `world` ranks (this one is `rank`) through gloo's TCP transport, rendezvousing
    /// through `store` under keys prefixed by `group_name`. `GLOO_SOCKET_IFNAME` picks the
    /// interface, `DIST_GLOO_HOSTNAME` the address to listen on (default: the host name's).
    pub fn new(
        store: Arc<dyn Store>,
        group_name: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        crate::ensure_arg!(
            (1..=256).contains(&world) && rank < world,
            "gloo: rank {rank} of {world} (gloo groups here have 1 to 256 ranks)"
        );
        let start = Instant::now();
        let sc = StoreCtx {
            store,
            deadline: start + timeout,
        };
        let prefix = CString::new(format!("dist-gloo/{group_name}"))
            .map_err(|_| Error::invalid("group name has a NUL byte"))?;
        let host = CString::new(std::env::var("DIST_GLOO_HOSTNAME").unwrap_or_default())
            .map_err(|_| Error::invalid("DIST_GLOO_HOSTNAME has a NUL byte"))?;
        let iface = CString::new(std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default())
            .map_err(|_| Error::invalid("GLOO_SOCKET_IFNAME has a NUL byte"))?;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        let mut late_peer: c_int = -1;
        let mut err = vec![0 as c_char; ERRLEN];
        // SAFETY: every pointer is valid for the call; `sc` outlives it (the shim keeps no
        // reference to the store after the mesh is connected); callbacks catch panics.
        let rc = unsafe {
            dg_new(
                rank as c_int,
                world as c_int,
                &sc as *const StoreCtx as *mut c_void,
                cb_set,
                cb_get,
                cb_wait,
                prefix.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                host.as_ptr(),
                iface.as_ptr(),
                &mut ctx,
                &mut late_peer,
                err.as_mut_ptr(),
                ERRLEN,
            )
        };
        if rc == 2 {
            return Err(Error::Timeout {
                op: format!("gloo connect (group {group_name}, rank {rank} of {world})"),
                waited: start.elapsed(),
                missing_ranks: usize::try_from(late_peer).into_iter().collect(),
                detail: format!(
                    "rank {late_peer} did not connect within the deadline ({}); a peer listening on an address this node cannot reach (GLOO_SOCKET_IFNAME, DIST_GLOO_HOSTNAME) looks the same",
                    msg(&err)
                ),
            });
        }
        if rc != 0 || ctx.is_null() {
            return Err(Error::Backend {
                backend: "gloo",
                code: Some(rc as i64),
                message: format!("{group_name}: connecting the full mesh: {}", msg(&err)),
            });
        }
        Ok(GlooCommunicator {
            group: group_name.to_string(),
            rank,
            world,
            timeout: dist_core::communicator::TimeoutCell::new(timeout),
            buffers: HostPool::new(HostPool::DEFAULT_LIMIT),
            inner: Mutex::new(Inner {
                ctx,
                sent: vec![0; world],
                recvd: vec![0; world],
            }),
        })
    }

    fn lock(&self, op: &str) -> Result<MutexGuard<'_, Inner>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.ctx.is_null() {
            return Err(Error::NotInitialized(format!(
                "{} {op}: destroyed",
                self.group
            )));
        }
        Ok(g)
    }

    fn ms(&self) -> i64 {
        (self.timeout().as_millis().min(i64::MAX as u128) as i64).max(1)
    }

    /// Runs one shim call, turning its failure into an error naming the op.
    fn call(&self, op: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
        let start = Instant::now();
        let mut err = vec![0 as c_char; ERRLEN];
        let rc = f(err.as_mut_ptr(), ERRLEN);
        if rc == 0 {
            return Ok(());
        }
        let m = msg(&err);
        if m.contains("imed out") || m.contains("imeout") {
            Err(Error::Timeout {
                op: format!("{} {op}", self.group),
                waited: start.elapsed(),
                missing_ranks: Vec::new(),
                detail: format!("gloo: {m}"),
            })
        } else {
            Err(Error::Backend {
                backend: "gloo",
                code: Some(rc as i64),
                message: format!("{} {op}: {m}", self.group),
            })
        }
    }

    fn all_reduce_raw(&self, t: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        crate::ensure_arg!(
            t.dtype().is_reducible(),
            "all_reduce: {} cannot be reduced (fp8 is moved as bytes only)",
            t.dtype()
        );
        if matches!(t.dtype(), DType::F16 | DType::BF16) {
            // Reduce in f32 (gloo has no bf16; its fp16 sum is scalar), then round once.
            use dist_core::half::{bf16, f16};
            let wide: Vec<f32> = match t.dtype() {
                DType::F16 => t.as_slice::<f16>()?.iter().map(|x| x.to_f32()).collect(),
                _ => t.as_slice::<bf16>()?.iter().map(|x| x.to_f32()).collect(),
            };
            let mut w = HostTensor::from_vec(t.shape(), wide)?;
            self.all_reduce_raw(&mut w.view_mut(), op)?;
            let ws = w.as_slice::<f32>()?;
            match t.dtype() {
                DType::F16 => {
                    for (o, x) in t.as_slice_mut::<f16>()?.iter_mut().zip(ws) {
                        *o = f16::from_f32(*x);
                    }
                }
                _ => {
                    for (o, x) in t.as_slice_mut::<bf16>()?.iter_mut().zip(ws) {
                        *o = bf16::from_f32(*x);
                    }
                }
            }
            return Ok(());
        }
        if t.numel() == 0 || self.world == 1 {
            return Ok(());
        }
        let code = dtype_code(t.dtype())
            .ok_or_else(|| Error::unsupported(format!("gloo all_reduce of {}", t.dtype())))?;
        let opc = match op {
            ReduceOp::Sum | ReduceOp::Avg => 0,
            ReduceOp::Prod => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
        };
        let g = self.lock("all_reduce")?;
        let n = t.numel();
        let ms = self.ms();
        let ptr = t.as_bytes_mut().as_mut_ptr() as *mut c_void;
        // SAFETY: ptr holds n elements of the dtype `code` names; the context is locked.
        self.call("all_reduce", |e, el| unsafe {
            dg_allreduce(g.ctx, ptr, n, code, opc, ms, e, el)
        })?;
        drop(g);
        if op == ReduceOp::Avg {
            let world = self.world;
            dist_core::dispatch_dtype!(t.dtype(), T => {
                for x in t.as_slice_mut::<T>()? {
                    *x = T::from_acc(T::div(x.to_acc(), world));
                }
                Ok::<(), Error>(())
            })?;
        }
        Ok(())
    }

    /// Rank-major bytes of every rank's input (`counts[r]` bytes each).
    fn gather_raw(&self, input: &[u8], counts: &[usize]) -> Result<Vec<u8>> {
        let total: usize = counts.iter().sum();
        let mut out = vec![0u8; total];
        if total == 0 {
            return Ok(out);
        }
        if self.world == 1 {
            out.copy_from_slice(input);
            return Ok(out);
        }
        let g = self.lock("all_gather")?;
        let ms = self.ms();
        // SAFETY: input has counts[rank] bytes, out has their sum; counts has world entries.
        self.call("all_gather", |e, el| unsafe {
            dg_allgatherv(
                g.ctx,
                input.as_ptr() as *const c_void,
                input.len(),
                out.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                ms,
                e,
                el,
            )
        })?;
        Ok(out)
    }

    /// All-gather of `input` along `dim` with per-rank lengths `sizes` into `output` (any rank
    /// may pass `None`: it takes part and keeps nothing, as a gather's non-destination does).
    fn gatherv_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dim: isize,
        sizes: &[usize],
        op: &str,
    ) -> Result<()> {
        let out_shape = all_gatherv_shape(input.shape(), dim, sizes, self.world, self.rank)?;
        let d = check_collective_dim(input.shape(), dim, op)?;
        if let Some(o) = &output {
            check_output(op, *o, input.dtype(), &out_shape)?;
        }
        let el = input.dtype().size();
        let (outer, _, inner) = split_dims(input.shape(), d);
        let counts: Vec<usize> = sizes.iter().map(|s| outer * s * inner * el).collect();
        let flat = self.gather_raw(input.as_bytes(), &counts)?;
        if let Some(o) = output {
            let mut parts = Vec::with_capacity(self.world);
            let mut off = 0;
            for c in &counts {
                parts.push(&flat[off..off + c]);
                off += c;
            }
            concat_along_into(o.as_bytes_mut(), &parts, &out_shape, d, sizes, el)?;
        }
        Ok(())
    }

    /// One message to `dst`: a 16-byte header (size, dtype), then the bytes.
    fn send_raw(&self, data: &[u8], dtype: DType, dst: usize) -> Result<()> {
        let mut g = self.lock("send")?;
        let seq = g.sent[dst];
        g.sent[dst] += 2;
        let header = [data.len() as u64, dtype_index(dtype)];
        let ms = self.ms();
        let (s0, s1) = (
            self.slot(self.rank, dst, seq),
            self.slot(self.rank, dst, seq + 1),
        );
        let ctx = g.ctx;
        // SAFETY: header is 16 bytes; the context is locked.
        self.call("send", |e, el| unsafe {
            dg_send(
                ctx,
                header.as_ptr() as *const c_void,
                16,
                dst as c_int,
                s0,
                ms,
                e,
                el,
            )
        })?;
        if !data.is_empty() {
            // SAFETY: the message's bytes; the context is locked.
            self.call("send", |e, el| unsafe {
                dg_send(
                    ctx,
                    data.as_ptr() as *const c_void,
                    data.len(),
                    dst as c_int,
                    s1,
                    ms,
                    e,
                    el,
                )
            })?;
        }
        Ok(())
    }

    /// One message from `src` into `buf`, whose size and dtype must be the sender's.
    fn recv_raw(&self, buf: &mut [u8], dtype: DType, src: usize) -> Result<()> {
        let mut g = self.lock("recv")?;
        let seq = g.recvd[src];
        g.recvd[src] += 2;
        let mut header = [0u64; 2];
        let ms = self.ms();
        let (s0, s1) = (
            self.slot(src, self.rank, seq),
            self.slot(src, self.rank, seq + 1),
        );
        let ctx = g.ctx;
        // SAFETY: header is 16 bytes; the context is locked.
        self.call("recv", |e, el| unsafe {
            dg_recv(
                ctx,
                header.as_mut_ptr() as *mut c_void,
                16,
                src as c_int,
                s0,
                ms,
                e,
                el,
            )
        })?;
        if header != [buf.len() as u64, dtype_index(dtype)] {
            return Err(Error::protocol(format!(
                "{} recv from {src}: got {} bytes of dtype #{}, expected {} bytes of {dtype}; the pair is out of step",
                self.group, header[0], header[1], buf.len()
            )));
        }
        if !buf.is_empty() {
            let n = buf.len();
            let ptr = buf.as_mut_ptr() as *mut c_void;
            // SAFETY: ptr holds n bytes; the context is locked.
            self.call("recv", |e, el| unsafe {
                dg_recv(ctx, ptr, n, src as c_int, s1, ms, e, el)
            })?;
        }
        Ok(())
    }

    /// Runs point-to-point messages in an order no pattern can deadlock on, although gloo's
    /// sends wait for the matching receive: peers in ascending order, and with each peer the
    /// lower rank sends first. Every rank's sequence is then consistent with one global order of
    /// the pairs (by lower, then higher rank).
    fn pairwise(
        &self,
        sends: &mut [(usize, &[u8], DType)],
        recvs: &mut [(usize, &mut [u8], DType)],
    ) -> Result<()> {
        let mut peers: Vec<usize> = sends
            .iter()
            .map(|s| s.0)
            .chain(recvs.iter().map(|r| r.0))
            .collect();
        peers.sort_unstable();
        peers.dedup();
        for p in peers {
            for phase in 0..2 {
                let send_now = (phase == 0) == (self.rank < p);
                if send_now {
                    for (_, d, t) in sends.iter().filter(|s| s.0 == p) {
                        self.send_raw(d, *t, p)?;
                    }
                } else {
                    for (_, b, t) in recvs.iter_mut().filter(|r| r.0 == p) {
                        self.recv_raw(b, *t, p)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn slot(&self, src: usize, dst: usize, seq: u64) -> u64 {
        (1u64 << 56) | ((seq & 0xff_ffff_ffff) << 16) ^ ((src as u64) << 8 | dst as u64)
    }
}

fn msg(err: &[c_char]) -> String {
    let bytes: Vec<u8> = err
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl DeviceCommunicator for GlooCommunicator {
    dist_core::host_communicator_items!(timeout = timeout, pool = buffers);
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        ensure_reducible(input.dtype(), "all_reduce")?;
        check_output("all_reduce", output, input.dtype(), input.shape())?;
        output.as_bytes_mut().copy_from_slice(input.as_bytes());
        self.all_reduce_raw(output, op)
    }
    fn all_reduce_in_place(&self, tensor: &mut HostViewMut<'_>, op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(tensor, op)
    }
    fn all_gather_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
    ) -> Result<()> {
        let d = check_collective_dim(input.shape(), dim, "all_gather")?;
        let sizes = vec![input.shape()[d]; self.world];
        self.gatherv_into(input, Some(output), dim, &sizes, "all_gather")
    }
    fn all_gatherv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        self.gatherv_into(input, Some(output), dim, sizes, "all_gatherv")
    }
    /// gloo's options API has no reduce-scatter: an all-reduce of the whole input (in a pooled
    /// temporary), then this rank's part.
    fn reduce_scatterv_into(
        &self,
        input: &HostView<'_>,
        output: &mut HostViewMut<'_>,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let d = check_reduce_scatterv(input, output, dim, sizes, self.world, self.rank)?;
        let mut t = self.buffers.tensor(input.dtype(), input.shape())?;
        t.as_bytes_mut().copy_from_slice(input.as_bytes());
        self.all_reduce_raw(&mut t.view_mut(), op)?;
        let mut parts = split_along(t.as_bytes(), input.shape(), d, sizes, input.dtype().size())?;
        output
            .as_bytes_mut()
            .copy_from_slice(&parts.swap_remove(self.rank));
        Ok(())
    }
    fn gather_into(
        &self,
        input: &HostView<'_>,
        output: Option<&mut HostViewMut<'_>>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        crate::ensure_arg!(
            dst < self.world,
            "gather dst {dst} out of range for world {}",
            self.world
        );
        crate::ensure_arg!(
            output.is_some() == (self.rank == dst),
            "gather to {dst}: only the destination passes an output"
        );
        let d = check_collective_dim(input.shape(), dim, "gather")?;
        let sizes = vec![input.shape()[d]; self.world];
        self.gatherv_into(input, output, dim, &sizes, "gather")
    }
    fn broadcast(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        crate::ensure_arg!(
            src < self.world,
            "broadcast src {src} out of range for world {}",
            self.world
        );
        if tensor.nbytes() == 0 || self.world == 1 {
            return Ok(());
        }
        let g = self.lock("broadcast")?;
        let ms = self.ms();
        let n = tensor.nbytes();
        let ptr = tensor.as_bytes_mut().as_mut_ptr() as *mut c_void;
        // SAFETY: ptr holds n bytes; the context is locked.
        self.call("broadcast", |e, el| unsafe {
            dg_broadcast(g.ctx, ptr, n, src as c_int, ms, e, el)
        })
    }
    fn send(&self, tensor: &HostView<'_>, dst: usize) -> Result<()> {
        crate::ensure_arg!(
            dst < self.world && dst != self.rank,
            "send dst {dst}: not a peer"
        );
        self.send_raw(tensor.as_bytes(), tensor.dtype(), dst)
    }
    fn recv(&self, tensor: &mut HostViewMut<'_>, src: usize) -> Result<()> {
        crate::ensure_arg!(
            src < self.world && src != self.rank,
            "recv src {src}: not a peer"
        );
        let dtype = tensor.dtype();
        self.recv_raw(tensor.as_bytes_mut(), dtype, src)
    }
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, HostView<'_>, HostViewMut<'_>>]) -> Result<()> {
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for op in ops.iter_mut() {
            let p = op.peer();
            crate::ensure_arg!(
                p < self.world && p != self.rank,
                "batch_send_recv peer {p}: not a peer"
            );
            match op {
                P2pOp::Send(t, _) => sends.push((p, t.as_bytes(), t.dtype())),
                P2pOp::Recv(t, _) => {
                    let dtype = t.dtype();
                    recvs.push((p, t.as_bytes_mut(), dtype))
                }
            }
        }
        self.pairwise(&mut sends, &mut recvs)
    }
    fn all_to_all_v_into(
        &self,
        input: &HostView<'_>,
        send_counts: &[usize],
        output: &mut HostViewMut<'_>,
        recv_counts: &[usize],
    ) -> Result<()> {
        let row = check_all_to_all_v(input, send_counts, output, recv_counts, self.world)?;
        let me = self.rank;
        let dtype = input.dtype();
        let src = input.as_bytes();
        let mut sends = Vec::new();
        let mut own_in: &[u8] = &[];
        let mut off = 0;
        for (p, &c) in send_counts.iter().enumerate() {
            let part = &src[off..off + c * row];
            off += c * row;
            if p == me {
                own_in = part;
            } else {
                sends.push((p, part, dtype));
            }
        }
        let mut recvs = Vec::new();
        let mut rest = output.as_bytes_mut();
        let mut own_out: &mut [u8] = &mut [];
        for (p, &c) in recv_counts.iter().enumerate() {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(c * row);
            rest = tail;
            if p == me {
                own_out = part;
            } else {
                recvs.push((p, part, dtype));
            }
        }
        crate::ensure_arg!(
            own_in.len() == own_out.len(),
            "all_to_all_v: this rank sends itself {} rows and expects {}",
            send_counts[me],
            recv_counts[me]
        );
        own_out.copy_from_slice(own_in);
        self.pairwise(&mut sends, &mut recvs)
    }
    fn destroy(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !g.ctx.is_null() {
            // SAFETY: the context came from dg_new and is freed once (then nulled).
            unsafe { dg_free(g.ctx) };
            g.ctx = std::ptr::null_mut();
        }
        self.buffers.close();
        Ok(())
    }
}

fn dtype_index(d: DType) -> u64 {
    DType::ALL
        .iter()
        .position(|x| *x == d)
        .unwrap_or(usize::MAX) as u64
}

impl Drop for GlooCommunicator {
    fn drop(&mut self) {
        let _ = self.destroy();
    }
}

/// Also used by [`GlooCommunicator::barrier`].
impl GlooCommunicator {
    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let g = self.lock("barrier")?;
        let ms = self.ms();
        // SAFETY: the context is locked.
        self.call("barrier", |e, el| unsafe { dg_barrier(g.ctx, ms, e, el) })
    }
}
