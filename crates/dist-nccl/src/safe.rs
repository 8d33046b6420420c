//! The owning communicator: init with a deadline, stream-explicit collectives, abort on drop.

use std::ffi::{c_int, c_void};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use crate::loader::Library;
use crate::{result, sys};

/// The 128-byte id every rank of a communicator shares; rank 0 makes it, the host group carries it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub sys::ncclUniqueId);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// A fresh id from `ncclGetUniqueId`.
    pub fn new(lib: &Library) -> Result<UniqueId> {
        result::get_unique_id(lib).map(UniqueId)
    }
    /// The raw bytes, for the host group.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|b| *b as u8).collect()
    }
    /// From bytes received over the host group; exactly 128 are required.
    pub fn from_bytes(b: &[u8]) -> Result<UniqueId> {
        if b.len() != sys::NCCL_UNIQUE_ID_BYTES {
            return Err(Error::protocol(format!(
                "NCCL unique id has {} bytes, expected {}",
                b.len(),
                sys::NCCL_UNIQUE_ID_BYTES
            )));
        }
        let mut id = sys::ncclUniqueId {
            internal: [0; sys::NCCL_UNIQUE_ID_BYTES],
        };
        for (d, s) in id.internal.iter_mut().zip(b) {
            *d = *s as _;
        }
        Ok(UniqueId(id))
    }
}

/// A raw communicator handle that may cross threads (NCCL handles are plain pointers; the
/// communicator is used by one thread at a time, which `Comm: !Sync` and `&mut` ensure).
#[derive(Clone, Copy)]
struct RawComm(sys::ncclComm_t);
// SAFETY: an ncclComm_t is an opaque pointer NCCL lets any thread use, one at a time.
unsafe impl Send for RawComm {}

/// Default deadline of [`Comm`]'s abort on drop (vLLM joins its abort thread for 5 s).
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// An NCCL communicator. `Send`, not `Sync`: callers serialise use (dist-cuda holds it in a
/// `Mutex`). Dropping it aborts it on a helper thread joined with a deadline, since
/// `ncclCommAbort` can block until CUDA graphs that captured the communicator are destroyed;
/// a stuck abort is logged and left behind, never a panic or a hang.
pub struct Comm {
    lib: &'static Library,
    raw: Option<RawComm>,
    rank: usize,
    world: usize,
    abort_timeout: Duration,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("live", &self.raw.is_some())
            .field("library", &self.lib.path)
            .finish()
    }
}

fn count_arg(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} does not fit NCCL's int")))
}

impl Comm {
    /// `ncclCommInitRank` on a helper thread joined with `timeout`. `prepare` runs first on that
    /// thread (make the device current there: NCCL uses the calling thread's device).
    ///
    /// On timeout the helper thread is left running (NCCL offers no way to cancel a blocking
    /// init) and the error names the op and the time waited; the communicator it may still
    /// create is aborted when it appears.
    pub fn init_rank<F>(
        lib: &'static Library,
        world: usize,
        id: UniqueId,
        rank: usize,
        timeout: Duration,
        prepare: F,
    ) -> Result<Comm>
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        crate::ensure_rank(rank, world, "ncclCommInitRank rank")?;
        let nranks = count_arg(world, "world size")?;
        let r = count_arg(rank, "rank")?;
        let (tx, rx) = mpsc::channel::<Result<RawComm>>();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let res = prepare().and_then(|()| {
                    // SAFETY: prepare made the device current on this thread.
                    unsafe { result::comm_init_rank(lib, nranks, id.0, r) }.map(RawComm)
                });
                if let Err(mpsc::SendError(Ok(late))) = tx.send(res) {
                    // The caller gave up: do not leak a live communicator.
                    // SAFETY: `late` was just created and is used by no one else.
                    let _ = unsafe { result::comm_abort(lib, late.0) };
                }
            })
            .map_err(|e| Error::io("spawning the NCCL init thread", e))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(raw)) => Ok(Comm {
                lib,
                raw: Some(raw),
                rank,
                world,
                abort_timeout: ABORT_TIMEOUT,
            }),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::timeout(
                format!("ncclCommInitRank (rank {rank} of {world})"),
                timeout,
                "not every rank joined the communicator",
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::Shutdown("the NCCL init thread died".into()))
            }
        }
    }

    /// The library this communicator uses.
    pub fn library(&self) -> &'static Library {
        self.lib
    }
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// How long drop/abort waits for `ncclCommAbort`.
    pub fn set_abort_timeout(&mut self, t: Duration) {
        self.abort_timeout = t;
    }

    fn raw(&self) -> Result<sys::ncclComm_t> {
        self.raw
            .map(|r| r.0)
            .ok_or_else(|| Error::NotInitialized("the NCCL communicator was aborted".into()))
    }

    /// The raw communicator and rank `r` as NCCL takes it, once `r` (a root or a peer, `what`)
    /// is checked to be in range.
    fn raw_with_rank(&self, r: usize, what: &str) -> Result<(sys::ncclComm_t, c_int)> {
        crate::ensure_rank(r, self.world, what)?;
        Ok((self.raw()?, r as c_int))
    }

    /// `ncclAllReduce` of `count` elements.
    ///
    /// # Safety
    /// `send`/`recv` are device buffers of `count` elements of `dt` on this communicator's
    /// device that stay alive until the work enqueued on `stream` has run.
    pub unsafe fn all_reduce(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: sys::ncclDataType_t,
        op: sys::ncclRedOp_t,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let c = self.raw()?;
        // SAFETY: forwarded contract.
        unsafe { result::all_reduce(self.lib, send, recv, count, dt, op, c, stream) }
    }

    /// `ncclReduce` to `root`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: sys::ncclDataType_t,
        op: sys::ncclRedOp_t,
        root: usize,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let (c, root) = self.raw_with_rank(root, "reduce root")?;
        // SAFETY: forwarded contract.
        unsafe { result::reduce(self.lib, send, recv, count, dt, op, root, c, stream) }
    }

    /// `ncclAllGather` of `send_count` elements per rank into `recv` (rank-major).
    ///
    /// # Safety
    /// As [`Comm::all_reduce`]; `recv` has `world * send_count` elements.
    pub unsafe fn all_gather(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        send_count: usize,
        dt: sys::ncclDataType_t,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let c = self.raw()?;
        // SAFETY: forwarded contract.
        unsafe { result::all_gather(self.lib, send, recv, send_count, dt, c, stream) }
    }

    /// `ncclReduceScatter` with `recv_count` elements per rank.
    ///
    /// # Safety
    /// As [`Comm::all_reduce`]; `send` has `world * recv_count` elements.
    pub unsafe fn reduce_scatter(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        recv_count: usize,
        dt: sys::ncclDataType_t,
        op: sys::ncclRedOp_t,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let c = self.raw()?;
        // SAFETY: forwarded contract.
        unsafe { result::reduce_scatter(self.lib, send, recv, recv_count, dt, op, c, stream) }
    }

    /// `ncclBroadcast` from `root`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce`]; `send` may be null on ranks other than `root`.
    pub unsafe fn broadcast(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: sys::ncclDataType_t,
        root: usize,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let (c, root) = self.raw_with_rank(root, "broadcast root")?;
        // SAFETY: forwarded contract.
        unsafe { result::broadcast(self.lib, send, recv, count, dt, root, c, stream) }
    }

    /// `ncclSend` to `peer`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce`].
    pub unsafe fn send(
        &mut self,
        buf: *const c_void,
        count: usize,
        dt: sys::ncclDataType_t,
        peer: usize,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let (c, peer) = self.raw_with_rank(peer, "send peer")?;
        // SAFETY: forwarded contract.
        unsafe { result::send(self.lib, buf, count, dt, peer, c, stream) }
    }

    /// `ncclRecv` from `peer`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce`].
    pub unsafe fn recv(
        &mut self,
        buf: *mut c_void,
        count: usize,
        dt: sys::ncclDataType_t,
        peer: usize,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let (c, peer) = self.raw_with_rank(peer, "recv peer")?;
        // SAFETY: forwarded contract.
        unsafe { result::recv(self.lib, buf, count, dt, peer, c, stream) }
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`; the group is closed even when `f` fails.
    pub fn group<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.raw()?;
        result::group_start(self.lib)?;
        let r = f(self);
        let end = result::group_end(self.lib);
        let v = r?;
        end?;
        Ok(v)
    }

    /// The communicator's asynchronous error, where the library reports one
    /// (`ncclCommGetAsyncError`); `Ok(())` when none or unsupported.
    pub fn check_async_error(&self) -> Result<()> {
        let c = self.raw()?;
        // SAFETY: live communicator.
        match unsafe { result::comm_get_async_error(self.lib, c) }? {
            Some(st) if st != sys::ncclSuccess && st != sys::ncclInProgress => {
                result::check(self.lib, st, "asynchronous NCCL error")
            }
            _ => Ok(()),
        }
    }

    /// Aborts the communicator (idempotent). Waits at most the abort timeout; a stuck abort is
    /// reported as [`Error::Timeout`] and left to finish on its helper thread.
    pub fn abort(&mut self) -> Result<()> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        let lib = self.lib;
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name(format!("nccl-abort-{}", self.rank))
            .spawn(move || {
                let raw = raw;
                // SAFETY: `raw` was taken out of the Comm, so nothing uses it after this call.
                let r = unsafe { result::comm_abort(lib, raw.0) };
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            return Err(Error::io("spawning the NCCL abort thread", e));
        }
        match rx.recv_timeout(self.abort_timeout) {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(
                format!("ncclCommAbort (rank {} of {})", self.rank, self.world),
                started.elapsed(),
                "abort blocked (a CUDA graph that captured this communicator may still be alive); left running",
            )),
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Err(e) = self.abort() {
            tracing::warn!(rank = self.rank, "dropping NCCL communicator: {e}");
        }
    }
}
