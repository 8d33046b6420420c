//! vLLM's MessageQueue acceptance (`tests/distributed/test_shm_broadcast.py`), re-done: world 4,
//! writer rank 2, chunks of 40 KiB × 2, 10,000 messages of 1–10,000 random int64 values (8 to
//! 80,000 bytes: about half larger than a chunk), random sleeps on both sides,
//! every reader checks every message. Ranks as threads over shared memory, over TCP and mixed;
//! then ranks as processes (this test binary re-run as the readers); and typed messages
//! (postcard, up to ~100 KB: larger than the whole ring).

mod mq_common;

use std::time::Duration;

use dist_core::local::run_threads;
use dist_core::HostGroupExt;
use dist_cpu::mq::{MessageQueue, Options};
use mq_common::*;

const WRITER: usize = 2;
const CHUNK: usize = 40 * 1024;
const CHUNKS: usize = 2;

fn threads(remote_ranks: &[usize], n: u64, typed: bool) {
    let out = run_threads(4, Duration::from_secs(60), |rank, g| {
        let opts = Options {
            max_chunk_bytes: CHUNK,
            max_chunks: CHUNKS,
            timeout: Duration::from_secs(60),
            force_remote: remote_ranks.contains(&rank),
            ..Options::default()
        };
        let mq = MessageQueue::create_from_group_with(&g, WRITER, opts, true).unwrap();
        let h = mq.handle();
        let mut want_remote: Vec<usize> = remote_ranks.to_vec();
        if remote_ranks.contains(&WRITER) {
            want_remote = vec![0, 1, 3];
        }
        want_remote.retain(|&r| r != WRITER);
        assert_eq!(h.remote_reader_ranks, want_remote, "rank {rank}");
        assert_eq!(mq.is_remote_reader(), want_remote.contains(&rank));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let seed: u64 = g
            .broadcast_obj((rank == WRITER).then_some(&seed), WRITER)
            .unwrap();
        acceptance(&mq, seed, n, typed)
    });
    for (rank, r) in out.into_iter().enumerate() {
        r.unwrap_or_else(|_| panic!("rank {rank} panicked"))
            .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
}

#[test]
fn threads_shared_memory() {
    threads(&[], N_MESSAGES, false);
}

#[test]
fn threads_tcp() {
    // The writer forcing remote mode sends every reader over TCP.
    threads(&[WRITER], N_MESSAGES, false);
}

#[test]
fn threads_mixed_shared_memory_and_tcp() {
    threads(&[0, 3], N_MESSAGES, false);
}

/// Typed messages (postcard): up to ~100 KB, larger than the whole 40 KiB × 2 ring, so they
/// stream through it. Fewer messages: decoding 10,000 × 5,000 varints is slow in a debug build.
#[test]
fn threads_typed_messages_larger_than_the_ring() {
    threads(&[], 400, true);
    threads(&[0], 400, true);
}

fn processes(remote: bool) {
    let readers = [0usize, 1, 3];
    let opts = Options {
        max_chunk_bytes: CHUNK,
        max_chunks: CHUNKS,
        timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let (local, far): (&[usize], &[usize]) = if remote {
        (&[], &readers)
    } else {
        (&readers, &[])
    };
    let mq = MessageQueue::create_writer(WRITER, local, far, opts).unwrap();
    let seed = std::process::id() as u64 * 7919;
    let hex = handle_to_hex(mq.handle());
    let mut children: Vec<_> = readers
        .iter()
        .map(|r| {
            spawn_child(
                "child_reader",
                &[
                    ("MQ_TEST_HANDLE", hex.clone()),
                    ("MQ_TEST_RANK", r.to_string()),
                    ("MQ_TEST_SEED", seed.to_string()),
                ],
            )
        })
        .collect();
    let res = mq
        .wait_until_ready(Duration::from_secs(30))
        .map_err(|e| e.to_string())
        .and_then(|_| acceptance(&mq, seed, N_MESSAGES, false));
    let kids: Vec<_> = children
        .iter_mut()
        .map(|c| wait_child(c, Duration::from_secs(60)))
        .collect();
    res.unwrap();
    for k in kids {
        k.unwrap();
    }
}

#[test]
fn processes_shared_memory() {
    processes(false);
}

#[test]
fn processes_tcp() {
    processes(true);
}

/// Entry point of the reader processes of the tests above (runs only when they start it).
#[test]
#[ignore = "child process of processes_*; started by them"]
fn child_reader() {
    let Ok(hex) = std::env::var("MQ_TEST_HANDLE") else {
        return;
    };
    let rank: usize = std::env::var("MQ_TEST_RANK").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("MQ_TEST_SEED").unwrap().parse().unwrap();
    let opts = Options {
        timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let mq = MessageQueue::open_reader(&handle_from_hex(&hex), rank, opts).unwrap();
    mq.wait_until_ready(Duration::from_secs(30)).unwrap();
    acceptance(&mq, seed, N_MESSAGES, false).unwrap();
}
