//! Multi-process MoE dispatch and combine over the EP group, both all2all backends
//! (`allgather_reducescatter`, `all_to_all_v`): `dist_core::moe::check` against a plain
//! single-process MoE (empty ranks, everything to one rank, skewed routing, f32/f64/f16/bf16).
//!
//! `mp_moe --bench [TOKENS]` (under `dist run`) times both backends on the same routing, median of
//! 20 after 3 warm-ups: dispatch, combine, and the rows and bytes every rank sends to the others,
//! for uniform top-8 routing and for routing limited to two ranks per token (DeepSeek's
//! node-limited routing, one rank per node).
//!
//! Run under `dist run --nproc-per-node N` (N in `--worlds`).

use std::time::{Duration, Instant};

use dist::moe::{
    self, combine, dispatch, expert_input, All2AllBackend, ExpertPlacement, MoeConfig, Routing,
};
use dist::{DType, DeviceCommunicator, DistEnv, HostGroupExt, HostTensor};

mod common;

use common::B;
type Comm = <B as dist::Backend>::Communicator;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Top-`k` distinct experts per token; with `ranks_per_token`, drawn from that many ranks' experts.
fn routing(
    tokens: usize,
    k: usize,
    p: &ExpertPlacement,
    ranks_per_token: Option<usize>,
    seed: u64,
) -> (Vec<u32>, Vec<f32>) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |m: usize| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % m as u64) as usize
    };
    let (n, e) = (p.world_size(), p.num_experts());
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let pool: Vec<u32> = match ranks_per_token {
            None => (0..e as u32).collect(),
            Some(g) => {
                let first = next(n);
                (0..g.min(n))
                    .flat_map(|i| p.experts_of((first + i) % n).to_vec())
                    .collect()
            }
        };
        let mut mine: Vec<u32> = Vec::with_capacity(k);
        while mine.len() < k.min(pool.len()) {
            let x = pool[next(pool.len())];
            if !mine.contains(&x) {
                mine.push(x);
            }
        }
        ids.extend(mine);
    }
    let w = vec![1.0 / k as f32; ids.len()];
    (ids, w)
}

fn bench(env: &DistEnv, tokens: usize) -> Result<String, Box<dyn std::error::Error>> {
    let world = env.world().world_size;
    let (state, ep) = common::ep_groups(env)?;
    let rank = ep.rank_in_group();
    let (hidden, experts, k) = (2048, 8 * world.max(2), 8);
    let p = ExpertPlacement::linear(experts, world)?;
    let x = HostTensor::random(DType::BF16, &[tokens, hidden], rank as u64);
    let mut out = vec![format!(
        "moe bench: world {world}, {tokens} tokens per rank, hidden {hidden} bf16, {experts} experts, top-{k}, median of 20"
    )];
    for (label, limit) in [("uniform routing", None), ("two ranks per token", Some(2))] {
        let (ids, w) = routing(tokens, k, &p, limit, 7 + rank as u64);
        let r = Routing {
            topk_ids: &ids,
            topk_weights: &w,
            top_k: k,
        };
        out.push(format!("  {label}:"));
        let mut results = Vec::new();
        for backend in All2AllBackend::ALL {
            let cfg = MoeConfig {
                backend,
                placement: p.clone(),
            };
            let (mut disp, mut comb) = (vec![], vec![]);
            let mut traffic = Default::default();
            let mut last = None;
            let mut d_counts = (vec![], vec![]);
            for i in 0..23 {
                ep.barrier()?;
                let t = Instant::now();
                let d = dispatch(&ep, &cfg, &Comm::view(&x), &r)?;
                let td = t.elapsed();
                // Identity experts: the expert-ordered rows are the outputs.
                let y = expert_input(&ep, &d)?;
                ep.barrier()?;
                let t = Instant::now();
                let o = combine(&ep, &d, &Comm::view(&y))?;
                let tc = t.elapsed();
                if i >= 3 {
                    disp.push(td);
                    comb.push(tc);
                }
                traffic = d.traffic();
                d_counts = (d.send_counts().to_vec(), d.recv_counts.clone());
                last = Some(o);
            }
            let all: Vec<(usize, usize, usize, usize)> = ep.host_group().all_gather_obj(&(
                traffic.dispatch_rows,
                traffic.dispatch_bytes,
                traffic.combine_rows,
                traffic.combine_bytes,
            ))?;
            let sum =
                |f: fn(&(usize, usize, usize, usize)) -> usize| all.iter().map(f).sum::<usize>();
            let (dr, db, cr, cb) = (sum(|t| t.0), sum(|t| t.1), sum(|t| t.2), sum(|t| t.3));
            let (d, c) = (median(disp), median(comb));
            out.push(format!(
                "    {:<24} dispatch {:7.2} ms  combine {:7.2} ms  total {:7.2} ms | rows out {:6} + {:6}, {:7.1} + {:7.1} MiB",
                backend.name(),
                d.as_secs_f64() * 1e3,
                c.as_secs_f64() * 1e3,
                (d + c).as_secs_f64() * 1e3,
                dr,
                cr,
                db as f64 / (1 << 20) as f64,
                cb as f64 / (1 << 20) as f64
            ));
            // The transport alone, same rows: the backend's collective on ready buffers.
            let o = last.as_ref().ok_or("no iteration ran")?;
            let (sc, rc) = match backend {
                All2AllBackend::AllToAllV => (d_counts.0.clone(), d_counts.1.clone()),
                All2AllBackend::AllGatherReduceScatter => {
                    (vec![tokens; world], vec![tokens; world])
                }
            };
            let send = HostTensor::random(DType::BF16, &[sc.iter().sum(), hidden], 3);
            let mut recv = HostTensor::zeros(DType::BF16, &[rc.iter().sum(), hidden]);
            let mut back = HostTensor::zeros(DType::BF16, &[tokens, hidden]);
            let mut returned = HostTensor::zeros(DType::BF16, &[sc.iter().sum(), hidden]);
            let mut raw = vec![];
            for i in 0..23 {
                ep.barrier()?;
                let t = Instant::now();
                match backend {
                    All2AllBackend::AllToAllV => {
                        ep.all_to_all_v_into(&send.view(), &sc, &mut recv.view_mut(), &rc)?;
                        ep.all_to_all_v_into(&recv.view(), &rc, &mut returned.view_mut(), &sc)?;
                    }
                    All2AllBackend::AllGatherReduceScatter => {
                        ep.all_gatherv_into(&x.view(), &mut recv.view_mut(), 0, &rc)?;
                        ep.reduce_scatterv_into(&recv.view(), &mut back.view_mut(), 0, &rc)?;
                    }
                }
                if i >= 3 {
                    raw.push(t.elapsed());
                }
            }
            out.push(format!(
                "    {:<24} the same rows through the bare collectives ({}): {:7.2} ms",
                "",
                match backend {
                    All2AllBackend::AllToAllV => "all_to_all_v there and back",
                    All2AllBackend::AllGatherReduceScatter => "all_gatherv + reduce_scatterv",
                },
                median(raw).as_secs_f64() * 1e3
            ));
            results.push(o.clone());
        }
        if results[0] != results[1] {
            return Err(
                format!("rank {rank}: the two backends combined to different tokens").into(),
            );
        }
    }
    state.destroy()?;
    Ok(out.join("\n"))
}

fn run(env: &DistEnv) -> Result<String, Box<dyn std::error::Error>> {
    let (state, ep) = common::ep_groups(env)?;
    let passed = moe::check::check_all(&ep, 5)?;
    state.destroy()?;
    Ok(format!(
        "{passed} checks passed (both backends against a plain MoE)"
    ))
}

fn main() {
    if common::answered_worlds("1,2,4,8") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let bench_tokens = (args.get(1).map(String::as_str) == Some("--bench"))
        .then(|| args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512));
    common::rank_main("mp_moe", |env| match bench_tokens {
        Some(t) => bench(env, t),
        None => run(env),
    });
}
