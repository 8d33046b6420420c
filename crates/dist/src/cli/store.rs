//! `dist run`, `dist store serve` and `dist bench store`: their flags, mapped onto the plain
//! option structs of `dist_store::launch`, and the store benchmark ([`bench`]).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;
use dist_store::launch::{LaunchOptions, ServeOptions};

pub mod bench;

/// Flags of `dist run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Ranks to start on this node.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc_per_node: usize,
    /// Number of nodes (default: SLURM_NNODES, OMPI_COMM_WORLD_SIZE, else 1).
    #[arg(long, value_name = "M")]
    pub nnodes: Option<usize>,
    /// This node's index (default: SLURM_NODEID, OMPI_COMM_WORLD_RANK, else 0).
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,
    /// Address of node 0, where the store runs (default: MASTER_ADDR, SLURM's first node, else 127.0.0.1).
    #[arg(long, value_name = "A")]
    pub master_addr: Option<String>,
    /// Port of the store on node 0 (default: MASTER_PORT; else a free port on one node, 29500 on several).
    #[arg(long, value_name = "P")]
    pub master_port: Option<u16>,
    /// Kill the job if it still runs after SECS seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub kill_grace: f64,
    /// Do not prefix output lines with `[rank N]`.
    #[arg(long)]
    pub no_prefix: bool,
    /// Require this shared secret on the store (passed to ranks as DIST_STORE_TOKEN_FILE; give
    /// every node the same file). Without it a multi-node store accepts anyone who can reach it.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The program and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1.., value_name = "PROGRAM")]
    pub program: Vec<OsString>,
}

impl From<RunArgs> for LaunchOptions {
    fn from(a: RunArgs) -> Self {
        LaunchOptions {
            nproc_per_node: a.nproc_per_node,
            nnodes: a.nnodes,
            node_rank: a.node_rank,
            master_addr: a.master_addr,
            master_port: a.master_port,
            timeout: a.timeout,
            kill_grace: a.kill_grace,
            no_prefix: a.no_prefix,
            token_file: a.token_file,
            program: a.program,
        }
    }
}

/// Flags of `dist store serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to bind (`0.0.0.0` or `::` for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0: a free one, printed at start).
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
    /// File holding a shared secret every client must present.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Most concurrent connections (lowered to the open-file limit).
    #[arg(long, default_value_t = 65_536)]
    pub max_connections: usize,
    /// Event-loop threads (default: the machine's parallelism, at most 4).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Memory budget for partially received requests across connections, MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub max_buffered_mib: usize,
}

impl From<ServeArgs> for ServeOptions {
    fn from(a: ServeArgs) -> Self {
        ServeOptions {
            host: a.host,
            port: a.port,
            token_file: a.token_file,
            max_connections: a.max_connections,
            threads: a.threads,
            max_buffered_bytes: a.max_buffered_mib << 20,
        }
    }
}

/// `dist run`.
pub fn run(a: RunArgs) -> anyhow::Result<u8> {
    Ok(code(dist_store::launch::run(&a.into())?))
}

/// `dist store serve`.
pub fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    Ok(code(dist_store::launch::serve(&a.into())?))
}

fn code(c: i32) -> u8 {
    c.clamp(0, 255) as u8
}
