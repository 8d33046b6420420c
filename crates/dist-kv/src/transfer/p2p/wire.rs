//! The typed control channel of the P2P connector: length-prefixed postcard frames.
//!
//! vLLM's engine speaks msgpack dicts over ZeroMQ (`{"cmd": "PUT", "tensor_id", "shape", "dtype"}`
//! and so on). Here each message is a variant of [`Frame`], encoded with postcard behind a
//! 4-byte little-endian length; a length above [`MAX_FRAME_BYTES`] or bytes that do not decode
//! as a frame end the connection with an error, before anything is allocated for them. Until a
//! connection's handshake is done its frames are capped far lower ([`MAX_HELLO_BYTES`]). Tensor
//! data never goes in a frame: it follows a `PutReply::Ready` or a `GetReply` on the data path.
//!
//! A connection starts with `Hello` (initiator), `HelloAck` (acceptor) and, when the engines
//! share a secret, `Auth` (initiator): the challenge-response of [`super::auth`].

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::datapath::RecvProgress;

use dist_core::DType;
use serde::{Deserialize, Serialize};

use crate::transfer::error::{Error, Result};

/// Version of the control protocol; peers with another version are refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest control frame (64 KiB): a tensor id, a shape, a reason.
pub const MAX_FRAME_BYTES: usize = 64 << 10;
/// Largest frame before the handshake is done (`Hello`, `Auth`).
pub const MAX_HELLO_BYTES: usize = 8 << 10;
/// Longest tensor id (`{request_id}#{layer_name}`).
pub const MAX_TENSOR_ID: usize = 4096;
/// Longest listening address in a handshake.
pub const MAX_ADDR: usize = 256;
/// Longest data-path set-up bytes in a `Hello` (an NCCL unique id is 128).
pub const MAX_LINK_INIT: usize = 4096;
/// Longest reason carried in a `Refused` or an `Abort`; longer ones are cut when sent.
pub const MAX_REASON: usize = 1024;

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
        /// A fresh nonce ([`super::auth::NONCE_BYTES`]).
        nonce: Vec<u8>,
        /// True when the initiator holds a shared secret (and will prove it).
        auth: bool,
    },
    /// The accepting side's answer.
    HelloAck {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The acceptor's listening address.
        listen_addr: String,
        /// Name of its data path.
        data_path: String,
        /// True when the acceptor holds a shared secret (and requires one).
        auth: bool,
        /// The acceptor's fresh nonce.
        nonce: Vec<u8>,
        /// With `auth`, the acceptor's proof over the `Hello` and its nonce; empty otherwise.
        proof: Vec<u8>,
    },
    /// The initiator's proof over its `Hello` and the acceptor's nonce (with a shared secret).
    Auth {
        /// The proof.
        proof: Vec<u8>,
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

impl Frame {
    /// The frame's name, for messages (never its contents, which a peer chooses).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::HelloAck { .. } => "HelloAck",
            Frame::Auth { .. } => "Auth",
            Frame::Put { .. } => "Put",
            Frame::PutReply { .. } => "PutReply",
            Frame::Get { .. } => "Get",
            Frame::GetReply { .. } => "GetReply",
            Frame::GetDone { .. } => "GetDone",
            Frame::Loaded { .. } => "Loaded",
            Frame::Abort { .. } => "Abort",
        }
    }
}

/// The length-prefixed bytes of one frame.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>> {
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
    Ok(buf)
}

/// Writes bytes from [`encode_frame`].
pub fn write_encoded(w: &mut impl Write, buf: &[u8]) -> Result<()> {
    w.write_all(buf)
        .and_then(|_| w.flush())
        .map_err(|e| Error::io("write control frame", e))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<()> {
    write_encoded(w, &encode_frame(frame)?)
}

/// `s` cut to at most `max` bytes (at a character boundary), for reasons sent to a peer.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Decodes one frame body (bounded, no trailing bytes).
pub fn decode_frame(body: &[u8]) -> Result<Frame> {
    let f: Frame = dist_core::decode_obj(body, MAX_FRAME_BYTES)?;
    let too_long = |what: &str, n: usize, max: usize| {
        Err(Error::Protocol(format!(
            "{what} of {n} bytes exceeds {max}"
        )))
    };
    match &f {
        Frame::Put { tensor_id, .. } | Frame::Get { tensor_id, .. }
            if tensor_id.len() > MAX_TENSOR_ID =>
        {
            too_long("tensor id", tensor_id.len(), MAX_TENSOR_ID)
        }
        Frame::Hello { listen_addr, .. } | Frame::HelloAck { listen_addr, .. }
            if listen_addr.len() > MAX_ADDR =>
        {
            too_long("listening address", listen_addr.len(), MAX_ADDR)
        }
        Frame::Hello { link_init, .. } if link_init.len() > MAX_LINK_INIT => {
            too_long("link set-up", link_init.len(), MAX_LINK_INIT)
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
    read_full_counted(s, buf, idle_ok, deadline, what, None)
}

/// [`read_full`] that adds each chunk's bytes to `progress` as it arrives.
pub fn read_full_counted(
    s: &mut TcpStream,
    buf: &mut [u8],
    idle_ok: bool,
    deadline: Instant,
    what: &str,
    progress: Option<&RecvProgress>,
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
            Ok(n) => {
                got += n;
                if let Some(p) = progress {
                    p.add(n);
                }
            }
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

/// One read of a frame.
#[derive(Debug)]
pub(crate) enum FrameRead {
    /// A frame and its body's bytes (the handshake's proofs cover them).
    Frame(Frame, Vec<u8>),
    /// Nothing arrived before the socket's read timeout.
    Idle,
    /// The peer closed the connection cleanly between frames.
    Closed,
}

/// Reads one frame of at most `max` bytes. Once its first byte arrived the whole frame must
/// arrive by `deadline` (a peer that trickles a frame is cut off there).
pub(crate) fn read_frame(s: &mut TcpStream, deadline: Instant, max: usize) -> Result<FrameRead> {
    let mut len = [0u8; 4];
    match read_full(s, &mut len, true, deadline, "read control frame length")? {
        ReadOutcome::Done => {}
        ReadOutcome::Idle => return Ok(FrameRead::Idle),
        ReadOutcome::Closed => return Ok(FrameRead::Closed),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > max {
        return Err(Error::Protocol(format!(
            "control frame length {n} exceeds {max}"
        )));
    }
    let mut body = vec![0u8; n];
    read_full(s, &mut body, false, deadline, "read control frame body")?;
    let f = decode_frame(&body)?;
    Ok(FrameRead::Frame(f, body))
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
                nonce: vec![7; 32],
                auth: true,
            },
            Frame::Auth { proof: vec![9; 32] },
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
        let long_addr = Frame::HelloAck {
            version: PROTOCOL_VERSION,
            listen_addr: "h".repeat(MAX_ADDR + 1),
            data_path: "tcp".into(),
            auth: false,
            nonce: vec![],
            proof: vec![],
        };
        assert!(decode_frame(&encode_frame(&long_addr).unwrap()[4..]).is_err());
        assert_eq!(cut("abcdef", 3), "abc...");
        assert_eq!(cut("ééé", 3), "é...");
        assert_eq!(cut("ab", 3), "ab");
    }
}
