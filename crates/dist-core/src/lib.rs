//! # dist-core: the vocabulary of the `dist` workspace
//!
//! `dist` is a Rust implementation of vLLM's distributed communication layer
//! (`vllm.distributed`). This crate is its bottom layer: it does no I/O and holds no `unsafe`,
//! and model crates depend on it alone.
//!
//! ```text
//!  dist (facade: features cpu, cuda, rocm, tpu, gloo; CLI `dist`)
//!    ├── dist-cpu   dist-cuda   dist-rocm   dist-tpu   dist-store
//!    └──────────────────────── dist-core ────────────────────────┘
//! ```
//!
//! What lives here:
//! - element types ([`DType`], [`Element`]), [`ReduceOp`] and the one reduction kernel
//!   ([`reduce_slices`]) every host backend uses, so results are bit-identical across ranks;
//! - [`Device`], [`TensorMeta`], the [`Tensor`] trait and the typed host tensor [`HostTensor`];
//! - the traits the backends implement: [`Store`] (the rendezvous store), [`HostGroup`] (vLLM's
//!   "cpu group": control-plane bytes and typed objects, see [`HostGroupExt`]) and
//!   [`DeviceCommunicator`] (the data-plane collectives), tied together by [`Backend`];
//! - [`reference`](mod@reference): the result of every collective computed plainly on the host, sharing
//!   no code with any backend — the oracle of every backend's tests;
//! - group math ([`layout`]): vLLM's exact rank layouts, `get_pp_indices`, `divide`…
//! - one [`Error`] type with the variants a caller acts on;
//! - MoE expert load balancing ([`eplb`]: load recording, vLLM's rebalancing policy, the
//!   rearrangement of expert weights over the EP group);
//! - MoE token dispatch and combine ([`moe`]: all-gather / reduce-scatter or all-to-all-v to the
//!   ranks of each token's experts, chosen as vLLM's all2all backend);
//! - weight transfer from a trainer into inference ranks ([`weights`]: a typed, checksummed
//!   manifest, packed buckets, deadlines).
//!
//! ## Design choices
//! - **Static dispatch for data, objects for control.** Model code is generic over
//!   `B: Backend`; a backend's tensor and communicator types are associated types. Host groups
//!   and stores are used through `Arc<dyn HostGroup>` / `Arc<dyn Store>`: they move bytes, not
//!   tensors, and one job mixes implementations (store-backed, shared memory, gloo).
//! - **Blocking calls with deadlines.** Every wait is bounded; errors name the op, the ranks
//!   that did not answer and the time waited.
//! - **Typed objects.** Objects crossing processes are serde values encoded with postcard and
//!   size-capped before allocation; nothing is ever unpickled.
//!
//! ## Example
//! ```
//! use dist_core::{reference, HostTensor, ReduceOp};
//! let a = HostTensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
//! let b = HostTensor::from_vec(&[2], vec![3.0f32, 4.0]).unwrap();
//! let sum = reference::all_reduce(&[a.clone(), b.clone()], ReduceOp::Sum).unwrap();
//! assert_eq!(sum.as_slice::<f32>().unwrap(), &[4.0, 6.0]);
//! let cat = reference::all_gather(&[a, b], -1).unwrap();
//! assert_eq!(cat.shape(), &[4]);
//!
//! let layout = dist_core::ParallelConfig { world_size: 8, tp: 2, pp: 2, dp: 2, pcp: 1, dcp: 1, ep: false }
//!     .layout()
//!     .unwrap();
//! assert_eq!(layout.pp[0], vec![0, 2]);
//! ```
#![forbid(unsafe_code)]

pub mod communicator;
pub mod conformance;
pub mod coordinator;
pub mod diag;
mod dtype;
pub mod eplb;
mod error;
pub mod group;
pub mod host_comm;
pub mod layout;
pub mod local;
pub mod moe;
pub mod parallel_state;
pub mod pool;
pub mod reference;
mod store;
pub mod tensor;
pub mod view;
pub mod weights;

pub use communicator::{
    Backend, Broadcaster, CommunicatorContext, DeviceCommunicator, LocalBackend, LocalCommunicator,
    DEFAULT_TIMEOUT,
};
pub use coordinator::{
    CoordinatorParts, DictEntry, DictValue, GroupCoordinator, TensorDict, Value,
};
pub use dtype::{reduce_bytes, reduce_slices, DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use group::{decode_obj, encode_obj, HostGroup, HostGroupExt, DEFAULT_MAX_OBJECT_BYTES};
pub use layout::{
    divide, ensure_divisibility, get_pp_indices, get_pp_indices_from_env,
    split_tensor_along_last_dim, tcp_uri, GroupLayout, ParallelConfig,
};
pub use parallel_state::{GroupFactory, GroupGenerations, ParallelState, WorldInfo};
pub use pool::{HostPool, PoolStats};
pub use store::Store;
pub use tensor::{Device, DeviceKind, HostTensor, Tensor, TensorMeta};
pub use view::{HostView, HostViewMut};

/// Re-exported so [`dispatch_dtype!`] works in dependent crates.
pub use half;
