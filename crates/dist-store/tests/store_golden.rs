//! Golden byte transcripts of PyTorch's TCPStore protocol, written by hand from PyTorch's
//! sources (`TCPStore.cpp` client, `TCPStoreLibUvBackend.cpp` server), so CI checks the wire
//! format without PyTorch: every request is encoded to exactly these bytes and decoded back,
//! and a live server answers each one with exactly the reply bytes shown.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dist_store::proto::{decode_request, Decoded, Limits, Request, VALIDATION_MAGIC};
use dist_store::{ServerOptions, StoreServer};

/// Hex with optional spaces and `|` separators.
fn h(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn k(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// (request, its bytes, the server's reply bytes in the session below).
fn transcript() -> Vec<(Request, Vec<u8>, Vec<u8>)> {
    vec![
        (Request::Validate { magic: VALIDATION_MAGIC }, h("00 | ce f7 85 3c"), vec![]),
        (Request::Ping { nonce: 0x0102_0304 }, h("0d | 04 03 02 01"), h("04 03 02 01")),
        (
            Request::Set { key: k("k"), value: k("v1") },
            h("01 | 0100000000000000 6b | 0200000000000000 7631"),
            vec![],
        ),
        (Request::Get { key: k("k") }, h("03 | 0100000000000000 6b"), h("0200000000000000 7631")),
        (Request::Get { key: k("none") }, h("03 | 0400000000000000 6e6f6e65"), h("0000000000000000")),
        (
            Request::Add { key: k("n"), delta: 5 },
            h("04 | 0100000000000000 6e | 0500000000000000"),
            h("0500000000000000"),
        ),
        (
            Request::Add { key: k("n"), delta: -7 },
            h("04 | 0100000000000000 6e | f9ffffffffffffff"),
            h("feffffffffffffff"),
        ),
        // ADD keeps decimal text: GET n answers "-2".
        (Request::Get { key: k("n") }, h("03 | 0100000000000000 6e"), h("0200000000000000 2d32")),
        (
            Request::CompareSet { key: k("k"), expected: k("v1"), desired: k("v2") },
            h("02 | 0100000000000000 6b | 0200000000000000 7631 | 0200000000000000 7632"),
            h("0200000000000000 7632"),
        ),
        (
            Request::CompareSet { key: k("k"), expected: k("zz"), desired: k("v3") },
            h("02 | 0100000000000000 6b | 0200000000000000 7a7a | 0200000000000000 7633"),
            h("0200000000000000 7632"),
        ),
        // Missing key, non-empty expected: PyTorch answers `expected` and stores nothing.
        (
            Request::CompareSet { key: k("m"), expected: k("e"), desired: k("d") },
            h("02 | 0100000000000000 6d | 0100000000000000 65 | 0100000000000000 64"),
            h("0100000000000000 65"),
        ),
        // Missing key, empty expected: stores `desired`.
        (
            Request::CompareSet { key: k("c"), expected: vec![], desired: k("d") },
            h("02 | 0100000000000000 63 | 0000000000000000 | 0100000000000000 64"),
            h("0100000000000000 64"),
        ),
        (
            Request::Check { keys: vec![k("k"), k("zz")] },
            h("05 | 0200000000000000 | 0100000000000000 6b | 0200000000000000 7a7a"),
            h("01"),
        ),
        (
            Request::Check { keys: vec![k("k")] },
            h("05 | 0100000000000000 | 0100000000000000 6b"),
            h("00"),
        ),
        (
            Request::Wait { keys: vec![k("k")] },
            h("06 | 0100000000000000 | 0100000000000000 6b"),
            h("00"),
        ),
        // keys: k, n, c
        (Request::GetNumKeys, h("07"), h("0300000000000000")),
        (Request::DeleteKey { key: k("n") }, h("08 | 0100000000000000 6e"), h("0100000000000000")),
        (Request::DeleteKey { key: k("n") }, h("08 | 0100000000000000 6e"), h("0000000000000000")),
        (
            Request::Append { key: k("k"), value: k("!") },
            h("09 | 0100000000000000 6b | 0100000000000000 21"),
            vec![],
        ),
        (
            Request::MultiSet { pairs: vec![(k("a"), k("1")), (k("b"), vec![])] },
            h("0b | 0200000000000000 | 0100000000000000 61 0100000000000000 31 | 0100000000000000 62 0000000000000000"),
            vec![],
        ),
        (
            Request::MultiGet { keys: vec![k("k"), k("a"), k("x")] },
            h("0a | 0300000000000000 | 0100000000000000 6b | 0100000000000000 61 | 0100000000000000 78"),
            h("0300000000000000 763221 | 0100000000000000 31 | 0000000000000000"),
        ),
        // A wait that cannot complete, then its cancellation: only WAIT_CANCELED comes back.
        (
            Request::Wait { keys: vec![k("w")] },
            h("06 | 0100000000000000 | 0100000000000000 77"),
            vec![],
        ),
        (Request::CancelWait, h("0c"), h("01")),
        (
            Request::QueuePush { key: k("q"), value: k("x") },
            h("0e | 0100000000000000 71 | 0100000000000000 78"),
            vec![],
        ),
        (Request::QueueLen { key: k("q") }, h("10 | 0100000000000000 71"), h("0100000000000000")),
        // QUEUE_POP answers the length before the pop, then the item.
        (
            Request::QueuePop { key: k("q") },
            h("0f | 0100000000000000 71"),
            h("0100000000000000 | 0100000000000000 78"),
        ),
        (Request::QueuePop { key: k("q") }, h("0f | 0100000000000000 71"), h("0000000000000000")),
        // Our extension: AUTH on a server without a token is accepted (0).
        (Request::Auth { token: k("t") }, h("a0 | 0100000000000000 74"), h("00")),
        // Our extensions: HELLO answers the feature bits (1 = WAIT_GET); WAIT_GET answers
        // STOP_WAITING then the values (here at once: the keys exist).
        (Request::Hello { features: 0 }, h("a2 | 00000000"), h("0100000000000000")),
        (
            Request::WaitGet { keys: vec![k("a"), k("k")] },
            h("a1 | 0200000000000000 | 0100000000000000 61 | 0100000000000000 6b"),
            h("00 | 0100000000000000 31 | 0300000000000000 763221"),
        ),
    ]
}

#[test]
fn requests_encode_to_and_decode_from_the_golden_bytes() {
    for (req, bytes, _) in transcript() {
        assert_eq!(req.to_bytes(), bytes, "encoding of {req:?}");
        assert_eq!(
            decode_request(&bytes, &Limits::torch()).unwrap(),
            Decoded::Complete(req.clone(), bytes.len()),
            "decoding of {req:?}"
        );
    }
}

#[test]
fn a_live_server_answers_the_golden_bytes() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (req, bytes, reply) in transcript() {
        c.write_all(&bytes).unwrap();
        let mut got = vec![0u8; reply.len()];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reply to {req:?}: {e}"));
        assert_eq!(got, reply, "reply to {req:?}");
    }
    // Nothing else was sent: a ping's reply is the next thing on the wire.
    c.write_all(&h("0d | 09 00 00 00")).unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, [9, 0, 0, 0]);
}

#[test]
fn the_first_request_must_be_validate() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&h("0d | 01 00 00 00")).unwrap();
    let mut b = [0u8; 4];
    // Dropped: EOF (or a reset), never a reply.
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    // Wrong magic: dropped too.
    let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&h("00 | 01 02 03 04 | 0d 01 00 00 00"))
        .unwrap();
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
}
