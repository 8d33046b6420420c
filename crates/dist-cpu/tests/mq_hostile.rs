//! Hostile peers on the writer's TCP port (readers on other nodes), loopback only, every wait
//! bounded. The attacks: connections that trickle a byte every 3 s so that each single read
//! meets its deadline but the hello never ends, and a flood of silent connections opened as fast
//! as the machine allows. In both the real readers must get in at once, and the junk must be
//! dropped within the hello deadline; refusals are logged at a bounded rate.

mod mq_common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dist_cpu::mq::{MessageQueue, Options};
use mq_common::Capture;

fn opts(timeout: Duration) -> Options {
    Options {
        max_chunk_bytes: 4096,
        max_chunks: 4,
        timeout,
        ..Options::default()
    }
}

/// Every log line of this test binary (the acceptor logs from its own thread, so the
/// subscriber must be the global one). Tests tell their lines apart by the writer's rank.
fn log() -> &'static Capture {
    static LOG: OnceLock<Capture> = OnceLock::new();
    LOG.get_or_init(|| {
        let cap = Capture::default();
        let c2 = cap.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || c2.clone())
            .finish();
        tracing::subscriber::set_global_default(sub).expect("one global subscriber");
        cap
    })
}

fn log_lines(needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&log().0.lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Waits for `w` and `readers` to be ready; returns how long the writer took.
fn ready(w: &MessageQueue, readers: &[MessageQueue], timeout: Duration) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for r in readers {
            s.spawn(move || r.wait_until_ready(timeout).unwrap());
        }
        w.wait_until_ready(timeout).unwrap();
    });
    t.elapsed()
}

/// 80 connections (more than any fixed cap of pending hellos) send a plausible hello one byte
/// every 3 s: each read meets a per-read deadline, the hello would take 100 s. Reader 21 must
/// still get in at once (a per-read deadline and a cap of 64 pending hellos kept it out until
/// the writer's wait_until_ready failed), every trickler must be dropped within the whole-hello
/// deadline (5 s) plus slack while the writer still listens (reader 22 is not there yet), and
/// reader 22 gets in afterwards.
#[test]
fn trickling_hellos_do_not_keep_the_real_reader_out() {
    log();
    let o = opts(Duration::from_secs(10));
    let w = MessageQueue::create_writer(20, &[], &[21, 22], o.clone()).unwrap();
    let addr = w.handle().remote_addr.clone().unwrap();
    // What a trickler sends: the start of a well-formed hello, so only its pace is wrong.
    let hello: Vec<u8> = [&b"DISTMQH1"[..], &21u64.to_le_bytes(), &[0u8; 18]].concat();
    let opened = Instant::now();
    let junk: Vec<TcpStream> = (0..80)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&hello[..1]).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let mut socks: Vec<TcpStream> = junk.iter().map(|s| s.try_clone().unwrap()).collect();
        let stop = stop.clone();
        let hello = hello.clone();
        std::thread::spawn(move || {
            let mut sent = 1;
            let mut next = Instant::now() + Duration::from_secs(3);
            while !stop.load(Ordering::Acquire) && sent < hello.len() {
                if Instant::now() >= next {
                    for s in &mut socks {
                        let _ = s.write_all(&hello[sent..sent + 1]); // dropped ones fail
                    }
                    sent += 1;
                    next += Duration::from_secs(3);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Let the writer accept them all before the real reader comes.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r21 = MessageQueue::open_reader(w.handle(), 21, o.clone()).unwrap();
    // Reader 21 is in when the writer's wait names only 22 as missing.
    let missing = loop {
        match w.wait_until_ready(Duration::from_millis(200)) {
            Err(dist_core::Error::Timeout { missing_ranks, .. }) if missing_ranks == [21, 22] => {
                assert!(
                    t.elapsed() < Duration::from_secs(3),
                    "reader 21 still kept out after {:?}",
                    t.elapsed()
                );
            }
            Err(dist_core::Error::Timeout { missing_ranks, .. }) => break missing_ranks,
            r => panic!("{r:?}"),
        }
    };
    assert_eq!(missing, [22]);
    // Every trickler is gone by the whole-hello deadline plus slack, though it kept sending.
    let budget = Duration::from_secs(5) + Duration::from_millis(1500);
    for (i, mut s) in junk.into_iter().enumerate() {
        let left = budget.saturating_sub(opened.elapsed());
        assert!(
            dist_testkit::closed_within(&mut s, left.max(Duration::from_millis(10))),
            "trickling connection {i} still open {:?} after it connected",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() > Duration::from_secs(3),
        "the tricklers were dropped before they trickled"
    );
    let r22 = MessageQueue::open_reader(w.handle(), 22, o).unwrap();
    let readers = [r21, r22];
    ready(&w, &readers, Duration::from_secs(10));
    w.enqueue_bytes(b"for the readers").unwrap();
    for r in &readers {
        assert_eq!(r.dequeue_bytes().unwrap(), b"for the readers");
    }
    stop.store(true, Ordering::Release);
    trickler.join().unwrap();
}

/// A flood of silent connections, opened as fast as one thread can, keeps going while the real
/// readers connect: they must get in at once. The refusals are logged at a bounded rate.
#[test]
fn a_connection_flood_does_not_keep_the_real_readers_out() {
    log();
    let o = opts(Duration::from_secs(10));
    let w = MessageQueue::create_writer(30, &[], &[31, 32], o.clone()).unwrap();
    let addr = w.handle().remote_addr.clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let addr = addr.clone();
        std::thread::spawn(move || {
            // Hold the newest 400 open (a bounded number of descriptors); count them all.
            let mut held = std::collections::VecDeque::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Acquire) {
                if let Ok(s) = TcpStream::connect(&addr) {
                    held.push_back(s);
                    n += 1;
                    if held.len() > 400 {
                        held.pop_front();
                    }
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let readers: Vec<MessageQueue> = [31, 32]
        .iter()
        .map(|&k| MessageQueue::open_reader(w.handle(), k, o.clone()).unwrap())
        .collect();
    let took = ready(&w, &readers, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Release);
    let flood = flooder.join().unwrap();
    assert!(
        took < Duration::from_secs(3),
        "the real readers waited {took:?} behind a flood of {flood} connections"
    );
    assert!(flood > 100, "the flood was only {flood} connections");
    w.enqueue_bytes(b"x").unwrap();
    for r in &readers {
        assert_eq!(r.dequeue_bytes().unwrap(), b"x");
    }
    // Refusals are logged, but not one line per connection: about one line per second.
    let lines = log_lines("writer rank 30");
    let refusals = lines.iter().filter(|l| l.contains("WARN")).count();
    assert!(
        (1..=6).contains(&refusals),
        "{refusals} warning lines for a flood of {flood} connections:\n{}",
        lines.join("\n")
    );
}
