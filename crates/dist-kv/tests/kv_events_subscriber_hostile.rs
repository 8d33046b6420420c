//! Hostile publishers against the KV-event subscriber, on loopback, every wait bounded: a
//! message over the size limit on the live and on the replay socket (libzmq drops the
//! connection and, for a connecting socket, never reconnects: the old subscriber heard nothing
//! more and said nothing), garbage after it, and no false alarm when a publisher merely
//! restarts.

use std::time::{Duration, Instant};

use dist_kv::events::{
    encode_batch, sample_batch, KvEventSubscriber, SubscriberOptions, WireFormat,
    DEFAULT_MAX_MESSAGE,
};
use dist_kv::Error;

/// An XPUB bound on a free loopback port (it sees subscriptions, so the test knows when the
/// subscriber is connected) and its endpoint.
fn xpub(ctx: &zmq::Context) -> (zmq::Socket, String) {
    let s = ctx.socket(zmq::XPUB).unwrap();
    s.set_linger(0).unwrap();
    // Every subscription, not only the first of each topic.
    s.set_xpub_verbose(true).unwrap();
    s.bind("tcp://127.0.0.1:*").unwrap();
    let ep = s.get_last_endpoint().unwrap().unwrap();
    (s, ep)
}

/// A ROUTER socket on loopback standing in for the publisher's replay socket, and its endpoint.
fn replay_router(ctx: &zmq::Context) -> (zmq::Socket, String) {
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.bind("tcp://127.0.0.1:*").unwrap();
    let ep = s.get_last_endpoint().unwrap().unwrap();
    (s, ep)
}

/// Waits (at most 5 s) for a subscription message on `xpub` (skipping the unsubscriptions of
/// connections that went).
fn wait_subscribed(xpub: &zmq::Socket) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i64;
        assert!(
            xpub.poll(zmq::POLLIN, left).unwrap() > 0,
            "no subscription within 5 s"
        );
        if xpub.recv_bytes(0).unwrap().first() == Some(&1) {
            return;
        }
    }
}

fn batch(seq: u64) -> [Vec<u8>; 3] {
    [
        b"kv".to_vec(),
        seq.to_be_bytes().to_vec(),
        encode_batch(&sample_batch(seq, None), WireFormat::Array).unwrap(),
    ]
}

/// One message over the default 64 MiB limit. The subscriber says so, naming
/// the endpoint and the limit, reconnects, and hears what follows.
#[test]
fn an_oversized_live_message_is_reported_and_the_subscriber_reconnects() {
    let ctx = zmq::Context::new();
    let (publ, ep) = xpub(&ctx);
    let sub = KvEventSubscriber::connect_in(&ctx, &ep, None, "").unwrap();
    assert_eq!(sub.max_message_bytes(), DEFAULT_MAX_MESSAGE);
    wait_subscribed(&publ);
    publ.send_multipart(batch(0), 0).unwrap();
    assert_eq!(sub.recv(Duration::from_secs(5)).unwrap().unwrap().seq, 0);
    let big = vec![0u8; DEFAULT_MAX_MESSAGE as usize + 1];
    publ.send_multipart([b"kv".as_slice(), &1u64.to_be_bytes(), &big], 0)
        .unwrap();
    drop(big);
    // Reported once, within the grace after the drop.
    let start = Instant::now();
    let err = loop {
        match sub.recv(Duration::from_millis(100)) {
            Ok(None) => {}
            Ok(Some(b)) => panic!("received {} past the limit", b.seq),
            Err(e) => break e,
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the drop went unreported"
        );
    };
    match &err {
        Error::Dropped { endpoint, limit } => {
            assert_eq!(
                (endpoint.as_str(), *limit),
                (ep.as_str(), DEFAULT_MAX_MESSAGE)
            )
        }
        e => panic!("{e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("67108864-byte limit") && msg.contains(&ep),
        "{msg}"
    );
    // The subscriber connected again: its subscription arrives, and so do the next batches.
    wait_subscribed(&publ);
    for seq in 2..5 {
        publ.send_multipart(batch(seq), 0).unwrap();
        let got = sub.recv(Duration::from_secs(5)).unwrap().expect("a batch");
        assert_eq!(got.seq, seq);
    }
}

/// The same on the replay socket: an oversized replayed batch is reported, and the next
/// replay request is answered.
#[test]
fn an_oversized_replay_is_reported_and_the_next_replay_works() {
    let ctx = zmq::Context::new();
    let (publ, ep) = xpub(&ctx);
    let (router, rep) = replay_router(&ctx);
    let opts = SubscriberOptions {
        max_message_bytes: 1 << 20,
    };
    let sub = KvEventSubscriber::connect_with(&ctx, &ep, Some(&rep), "", opts).unwrap();
    wait_subscribed(&publ);
    let serve = |payload: Vec<u8>| {
        assert!(
            router.poll(zmq::POLLIN, 5000).unwrap() > 0,
            "no replay request"
        );
        let req = router.recv_multipart(0).unwrap();
        let client = req[0].clone();
        router
            .send_multipart(
                [client.clone(), vec![], 7u64.to_be_bytes().to_vec(), payload],
                0,
            )
            .unwrap();
        router
            .send_multipart([client, vec![], vec![0xff; 8], vec![]], 0)
            .unwrap();
    };
    sub.request_replay(7).unwrap();
    serve(vec![0u8; 2 << 20]);
    let err = sub
        .recv_replay(Instant::now() + Duration::from_secs(5))
        .unwrap_err();
    assert!(
        matches!(err, Error::Dropped { limit, .. } if limit == 1 << 20),
        "{err}"
    );
    // Reconnected: the next request is answered. (A ROUTER forgets a peer that reconnected
    // only when it sends again; give the new connection a moment.)
    std::thread::sleep(Duration::from_millis(200));
    sub.request_replay(7).unwrap();
    serve(batch(7)[2].clone());
    let got = sub
        .recv_replay(Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 7);
}

/// Bytes that are not a batch are an error for that message, and the next one is read.
#[test]
fn garbage_is_an_error_per_message_not_the_end_of_the_stream() {
    let ctx = zmq::Context::new();
    let (publ, ep) = xpub(&ctx);
    let sub = KvEventSubscriber::connect_in(&ctx, &ep, None, "").unwrap();
    wait_subscribed(&publ);
    publ.send_multipart([b"kv".as_slice(), b"short"], 0)
        .unwrap();
    publ.send_multipart(
        [b"kv".as_slice(), &0u64.to_be_bytes(), &[0xc1, 0xff, 0x00]],
        0,
    )
    .unwrap();
    publ.send_multipart(batch(9), 0).unwrap();
    assert!(sub.recv(Duration::from_secs(5)).is_err());
    assert!(sub.recv(Duration::from_secs(5)).is_err());
    assert_eq!(sub.recv(Duration::from_secs(5)).unwrap().unwrap().seq, 9);
}

/// A publisher that restarts on the same port is an ordinary disconnect: libzmq reconnects
/// and the subscriber reports no drop.
#[test]
fn a_restarting_publisher_is_no_false_alarm() {
    let ctx = zmq::Context::new();
    let (publ, ep) = xpub(&ctx);
    let sub = KvEventSubscriber::connect_in(&ctx, &ep, None, "").unwrap();
    wait_subscribed(&publ);
    drop(publ);
    // Longer than the drop grace, with the publisher gone.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        assert!(sub.recv(Duration::from_millis(100)).unwrap().is_none());
    }
    let again = ctx.socket(zmq::XPUB).unwrap();
    again.set_linger(0).unwrap();
    again.bind(&ep).unwrap();
    wait_subscribed(&again);
    again.send_multipart(batch(3), 0).unwrap();
    assert_eq!(sub.recv(Duration::from_secs(5)).unwrap().unwrap().seq, 3);
}

/// Subscribers (and their monitors) come and go in one context while another keeps receiving:
/// libzmq's monitor sends block, so a monitor left without its reader would stall the context.
#[test]
fn subscribers_come_and_go_without_stalling_the_context() {
    let ctx = zmq::Context::new();
    let (publ, ep) = xpub(&ctx);
    let (_router, rep) = replay_router(&ctx);
    let steady = KvEventSubscriber::connect_in(&ctx, &ep, None, "").unwrap();
    wait_subscribed(&publ);
    for round in 0..20u64 {
        let s = KvEventSubscriber::connect_in(&ctx, &ep, Some(&rep), "").unwrap();
        wait_subscribed(&publ);
        publ.send_multipart(batch(round), 0).unwrap();
        assert_eq!(s.recv(Duration::from_secs(5)).unwrap().unwrap().seq, round);
        drop(s);
        assert_eq!(
            steady.recv(Duration::from_secs(5)).unwrap().unwrap().seq,
            round,
            "the context stalled after {round} subscribers went"
        );
    }
}
