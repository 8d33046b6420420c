//! MessageQueue benchmark (`dist bench mq` runs the same code): 1 writer and 1, 3, 7 readers,
//! messages of 64 B, 1 KiB, 64 KiB and 1 MiB; p50/p99 paced latency from enqueue to the last
//! reader's dequeue, and messages per second in a burst. vLLM's MessageQueue figures (measured
//! on the device machine, issue 5) are printed beside.
//!
//! ```text
//! cargo run --release -p dist-cpu --example bench_mq -- [--threads] [--readers 1,3,7]
//!     [--sizes 64,1024,65536,1048576] [--paced 2000] [--burst 20000] [--pace-us 100]
//!     [--busy-wait-us 50] [--remote]
//! ```
//!
//! By default every rank is a process (this program started again with torchrun's variables,
//! over a `dist_store::StatelessProcessGroup` on loopback); `--threads` runs ranks as threads.

use std::time::Duration;

use dist_cpu::mq::bench::{run_on_group, BenchOptions, Row, HEADER};
use dist_store::StatelessProcessGroup;

fn list(v: &str) -> Vec<usize> {
    v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

fn parse() -> (BenchOptions, bool) {
    let mut o = BenchOptions::default();
    let mut threads = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--threads" => threads = true,
            "--remote" => o.remote = true,
            "--readers" => o.readers = list(&val()),
            "--sizes" => o.sizes = list(&val()),
            "--paced" => o.paced_msgs = val().parse().unwrap_or(o.paced_msgs),
            "--burst" => o.burst_msgs = val().parse().unwrap_or(o.burst_msgs),
            "--pace-us" => o.pace = Duration::from_micros(val().parse().unwrap_or(100)),
            "--busy-wait-us" => o.busy_wait = Duration::from_micros(val().parse().unwrap_or(50)),
            a => {
                eprintln!("bench_mq: unknown argument {a}");
                std::process::exit(2);
            }
        }
        if !matches!(args[i].as_str(), "--threads" | "--remote") {
            i += 1;
        }
        i += 1;
    }
    (o, threads)
}

/// A child rank: run every size on the group, rank 0 prints one `ROW` line per size.
fn child(o: &BenchOptions) -> Result<(), String> {
    let g = StatelessProcessGroup::from_env(Duration::from_secs(120)).map_err(|e| e.to_string())?;
    for &size in &o.sizes {
        if let Some(r) = run_on_group(&g, size, o).map_err(|e| e.to_string())? {
            println!(
                "ROW {} {} {} {} {} {} {} {}",
                r.readers,
                r.bytes,
                r.chunk_bytes,
                r.chunks,
                r.p50.as_nanos(),
                r.p99.as_nanos(),
                r.burst_msgs,
                r.msgs_per_s
            );
        }
    }
    finish(&g)
}

/// Rank 0 hosts the store: it leaves only after every other rank said it is done with it.
fn finish(g: &StatelessProcessGroup) -> Result<(), String> {
    use dist_core::{HostGroup, HostGroupExt};
    if g.rank() == 0 {
        for r in 1..g.world_size() {
            g.recv_obj::<u8>(r).map_err(|e| e.to_string())?;
        }
    } else {
        g.send_obj(&1u8, 0).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.strip_prefix("ROW ")?.split(' ').collect();
    Some(Row {
        readers: f.first()?.parse().ok()?,
        bytes: f.get(1)?.parse().ok()?,
        chunk_bytes: f.get(2)?.parse().ok()?,
        chunks: f.get(3)?.parse().ok()?,
        p50: Duration::from_nanos(f.get(4)?.parse().ok()?),
        p99: Duration::from_nanos(f.get(5)?.parse().ok()?),
        burst_msgs: f.get(6)?.parse().ok()?,
        msgs_per_s: f.get(7)?.parse().ok()?,
    })
}

/// Starts `n + 1` ranks of this program and collects rank 0's rows.
fn processes(n: usize) -> Result<Vec<Row>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let world = n + 1;
    let mut kids = Vec::new();
    for rank in 0..world {
        let mut c = std::process::Command::new(&exe);
        c.args(std::env::args().skip(1))
            .env("BENCH_MQ_CHILD", "1")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::piped());
        kids.push(c.spawn().map_err(|e| e.to_string())?);
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (rank, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            failed.push(rank);
        }
        rows.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(parse_row),
        );
    }
    if !failed.is_empty() {
        return Err(format!("ranks {failed:?} failed (world {world})"));
    }
    Ok(rows)
}

fn main() {
    let (o, threads) = parse();
    if std::env::var_os("BENCH_MQ_CHILD").is_some() {
        if let Err(e) = child(&o) {
            eprintln!(
                "bench_mq: rank {}: {e}",
                std::env::var("RANK").unwrap_or_default()
            );
            std::process::exit(1);
        }
        return;
    }
    println!(
        "MessageQueue: 1 writer, ranks as {}, {}; paced {} messages (pause {:?}), burst up to {}; busy_wait {:?}; {} cores",
        if threads { "threads" } else { "processes" },
        if o.remote { "readers over TCP loopback" } else { "readers on shared memory" },
        o.paced_msgs,
        o.pace,
        o.burst_msgs,
        o.busy_wait,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{HEADER}");
    for &n in &o.readers {
        let rows = if threads {
            dist_cpu::mq::bench::bench(&BenchOptions {
                readers: vec![n],
                ..o.clone()
            })
            .map_err(|e| e.to_string())
        } else {
            processes(n)
        };
        match rows {
            Ok(rows) => rows.iter().for_each(|r| println!("{r}")),
            Err(e) => {
                eprintln!("bench_mq: {n} readers: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "vLLM MessageQueue (issue 5, device machine): 1 KiB paced p50 32 µs / p99 59 µs with 4 readers, \
         p99 972 µs with 8; ~57,000 msg/s burst; 64 KiB p50 50 µs / p99 3.9 ms. \
         Goals: 1 KiB p50 <= 3 µs, p99 <= 20 µs with 8 readers; >= 1,000,000 msg/s burst."
    );
}
