//! The engine-neutral model the connectors work on: requests, the paged KV cache of a layer and
//! the slot arithmetic of vLLM's block tables.
//!
//! A layer's cache is `kv` planes (2 for K and V, 1 for MLA's latent cache) of `num_blocks` blocks
//! of `block_size` token slots, each slot holding `num_kv_heads × head_dim` elements. vLLM stores
//! it in one of two physical orders, which [`KvLayout`] names:
//!
//! * [`KvLayout::Nhd`]: `[kv, num_blocks, block_size, num_kv_heads, head_dim]` (FlashAttention's
//!   `(2, num_blocks, block_size, num_kv_heads, head_size)`);
//! * [`KvLayout::Hnd`]: `[kv, num_blocks, num_kv_heads, block_size, head_dim]` (the "HND" layout
//!   FlashInfer and the NIXL connector ask for with `get_required_kvcache_layout`).
//!
//! What moves between instances is always in the layout-neutral token-major form: rows of
//! `[kv, n, num_kv_heads, head_dim]` for slots ([`PagedKvCache::gather_slots`], what the
//! shared-storage connector saves) and `[kv, blocks, block_size, num_kv_heads, head_dim]` for whole
//! blocks ([`PagedKvCache::gather_blocks`], what the P2P connector sends). So a producer with one
//! layout and a consumer with the other exchange caches correctly, and the shapes are checked on
//! both ends.
//!
//! The memory is a [`HostTensor`]. A device backend's cache moves through it with
//! `Backend::to_host` / `Backend::from_host` (a copy); gathering on the device is for the backend.

use std::collections::BTreeMap;

use dist_core::{Backend, DType, Device, HostTensor};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// A block's index in a layer's cache (vLLM's `block_id`).
pub type BlockId = u32;

/// The largest cache one [`PagedKvCache`] may describe (bytes), checked before allocation.
pub const MAX_CACHE_BYTES: usize = 64 << 30;

/// A request as the connectors see it (the fields of vLLM's `Request` they read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The request id; the P2P connector reads the peer's address from it (see `p2p::parse_request_id`).
    pub request_id: String,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<i64>,
    /// Identifiers of the multimodal inputs (`mm_features[i].identifier`), part of the cache key.
    pub mm_hashes: Vec<String>,
}

impl Request {
    /// A text-only request.
    pub fn new(request_id: impl Into<String>, prompt_token_ids: Vec<i64>) -> Self {
        Request {
            request_id: request_id.into(),
            prompt_token_ids,
            mm_hashes: Vec::new(),
        }
    }
}

/// The physical order of a layer's cache; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum KvLayout {
    /// `[kv, num_blocks, block_size, num_kv_heads, head_dim]`.
    #[default]
    Nhd,
    /// `[kv, num_blocks, num_kv_heads, block_size, head_dim]`.
    Hnd,
}

/// The shape of a layer's paged cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvCacheSpec {
    /// Planes: 2 (K and V), or 1 (MLA).
    pub kv: usize,
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// KV heads (1 for MLA).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type.
    pub dtype: DType,
    /// Physical order.
    pub layout: KvLayout,
}

impl KvCacheSpec {
    /// The tensor shape in this spec's layout.
    pub fn shape(&self) -> [usize; 5] {
        match self.layout {
            KvLayout::Nhd => [
                self.kv,
                self.num_blocks,
                self.block_size,
                self.num_kv_heads,
                self.head_dim,
            ],
            KvLayout::Hnd => [
                self.kv,
                self.num_blocks,
                self.num_kv_heads,
                self.block_size,
                self.head_dim,
            ],
        }
    }

    /// Bytes of the whole cache, or an error when a dimension is 0 or the size overflows or
    /// exceeds [`MAX_CACHE_BYTES`].
    pub fn checked_bytes(&self) -> Result<usize> {
        let dims = [
            self.kv,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        ];
        if dims.contains(&0) || !(1..=2).contains(&self.kv) {
            return Err(Error::invalid(format!(
                "KV cache spec {self:?}: every dimension must be positive and kv 1 or 2"
            )));
        }
        dims.iter()
            .try_fold(self.dtype.size(), |a, &d| a.checked_mul(d))
            .filter(|&b| b <= MAX_CACHE_BYTES)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "KV cache spec {self:?} exceeds {MAX_CACHE_BYTES} bytes"
                ))
            })
    }

    /// Checks that every block id is below `num_blocks`.
    pub fn check_blocks(&self, blocks: &[BlockId]) -> Result<()> {
        if let Some(bad) = blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            return Err(Error::invalid(format!(
                "block {bad} out of range for a cache of {} blocks",
                self.num_blocks
            )));
        }
        Ok(())
    }

    /// Checks that `t` is a whole cache of this spec (its dtype and [`KvCacheSpec::shape`]).
    pub fn check_cache_tensor(&self, t: &impl dist_core::Tensor) -> Result<()> {
        self.checked_bytes()?;
        if t.dtype() != self.dtype || t.shape() != self.shape() {
            return Err(Error::invalid(format!(
                "tensor {} {:?} does not match KV cache spec {self:?} (shape {:?})",
                t.dtype(),
                t.shape(),
                self.shape()
            )));
        }
        Ok(())
    }

    /// Checks that `rows` holds exactly `n` gathered slots of this spec
    /// (`[kv, n, num_kv_heads, head_dim]`, its dtype).
    pub fn check_rows_tensor(&self, n: usize, rows: &impl dist_core::Tensor) -> Result<()> {
        let want = rows_shape(self, n);
        if rows.dtype() != self.dtype || rows.shape() != want.as_slice() {
            return Err(Error::invalid(format!(
                "rows {} {:?} do not fit {n} slots of this cache ({} {want:?})",
                rows.dtype(),
                rows.shape(),
                self.dtype
            )));
        }
        Ok(())
    }

    /// Elements of one token slot over all heads (`num_kv_heads * head_dim`).
    fn slot_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// A layer's paged KV cache wherever its memory lives: host memory ([`PagedKvCache`]) or a
/// device's (`transfer::cuda::CudaKvCache` with the `cuda` feature). The connectors are written
/// against this trait: the P2P connector moves [`KvCacheLayer::Buffer`]s (host or device
/// tensors) on a data path of the same buffer type, the storage connector goes through host rows.
pub trait KvCacheLayer: Send + Sync + std::fmt::Debug {
    /// Where gathered blocks are held: a host or a device tensor.
    type Buffer: dist_core::Tensor + Clone + 'static;

    /// The geometry.
    fn spec(&self) -> &KvCacheSpec;

    /// Copies whole blocks out, token-major `[kv, blocks.len(), block_size, num_kv_heads,
    /// head_dim]` whatever the layout.
    fn gather_blocks(&self, blocks: &[BlockId]) -> Result<Self::Buffer>;

    /// Writes the first `blocks.len()` blocks of each plane of `data`
    /// (`[kv, m, block_size, num_kv_heads, head_dim]`, `m >= blocks.len()`) into `blocks`.
    fn scatter_blocks(&mut self, blocks: &[BlockId], data: &Self::Buffer) -> Result<()>;

    /// Host copy of the token rows at `slots`, `[kv, slots.len(), num_kv_heads, head_dim]`.
    fn gather_slots(&self, slots: &[u64]) -> Result<HostTensor>;

    /// Writes host `rows` (`[kv, slots.len(), num_kv_heads, head_dim]`) at `slots`.
    fn scatter_slots(&mut self, slots: &[u64], rows: &HostTensor) -> Result<()>;
}

/// The shape of `n` gathered slots of a cache: `[kv, n, num_kv_heads, head_dim]`.
pub fn rows_shape(spec: &KvCacheSpec, n: usize) -> Vec<usize> {
    vec![spec.kv, n, spec.num_kv_heads, spec.head_dim]
}

/// The shape of `n` gathered blocks of a cache: `[kv, n, block_size, num_kv_heads, head_dim]`.
pub fn blocks_shape(spec: &KvCacheSpec, n: usize) -> Vec<usize> {
    vec![
        spec.kv,
        n,
        spec.block_size,
        spec.num_kv_heads,
        spec.head_dim,
    ]
}

/// Checks that `data` holds at least `n` gathered blocks of a cache of `spec`; returns its
/// block count `m` (dim 1).
pub fn check_blocks_tensor(
    spec: &KvCacheSpec,
    n: usize,
    data: &impl dist_core::Tensor,
) -> Result<usize> {
    let m = data.shape().get(1).copied().unwrap_or(0);
    if data.dtype() != spec.dtype || data.shape() != blocks_shape(spec, m).as_slice() || m < n {
        return Err(Error::invalid(format!(
            "blocks {} {:?} do not fit {n} blocks of this cache ({} {:?})",
            data.dtype(),
            data.shape(),
            spec.dtype,
            blocks_shape(spec, n)
        )));
    }
    Ok(m)
}

/// The paged KV cache of one layer in host memory; see the module docs.
#[derive(Clone, PartialEq)]
pub struct PagedKvCache {
    spec: KvCacheSpec,
    data: HostTensor,
}

impl std::fmt::Debug for PagedKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("spec", &self.spec)
            .finish()
    }
}

/// The caches of every attention layer, by layer name (vLLM's `kv_caches` dict).
pub type KvCaches = BTreeMap<String, PagedKvCache>;

impl PagedKvCache {
    /// A zero-filled cache.
    pub fn zeros(spec: KvCacheSpec) -> Result<Self> {
        spec.checked_bytes()?;
        Ok(PagedKvCache {
            data: HostTensor::zeros(spec.dtype, &spec.shape()),
            spec,
        })
    }

    /// A cache of random values from a seed.
    pub fn random(spec: KvCacheSpec, seed: u64) -> Result<Self> {
        spec.checked_bytes()?;
        Ok(PagedKvCache {
            data: HostTensor::random(spec.dtype, &spec.shape(), seed),
            spec,
        })
    }

    /// Wraps an existing tensor, whose dtype and shape must be the spec's.
    pub fn from_tensor(spec: KvCacheSpec, data: HostTensor) -> Result<Self> {
        spec.check_cache_tensor(&data)?;
        Ok(PagedKvCache { spec, data })
    }

    /// A cache copied from a backend's tensor (device memory goes through the host).
    pub fn from_backend<B: Backend>(spec: KvCacheSpec, t: &B::Tensor) -> Result<Self> {
        Self::from_tensor(spec, B::to_host(t)?)
    }

    /// A copy of this cache as a backend's tensor on `device`.
    pub fn to_backend<B: Backend>(&self, device: Device) -> Result<B::Tensor> {
        Ok(B::from_host(&self.data, device)?)
    }

    /// The spec.
    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }
    /// The tensor, in the spec's layout.
    pub fn tensor(&self) -> &HostTensor {
        &self.data
    }
    /// The tensor, mutable (the engine's attention writes here).
    pub fn tensor_mut(&mut self) -> &mut HostTensor {
        &mut self.data
    }

    /// Byte offset of `(plane, block, slot offset, head)` and the byte length of one head row.
    fn at(&self, k: usize, block: usize, off: usize, head: usize) -> usize {
        byte_at(&self.spec, k, block, off, head)
    }

    fn check_slots(&self, slots: &[u64]) -> Result<()> {
        let total = (self.spec.num_blocks * self.spec.block_size) as u64;
        if let Some(bad) = slots.iter().find(|&&s| s >= total) {
            return Err(Error::invalid(format!(
                "slot {bad} out of range for a cache of {} blocks of {} slots",
                self.spec.num_blocks, self.spec.block_size
            )));
        }
        Ok(())
    }

    /// The shape of `n` gathered slots: `[kv, n, num_kv_heads, head_dim]`.
    pub fn rows_shape(&self, n: usize) -> Vec<usize> {
        rows_shape(&self.spec, n)
    }

    /// The shape of `n` gathered blocks: `[kv, n, block_size, num_kv_heads, head_dim]`.
    pub fn blocks_shape(&self, n: usize) -> Vec<usize> {
        blocks_shape(&self.spec, n)
    }

    /// Copies the token rows at `slots` (`block * block_size + offset`) out, as
    /// `[kv, slots.len(), num_kv_heads, head_dim]`.
    pub fn gather_slots(&self, slots: &[u64]) -> Result<HostTensor> {
        self.check_slots(slots)?;
        let s = self.spec;
        let mut out = HostTensor::zeros(s.dtype, &self.rows_shape(slots.len()));
        let src = self.data.as_bytes();
        let dst = out.as_bytes_mut();
        for (a, o, row) in slot_rows(self.spec, slots) {
            dst[o..o + row].copy_from_slice(&src[a..a + row]);
        }
        Ok(out)
    }

    /// Writes `rows` (`[kv, slots.len(), num_kv_heads, head_dim]`, this cache's dtype) at `slots`.
    pub fn scatter_slots(&mut self, slots: &[u64], rows: &HostTensor) -> Result<()> {
        self.check_slots(slots)?;
        self.spec.check_rows_tensor(slots.len(), rows)?;
        let src = rows.as_bytes();
        let spec = self.spec;
        let dst = self.data.as_bytes_mut();
        for (a, o, row) in slot_rows(spec, slots) {
            dst[a..a + row].copy_from_slice(&src[o..o + row]);
        }
        Ok(())
    }

    /// Copies whole blocks out, as `[kv, blocks.len(), block_size, num_kv_heads, head_dim]`
    /// (token-major whatever this cache's layout).
    pub fn gather_blocks(&self, blocks: &[BlockId]) -> Result<HostTensor> {
        self.spec.check_blocks(blocks)?;
        let s = self.spec;
        let mut out = HostTensor::zeros(s.dtype, &self.blocks_shape(blocks.len()));
        let es = s.dtype.size();
        let src = self.data.as_bytes();
        let dst = out.as_bytes_mut();
        match s.layout {
            KvLayout::Nhd => {
                // A block of one plane is contiguous.
                let blk = s.block_size * s.slot_elems() * es;
                let mut o = 0;
                for k in 0..s.kv {
                    for &b in blocks {
                        let a = self.at(k, b as usize, 0, 0);
                        dst[o..o + blk].copy_from_slice(&src[a..a + blk]);
                        o += blk;
                    }
                }
            }
            KvLayout::Hnd => {
                let row = s.head_dim * es;
                let mut o = 0;
                for k in 0..s.kv {
                    for &b in blocks {
                        for off in 0..s.block_size {
                            for h in 0..s.num_kv_heads {
                                let a = self.at(k, b as usize, off, h);
                                dst[o..o + row].copy_from_slice(&src[a..a + row]);
                                o += row;
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes the first `blocks.len()` blocks of each plane of `data`
    /// (`[kv, m, block_size, num_kv_heads, head_dim]`, `m >= blocks.len()`) into `blocks`.
    pub fn scatter_blocks(&mut self, blocks: &[BlockId], data: &HostTensor) -> Result<()> {
        self.spec.check_blocks(blocks)?;
        let m = check_blocks_tensor(&self.spec, blocks.len(), data)?;
        let s = self.spec;
        let es = s.dtype.size();
        let src = data.as_bytes();
        let row = s.head_dim * es;
        let blk = s.block_size * s.slot_elems() * es;
        for k in 0..s.kv {
            let mut o = k * m * blk;
            for &b in blocks {
                if s.layout == KvLayout::Nhd {
                    let a = self.at(k, b as usize, 0, 0);
                    self.data.as_bytes_mut()[a..a + blk].copy_from_slice(&src[o..o + blk]);
                    o += blk;
                    continue;
                }
                for off in 0..s.block_size {
                    for h in 0..s.num_kv_heads {
                        let a = self.at(k, b as usize, off, h);
                        self.data.as_bytes_mut()[a..a + row].copy_from_slice(&src[o..o + row]);
                        o += row;
                    }
                }
            }
        }
        Ok(())
    }
}

impl KvCacheLayer for PagedKvCache {
    type Buffer = HostTensor;
    fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }
    fn gather_blocks(&self, blocks: &[BlockId]) -> Result<HostTensor> {
        PagedKvCache::gather_blocks(self, blocks)
    }
    fn scatter_blocks(&mut self, blocks: &[BlockId], data: &HostTensor) -> Result<()> {
        PagedKvCache::scatter_blocks(self, blocks, data)
    }
    fn gather_slots(&self, slots: &[u64]) -> Result<HostTensor> {
        PagedKvCache::gather_slots(self, slots)
    }
    fn scatter_slots(&mut self, slots: &[u64], rows: &HostTensor) -> Result<()> {
        PagedKvCache::scatter_slots(self, slots, rows)
    }
}

/// vLLM's `align_to_block_size`: `((n - 1) // block_size) * block_size`, 0 for `n <= 0`.
///
/// Note the `- 1`: a prompt of exactly `k` blocks aligns to `k - 1` blocks, so the last token
/// always stays to be computed (its logits are needed).
pub fn align_to_block_size(num_tokens: usize, block_size: usize) -> usize {
    if num_tokens == 0 || block_size == 0 {
        return 0;
    }
    (num_tokens - 1) / block_size * block_size
}

/// The slots of the first `num_tokens` tokens of a request whose blocks are `block_ids`:
/// `block_id * block_size + offset` (vLLM's `ReqMeta.make_meta`). Fails when the blocks hold
/// fewer than `num_tokens` slots.
pub fn slot_mapping(
    block_ids: &[BlockId],
    block_size: usize,
    num_tokens: usize,
) -> Result<Vec<u64>> {
    if block_size == 0 || num_tokens > block_ids.len() * block_size {
        return Err(Error::invalid(format!(
            "{num_tokens} tokens do not fit {} blocks of {block_size} slots",
            block_ids.len()
        )));
    }
    Ok((0..num_tokens)
        .map(|t| block_ids[t / block_size] as u64 * block_size as u64 + (t % block_size) as u64)
        .collect())
}

/// The byte offset in a cache of `s` of head `head` of the token at `off` in block `block` of
/// plane `k` (0 keys, 1 values).
fn byte_at(s: &KvCacheSpec, k: usize, block: usize, off: usize, head: usize) -> usize {
    let es = s.dtype.size();
    let idx = match s.layout {
        KvLayout::Nhd => {
            (((k * s.num_blocks + block) * s.block_size + off) * s.num_kv_heads + head) * s.head_dim
        }
        KvLayout::Hnd => {
            (((k * s.num_blocks + block) * s.num_kv_heads + head) * s.block_size + off) * s.head_dim
        }
    };
    idx * es
}

/// Where the token rows at `slots` are in a cache of `s`, in the order of
/// [`PagedKvCache::gather_slots`]'s output: `(byte offset in the cache, byte offset in the rows,
/// bytes of a row)` for each `(kv, slot, head)`.
fn slot_rows(s: KvCacheSpec, slots: &[u64]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let row = s.head_dim * s.dtype.size();
    (0..s.kv)
        .flat_map(move |k| slots.iter().map(move |&slot| (k, slot as usize)))
        .flat_map(move |(k, slot)| {
            let (b, off) = (slot / s.block_size, slot % s.block_size);
            (0..s.num_kv_heads).map(move |h| byte_at(&s, k, b, off, h))
        })
        .enumerate()
        .map(move |(i, a)| (a, i * row, row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layout: KvLayout) -> KvCacheSpec {
        KvCacheSpec {
            kv: 2,
            num_blocks: 7,
            block_size: 4,
            num_kv_heads: 3,
            head_dim: 5,
            dtype: DType::BF16,
            layout,
        }
    }

    /// The element at `(k, block, off, head, d)` read by plain index arithmetic of the shape.
    fn elem(c: &PagedKvCache, k: usize, b: usize, off: usize, h: usize, d: usize) -> u16 {
        let v = c.tensor().as_slice::<dist_core::half::bf16>().unwrap();
        let sh = c.spec().shape();
        let idx = match c.spec().layout {
            KvLayout::Nhd => (((k * sh[1] + b) * sh[2] + off) * sh[3] + h) * sh[4] + d,
            KvLayout::Hnd => (((k * sh[1] + b) * sh[2] + h) * sh[3] + off) * sh[4] + d,
        };
        v[idx].to_bits()
    }

    #[test]
    fn align_and_slots_match_vllm() {
        assert_eq!(align_to_block_size(0, 16), 0);
        assert_eq!(align_to_block_size(16, 16), 0);
        assert_eq!(align_to_block_size(17, 16), 16);
        assert_eq!(align_to_block_size(33, 16), 32);
        assert_eq!(
            slot_mapping(&[5, 2], 4, 6).unwrap(),
            vec![20, 21, 22, 23, 8, 9]
        );
        assert!(slot_mapping(&[5], 4, 5).is_err());
    }

    #[test]
    fn gather_and_scatter_agree_across_layouts() {
        for (a, b) in [
            (KvLayout::Nhd, KvLayout::Hnd),
            (KvLayout::Hnd, KvLayout::Nhd),
            (KvLayout::Nhd, KvLayout::Nhd),
        ] {
            let src = PagedKvCache::random(spec(a), 11).unwrap();
            let mut dst = PagedKvCache::zeros(spec(b)).unwrap();
            // blocks 3,0 of src -> blocks 6,1 of dst
            let t = src.gather_blocks(&[3, 0]).unwrap();
            dst.scatter_blocks(&[6, 1], &t).unwrap();
            // slots: 3 tokens of block 5 -> block 2
            let rows = src.gather_slots(&[20, 21, 22]).unwrap();
            dst.scatter_slots(&[8, 9, 10], &rows).unwrap();
            for k in 0..2 {
                for h in 0..3 {
                    for d in 0..5 {
                        for off in 0..4 {
                            assert_eq!(elem(&src, k, 3, off, h, d), elem(&dst, k, 6, off, h, d));
                            assert_eq!(elem(&src, k, 0, off, h, d), elem(&dst, k, 1, off, h, d));
                        }
                        for off in 0..3 {
                            assert_eq!(elem(&src, k, 5, off, h, d), elem(&dst, k, 2, off, h, d));
                        }
                        assert_eq!(elem(&dst, k, 2, 3, h, d), 0, "slot 11 untouched");
                        assert_eq!(elem(&dst, k, 0, 0, h, d), 0, "block 0 untouched");
                    }
                }
            }
        }
    }

    #[test]
    fn scatter_takes_the_first_blocks_of_a_larger_tensor() {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let src = PagedKvCache::random(spec(KvLayout::Nhd), 5).unwrap();
            let sent = src.gather_blocks(&[4, 1, 6]).unwrap();
            let mut dst = PagedKvCache::zeros(spec(layout)).unwrap();
            dst.scatter_blocks(&[2, 0], &sent).unwrap();
            assert!(dst.gather_blocks(&[2, 0]).unwrap() == src.gather_blocks(&[4, 1]).unwrap());
            assert!(
                dst.gather_blocks(&[1, 3, 4, 5, 6]).unwrap()
                    == PagedKvCache::zeros(spec(layout))
                        .unwrap()
                        .gather_blocks(&[1, 3, 4, 5, 6])
                        .unwrap()
            );
        }
    }

    #[test]
    fn backend_round_trip() {
        use dist_core::LocalBackend;
        let c = PagedKvCache::random(spec(KvLayout::Hnd), 3).unwrap();
        let t = c.to_backend::<LocalBackend>(Device::CPU).unwrap();
        let back = PagedKvCache::from_backend::<LocalBackend>(*c.spec(), &t).unwrap();
        assert!(back == c);
        let mut other = *c.spec();
        other.num_kv_heads = 1;
        assert!(PagedKvCache::from_backend::<LocalBackend>(other, &t).is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut c = PagedKvCache::zeros(spec(KvLayout::Nhd)).unwrap();
        assert!(c.gather_blocks(&[7]).is_err());
        assert!(c.gather_slots(&[28]).is_err());
        let t = c.gather_blocks(&[1]).unwrap();
        assert!(c.scatter_blocks(&[1, 2], &t).is_err());
        let mut huge = spec(KvLayout::Nhd);
        huge.num_blocks = usize::MAX / 2;
        assert!(PagedKvCache::zeros(huge).is_err());
        huge.num_blocks = 0;
        assert!(PagedKvCache::zeros(huge).is_err());
    }
}
