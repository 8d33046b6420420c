//! The typed control channel of the P2P connector: length-prefixed postcard frames.
//!
//! vLLM's engine speaks msgpack dicts over ZeroMQ (`{"cmd": "PUT", "tensor_id", "shape", "dtype"}`
//! and so on). Here each message is a variant of [`Frame`], encoded with postcard behind a
//! 4-byte little-endian length; a length above [`MAX_FRAME_BYTES`] or bytes that do not decode
//! as a frame end the connection with an error, before anything is allocated for them. Tensor
//! data never goes in a frame: it follows a `PutReply::Ready` or a `GetReply` on the data path.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use dist_core::DType;
use serde::{Deserialize, Serialize};

use crate::transfer::error::{Error, Result};

/// Version of the control protocol; peers with another version are refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest control frame (1 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Longest tensor id (`{request_id}#{layer_name}`).
pub const MAX_TENSOR_ID: usize = 4096;

/// Header of a tensor that follows on the data path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHeader {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorHeader {
    /// Bytes of the tensor, or `None` on overflow.
    pub fn nbytes(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |a, &d| a.checked_mul(d))
    }
}

/// The receiver's answer to a PUT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutStatus {
    /// Buffer reserved: the data follows.
    Ready,
    /// The tensor will not be taken (too large, buffer full past the deadline, shutting down).
    Refused(String),
    /// Sent after the data when the data path lends the sender's memory (CUDA IPC): the
    /// receiver has its copy, the sender may free the tensor.
    Stored,
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of the connecting side.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The sender's listening address (`ip:port`), its name for the peer.
        listen_addr: String,
        /// Name of the data path (`"tcp"`), which must match.
        data_path: String,
        /// Bytes the data path needs to set up its link (an NCCL unique id); empty for TCP.
        link_init: Vec<u8>,
    },
    /// The accepting side's answer.
    HelloAck {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The acceptor's listening address.
        listen_addr: String,
        /// Name of its data path.
        data_path: String,
    },
    /// A producer offers a tensor (vLLM's `PUT`).
    Put {
        /// Correlates the reply.
        seq: u64,
        /// `{request_id}#{layer_name}`.
        tensor_id: String,
        /// What will follow.
        header: TensorHeader,
    },
    /// The answer to [`Frame::Put`].
    PutReply {
        /// The PUT's `seq`.
        seq: u64,
        /// Ready (data follows from the producer) or refused.
        status: PutStatus,
    },
    /// A consumer asks for a tensor (vLLM's `GET`).
    Get {
        /// Correlates the reply.
        seq: u64,
        /// `{request_id}#{layer_name}`.
        tensor_id: String,
    },
    /// The answer to [`Frame::Get`]: the data follows when `header` is `Some`.
    GetReply {
        /// The GET's `seq`.
        seq: u64,
        /// The tensor's header, or `None` when the producer does not hold it (yet).
        header: Option<TensorHeader>,
    },
    /// The consumer has copied a GET's tensor out of the producer's memory (data paths that lend
    /// memory only): the producer frees it.
    GetDone {
        /// The GET's `seq`.
        seq: u64,
    },
    /// The consumer has injected every layer of a request: the producer frees what it holds.
    Loaded {
        /// The request id.
        request_id: String,
    },
    /// The consumer gave up on a request: the producer fails it and frees what it holds.
    Abort {
        /// The request id.
        request_id: String,
        /// Why.
        reason: String,
    },
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<()> {
    let body = dist_core::encode_obj(frame)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(Error::invalid(format!(
            "control frame of {} bytes exceeds {MAX_FRAME_BYTES}",
            body.len()
        )));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
        .and_then(|_| w.flush())
        .map_err(|e| Error::io("write control frame", e))
}

/// Decodes one frame body (bounded, no trailing bytes).
pub fn decode_frame(body: &[u8]) -> Result<Frame> {
    let f: Frame = dist_core::decode_obj(body, MAX_FRAME_BYTES)?;
    match &f {
        Frame::Put { tensor_id, .. } | Frame::Get { tensor_id, .. }
            if tensor_id.len() > MAX_TENSOR_ID =>
        {
            Err(Error::Protocol(format!(
                "tensor id of {} bytes exceeds {MAX_TENSOR_ID}",
                tensor_id.len()
            )))
        }
        _ => Ok(f),
    }
}

/// Outcome of a read that may be idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The buffer is full.
    Done,
    /// Nothing arrived before the socket's read timeout (only when idle was allowed).
    Idle,
    /// The peer closed the connection cleanly before the first byte.
    Closed,
}

/// Fills `buf` from a stream whose read timeout is short. With `idle_ok`, a timeout before the
/// first byte returns [`ReadOutcome::Idle`]; after that, stalls count against `deadline`.
pub fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    idle_ok: bool,
    deadline: Instant,
    what: &str,
) -> Result<ReadOutcome> {
    let mut got = 0;
    let start = Instant::now();
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 && idle_ok => return Ok(ReadOutcome::Closed),
            Ok(0) => {
                return Err(Error::io(
                    format!(
                        "{what}: connection closed after {got} of {} bytes",
                        buf.len()
                    ),
                    ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if got == 0 && idle_ok {
                    return Ok(ReadOutcome::Idle);
                }
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        op: what.to_string(),
                        waited: start.elapsed(),
                        peer: s.peer_addr().ok().map(|a| a.to_string()),
                        detail: format!("{got} of {} bytes arrived", buf.len()),
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what.to_string(), e)),
        }
    }
    Ok(ReadOutcome::Done)
}

/// Reads one frame. `Ok(None)` when idle (nothing arrived before the read timeout) or closed
/// cleanly (`closed` set).
pub(crate) fn read_frame(
    s: &mut TcpStream,
    idle_ok: bool,
    deadline: Instant,
    closed: &mut bool,
) -> Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match read_full(s, &mut len, idle_ok, deadline, "read control frame length")? {
        ReadOutcome::Done => {}
        ReadOutcome::Idle => return Ok(None),
        ReadOutcome::Closed => {
            *closed = true;
            return Ok(None);
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME_BYTES {
        return Err(Error::Protocol(format!(
            "control frame length {n} exceeds {MAX_FRAME_BYTES}"
        )));
    }
    let mut body = vec![0u8; n];
    // The body of a frame whose length arrived must follow promptly.
    read_full(s, &mut body, false, deadline, "read control frame body")?;
    decode_frame(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_hostile_bytes_are_errors() {
        let frames = vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                listen_addr: "127.0.0.1:14579".into(),
                data_path: "tcp".into(),
                link_init: vec![1, 2, 3],
            },
            Frame::Put {
                seq: 7,
                tensor_id: "cmpl-1___decode_addr_10.0.0.2:21001_x#model.layers.0".into(),
                header: TensorHeader {
                    dtype: DType::BF16,
                    shape: vec![2, 3, 16, 8, 128],
                },
            },
            Frame::PutReply {
                seq: 7,
                status: PutStatus::Refused("full".into()),
            },
            Frame::GetReply {
                seq: 9,
                header: None,
            },
            Frame::Loaded {
                request_id: "r".into(),
            },
        ];
        for f in frames {
            let mut buf = Vec::new();
            write_frame(&mut buf, &f).unwrap();
            assert_eq!(decode_frame(&buf[4..]).unwrap(), f);
            // Every truncation is an error, never a panic.
            for cut in 0..buf.len() - 4 {
                assert!(decode_frame(&buf[4..4 + cut]).is_err());
            }
        }
        let long = Frame::Get {
            seq: 1,
            tensor_id: "x".repeat(MAX_TENSOR_ID + 1),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &long).unwrap();
        assert!(decode_frame(&buf[4..]).is_err());
        let huge = TensorHeader {
            dtype: DType::F32,
            shape: vec![usize::MAX, 2],
        };
        assert_eq!(huge.nbytes(), None);
    }
}
