//! Hostile peers against the P2P connector's listener, on loopback, with figures: each attack
//! runs while a real producer sends 8 rounds (one 4 KiB layer each, 20 ms apart) to the attacked consumer,
//! and the program prints how many rounds got through, their median and worst time, and what
//! the attack held on the consumer.
//!
//! `cargo run --release -p dist-kv --example kv_p2p_attacks [-- ATTACK...]`
//! (attacks: idle-hellos, impostor, lying-put; default all, after a baseline: the same rounds
//! with no attacker, in the same run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{liar_offer, read_one, small_round};
use dist_core::{DType, HostTensor};
use dist_kv::transfer::p2p::wire::{write_frame, Frame, PutStatus};
use dist_kv::transfer::p2p::{EngineConfig, P2pEngine, SendType, TcpDataPath};
use dist_testkit::drained_until_closed;

const ROUNDS: usize = 8;
const LIARS: usize = 4;
const GAP: Duration = Duration::from_millis(20);

fn engine(send_type: SendType, timeout: Duration) -> P2pEngine {
    P2pEngine::new(
        EngineConfig {
            send_type,
            timeout,
            done_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        TcpDataPath,
    )
    .expect("engine")
}

fn hello(listen_addr: &str) -> Frame {
    Frame::Hello {
        version: dist_kv::transfer::p2p::wire::PROTOCOL_VERSION,
        listen_addr: listen_addr.into(),
        data_path: "tcp".into(),
        link_init: vec![],
        nonce: vec![0; 32],
        auth: false,
    }
}

struct Rounds {
    ok: usize,
    times: Vec<Duration>,
    errors: Vec<String>,
}

impl Rounds {
    fn print(&self, name: &str, held: &str) {
        let mut t = self.times.clone();
        t.sort();
        let med = t.get(t.len() / 2).copied().unwrap_or_default();
        let max = t.last().copied().unwrap_or_default();
        println!(
            "{name}: {} of {ROUNDS} rounds got through; median {med:.1?}, worst {max:.1?}; {held}",
            self.ok
        );
        if let Some(e) = self.errors.first() {
            println!("  first error: {e}");
        }
    }
}

/// `ROUNDS` rounds: the producer PUTs a 4 KiB layer to the consumer, which takes it (2 s each).
fn rounds(prod: &P2pEngine, cons: &P2pEngine, tag: &str) -> Rounds {
    let mut r = Rounds {
        ok: 0,
        times: vec![],
        errors: vec![],
    };
    for i in 0..ROUNDS {
        // Rounds are paced as decode steps are (the attackers act in the gaps).
        std::thread::sleep(GAP);
        let id = format!("{tag}-{i}");
        let tid = format!("{id}#layer");
        let t = HostTensor::random(DType::U8, &[4096], i as u64);
        let start = Instant::now();
        let res = prod
            .send_tensor(&id, &tid, t.clone(), cons.listen_addr())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                cons.recv_tensor(&tid, None, Instant::now() + Duration::from_secs(2))
                    .map_err(|e| e.to_string())
            });
        r.times.push(start.elapsed());
        match res {
            Ok((got, _)) if got == t => r.ok += 1,
            Ok(_) => r.errors.push(format!("round {i}: wrong data")),
            Err(e) => r.errors.push(format!("round {i}: {e}")),
        }
    }
    r
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// The rounds with no attacker.
fn baseline() {
    let cons = engine(SendType::Put, Duration::from_secs(5));
    let prod = engine(SendType::Put, Duration::from_secs(5));
    rounds(&prod, &cons, "base").print("baseline (no attacker)", "nothing held");
}

/// 1,100 connections that send a Hello and then nothing.
fn idle_hellos() {
    let cons = engine(SendType::Put, Duration::from_secs(5));
    let prod = engine(SendType::Put, Duration::from_secs(5));
    let base = threads();
    let mut idle = Vec::new();
    for i in 0..1100 {
        let Ok(mut s) = TcpStream::connect(cons.listen_addr()) else {
            continue;
        };
        if write_frame(&mut s, &hello(&format!("127.0.0.1:{}", 40000 + i))).is_ok() {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = threads().saturating_sub(base);
    let r = rounds(&prod, &cons, "idle");
    r.print(
        "idle-hellos (1,100)",
        &format!("{held} connection threads held on the consumer"),
    );
    drop(idle);
}

/// A peer that claims the real producer's address and listens for what the consumer sends it.
fn impostor() {
    let cons = engine(SendType::Put, Duration::from_secs(5));
    let prod = engine(SendType::Put, Duration::from_secs(5));
    // The real producer's connection exists first.
    prod.send_tensor(
        "warm",
        "warm#layer",
        HostTensor::zeros(DType::U8, &[16]),
        cons.listen_addr(),
    )
    .expect("warm-up PUT");
    cons.recv_tensor("warm#layer", None, Instant::now() + Duration::from_secs(2))
        .expect("warm-up recv");
    let mut s = TcpStream::connect(cons.listen_addr()).expect("connect");
    write_frame(&mut s, &hello(prod.listen_addr())).expect("hello");
    let _ack = read_one(&mut s);
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let stolen = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = {
        let (stolen, stop) = (stolen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Frame::Loaded { .. }) = read_one(&mut s) {
                    stolen.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut reached = 0;
    for i in 0..ROUNDS {
        let (id, from) = small_round(&prod, &cons, i, Instant::now() + Duration::from_secs(2))
            .expect("PUT and recv");
        let _ = cons.notify_loaded(&id, &from);
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if prod.take_finished().0.contains(&id) {
                reached += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = listener.join();
    println!(
        "impostor: {reached} of {ROUNDS} Loaded reports reached the real producer; the impostor received {}",
        stolen.load(Ordering::Relaxed)
    );
}

/// A peer that announces a 1 GiB PUT, takes the Ready and never sends the data, again and again.
fn lying_put() {
    let timeout = Duration::from_secs(5);
    let cons = engine(SendType::Put, timeout);
    let prod = engine(SendType::Put, timeout);
    let stop = Arc::new(AtomicBool::new(false));
    let readies = Arc::new(AtomicUsize::new(0));
    let addr = cons.listen_addr().to_string();
    // Four liars, so one always waits to take the room another's expiry frees.
    let liars: Vec<_> = (0..LIARS)
        .map(|k| {
            let (stop, readies, addr) = (stop.clone(), readies.clone(), addr.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = write_frame(&mut s, &hello("127.0.0.1:9"));
                    let _ = read_one(&mut s);
                    // Offer again after each refusal, so one offer always waits for room.
                    let mut ready = false;
                    for seq in 1..1000 {
                        // A fresh request each time, as a liar that knows the rules would.
                        n += 1;
                        let put = liar_offer(seq, format!("liar-{k}-{n}#layer"));
                        if write_frame(&mut s, &put).is_err() {
                            break;
                        }
                        match read_one(&mut s) {
                            Some(Frame::PutReply {
                                status: PutStatus::Ready,
                                ..
                            }) => {
                                ready = true;
                                break;
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    if !ready {
                        continue;
                    }
                    readies.fetch_add(1, Ordering::Relaxed);
                    // Hold the reservation until the consumer gives up on the data.
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    drained_until_closed(&mut s, || !stop.load(Ordering::Relaxed));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let reserved = cons.recv_buffer_bytes();
    let r = rounds(&prod, &cons, "liar");
    stop.store(true, Ordering::Relaxed);
    for l in liars {
        let _ = l.join();
    }
    r.print(
        "lying-put (4 liars, 1 GiB announced each)",
        &format!(
            "{} MiB reserved for the liar at the start, {} Ready answers to it",
            reserved >> 20,
            readies.load(Ordering::Relaxed)
        ),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |a: &str| args.is_empty() || args.iter().any(|x| x == a);
    baseline();
    if want("idle-hellos") {
        idle_hellos();
    }
    if want("impostor") {
        impostor();
    }
    if want("lying-put") {
        lying_put();
    }
}
