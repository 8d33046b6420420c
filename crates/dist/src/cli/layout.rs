//! `dist layout` and `dist pp-split`.

use clap::Args;
use dist_core::layout::{pp_partitions, PP_LAYER_PARTITION_ENV};
use dist_core::ParallelConfig;

/// Arguments of `dist layout`.
#[derive(Debug, Args)]
pub struct LayoutArgs {
    /// Total number of ranks.
    #[arg(long)]
    world: usize,
    /// Tensor parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline parallel size.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data parallel size (the rest of the world is external DP).
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Prefill context parallel size.
    #[arg(long, default_value_t = 1)]
    pcp: usize,
    /// Decode context parallel size.
    #[arg(long, default_value_t = 1)]
    dcp: usize,
    /// Also print the expert-parallel groups.
    #[arg(long)]
    ep: bool,
    /// Print JSON: {"tp": [[…]], "pp": …, "dp": …, "pcp": …, "dcp": …, "ep": … (with --ep)}.
    #[arg(long)]
    json: bool,
}

pub fn layout(a: LayoutArgs) -> anyhow::Result<u8> {
    let cfg = ParallelConfig {
        world_size: a.world,
        tp: a.tp,
        pp: a.pp,
        dp: a.dp,
        pcp: a.pcp,
        dcp: a.dcp,
        ep: a.ep,
    };
    let l = cfg.layout()?;
    let mut groups = vec![
        ("tp", l.tp),
        ("pp", l.pp),
        ("dp", l.dp),
        ("pcp", l.pcp),
        ("dcp", l.dcp),
    ];
    if let Some(ep) = l.ep {
        groups.push(("ep", ep));
    }
    if a.json {
        let mut m = serde_json::Map::new();
        for (k, v) in groups {
            m.insert(k.to_string(), serde_json::to_value(v)?);
        }
        println!("{}", serde_json::Value::Object(m));
    } else {
        for (k, v) in groups {
            let rows: Vec<String> = v
                .iter()
                .map(|g| {
                    let r: Vec<String> = g.iter().map(|x| x.to_string()).collect();
                    format!("[{}]", r.join(", "))
                })
                .collect();
            println!("{k:<4} {}", rows.join(" "));
        }
    }
    Ok(0)
}

/// Arguments of `dist pp-split`.
#[derive(Debug, Args)]
pub struct PpSplitArgs {
    /// Number of hidden layers.
    #[arg(long)]
    layers: usize,
    /// Pipeline parallel size.
    #[arg(long)]
    pp: usize,
    /// Print JSON: a list of [start, end] pairs.
    #[arg(long)]
    json: bool,
}

pub fn pp_split(a: PpSplitArgs) -> anyhow::Result<u8> {
    let env = std::env::var(PP_LAYER_PARTITION_ENV).ok();
    let parts = pp_partitions(a.layers, a.pp, env.as_deref())?;
    let mut start = 0;
    let ranges: Vec<[usize; 2]> = parts
        .iter()
        .map(|p| {
            let r = [start, start + p];
            start += p;
            r
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string(&ranges)?);
    } else {
        for (i, r) in ranges.iter().enumerate() {
            println!(
                "stage {i}: layers [{}, {}) ({} layers)",
                r[0],
                r[1],
                r[1] - r[0]
            );
        }
    }
    Ok(0)
}
