//! All-reduce benchmark of the shared-memory communicator, ranks as processes.
//!
//! `bench_cpu [--world N] [--min BYTES] [--max BYTES] [--op sum] [--json]` starts N copies of
//! itself (torchrun's variables, rank 0 hosting the store) unless `RANK` is already set (then it
//! is one rank of a launcher's job). Each size: a checked all-reduce (`#wrong` counts elements
//! that differ from the closed-form sum), warm-up, then a timed loop of in-place f32 all-reduces;
//! the time is the slowest rank's mean. Columns as nccl-tests: busbw = algbw * 2 (n - 1) / n.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::{
    Backend, CommunicatorContext, DType, DeviceCommunicator, HostGroup, HostTensor, ReduceOp,
};
use dist_cpu::CpuBackend;
use dist_store::StatelessProcessGroup;

struct Args {
    world: usize,
    min: usize,
    max: usize,
    op: ReduceOp,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        world: 4,
        min: 4 << 10,
        max: 64 << 20,
        op: ReduceOp::Sum,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--world" => a.world = val()?.parse().map_err(|e| format!("--world: {e}"))?,
            "--min" => a.min = val()?.parse().map_err(|e| format!("--min: {e}"))?,
            "--max" => a.max = val()?.parse().map_err(|e| format!("--max: {e}"))?,
            "--op" => a.op = val()?.parse().map_err(|e| format!("--op: {e:?}"))?,
            "--json" => a.json = true,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.world == 0 || a.min == 0 || a.min > a.max {
        return Err("need --world >= 1 and 0 < --min <= --max".into());
    }
    Ok(a)
}

fn launch(a: &Args) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let kids: Vec<_> = (0..a.world)
        .map(|r| {
            Command::new(&exe)
                .args(std::env::args().skip(1))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", a.world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", a.world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut ok = true;
    for mut k in kids {
        ok &= k.wait().map(|s| s.success()).unwrap_or(false);
    }
    if ok {
        Ok(())
    } else {
        Err("a rank failed".into())
    }
}

fn rank_main(a: &Args) -> Result<(), String> {
    let e = |x: dist_core::Error| x.to_string();
    let g = Arc::new(StatelessProcessGroup::from_env(Duration::from_secs(120)).map_err(e)?);
    let ctx = CommunicatorContext {
        group_name: "bench".into(),
        ranks: (0..g.world_size()).collect(),
        rank_in_group: g.rank(),
        local_rank: g.rank(),
        host_group: g.clone(),
        store: g.store().clone(),
        timeout: Duration::from_secs(120),
    };
    // Shared memory unless DIST_CPU_BACKEND=gloo (with the `gloo` feature).
    let c = CpuBackend::create_communicator(&ctx).map_err(e)?;
    let (r, n) = (c.rank(), c.world_size());
    if r == 0 && !a.json {
        let how = match c.as_shm() {
            Some(s) => format!(
                "halves of {} KiB, {} threads per rank",
                s.config().half_bytes >> 10,
                s.config().threads
            ),
            None => "over TCP".into(),
        };
        println!("# dist-cpu {} all_reduce, {n} ranks, {how}", c.kind());
        println!(
            "{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}",
            "size(B)", "count", "type", "redop", "time(us)", "algbw", "busbw", "#wrong"
        );
    }
    let mut size = a.min;
    let mut rows = Vec::new();
    while size <= a.max {
        let count = size / 4;
        // Check: small integers sum exactly in any order.
        let v: Vec<f32> = (0..count)
            .map(|i| ((i * 7 + r * 13) % 1000) as f32)
            .collect();
        let mut t = HostTensor::from_vec(&[count], v).map_err(e)?;
        c.all_reduce_in_place(&mut t.view_mut(), ReduceOp::Sum)
            .map_err(e)?;
        let got = t.as_slice::<f32>().map_err(e)?;
        let wrong = (0..count)
            .filter(|&i| got[i] != (0..n).map(|q| (i * 7 + q * 13) % 1000).sum::<usize>() as f32)
            .count();
        // Timed loop on zeros (in place; values stay finite).
        let mut t = HostTensor::zeros(DType::F32, &[count]);
        let iters = ((256usize << 20) / size).clamp(5, 2000);
        for _ in 0..(iters / 10).max(2) {
            c.all_reduce_in_place(&mut t.view_mut(), a.op).map_err(e)?;
        }
        g.barrier().map_err(e)?;
        let start = Instant::now();
        for _ in 0..iters {
            c.all_reduce_in_place(&mut t.view_mut(), a.op).map_err(e)?;
        }
        let mine = start.elapsed().as_secs_f64() / iters as f64;
        let mut slow = HostTensor::from_vec(&[2], vec![mine, wrong as f64]).map_err(e)?;
        c.all_reduce_in_place(&mut slow.view_mut(), ReduceOp::Max)
            .map_err(e)?;
        let s = slow.as_slice::<f64>().map_err(e)?;
        let (secs, wrong) = (s[0], s[1] as usize);
        let algbw = size as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        if r == 0 {
            if a.json {
                rows.push(format!(
                    "{{\"size\":{size},\"count\":{count},\"type\":\"float\",\"redop\":\"{}\",\"time_us\":{:.2},\"algbw\":{algbw:.3},\"busbw\":{busbw:.3},\"wrong\":{wrong},\"world\":{n}}}",
                    a.op,
                    secs * 1e6
                ));
            } else {
                println!(
                    "{size:>12} {count:>12} {:>6} {:>6} {:>10.2} {algbw:>8.3} {busbw:>8.3} {wrong:>7}",
                    "float",
                    a.op.to_string(),
                    secs * 1e6
                );
            }
        }
        size *= 2;
    }
    if r == 0 && a.json {
        println!("[{}]", rows.join(",\n"));
    }
    g.barrier().map_err(e)?;
    Ok(())
}

fn main() {
    let r = parse().and_then(|a| {
        if std::env::var("RANK").is_ok() {
            rank_main(&a)
        } else {
            launch(&a)
        }
    });
    if let Err(e) = r {
        eprintln!("bench_cpu: {e}");
        std::process::exit(1);
    }
}
