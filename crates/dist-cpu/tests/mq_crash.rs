//! Crash leftovers: a rank of a MessageQueue killed with SIGKILL (no destructor runs) leaves no
//! segment in `/dev/shm`. Each check lists `/dev/shm` right after the kill, before this test
//! cleans anything up (it never calls `remove_stale_segments`).

mod mq_common;

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dist_core::Error;
use dist_cpu::mq::{Handle, MessageQueue, Options};
use mq_common::*;

fn opts(timeout: Duration) -> Options {
    Options {
        max_chunk_bytes: 1 << 20,
        max_chunks: 4,
        timeout,
        ..Options::default()
    }
}

/// Names in `/dev/shm` of segments made by process `pid`.
fn segments_of(pid: u32) -> Vec<String> {
    let prefixes = [format!("distrs.{pid}."), format!("distrs.{pid}-")];
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect()
}

fn segment_exists(name: &str) -> bool {
    std::path::Path::new("/dev/shm").join(name).exists()
}

/// Starts this test binary as the child `entry` with `MQ_CRASH_MODE=mode`; returns it and the
/// handle it prints.
fn child_writer(mode: &str) -> (Child, Handle) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_crash_writer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MQ_CRASH_MODE", mode)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let hex = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "no handle from the child"
        );
        if let Some(i) = line.find("HANDLE ") {
            break line[i + 7..].trim().to_string();
        }
    };
    // Keep reading (and dropping) the child's output so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    (child, handle_from_hex(&hex))
}

fn kill9(c: &mut Child) {
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}

/// The writer is SIGKILLed while its readers read: nothing of it is left in /dev/shm.
#[test]
fn a_killed_writer_leaves_no_segment() {
    let (mut child, h) = child_writer("serve");
    let name = h.segment.clone().expect("a ring for the local reader");
    let r = MessageQueue::open_reader(&h, 1, opts(Duration::from_secs(20))).unwrap();
    r.wait_until_ready(Duration::from_secs(20)).unwrap();
    for i in 0..5u32 {
        assert_eq!(r.dequeue_bytes().unwrap(), i.to_le_bytes());
    }
    let pid = child.id();
    kill9(&mut child);
    assert!(
        !segment_exists(&name) && segments_of(pid).is_empty(),
        "after SIGKILL of the writer: {:?}",
        segments_of(pid)
    );
    // The reader notices, and still leaves nothing behind.
    let e = r.dequeue_bytes_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, Error::PeerLost { rank: 0, .. }), "{e}");
    assert!(segments_of(pid).is_empty());
}

/// A reader is SIGKILLed: the writer (alive) holds its mapping, but no name is left that a
/// later crash of the writer could leave behind.
#[test]
fn a_killed_reader_leaves_no_segment() {
    let w = MessageQueue::create_writer(0, &[1, 2], &[], opts(Duration::from_secs(20))).unwrap();
    let name = w.handle().segment.clone().unwrap();
    let hex = handle_to_hex(w.handle());
    let mut kids: Vec<Child> = [1, 2]
        .iter()
        .map(|k| {
            spawn_child(
                "child_crash_reader",
                &[
                    ("MQ_TEST_HANDLE", hex.clone()),
                    ("MQ_TEST_RANK", k.to_string()),
                ],
            )
        })
        .collect();
    w.wait_until_ready(Duration::from_secs(20)).unwrap();
    for i in 0..5u32 {
        w.enqueue_bytes(&i.to_le_bytes()).unwrap();
    }
    kill9(&mut kids[1]);
    assert!(
        !segment_exists(&name),
        "/dev/shm/{name} is still there after SIGKILL of a reader"
    );
    assert!(segments_of(std::process::id()).is_empty());
    drop(w);
    wait_child(&mut kids[0], Duration::from_secs(20)).unwrap();
}

/// The writer is SIGKILLed after it made the ring and before any reader attached: the reader
/// that comes later finds it dead, fails naming it, and removes the name.
#[test]
fn a_writer_killed_during_setup_leaves_no_segment() {
    let (mut child, h) = child_writer("setup");
    let name = h.segment.clone().unwrap();
    let pid = child.id();
    assert!(segment_exists(&name));
    kill9(&mut child);
    let t = Instant::now();
    let e = MessageQueue::open_reader(&h, 1, opts(Duration::from_secs(10)))
        .and_then(|r| r.wait_until_ready(Duration::from_secs(10)))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(matches!(e, Error::PeerLost { rank: 0, .. }), "{e}");
    assert!(
        !segment_exists(&name) && segments_of(pid).is_empty(),
        "after the reader saw the dead writer: {:?}",
        segments_of(pid)
    );
}

/// Child: a writer for local reader 1. `serve`: sends 5 messages once ready and waits to be
/// killed; `setup`: prints the handle and waits to be killed before anyone attaches.
#[test]
#[ignore = "child process of the crash tests"]
fn child_crash_writer() {
    let Ok(mode) = std::env::var("MQ_CRASH_MODE") else {
        return;
    };
    let w = MessageQueue::create_writer(0, &[1], &[], opts(Duration::from_secs(30))).unwrap();
    println!("HANDLE {}", handle_to_hex(w.handle()));
    std::io::stdout().flush().unwrap();
    if mode == "serve" {
        w.wait_until_ready(Duration::from_secs(30)).unwrap();
        for i in 0..5u32 {
            w.enqueue_bytes(&i.to_le_bytes()).unwrap();
        }
    }
    std::thread::sleep(Duration::from_secs(60));
}

/// Child: a reader that reads until the queue ends.
#[test]
#[ignore = "child process of the crash tests"]
fn child_crash_reader() {
    let Ok(hex) = std::env::var("MQ_TEST_HANDLE") else {
        return;
    };
    let rank: usize = std::env::var("MQ_TEST_RANK").unwrap().parse().unwrap();
    let mq = MessageQueue::open_reader(&handle_from_hex(&hex), rank, opts(Duration::from_secs(30)))
        .unwrap();
    mq.wait_until_ready(Duration::from_secs(30)).unwrap();
    loop {
        match mq.dequeue_bytes() {
            Ok(_) => {}
            Err(Error::Shutdown(_)) => return,
            Err(e) => panic!("rank {rank}: {e}"),
        }
    }
}
