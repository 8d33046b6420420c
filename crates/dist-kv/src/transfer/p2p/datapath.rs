//! The data path of the P2P connector: how tensor bytes move once the control channel agreed.
//!
//! vLLM moves them with `ncclSend`/`ncclRecv` on a 2-rank communicator per remote address, whose
//! unique id travels in the control channel's `NEW` message. This trait is that seam: a
//! [`DataPath`] makes one [`DataLink`] per peer connection (the initiator's
//! [`DataPath::link_init`] bytes go in the `Hello` frame, so an NCCL path would put its unique id
//! there and call `ncclCommInitRank` in [`DataPath::open`]), and the link moves one tensor's bytes
//! after a `PutReply::Ready` or a `GetReply`.
//!
//! [`TcpDataPath`] is the CPU path: the bytes follow the control frame on the same TCP stream.
//! An NCCL path (with device tensors instead of host bytes) is not written yet; it would
//! implement these two traits in the CUDA backend crate.

use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

use crate::transfer::error::{Error, Result};

use super::wire::read_full;

/// Makes the per-peer links of one engine.
pub trait DataPath: Send + Sync + std::fmt::Debug + 'static {
    /// A short name, exchanged at the handshake; both ends must use the same path.
    fn name(&self) -> &'static str;
    /// The initiator's set-up bytes for a new link to `peer` (sent in `Hello`).
    fn link_init(&self, peer: &str) -> Result<Vec<u8>>;
    /// Opens the link to `peer`; `init` is the initiator's [`Self::link_init`] bytes.
    fn open(&self, peer: &str, initiator: bool, init: &[u8]) -> Result<Box<dyn DataLink>>;
}

/// One peer's link: moves the bytes of one tensor at a time. The control stream is passed in:
/// the TCP path writes and reads the data there, a device path ignores it.
pub trait DataLink: Send + Sync + std::fmt::Debug {
    /// Sends `data`; the caller holds the stream's writer so nothing interleaves.
    fn send(&self, stream: &mut TcpStream, data: &[u8], deadline: Instant) -> Result<()>;
    /// Receives exactly `out.len()` bytes.
    fn recv(&self, stream: &mut TcpStream, out: &mut [u8], deadline: Instant) -> Result<()>;
}

/// The CPU data path: tensor bytes on the control TCP stream, right after their frame.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDataPath;

#[derive(Debug)]
struct TcpLink;

impl DataPath for TcpDataPath {
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn link_init(&self, _peer: &str) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn open(&self, _peer: &str, _initiator: bool, init: &[u8]) -> Result<Box<dyn DataLink>> {
        if !init.is_empty() {
            return Err(Error::Protocol(format!(
                "tcp data path takes no link set-up bytes, got {}",
                init.len()
            )));
        }
        Ok(Box::new(TcpLink))
    }
}

impl DataLink for TcpLink {
    fn send(&self, stream: &mut TcpStream, data: &[u8], _deadline: Instant) -> Result<()> {
        // The stream's write timeout bounds each write; a peer that stops reading fails it.
        stream
            .write_all(data)
            .and_then(|_| stream.flush())
            .map_err(|e| Error::io(format!("tcp data path: send {} bytes", data.len()), e))
    }
    fn recv(&self, stream: &mut TcpStream, out: &mut [u8], deadline: Instant) -> Result<()> {
        let n = out.len();
        read_full(
            stream,
            out,
            false,
            deadline,
            &format!("tcp data path: recv {n} bytes"),
        )?;
        Ok(())
    }
}
