//! Multi-process test of the stateless process group (run by `cargo xtask test-multiproc` under
//! `dist run --nproc-per-node N`, or by hand with torchrun's variables set).
//!
//! Checks: all_gather_obj order, broadcast from every source, many-to-one sends (every rank
//! sends to rank 0 and to its neighbour), barriers, data expiry, and a typed-object cap.

use std::time::Duration;

use dist_core::{HostGroup, HostGroupExt};
use dist_store::StatelessProcessGroup;

fn check(cond: bool, what: String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what)
    }
}

fn run() -> Result<(), String> {
    let e = |x: dist_core::Error| x.to_string();
    let g = StatelessProcessGroup::from_env(Duration::from_secs(60))
        .map_err(e)?
        .with_data_expiration(Duration::from_millis(300));
    let (r, ws) = (g.rank(), g.world_size());

    // all_gather: rank order.
    let all: Vec<(usize, String)> = g.all_gather_obj(&(r, format!("rank-{r}"))).map_err(e)?;
    let want: Vec<(usize, String)> = (0..ws).map(|i| (i, format!("rank-{i}"))).collect();
    check(all == want, format!("all_gather_obj gave {all:?}"))?;

    // broadcast from every source, twice (counters per source).
    for round in 0..2u32 {
        for src in 0..ws {
            let v: Vec<u64> = (0..=src as u64).map(|x| x * 10 + round as u64).collect();
            let got: Vec<u64> = g.broadcast_obj((r == src).then_some(&v), src).map_err(e)?;
            check(
                got == v,
                format!("broadcast from {src} round {round}: {got:?}"),
            )?;
        }
    }

    // many-to-one: everyone (rank 0 too) sends three messages to rank 0; then a ring.
    for i in 0..3u32 {
        g.send_obj(&(r, i), 0).map_err(e)?;
    }
    if r == 0 {
        for src in (0..ws).rev() {
            for i in 0..3u32 {
                let got: (usize, u32) = g.recv_obj(src).map_err(e)?;
                check(
                    got == (src, i),
                    format!("from {src}: got {got:?}, want {:?}", (src, i)),
                )?;
            }
        }
    }
    let next = (r + 1) % ws;
    let prev = (r + ws - 1) % ws;
    g.send_obj(&format!("ring from {r}"), next).map_err(e)?;
    let got: String = g.recv_obj(prev).map_err(e)?;
    check(got == format!("ring from {prev}"), format!("ring: {got}"))?;
    g.barrier().map_err(e)?;

    // Expiry: the first all_gather's part of each rank is deleted by the next write after 300 ms.
    std::thread::sleep(Duration::from_millis(400));
    let again: Vec<usize> = g.all_gather_obj(&r).map_err(e)?;
    check(
        again == (0..ws).collect::<Vec<_>>(),
        format!("second all_gather {again:?}"),
    )?;
    g.barrier().map_err(e)?;
    for i in 0..ws {
        let old = format!("all_gather/0/{i}");
        let present = g.store().check(&[old.as_str()]).map_err(e)?;
        check(!present, format!("expired key {old} still present"))?;
    }

    // A message over the cap is refused before it is sent.
    let small = StatelessProcessGroup::over_store(
        g.store().clone(),
        "small/",
        r,
        ws,
        Duration::from_secs(60),
    )
    .map_err(e)?
    .with_max_object_bytes(16);
    check(
        small.send_bytes(&[0u8; 17], next).is_err(),
        "cap not enforced".into(),
    )?;
    g.barrier().map_err(e)?;
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1,2,3,4,8");
        return;
    }
    match run() {
        Ok(()) => println!("mp_stateless_group: ok"),
        Err(msg) => {
            eprintln!("mp_stateless_group: FAILED: {msg}");
            std::process::exit(1);
        }
    }
}
