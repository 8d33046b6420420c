//! Prints KV-event codec and stream figures, with msgspec's beside them when `DIST_KV_PYTHON`
//! names a Python with pyzmq and msgspec.
//!
//! `cargo run --release -p dist-kv --example kv_events_bench [-- N]`

use std::process::Command;
use std::time::{Duration, Instant};

use dist_kv::events::*;

fn main() -> dist_kv::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let batches: Vec<KvEventBatch> = (0..n).map(|i| sample_batch(i, Some(0))).collect();
    for format in [WireFormat::Array, WireFormat::Map] {
        let t = Instant::now();
        let encoded: Vec<Vec<u8>> = batches
            .iter()
            .map(|b| encode_batch(b, format))
            .collect::<Result<_, _>>()?;
        let enc = t.elapsed();
        let bytes: usize = encoded.iter().map(Vec::len).sum();
        let t = Instant::now();
        for e in &encoded {
            std::hint::black_box(decode_batch(e)?);
        }
        let dec = t.elapsed();
        println!(
            "rust {format:?}: {} B/batch, encode {:.2} us/batch, decode {:.2} us/batch",
            bytes / n as usize,
            enc.as_secs_f64() * 1e6 / n as f64,
            dec.as_secs_f64() * 1e6 / n as f64
        );
    }

    // End to end over loopback TCP: publish n batches, receive them all.
    let cfg = KvEventsConfig {
        enable_kv_cache_events: true,
        endpoint: "tcp://127.0.0.1:*".into(),
        hwm: 100_000,
        ..Default::default()
    };
    let publisher = ZmqEventPublisher::new(0, &cfg, ZmqPublisherOptions::default())?;
    let sub = KvEventSubscriber::connect(publisher.bound_endpoint(), None, "")?;
    publisher.wait_for_subscribers(1, Instant::now() + Duration::from_secs(10))?;
    let t = Instant::now();
    let mut got = 0u64;
    std::thread::scope(|s| -> dist_kv::Result<()> {
        s.spawn(|| {
            for b in &batches {
                publisher.publish(b.clone()).expect("publish");
            }
        });
        while got < n {
            match sub.recv(Duration::from_secs(5))? {
                Some(_) => got += 1,
                None => break,
            }
        }
        Ok(())
    })?;
    let dt = t.elapsed();
    println!(
        "rust stream (tcp loopback, publish + decode): {got}/{n} batches in {:.2} s = {:.0} batches/s",
        dt.as_secs_f64(),
        got as f64 / dt.as_secs_f64()
    );
    publisher.shutdown()?;

    if let Ok(py) = std::env::var("DIST_KV_PYTHON") {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python");
        let code = format!(
            "import time\nfrom kv_events_vllm import *\nn={n}\n\
             for name, T in (('Array', ARRAY), ('Map', MAP)):\n\
             \x20   bs=[sample_batch(T, i, 0) for i in range(n)]\n\
             \x20   t=time.perf_counter(); es=[T.encoder.encode(b) for b in bs]; enc=time.perf_counter()-t\n\
             \x20   t=time.perf_counter(); [T.decoder.decode(e) for e in es]; dec=time.perf_counter()-t\n\
             \x20   print(f'msgspec {{name}}: {{sum(map(len, es))//n}} B/batch, encode {{enc*1e6/n:.2f}} us/batch, decode {{dec*1e6/n:.2f}} us/batch')\n"
        );
        let out = Command::new(py)
            .arg("-c")
            .arg(code)
            .current_dir(dir)
            .output();
        match out {
            Ok(o) => print!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => println!("peer: could not run DIST_KV_PYTHON: {e}"),
        }
    } else {
        println!("peer: set DIST_KV_PYTHON to print msgspec's figures beside these");
    }
    Ok(())
}
