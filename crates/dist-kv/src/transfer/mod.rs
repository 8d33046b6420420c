//! KV transfer: vLLM's `kv_transfer/` (SPEC §5) — moving KV-cache blocks between instances.
//!
//! * [`connector`]: the interface, vLLM's `KVConnectorBase_V1` as two traits, one per role
//!   ([`KvConnectorScheduler`], [`KvConnectorWorker`]), and the serde metadata between them.
//! * [`model`]: the engine-neutral things they touch: [`Request`], the paged cache of a layer
//!   ([`PagedKvCache`], NHD or HND) and the slot arithmetic.
//! * [`storage`]: the shared-storage connector (safetensors files under a folder, vLLM's key).
//! * [`p2p`]: the P2P connector (a prefill instance sends each layer's blocks of a request to a
//!   decode instance, PUT / PUT_ASYNC / GET, bounded buffers, finished-request tracking).
//!
//! Every blocking call has a deadline; a request whose transfer fails is reported as failed
//! (with [`Error::Request`] naming it) and its buffers freed, and the other requests go on.

pub mod connector;
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
    align_to_block_size, slot_mapping, BlockId, KvCacheSpec, KvCaches, KvLayout, PagedKvCache,
    Request,
};
pub use storage::{StorageConfig, StorageConnectorMetadata, StorageScheduler, StorageWorker};
