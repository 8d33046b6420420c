//! `dist eplb plan`: vLLM's EPLB rebalancing policy on a load file.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use dist_core::eplb::{rebalance_experts, PolicyParams};

/// Largest load or map file read (a plan for 1,024 layers of 4,096 experts is well under it).
const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Subcommands of `dist eplb`.
#[derive(Debug, Subcommand)]
pub enum EplbCmd {
    /// Print the plan {"phy2log": [[…], …]} ([layers][physical experts]) that vLLM's
    /// DefaultEplbPolicy.rebalance_experts computes from a load.
    Plan(PlanArgs),
}

/// Arguments of `dist eplb plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// JSON array [layers][logical experts] of non-negative integers: tokens per expert.
    #[arg(long)]
    load: PathBuf,
    /// Physical expert slots per layer (a multiple of --ranks, at least the number of experts).
    #[arg(long)]
    replicas: usize,
    /// Expert groups.
    #[arg(long)]
    groups: usize,
    /// Nodes.
    #[arg(long)]
    nodes: usize,
    /// Ranks of the expert-parallel group.
    #[arg(long)]
    ranks: usize,
    /// The current map, in the output's shape ({"phy2log": …}; -1 is an empty slot): experts
    /// that stay on a rank keep their slots.
    #[arg(long)]
    old: Option<PathBuf>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Map<T> {
    phy2log: Vec<Vec<T>>,
}

/// Reads `path` as JSON of `T`; an error names the file, what it should hold and where it is wrong.
fn read_json<T: serde::de::DeserializeOwned>(
    path: &PathBuf,
    what: &str,
    shape: &str,
) -> anyhow::Result<T> {
    let f = std::fs::File::open(path).with_context(|| format!("{what} {}", path.display()))?;
    let len = f.metadata()?.len();
    anyhow::ensure!(
        len <= MAX_INPUT_BYTES,
        "{what} {}: {len} bytes, more than the {MAX_INPUT_BYTES} read",
        path.display()
    );
    serde_json::from_reader(std::io::BufReader::new(f))
        .map_err(|e| anyhow::anyhow!("{what} {}: {e} (expected {shape})", path.display()))
}

/// Runs `dist eplb …`.
pub fn run(cmd: EplbCmd) -> anyhow::Result<u8> {
    match cmd {
        EplbCmd::Plan(a) => plan(a),
    }
}

fn plan(a: PlanArgs) -> anyhow::Result<u8> {
    let load: Vec<Vec<u64>> = read_json(
        &a.load,
        "load file",
        "a JSON array [layers][logical experts] of non-negative integers",
    )?;
    let old: Option<Map<i64>> = match &a.old {
        Some(p) => Some(read_json(
            p,
            "previous map",
            "{\"phy2log\": [[…], …]}, [layers][physical experts] of integers",
        )?),
        None => None,
    };
    let params = PolicyParams {
        num_replicas: a.replicas,
        num_groups: a.groups,
        num_nodes: a.nodes,
        num_ranks: a.ranks,
    };
    let phy2log = rebalance_experts(&load, &params, old.as_ref().map(|m| m.phy2log.as_slice()))?;
    println!("{}", serde_json::to_string(&Map { phy2log })?);
    Ok(0)
}
