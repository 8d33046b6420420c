//! Shared by the MessageQueue tests: vLLM's acceptance workload (`test_shm_broadcast.py`)
//! and the plumbing to run readers as child processes of the test binary.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dist_core::Error;

use dist_cpu::mq::{Handle, MessageQueue};

/// vLLM's acceptance: 10,000 messages.
pub const N_MESSAGES: u64 = 10_000;

pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The values messages are cut from: 20,000 random int64 values (full range).
pub fn pool(seed: u64) -> Vec<i64> {
    let mut s = seed;
    (0..20_000).map(|_| splitmix(&mut s) as i64).collect()
}

/// Message `i` of the run seeded `seed`: 1 to 10,000 random int64 values, a random window of the
/// pool. Postcard writes them as zig-zag varints of up to 10 bytes, so messages range from 2 bytes
/// to about 100 KB: many fit one 40 KiB chunk, many need two, some are larger than the whole
/// 2-chunk ring.
pub fn message(pool: &[i64], seed: u64, i: u64) -> &[i64] {
    let mut s = seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let len = 1 + (splitmix(&mut s) % 10_000) as usize;
    let off = (splitmix(&mut s) % 10_000) as usize;
    &pool[off..off + len]
}

/// Sleeps now and then (about 1 call in 100, up to 1 ms), so the queue is seen full, empty and in
/// between on both sides.
pub fn maybe_sleep(rng: &mut u64) {
    if splitmix(rng) % 100 == 0 {
        std::thread::sleep(Duration::from_micros(splitmix(rng) % 1000));
    }
}

/// The pool as little-endian bytes.
pub fn pool_bytes(pool: &[i64]) -> Vec<u8> {
    pool.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs the acceptance on one side: the writer sends `n` messages, each reader checks each one.
/// `typed`: messages are `Vec<i64>` through `enqueue`/`dequeue` (postcard); otherwise the values'
/// little-endian bytes through `enqueue_bytes`/`dequeue_bytes` (8 to 80,000 bytes).
pub fn acceptance(mq: &MessageQueue, seed: u64, n: u64, typed: bool) -> Result<(), String> {
    let mut rng = seed ^ (mq.rank() as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1);
    let pool = pool(seed);
    let bytes = pool_bytes(&pool);
    let window = |i: u64| {
        let m = message(&pool, seed, i);
        let off = (m.as_ptr() as usize - pool.as_ptr() as usize) / 8;
        (m, &bytes[off * 8..(off + m.len()) * 8])
    };
    for i in 0..n {
        let (vals, raw) = window(i);
        if mq.is_writer() {
            let r = if typed {
                mq.enqueue(vals)
            } else {
                mq.enqueue_bytes(raw)
            };
            r.map_err(|e| format!("writer: message {i}: {e}"))?;
        } else {
            let same = if typed {
                let got: Vec<i64> = mq
                    .dequeue()
                    .map_err(|e| format!("reader {}: message {i}: {e}", mq.rank()))?;
                got[..] == vals[..]
            } else {
                let got = mq
                    .dequeue_bytes()
                    .map_err(|e| format!("reader {}: message {i}: {e}", mq.rank()))?;
                got[..] == raw[..]
            };
            if !same {
                return Err(format!("reader {}: message {i} differs", mq.rank()));
            }
        }
        maybe_sleep(&mut rng);
    }
    Ok(())
}

pub fn handle_to_hex(h: &Handle) -> String {
    dist_core::encode_obj(h)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn handle_from_hex(s: &str) -> Handle {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    dist_core::decode_obj(&bytes, 1 << 20).unwrap()
}

/// Starts this test binary again as a child running only the test `entry`, with `env` set.
pub fn spawn_child(entry: &str, env: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        entry,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::null());
    cmd.spawn().unwrap()
}

/// Waits for a child with a deadline; kills it when the deadline passes.
pub fn wait_child(c: &mut std::process::Child, timeout: Duration) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return if st.success() {
                Ok(())
            } else {
                Err(format!("child {} exited with {st}", c.id()))
            };
        }
        if start.elapsed() > timeout {
            let _ = c.kill();
            let _ = c.wait();
            return Err(format!(
                "child {} did not finish within {timeout:?}",
                c.id()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `MakeWriter` that keeps what the subscriber writes.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts that `e` is a timeout waiting for `rank` alone whose detail says `says`.
pub fn assert_timeout_on(e: &Error, rank: usize, says: &str) {
    match e {
        Error::Timeout {
            missing_ranks,
            detail,
            ..
        } => {
            assert_eq!(missing_ranks, &vec![rank], "{e}");
            assert!(detail.contains(says), "{e}");
        }
        _ => panic!("{e}"),
    }
}
