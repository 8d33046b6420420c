//! The data path of the P2P connector: how tensor bytes move once the control channel agreed.
//!
//! vLLM moves them with `ncclSend`/`ncclRecv` on a 2-rank communicator per remote address, whose
//! unique id travels in the control channel's `NEW` message. This trait is that seam: a
//! [`DataPath`] makes one [`DataLink`] per peer connection (the initiator's
//! [`DataPath::link_init`] bytes go in the `Hello` frame, so the NCCL path puts its unique id
//! there and calls `ncclCommInitRank` in [`DataPath::open`]), allocates receive buffers, and the
//! link moves one tensor at a time after a `PutReply::Ready` or a `GetReply`.
//!
//! Paths, by buffer type:
//! * [`TcpDataPath`] (host tensors): the bytes follow the control frame on the same TCP stream.
//! * `transfer::cuda::NcclDataPath` (device tensors, `cuda` feature): `ncclSend`/`ncclRecv` on a
//!   2-rank communicator per connection, as vLLM; across GPUs and nodes.
//! * `transfer::cuda::CudaIpcDataPath` (device tensors, `cuda` feature): the receiver copies
//!   straight out of the sender's device memory through CUDA IPC; one host, any GPUs of it
//!   (including one GPU shared by both instances, which NCCL refuses).
//!
//! A path whose receiver reads the sender's memory ([`DataPath::lends_memory`]) makes the engine
//! keep the sent tensor until the receiver's `PutReply::Stored` or `GetDone` frame.
//!
//! A path that can count a receive's bytes as they arrive ([`DataLink::recv_counted`]: the TCP
//! path) lets the engine tell a stalled sender from a slow one: when another peer's PUT waits
//! for room, a reservation whose data does not arrive at a minimum rate gives way.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use dist_core::{DType, HostTensor, Tensor};

use crate::transfer::error::{Error, Result};

use super::wire::read_full_counted;

/// How far one receive has got, for a link that counts its bytes (the engine reads it from
/// another thread).
#[derive(Debug, Default)]
pub struct RecvProgress {
    counted: AtomicBool,
    bytes: AtomicU64,
}

impl RecvProgress {
    /// Marks the receive as counted (called when it starts, before any byte).
    pub fn start(&self) {
        self.counted.store(true, Ordering::Release);
    }
    /// Adds `n` bytes that arrived.
    pub fn add(&self, n: usize) {
        self.counted.store(true, Ordering::Release);
        self.bytes.fetch_add(n as u64, Ordering::AcqRel);
    }
    /// The bytes arrived so far, or `None` for a link that does not count them.
    pub fn bytes(&self) -> Option<u64> {
        self.counted
            .load(Ordering::Acquire)
            .then(|| self.bytes.load(Ordering::Acquire))
    }
}

/// Makes the per-peer links of one engine.
pub trait DataPath: Send + Sync + std::fmt::Debug + 'static {
    /// The tensors it moves (host or device memory); the connector's cache gathers into them.
    /// `Clone` is used only by paths that lend memory, to keep a sent tensor (for device
    /// tensors a reference-count increment).
    type Buffer: Tensor + Clone + 'static;
    /// One peer's link.
    type Link: DataLink<Self::Buffer>;

    /// A short name, exchanged at the handshake; both ends must use the same path.
    fn name(&self) -> &'static str;
    /// The initiator's set-up bytes for a new link to `peer` (sent in `Hello`).
    fn link_init(&self, peer: &str) -> Result<Vec<u8>>;
    /// Opens the link to `peer`; `init` is the initiator's [`Self::link_init`] bytes. The
    /// acceptor calls it after answering the handshake, the initiator after reading the answer,
    /// so a collective set-up (NCCL's) finds both ends inside it.
    fn open(&self, peer: &str, initiator: bool, init: &[u8]) -> Result<Self::Link>;
    /// A receive buffer of `dtype` and `shape` (its size is checked against the receive buffer
    /// cap before this is called).
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Self::Buffer>;
    /// True when the receiver reads the sender's memory during [`DataLink::recv`]: the sender
    /// then keeps the tensor until the receiver acknowledges it.
    fn lends_memory(&self) -> bool {
        false
    }
}

/// One peer's link: moves one tensor at a time. The control stream is passed in: the TCP path
/// writes and reads the data there, a device path may put a small descriptor there or ignore it.
pub trait DataLink<B>: Send + Sync + std::fmt::Debug {
    /// Sends `data`; the caller holds the stream's writer so nothing interleaves.
    fn send(&self, stream: &mut TcpStream, data: &B, deadline: Instant) -> Result<()>;
    /// Receives into `out`, whose dtype and shape the control frame announced.
    fn recv(&self, stream: &mut TcpStream, out: &mut B, deadline: Instant) -> Result<()>;
    /// [`recv`](Self::recv), counting the bytes in `progress` as they arrive. A link that
    /// cannot count leaves `progress` untouched (the default): its receives are bounded by
    /// their deadline only.
    fn recv_counted(
        &self,
        stream: &mut TcpStream,
        out: &mut B,
        deadline: Instant,
        progress: &RecvProgress,
    ) -> Result<()> {
        let _ = progress;
        self.recv(stream, out, deadline)
    }
}

/// The CPU data path: tensor bytes on the control TCP stream, right after their frame.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDataPath;

/// The link of [`TcpDataPath`] (stateless).
#[derive(Debug)]
pub struct TcpLink;

impl DataPath for TcpDataPath {
    type Buffer = HostTensor;
    type Link = TcpLink;

    fn name(&self) -> &'static str {
        "tcp"
    }
    fn link_init(&self, _peer: &str) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn open(&self, _peer: &str, _initiator: bool, init: &[u8]) -> Result<TcpLink> {
        if !init.is_empty() {
            return Err(Error::Protocol(format!(
                "tcp data path takes no link set-up bytes, got {}",
                init.len()
            )));
        }
        Ok(TcpLink)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<HostTensor> {
        Ok(HostTensor::zeros(dtype, shape))
    }
}

impl DataLink<HostTensor> for TcpLink {
    fn send(&self, stream: &mut TcpStream, data: &HostTensor, _deadline: Instant) -> Result<()> {
        let data = data.as_bytes();
        // The stream's write timeout bounds each write; a peer that stops reading fails it.
        stream
            .write_all(data)
            .and_then(|_| stream.flush())
            .map_err(|e| Error::io(format!("tcp data path: send {} bytes", data.len()), e))
    }
    fn recv(&self, stream: &mut TcpStream, out: &mut HostTensor, deadline: Instant) -> Result<()> {
        self.recv_counted(stream, out, deadline, &RecvProgress::default())
    }
    fn recv_counted(
        &self,
        stream: &mut TcpStream,
        out: &mut HostTensor,
        deadline: Instant,
        progress: &RecvProgress,
    ) -> Result<()> {
        let out = out.as_bytes_mut();
        let n = out.len();
        progress.start();
        read_full_counted(
            stream,
            out,
            false,
            deadline,
            &format!("tcp data path: recv {n} bytes"),
            Some(progress),
        )?;
        Ok(())
    }
}
