//! [`NcclPair`]: a two-rank NCCL link for point-to-point transfers between two processes
//! (vLLM's `P2pNcclEngine` keeps one such communicator per remote address), on any runtime.
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dist_core::{Error, Result, Tensor};

use crate::runtime::{wait_stream, GpuRuntime, RawStream};
use crate::{library, sys, Comm, GpuTensor, UniqueId};

/// A two-rank NCCL communicator; see the module docs.
pub struct NcclPair<R: GpuRuntime> {
    comm: Mutex<Option<Comm>>,
    dev: Arc<R>,
    stream: RawStream,
    rank: usize,
}

impl<R: GpuRuntime> std::fmt::Debug for NcclPair<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclPair")
            .field("rank", &self.rank)
            .field(
                "device",
                &format_args!("{}:{}", R::NAME, self.dev.ordinal()),
            )
            .field("live", &self.is_live())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<R: GpuRuntime> NcclPair<R> {
    /// Loads the library (once per process), so a missing one shows before the first link.
    pub fn load_library() -> Result<()> {
        library(R::FLAVOR).map(|_| ())
    }

    /// A fresh unique id (128 bytes) from the loaded library. NCCL starts a bootstrap listener
    /// for it: make one only for a link about to be set up.
    pub fn unique_id() -> Result<Vec<u8>> {
        Ok(UniqueId::new(library(R::FLAVOR)?)?.to_bytes())
    }

    /// Joins the pair `id` names as `rank` (0 or 1) on `dev`; both sides must call it within
    /// `timeout`.
    pub fn connect(dev: &Arc<R>, id: &[u8], rank: usize, timeout: Duration) -> Result<Self> {
        if rank > 1 {
            return Err(Error::invalid(format!(
                "NCCL pair rank {rank}: must be 0 or 1"
            )));
        }
        let lib = library(R::FLAVOR)?;
        let id = UniqueId::from_bytes(id)?;
        let stream = dev.create_stream()?;
        let d2 = dev.clone();
        let comm = match Comm::init_rank(lib, 2, id, rank, timeout, move || d2.bind()) {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: the stream was just made and nothing used it.
                let _ = unsafe { dev.destroy_stream(stream) };
                return Err(e);
            }
        };
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
    pub fn send(&self, t: &GpuTensor<R>, timeout: Duration) -> Result<()> {
        let (n, p, peer) = (t.nbytes(), t.ptr(), 1 - self.rank);
        // SAFETY: t holds n bytes and outlives the wait in `transfer`.
        self.transfer("ncclSend", n, timeout, |c, s| unsafe {
            c.send(p as usize as *const c_void, n, sys::ncclUint8, peer, s)
        })
    }

    /// Receives exactly `t.nbytes()` bytes from the other rank into `t`, waiting at most
    /// `timeout`.
    pub fn recv(&self, t: &mut GpuTensor<R>, timeout: Duration) -> Result<()> {
        let (n, p, peer) = (t.nbytes(), t.ptr(), 1 - self.rank);
        // SAFETY: t holds n bytes and is borrowed mutably until the wait in `transfer` ends.
        self.transfer("ncclRecv", n, timeout, |c, s| unsafe {
            c.recv(p as usize as *mut c_void, n, sys::ncclUint8, peer, s)
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
        let r = f(comm, self.stream.as_raw()).and_then(|()| {
            let c: &Comm = comm;
            // SAFETY: the pair's own stream, alive until drop; bound above.
            unsafe {
                wait_stream(&*self.dev, self.stream, &what, timeout, || {
                    c.check_async_error()
                })
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
            Error::Timeout { waited, detail, .. } => Error::Timeout {
                op: what.clone(),
                waited,
                missing_ranks: vec![1 - self.rank],
                detail,
            },
            e => e,
        })
    }
}

impl<R: GpuRuntime> Drop for NcclPair<R> {
    fn drop(&mut self) {
        // The communicator first (its abort drains what it enqueued), then the stream.
        drop(lock(&self.comm).take());
        let _ = self.dev.bind();
        // SAFETY: the stream was made by this pair and is destroyed once; no work of ours is
        // left on it after the abort above.
        if let Err(e) = unsafe { self.dev.destroy_stream(self.stream) } {
            tracing::warn!("destroying the NCCL pair's stream: {e}");
        }
    }
}
