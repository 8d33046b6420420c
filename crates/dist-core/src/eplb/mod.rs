//! Expert-parallel load balancing (vLLM's `vllm/distributed/eplb`).
//!
//! Three parts, each usable alone:
//! - [`policy`]: the plan — which logical expert each physical slot holds — from the load of
//!   each expert ([`rebalance_experts`], DeepSeek's hierarchical algorithm as vLLM runs it).
//! - [`load`]: the load — tokens routed to each physical expert per forward pass, kept over a
//!   sliding window, summed per logical expert over the EP group ([`ExpertLoadWindow`],
//!   [`EplbSchedule`]).
//! - [`rearrange`]: the move — expert weights exchanged between the ranks of the EP group so
//!   that each rank holds the experts of the new plan, layer by layer
//!   ([`rearrange_layer`], planned by [`LayerTransfer::plan`]).

pub mod load;
pub mod policy;
pub mod rearrange;

pub use load::{EplbSchedule, ExpertLoadWindow};
pub use policy::{logical_to_physical, rebalance_experts, PolicyParams};
pub use rearrange::{rearrange_experts, rearrange_layer, ExpertMove, LayerStats, LayerTransfer};
