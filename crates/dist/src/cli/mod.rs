//! Subcommands of the `dist` binary.

use clap::{Parser, Subcommand};

mod layout;

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
}

/// Runs a parsed command; the value is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Layout(a) => layout::layout(a),
        Cmd::PpSplit(a) => layout::pp_split(a),
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
