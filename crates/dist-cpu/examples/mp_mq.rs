//! Multi-process acceptance of the MessageQueue (run by `cargo xtask test-multiproc` under
//! `dist run --nproc-per-node N`, or by hand with torchrun's variables set).
//!
//! vLLM's `test_shm_broadcast.py` re-done over a `dist_store::StatelessProcessGroup`: the writer is
//! rank 2 (the last rank in worlds under 3), chunks of 40 KiB × 2, 10,000 messages of 1–10,000
//! random int64 values (8 to 80,000 bytes) with random sleeps on both sides, every reader
//! checking every message; first with the readers on shared memory, then with every reader
//! forced onto TCP, then 200 typed messages larger than the ring. `MQ_MESSAGES` overrides the
//! count. Exits 0 when every check passed.

#[path = "../tests/mq_common/mod.rs"]
mod mq_common;

use std::time::{Duration, Instant};

use dist_core::{HostGroup, HostGroupExt};
use dist_cpu::mq::{MessageQueue, Options};
use dist_store::StatelessProcessGroup;
use mq_common::{acceptance, N_MESSAGES};

fn run() -> Result<(), String> {
    let pg =
        StatelessProcessGroup::from_env(Duration::from_secs(120)).map_err(|e| e.to_string())?;
    let (rank, world) = (pg.rank(), pg.world_size());
    let writer = 2.min(world - 1);
    let n: u64 = std::env::var("MQ_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(N_MESSAGES);
    for (what, force_remote, count, typed) in [
        ("shared memory", false, n, false),
        ("tcp", true, n, false),
        ("typed, larger than the ring", false, 200, true),
    ] {
        let t = Instant::now();
        let opts = Options {
            max_chunk_bytes: 40 * 1024,
            max_chunks: 2,
            timeout: Duration::from_secs(60),
            force_remote,
            ..Options::default()
        };
        let mq = MessageQueue::create_from_group_with(&pg, writer, opts, true)
            .map_err(|e| format!("{what}: create: {e}"))?;
        if world > 1 && mq.is_writer() {
            let h = mq.handle();
            let want_remote = if force_remote { world - 1 } else { 0 };
            if h.remote_reader_ranks.len() != want_remote {
                return Err(format!("{what}: unexpected reader split {h:?}"));
            }
        }
        let seed = std::process::id() as u64 ^ 0x5eed;
        let seed: u64 = pg
            .broadcast_obj((rank == writer).then_some(&seed), writer)
            .map_err(|e| e.to_string())?;
        acceptance(&mq, seed, count, typed).map_err(|e| format!("{what}: {e}"))?;
        pg.barrier().map_err(|e| e.to_string())?;
        if rank == writer {
            eprintln!(
                "mp_mq: world {world}: {count} messages ({what}) to {} readers in {:.2?}",
                world - 1,
                t.elapsed()
            );
        }
    }
    // Rank 0 may host the store: it leaves only after every other rank is done with it.
    if rank == 0 {
        for r in 1..world {
            pg.recv_obj::<u8>(r).map_err(|e| e.to_string())?;
        }
    } else {
        pg.send_obj(&1u8, 0).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1,2,3,4,8");
        return;
    }
    if let Err(e) = run() {
        eprintln!(
            "mp_mq: rank {}: {e}",
            std::env::var("RANK").unwrap_or_default()
        );
        std::process::exit(1);
    }
}
