//! Hostile peers against the P2P connector's listening port, on loopback: each test mounts one
//! attack while a real producer sends rounds (one small layer each) to the attacked consumer,
//! and checks that every round gets through in bounded time and that the attack holds only
//! what the engine's caps allow. Counts and times are bounded: at most 1,100 connections, every
//! wait under a deadline. `examples/kv_p2p_attacks.rs` prints the same attacks' figures.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{liar_offer, read_one, small_round};
use dist_core::{DType, HostTensor};
use dist_kv::transfer::p2p::wire::{
    decode_frame, write_frame, Frame, PutStatus, TensorHeader, PROTOCOL_VERSION,
};
use dist_kv::transfer::p2p::{EngineConfig, P2pEngine, Secret, SendType, TcpDataPath};
use dist_kv::transfer::Error;
use dist_testkit::closed_within;

const ROUNDS: usize = 8;

fn config(secret: Option<&str>) -> EngineConfig {
    EngineConfig {
        send_type: SendType::Put,
        timeout: Duration::from_secs(5),
        done_timeout: Duration::from_secs(5),
        secret: secret.map(|s| Secret::new(s.as_bytes().to_vec()).unwrap()),
        ..Default::default()
    }
}

fn engine(cfg: EngineConfig) -> P2pEngine {
    P2pEngine::new(cfg, TcpDataPath).unwrap()
}

fn hello(listen_addr: &str, auth: bool) -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        listen_addr: listen_addr.into(),
        data_path: "tcp".into(),
        link_init: vec![],
        nonce: vec![7; 32],
        auth,
    }
}

/// `ROUNDS` rounds, `gap` apart: `prod` PUTs a 4 KiB layer to `cons`, which takes it and
/// reports it loaded, as a worker does. Returns each round's time; panics on a failed round.
fn rounds(prod: &P2pEngine, cons: &P2pEngine, tag: &str, gap: Duration) -> Vec<Duration> {
    (0..ROUNDS)
        .map(|i| {
            std::thread::sleep(gap);
            let id = format!("{tag}-{i}");
            let tid = format!("{id}#layer");
            let t = HostTensor::random(DType::U8, &[4096], i as u64);
            let start = Instant::now();
            prod.send_tensor(&id, &tid, t.clone(), cons.listen_addr())
                .unwrap_or_else(|e| panic!("round {i}: {e}"));
            let (got, from) = cons
                .recv_tensor(&tid, None, Instant::now() + Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("round {i}: {e}"));
            assert!(got == t, "round {i}: wrong data");
            let took = start.elapsed();
            cons.notify_loaded(&id, &from)
                .unwrap_or_else(|e| panic!("round {i}: {e}"));
            took
        })
        .collect()
}

fn worst(t: &[Duration]) -> Duration {
    t.iter().copied().max().unwrap_or_default()
}

/// 1,100 connections that send a Hello and then nothing (beyond the old cap of 1,024, which
/// they filled, locking the producer out of every round): each new one beyond the cap closes
/// the least recently active idle one, so the producer's connection gets in.
#[test]
fn idle_hellos_do_not_lock_out_the_producer() {
    let cons = engine(config(None));
    let prod = engine(config(None));
    let mut idle = Vec::new();
    for i in 0..1100 {
        let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
        write_frame(&mut s, &hello(&format!("127.0.0.1:{}", 40000 + i), false)).unwrap();
        idle.push(s);
    }
    // Let the engine take them all in.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cons.connections().handshaking > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = cons.connections();
    assert!(c.open <= cons.config().max_connections, "{c:?}");
    let t = rounds(&prod, &cons, "idle", Duration::ZERO);
    assert!(worst(&t) < Duration::from_secs(2), "{t:?}");
    // The attackers' connections beyond the cap were closed: most of the first ones are gone.
    let closed = idle[..100]
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(100)))
        .filter(|&c| c)
        .count();
    assert!(
        closed >= 90,
        "only {closed} of the first 100 idle connections were closed"
    );
    drop(idle);
}

/// Connections that never finish their handshake are closed at the handshake deadline, at
/// most 64 are kept, and a producer connecting meanwhile gets through.
#[test]
fn half_open_connections_are_bounded_by_count_and_time() {
    let mut cfg = config(None);
    cfg.timeout = Duration::from_secs(1); // the handshake deadline is min(timeout, 5 s)
    let cons = engine(cfg.clone());
    let prod = engine(cfg);
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(cons.listen_addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let c = cons.connections();
    assert!(c.handshaking <= 64, "{c:?}");
    let t = rounds(&prod, &cons, "half", Duration::ZERO);
    assert!(worst(&t) < Duration::from_secs(1), "{t:?}");
    // Every silent one is closed by the deadline (1 s) plus a poll.
    let start = Instant::now();
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(3)),
            "a half-open connection stayed"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(cons.connections().handshaking, 0);
}

/// The engine's count of open connections once it reaches 0, or its count at `within`.
fn open_after(engine: &P2pEngine, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let open = engine.connections().open;
        if open == 0 || Instant::now() >= deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connection that said Hello and then idles is closed after `idle_timeout`; one that
/// carries a request in flight is not.
#[test]
fn idle_connections_are_closed_in_time() {
    let mut cfg = config(None);
    cfg.idle_timeout = Duration::from_millis(300);
    let cons = engine(cfg.clone());
    let prod = engine(cfg);
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
            write_frame(&mut s, &hello(&format!("127.0.0.1:{}", 50000 + i), false)).unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(3)),
            "an idle connection stayed"
        );
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    // The engine forgets a connection just after closing it: give it a moment, bounded.
    assert_eq!(
        open_after(&cons, Duration::from_secs(1)),
        0,
        "idle connections still counted"
    );
    // The producer's connection closes when idle too (300 ms; bounded at 3 s on a loaded
    // machine), and the next round reconnects.
    rounds(&prod, &cons, "a", Duration::ZERO);
    assert_eq!(
        open_after(&cons, Duration::from_secs(3)),
        0,
        "the producer's idle connection stayed open"
    );
    rounds(&prod, &cons, "b", Duration::ZERO);
}

/// A peer that claims the real producer's listening address (the old engine filed it under
/// that address and sent it the producer's Loaded reports) receives nothing, and the producer
/// gets every report.
#[test]
fn an_impostor_claiming_the_producers_address_gets_no_replies() {
    let cons = engine(config(None));
    let prod = engine(config(None));
    rounds(&prod, &cons, "warm", Duration::ZERO);
    let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
    write_frame(&mut s, &hello(prod.listen_addr(), false)).unwrap();
    assert!(matches!(read_one(&mut s), Some(Frame::HelloAck { .. })));
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let stolen = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spy = {
        let (stolen, stop) = (stolen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if read_one(&mut s).is_some() {
                    stolen.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    for i in 0..ROUNDS {
        let (id, from) =
            small_round(&prod, &cons, i, Instant::now() + Duration::from_secs(2)).unwrap();
        assert_eq!(from, prod.listen_addr());
        cons.notify_loaded(&id, &from).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if prod.take_finished().0.contains(&id) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {i}: the producer never heard"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    stop.store(true, Ordering::Relaxed);
    spy.join().unwrap();
    assert_eq!(
        stolen.load(Ordering::Relaxed),
        0,
        "the impostor received frames"
    );
}

/// The reverse: a peer that connects to the producer claiming the consumer's address and
/// reports the producer's request loaded (which would free its buffers under the real
/// consumer) or stored (which would free a lent tensor under a copy) is not believed.
#[test]
fn forged_reports_from_another_connection_are_ignored() {
    let mut pc = config(None);
    pc.send_type = SendType::Get;
    let prod = engine(pc.clone());
    let cons = engine(pc);
    let id = "forged";
    prod.send_tensor(
        id,
        "forged#l0",
        HostTensor::zeros(DType::U8, &[64]),
        cons.listen_addr(),
    )
    .unwrap();
    prod.mark_saved(id);
    let mut s = TcpStream::connect(prod.listen_addr()).unwrap();
    write_frame(&mut s, &hello(cons.listen_addr(), false)).unwrap();
    assert!(matches!(read_one(&mut s), Some(Frame::HelloAck { .. })));
    write_frame(
        &mut s,
        &Frame::Loaded {
            request_id: id.into(),
        },
    )
    .unwrap();
    write_frame(&mut s, &Frame::GetDone { seq: 1 }).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (done, failed) = prod.take_finished();
    assert!(done.is_empty() && failed.is_empty(), "{done:?} {failed:?}");
    assert_eq!(
        prod.send_buffer_bytes(),
        64,
        "the stored tensor is still held"
    );
    // The real consumer still fetches it.
    let (t, _) = cons
        .recv_tensor(
            "forged#l0",
            Some(prod.listen_addr()),
            Instant::now() + Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(t.nbytes(), 64);
}

/// Liars announce the whole receive buffer (1 GiB), take the Ready and never send, again and
/// again with fresh requests (the old engine held each reservation until the data deadline:
/// every round waited for it or was refused). A stalled reservation gives way to a waiting
/// peer's PUT, and freed room goes to the producer that delivers.
#[test]
fn puts_that_never_send_their_data_do_not_stall_other_rounds() {
    let mut cfg = config(None);
    cfg.timeout = Duration::from_secs(10);
    let cons = engine(cfg.clone());
    let prod = engine(cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let readies = Arc::new(AtomicUsize::new(0));
    let liars: Vec<_> = (0..4)
        .map(|k| {
            let (stop, readies) = (stop.clone(), readies.clone());
            let addr = cons.listen_addr().to_string();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut s = TcpStream::connect(&addr).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let _ = write_frame(&mut s, &hello("127.0.0.1:9", false));
                    let _ = read_one(&mut s);
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let put = liar_offer(n, format!("liar-{k}-{n}#layer"));
                        if write_frame(&mut s, &put).is_err() {
                            break;
                        }
                        // Wait for the answer (or the connection's end).
                        let mut answered = None;
                        while !stop.load(Ordering::Relaxed) && answered.is_none() {
                            let mut len = [0u8; 4];
                            match s.read(&mut len[..1]) {
                                Ok(0) => break,
                                Ok(_) => {
                                    s.read_exact(&mut len[1..]).ok();
                                    let mut b = vec![0u8; u32::from_le_bytes(len) as usize];
                                    s.read_exact(&mut b).ok();
                                    answered = decode_frame(&b).ok();
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(_) => break,
                            }
                        }
                        match answered {
                            Some(Frame::PutReply {
                                status: PutStatus::Ready,
                                ..
                            }) => {
                                readies.fetch_add(1, Ordering::Relaxed);
                                // Hold the reservation until the consumer closes us.
                                closed_within(&mut s, Duration::from_secs(30));
                                break;
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(readies.load(Ordering::Relaxed) >= 1, "the attack is on");
    let t = rounds(&prod, &cons, "liar", Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    for l in liars {
        l.join().unwrap();
    }
    let mut sorted = t.clone();
    sorted.sort();
    eprintln!(
        "rounds under attack: median {:?}, worst {:?}",
        sorted[ROUNDS / 2],
        worst(&t)
    );
    // The data deadline is 10 s: the old engine's rounds took that long (or were refused).
    assert!(worst(&t) < Duration::from_secs(3), "{t:?}");
    assert!(
        readies.load(Ordering::Relaxed) >= 2,
        "liars were closed and came back"
    );
}

/// A frame whose length arrived must arrive whole within the frame deadline; oversized frames
/// are refused before anything is allocated for them, lower before the handshake.
#[test]
fn a_trickled_frame_is_cut_off_and_oversized_frames_are_refused() {
    let mut cfg = config(None);
    cfg.timeout = Duration::from_secs(1); // frame deadline min(timeout, 5 s)
    let cons = engine(cfg);
    let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
    write_frame(&mut s, &hello("127.0.0.1:9", false)).unwrap();
    assert!(matches!(read_one(&mut s), Some(Frame::HelloAck { .. })));
    s.write_all(&100u32.to_le_bytes()).unwrap();
    let start = Instant::now();
    let mut trickle = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && trickle.write_all(&[0]).is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    let waited = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    // Before the handshake a frame of more than 8 KiB, after it one of more than 64 KiB.
    let mut a = TcpStream::connect(cons.listen_addr()).unwrap();
    a.write_all(&(9u32 << 10).to_le_bytes()).unwrap();
    assert!(closed_within(&mut a, Duration::from_secs(2)));
    let mut b = TcpStream::connect(cons.listen_addr()).unwrap();
    write_frame(&mut b, &hello("127.0.0.1:9", false)).unwrap();
    assert!(matches!(read_one(&mut b), Some(Frame::HelloAck { .. })));
    b.write_all(&((64u32 << 10) + 1).to_le_bytes()).unwrap();
    assert!(closed_within(&mut b, Duration::from_secs(2)));
    assert_eq!(cons.recv_buffer_bytes(), 0);
}

/// With a shared secret: matching engines work; a producer without it, or with another, is
/// refused with an error that says so; a raw peer that claims it but cannot prove it is closed
/// before any request is read; connections that stall in the handshake do not lock the
/// producer out.
#[test]
fn a_shared_secret_is_required_and_proven_both_ways() {
    let cons = engine(config(Some("the job's secret")));
    assert!(cons.authenticates());
    let good = engine(config(Some("the job's secret")));
    rounds(&good, &cons, "good", Duration::ZERO);
    let t = HostTensor::zeros(DType::U8, &[16]);
    let none = engine(config(None));
    let e = none
        .send_tensor("n", "n#l", t.clone(), cons.listen_addr())
        .unwrap_err();
    assert!(
        matches!(&e, Error::Request { source, .. } if matches!(**source, Error::Auth(_))),
        "{e}"
    );
    assert!(e.to_string().contains("requires a shared secret"), "{e}");
    let other = engine(config(Some("another secret")));
    let e = other
        .send_tensor("o", "o#l", t.clone(), cons.listen_addr())
        .unwrap_err();
    assert!(
        e.to_string().contains("does not hold this engine's secret"),
        "{e}"
    );
    // A producer with a secret does not talk to a consumer without one (it could be anyone).
    let open = engine(config(None));
    let e = good
        .send_tensor("p", "p#l", t, open.listen_addr())
        .unwrap_err();
    assert!(e.to_string().contains("no shared secret"), "{e}");
    // A raw peer that claims the secret, sends a wrong proof, then a PUT: closed, never answered.
    let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
    write_frame(&mut s, &hello("127.0.0.1:9", true)).unwrap();
    match read_one(&mut s) {
        Some(Frame::HelloAck { auth, proof, .. }) => assert!(auth && proof.len() == 32),
        f => panic!("{f:?}"),
    }
    write_frame(&mut s, &Frame::Auth { proof: vec![0; 32] }).unwrap();
    let _ = write_frame(
        &mut s,
        &Frame::Put {
            seq: 1,
            tensor_id: "x#l".into(),
            header: TensorHeader {
                dtype: DType::U8,
                shape: vec![16],
            },
        },
    );
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    assert_eq!(cons.recv_buffer_bytes(), 0);
    // 200 connections stuck after their Hello (no proof) while the producer connects anew.
    let mut stuck: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
            write_frame(&mut s, &hello("127.0.0.1:9", true)).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(cons.connections().handshaking <= 64);
    let fresh = engine(config(Some("the job's secret")));
    let t = rounds(&fresh, &cons, "fresh", Duration::ZERO);
    assert!(worst(&t) < Duration::from_secs(1), "{t:?}");
    let closed = stuck
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(100)))
        .filter(|&c| c)
        .count();
    assert!(closed >= 130, "{closed} of 200 stuck handshakes closed");
}

/// Relays one TCP connection from a port of its own to `to`, recording both directions.
fn recording_relay(to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(&to).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, rec: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
            })
        };
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let x = pump(a, b2, rec.clone());
        let y = pump(b, a2, rec);
        let _ = (x.join(), y.join());
    });
    (addr, seen)
}

/// The secret never crosses the wire: everything both ends sent, recorded by a relay between
/// them, holds no copy of it.
#[test]
fn the_secret_never_crosses_the_wire() {
    let secret = "correct horse battery staple 0123456789";
    let cons = engine(config(Some(secret)));
    let prod = engine(config(Some(secret)));
    let (relay, seen) = recording_relay(cons.listen_addr().to_string());
    let t = HostTensor::random(DType::U8, &[4096], 3);
    prod.send_tensor("s", "s#l", t.clone(), &relay).unwrap();
    let (got, _) = cons
        .recv_tensor("s#l", None, Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert!(got == t);
    let bytes = seen.lock().unwrap().clone();
    assert!(bytes.len() > 4096, "the relay saw the transfer");
    assert!(
        !bytes
            .windows(8)
            .any(|w| secret.as_bytes().windows(8).any(|s| s == w)),
        "8 bytes of the secret on the wire"
    );
}
