//! A host data path that lends memory as CUDA IPC does: the sender writes only a token on the
//! stream and the receiver copies out of the sender's tensor (found through a process-wide
//! registry of weak references), after a delay. If the engine freed a sent tensor before the
//! receiver's `Stored` / `GetDone`, the copy finds it gone and the transfer fails: this is the
//! CI check of the lending protocol, which the CUDA IPC path relies on.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use dist_core::{DType, Device, HostTensor, Tensor};
use dist_kv::transfer::p2p::wire::read_full;
use dist_kv::transfer::p2p::{DataLink, DataPath};
use dist_kv::transfer::{BlockId, Error, KvCacheLayer, KvCacheSpec, PagedKvCache, Result};

/// A host tensor shared by reference (the "device memory" the receiver reads).
#[derive(Debug, Clone)]
pub struct Lent(pub Arc<HostTensor>);

impl Tensor for Lent {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn device(&self) -> Device {
        Device::CPU
    }
}

/// A host cache whose gathered blocks are [`Lent`].
#[derive(Debug)]
pub struct LentCache(pub PagedKvCache);

impl KvCacheLayer for LentCache {
    type Buffer = Lent;
    fn spec(&self) -> &KvCacheSpec {
        self.0.spec()
    }
    fn gather_blocks(&self, blocks: &[BlockId]) -> Result<Lent> {
        Ok(Lent(Arc::new(self.0.gather_blocks(blocks)?)))
    }
    fn scatter_blocks(&mut self, blocks: &[BlockId], data: &Lent) -> Result<()> {
        self.0.scatter_blocks(blocks, &data.0)
    }
    fn gather_slots(&self, slots: &[u64]) -> Result<HostTensor> {
        self.0.gather_slots(slots)
    }
    fn scatter_slots(&mut self, slots: &[u64], rows: &HostTensor) -> Result<()> {
        self.0.scatter_slots(slots, rows)
    }
}

fn registry() -> &'static Mutex<HashMap<u64, Weak<HostTensor>>> {
    static R: OnceLock<Mutex<HashMap<u64, Weak<HostTensor>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}
static NEXT: AtomicU64 = AtomicU64::new(1);
/// Copies made out of lent memory, process-wide.
pub static COPIES: AtomicUsize = AtomicUsize::new(0);

/// The lending path; see the module docs.
#[derive(Debug, Default)]
pub struct LendingPath;

/// Its link.
#[derive(Debug)]
pub struct LendingLink;

impl DataPath for LendingPath {
    type Buffer = Lent;
    type Link = LendingLink;
    fn name(&self) -> &'static str {
        "test-lending"
    }
    fn link_init(&self, _peer: &str) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn open(&self, _peer: &str, _initiator: bool, _init: &[u8]) -> Result<LendingLink> {
        Ok(LendingLink)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Lent> {
        Ok(Lent(Arc::new(HostTensor::zeros(dtype, shape))))
    }
    fn lends_memory(&self) -> bool {
        true
    }
}

impl DataLink<Lent> for LendingLink {
    fn send(&self, stream: &mut TcpStream, data: &Lent, _deadline: Instant) -> Result<()> {
        let token = NEXT.fetch_add(1, Ordering::Relaxed);
        registry()
            .lock()
            .unwrap()
            .insert(token, Arc::downgrade(&data.0));
        stream
            .write_all(&token.to_le_bytes())
            .map_err(|e| Error::io("lending path: send token", e))
    }
    fn recv(&self, stream: &mut TcpStream, out: &mut Lent, deadline: Instant) -> Result<()> {
        let mut b = [0u8; 8];
        read_full(stream, &mut b, false, deadline, "lending path: token")?;
        let token = u64::from_le_bytes(b);
        // Give an engine that frees too early the time to do it.
        std::thread::sleep(Duration::from_millis(3));
        let weak = registry().lock().unwrap().remove(&token);
        let src = weak.and_then(|w| w.upgrade()).ok_or_else(|| {
            Error::Protocol(format!(
                "lent tensor {token} was freed before the receiver copied it"
            ))
        })?;
        if src.dtype() != out.dtype() || src.shape() != out.shape() {
            return Err(Error::Protocol("lent tensor of another shape".into()));
        }
        *out = Lent(Arc::new((*src).clone()));
        COPIES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Wraps host caches.
pub fn wrap(c: PagedKvCache) -> LentCache {
    LentCache(c)
}
