//! Multi-process EPLB: every rank records the routing of its own tokens, the load is summed over
//! the EP group, vLLM's policy plans from it, and the expert weights move between the processes;
//! then every rank checks that its slots hold exactly the plan's experts, bit for bit, in the
//! memory they had before (the rearrangement writes in place). Two
//! rounds: from the initial map, then to a second plan made with the first as the previous map.
//!
//! Run under `dist run --nproc-per-node N` (N in `--worlds`).

use dist::core::eplb::{
    rearrange_experts, rebalance_experts, EplbSchedule, ExpertLoadWindow, PolicyParams,
};
use dist::{DType, DistEnv, HostTensor};

mod common;

const LAYERS: usize = 3;
const EXPERTS: usize = 16;

/// Logical expert `e` of layer `l`: three tensors of different dtypes and shapes.
fn expert(l: usize, e: usize) -> Vec<HostTensor> {
    let seed = ((l * 1000 + e) * 3) as u64;
    vec![
        HostTensor::random(DType::BF16, &[64, 32], seed),
        HostTensor::random(DType::F32, &[32, 16], seed + 1),
        HostTensor::random(DType::I32, &[7], seed + 2),
    ]
}

fn slots_of(map: &[Vec<usize>], rank: usize, per: usize) -> Vec<Vec<Vec<HostTensor>>> {
    let r = rank * per..(rank + 1) * per;
    map.iter()
        .enumerate()
        .map(|(l, row)| row[r.clone()].iter().map(|&e| expert(l, e)).collect())
        .collect()
}

/// Where every slot's tensors live: the rearrangement writes into this memory, in place.
fn addresses(w: &[Vec<Vec<HostTensor>>]) -> Vec<usize> {
    w.iter()
        .flatten()
        .flatten()
        .map(|t| t.as_bytes().as_ptr() as usize)
        .collect()
}

/// Tokens rank `rank` routes to slot `s` of layer `l` in step `t`: skewed, different per round.
fn routed(round: usize, rank: usize, t: usize, l: usize, s: usize) -> u64 {
    let hot = (s * 7 + l * 3 + round * 5) % 11;
    ((hot * hot) as u64 + (rank + t) as u64 % 3) * (1 + l as u64)
}

fn run(env: &DistEnv) -> Result<String, Box<dyn std::error::Error>> {
    let world = env.world().world_size;
    let (state, ep) = common::ep_groups(env)?;
    let rank = ep.rank_in_group();
    // Enough slots for every expert plus two redundant ones per rank.
    let per = EXPERTS.div_ceil(world) + 2;
    let physical = per * world;
    let params = PolicyParams {
        num_replicas: physical,
        num_groups: 4,
        num_nodes: 1,
        num_ranks: world,
    };
    let mut map: Vec<Vec<usize>> = (0..LAYERS)
        .map(|_| (0..physical).map(|s| s % EXPERTS).collect())
        .collect();
    let mut weights = slots_of(&map, rank, per);
    let mut report = Vec::new();
    for round in 0..2 {
        // Load: steps of the schedule, each rank recording its own routing.
        let mut sched = EplbSchedule::new(8, 4)?;
        let mut window = ExpertLoadWindow::new(LAYERS, physical, 4)?;
        let mut t = 0;
        loop {
            for l in 0..LAYERS {
                let row = window.pass_mut(l)?;
                for (s, x) in row.iter_mut().enumerate() {
                    *x += routed(round, rank, t, l, s);
                }
            }
            t += 1;
            if sched.end_step(&mut window, false) {
                break;
            }
        }
        let load = window.global_logical_load(&ep, &map, EXPERTS)?;
        // The oracle: every rank's recorded passes (the last 4 steps recorded), summed by hand.
        let recorded: Vec<usize> = (t.saturating_sub(4)..t).collect();
        for (l, row) in load.iter().enumerate() {
            let mut want = vec![0u64; EXPERTS];
            for r in 0..world {
                for &step in &recorded {
                    for (s, &e) in map[l].iter().enumerate() {
                        want[e] += routed(round, r, step, l, s);
                    }
                }
            }
            if *row != want {
                return Err(
                    format!("round {round} layer {l}: load {row:?}, expected {want:?}").into(),
                );
            }
        }
        let old: Vec<Vec<i64>> = map
            .iter()
            .map(|r| r.iter().map(|&e| e as i64).collect())
            .collect();
        let plan = rebalance_experts(&load, &params, (round > 0).then_some(old.as_slice()))?;
        let before = addresses(&weights);
        let stats = rearrange_experts(&ep, &map, &plan, &mut weights)?;
        if weights != slots_of(&plan, rank, per) {
            return Err(format!("round {round}: rank {rank}'s slots differ from the plan").into());
        }
        if addresses(&weights) != before {
            return Err(format!("round {round}: rank {rank}'s slots moved in memory").into());
        }
        let recv: usize = stats.iter().map(|s| s.received).sum();
        report.push(format!("round {round}: received {recv} experts"));
        map = plan;
    }
    state.destroy()?;
    Ok(report.join(", "))
}

fn main() {
    if common::answered_worlds("1,2,4,8") {
        return;
    }
    common::rank_main("mp_eplb", |env| {
        run(env).map(|r| format!("every rank holds the plan's experts ({r})"))
    });
}
