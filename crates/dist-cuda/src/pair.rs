//! A two-rank NCCL link for point-to-point transfers between two processes (vLLM's
//! `P2pNcclEngine` keeps one such communicator per remote address).
//!
//! One side makes the 128-byte unique id ([`NcclPair::unique_id`]) and hands it to the other
//! over its own channel; both call [`NcclPair::connect`] (rank 0 and rank 1), which returns
//! once NCCL's init finished on both or fails at the deadline. Transfers run on the pair's own
//! stream, so a receive that waits for its peer does not block the device's main stream, and
//! each call waits for its transfer with a deadline: on timeout or an asynchronous NCCL error
//! the communicator is aborted (the peer's matching call then fails too) and the pair is dead.
//! Data must be ready when `send` is called (the device's stream synchronised), and a received
//! tensor is complete when `recv` returns.
//!
//! NCCL refuses two ranks of one communicator on the same GPU ("invalid usage", duplicate
//! GPU): the pair needs two GPUs, on one host or two.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{result as cu, sys};
use dist_core::{Error, Result, Tensor};
use dist_nccl::{wait_stream, Comm, Flavor, RawStream, UniqueId};

use crate::driver::{cuda_err, DeviceContext};
use crate::CudaTensor;

/// The pair's own stream, destroyed on drop.
struct OwnedStream(sys::CUstream);
// SAFETY: a CUstream is a handle the driver lets any thread use.
unsafe impl Send for OwnedStream {}
// SAFETY: as above.
unsafe impl Sync for OwnedStream {}

/// A two-rank NCCL communicator; see the module docs.
pub struct NcclPair {
    comm: Mutex<Option<Comm>>,
    dev: Arc<DeviceContext>,
    stream: OwnedStream,
    rank: usize,
}

impl std::fmt::Debug for NcclPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclPair")
            .field("rank", &self.rank)
            .field("device", &self.dev.ordinal())
            .field("live", &self.is_live())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NcclPair {
    /// Loads NCCL (once per process), so a missing library shows before the first link.
    pub fn load_library() -> Result<()> {
        dist_nccl::library(Flavor::Nccl).map(|_| ())
    }

    /// A fresh unique id (128 bytes) from the loaded NCCL library. NCCL starts a bootstrap
    /// listener for it: make one only for a link about to be set up.
    pub fn unique_id() -> Result<Vec<u8>> {
        let lib = dist_nccl::library(Flavor::Nccl)?;
        Ok(UniqueId::new(lib)?.to_bytes())
    }

    /// Joins the pair `id` names as `rank` (0 or 1) on `dev`; both sides must call it within
    /// `timeout`.
    pub fn connect(
        dev: &Arc<DeviceContext>,
        id: &[u8],
        rank: usize,
        timeout: Duration,
    ) -> Result<NcclPair> {
        if rank > 1 {
            return Err(Error::invalid(format!(
                "NCCL pair rank {rank}: must be 0 or 1"
            )));
        }
        let lib = dist_nccl::library(Flavor::Nccl)?;
        let id = UniqueId::from_bytes(id)?;
        dev.bind()?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let stream = OwnedStream(stream);
        let d2 = dev.clone();
        let comm = Comm::init_rank(lib, 2, id, rank, timeout, move || d2.bind())?;
        Ok(NcclPair {
            comm: Mutex::new(Some(comm)),
            dev: dev.clone(),
            stream,
            rank,
        })
    }

    /// This side's rank (0 or 1).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// False once a transfer failed and the communicator was aborted.
    pub fn is_live(&self) -> bool {
        lock(&self.comm).is_some()
    }

    /// Sends `t`'s bytes to the other rank and waits (at most `timeout`) until they left.
    pub fn send(&self, t: &CudaTensor, timeout: Duration) -> Result<()> {
        let n = t.nbytes();
        // SAFETY: t holds n bytes and outlives the wait in `transfer`.
        self.transfer("ncclSend", n, timeout, |c, s| unsafe {
            c.send(
                t.ptr() as usize as *const c_void,
                n,
                dist_nccl::sys::ncclUint8,
                1 - self.rank,
                s,
            )
        })
    }

    /// Receives exactly `t.nbytes()` bytes from the other rank into `t`, waiting at most
    /// `timeout`.
    pub fn recv(&self, t: &mut CudaTensor, timeout: Duration) -> Result<()> {
        let n = t.nbytes();
        let p = t.ptr();
        // SAFETY: t holds n bytes and is borrowed mutably until the wait in `transfer` ends.
        self.transfer("ncclRecv", n, timeout, |c, s| unsafe {
            c.recv(
                p as usize as *mut c_void,
                n,
                dist_nccl::sys::ncclUint8,
                1 - self.rank,
                s,
            )
        })
    }

    fn transfer(
        &self,
        op: &str,
        bytes: usize,
        timeout: Duration,
        f: impl FnOnce(&mut Comm, *mut c_void) -> Result<()>,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let mut g = lock(&self.comm);
        let what = format!("NCCL pair rank {} {op} of {bytes} bytes", self.rank);
        let Some(comm) = g.as_mut() else {
            return Err(Error::NotInitialized(format!(
                "{what}: the pair was aborted by an earlier failure"
            )));
        };
        self.dev.bind()?;
        let r = f(comm, self.stream.0 as *mut c_void).and_then(|()| {
            let c: &Comm = comm;
            // SAFETY: the pair's own stream, alive until drop; bound above.
            unsafe {
                let s = RawStream::from_raw(self.stream.0 as *mut c_void);
                wait_stream(&*self.dev, s, &what, timeout, || c.check_async_error())
            }
        });
        if r.is_err() {
            // A transfer whose peer is gone never completes: abort, so the stream drains.
            if let Some(mut c) = g.take() {
                if let Err(e) = c.abort() {
                    tracing::warn!("{what}: abort: {e}");
                }
            }
        }
        r.map_err(|e| match e {
            Error::Timeout {
                op: _,
                waited,
                missing_ranks: _,
                detail,
            } => Error::Timeout {
                op: what.clone(),
                waited,
                missing_ranks: vec![1 - self.rank],
                detail,
            },
            e => e,
        })
    }
}

impl Drop for NcclPair {
    fn drop(&mut self) {
        // The communicator first (its abort drains what it enqueued), then the stream.
        drop(lock(&self.comm).take());
        let _ = self.dev.bind();
        // SAFETY: the stream was created by this pair and is destroyed once; no work of ours
        // is left on it after the abort above.
        if let Err(e) = unsafe { cu::stream::destroy(self.stream.0) } {
            tracing::warn!("cuStreamDestroy: {}", cuda_err("cuStreamDestroy", e));
        }
    }
}
