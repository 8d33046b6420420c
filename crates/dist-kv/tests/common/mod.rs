//! Shared by dist-kv's tests and `examples/kv_p2p_attacks.rs` (which includes this file as a
//! module): a hostile peer's side of the P2P wire, and a scheduler step of new prompts. Each
//! includer uses a part.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::time::Instant;

use dist_core::{DType, HostTensor};
use dist_kv::transfer::p2p::wire::{decode_frame, Frame, TensorHeader};
use dist_kv::transfer::p2p::P2pEngine;
use dist_kv::transfer::{BlockId, KvConnectorScheduler, Request, Result, SchedulerOutput};

/// Reads one frame, `None` on EOF, an error or the stream's read timeout.
pub fn read_one(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    decode_frame(&body).ok()
}

/// A PUT offer of a 1 GiB tensor that the liar never sends.
pub fn liar_offer(seq: u64, tensor_id: String) -> Frame {
    Frame::Put {
        seq,
        tensor_id,
        header: TensorHeader {
            dtype: DType::F32,
            shape: vec![1 << 28],
        },
    }
}

/// Round `i` of an impostor run: `prod` sends one small layer to `cons`, which receives it
/// before `deadline`. Returns the request id and the address the layer came from.
pub fn small_round(
    prod: &P2pEngine,
    cons: &P2pEngine,
    i: usize,
    deadline: Instant,
) -> Result<(String, String)> {
    let id = format!("imp-{i}");
    let tid = format!("{id}#layer");
    prod.send_tensor(
        &id,
        &tid,
        HostTensor::zeros(DType::U8, &[64]),
        cons.listen_addr(),
    )?;
    let (_, from) = cons.recv_tensor(&tid, None, deadline)?;
    Ok((id, from))
}

/// A scheduler step of `reqs` (request, blocks) as new prompts, whole, after checking that
/// `sched` finds none of them computed elsewhere.
pub fn new_prompts<S: KvConnectorScheduler>(
    sched: &mut S,
    reqs: &[(Request, Vec<BlockId>)],
) -> SchedulerOutput {
    let mut out = SchedulerOutput::default();
    for (r, b) in reqs {
        assert_eq!(
            sched.get_num_new_matched_tokens(r, 0).unwrap(),
            (Some(0), false)
        );
        out.add_new_prompt(r, b);
    }
    out
}
