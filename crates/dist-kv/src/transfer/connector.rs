//! The connector interface: vLLM's `KVConnectorBase_V1` split into its two roles.
//!
//! vLLM builds one connector object per role (`KVConnectorRole.SCHEDULER = 0` in the scheduler
//! process, `WORKER = 1` in each worker) from one class. Here the roles are two traits, so each
//! side has only the methods it may call: [`KvConnectorScheduler`] decides what to load and
//! store and writes it into a metadata value; the engine ships that value to the workers (it is
//! serde: [`encode_metadata`] / [`decode_metadata`]), where [`KvConnectorWorker`] moves the data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::model::{BlockId, KvCacheLayer, Request};

/// The two roles of a connector (vLLM's `KVConnectorRole`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvConnectorRole {
    /// Runs in the scheduler process.
    Scheduler = 0,
    /// Runs in every worker.
    Worker = 1,
}

/// A request scheduled for the first time in this step (vLLM's `NewRequestData`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRequestData {
    /// The request.
    pub request: Request,
    /// Its blocks (of the one KV-cache group this model has).
    pub block_ids: Vec<BlockId>,
    /// Tokens already computed (prefix cache and external hits).
    pub num_computed_tokens: usize,
}

/// A request scheduled before, seen again in this step (one entry of vLLM's `CachedRequestData`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRequestData {
    /// The request id.
    pub request_id: String,
    /// True when it was preempted and resumes now; `new_block_ids` are then all its blocks.
    pub resumed_from_preemption: bool,
    /// Blocks added in this step (all blocks when resumed), if any.
    pub new_block_ids: Option<Vec<BlockId>>,
    /// Tokens computed before this step.
    pub num_computed_tokens: usize,
}

/// What the scheduler decided in one step (the part of vLLM's `SchedulerOutput` connectors read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerOutput {
    /// Requests scheduled for the first time.
    pub scheduled_new_reqs: Vec<NewRequestData>,
    /// Requests scheduled again.
    pub scheduled_cached_reqs: Vec<CachedRequestData>,
    /// Tokens scheduled in this step, by request id.
    pub num_scheduled_tokens: BTreeMap<String, usize>,
    /// Requests that finished since the last step.
    pub finished_req_ids: BTreeSet<String>,
}

impl SchedulerOutput {
    /// Schedules `request` for the first time, in `block_ids`, with nothing computed before.
    pub fn add_new_request(&mut self, request: &Request, block_ids: &[BlockId]) {
        self.scheduled_new_reqs.push(NewRequestData {
            request: request.clone(),
            block_ids: block_ids.to_vec(),
            num_computed_tokens: 0,
        });
    }

    /// [`Self::add_new_request`] with its whole prompt scheduled in this step.
    pub fn add_new_prompt(&mut self, request: &Request, block_ids: &[BlockId]) {
        self.add_new_request(request, block_ids);
        self.num_scheduled_tokens
            .insert(request.request_id.clone(), request.prompt_token_ids.len());
    }
}

/// What a worker reports after a step (vLLM's `KVConnectorOutput`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedRequests {
    /// Requests whose KV the peer has taken: their buffers are freed (vLLM's `finished_sending`).
    pub finished_sending: BTreeSet<String>,
    /// Requests whose KV has arrived and been injected (vLLM's `finished_recving`).
    pub finished_recving: BTreeSet<String>,
    /// Requests whose transfer failed, with the reason (their buffers are freed too).
    pub failed: BTreeMap<String, String>,
}

/// Parameters a connector hands back from [`KvConnectorScheduler::request_finished`] (vLLM's
/// `kv_transfer_params`, returned to the client that will route the request on).
pub type KvTransferParams = BTreeMap<String, String>;

/// The metadata a scheduler-side connector sends to its workers each step.
pub trait KvConnectorMetadata:
    Serialize + DeserializeOwned + Clone + Debug + Send + 'static
{
}

/// Cap on encoded connector metadata (16 MiB), checked before decoding.
pub const MAX_METADATA_BYTES: usize = 16 << 20;

/// Encodes connector metadata for the workers (postcard).
pub fn encode_metadata<M: KvConnectorMetadata>(meta: &M) -> Result<Vec<u8>> {
    Ok(dist_core::encode_obj(meta)?)
}

/// Decodes connector metadata, refusing more than [`MAX_METADATA_BYTES`] and trailing bytes.
pub fn decode_metadata<M: KvConnectorMetadata>(bytes: &[u8]) -> Result<M> {
    Ok(dist_core::decode_obj(bytes, MAX_METADATA_BYTES)?)
}

/// The scheduler side of a connector (vLLM's `KVConnectorBase_V1` scheduler-side methods).
pub trait KvConnectorScheduler: Send + Debug {
    /// The metadata this connector sends to its workers.
    type Metadata: KvConnectorMetadata;

    /// How many tokens beyond `num_computed_tokens` the connector can load, and whether the load
    /// is asynchronous. `None` means "ask again later"; the flag must be false when the count is 0.
    fn get_num_new_matched_tokens(
        &mut self,
        request: &Request,
        num_computed_tokens: usize,
    ) -> Result<(Option<usize>, bool)>;

    /// Called once blocks were allocated for `request`, with the tokens the connector will load.
    fn update_state_after_alloc(
        &mut self,
        request: &Request,
        block_ids: &[BlockId],
        num_external_tokens: usize,
    );

    /// The metadata of this step. It resets the connector's per-step state and does not modify
    /// `scheduler_output`.
    fn build_connector_meta(&mut self, scheduler_output: &SchedulerOutput) -> Self::Metadata;

    /// Called when a request finishes, before its blocks are freed. Returns whether the blocks
    /// must stay allocated until the workers report the request in `finished_sending`, and the
    /// parameters to return to the client.
    fn request_finished(
        &mut self,
        request: &Request,
        block_ids: &[BlockId],
    ) -> (bool, Option<KvTransferParams>) {
        let _ = (request, block_ids);
        (false, None)
    }

    /// What the workers reported after a step.
    fn update_connector_output(&mut self, output: &FinishedRequests) {
        let _ = output;
    }
}

/// Writes a [`KvConnectorWorker`]'s `bind_connector_metadata`, `clear_connector_metadata` and
/// `has_connector_metadata` for a connector that keeps this step's metadata in the field
/// `$field: Option<Self::Metadata>`; for use inside its `impl KvConnectorWorker for … { … }`.
macro_rules! metadata_in_field {
    ($field:ident) => {
        fn bind_connector_metadata(&mut self, meta: Self::Metadata) {
            self.$field = Some(meta);
        }
        fn clear_connector_metadata(&mut self) {
            self.$field = None;
        }
        fn has_connector_metadata(&self) -> bool {
            self.$field.is_some()
        }
    };
}
pub(crate) use metadata_in_field;

/// The worker side of a connector (vLLM's `KVConnectorBase_V1` worker-side methods).
///
/// Caches are passed to each call rather than kept by reference (vLLM keeps the GPU tensors it
/// got in `register_kv_caches`): the engine owns them, the connector borrows them when it works.
pub trait KvConnectorWorker: Send + Debug {
    /// The metadata the scheduler side sends.
    type Metadata: KvConnectorMetadata;
    /// The layer caches it works on: [`super::PagedKvCache`] in host memory, or a device cache.
    type Cache: KvCacheLayer;

    /// Tells the connector the layers and their shapes; called once before the first step.
    fn register_kv_caches(&mut self, caches: &BTreeMap<String, Self::Cache>) -> Result<()>;

    /// Sets this step's metadata (vLLM's `bind_connector_metadata`).
    fn bind_connector_metadata(&mut self, meta: Self::Metadata);
    /// Clears it after the step.
    fn clear_connector_metadata(&mut self);
    /// True between bind and clear.
    fn has_connector_metadata(&self) -> bool;

    /// Starts loading the KV of this step's requests into `caches`. A request whose data cannot
    /// be loaded is not an error of the call: it is reported by
    /// [`Self::get_block_ids_with_load_errors`] and in [`Self::get_finished`]'s `failed`, and none of
    /// its blocks is written with wrong data.
    fn start_load_kv(&mut self, caches: &mut BTreeMap<String, Self::Cache>) -> Result<()>;

    /// Blocks until `layer_name` is loaded (layer-by-layer pipelining).
    fn wait_for_layer_load(&mut self, layer_name: &str) -> Result<()>;

    /// Starts saving this step's requests' KV of one layer, right after the layer's attention ran.
    fn save_kv_layer(&mut self, layer_name: &str, layer: &Self::Cache) -> Result<()>;

    /// Blocks until every save of this step is done (or handed to a bounded buffer).
    fn wait_for_save(&mut self) -> Result<()>;

    /// Requests whose transfers finished since the last call; `finished_req_ids` are the
    /// requests the scheduler finished.
    fn get_finished(&mut self, finished_req_ids: &BTreeSet<String>) -> FinishedRequests;

    /// Blocks that failed to load since the last call (the scheduler recomputes them).
    fn get_block_ids_with_load_errors(&mut self) -> BTreeSet<BlockId>;

    /// Releases the connector's resources.
    fn shutdown(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Per-request failures a worker collected in one step, drained into [`FinishedRequests::failed`].
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    pub(crate) blocks: BTreeSet<BlockId>,
    pub(crate) failed: BTreeMap<String, String>,
}

impl FailureLog {
    pub(crate) fn record(&mut self, request_id: &str, blocks: &[BlockId], err: &Error) {
        tracing::warn!(request = request_id, error = %err, "KV transfer failed for request");
        self.blocks.extend(blocks.iter().copied());
        self.failed.insert(request_id.to_string(), err.to_string());
    }
}
