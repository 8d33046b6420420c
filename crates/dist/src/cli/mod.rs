//! Subcommands of the `dist` binary.

use clap::{Args, Parser, Subcommand};

mod layout;
mod store;

/// dist: vLLM's distributed communication layer, in Rust.
#[derive(Debug, Parser)]
#[command(name = "dist", version, about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the rank lists of the TP, PP, DP, PCP, DCP (and EP) groups of a configuration.
    Layout(layout::LayoutArgs),
    /// Print each pipeline stage's layers [start, end).
    PpSplit(layout::PpSplitArgs),
    /// Start N local ranks of PROGRAM with torchrun's environment, hosting the store.
    Run(store::RunArgs),
    /// The TCP store (PyTorch TCPStore wire protocol).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Benchmarks: collectives (default), `store`, `mq`.
    Bench(BenchCmd),
    /// KV-cache events: vLLM's msgpack stream over ZMQ.
    #[command(subcommand)]
    KvEvents(KvEventsCmd),
}

#[derive(Debug, Subcommand)]
enum KvEventsCmd {
    /// Publish sample batches that use every event type and field.
    Publish(dist_kv::cli::PublishArgs),
    /// Print received batches as JSON lines.
    Subscribe(dist_kv::cli::SubscribeArgs),
}

#[derive(Debug, Subcommand)]
enum StoreCmd {
    /// Run a standalone store server until interrupted.
    Serve(store::ServeArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    coll: dist::bench::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum BenchSub {
    /// The TCP store: set+get ops/s with many clients, and rendezvous times.
    Store(Box<store::bench::StoreBenchArgs>),
    /// The MessageQueue: paced latency to the last reader and burst throughput.
    Mq(MqBenchArgs),
}

#[derive(Debug, Args)]
struct MqBenchArgs {
    /// Reader counts.
    #[arg(long, value_delimiter = ',', default_value = "1,3,7")]
    readers: Vec<usize>,
    /// Message sizes (4K, 1M…).
    #[arg(long, value_delimiter = ',', default_value = "64,1K,64K,1M")]
    sizes: Vec<String>,
    /// Paced messages per point.
    #[arg(long, default_value_t = 2000)]
    paced_msgs: usize,
    /// Messages in a burst.
    #[arg(long, default_value_t = 20000)]
    burst_msgs: usize,
    /// Readers over TCP instead of shared memory.
    #[arg(long)]
    remote: bool,
}

/// Runs a parsed command; the value is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Layout(a) => layout::layout(a),
        Cmd::PpSplit(a) => layout::pp_split(a),
        Cmd::Run(a) => store::run(a),
        Cmd::Store(StoreCmd::Serve(a)) => store::serve(a),
        Cmd::Bench(b) => match b.sub {
            None => dist::bench::run(&b.coll),
            Some(BenchSub::Store(a)) => store::bench::run(&a),
            Some(BenchSub::Mq(a)) => mq_bench(a),
        },
        Cmd::KvEvents(KvEventsCmd::Publish(a)) => {
            dist_kv::cli::run_publish(a)?;
            Ok(0)
        }
        Cmd::KvEvents(KvEventsCmd::Subscribe(a)) => {
            dist_kv::cli::run_subscribe(a)?;
            Ok(0)
        }
    }
}

fn mq_bench(a: MqBenchArgs) -> anyhow::Result<u8> {
    use dist_cpu::mq::bench::{bench, BenchOptions};
    let sizes = a
        .sizes
        .iter()
        .map(|s| dist::bench::parse_size(s))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = BenchOptions {
        readers: a.readers,
        sizes,
        paced_msgs: a.paced_msgs,
        burst_msgs: a.burst_msgs,
        remote: a.remote,
        ..Default::default()
    };
    println!(
        "# dist bench mq: 1 writer, N readers as threads; latency = enqueue to the last reader's dequeue ({})",
        if opts.remote { "TCP loopback" } else { "shared memory" }
    );
    println!(
        "{:>7} {:>9} {:>11} {:>11} {:>13} {:>11}",
        "readers", "bytes", "p50(us)", "p99(us)", "burst msg/s", "burst MB/s"
    );
    for row in bench(&opts)? {
        println!("{row}");
    }
    Ok(0)
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
