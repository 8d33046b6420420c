//! The store over real sockets on 127.0.0.1, port 0: every operation's semantics, waits and
//! their deadlines, authentication, reconnection and IPv6.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::Store;
use dist_store::{ClientOptions, ServerOptions, StoreServer, TcpStoreClient};
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(10);

fn server() -> StoreServer {
    StoreServer::start(ServerOptions::default()).unwrap()
}

fn client(s: &StoreServer) -> TcpStoreClient {
    TcpStoreClient::connect(
        "127.0.0.1",
        s.port(),
        ClientOptions {
            timeout: T,
            connect_timeout: T,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn every_operation_matches_pytorch_semantics() {
    let s = server();
    let c = client(&s);
    assert!(c.has_wait_get());
    every_operation(&c);
}

#[test]
fn every_operation_without_extensions_and_the_fallback_from_a_torch_like_server() {
    // A server that closes on HELLO, as PyTorch's does: the client falls back by itself.
    let s = StoreServer::start(ServerOptions {
        extensions: false,
        ..Default::default()
    })
    .unwrap();
    let c = client(&s);
    assert!(!c.has_wait_get());
    every_operation(&c);
    // A client told to speak PyTorch's protocol exactly, against our server.
    let s = server();
    let c = TcpStoreClient::connect(
        "127.0.0.1",
        s.port(),
        ClientOptions {
            extensions: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!c.has_wait_get());
    every_operation(&c);
}

fn every_operation(c: &TcpStoreClient) {
    c.set("a", b"1").unwrap();
    assert_eq!(c.get("a", T).unwrap(), b"1");
    assert_eq!(c.num_keys().unwrap(), 1);
    // add: decimal text, created at 0.
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -7).unwrap(), -2);
    assert_eq!(c.get("n", T).unwrap(), b"-2");
    // compare_set: the three cases.
    assert_eq!(c.compare_set("cs", b"", b"first").unwrap(), b"first");
    assert_eq!(c.compare_set("cs", b"wrong", b"x").unwrap(), b"first");
    assert_eq!(c.compare_set("cs", b"first", b"second").unwrap(), b"second");
    assert_eq!(c.compare_set("missing", b"exp", b"x").unwrap(), b"exp");
    assert!(!c.check(&["missing"]).unwrap());
    assert!(c.check(&["a", "n", "cs"]).unwrap());
    assert!(!c.check(&["a", "zz"]).unwrap());
    // append creates, then appends.
    c.append("ap", b"ab").unwrap();
    c.append("ap", b"cd").unwrap();
    assert_eq!(c.get("ap", T).unwrap(), b"abcd");
    // multi.
    c.multi_set(&["m1", "m2"], &[b"x", b""]).unwrap();
    assert_eq!(
        c.multi_get(&["m1", "m2", "a"], T).unwrap(),
        vec![b"x".to_vec(), vec![], b"1".to_vec()]
    );
    assert!(c.multi_set(&["m1"], &[]).is_err());
    // delete.
    assert!(c.delete("a").unwrap());
    assert!(!c.delete("a").unwrap());
    assert!(!c.check(&["a"]).unwrap());
    // queues.
    assert_eq!(c.queue_len("q").unwrap(), 0);
    assert_eq!(c.queue_pop("q", None).unwrap(), None);
    c.queue_push("q", b"i1").unwrap();
    c.queue_push("q", b"i2").unwrap();
    assert_eq!(c.queue_len("q").unwrap(), 2);
    assert!(c.check(&["q"]).unwrap());
    assert_eq!(c.queue_pop("q", Some(T)).unwrap().unwrap(), b"i1");
    assert_eq!(c.queue_pop("q", None).unwrap().unwrap(), b"i2");
    c.ping().unwrap();
}

#[test]
fn random_values_roundtrip_against_a_map() {
    let s = server();
    let c = client(&s);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut oracle = std::collections::HashMap::new();
    for i in 0..300 {
        let k = format!("k{}", rng.gen_range(0..50));
        let len = if i % 50 == 0 {
            1 << 20
        } else {
            rng.gen_range(0..300)
        };
        let v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        c.set(&k, &v).unwrap();
        oracle.insert(k, v);
    }
    for (k, v) in &oracle {
        assert_eq!(&c.get(k, T).unwrap(), v);
    }
    assert_eq!(c.num_keys().unwrap(), oracle.len() as u64);
}

#[test]
fn wait_is_woken_by_another_client_and_get_blocks_until_set() {
    let s = server();
    let a = Arc::new(client(&s));
    let b = client(&s);
    let a2 = a.clone();
    let h = std::thread::spawn(move || {
        a2.wait(&["x", "y"], T).unwrap();
        a2.get("z", T).unwrap()
    });
    std::thread::sleep(Duration::from_millis(50));
    b.set("x", b"1").unwrap();
    b.add("y", 1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.set("z", b"late").unwrap();
    assert_eq!(h.join().unwrap(), b"late");
}

#[test]
fn wait_times_out_names_missing_keys_and_the_connection_stays_usable() {
    let s = server();
    let c = client(&s);
    c.set("present", b"1").unwrap();
    let t0 = Instant::now();
    let e = c
        .wait(
            &["present", "absent1", "absent2"],
            Duration::from_millis(200),
        )
        .unwrap_err();
    let waited = t0.elapsed();
    assert!(e.is_timeout(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("absent1") && msg.contains("absent2"), "{msg}");
    assert!(!msg.contains("present,"), "{msg}");
    assert!(msg.contains("2 of 3"), "{msg}");
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(3));
    // The cancelled wait left nothing behind: a later set does not send a stray byte.
    c.set("absent1", b"x").unwrap();
    assert_eq!(c.get("absent1", T).unwrap(), b"x");
    let e = c.get("nope", Duration::from_millis(50)).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(c.check(&["present"]).unwrap());
}

#[test]
fn blocking_queue_pop_is_woken_by_a_push() {
    let s = server();
    let a = client(&s);
    let b = client(&s);
    let h = std::thread::spawn(move || a.queue_pop("jobs", Some(T)).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    b.queue_push("jobs", b"job1").unwrap();
    assert_eq!(h.join().unwrap().unwrap(), b"job1");
}

#[test]
fn many_clients_concurrently() {
    let s = server();
    let port = s.port();
    let n = 32;
    let hs: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let c =
                    TcpStoreClient::connect("127.0.0.1", port, ClientOptions::default()).unwrap();
                for j in 0..50 {
                    c.set(&format!("c{i}/{j}"), format!("{i}-{j}").as_bytes())
                        .unwrap();
                    c.add("total", 1).unwrap();
                }
                c.set(&format!("done{i}"), b"").unwrap();
                let keys: Vec<String> = (0..n).map(|k| format!("done{k}")).collect();
                let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
                c.wait(&refs, T).unwrap();
                c.get(&format!("c{}/49", (i + 1) % n), T).unwrap()
            })
        })
        .collect();
    for (i, h) in hs.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("{}-49", (i + 1) % n).as_bytes());
    }
    let c = client(&s);
    assert_eq!(c.get("total", T).unwrap(), (n * 50).to_string().as_bytes());
}

#[test]
fn token_is_required_when_configured() {
    let s = StoreServer::start(ServerOptions {
        token: Some(b"s3cret".to_vec()),
        ..Default::default()
    })
    .unwrap();
    let opts = |t: Option<&[u8]>| ClientOptions {
        token: t.map(|t| t.to_vec()),
        timeout: T,
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let good = TcpStoreClient::connect("127.0.0.1", s.port(), opts(Some(b"s3cret"))).unwrap();
    good.set("k", b"v").unwrap();
    let e = TcpStoreClient::connect("127.0.0.1", s.port(), opts(Some(b"wrong"))).unwrap_err();
    assert!(e.to_string().contains("refused our token"), "{e}");
    // No token at all (what a PyTorch client does): the connection is dropped.
    assert!(TcpStoreClient::connect("127.0.0.1", s.port(), opts(None)).is_err());
    assert_eq!(good.get("k", T).unwrap(), b"v");
    // A client with a token also works against an open server.
    let open = server();
    TcpStoreClient::connect("127.0.0.1", open.port(), opts(Some(b"any")))
        .unwrap()
        .ping()
        .unwrap();
}

#[test]
fn connect_retries_until_the_server_appears() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = std::thread::spawn(move || {
        TcpStoreClient::connect(
            "127.0.0.1",
            port,
            ClientOptions {
                connect_timeout: Duration::from_secs(10),
                ..Default::default()
            },
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let s = StoreServer::start(ServerOptions {
        port,
        ..Default::default()
    })
    .unwrap();
    let c = h.join().unwrap().unwrap();
    c.set("x", b"y").unwrap();
    drop(s);
    // Server gone: calls fail (quickly) instead of hanging.
    let c2 = TcpStoreClient::connect(
        "127.0.0.1",
        port,
        ClientOptions {
            connect_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    );
    assert!(c2.unwrap_err().is_timeout());
    let t0 = Instant::now();
    assert!(c.set("x", b"z").is_err() || c.get("x", Duration::from_millis(100)).is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
#[cfg_attr(
    dist_store_no_ipv6,
    ignore = "SKIPPED: no IPv6 loopback on the machine that built the tests"
)]
fn ipv6_loopback_when_available() {
    assert!(
        std::net::TcpListener::bind("[::1]:0").is_ok(),
        "the build found an IPv6 loopback, the test run has none"
    );
    let s = StoreServer::start(ServerOptions {
        host: "::1".into(),
        ..Default::default()
    })
    .unwrap();
    assert!(s.local_addr().is_ipv6());
    let c = TcpStoreClient::connect("::1", s.port(), ClientOptions::default()).unwrap();
    c.set("v6", b"yes").unwrap();
    assert_eq!(c.get("v6", T).unwrap(), b"yes");
}

#[test]
fn waits_racing_their_cancellation_across_loops_keep_every_connection_in_sync() {
    // 4 loops; waits time out (CANCEL_WAIT) while other connections, on other loops, set the
    // awaited keys: whichever wins, the next reply on each connection must be its own.
    let s = StoreServer::start(ServerOptions {
        threads: 4,
        ..Default::default()
    })
    .unwrap();
    let port = s.port();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let setters: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c =
                    TcpStoreClient::connect("127.0.0.1", port, ClientOptions::default()).unwrap();
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = format!("race/{}/{}", rng.gen_range(0..8), rng.gen_range(0..1000));
                    c.set(&k, k.as_bytes()).unwrap();
                    n += 1;
                    if n % 64 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    let waiters: Vec<_> = (0..8)
        .map(|w| {
            std::thread::spawn(move || {
                let c =
                    TcpStoreClient::connect("127.0.0.1", port, ClientOptions::default()).unwrap();
                c.set(&format!("mine/{w}"), format!("{w}").as_bytes())
                    .unwrap();
                let (mut ok, mut timeouts) = (0, 0);
                for i in 0..200 {
                    let k = format!("race/{w}/{}", i * 5);
                    match c.get(&k, Duration::from_micros(300)) {
                        Ok(v) => {
                            assert_eq!(v, k.as_bytes());
                            ok += 1;
                        }
                        Err(e) => {
                            assert!(e.is_timeout(), "{e}");
                            timeouts += 1;
                        }
                    }
                    // The connection is in sync: its next answer is its own.
                    assert_eq!(
                        c.get(&format!("mine/{w}"), T).unwrap(),
                        format!("{w}").as_bytes()
                    );
                }
                (ok, timeouts)
            })
        })
        .collect();
    let mut total = (0, 0);
    for h in waiters {
        let (a, b) = h.join().unwrap();
        total = (total.0 + a, total.1 + b);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in setters {
        h.join().unwrap();
    }
    assert_eq!(total.0 + total.1, 8 * 200);
    eprintln!("waits completed: {}, timed out: {}", total.0, total.1);
}

#[test]
#[cfg_attr(
    dist_store_low_nofile,
    ignore = "SKIPPED: hard open-file limit below 8,400 on the machine that built the tests"
)]
fn holds_4096_concurrent_connections() {
    use std::io::{Read, Write};
    // 4,096 client sockets here plus 4,096 in the server: skip where the fd limit is lower.
    let mut lim = 0u64;
    if let Ok(s) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(l) = s.lines().find(|l| l.starts_with("Max open files")) {
            lim = l
                .split_whitespace()
                .nth(4)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    assert!(
        lim >= 8_400,
        "hard open-file limit {lim} < 8,400 (the build saw a higher one)"
    );
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut socks = Vec::with_capacity(4096);
    let mut hello = Vec::new();
    dist_store::proto::Request::Validate {
        magic: dist_store::proto::VALIDATION_MAGIC,
    }
    .encode(&mut hello);
    for i in 0..4096u32 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port())).unwrap();
        let mut req = hello.clone();
        dist_store::proto::Request::Ping { nonce: i }.encode(&mut req);
        c.write_all(&req).unwrap();
        socks.push(c);
    }
    for (i, c) in socks.iter_mut().enumerate() {
        c.set_read_timeout(Some(T)).unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), i as u32);
    }
    // All 4,096 still open: a normal client is served at once.
    let t = Instant::now();
    let c = client(&s);
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k", T).unwrap(), b"v");
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn connections_over_the_limit_are_closed_and_the_rest_keep_working() {
    let s = StoreServer::start(ServerOptions {
        max_connections: 2,
        ..Default::default()
    })
    .unwrap();
    let a = client(&s);
    let b = client(&s);
    let over = TcpStoreClient::connect(
        "127.0.0.1",
        s.port(),
        ClientOptions {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    );
    assert!(over.is_err());
    a.set("k", b"v").unwrap();
    assert_eq!(b.get("k", T).unwrap(), b"v");
    drop(a);
    // A slot frees up once a client leaves.
    let t0 = Instant::now();
    let c = TcpStoreClient::connect("127.0.0.1", s.port(), ClientOptions::default()).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(c.get("k", T).unwrap(), b"v");
}
