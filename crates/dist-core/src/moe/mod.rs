//! MoE token dispatch and combine over the EP group (vLLM's `All2AllManager` backends and the
//! fused-MoE modular kernel's prepare / finalize).
//!
//! A MoE layer on each EP rank has its tokens (`hidden`, `tokens × H`) and their top-k routing
//! ([`Routing`]: expert ids and router weights). Experts are spread over the ranks
//! ([`ExpertPlacement`]). **Dispatch** brings every token to the ranks holding its experts;
//! each rank runs its experts; **combine** brings the results back, weighted by the router and
//! summed per token. Two backends, chosen by [`All2AllBackend`] (in code, or
//! `DIST_ALL2ALL_BACKEND` as vLLM's `VLLM_ALL2ALL_BACKEND`):
//!
//! | backend | dispatch | combine | vLLM |
//! |---|---|---|---|
//! | `allgather_reducescatter` | every rank gets every token (all-gather-v) | reduce-scatter-v of each rank's partial sums | `AgRsAll2AllManager` (the default) |
//! | `all_to_all_v` | a token goes to each rank holding one of its experts, **once** however many of its experts that rank holds (all-to-all-v; per-rank and per-expert counts exchanged first) | the rows come back the same way and are summed per token | DeepEP high-throughput's semantics |
//!
//! **What dispatch returns** ([`Dispatched`], the same shape for both backends): the received
//! token rows, grouped by source rank in rank order and in each source's token order
//! (all-to-all-v: only tokens with an expert here; all-gather: all); for each received row its
//! top-k *local* expert ids (−1 where the expert is on another rank: DeepEP's `recv_topk_idx`)
//! and router weights; tokens per local expert (`expert_num_tokens`); and the [`ExpertLayout`]
//! that orders the rows by local expert ([`expert_input`] gathers them so each expert's rows are
//! contiguous).
//!
//! **What combine does.** [`combine`] takes the experts' outputs in expert order, applies the
//! router weights and sums each received row's experts (DeepEP-HT's finalize:
//! `topk_weights · out`, then `moe_sum`), then returns the rows to their ranks and sums a token's
//! rows from all the ranks it went to, in rank order. [`combine_reduced`] takes rows already
//! weighted and summed per received row. Sums run in f32 (f64 for f64) and are rounded once per
//! step, so both backends give the same values for the same routing.
//!
//! The index work (which rows go where) is planned on the host from the routing
//! ([`plan`](mod@plan)); the row moves and sums are [`RowKernels`] on the backend's views; bytes
//! move with the group's `all_to_all_v_into` / `all_gatherv_into` / `reduce_scatterv_into`.
//! An invalid routing on any rank fails **every** rank at the counts exchange, naming it.

/// `return Err(Error::Protocol(..))` unless `cond`: what a peer sent does not add up.
macro_rules! ensure_protocol {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::protocol(format!($($fmt)+)));
        }
    };
}

pub mod check;
pub mod kernels;
pub mod plan;

use serde::{Deserialize, Serialize};

use crate::communicator::{Comm, View, ViewMut};
use crate::tensor::with_dim;
use crate::{
    Backend, DType, DeviceCommunicator, Error, GroupCoordinator, HostGroupExt, HostTensor, Result,
    Tensor,
};

pub use kernels::{RowKernels, RowSums};
pub use plan::{ExpertLayout, ExpertPlacement, Routing};

/// The environment variable that picks the backend ([`All2AllBackend::from_env`]).
pub const ALL2ALL_BACKEND_ENV: &str = "DIST_ALL2ALL_BACKEND";

/// How MoE tokens travel (vLLM's all2all backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum All2AllBackend {
    /// All-gather-v dispatch, reduce-scatter-v combine: every rank sees every token.
    #[default]
    AllGatherReduceScatter,
    /// All-to-all-v dispatch and combine: each token only to the ranks of its experts.
    AllToAllV,
}

impl All2AllBackend {
    /// Every backend.
    pub const ALL: [All2AllBackend; 2] = [
        All2AllBackend::AllGatherReduceScatter,
        All2AllBackend::AllToAllV,
    ];
    /// The name `DIST_ALL2ALL_BACKEND` takes (vLLM's for the all-gather one).
    pub const fn name(self) -> &'static str {
        match self {
            All2AllBackend::AllGatherReduceScatter => "allgather_reducescatter",
            All2AllBackend::AllToAllV => "all_to_all_v",
        }
    }
    /// `DIST_ALL2ALL_BACKEND`, or the default (`allgather_reducescatter`, as vLLM) when unset; an
    /// unknown name is an error listing the known ones.
    pub fn from_env() -> Result<Self> {
        match std::env::var(ALL2ALL_BACKEND_ENV) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(e) => Err(Error::invalid(format!("{ALL2ALL_BACKEND_ENV}: {e}"))),
        }
    }
}

impl std::fmt::Display for All2AllBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for All2AllBackend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s.trim())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{ALL2ALL_BACKEND_ENV}: unknown all2all backend '{s}' (known: {})",
                    Self::ALL.map(|b| b.name()).join(", ")
                ))
            })
    }
}

/// One MoE layer's communication setting: the backend and where the experts are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// How tokens travel.
    pub backend: All2AllBackend,
    /// Where the experts live (its world size must be the EP group's).
    pub placement: ExpertPlacement,
}

/// What a rank moves in one dispatch and combine (rows that leave it for other ranks, and their
/// bytes, the routing metadata included): the traffic the backend's algorithm needs, the same
/// on every transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Token rows this rank sends to other ranks in the dispatch.
    pub dispatch_rows: usize,
    /// Their bytes, hidden states and metadata.
    pub dispatch_bytes: usize,
    /// Rows this rank sends to other ranks in the combine.
    pub combine_rows: usize,
    /// Their bytes.
    pub combine_bytes: usize,
}

/// Tokens dispatched to this rank; see the module docs.
#[derive(Debug)]
pub struct Dispatched<B: Backend> {
    /// Received token rows (`rows × H`), by source rank, each source's in its token order.
    pub hidden: B::Tensor,
    /// Experts per token.
    pub top_k: usize,
    /// Per received row, `top_k` local expert ids (−1: on another rank).
    pub topk_ids: Vec<i32>,
    /// Per received row, the `top_k` router weights.
    pub topk_weights: Vec<f32>,
    /// Rows received from each rank.
    pub recv_counts: Vec<usize>,
    /// The rows by local expert.
    pub layout: ExpertLayout,
    backend: All2AllBackend,
    tokens: usize,
    send_counts: Vec<usize>,
    back: RowSums,
    traffic: Traffic,
}

impl<B: Backend> Dispatched<B> {
    /// Received rows.
    pub fn rows(&self) -> usize {
        self.recv_counts.iter().sum()
    }
    /// Tokens per local expert (vLLM's `expert_num_tokens`).
    pub fn expert_num_tokens(&self) -> Vec<usize> {
        self.layout.expert_num_tokens()
    }
    /// Tokens this rank dispatched (the rows its combine returns).
    pub fn num_tokens(&self) -> usize {
        self.tokens
    }
    /// Rows this rank sent to each rank (all-gather: its tokens to every rank).
    pub fn send_counts(&self) -> &[usize] {
        &self.send_counts
    }
    /// The backend that moved them.
    pub fn backend(&self) -> All2AllBackend {
        self.backend
    }
    /// What this rank moves in the dispatch and in the combine.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// The counts every rank announces before any data moves, or why it cannot dispatch.
#[derive(Serialize, Deserialize)]
enum Announce {
    Counts {
        top_k: usize,
        dtype: DType,
        row_shape: Vec<usize>,
        rows: Vec<u64>,
        experts: Vec<u64>,
    },
    Refused(String),
}

fn alloc<B: Backend>(ep: &GroupCoordinator<B>, dtype: DType, shape: &[usize]) -> Result<B::Tensor> {
    match ep.device_communicator() {
        Some(c) => c.alloc(dtype, shape),
        None => B::from_host(&HostTensor::zeros(dtype, shape), ep.device()),
    }
}

fn refused(ep: &str, all: &[Announce]) -> Option<Error> {
    let why: Vec<String> = all
        .iter()
        .enumerate()
        .filter_map(|(r, a)| match a {
            Announce::Refused(w) => Some(format!("rank {r}: {w}")),
            Announce::Counts { .. } => None,
        })
        .collect();
    (!why.is_empty()).then(|| Error::invalid(format!("moe dispatch on {ep}: {}", why.join("; "))))
}

/// Dispatches this rank's tokens (`hidden`, `tokens × …`, rows along dim 0) with `routing` over
/// the EP group `ep`; see the module docs. Collective over `ep`.
pub fn dispatch<B: Backend>(
    ep: &GroupCoordinator<B>,
    cfg: &MoeConfig,
    hidden: &View<'_, B>,
    routing: &Routing<'_>,
) -> Result<Dispatched<B>>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let (n, me, k) = (ep.world_size(), ep.rank_in_group(), routing.top_k);
    let p = &cfg.placement;
    let tokens = hidden.shape().first().copied().unwrap_or(0);
    let local = (|| {
        crate::ensure_arg!(
            hidden.shape().len() >= 2,
            "moe dispatch: hidden states {:?} need a token dim and a hidden dim",
            hidden.shape()
        );
        crate::ensure_arg!(
            p.world_size() == n,
            "moe dispatch: the placement spans {} ranks, the group {n}",
            p.world_size()
        );
        routing.check(tokens, p)?;
        Ok(match cfg.backend {
            All2AllBackend::AllToAllV => plan::plan_all_to_all(routing, p),
            All2AllBackend::AllGatherReduceScatter => plan::plan_all_gather(routing, p),
        })
    })();
    let mine = match &local {
        Ok(s) => Announce::Counts {
            top_k: k,
            dtype: hidden.dtype(),
            row_shape: hidden.shape()[1..].to_vec(),
            rows: s.counts.iter().map(|&c| c as u64).collect(),
            experts: s.expert_counts.clone(),
        },
        Err(e) => Announce::Refused(e.to_string()),
    };
    let all = match n {
        1 => vec![mine],
        _ => ep.host_group().all_gather_obj(&mine)?,
    };
    if let Some(e) = refused(ep.unique_name(), &all) {
        return Err(e);
    }
    let plan = local?;
    let row_shape = &hidden.shape()[1..];
    let odd: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            !matches!(a, Announce::Counts { top_k, dtype, row_shape: s, .. }
                if *top_k == k && *dtype == hidden.dtype() && s == row_shape)
        })
        .map(|(r, _)| r)
        .collect();
    crate::ensure_arg!(
        odd.is_empty(),
        "moe dispatch on {}: ranks {odd:?} dispatch another top_k, dtype or hidden shape than rank {me} (top-{k}, {} rows of {row_shape:?})",
        ep.unique_name(),
        hidden.dtype()
    );
    // Rows from each rank and tokens for each local expert, announced by their senders.
    let mut recv_counts = Vec::with_capacity(n);
    let mut announced = vec![0u64; p.experts_of(me).len()];
    for (r, a) in all.iter().enumerate() {
        let Announce::Counts { rows, experts, .. } = a else {
            unreachable!("refusals returned above")
        };
        ensure_protocol!(
            rows.len() == n && experts.len() == p.num_experts(),
            "moe dispatch: rank {r} announced {} row counts and {} expert counts, expected {n} and {}",
            rows.len(),
            experts.len(),
            p.num_experts()
        );
        recv_counts.push(usize::try_from(rows[me]).map_err(|_| {
            Error::protocol(format!(
                "moe dispatch: rank {r} announced {} rows",
                rows[me]
            ))
        })?);
        for (l, &e) in p.experts_of(me).iter().enumerate() {
            announced[l] += experts[e as usize];
        }
    }
    let row_bytes = row_shape.iter().product::<usize>() * hidden.dtype().size();
    let total = recv_counts.iter().sum::<usize>();
    let mut recv = alloc(ep, hidden.dtype(), &with_dim(hidden.shape(), 0, total))?;
    let mut meta = alloc(ep, DType::I32, &[total, 2 * k])?;
    let meta_send = B::from_host(
        &HostTensor::from_vec(&[plan.rows.len(), 2 * k], plan.meta)?,
        ep.device(),
    )?;
    let traffic = match cfg.backend {
        All2AllBackend::AllToAllV => {
            let mut send = alloc(
                ep,
                hidden.dtype(),
                &with_dim(hidden.shape(), 0, plan.rows.len()),
            )?;
            Comm::<B>::view_mut(&mut send).gather_rows(hidden, &plan.rows)?;
            ep.all_to_all_v_into(
                &Comm::<B>::view(&send),
                &plan.counts,
                &mut Comm::<B>::view_mut(&mut recv),
                &recv_counts,
            )?;
            ep.all_to_all_v_into(
                &Comm::<B>::view(&meta_send),
                &plan.counts,
                &mut Comm::<B>::view_mut(&mut meta),
                &recv_counts,
            )?;
            let out = plan.rows.len() - plan.counts[me];
            let back = total - recv_counts[me];
            Traffic {
                dispatch_rows: out,
                dispatch_bytes: out * (row_bytes + 8 * k),
                combine_rows: back,
                combine_bytes: back * row_bytes,
            }
        }
        All2AllBackend::AllGatherReduceScatter => {
            ep.all_gatherv_into(hidden, &mut Comm::<B>::view_mut(&mut recv), 0, &recv_counts)?;
            ep.all_gatherv_into(
                &Comm::<B>::view(&meta_send),
                &mut Comm::<B>::view_mut(&mut meta),
                0,
                &recv_counts,
            )?;
            let out = tokens * (n - 1);
            let back = total - tokens;
            Traffic {
                dispatch_rows: out,
                dispatch_bytes: out * (row_bytes + 8 * k),
                combine_rows: back,
                combine_bytes: back * row_bytes,
            }
        }
    };
    let meta = B::to_host(&meta)?;
    let words = meta.as_slice::<i32>()?;
    let mut topk_ids = Vec::with_capacity(total * k);
    let mut topk_weights = Vec::with_capacity(total * k);
    for m in words.chunks_exact(2 * k) {
        match cfg.backend {
            All2AllBackend::AllToAllV => topk_ids.extend_from_slice(&m[..k]),
            All2AllBackend::AllGatherReduceScatter => {
                for &e in &m[..k] {
                    ensure_protocol!(
                        e >= 0 && (e as usize) < p.num_experts(),
                        "moe dispatch: a peer routed to expert {e}"
                    );
                    let e = e as usize;
                    topk_ids.push(if p.rank_of(e) == me {
                        p.local_of(e) as i32
                    } else {
                        -1
                    });
                }
            }
        }
        topk_weights.extend(m[k..].iter().map(|&w| f32::from_bits(w as u32)));
    }
    let layout = ExpertLayout::new(&topk_ids, &topk_weights, k, announced.len())
        .map_err(|e| Error::protocol(format!("moe dispatch: received routing: {e}")))?;
    let got: Vec<u64> = layout
        .expert_num_tokens()
        .iter()
        .map(|&c| c as u64)
        .collect();
    ensure_protocol!(
        got == announced,
        "moe dispatch on {}: the ranks announced {announced:?} tokens for this rank's experts, the rows carry {got:?}",
        ep.unique_name()
    );
    Ok(Dispatched {
        hidden: recv,
        top_k: k,
        topk_ids,
        topk_weights,
        recv_counts,
        layout,
        backend: cfg.backend,
        tokens,
        send_counts: plan.counts,
        back: plan.back,
        traffic,
    })
}

/// The received rows in expert order (`Σ expert_num_tokens × …`): each local expert's rows
/// contiguous, the input of a grouped expert kernel.
pub fn expert_input<B: Backend>(ep: &GroupCoordinator<B>, d: &Dispatched<B>) -> Result<B::Tensor>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let mut out = alloc(
        ep,
        d.hidden.dtype(),
        &with_dim(d.hidden.shape(), 0, d.layout.rows.len()),
    )?;
    Comm::<B>::view_mut(&mut out).gather_rows(&Comm::<B>::view(&d.hidden), &d.layout.rows)?;
    Ok(out)
}

/// Combines the experts' outputs (`expert_out`, in expert order as [`expert_input`]) into this
/// rank's tokens: router weights applied, a token's experts summed; see the module docs.
pub fn combine<B: Backend>(
    ep: &GroupCoordinator<B>,
    d: &Dispatched<B>,
    expert_out: &View<'_, B>,
) -> Result<B::Tensor>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let mut out = alloc(ep, expert_out.dtype(), &token_shape(d, expert_out)?)?;
    combine_into(ep, d, expert_out, &mut Comm::<B>::view_mut(&mut out))?;
    Ok(out)
}

fn token_shape<B: Backend>(d: &Dispatched<B>, x: &impl Tensor) -> Result<Vec<usize>> {
    crate::ensure_arg!(
        !x.shape().is_empty(),
        "moe combine: a 0-d tensor has no rows"
    );
    Ok(with_dim(x.shape(), 0, d.tokens))
}

/// [`combine`] into the caller's `out` (`tokens × …`).
pub fn combine_into<B: Backend>(
    ep: &GroupCoordinator<B>,
    d: &Dispatched<B>,
    expert_out: &View<'_, B>,
    out: &mut ViewMut<'_, B>,
) -> Result<()>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    crate::ensure_arg!(
        expert_out.shape().first() == Some(&d.layout.rows.len()),
        "moe combine: {:?} expert outputs, the dispatch gave {} expert rows",
        expert_out.shape(),
        d.layout.rows.len()
    );
    let mut reduced = alloc(
        ep,
        expert_out.dtype(),
        &with_dim(expert_out.shape(), 0, d.rows()),
    )?;
    Comm::<B>::view_mut(&mut reduced).sum_rows(expert_out, &d.layout.reduce)?;
    let reduced = Comm::<B>::view(&reduced);
    combine_reduced_into(ep, d, &reduced, out)
}

/// Combines rows already weighted and summed per received row (`rows × …`, in received order)
/// into this rank's tokens.
pub fn combine_reduced<B: Backend>(
    ep: &GroupCoordinator<B>,
    d: &Dispatched<B>,
    reduced: &View<'_, B>,
) -> Result<B::Tensor>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    let mut out = alloc(ep, reduced.dtype(), &token_shape(d, reduced)?)?;
    combine_reduced_into(ep, d, reduced, &mut Comm::<B>::view_mut(&mut out))?;
    Ok(out)
}

/// [`combine_reduced`] into the caller's `out`.
pub fn combine_reduced_into<B: Backend>(
    ep: &GroupCoordinator<B>,
    d: &Dispatched<B>,
    reduced: &View<'_, B>,
    out: &mut ViewMut<'_, B>,
) -> Result<()>
where
    for<'a, 'b> ViewMut<'a, B>: RowKernels<View<'b, B>>,
{
    crate::ensure_arg!(
        reduced.shape().first() == Some(&d.rows()),
        "moe combine: {:?} rows, the dispatch received {}",
        reduced.shape(),
        d.rows()
    );
    crate::communicator::check_output(
        "moe combine",
        out,
        reduced.dtype(),
        &token_shape(d, reduced)?,
    )?;
    match d.backend {
        All2AllBackend::AllGatherReduceScatter => {
            ep.reduce_scatterv_into(reduced, out, 0, &d.recv_counts)
        }
        All2AllBackend::AllToAllV => {
            let total = d.send_counts.iter().sum::<usize>();
            let mut back = alloc(ep, reduced.dtype(), &with_dim(reduced.shape(), 0, total))?;
            ep.all_to_all_v_into(
                reduced,
                &d.recv_counts,
                &mut Comm::<B>::view_mut(&mut back),
                &d.send_counts,
            )?;
            let back = Comm::<B>::view(&back);
            out.sum_rows(&back, &d.back)
        }
    }
}
