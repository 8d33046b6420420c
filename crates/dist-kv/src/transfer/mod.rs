//! KV transfer: vLLM's `kv_transfer/` — moving KV-cache blocks between instances.
//!
//! * [`connector`]: the interface, vLLM's `KVConnectorBase_V1` as two traits, one per role
//!   ([`KvConnectorScheduler`], [`KvConnectorWorker`]), and the serde metadata between them.
//! * [`model`]: the engine-neutral things they touch: [`Request`], the paged cache of a layer
//!   ([`PagedKvCache`], NHD or HND) and the slot arithmetic.
//! * [`storage`]: the shared-storage connector (safetensors files under a folder, vLLM's key).
//! * `cuda` (feature `cuda`): the layer cache in device memory and the device data paths of
//!   the P2P connector (NCCL, as vLLM; CUDA IPC between instances of one host).
//! * [`p2p`]: the P2P connector (a prefill instance sends each layer's blocks of a request to a
//!   decode instance, PUT / PUT_ASYNC / GET, bounded buffers, finished-request tracking).
//!
//! Every blocking call has a deadline; a request whose transfer fails is reported as failed
//! (with [`Error::Request`] naming it) and its buffers freed, and the other requests go on.
//!
//! ## Example: a prefill instance saves, a decode instance loads (shared storage)
//!
//! ```
//! use std::collections::BTreeSet;
//! use dist_core::DType;
//! use dist_kv::transfer::*;
//!
//! let dir = std::env::temp_dir().join(format!("dist-kv-doc-{}", std::process::id()));
//! let cfg = StorageConfig::new(&dir, 4);
//! let spec = |layout| KvCacheSpec { kv: 2, num_blocks: 8, block_size: 4, num_kv_heads: 2,
//!     head_dim: 8, dtype: DType::BF16, layout };
//! let prefill: KvCaches = [("layer.0".to_string(), PagedKvCache::random(spec(KvLayout::Nhd), 1)?)].into();
//! let mut decode: KvCaches = [("layer.0".to_string(), PagedKvCache::zeros(spec(KvLayout::Hnd))?)].into();
//! let prompt: Vec<i64> = (0..9).collect();
//!
//! // Prefill: the scheduler side decides to store, the worker side writes after the layer ran.
//! let mut sched = StorageScheduler::new(cfg.clone())?;
//! let mut worker = StorageWorker::new(cfg.clone())?;
//! worker.register_kv_caches(&prefill)?;
//! let req = Request::new("pre-1", prompt.clone());
//! let out = SchedulerOutput { scheduled_new_reqs: vec![NewRequestData {
//!     request: req, block_ids: vec![5, 2, 7], num_computed_tokens: 0 }], ..Default::default() };
//! let meta = sched.build_connector_meta(&out);
//! worker.bind_connector_metadata(decode_metadata(&encode_metadata(&meta)?)?); // crosses processes
//! worker.save_kv_layer("layer.0", &prefill["layer.0"])?;
//! worker.wait_for_save()?;
//!
//! // Decode: the prompt plus the generated token hits 8 tokens, loaded into other blocks.
//! let mut sched = StorageScheduler::new(cfg.clone())?;
//! let mut worker = StorageWorker::new(cfg.clone())?;
//! worker.register_kv_caches(&decode)?;
//! let req = Request::new("dec-1", [prompt, vec![42]].concat());
//! assert_eq!(sched.get_num_new_matched_tokens(&req, 0)?, (Some(8), false));
//! sched.update_state_after_alloc(&req, &[0, 3, 1], 8);
//! let out = SchedulerOutput { scheduled_new_reqs: vec![NewRequestData {
//!     request: req, block_ids: vec![0, 3, 1], num_computed_tokens: 0 }], ..Default::default() };
//! worker.bind_connector_metadata(sched.build_connector_meta(&out));
//! worker.start_load_kv(&mut decode)?;
//! assert!(worker.get_finished(&BTreeSet::new()).finished_recving.contains("dec-1"));
//! assert_eq!(prefill["layer.0"].gather_blocks(&[5, 2])?, decode["layer.0"].gather_blocks(&[0, 3])?);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), dist_kv::transfer::Error>(())
//! ```

pub mod connector;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod model;
pub mod p2p;
pub mod storage;

pub use connector::{
    decode_metadata, encode_metadata, CachedRequestData, FinishedRequests, KvConnectorMetadata,
    KvConnectorRole, KvConnectorScheduler, KvConnectorWorker, KvTransferParams, NewRequestData,
    SchedulerOutput,
};
pub use error::{Error, Result};
pub use model::{
    align_to_block_size, blocks_shape, check_blocks_tensor, rows_shape, slot_mapping, BlockId,
    KvCacheLayer, KvCacheSpec, KvCaches, KvLayout, PagedKvCache, Request,
};
pub use storage::{StorageConfig, StorageConnectorMetadata, StorageScheduler, StorageWorker};
