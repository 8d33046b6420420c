//! Subcommands of the `dist` binary.

use clap::{Args, Parser, Subcommand};

mod bench;
mod eplb;
mod kv;
mod layout;
mod mq;
mod plot;
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
    Bench(Box<BenchCmd>),
    /// KV-cache events: vLLM's msgpack stream over ZMQ.
    #[command(subcommand)]
    KvEvents(kv::KvEventsCmd),
    /// Expert-parallel load balancing: `plan` runs vLLM's rebalancing policy on a load file.
    #[command(subcommand)]
    Eplb(eplb::EplbCmd),
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
    coll: bench::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum BenchSub {
    /// The TCP store: set+get ops/s with many clients, and rendezvous times.
    Store(Box<store::bench::StoreBenchArgs>),
    /// The MessageQueue: paced latency to the last reader and burst throughput.
    Mq(Box<mq::MqBenchArgs>),
}

/// Runs a parsed command; the value is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Layout(a) => layout::layout(a),
        Cmd::PpSplit(a) => layout::pp_split(a),
        Cmd::Run(a) => store::run(a),
        Cmd::Store(StoreCmd::Serve(a)) => store::serve(a),
        Cmd::Bench(b) => match b.sub {
            None => bench::run(&b.coll),
            Some(BenchSub::Store(a)) => store::bench::run(&a),
            Some(BenchSub::Mq(a)) => mq::run(*a),
        },
        Cmd::Eplb(c) => eplb::run(c),
        Cmd::KvEvents(c) => kv::run(c),
    }
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
