//! Our client against any TCPStore master (e.g. PyTorch's): `store_tool interop HOST PORT
//! [--prefix P] [--no-queues]` exercises every client call and prints what it answered. The
//! launcher, the server and the benchmark are the `dist` binary's `run`, `store serve` and
//! `bench store`.

use std::time::Duration;

use dist_core::Store;
use dist_store::{ClientOptions, TcpStoreClient};

const USAGE: &str = "usage: store_tool interop HOST PORT [--prefix P] [--no-queues]";

fn interop(host: &str, port: u16, p: &str, queues: bool) -> Result<(), String> {
    let e = |x: dist_core::Error| x.to_string();
    let t = Duration::from_secs(10);
    let c = TcpStoreClient::connect(
        host,
        port,
        ClientOptions {
            timeout: t,
            connect_timeout: t,
            ..Default::default()
        },
    )
    .map_err(e)?;
    let mut ok = 0;
    let mut check = |name: &str, cond: bool| -> Result<(), String> {
        if cond {
            ok += 1;
            println!("  ok {name}");
            Ok(())
        } else {
            Err(format!("{name} failed"))
        }
    };
    c.ping().map_err(e)?;
    check("ping", true)?;
    c.set(&format!("{p}a"), b"va").map_err(e)?;
    check("set/get", c.get(&format!("{p}a"), t).map_err(e)? == b"va")?;
    check(
        "add",
        c.add(&format!("{p}n"), 3).map_err(e)? == 3 && c.add(&format!("{p}n"), 4).map_err(e)? == 7,
    )?;
    check(
        "add stores decimal text",
        c.get(&format!("{p}n"), t).map_err(e)? == b"7",
    )?;
    check(
        "compare_set missing+empty",
        c.compare_set(&format!("{p}cs"), b"", b"x").map_err(e)? == b"x",
    )?;
    check(
        "compare_set mismatch",
        c.compare_set(&format!("{p}cs"), b"no", b"y").map_err(e)? == b"x",
    )?;
    check(
        "compare_set match",
        c.compare_set(&format!("{p}cs"), b"x", b"y").map_err(e)? == b"y",
    )?;
    check(
        "compare_set missing+expected",
        c.compare_set(&format!("{p}none"), b"e", b"d").map_err(e)? == b"e",
    )?;
    check(
        "check",
        c.check(&[&format!("{p}a")]).map_err(e)? && !c.check(&[&format!("{p}none")]).map_err(e)?,
    )?;
    c.append(&format!("{p}ap"), b"12").map_err(e)?;
    c.append(&format!("{p}ap"), b"34").map_err(e)?;
    check("append", c.get(&format!("{p}ap"), t).map_err(e)? == b"1234")?;
    let (k1, k2) = (format!("{p}m1"), format!("{p}m2"));
    c.multi_set(&[&k1, &k2], &[b"1", b"2"]).map_err(e)?;
    check(
        "multi_set/multi_get",
        c.multi_get(&[&k1, &k2], t).map_err(e)? == vec![b"1".to_vec(), b"2".to_vec()],
    )?;
    check(
        "delete",
        c.delete(&k1).map_err(e)? && !c.delete(&k1).map_err(e)?,
    )?;
    let n = c.num_keys().map_err(e)?;
    check("num_keys", n >= 5)?;
    let t0 = std::time::Instant::now();
    let err = c
        .wait(&[&format!("{p}never")], Duration::from_millis(300))
        .unwrap_err();
    check(
        "wait timeout + CANCEL_WAIT",
        err.is_timeout()
            && err.to_string().contains("never")
            && t0.elapsed() < Duration::from_secs(3),
    )?;
    check(
        "connection usable after cancel",
        c.get(&format!("{p}a"), t).map_err(e)? == b"va",
    )?;
    if queues {
        c.queue_push(&format!("{p}q"), b"item").map_err(e)?;
        check("queue_len", c.queue_len(&format!("{p}q")).map_err(e)? == 1)?;
        check(
            "queue_pop",
            c.queue_pop(&format!("{p}q"), Some(t))
                .map_err(e)?
                .as_deref()
                == Some(&b"item"[..]),
        )?;
    }
    // Leave a key for the other side to read.
    c.set(&format!("{p}from_rust"), b"hello torch").map_err(e)?;
    println!("interop client: {ok} checks passed");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut prefix = "rs/".to_string();
    let mut queues = true;
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--prefix" => match it.next() {
                Some(p) => prefix = p.clone(),
                None => fail("--prefix needs a value"),
            },
            "--no-queues" => queues = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => pos.push(a.clone()),
        }
    }
    let (host, port) = match pos.as_slice() {
        [cmd, host, port] if cmd == "interop" => match port.parse::<u16>() {
            Ok(p) => (host.clone(), p),
            Err(_) => fail(&format!("bad port {port:?}")),
        },
        _ => fail("expected: interop HOST PORT"),
    };
    if let Err(m) = interop(&host, port, &prefix, queues) {
        eprintln!("interop: FAILED: {m}");
        std::process::exit(1);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("store_tool: {msg}\n{USAGE}");
    std::process::exit(2);
}
