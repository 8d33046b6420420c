//! The shared-storage connector (vLLM's `ExampleConnector`, formerly `SharedStorageConnector`):
//! KV saved to and loaded from safetensors files in a folder every instance can read.
//!
//! * **Cache key** as vLLM computes it: md5 (sha256 with [`StorageConfig::fips`], as vLLM's
//!   `safe_hash` under FIPS) of the prompt prefix's token ids as little-endian int64 bytes,
//!   followed by the multimodal hashes joined with `-` in UTF-8, written as lowercase hex. The
//!   prefix is `align_to_block_size(n)` tokens: `n` = the prompt's length when saving, and its length
//!   minus one when looking up and loading (the decode instance's prompt is the prefill's plus
//!   the token it generated). vLLM's own load path re-aligns the full prompt, which names another
//!   folder when the prompt length is a multiple of the block size; here the load uses the
//!   lookup's prefix, so a hit always loads what it found.
//! * **Files**: `{storage_path}/{key}/{layer_name}.safetensors`, one tensor `"kv_cache"` of shape
//!   `[kv, tokens, num_kv_heads, head_dim]` (the token rows at the request's slots, whatever the
//!   cache layout), as vLLM writes with `safetensors.torch.save_file`. Files are written to a
//!   temporary name and renamed, so a reader never sees a half-written file from a live writer.
//! * **Integrity**: the header's `__metadata__` carries `dist_kv.sha256`, the SHA-256 of the
//!   tensor bytes. A load reads every layer's file of a request, checks the size before reading,
//!   the format, the dtype, the shape and the checksum, and only then writes the cache: a
//!   partial, damaged or foreign file is an error for that request (its blocks are reported by
//!   `get_block_ids_with_load_errors`), never a crash and never a wrong load. Files without the
//!   checksum (written by vLLM itself) are refused unless [`StorageConfig::require_checksum`] is off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dist_core::{DType, HostTensor};
use md5::Digest;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::connector::{
    FailureLog, FinishedRequests, KvConnectorMetadata, KvConnectorScheduler, KvConnectorWorker,
    SchedulerOutput,
};
use super::error::{Error, Result};
use super::model::{
    align_to_block_size, rows_shape, slot_mapping, BlockId, KvCacheLayer, PagedKvCache, Request,
};

/// The tensor name vLLM uses in every file.
pub const TENSOR_NAME: &str = "kv_cache";
/// The metadata key of the checksum.
pub const CHECKSUM_KEY: &str = "dist_kv.sha256";
/// Room allowed for a file's header beyond its tensor bytes.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Configuration of both sides (vLLM's `kv_connector_extra_config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageConfig {
    /// The shared folder (`shared_storage_path`, vLLM's default `/tmp`).
    pub storage_path: PathBuf,
    /// Tokens per block of the KV cache.
    pub block_size: usize,
    /// Hash keys with sha256 instead of md5 (vLLM does under FIPS).
    pub fips: bool,
    /// Refuse files without a checksum (default true; off to read files vLLM wrote).
    pub require_checksum: bool,
}

impl StorageConfig {
    /// A config for `storage_path` and `block_size` with md5 keys and checksums required.
    pub fn new(storage_path: impl Into<PathBuf>, block_size: usize) -> Self {
        StorageConfig {
            storage_path: storage_path.into(),
            block_size,
            fips: false,
            require_checksum: true,
        }
    }

    fn check(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(Error::invalid(
                "shared-storage connector: block_size must be positive",
            ));
        }
        Ok(())
    }

    /// The cache key (folder name) of a token prefix and its multimodal hashes.
    pub fn cache_key(&self, token_ids: &[i64], mm_hashes: &[String]) -> String {
        let mut bytes: Vec<u8> = token_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        if !mm_hashes.is_empty() {
            bytes.extend_from_slice(mm_hashes.join("-").as_bytes());
        }
        if self.fips {
            hex(&sha2::Sha256::digest(&bytes))
        } else {
            hex(&md5::Md5::digest(&bytes))
        }
    }

    /// The folder of a key.
    pub fn folder(&self, key: &str) -> PathBuf {
        self.storage_path.join(key)
    }

    /// The file of one layer under a key; layer names that could leave the folder are refused.
    pub fn file(&self, key: &str, layer_name: &str) -> Result<PathBuf> {
        if layer_name.is_empty()
            || layer_name.contains(['/', '\\', '\0'])
            || layer_name.starts_with('.')
        {
            return Err(Error::invalid(format!(
                "layer name {layer_name:?} cannot be a file name"
            )));
        }
        Ok(self.folder(key).join(format!("{layer_name}.safetensors")))
    }

    /// The prefix of a prompt that lookups and loads use: `align_to_block_size(len - 1)` tokens.
    pub fn lookup_tokens(&self, prompt: &[i64]) -> usize {
        align_to_block_size(prompt.len().saturating_sub(1), self.block_size)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::I8 => StDtype::I8,
        DType::U8 => StDtype::U8,
        DType::I32 => StDtype::I32,
        DType::U32 => StDtype::U32,
        DType::I64 => StDtype::I64,
        DType::U64 => StDtype::U64,
        DType::F16 => StDtype::F16,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F8E4M3 => StDtype::F8_E4M3,
        DType::F8E5M2 => StDtype::F8_E5M2,
        // DType is non_exhaustive; a new type maps to a value no file of ours carries.
        _ => StDtype::BOOL,
    }
}

/// One request's load or store in a step (vLLM's `ReqMeta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageReqMeta {
    /// The request id (for errors and reports).
    pub request_id: String,
    /// The token prefix the key is computed over.
    pub token_ids: Vec<i64>,
    /// The slots of those tokens.
    pub slot_mapping: Vec<u64>,
    /// Save (true) or load (false).
    pub is_store: bool,
    /// Multimodal hashes, part of the key.
    pub mm_hashes: Vec<String>,
}

/// The metadata of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageConnectorMetadata {
    /// The requests to load or save.
    pub requests: Vec<StorageReqMeta>,
}

impl KvConnectorMetadata for StorageConnectorMetadata {}

/// Scheduler side of the shared-storage connector.
#[derive(Debug)]
pub struct StorageScheduler {
    config: StorageConfig,
    need_load: HashMap<String, (Request, Vec<BlockId>)>,
}

impl StorageScheduler {
    /// A scheduler-side connector.
    pub fn new(config: StorageConfig) -> Result<Self> {
        config.check()?;
        Ok(StorageScheduler {
            config,
            need_load: HashMap::new(),
        })
    }

    fn found_match(&self, prompt: &[i64], mm_hashes: &[String]) -> bool {
        let n = self.config.lookup_tokens(prompt);
        n > 0
            && self
                .config
                .folder(&self.config.cache_key(&prompt[..n], mm_hashes))
                .is_dir()
    }

    fn meta(
        &self,
        req: &Request,
        block_ids: &[BlockId],
        n: usize,
        is_store: bool,
    ) -> Option<StorageReqMeta> {
        let n = n.min(block_ids.len() * self.config.block_size);
        let slots = slot_mapping(block_ids, self.config.block_size, n).ok()?;
        Some(StorageReqMeta {
            request_id: req.request_id.clone(),
            token_ids: req.prompt_token_ids[..n].to_vec(),
            slot_mapping: slots,
            is_store,
            mm_hashes: req.mm_hashes.clone(),
        })
    }
}

impl KvConnectorScheduler for StorageScheduler {
    type Metadata = StorageConnectorMetadata;

    fn get_num_new_matched_tokens(
        &mut self,
        request: &Request,
        num_computed_tokens: usize,
    ) -> Result<(Option<usize>, bool)> {
        if !self.found_match(&request.prompt_token_ids, &request.mm_hashes) {
            return Ok((Some(0), false));
        }
        let n = self.config.lookup_tokens(&request.prompt_token_ids);
        tracing::info!(request = %request.request_id, tokens = n, "shared-storage KV hit");
        Ok((Some(n.saturating_sub(num_computed_tokens)), false))
    }

    fn update_state_after_alloc(
        &mut self,
        request: &Request,
        block_ids: &[BlockId],
        num_external_tokens: usize,
    ) {
        if num_external_tokens > 0 {
            self.need_load.insert(
                request.request_id.clone(),
                (request.clone(), block_ids.to_vec()),
            );
        }
    }

    fn build_connector_meta(&mut self, out: &SchedulerOutput) -> StorageConnectorMetadata {
        let mut meta = StorageConnectorMetadata::default();
        for new in &out.scheduled_new_reqs {
            let req = &new.request;
            if self.need_load.contains_key(&req.request_id) {
                let n = self.config.lookup_tokens(&req.prompt_token_ids);
                meta.requests
                    .extend(self.meta(req, &new.block_ids, n, false));
            } else if !self.found_match(&req.prompt_token_ids, &req.mm_hashes) {
                let n = align_to_block_size(req.prompt_token_ids.len(), self.config.block_size);
                if n > 0 {
                    meta.requests
                        .extend(self.meta(req, &new.block_ids, n, true));
                }
            }
        }
        for cached in &out.scheduled_cached_reqs {
            if !cached.resumed_from_preemption {
                continue;
            }
            let (Some((req, _)), Some(blocks)) = (
                self.need_load.get(&cached.request_id),
                &cached.new_block_ids,
            ) else {
                continue;
            };
            let n = self.config.lookup_tokens(&req.prompt_token_ids);
            meta.requests.extend(self.meta(req, blocks, n, false));
        }
        self.need_load.clear();
        meta
    }
}

/// Worker side of the shared-storage connector, over host caches ([`PagedKvCache`], the
/// default) or device caches (rows go through host memory, as vLLM's `safetensors.torch.save_file`
/// of a GPU tensor does).
#[derive(Debug)]
pub struct StorageWorker<C = PagedKvCache> {
    config: StorageConfig,
    layers: BTreeMap<String, super::model::KvCacheSpec>,
    meta: Option<StorageConnectorMetadata>,
    failures: FailureLog,
    loaded: BTreeSet<String>,
    saved: BTreeSet<String>,
    _cache: std::marker::PhantomData<fn() -> C>,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl<C: KvCacheLayer> StorageWorker<C> {
    /// A worker-side connector.
    pub fn new(config: StorageConfig) -> Result<Self> {
        config.check()?;
        Ok(StorageWorker {
            config,
            layers: BTreeMap::new(),
            meta: None,
            failures: FailureLog::default(),
            loaded: BTreeSet::new(),
            saved: BTreeSet::new(),
            _cache: std::marker::PhantomData,
        })
    }

    /// Writes one layer's rows of one request, atomically (temporary file, then rename).
    fn save_one(&self, req: &StorageReqMeta, layer_name: &str, layer: &C) -> Result<()> {
        let rows = layer.gather_slots(&req.slot_mapping)?;
        let key = self.config.cache_key(&req.token_ids, &req.mm_hashes);
        let path = self.config.file(&key, layer_name)?;
        let folder = self.config.folder(&key);
        fs::create_dir_all(&folder)
            .map_err(|e| Error::io(format!("create {}", folder.display()), e))?;
        let bytes = encode_file(&rows)?;
        let tmp = folder.join(format!(
            ".{layer_name}.{}.{}.tmp",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // No fsync: a file that a power loss leaves empty or partial fails its checksum or
        // size check on load, which is an error for that request, never a wrong load.
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("write {}", path.display()), e)
        })
    }

    /// Reads and checks every layer's file of one request; nothing is written to the caches.
    fn read_request(&self, req: &StorageReqMeta) -> Result<Vec<(String, HostTensor)>> {
        let key = self.config.cache_key(&req.token_ids, &req.mm_hashes);
        let mut out = Vec::with_capacity(self.layers.len());
        for (name, spec) in &self.layers {
            let path = self.config.file(&key, name)?;
            let shape = vec![
                spec.kv,
                req.slot_mapping.len(),
                spec.num_kv_heads,
                spec.head_dim,
            ];
            let t = read_file(&path, spec.dtype, &shape, self.config.require_checksum)?;
            out.push((name.clone(), t));
        }
        Ok(out)
    }

    /// Records that `req`'s load or save failed with `e`, for its blocks.
    fn fail(&mut self, req: &StorageReqMeta, e: Error) {
        let blocks = self.blocks_of(req);
        self.failures
            .record(&req.request_id, &blocks, &e.for_request(&req.request_id));
    }

    fn blocks_of(&self, req: &StorageReqMeta) -> Vec<BlockId> {
        let bs = self.config.block_size as u64;
        let set: BTreeSet<BlockId> = req
            .slot_mapping
            .iter()
            .map(|s| (s / bs) as BlockId)
            .collect();
        set.into_iter().collect()
    }
}

/// Serialises rows as a safetensors file with the checksum in its metadata.
pub fn encode_file(rows: &HostTensor) -> Result<Vec<u8>> {
    let view = TensorView::new(
        st_dtype(rows.dtype()),
        rows.shape().to_vec(),
        rows.as_bytes(),
    )
    .map_err(|e| Error::invalid(format!("safetensors view: {e}")))?;
    let info = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            CHECKSUM_KEY.to_string(),
            hex(&sha2::Sha256::digest(rows.as_bytes())),
        ),
    ]);
    safetensors::serialize([(TENSOR_NAME, view)], Some(info))
        .map_err(|e| Error::invalid(format!("safetensors serialize: {e}")))
}

/// Reads one layer file, checking size, format, dtype, shape and checksum before returning it.
pub fn read_file(
    path: &Path,
    dtype: DType,
    shape: &[usize],
    require_checksum: bool,
) -> Result<HostTensor> {
    let shown = path.display().to_string();
    let corrupt = |reason: String| Error::Corrupt {
        path: shown.clone(),
        reason,
    };
    let want_bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("KV file {shown}")))
        }
        Err(e) => return Err(Error::io(format!("stat {shown}"), e)),
    };
    if len > want_bytes + MAX_HEADER_BYTES || len < want_bytes + 8 {
        return Err(corrupt(format!(
            "{len} bytes, expected {want_bytes} bytes of {dtype} {shape:?} plus a header"
        )));
    }
    let bytes = fs::read(path).map_err(|e| Error::io(format!("read {shown}"), e))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| corrupt(format!("not safetensors: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(format!("header: {e}")))?;
    let view = st
        .tensor(TENSOR_NAME)
        .map_err(|e| corrupt(format!("no tensor {TENSOR_NAME:?}: {e}")))?;
    if view.dtype() != st_dtype(dtype) || view.shape() != shape {
        return Err(corrupt(format!(
            "tensor is {:?} {:?}, this cache needs {dtype} {shape:?}",
            view.dtype(),
            view.shape()
        )));
    }
    match header.metadata().as_ref().and_then(|m| m.get(CHECKSUM_KEY)) {
        Some(sum) => {
            let got = hex(&sha2::Sha256::digest(view.data()));
            if *sum != got {
                return Err(corrupt(format!("checksum {got} does not match {sum}")));
            }
        }
        None if require_checksum => {
            return Err(corrupt(format!("no {CHECKSUM_KEY} in its metadata")))
        }
        None => {}
    }
    Ok(HostTensor::from_bytes(dtype, shape, view.data())?)
}

impl<C: KvCacheLayer> KvConnectorWorker for StorageWorker<C> {
    type Metadata = StorageConnectorMetadata;
    type Cache = C;

    fn register_kv_caches(&mut self, caches: &BTreeMap<String, C>) -> Result<()> {
        for (name, c) in caches {
            if c.spec().block_size != self.config.block_size {
                return Err(Error::invalid(format!(
                    "layer {name}: block size {} differs from the connector's {}",
                    c.spec().block_size,
                    self.config.block_size
                )));
            }
            self.config.file("x", name)?;
        }
        self.layers = caches.iter().map(|(n, c)| (n.clone(), *c.spec())).collect();
        Ok(())
    }

    super::connector::metadata_in_field!(meta);

    fn start_load_kv(&mut self, caches: &mut BTreeMap<String, C>) -> Result<()> {
        let Some(meta) = self.meta.take() else {
            return Ok(());
        };
        for req in meta
            .requests
            .iter()
            .filter(|r| !r.is_store && !r.slot_mapping.is_empty())
        {
            let res = self.read_request(req).and_then(|layers| {
                // Every file checked: now write, after checking every target exists and fits.
                for (name, rows) in &layers {
                    let cache = caches.get(name).ok_or_else(|| {
                        Error::invalid(format!("layer {name} was registered but is not passed"))
                    })?;
                    if rows_shape(cache.spec(), req.slot_mapping.len()) != rows.shape() {
                        return Err(Error::invalid(format!("layer {name} changed shape")));
                    }
                }
                for (name, rows) in &layers {
                    if let Some(c) = caches.get_mut(name) {
                        c.scatter_slots(&req.slot_mapping, rows)?;
                    }
                }
                Ok(())
            });
            match res {
                Ok(()) => {
                    self.loaded.insert(req.request_id.clone());
                }
                Err(e) => self.fail(req, e),
            }
        }
        self.meta = Some(meta);
        Ok(())
    }

    fn wait_for_layer_load(&mut self, _layer_name: &str) -> Result<()> {
        Ok(())
    }

    fn save_kv_layer(&mut self, layer_name: &str, layer: &C) -> Result<()> {
        let Some(meta) = self.meta.take() else {
            return Ok(());
        };
        for req in meta
            .requests
            .iter()
            .filter(|r| r.is_store && !r.slot_mapping.is_empty())
        {
            if self.failures.failed.contains_key(&req.request_id) {
                continue;
            }
            match self.save_one(req, layer_name, layer) {
                Ok(()) => {
                    self.saved.insert(req.request_id.clone());
                }
                Err(e) => self.fail(req, e),
            }
        }
        self.meta = Some(meta);
        Ok(())
    }

    fn wait_for_save(&mut self) -> Result<()> {
        Ok(())
    }

    fn get_finished(&mut self, _finished_req_ids: &BTreeSet<String>) -> FinishedRequests {
        let failed = std::mem::take(&mut self.failures.failed);
        let mut out = FinishedRequests {
            finished_sending: std::mem::take(&mut self.saved),
            finished_recving: std::mem::take(&mut self.loaded),
            failed,
        };
        out.finished_sending.retain(|r| !out.failed.contains_key(r));
        out.finished_recving.retain(|r| !out.failed.contains_key(r));
        out
    }

    fn get_block_ids_with_load_errors(&mut self) -> BTreeSet<BlockId> {
        std::mem::take(&mut self.failures.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_loads_hits_stores_misses_and_reloads_resumed_requests() {
        use crate::transfer::connector::{CachedRequestData, NewRequestData};
        let dir = std::env::temp_dir().join(format!("dist-kv-sched-{}", std::process::id()));
        let cfg = StorageConfig::new(&dir, 4);
        let mut s = StorageScheduler::new(cfg.clone()).unwrap();
        let hit = Request::new("hit", (0..10).collect());
        let miss = Request::new("miss", (100..110).collect());
        // Make "hit" a hit: its lookup prefix (align(9) = 8 tokens) has a folder.
        let key = cfg.cache_key(&hit.prompt_token_ids[..8], &[]);
        fs::create_dir_all(cfg.folder(&key)).unwrap();
        assert_eq!(
            s.get_num_new_matched_tokens(&hit, 0).unwrap(),
            (Some(8), false)
        );
        assert_eq!(
            s.get_num_new_matched_tokens(&miss, 0).unwrap(),
            (Some(0), false)
        );
        s.update_state_after_alloc(&hit, &[6, 1, 3], 8);
        s.update_state_after_alloc(&miss, &[2, 5, 7], 0);
        let out = SchedulerOutput {
            scheduled_new_reqs: vec![
                NewRequestData {
                    request: hit.clone(),
                    block_ids: vec![6, 1, 3],
                    num_computed_tokens: 0,
                },
                NewRequestData {
                    request: miss.clone(),
                    block_ids: vec![2, 5, 7],
                    num_computed_tokens: 0,
                },
            ],
            ..Default::default()
        };
        let m = s.build_connector_meta(&out);
        assert_eq!(m.requests.len(), 2);
        let (load, store) = (&m.requests[0], &m.requests[1]);
        assert!(!load.is_store && store.is_store);
        assert_eq!(load.slot_mapping, vec![24, 25, 26, 27, 4, 5, 6, 7]);
        assert_eq!(cfg.cache_key(&load.token_ids, &[]), key);
        // The store key is over align(10) = 8 tokens of "miss".
        assert_eq!(store.token_ids, (100..108).collect::<Vec<_>>());
        assert_eq!(store.slot_mapping, vec![8, 9, 10, 11, 20, 21, 22, 23]);
        // Nothing pending after the step; a preempted request resumed with new blocks reloads.
        assert!(s
            .build_connector_meta(&SchedulerOutput::default())
            .requests
            .is_empty());
        s.update_state_after_alloc(&hit, &[9, 8], 8);
        let out = SchedulerOutput {
            scheduled_cached_reqs: vec![CachedRequestData {
                request_id: "hit".into(),
                resumed_from_preemption: true,
                new_block_ids: Some(vec![9, 8]),
                num_computed_tokens: 0,
            }],
            ..Default::default()
        };
        let m = s.build_connector_meta(&out);
        assert_eq!(m.requests.len(), 1);
        assert_eq!(
            m.requests[0].slot_mapping,
            vec![36, 37, 38, 39, 32, 33, 34, 35]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn cache_key_is_vllms() {
        // Python: hashlib.md5(np.array([1, 2, 3], dtype=np.int64).tobytes()).hexdigest(),
        // what vLLM's `_generate_foldername_debug` computes (values from CPython's hashlib).
        let c = StorageConfig::new("/tmp", 16);
        assert_eq!(
            c.cache_key(&[1, 2, 3], &[]),
            "aa341a15f5ade44faafbe190f98c2587"
        );
        assert_eq!(
            c.cache_key(&[1, 2, 3], &["abc".into(), "def".into()]),
            "d2c9bbcbd959fc7607ddf6f3e0f9aef3"
        );
        assert_eq!(c.cache_key(&[], &[]), "d41d8cd98f00b204e9800998ecf8427e");
        let f = StorageConfig {
            fips: true,
            ..c.clone()
        };
        assert_eq!(
            f.cache_key(&[-1, 0, 32000, 7], &[]),
            "81f846a05f3f450e7831b6e12b63b450cb53667180f5049d737834566ea7215b"
        );
        assert!(c.file("k", "../x").is_err() && c.file("k", "a/b").is_err());
        assert!(c.file("k", "model.layers.0.self_attn.attn").is_ok());
    }
}
