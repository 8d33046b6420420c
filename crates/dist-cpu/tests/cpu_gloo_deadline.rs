//! gloo's mesh connect keeps the communicator's deadline. gloo itself waits five times the
//! context's timeout for a pair to connect; a peer that published its address and never
//! connects (or whose address swallows the connection attempt, as a wrong interface does) must
//! fail this rank within the timeout plus a small slack, with an error naming the op and the
//! peer. Loopback only: the peer is a fake that writes gloo's rendezvous keys itself.
#![cfg(feature = "gloo")]

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::local::MemStore;
use dist_core::{Error, Store};
use dist_cpu::gloo::GlooCommunicator;

/// gloo's `tcp::Address` as its 2022 snapshot serialises it: a `sockaddr_storage` (128 bytes)
/// followed by a sequence number (`ssize_t`).
fn gloo_address(addr: SocketAddrV4) -> Vec<u8> {
    let mut b = vec![0u8; 136];
    b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    b[2..4].copy_from_slice(&addr.port().to_be_bytes());
    b[4..8].copy_from_slice(&addr.ip().octets());
    b[128..].copy_from_slice(&(-1i64).to_ne_bytes());
    b
}

/// Rank 0 of a 2-rank group whose rank 1 is a fake that published `peer` as its address and
/// does nothing else; rank 0 listens on `me`.
fn connect_to_fake(me: &str, peer: SocketAddrV4, timeout: Duration) -> (Error, Duration) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let group = format!("deadline-{}", peer.port());
    store
        .set(&format!("dist-gloo/{group}/1"), &gloo_address(peer))
        .unwrap();
    store
        .set(&format!("dist-gloo/{group}/rank_1"), b"fake-peer")
        .unwrap();
    std::env::set_var("DIST_GLOO_HOSTNAME", me);
    let t = Instant::now();
    let e = GlooCommunicator::new(store, &group, 0, 2, timeout).unwrap_err();
    (e, t.elapsed())
}

fn check(e: &Error, took: Duration, timeout: Duration, case: &str) {
    eprintln!("{case}: {took:?}: {e}");
    assert!(
        took < timeout + Duration::from_millis(1500),
        "{case}: failed after {took:?} with a {timeout:?} deadline: {e}"
    );
    match e {
        Error::Timeout {
            op, missing_ranks, ..
        } => {
            assert!(op.contains("connect"), "{case}: {e}");
            assert_eq!(missing_ranks, &[1], "{case}: {e}");
        }
        _ => panic!("{case}: not a timeout: {e}"),
    }
}

/// Both sides of gloo's pair connect, in one test because they set `DIST_GLOO_HOSTNAME`.
#[test]
fn a_peer_that_never_connects_fails_within_the_deadline() {
    let timeout = Duration::from_secs(2);

    // 1. This rank listens (its address sorts first) and the peer never dials in.
    let (e, took) = connect_to_fake(
        "127.0.0.1",
        SocketAddrV4::new(Ipv4Addr::new(127, 255, 255, 254), 4242),
        timeout,
    );
    check(&e, took, timeout, "listening side");

    // 2. This rank dials (its address sorts last) an address that drops the SYN: a listener
    // whose accept queue is full, as a peer behind the wrong interface would.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: listen(2) on a socket this test owns; it only shrinks the accept queue.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    }
    let std::net::SocketAddr::V4(peer) = l.local_addr().unwrap() else {
        unreachable!()
    };
    let _fill: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&peer.into(), Duration::from_millis(200)).ok())
        .collect();
    let (e, took) = connect_to_fake("127.0.0.2", peer, timeout);
    check(&e, took, timeout, "dialling side");
}
