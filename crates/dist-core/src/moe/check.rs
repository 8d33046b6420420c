//! Conformance checks of [`dispatch`] and [`combine`] against a
//! plain single-process MoE, for any backend: every rank builds every rank's tokens and routing
//! from a seed, so each can compute what it must receive and what its tokens' outputs are
//! (`Σ_k w_k · f_{e_k}(x)` over the token's top-k experts, in f64) without communication.
//!
//! Cases: ranks with different token counts, a rank with none, every rank with none, every token
//! routed to one rank's experts, skewed routing, linear and round-robin placements; f32, f64,
//! f16, bf16; both backends, whose results must also agree with each other. Integer-valued data
//! with power-of-two weights is summed exactly in every dtype, so those cases compare bit for
//! bit; random data compares within the dtype's rounding. After each case every rank's verdict is
//! all-gathered, so a failure on one rank fails every rank, naming it.

use crate::communicator::{Comm, View, ViewMut};
use crate::moe::{
    combine, combine_reduced, dispatch, expert_input, All2AllBackend, Dispatched, ExpertPlacement,
    MoeConfig, Routing, RowKernels,
};
use crate::{
    Backend, DType, DeviceCommunicator, Error, GroupCoordinator, HostGroupExt, HostTensor, Result,
};

/// A deterministic 64-bit generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn new(parts: &[u64]) -> Self {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for &p in parts {
            s = (s ^ p).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31);
        }
        Rng(s)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// Experts uniformly at random.
    Random,
    /// Every token's experts on this rank.
    AllTo(usize),
    /// Three picks in four among the first rank's experts.
    Skewed,
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    tokens: Vec<usize>,
    experts: usize,
    top_k: usize,
    hidden: usize,
    round_robin: bool,
    pattern: Pattern,
    exact: bool,
}

fn cases(n: usize) -> Vec<Case> {
    let uneven: Vec<usize> = (0..n).map(|r| 3 + 5 * r).collect();
    let mut one_empty = uneven.clone();
    one_empty[n - 1] = 0;
    let base = |name, tokens: Vec<usize>, pattern, exact| Case {
        name,
        tokens,
        experts: 3 * n + 1,
        top_k: 3.min(3 * n + 1),
        hidden: 7,
        round_robin: false,
        pattern,
        exact,
    };
    vec![
        base(
            "uneven tokens, random routing",
            uneven.clone(),
            Pattern::Random,
            true,
        ),
        base("random data", uneven.clone(), Pattern::Random, false),
        base(
            "the last rank has no tokens",
            one_empty,
            Pattern::Random,
            true,
        ),
        base("no rank has tokens", vec![0; n], Pattern::Random, true),
        base(
            "every token to rank 0",
            uneven.clone(),
            Pattern::AllTo(0),
            true,
        ),
        base("skewed routing", uneven.clone(), Pattern::Skewed, false),
        Case {
            round_robin: true,
            top_k: 4.min(2 * n),
            experts: 2 * n,
            hidden: 5,
            ..base(
                "round-robin placement, top-4",
                uneven,
                Pattern::Random,
                true,
            )
        },
    ]
}

/// Experts per token in case `c`: its top-k, or fewer when the routing's pool is smaller.
fn top_k(c: &Case, p: &ExpertPlacement) -> usize {
    match c.pattern {
        Pattern::AllTo(q) => c.top_k.min(p.experts_of(q).len()),
        _ => c.top_k.min(c.experts),
    }
}

/// Rank `r`'s tokens (`tokens × hidden`, as f64) and routing in case `c`.
fn inputs(
    seed: u64,
    ci: usize,
    c: &Case,
    p: &ExpertPlacement,
    r: usize,
) -> (Vec<f64>, Vec<u32>, Vec<f32>) {
    let t = c.tokens[r];
    let mut rng = Rng::new(&[seed, ci as u64, r as u64]);
    let x: Vec<f64> = (0..t * c.hidden)
        .map(|_| match c.exact {
            true => rng.below(5) as f64 - 2.0,
            false => rng.unit() * 4.0 - 2.0,
        })
        .collect();
    let pool: Vec<u32> = match c.pattern {
        Pattern::AllTo(q) => p.experts_of(q).to_vec(),
        _ => (0..c.experts as u32).collect(),
    };
    let k = top_k(c, p);
    let hot = p.experts_of(0).to_vec();
    let mut ids = Vec::with_capacity(t * k);
    let mut w = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut mine: Vec<u32> = Vec::with_capacity(k);
        while mine.len() < k {
            let e = match c.pattern {
                Pattern::Skewed if rng.below(4) < 3 && hot.iter().any(|e| !mine.contains(e)) => {
                    hot[rng.below(hot.len())]
                }
                _ => pool[rng.below(pool.len())],
            };
            if !mine.contains(&e) {
                mine.push(e);
            }
        }
        ids.extend_from_slice(&mine);
        for _ in 0..k {
            w.push(match c.exact {
                true => [0.25f32, 0.5, 1.0][rng.below(3)],
                false => rng.unit() as f32,
            });
        }
    }
    (x, ids, w)
}

/// Expert `e`'s function of one hidden value.
fn expert(e: u32, x: f64) -> f64 {
    (1 + e % 2) as f64 * x + (e % 3) as f64 - 1.0
}

fn to_host_f64(t: &HostTensor) -> Result<Vec<f64>> {
    Ok(match t.dtype() {
        DType::F32 => t.as_slice::<f32>()?.iter().map(|&v| v as f64).collect(),
        DType::F64 => t.as_slice::<f64>()?.to_vec(),
        DType::F16 => t
            .as_slice::<half::f16>()?
            .iter()
            .map(|v| v.to_f64())
            .collect(),
        DType::BF16 => t
            .as_slice::<half::bf16>()?
            .iter()
            .map(|v| v.to_f64())
            .collect(),
        d => return Err(Error::unsupported(format!("moe check: {d}"))),
    })
}

fn from_f64(dtype: DType, shape: &[usize], v: &[f64]) -> Result<HostTensor> {
    match dtype {
        DType::F32 => HostTensor::from_vec(shape, v.iter().map(|&x| x as f32).collect()),
        DType::F64 => HostTensor::from_vec(shape, v.to_vec()),
        DType::F16 => {
            HostTensor::from_vec(shape, v.iter().map(|&x| half::f16::from_f64(x)).collect())
        }
        DType::BF16 => {
            HostTensor::from_vec(shape, v.iter().map(|&x| half::bf16::from_f64(x)).collect())
        }
        d => Err(Error::unsupported(format!("moe check: {d}"))),
    }
}

/// Runs every case; see the module docs. Collective over `ep`; returns the checks passed.
pub fn check_all<B: Backend>(ep: &GroupCoordinator<B>, seed: u64) -> Result<usize>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let n = ep.world_size();
    let mut passed = 0;
    for (ci, c) in cases(n).iter().enumerate() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let mine = check_case(ep, seed, ci, c, dtype);
            let verdict: Option<String> = mine.as_ref().err().map(|e| e.to_string());
            let all: Vec<Option<String>> = match n {
                1 => vec![verdict],
                _ => ep.host_group().all_gather_obj(&verdict)?,
            };
            if let Some((r, why)) = all
                .iter()
                .enumerate()
                .find_map(|(r, v)| v.as_ref().map(|w| (r, w)))
            {
                return Err(Error::invalid(format!(
                    "moe check '{}' {dtype} failed on rank {r}: {why}",
                    c.name
                )));
            }
            passed += mine?;
        }
    }
    Ok(passed)
}

fn check_case<B: Backend>(
    ep: &GroupCoordinator<B>,
    seed: u64,
    ci: usize,
    c: &Case,
    dtype: DType,
) -> Result<usize>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let (n, me) = (ep.world_size(), ep.rank_in_group());
    let p = match c.round_robin {
        true => ExpertPlacement::round_robin(c.experts, n)?,
        false => ExpertPlacement::linear(c.experts, n)?,
    };
    let all: Vec<_> = (0..n).map(|r| inputs(seed, ci, c, &p, r)).collect();
    let h = c.hidden;
    let round = |v: &[f64]| -> Result<Vec<f64>> { to_host_f64(&from_f64(dtype, &[v.len()], v)?) };
    let (x, ids, w) = &all[me];
    let k = top_k(c, &p);
    let xs = from_f64(dtype, &[c.tokens[me], h], x)?;
    let hidden = B::from_host(&xs, ep.device())?;
    let routing = Routing {
        topk_ids: ids,
        topk_weights: w,
        top_k: k,
    };
    // The oracle: this rank's tokens through their experts, in f64, rounded once.
    let xr = round(x)?;
    let want: Vec<f64> = (0..c.tokens[me] * h)
        .map(|i| {
            let t = i / h;
            (0..k)
                .map(|j| w[t * k + j] as f64 * expert(ids[t * k + j], xr[i]))
                .sum()
        })
        .collect();
    let want = round(&want)?;
    let tol = match dtype {
        DType::F16 | DType::BF16 => 2e-2,
        _ => 1e-5,
    };
    let mut passed = 0;
    let mut results = Vec::new();
    for backend in All2AllBackend::ALL {
        let cfg = MoeConfig {
            backend,
            placement: p.clone(),
        };
        let what = |s: &str| format!("{backend} {s}");
        let d: Dispatched<B> = dispatch(ep, &cfg, &Comm::<B>::view(&hidden), &routing)?;
        // What this rank must receive: each source's tokens with an expert here (all of them for
        // the all-gather), in order, with local ids and weights.
        let mut rows: Vec<f64> = Vec::new();
        let (mut want_ids, mut want_w, mut counts) = (Vec::new(), Vec::new(), vec![0usize; n]);
        for (s, (xs_, ids_, w_)) in all.iter().enumerate() {
            let xs_ = round(xs_)?;
            for t in 0..c.tokens[s] {
                let tid = &ids_[t * k..(t + 1) * k];
                if backend == All2AllBackend::AllToAllV
                    && !tid.iter().any(|&e| p.rank_of(e as usize) == me)
                {
                    continue;
                }
                counts[s] += 1;
                rows.extend_from_slice(&xs_[t * h..(t + 1) * h]);
                want_ids.extend(tid.iter().map(|&e| match p.rank_of(e as usize) == me {
                    true => p.local_of(e as usize) as i32,
                    false => -1,
                }));
                want_w.extend_from_slice(&w_[t * k..(t + 1) * k]);
            }
        }
        let got = to_host_f64(&B::to_host(&d.hidden)?)?;
        crate::ensure_arg!(
            d.recv_counts == counts,
            "{}: rows from each rank {:?}, expected {counts:?}",
            what("dispatch"),
            d.recv_counts
        );
        crate::ensure_arg!(
            got == rows,
            "{}: the received rows differ from the sources' tokens",
            what("dispatch")
        );
        crate::ensure_arg!(
            d.topk_ids == want_ids && d.topk_weights == want_w,
            "{}: received routing differs",
            what("dispatch")
        );
        let per_expert: Vec<usize> = (0..p.experts_of(me).len())
            .map(|l| want_ids.iter().filter(|&&e| e == l as i32).count())
            .collect();
        crate::ensure_arg!(
            d.expert_num_tokens() == per_expert,
            "{}: expert_num_tokens {:?}, expected {per_expert:?}",
            what("dispatch"),
            d.expert_num_tokens()
        );
        passed += 4;
        // The experts: expert-ordered rows through f_e, on the host.
        let input = to_host_f64(&B::to_host(&expert_input(ep, &d)?)?)?;
        let mut y = vec![0.0; input.len()];
        for (l, &e) in p.experts_of(me).iter().enumerate() {
            for i in d.layout.offsets[l]..d.layout.offsets[l + 1] {
                let r = d.layout.rows[i] as usize;
                crate::ensure_arg!(
                    input[i * h..(i + 1) * h] == got[r * h..(r + 1) * h],
                    "{}: expert-ordered row {i} is not received row {r}",
                    what("expert_input")
                );
                for j in 0..h {
                    y[i * h + j] = expert(e, input[i * h + j]);
                }
            }
        }
        let y = from_f64(dtype, &[d.layout.rows.len(), h], &y)?;
        let y_dev = B::from_host(&y, ep.device())?;
        let out = combine(ep, &d, &Comm::<B>::view(&y_dev))?;
        let out = to_host_f64(&B::to_host(&out)?)?;
        // The same through combine_reduced, with the per-row sums made here.
        let yv = to_host_f64(&y)?;
        let mut red = vec![0.0; d.rows() * h];
        for r in 0..d.rows() {
            let (pos, wts) = d.layout.reduce.segment(r);
            for (q, &i) in pos.iter().enumerate() {
                let wt = wts.expect("the expert layout has weights")[q] as f64;
                for j in 0..h {
                    red[r * h + j] += wt * yv[i as usize * h + j];
                }
            }
        }
        let red = from_f64(dtype, &[d.rows(), h], &red)?;
        let red_dev = B::from_host(&red, ep.device())?;
        let out2 = combine_reduced(ep, &d, &Comm::<B>::view(&red_dev))?;
        let out2 = to_host_f64(&B::to_host(&out2)?)?;
        for (label, o) in [("combine", &out), ("combine_reduced", &out2)] {
            crate::ensure_arg!(
                o.len() == want.len(),
                "{}: {} values, expected {}",
                what(label),
                o.len(),
                want.len()
            );
            for (i, (&g, &e)) in o.iter().zip(&want).enumerate() {
                let ok = match c.exact {
                    true => g == e,
                    false => (g - e).abs() <= tol * (1.0 + e.abs()),
                };
                crate::ensure_arg!(
                    ok,
                    "{}: token {} element {}: {g}, the plain MoE gives {e}",
                    what(label),
                    i / h,
                    i % h
                );
            }
            passed += 1;
        }
        let tr = d.traffic();
        let distinct: usize = (0..c.tokens[me])
            .map(|t| {
                let mut d: Vec<usize> = ids[t * k..(t + 1) * k]
                    .iter()
                    .map(|&e| p.rank_of(e as usize))
                    .filter(|&q| q != me)
                    .collect();
                d.sort_unstable();
                d.dedup();
                d.len()
            })
            .sum();
        let rows_out = match backend {
            All2AllBackend::AllToAllV => distinct,
            All2AllBackend::AllGatherReduceScatter => c.tokens[me] * (n - 1),
        };
        crate::ensure_arg!(
            tr.dispatch_rows == rows_out,
            "{}: {} rows out, expected {rows_out}",
            what("traffic"),
            tr.dispatch_rows
        );
        passed += 1;
        results.push(out);
    }
    crate::ensure_arg!(
        results[0] == results[1],
        "the two backends combine to different values"
    );
    Ok(passed + 1)
}
