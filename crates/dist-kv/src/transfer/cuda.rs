//! Device caches and device data paths (the `cuda` feature).
//!
//! * [`CudaKvCache`]: a layer's paged cache in device memory (NHD or HND). Gathering and
//!   scattering blocks run on the device (`dist_cuda::paged`, one kernel launch per call), so a
//!   layer's blocks leave and enter the cache without a trip through host memory. The storage
//!   connector's rows go through the host (as vLLM's `safetensors.torch.save_file` of a GPU
//!   tensor does).
//! * [`NcclDataPath`]: vLLM's P2P data path — `ncclSend`/`ncclRecv` on a 2-rank communicator per
//!   connection, its unique id in the handshake; across GPUs and nodes. NCCL refuses two ranks on
//!   one GPU, so producer and consumer need a GPU each.
//! * [`CudaIpcDataPath`]: for producer and consumer on one host (any GPUs of it, one GPU
//!   shared included): the sender writes an IPC descriptor of the gathered tensor on the control
//!   stream and the receiver copies straight out of the sender's device memory (mappings kept
//!   per allocation serial, `dist_cuda::ipc::IpcImporter`); the engine keeps the sender's tensor
//!   until the receiver's `Stored` / `GetDone` ([`DataPath::lends_memory`]). Both sides check
//!   at the handshake that they run on one host (the kernel's boot id).
//!
//! Both paths wait for every transfer with the engine's deadline: a peer that dies mid-transfer
//! fails the request (NCCL: the pair is aborted; IPC: the copy from a dead process's memory
//! still completes or errors, and the lost connection fails the request).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::{DType, HostTensor};
use dist_cuda::ipc::{export, IpcExport, IpcImporter, EXPORT_BYTES};
use dist_cuda::paged::{gather_slots, scatter_slots, PagedShape};
use dist_cuda::pair::NcclPair;
use dist_cuda::{CudaTensor, DeviceContext};

use super::error::{Error, Result};
use super::model::{
    blocks_shape, check_blocks_tensor, rows_shape, slot_mapping, BlockId, KvCacheLayer,
    KvCacheSpec, KvLayout, PagedKvCache,
};
use super::p2p::wire::read_full;
use super::p2p::{DataLink, DataPath};

/// A layer's paged KV cache in device memory; see the module docs.
#[derive(Debug, Clone)]
pub struct CudaKvCache {
    spec: KvCacheSpec,
    data: CudaTensor,
}

fn paged_shape(s: &KvCacheSpec) -> PagedShape {
    PagedShape {
        kv: s.kv,
        num_blocks: s.num_blocks,
        block_size: s.block_size,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
        hnd: s.layout == KvLayout::Hnd,
    }
}

impl CudaKvCache {
    /// A zero-filled cache on `dev`.
    pub fn zeros(spec: KvCacheSpec, dev: &Arc<DeviceContext>) -> Result<Self> {
        spec.checked_bytes()?;
        Ok(CudaKvCache {
            data: CudaTensor::zeros(dev, spec.dtype, &spec.shape())?,
            spec,
        })
    }

    /// A device copy of a host cache, on device `ordinal`.
    pub fn from_host(cache: &PagedKvCache, ordinal: usize) -> Result<Self> {
        Ok(CudaKvCache {
            spec: *cache.spec(),
            data: CudaTensor::from_host(cache.tensor(), ordinal)?,
        })
    }

    /// Wraps a device tensor, whose dtype and shape must be the spec's.
    pub fn from_tensor(spec: KvCacheSpec, data: CudaTensor) -> Result<Self> {
        spec.check_cache_tensor(&data)?;
        Ok(CudaKvCache { spec, data })
    }

    /// A host copy (waits for the device).
    pub fn to_host(&self) -> Result<PagedKvCache> {
        PagedKvCache::from_tensor(self.spec, self.data.to_host()?)
    }

    /// The device tensor, in the spec's layout (the engine's attention writes here).
    pub fn tensor(&self) -> &CudaTensor {
        &self.data
    }

    fn dev(&self) -> &Arc<DeviceContext> {
        self.data.context()
    }

    /// Every slot of `blocks`, in order, after checking the block ids.
    fn block_slots(&self, blocks: &[BlockId]) -> Result<Vec<u64>> {
        self.spec.check_blocks(blocks)?;
        let bs = self.spec.block_size;
        slot_mapping(blocks, bs, blocks.len() * bs)
    }
}

impl KvCacheLayer for CudaKvCache {
    type Buffer = CudaTensor;

    fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }

    fn gather_blocks(&self, blocks: &[BlockId]) -> Result<CudaTensor> {
        let slots = self.block_slots(blocks)?;
        let out = CudaTensor::uninit(
            self.dev(),
            self.spec.dtype,
            &blocks_shape(&self.spec, blocks.len()),
        )?;
        // `[kv, n, block_size, heads, head_dim]` is `[kv, n * block_size, heads, head_dim]`.
        let mut rows = out.reshape(&rows_shape(&self.spec, slots.len()))?;
        gather_slots(&self.data, &paged_shape(&self.spec), &slots, &mut rows)?;
        Ok(out)
    }

    fn scatter_blocks(&mut self, blocks: &[BlockId], data: &CudaTensor) -> Result<()> {
        let m = check_blocks_tensor(&self.spec, blocks.len(), data)?;
        let slots = self.block_slots(blocks)?;
        let rows = data.reshape(&rows_shape(&self.spec, m * self.spec.block_size))?;
        Ok(scatter_slots(
            &mut self.data,
            &paged_shape(&self.spec),
            &slots,
            &rows,
        )?)
    }

    fn gather_slots(&self, slots: &[u64]) -> Result<HostTensor> {
        let mut rows = CudaTensor::uninit(
            self.dev(),
            self.spec.dtype,
            &rows_shape(&self.spec, slots.len()),
        )?;
        gather_slots(&self.data, &paged_shape(&self.spec), slots, &mut rows)?;
        Ok(rows.to_host()?)
    }

    fn scatter_slots(&mut self, slots: &[u64], rows: &HostTensor) -> Result<()> {
        self.spec.check_rows_tensor(slots.len(), rows)?;
        let d = CudaTensor::from_host(rows, self.dev().ordinal())?;
        Ok(scatter_slots(
            &mut self.data,
            &paged_shape(&self.spec),
            slots,
            &d,
        )?)
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// vLLM's P2P data path over NCCL; see the module docs.
#[derive(Debug, Clone)]
pub struct NcclDataPath {
    dev: Arc<DeviceContext>,
    init_timeout: Duration,
}

impl NcclDataPath {
    /// A path on device `ordinal`; `init_timeout` bounds each link's NCCL init. Fails when
    /// CUDA or NCCL cannot be loaded.
    pub fn new(ordinal: usize, init_timeout: Duration) -> Result<Self> {
        let dev = DeviceContext::get(ordinal)?;
        // A missing NCCL is an error here, not at the first transfer.
        NcclPair::load_library()?;
        Ok(NcclDataPath { dev, init_timeout })
    }
}

/// The link of [`NcclDataPath`]: one 2-rank communicator (the initiator is rank 0).
#[derive(Debug)]
pub struct NcclLink(NcclPair);

impl DataPath for NcclDataPath {
    type Buffer = CudaTensor;
    type Link = NcclLink;

    fn name(&self) -> &'static str {
        "nccl"
    }
    fn link_init(&self, _peer: &str) -> Result<Vec<u8>> {
        Ok(NcclPair::unique_id()?)
    }
    fn open(&self, peer: &str, initiator: bool, init: &[u8]) -> Result<NcclLink> {
        let rank = if initiator { 0 } else { 1 };
        NcclPair::connect(&self.dev, init, rank, self.init_timeout)
            .map(NcclLink)
            .map_err(|e| Error::Backend(format!("NCCL link with {peer}: {e}")))
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        Ok(CudaTensor::uninit(&self.dev, dtype, shape)?)
    }
}

impl DataLink<CudaTensor> for NcclLink {
    fn send(&self, _stream: &mut TcpStream, data: &CudaTensor, deadline: Instant) -> Result<()> {
        Ok(self.0.send(data, left(deadline))?)
    }
    fn recv(&self, _stream: &mut TcpStream, out: &mut CudaTensor, deadline: Instant) -> Result<()> {
        Ok(self.0.recv(out, left(deadline))?)
    }
}

/// The one-host device path over CUDA IPC; see the module docs.
#[derive(Debug, Clone)]
pub struct CudaIpcDataPath {
    dev: Arc<DeviceContext>,
    host: Vec<u8>,
    importer: Arc<IpcImporter>,
}

/// This host's identity for the same-host check: the kernel's boot id (differs between
/// machines and containers on different hosts; equal for processes of one boot).
fn host_id() -> Result<Vec<u8>> {
    let p = "/proc/sys/kernel/random/boot_id";
    std::fs::read(p)
        .map(|b| b.trim_ascii().to_vec())
        .map_err(|e| Error::io(format!("read {p}"), e))
}

impl CudaIpcDataPath {
    /// A path on device `ordinal`. Fails when CUDA cannot be loaded.
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = DeviceContext::get(ordinal)?;
        Ok(CudaIpcDataPath {
            importer: IpcImporter::for_device(&dev),
            dev,
            host: host_id()?,
        })
    }
}

/// The link of [`CudaIpcDataPath`]. Mappings are kept by the device's importer; when the link
/// goes (its connection closed), the mappings of the peer's memory are closed.
#[derive(Debug)]
pub struct CudaIpcLink {
    importer: Arc<IpcImporter>,
    /// The exporting peer's pid, once a descriptor came (0: none yet).
    peer_pid: AtomicU64,
}

impl Drop for CudaIpcLink {
    fn drop(&mut self) {
        let pid = self.peer_pid.load(Ordering::Relaxed);
        if pid != 0 && pid != std::process::id() as u64 {
            self.importer.forget_process(pid);
        }
    }
}

impl DataPath for CudaIpcDataPath {
    type Buffer = CudaTensor;
    type Link = CudaIpcLink;

    fn name(&self) -> &'static str {
        "cuda-ipc"
    }
    fn link_init(&self, _peer: &str) -> Result<Vec<u8>> {
        Ok(self.host.clone())
    }
    fn open(&self, peer: &str, _initiator: bool, init: &[u8]) -> Result<CudaIpcLink> {
        if init != self.host.as_slice() {
            return Err(Error::Protocol(format!(
                "the cuda-ipc data path needs both instances on one host; {peer} runs on \
                 another (boot id {:?}, here {:?}): use the nccl path",
                String::from_utf8_lossy(init),
                String::from_utf8_lossy(&self.host)
            )));
        }
        Ok(CudaIpcLink {
            importer: self.importer.clone(),
            peer_pid: AtomicU64::new(0),
        })
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        Ok(CudaTensor::uninit(&self.dev, dtype, shape)?)
    }
    fn lends_memory(&self) -> bool {
        true
    }
}

impl DataLink<CudaTensor> for CudaIpcLink {
    fn send(&self, stream: &mut TcpStream, data: &CudaTensor, _deadline: Instant) -> Result<()> {
        let ex = export(data)?;
        stream
            .write_all(&ex.to_bytes())
            .and_then(|_| stream.flush())
            .map_err(|e| Error::io("cuda-ipc data path: send the descriptor", e))
    }
    fn recv(&self, stream: &mut TcpStream, out: &mut CudaTensor, deadline: Instant) -> Result<()> {
        let mut b = [0u8; EXPORT_BYTES];
        read_full(
            stream,
            &mut b,
            false,
            deadline,
            "cuda-ipc data path: recv the descriptor",
        )?;
        let ex = IpcExport::from_bytes(&b)?;
        self.peer_pid.store(ex.pid, Ordering::Relaxed);
        Ok(self.importer.copy(&ex, out, left(deadline))?)
    }
}
