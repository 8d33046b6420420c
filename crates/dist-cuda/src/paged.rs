//! Device-side gather and scatter of token rows of a paged KV cache (NHD or HND).
//!
//! One layer's cache is a dense tensor of `kv` planes (2: K and V; 1: MLA) of `num_blocks`
//! blocks of `block_size` token slots, each slot `num_kv_heads × head_dim` elements of any dtype:
//! - NHD: `[kv, num_blocks, block_size, num_kv_heads, head_dim]`
//! - HND: `[kv, num_blocks, num_kv_heads, block_size, head_dim]`
//!
//! A slot is `block * block_size + offset`. [`gather_slots`] copies the rows at a slot list into
//! the token-major form `[kv, R, num_kv_heads, head_dim]` (rows `0..slots.len()` of each plane;
//! `R >= slots.len()`), [`scatter_slots`] writes them back: the semantics of
//! `dist_kv`'s host `PagedKvCache::gather_slots` / `scatter_slots`, generalised to buffers with
//! spare rows. A scatter whose list names a slot twice writes the last of its rows, as the host
//! loop does.
//!
//! The copy is one CUDA C kernel ([`KERNEL_SOURCE`]) compiled with NVRTC at first use, once per
//! process and device. It moves bytes in the widest unit (16, 8, 4, 2 or 1 bytes) dividing the
//! head row (`head_dim × element size`) and both base addresses, one grid-stride thread per unit
//! of (plane, slot, head, unit). The slot list travels to the device in a temporary buffer; both
//! calls wait for the device's stream before returning, so the buffer may be handed to another
//! stream or process at once (and the calls cannot be captured in a CUDA graph).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as cu;
use dist_core::{DType, Error, Result, Tensor};

use dist_nccl::GpuRuntime;

use crate::driver::{load_kernels, per_device, Cu, DeviceContext, KernelFn};
use crate::{CudaTensor, DeviceBuffer};

/// The kernels' CUDA C source (no headers; NVRTC compiles it for the device's architecture).
pub const KERNEL_SOURCE: &str = include_str!("paged_kernels.cu");

/// Threads per block of a launch.
const THREADS: usize = 256;
/// Most blocks of a launch (the grid-stride loop covers the rest).
const MAX_BLOCKS: usize = 65_535;
/// Copy unit widths in bytes, widest first; each has a kernel `paged_copy_{w}_i{32,64}`.
const WIDTHS: [usize; 5] = [16, 8, 4, 2, 1];

/// The geometry of one layer's paged cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagedShape {
    /// Planes: 2 (K and V) or 1 (MLA's latent cache).
    pub kv: usize,
    /// Blocks per plane.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// KV heads per slot.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// `true`: HND (`[kv, num_blocks, num_kv_heads, block_size, head_dim]`); `false`: NHD
    /// (`[kv, num_blocks, block_size, num_kv_heads, head_dim]`).
    pub hnd: bool,
}

impl PagedShape {
    /// The shape of the cache tensor in this layout.
    pub fn cache_shape(&self) -> [usize; 5] {
        if self.hnd {
            [
                self.kv,
                self.num_blocks,
                self.num_kv_heads,
                self.block_size,
                self.head_dim,
            ]
        } else {
            [
                self.kv,
                self.num_blocks,
                self.block_size,
                self.num_kv_heads,
                self.head_dim,
            ]
        }
    }
}

/// Compiles [`KERNEL_SOURCE`] with NVRTC for compute capability `cc`; returns the PTX.
pub fn compile_ptx(cc: (i32, i32)) -> Result<String> {
    crate::driver::compile_ptx(KERNEL_SOURCE, cc, "the paged gather/scatter kernels")
}

/// The kernel entry point for a unit width and index width.
fn kernel_name(width: usize, wide: bool) -> String {
    format!("paged_copy_{width}_i{}", if wide { 64 } else { 32 })
}

/// The compiled kernels of one device, by (unit width, 64-bit index).
struct Kernels {
    funcs: HashMap<(usize, bool), KernelFn>,
}

impl Kernels {
    /// Compiled once per process and device, at first use.
    fn get(dev: &Arc<DeviceContext>) -> Result<Arc<Kernels>> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
        per_device(&CACHE, dev, || {
            let keys: Vec<(usize, bool)> = WIDTHS
                .into_iter()
                .flat_map(|w| [(w, false), (w, true)])
                .collect();
            let names: Vec<String> = keys.iter().map(|&(w, wide)| kernel_name(w, wide)).collect();
            let funcs = load_kernels(
                dev,
                KERNEL_SOURCE,
                "the paged gather/scatter kernels",
                &names,
            )?;
            Ok(Kernels {
                funcs: keys.into_iter().zip(funcs).collect(),
            })
        })
    }
}

/// Checks a call's arguments: the cache matches `shape`, the buffer is
/// `[kv, R >= slots.len(), heads, head_dim]` of the cache's dtype, every slot exists.
fn validate(
    op: &str,
    shape: &PagedShape,
    cache: (DType, &[usize]),
    buf: (DType, &[usize]),
    slots: &[u64],
) -> Result<()> {
    let want = shape.cache_shape();
    if cache.1 != want.as_slice() {
        return Err(Error::invalid(format!(
            "{op}: the cache is {} {:?}, but {shape:?} needs shape {want:?}",
            cache.0, cache.1
        )));
    }
    if buf.0 != cache.0 {
        return Err(Error::invalid(format!(
            "{op}: the row buffer is {} but the cache is {}",
            buf.0, cache.0
        )));
    }
    let fits = buf.1.len() == 4
        && buf.1[0] == shape.kv
        && buf.1[2] == shape.num_kv_heads
        && buf.1[3] == shape.head_dim;
    if !fits {
        return Err(Error::invalid(format!(
            "{op}: the row buffer has shape {:?}, expected [{}, R, {}, {}] (kv, rows, heads, head_dim)",
            buf.1, shape.kv, shape.num_kv_heads, shape.head_dim
        )));
    }
    if buf.1[1] < slots.len() {
        return Err(Error::invalid(format!(
            "{op}: the row buffer has {} rows per plane, fewer than the {} slots",
            buf.1[1],
            slots.len()
        )));
    }
    // The cache tensor exists with this shape, so the product fits.
    let total = (shape.num_blocks * shape.block_size) as u64;
    if let Some((i, bad)) = slots.iter().enumerate().find(|(_, &s)| s >= total) {
        return Err(Error::invalid(format!(
            "{op}: slot {bad} (entry {i}) out of range for a cache of {} blocks of {} slots",
            shape.num_blocks, shape.block_size
        )));
    }
    Ok(())
}

/// For a scatter whose list names some slot more than once: the entries to keep (the last
/// write of each slot, as the host loop leaves it), in list order. `None` when all are distinct.
/// Every slot is below `total` (validated); one bit per slot of the cache marks the seen ones.
fn last_writes(slots: &[u64], total: u64) -> Result<Option<Vec<u32>>> {
    if slots.len() < 2 {
        return Ok(None);
    }
    let words = usize::try_from(total.div_ceil(64))
        .map_err(|_| Error::invalid(format!("paged scatter_slots: a cache of {total} slots")))?;
    let mut seen = vec![0u64; words];
    // Marks `s`; true when it was marked already.
    let mark = |seen: &mut [u64], s: u64| {
        let (w, bit) = ((s / 64) as usize, 1u64 << (s % 64));
        let was = seen[w] & bit != 0;
        seen[w] |= bit;
        was
    };
    if !slots.iter().any(|&s| mark(&mut seen, s)) {
        return Ok(None);
    }
    if u32::try_from(slots.len()).is_err() {
        return Err(Error::invalid(format!(
            "paged scatter_slots: {} slots with repeats (at most 2^32 supported)",
            slots.len()
        )));
    }
    seen.iter_mut().for_each(|w| *w = 0);
    let mut keep: Vec<u32> = (0..slots.len())
        .rev()
        .filter(|&i| !mark(&mut seen, slots[i]))
        .map(|i| i as u32)
        .collect();
    keep.reverse();
    Ok(Some(keep))
}

/// What one launch moves: rows and strides in head rows, sizes in copy units.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// Bytes per copy unit.
    width: usize,
    /// Units per head row.
    upr: u64,
    kv: u64,
    heads: u64,
    /// Head rows per cache plane.
    plane_rows: u64,
    /// Head rows between two heads of one slot in the cache.
    head_stride: u64,
    /// Rows per plane of the buffer (`R`).
    buf_rows: u64,
    /// Per list entry: the cache row of (plane 0, head 0).
    bases: Vec<u64>,
    /// Per list entry: its buffer row, when not the entry's index.
    rows: Option<Vec<u32>>,
}

impl Plan {
    /// Units to move.
    fn total(&self) -> u64 {
        self.kv * self.bases.len() as u64 * self.heads * self.upr
    }

    /// `None` when there is nothing to move. `slots` are validated; `align` is the OR of both
    /// base addresses; `rows` selects list entries (see [`last_writes`]).
    fn new(
        shape: &PagedShape,
        elem: usize,
        buf_rows: usize,
        slots: &[u64],
        rows: Option<Vec<u32>>,
        align: u64,
    ) -> Option<Plan> {
        let row_bytes = shape.head_dim * elem;
        if slots.is_empty() || row_bytes == 0 || shape.kv == 0 || shape.num_kv_heads == 0 {
            return None;
        }
        let bits = row_bytes as u64 | align;
        let width = WIDTHS
            .into_iter()
            .find(|w| bits % *w as u64 == 0)
            .unwrap_or(1);
        let (bs, heads) = (shape.block_size as u64, shape.num_kv_heads as u64);
        let base = |slot: u64| {
            if shape.hnd {
                (slot / bs) * heads * bs + slot % bs
            } else {
                slot * heads
            }
        };
        let bases = match &rows {
            Some(r) => r.iter().map(|&i| base(slots[i as usize])).collect(),
            None => slots.iter().map(|&s| base(s)).collect(),
        };
        Some(Plan {
            width,
            upr: (row_bytes / width) as u64,
            kv: shape.kv as u64,
            heads,
            plane_rows: shape.num_blocks as u64 * bs * heads,
            head_stride: if shape.hnd { bs } else { 1 },
            buf_rows: buf_rows as u64,
            bases,
            rows,
        })
    }

    /// `(blocks, threads, 64-bit index)` of the launch.
    fn launch_shape(&self) -> (usize, usize, bool) {
        let total = self.total();
        let blocks = usize::try_from(total.div_ceil(THREADS as u64))
            .unwrap_or(MAX_BLOCKS)
            .clamp(1, MAX_BLOCKS);
        // The kernel's 32-bit index reaches total - 1 + blocks * THREADS.
        let wide = total + (blocks * THREADS) as u64 > u64::from(u32::MAX);
        (blocks, THREADS, wide)
    }
}

/// True when the byte ranges of two tensors share memory.
fn overlaps(a: &CudaTensor, b: &CudaTensor) -> bool {
    let len = |t: &CudaTensor| t.nbytes() as u64;
    let (a0, b0) = (a.ptr(), b.ptr());
    len(a) > 0 && len(b) > 0 && a0 < b0 + len(b) && b0 < a0 + len(a)
}

/// Validates, then launches one copy and waits for it.
fn run(
    op: &str,
    cache: &CudaTensor,
    shape: &PagedShape,
    slots: &[u64],
    buf: &CudaTensor,
    scatter: bool,
) -> Result<()> {
    validate(
        op,
        shape,
        (cache.dtype(), cache.shape()),
        (buf.dtype(), buf.shape()),
        slots,
    )?;
    if cache.context().ordinal() != buf.context().ordinal() {
        return Err(Error::invalid(format!(
            "{op}: the cache is on cuda:{} but the row buffer on cuda:{}",
            cache.context().ordinal(),
            buf.context().ordinal()
        )));
    }
    if overlaps(cache, buf) {
        return Err(Error::invalid(format!(
            "{op}: the row buffer shares memory with the cache"
        )));
    }
    let rows = if scatter {
        last_writes(slots, (shape.num_blocks * shape.block_size) as u64)?
    } else {
        None
    };
    let Some(plan) = Plan::new(
        shape,
        cache.dtype().size(),
        buf.shape()[1],
        slots,
        rows,
        cache.ptr() | buf.ptr(),
    ) else {
        return Ok(());
    };
    let dev = cache.context();
    if dev.is_capturing_own()? {
        return Err(Error::unsupported(format!(
            "{op} waits for the stream and cannot be captured in a CUDA graph"
        )));
    }
    let kernels = Kernels::get(dev)?;
    let (blocks, threads, wide) = plan.launch_shape();
    let f = kernels
        .funcs
        .get(&(plan.width, wide))
        .ok_or_else(|| Error::protocol(format!("{op}: no kernel for {}-byte units", plan.width)))?
        .0;

    // The list: bases (u64 each), then the buffer rows (u32 each) when present.
    let m = plan.bases.len();
    let mut list = Vec::with_capacity(m * 12);
    list.extend(plan.bases.iter().flat_map(|b| b.to_le_bytes()));
    if let Some(r) = &plan.rows {
        list.extend(r.iter().flat_map(|i| i.to_le_bytes()));
    }
    let dlist = DeviceBuffer::alloc(dev, list.len())?;
    dev.bind()?;
    // SAFETY: dlist holds list.len() bytes and lives until the stream has been waited for
    // below. From pageable memory the driver stages the bytes before returning, so `list` may
    // be dropped at any time after the call (CUDA's "API synchronization behavior").
    unsafe { cu::memcpy_htod_async(dlist.ptr(), &list, dev.cu_stream()) }
        .cu("cuMemcpyHtoDAsync (paged slot list)")?;

    let mut a_cache = cache.ptr();
    let mut a_buf = buf.ptr();
    let mut a_bases = dlist.ptr();
    let mut a_rows: u64 = if plan.rows.is_some() {
        dlist.ptr() + 8 * m as u64
    } else {
        0
    };
    let mut a_n = m as u64;
    let mut a_heads = plan.heads;
    let mut a_upr = plan.upr;
    let mut a_plane_rows = plan.plane_rows;
    let mut a_head_stride = plan.head_stride;
    let mut a_buf_rows = plan.buf_rows;
    let mut a_total = plan.total();
    let mut a_scatter: i32 = scatter.into();
    let mut params: [*mut c_void; 12] = [
        &mut a_cache as *mut u64 as *mut c_void,
        &mut a_buf as *mut u64 as *mut c_void,
        &mut a_bases as *mut u64 as *mut c_void,
        &mut a_rows as *mut u64 as *mut c_void,
        &mut a_n as *mut u64 as *mut c_void,
        &mut a_heads as *mut u64 as *mut c_void,
        &mut a_upr as *mut u64 as *mut c_void,
        &mut a_plane_rows as *mut u64 as *mut c_void,
        &mut a_head_stride as *mut u64 as *mut c_void,
        &mut a_buf_rows as *mut u64 as *mut c_void,
        &mut a_total as *mut u64 as *mut c_void,
        &mut a_scatter as *mut i32 as *mut c_void,
    ];
    // SAFETY: the parameters match the kernel's signature (four device pointers, seven
    // unsigned long long, one int). The cache and the buffer are live allocations of the
    // validated shapes, with no byte in common, and the plan's rows stay inside them: every
    // slot is below num_blocks * block_size and every buffer row below R. Both base addresses
    // and the row bytes are multiples of the unit width. `dlist` holds m bases and, when
    // `a_rows` is not null, m row indices below slots.len() (copied before the kernel runs, in
    // stream order); it lives until the stream has been waited for below. The context is current.
    unsafe {
        cu::launch_kernel(
            f,
            (blocks as u32, 1, 1),
            (threads as u32, 1, 1),
            0,
            dev.cu_stream(),
            &mut params,
        )
    }
    .cu("cuLaunchKernel (paged gather/scatter)")?;
    let done = dev.synchronize();
    drop(dlist);
    done
}

/// The host oracle of [`gather_slots`] / [`scatter_slots`], from the layouts' definitions alone
/// (it shares nothing with the kernel): row `i` of plane `k` of a `[kv, r_rows, heads,
/// head_dim]` buffer of `es`-byte elements is the cache's row at `slots[i]`; `gather` copies
/// cache → buffer, else buffer → cache, in list order. Both slices hold whole tensors.
pub fn host_reference(
    s: &PagedShape,
    es: usize,
    cache: &mut [u8],
    buf: &mut [u8],
    r_rows: usize,
    slots: &[u64],
    gather: bool,
) {
    let at = |k: usize, blk: usize, off: usize, h: usize| {
        let idx = if s.hnd {
            (((k * s.num_blocks + blk) * s.num_kv_heads + h) * s.block_size + off) * s.head_dim
        } else {
            (((k * s.num_blocks + blk) * s.block_size + off) * s.num_kv_heads + h) * s.head_dim
        };
        idx * es
    };
    let row = s.head_dim * es;
    for k in 0..s.kv {
        for (i, &sl) in slots.iter().enumerate() {
            let (blk, off) = (sl as usize / s.block_size, sl as usize % s.block_size);
            for h in 0..s.num_kv_heads {
                let a = at(k, blk, off, h);
                let o = ((k * r_rows + i) * s.num_kv_heads + h) * row;
                if gather {
                    buf[o..o + row].copy_from_slice(&cache[a..a + row]);
                } else {
                    cache[a..a + row].copy_from_slice(&buf[o..o + row]);
                }
            }
        }
    }
}

/// Copies the rows at `slots` of `cache` into rows `0..slots.len()` of each plane of `out`
/// (`[kv, R >= slots.len(), num_kv_heads, head_dim]`, the cache's dtype, same device). Rows
/// from `slots.len()` on are left as they were. Enqueued on the device's stream and waited for
/// (so `out` may be handed to another stream or process on return).
///
/// Errors ([`Error::InvalidArgument`], before anything is launched): the cache's shape is not
/// `shape.cache_shape()`, `out` has another dtype or shape or too few rows, a slot is not below
/// `num_blocks * block_size`, the tensors are on different devices or share memory. No slots:
/// `Ok` without a launch.
pub fn gather_slots(
    cache: &CudaTensor,
    shape: &PagedShape,
    slots: &[u64],
    out: &mut CudaTensor,
) -> Result<()> {
    run("paged gather_slots", cache, shape, slots, out, false)
}

/// Writes rows `0..slots.len()` of each plane of `src` (`[kv, R >= slots.len(), num_kv_heads,
/// head_dim]`, the cache's dtype, same device) to `slots` of `cache`; other slots are left as
/// they were. A slot named more than once gets the last of its rows. Waited for as
/// [`gather_slots`], with the same errors.
pub fn scatter_slots(
    cache: &mut CudaTensor,
    shape: &PagedShape,
    slots: &[u64],
    src: &CudaTensor,
) -> Result<()> {
    run("paged scatter_slots", cache, shape, slots, src, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's loop, on host bytes.
    fn emulate(p: &Plan, cache: &mut [u8], buf: &mut [u8], scatter: bool) {
        let w = p.width;
        let n = p.bases.len() as u64;
        for idx in 0..p.total() {
            let unit = idx % p.upr;
            let r = idx / p.upr;
            let (h, pi) = (r % p.heads, r / p.heads);
            let (i, plane) = (pi % n, pi / n);
            let brow = p.rows.as_ref().map_or(i, |r| u64::from(r[i as usize]));
            let c = ((plane * p.plane_rows + p.bases[i as usize] + h * p.head_stride) * p.upr
                + unit) as usize
                * w;
            let b = (((plane * p.buf_rows + brow) * p.heads + h) * p.upr + unit) as usize * w;
            if scatter {
                cache[c..c + w].copy_from_slice(&buf[b..b + w]);
            } else {
                buf[b..b + w].copy_from_slice(&cache[c..c + w]);
            }
        }
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn plan_matches_the_index_oracle() {
        let mut seed = 7u64;
        for hnd in [false, true] {
            for kv in [1, 2] {
                for bs in [1, 16] {
                    for heads in [1, 5] {
                        for (hd, es) in [(3, 2), (64, 2), (5, 1), (4, 8)] {
                            let s = PagedShape {
                                kv,
                                num_blocks: 3,
                                block_size: bs,
                                num_kv_heads: heads,
                                head_dim: hd,
                                hnd,
                            };
                            let nslots = (s.num_blocks * bs) as u64;
                            // Out of order, across blocks, one repeat at the end for scatter.
                            let slots: Vec<u64> =
                                (0..nslots).rev().step_by(2).chain([nslots - 1]).collect();
                            let n = slots.len();
                            let r_rows = n + 2;
                            let row = hd * es;
                            let cbytes = kv * s.num_blocks * bs * heads * row;
                            let bbytes = kv * r_rows * heads * row;
                            seed += 1;
                            let cache = bytes(cbytes, seed);
                            // Gather.
                            let p = Plan::new(&s, es, r_rows, &slots, None, 256).unwrap();
                            assert_eq!(
                                p.width,
                                [16, 8, 4, 2, 1].into_iter().find(|w| row % w == 0).unwrap()
                            );
                            let mut buf = vec![0xA5u8; bbytes];
                            let mut c = cache.clone();
                            emulate(&p, &mut c, &mut buf, false);
                            let mut want = vec![0xA5u8; bbytes];
                            host_reference(
                                &s,
                                es,
                                &mut cache.clone(),
                                &mut want,
                                r_rows,
                                &slots,
                                true,
                            );
                            assert_eq!(buf, want, "gather {s:?} es {es}");
                            // Scatter (the repeat: last write wins).
                            let src = bytes(bbytes, seed ^ 99);
                            let keep = last_writes(&slots, nslots).unwrap();
                            assert!(keep.is_some());
                            let p = Plan::new(&s, es, r_rows, &slots, keep, 256).unwrap();
                            let mut got = vec![0u8; cbytes];
                            let mut sb = src.clone();
                            emulate(&p, &mut got, &mut sb, true);
                            let mut want = vec![0u8; cbytes];
                            host_reference(
                                &s,
                                es,
                                &mut want,
                                &mut src.clone(),
                                r_rows,
                                &slots,
                                false,
                            );
                            assert_eq!(got, want, "scatter {s:?} es {es}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn unit_width_follows_row_bytes_and_alignment() {
        let s = PagedShape {
            kv: 2,
            num_blocks: 4,
            block_size: 16,
            num_kv_heads: 8,
            head_dim: 128,
            hnd: false,
        };
        let w = |es, align| Plan::new(&s, es, 4, &[1, 2], None, align).unwrap().width;
        assert_eq!(w(2, 256), 16);
        assert_eq!(w(2, 256 | 8), 8);
        assert_eq!(w(1, 256 | 2), 2);
        let odd = PagedShape { head_dim: 3, ..s };
        let w = |es| Plan::new(&odd, es, 4, &[1], None, 256).unwrap().width;
        assert_eq!((w(1), w(2), w(4), w(8)), (1, 2, 4, 8));
        assert!(Plan::new(&s, 2, 4, &[], None, 256).is_none());
        assert!(Plan::new(
            &PagedShape {
                num_kv_heads: 0,
                ..s
            },
            2,
            4,
            &[1],
            None,
            256
        )
        .is_none());
    }

    #[test]
    fn launch_shape_is_bounded_and_picks_the_index_width() {
        let s = PagedShape {
            kv: 2,
            num_blocks: 4096,
            block_size: 16,
            num_kv_heads: 8,
            head_dim: 128,
            hnd: true,
        };
        let slots: Vec<u64> = (0..4096).collect();
        let p = Plan::new(&s, 2, 4096, &slots, None, 256).unwrap();
        assert_eq!(p.total(), 2 * 4096 * 8 * 16);
        assert_eq!(p.launch_shape(), (4096, 256, false));
        let big = Plan {
            upr: 1 << 20,
            ..p.clone()
        };
        assert_eq!(big.launch_shape(), (MAX_BLOCKS, 256, true));
        // The 32-bit loop index must not wrap when it steps past the end.
        let edge = u64::from(u32::MAX) - (MAX_BLOCKS * 256) as u64;
        let narrow = Plan {
            bases: vec![0],
            upr: edge,
            heads: 1,
            kv: 1,
            ..p.clone()
        };
        assert_eq!(narrow.launch_shape(), (MAX_BLOCKS, 256, false));
        let wide = Plan {
            upr: edge + 1,
            ..narrow
        };
        assert_eq!(wide.launch_shape(), (MAX_BLOCKS, 256, true));
        let one = Plan {
            bases: vec![0],
            upr: 1,
            heads: 1,
            kv: 1,
            ..p
        };
        assert_eq!(one.launch_shape(), (1, 256, false));
    }

    #[test]
    fn repeats_keep_the_last_write_in_list_order() {
        assert_eq!(last_writes(&[5, 1, 9], 10).unwrap(), None);
        assert_eq!(last_writes(&[], 10).unwrap(), None);
        assert_eq!(last_writes(&[3], 10).unwrap(), None);
        assert_eq!(
            last_writes(&[4, 7, 4, 2, 7, 4], 8).unwrap(),
            Some(vec![3, 4, 5])
        );
        assert_eq!(
            last_writes(&[63, 64, 127, 63, 0], 128).unwrap(),
            Some(vec![1, 2, 3, 4])
        );
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let s = PagedShape {
            kv: 2,
            num_blocks: 3,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
            hnd: true,
        };
        let cs = s.cache_shape();
        assert_eq!(cs, [2, 3, 2, 4, 8]);
        assert_eq!(
            PagedShape { hnd: false, ..s }.cache_shape(),
            [2, 3, 4, 2, 8]
        );
        let ok = [2, 5, 2, 8];
        let v = |c: &[usize], bd, b: &[usize], slots: &[u64]| {
            validate("t", &s, (DType::BF16, c), (bd, b), slots).map_err(|e| e.to_string())
        };
        assert!(v(&cs, DType::BF16, &ok, &[0, 11, 5]).is_ok());
        assert!(v(&cs, DType::BF16, &ok, &[]).is_ok());
        let e = v(&[2, 3, 4, 2, 8], DType::BF16, &ok, &[0]).unwrap_err();
        assert!(e.contains("cache is"), "{e}");
        let e = v(&cs, DType::F16, &ok, &[0]).unwrap_err();
        assert!(e.contains("row buffer is f16"), "{e}");
        let e = v(&cs, DType::BF16, &[2, 5, 1, 8], &[0]).unwrap_err();
        assert!(e.contains("expected [2, R, 2, 8]"), "{e}");
        let e = v(&cs, DType::BF16, &[2, 2, 2, 8], &[0, 1, 2]).unwrap_err();
        assert!(e.contains("fewer than the 3 slots"), "{e}");
        let e = v(&cs, DType::BF16, &ok, &[0, 12]).unwrap_err();
        assert!(e.contains("slot 12 (entry 1) out of range"), "{e}");
    }

    /// Needs `libnvrtc.so.13` on the loader path (no GPU): `cargo test -p dist-cuda -- --ignored`.
    #[test]
    #[ignore = "needs libnvrtc (no GPU); run with --ignored"]
    fn kernels_compile_for_sm80_and_sm90() {
        for cc in [(8, 0), (9, 0)] {
            let ptx = compile_ptx(cc).unwrap();
            for width in WIDTHS {
                for wide in [false, true] {
                    let name = format!(".entry {}(", kernel_name(width, wide));
                    assert!(
                        ptx.contains(&name),
                        "{name} missing from the PTX for {cc:?}"
                    );
                }
            }
            assert!(ptx.contains("ld.global.nc.v4.u32") || ptx.contains("ld.global.v4.u32"));
        }
    }
}
