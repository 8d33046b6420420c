//! vLLM's `tests/distributed/test_events.py`, re-done against the Rust publisher and subscriber,
//! plus the cases it does not cover (connect mode, ipc, malformed frames, shutdown deadlines).
//!
//! Every wait is bounded. Endpoints are `inproc://` names unique to the test, `tcp://127.0.0.1:*`
//! (libzmq picks a free port) or, where a fixed port is needed for the DP offset, a port found free.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dist_kv::events::*;
use dist_kv::Error;

const RECV: Duration = Duration::from_secs(10);

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// vLLM's `publisher_config` fixture: buffer_steps 100, hwm 1000, topic "test".
fn config(endpoint: &str, replay: Option<&str>) -> KvEventsConfig {
    KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: Some(PublisherKind::Zmq),
        endpoint: endpoint.into(),
        replay_endpoint: replay.map(Into::into),
        buffer_steps: 100,
        hwm: 1000,
        topic: "test".into(),
        ..Default::default()
    }
}

/// Both transports vLLM's fixture offers: inproc names and TCP on loopback.
fn transports() -> Vec<(String, Option<String>)> {
    let name = unique("inproc://kv-test");
    vec![
        (name.clone(), Some(format!("{name}-replay"))),
        ("tcp://127.0.0.1:*".into(), Some("tcp://127.0.0.1:*".into())),
    ]
}

fn start(endpoint: &str, replay: Option<&str>) -> (ZmqEventPublisher, KvEventSubscriber) {
    let publisher =
        ZmqEventPublisher::new(0, &config(endpoint, replay), ZmqPublisherOptions::default())
            .unwrap();
    let subscriber = KvEventSubscriber::connect(
        publisher.bound_endpoint(),
        publisher.bound_replay_endpoint(),
        "test",
    )
    .unwrap();
    subscribed(&publisher, 1);
    (publisher, subscriber)
}

/// A publisher drops what it sends before a subscription reaches it. vLLM's tests sleep 0.1 s; this
/// waits until the publisher has taken in `n` subscriptions, which holds on a loaded machine too.
fn subscribed(p: &ZmqEventPublisher, n: u64) {
    p.wait_for_subscribers(n, Instant::now() + RECV).unwrap();
}

fn wait_sent(p: &ZmqEventPublisher, n: u64) {
    let deadline = Instant::now() + RECV;
    while p.stats().sent.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "publisher sent only {:?} of {n}",
            p.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn basic_publishing_first_seq_is_zero_and_batch_round_trips() {
    for (ep, replay) in transports() {
        let (publisher, sub) = start(&ep, replay.as_deref());
        publisher.publish(sample_batch(0, None)).unwrap();
        let got = sub.recv(RECV).unwrap().expect("no message received");
        assert_eq!(got.seq, 0, "{ep}");
        assert_eq!(got.topic, b"test");
        // The publisher stamps its DP rank on a batch that has none.
        assert_eq!(got.batch, sample_batch(0, Some(0)));
        publisher.shutdown().unwrap();
    }
}

#[test]
fn multiple_batches_get_seq_0_to_9() {
    for (ep, replay) in transports() {
        let (publisher, sub) = start(&ep, replay.as_deref());
        for i in 0..10 {
            publisher.publish(sample_batch(i, Some(5))).unwrap();
        }
        let mut seqs = Vec::new();
        for _ in 0..10 {
            let r = sub.recv(RECV).unwrap().expect("missing batch");
            assert_eq!(
                r.batch,
                sample_batch(r.seq, Some(5)),
                "a set DP rank is kept"
            );
            seqs.push(r.seq);
        }
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "{ep}");
    }
}

#[test]
fn replay_from_a_sequence_number() {
    for (ep, replay) in transports() {
        let (publisher, sub) = start(&ep, replay.as_deref());
        for i in 0..19 {
            publisher.publish(sample_batch(i, None)).unwrap();
        }
        for _ in 0..19 {
            assert!(sub.recv(RECV).unwrap().is_some());
        }
        sub.request_replay(10).unwrap();
        let replayed = sub.recv_replay(Instant::now() + RECV).unwrap();
        let seqs: Vec<u64> = replayed.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (10..19).collect::<Vec<_>>(), "{ep}");
        for (seq, batch) in replayed {
            assert_eq!(batch, sample_batch(seq, Some(0)));
        }
        // A replay past the end is just the end marker.
        sub.request_replay(1000).unwrap();
        assert!(sub.recv_replay(Instant::now() + RECV).unwrap().is_empty());
        assert_eq!(publisher.stats().replays.load(Ordering::Relaxed), 2);
    }
}

#[test]
fn buffer_limit_keeps_the_last_buffer_steps_batches() {
    let (ep, replay) = transports().remove(0);
    let (publisher, sub) = start(&ep, replay.as_deref());
    let buffer = 100;
    for i in 0..buffer + 10 {
        publisher.publish(sample_batch(i, None)).unwrap();
    }
    wait_sent(&publisher, buffer + 10);
    sub.request_replay(0).unwrap();
    let replayed = sub.recv_replay(Instant::now() + RECV).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (10..buffer + 10).collect::<Vec<_>>());
}

#[test]
fn topic_filtering() {
    let mut cfg = config("tcp://127.0.0.1:*", None);
    cfg.topic = "foo".into();
    let publisher = ZmqEventPublisher::new(0, &cfg, ZmqPublisherOptions::default()).unwrap();
    let sub_foo = KvEventSubscriber::connect(publisher.bound_endpoint(), None, "foo").unwrap();
    let sub_bar = KvEventSubscriber::connect(publisher.bound_endpoint(), None, "bar").unwrap();
    subscribed(&publisher, 2);
    for i in 0..3 {
        publisher.publish(sample_batch(i, None)).unwrap();
    }
    for i in 0..3 {
        let r = sub_foo
            .recv(RECV)
            .unwrap()
            .expect("matching topic receives");
        assert_eq!((r.seq, r.topic.as_slice()), (i, &b"foo"[..]));
    }
    for _ in 0..3 {
        assert!(sub_bar.recv(Duration::from_millis(200)).unwrap().is_none());
    }
}

#[test]
fn high_volume_most_batches_arrive_in_order() {
    let (ep, replay) = transports().remove(1);
    let (publisher, sub) = start(&ep, replay.as_deref());
    let num_batches = 10_000u64;
    // 100 events a batch, as vLLM's test; small events keep the run in seconds.
    let events: Vec<KvCacheEvent> = (0..100u64)
        .map(|i| {
            KvCacheEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![BlockHash::from(i)],
                medium: Some(MEDIUM_GPU.into()),
                group_idx: None,
            })
        })
        .collect();
    let start_t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..num_batches {
                publisher
                    .publish(KvEventBatch::now(events.clone()))
                    .unwrap();
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        let mut seqs = Vec::new();
        // vLLM allows 10 s; a loaded 2-core machine gets more (the loop ends when all arrived).
        let deadline = Instant::now() + Duration::from_secs(60);
        while (seqs.len() as u64) < num_batches && Instant::now() < deadline {
            if let Some(r) = sub.recv(Duration::from_millis(100)).unwrap() {
                assert_eq!(r.batch.events.len(), 100);
                seqs.push(r.seq);
            }
        }
        println!(
            "high volume: received {} of {num_batches} batches in {:?}",
            seqs.len(),
            start_t.elapsed()
        );
        assert!(
            seqs.len() as u64 >= num_batches * 9 / 10,
            "received {} of {num_batches}",
            seqs.len()
        );
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "sequence numbers in order"
        );
    });
}

#[test]
fn null_publisher_accepts_everything() {
    let p = NullEventPublisher::default();
    p.publish(sample_batch(0, None)).unwrap();
    p.shutdown().unwrap();
    p.publish(sample_batch(1, None)).unwrap();
    assert_eq!(p.kind(), PublisherKind::Null);
}

fn free_port_pair() -> u16 {
    // Two consecutive free ports (DP ranks 0 and 1), and +100/+101 free for the factory test.
    // Candidates come from below the kernel's ephemeral range (32768..), where other tests'
    // outgoing connections do not land, starting at a per-process offset.
    let mut p = 20_000 + (std::process::id() as u16 % 4_000) * 2;
    for _ in 0..500 {
        p = if p + 200 >= 32_000 { 20_000 } else { p + 7 };
        let ok = [0u16, 1, 100, 101]
            .iter()
            .map(|d| std::net::TcpListener::bind(("127.0.0.1", p + d)))
            .collect::<Vec<_>>()
            .iter()
            .all(Result::is_ok);
        if ok {
            return p;
        }
    }
    panic!("no free pair of ports");
}

#[test]
fn data_parallel_rank_tagging_and_endpoint_offsets() {
    let port = free_port_pair();
    let name = unique("inproc://kv-dp");
    for base in [format!("tcp://127.0.0.1:{port}"), name.clone()] {
        // Bind explicitly on loopback: the rule binds on "*"; use the connectable form for subs.
        let bind_ep = base.replace("127.0.0.1", "*");
        let mut cfg = config(&bind_ep, None);
        cfg.topic = "foo".into();
        let p0 = ZmqEventPublisher::new(0, &cfg, ZmqPublisherOptions::default()).unwrap();
        let p1 = ZmqEventPublisher::new(1, &cfg, ZmqPublisherOptions::default()).unwrap();
        let (e0, e1) = if base.starts_with("tcp") {
            (base.clone(), format!("tcp://127.0.0.1:{}", port + 1))
        } else {
            (base.clone(), format!("{base}_dp1"))
        };
        assert_eq!(p1.endpoint(), e1.replace("127.0.0.1", "*"));
        let s0 = KvEventSubscriber::connect(&e0, None, "foo").unwrap();
        let s1 = KvEventSubscriber::connect(&e1, None, "foo").unwrap();
        subscribed(&p0, 1);
        subscribed(&p1, 1);
        p0.publish(KvEventBatch::now(vec![KvCacheEvent::AllBlocksCleared; 2]))
            .unwrap();
        p1.publish(KvEventBatch::now(vec![KvCacheEvent::AllBlocksCleared; 3]))
            .unwrap();
        let r0 = s0.recv(RECV).unwrap().expect("rank 0 batch");
        let r1 = s1.recv(RECV).unwrap().expect("rank 1 batch");
        assert_eq!(r0.batch.data_parallel_rank, Some(0));
        assert_eq!(r1.batch.data_parallel_rank, Some(1));
        assert_eq!((r0.batch.events.len(), r1.batch.events.len()), (2, 3));
        p0.shutdown().unwrap();
        p1.shutdown().unwrap();
    }
    // ipc:// cannot be offset (vLLM raises ValueError).
    let cfg = config("ipc:///tmp/dist-kv-never", None);
    assert!(matches!(
        ZmqEventPublisher::new(1, &cfg, ZmqPublisherOptions::default()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn publisher_factory() {
    let p = create_publisher(None, 0, ZmqPublisherOptions::default()).unwrap();
    assert_eq!(p.kind(), PublisherKind::Null);
    p.shutdown().unwrap();

    let disabled = KvEventsConfig {
        enable_kv_cache_events: false,
        publisher: Some(PublisherKind::Zmq),
        endpoint: "tcp://localhost:5557".into(),
        ..Default::default()
    };
    assert_eq!(
        create_publisher(Some(&disabled), 0, Default::default())
            .unwrap()
            .kind(),
        PublisherKind::Null
    );

    let port = free_port_pair();
    let cfg = KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: Some(PublisherKind::Zmq),
        endpoint: format!("tcp://*:{port}"),
        replay_endpoint: Some(format!("tcp://*:{}", port + 100)),
        ..Default::default()
    };
    let p = ZmqEventPublisher::new(1, &cfg, ZmqPublisherOptions::default()).unwrap();
    assert_eq!(p.endpoint(), format!("tcp://*:{}", port + 1));
    assert_eq!(
        p.replay_endpoint(),
        Some(format!("tcp://*:{}", port + 101).as_str())
    );
    assert_eq!(cfg.endpoint, format!("tcp://*:{port}"), "config unchanged");
    p.shutdown().unwrap();
    let p = create_publisher(Some(&cfg), 0, Default::default()).unwrap();
    assert_eq!((p.kind(), p.data_parallel_rank()), (PublisherKind::Zmq, 0));
    p.shutdown().unwrap();

    // Publisher not specified, events enabled: zmq (connects, since there is no wildcard).
    let cfg = KvEventsConfig {
        enable_kv_cache_events: true,
        endpoint: "tcp://localhost:5557".into(),
        ..Default::default()
    };
    let p = create_publisher(Some(&cfg), 0, Default::default()).unwrap();
    assert_eq!(p.kind(), PublisherKind::Zmq);
    p.shutdown().unwrap();
}

#[test]
fn connect_mode_publisher_reaches_a_binding_subscriber() {
    let sub = KvEventSubscriber::connect("tcp://127.0.0.1:*", None, "").unwrap();
    let ep = sub.endpoint().to_owned();
    assert!(!should_bind(&ep));
    let mut cfg = config(&ep, None);
    cfg.topic = String::new();
    let publisher = ZmqEventPublisher::new(0, &cfg, ZmqPublisherOptions::default()).unwrap();
    // A bound SUB takes in a new connection, and sends its subscription over it, only when the
    // application calls into the socket; a real subscriber sits in recv, so poll it while waiting.
    let deadline = Instant::now() + RECV;
    while publisher.stats().subscriptions.load(Ordering::Acquire) < 1 {
        assert!(Instant::now() < deadline, "no subscription over {ep}");
        assert!(sub.recv(Duration::from_millis(10)).unwrap().is_none());
    }
    publisher.publish(sample_batch(3, None)).unwrap();
    let r = sub
        .recv(RECV)
        .unwrap()
        .unwrap_or_else(|| panic!("no batch over a connecting publisher {ep}: {publisher:?}"));
    assert_eq!((r.seq, r.batch), (0, sample_batch(3, Some(0))));
}

#[test]
fn ipc_endpoint_and_map_wire_format() {
    let path = std::env::temp_dir().join(unique("dist-kv-ipc"));
    let ep = format!("ipc://{}", path.display());
    let options = ZmqPublisherOptions {
        wire_format: WireFormat::Map,
        ..Default::default()
    };
    let publisher = ZmqEventPublisher::new(0, &config(&ep, None), options).unwrap();
    let sub = KvEventSubscriber::connect(&ep, None, "test").unwrap();
    subscribed(&publisher, 1);
    publisher.publish(sample_batch(1, None)).unwrap();
    let r = sub.recv(RECV).unwrap().expect("batch over ipc");
    assert_eq!(r.batch, sample_batch(1, Some(0)));
    publisher.shutdown().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn malformed_replay_requests_are_ignored_and_malformed_live_messages_are_errors() {
    let (ep, replay) = transports().remove(0);
    let (publisher, sub) = start(&ep, replay.as_deref());
    publisher.publish(sample_batch(0, None)).unwrap();
    assert!(sub.recv(RECV).unwrap().is_some());

    let ctx = global_context();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_linger(0).unwrap();
    dealer
        .connect(publisher.bound_replay_endpoint().unwrap())
        .unwrap();
    dealer
        .send_multipart([&b""[..], &[0, 1, 2][..]], 0)
        .unwrap(); // short start_seq
    dealer
        .send_multipart([&b"x"[..], &0u64.to_be_bytes()[..]], 0)
        .unwrap(); // no empty delimiter
    dealer.send(&b"lonely"[..], 0).unwrap(); // two frames with the identity
    let deadline = Instant::now() + RECV;
    while publisher
        .stats()
        .bad_replay_requests
        .load(Ordering::Relaxed)
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "bad requests not seen: {:?}",
            publisher.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        dealer.poll(zmq::POLLIN, 100).unwrap(),
        0,
        "no answer to a malformed request"
    );
    // A good request still works afterwards.
    sub.request_replay(0).unwrap();
    assert_eq!(sub.recv_replay(Instant::now() + RECV).unwrap().len(), 1);

    // A rogue publisher sending garbage: the subscriber reports an error per message and goes on.
    let rogue = ctx.socket(zmq::XPUB).unwrap();
    rogue.set_linger(0).unwrap();
    let rogue_ep = unique("inproc://kv-rogue");
    rogue.bind(&rogue_ep).unwrap();
    let s = KvEventSubscriber::connect(&rogue_ep, None, "").unwrap();
    assert_eq!(
        rogue.poll(zmq::POLLIN, 10_000).unwrap(),
        1,
        "subscription reaches the rogue"
    );
    assert_eq!(
        rogue.recv_bytes(0).unwrap(),
        vec![1u8],
        "subscribe to everything"
    );
    rogue
        .send_multipart(
            [
                &b"t"[..],
                &0u64.to_be_bytes()[..],
                &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            ],
            0,
        )
        .unwrap();
    rogue
        .send_multipart([&b"t"[..], &[1u8][..], &[0x90][..]], 0)
        .unwrap();
    rogue.send(&b"one frame"[..], 0).unwrap();
    let good = encode_batch(&sample_batch(9, Some(1)), WireFormat::Array).unwrap();
    rogue
        .send_multipart([&b"t"[..], &7u64.to_be_bytes()[..], &good[..]], 0)
        .unwrap();
    for what in ["huge array", "short seq", "one frame"] {
        assert!(matches!(sub_recv(&s), Err(Error::Decode(_))), "{what}");
    }
    let r = sub_recv(&s).unwrap().unwrap();
    assert_eq!((r.seq, r.batch), (7, sample_batch(9, Some(1))));
}

fn sub_recv(s: &KvEventSubscriber) -> dist_kv::Result<Option<ReceivedBatch>> {
    s.recv(RECV)
}

#[test]
fn shutdown_is_bounded_idempotent_and_final() {
    let (ep, replay) = transports().remove(1);
    let (publisher, sub) = start(&ep, replay.as_deref());
    for i in 0..50 {
        publisher.publish(sample_batch(i, None)).unwrap();
    }
    let t = Instant::now();
    publisher.shutdown().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert_eq!(
        publisher.stats().sent.load(Ordering::Relaxed),
        50,
        "queue drained before exit"
    );
    publisher.shutdown().unwrap();
    assert!(matches!(
        publisher.publish(sample_batch(0, None)),
        Err(Error::Closed(_))
    ));
    drop(sub);
    // Dropping a running publisher shuts it down too.
    let p = ZmqEventPublisher::new(
        0,
        &config("tcp://127.0.0.1:*", None),
        ZmqPublisherOptions::default(),
    )
    .unwrap();
    let t = Instant::now();
    drop(p);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn bind_errors_name_the_endpoint() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ep = format!("tcp://*:{port}");
    let err =
        ZmqEventPublisher::new(0, &config(&ep, None), ZmqPublisherOptions::default()).unwrap_err();
    assert!(err.to_string().contains(&format!("bind PUB {ep}")), "{err}");
    let err = ZmqEventPublisher::new(
        0,
        &config("tcp://*:notaport", None),
        ZmqPublisherOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tcp://*:notaport"), "{err}");
    let mut cfg = config("tcp://127.0.0.1:*", None);
    cfg.max_queue_size = 0;
    assert!(matches!(
        ZmqEventPublisher::new(0, &cfg, ZmqPublisherOptions::default()),
        Err(Error::InvalidArgument(_))
    ));
}
