//! Device check of `dist_cuda::paged`: gather and scatter of token rows of a paged KV cache
//! against a host oracle written here by plain index arithmetic.
//!
//! - For every dtype of {f32, bf16, f16, u8, f64}, layout (NHD, HND), kv {1, 2}, block_size
//!   {1, 16}, heads {1, 5, 8}, head_dim {3, 64, 128} (random number of blocks, seeded): gathers of
//!   an empty list, one slot, whole blocks, a random distinct out-of-order list and a list with
//!   repeats into a buffer with spare rows prefilled with random bytes (the spare rows must keep
//!   them); scatters of random rows into a zeroed cache at the same kinds of lists (untouched
//!   slots must stay 0; a repeated slot gets its last row).
//! - Every validation error is returned as `InvalidArgument`, and leaves the tensors unchanged.
//! - A figure, not a check: gather of a realistic layer (bf16, 2×4096 blocks×16×8×128, 256
//!   random blocks = 4096 slots), median wall time of 20 calls (each call uploads the slot list
//!   and waits), beside a device-to-device copy of the same bytes timed the same way.
//!
//! Prints one line per group and `paged_check: N checks, M wrong`; exits 1 on any mismatch,
//! 77 when there is no CUDA device.

#[path = "../../dist-nccl/examples/common/checks.rs"]
mod checks;

use std::process::ExitCode;
use std::time::Instant;

use checks::Checks as Tally;
use dist_core::{DType, DeviceCommunicator, Error, HostTensor, Result, Tensor};
use dist_cuda::paged::{gather_slots, host_reference, scatter_slots, PagedShape};
use dist_cuda::{device_count, Communicator, CudaTensor, DeviceContext, GpuRuntime};

/// xorshift64* (the workspace's `rand` is not a dev-dependency of this crate).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
    /// `k` distinct values of `0..n`, in random order.
    fn distinct(&mut self, n: usize, k: usize) -> Vec<u64> {
        let mut all: Vec<u64> = (0..n as u64).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

fn rows_shape(s: &PagedShape, r: usize) -> [usize; 4] {
    [s.kv, r, s.num_kv_heads, s.head_dim]
}

/// The lists of one configuration: (name, slots, distinct).
fn slot_lists(rng: &mut Rng, s: &PagedShape) -> Vec<(&'static str, Vec<u64>)> {
    let total = s.num_blocks * s.block_size;
    let nblk = 1 + rng.below(s.num_blocks.min(4));
    let mut whole = Vec::new();
    for b in rng.distinct(s.num_blocks, nblk) {
        whole.extend(b * s.block_size as u64..(b + 1) * s.block_size as u64);
    }
    let k = 1 + rng.below(total.min(300));
    let random = rng.distinct(total, k);
    let mut repeats: Vec<u64> = (0..1 + rng.below(40))
        .map(|_| rng.below(total) as u64)
        .collect();
    let dup = repeats[rng.below(repeats.len())];
    repeats.push(dup);
    repeats.insert(rng.below(repeats.len()), dup);
    rng.shuffle(&mut repeats[..]);
    vec![
        ("empty", Vec::new()),
        ("one slot", vec![rng.below(total) as u64]),
        ("whole blocks", whole),
        ("random", random),
        ("repeats", repeats),
    ]
}

/// Gathers and scatters of one configuration.
fn check_config(
    t: &mut Tally,
    rng: &mut Rng,
    dtype: DType,
    s: &PagedShape,
    seed: u64,
) -> Result<()> {
    let es = dtype.size();
    let host_cache = HostTensor::random(dtype, &s.cache_shape(), seed);
    let cache = CudaTensor::from_host(&host_cache, 0)?;
    let dev = cache.context().clone();
    for (name, slots) in slot_lists(rng, s) {
        let what = |dir: &str, r: usize| {
            format!(
                "{dir} {dtype} {s:?} {name} ({} slots, R {r}): {:?}",
                slots.len(),
                &slots[..slots.len().min(8)]
            )
        };
        // Gather into a buffer with spare rows of random bytes.
        let r_rows = slots.len() + rng.below(4);
        let before = HostTensor::random(dtype, &rows_shape(s, r_rows), rng.next());
        let mut out = CudaTensor::from_host(&before, 0)?;
        let got = gather_slots(&cache, s, &slots, &mut out).and_then(|()| out.to_host());
        let mut want = before.as_bytes().to_vec();
        let mut c = host_cache.as_bytes().to_vec();
        host_reference(s, es, &mut c, &mut want, r_rows, &slots, true);
        match got {
            Ok(g) => t.check(g.as_bytes() == want.as_slice(), || what("gather", r_rows)),
            Err(e) => t.check(false, || format!("{}: error {e}", what("gather", r_rows))),
        }
        // Scatter random rows into a zeroed cache.
        let r_rows = slots.len() + rng.below(4);
        let src_h = HostTensor::random(dtype, &rows_shape(s, r_rows), rng.next());
        let src = CudaTensor::from_host(&src_h, 0)?;
        let mut zc = CudaTensor::zeros(&dev, dtype, &s.cache_shape())?;
        let got = scatter_slots(&mut zc, s, &slots, &src).and_then(|()| zc.to_host());
        let mut want = vec![0u8; host_cache.nbytes()];
        let mut b = src_h.as_bytes().to_vec();
        host_reference(s, es, &mut want, &mut b, r_rows, &slots, false);
        match got {
            Ok(g) => t.check(g.as_bytes() == want.as_slice(), || what("scatter", r_rows)),
            Err(e) => t.check(false, || format!("{}: error {e}", what("scatter", r_rows))),
        }
    }
    Ok(())
}

/// Each bad argument is refused with `InvalidArgument` and changes nothing.
fn check_validation(t: &mut Tally) -> Result<()> {
    let s = PagedShape {
        kv: 2,
        num_blocks: 6,
        block_size: 16,
        num_kv_heads: 4,
        head_dim: 8,
        hnd: false,
    };
    let dtype = DType::BF16;
    let cache_h = HostTensor::random(dtype, &s.cache_shape(), 11);
    let mut cache = CudaTensor::from_host(&cache_h, 0)?;
    let dev = cache.context().clone();
    let slots = [3u64, 40, 17];
    let buf_h = HostTensor::random(dtype, &rows_shape(&s, 4), 12);
    let mut buf = CudaTensor::from_host(&buf_h, 0)?;
    let mut wrong_dtype = CudaTensor::zeros(&dev, DType::F16, &rows_shape(&s, 4))?;
    let mut few = CudaTensor::zeros(&dev, dtype, &rows_shape(&s, 2))?;
    let mut wrong_heads = CudaTensor::zeros(&dev, dtype, &[2, 4, 2, 8])?;
    let hnd = PagedShape { hnd: true, ..s };
    let mut alias = cache.reshape(&[2, 6 * 16, 4, 8])?;
    let oob = [3u64, 96];

    let cases: Vec<(&str, Result<()>)> = vec![
        (
            "gather: buffer dtype",
            gather_slots(&cache, &s, &slots, &mut wrong_dtype),
        ),
        (
            "gather: slot out of range",
            gather_slots(&cache, &s, &oob, &mut buf),
        ),
        (
            "gather: too few rows",
            gather_slots(&cache, &s, &slots, &mut few),
        ),
        (
            "gather: buffer heads",
            gather_slots(&cache, &s, &slots, &mut wrong_heads),
        ),
        (
            "gather: cache shape (HND geometry for an NHD tensor)",
            gather_slots(&cache, &hnd, &slots, &mut buf),
        ),
        (
            "gather: buffer aliases the cache",
            gather_slots(&cache, &s, &slots, &mut alias),
        ),
        (
            "scatter: buffer dtype",
            scatter_slots(&mut cache, &s, &slots, &wrong_dtype),
        ),
        (
            "scatter: slot out of range",
            scatter_slots(&mut cache, &s, &oob, &buf),
        ),
        (
            "scatter: too few rows",
            scatter_slots(&mut cache, &s, &slots, &few),
        ),
        (
            "scatter: cache shape",
            scatter_slots(&mut cache, &hnd, &slots, &buf),
        ),
        (
            "scatter: buffer aliases the cache",
            scatter_slots(&mut cache, &s, &slots, &alias.clone()),
        ),
    ];
    for (name, r) in cases {
        match r {
            Err(Error::InvalidArgument(msg)) => {
                t.ok += 1;
                println!("paged_check:   refused {name}: {msg}");
            }
            other => t.check(false, || {
                format!("{name}: expected InvalidArgument, got {other:?}")
            }),
        }
    }
    t.check(cache.to_host()?.as_bytes() == cache_h.as_bytes(), || {
        "a refused call changed the cache".into()
    });
    t.check(buf.to_host()?.as_bytes() == buf_h.as_bytes(), || {
        "a refused call changed the buffer".into()
    });
    // No slots: Ok, nothing written, even with a zero-row buffer.
    let mut empty = CudaTensor::zeros(&dev, dtype, &rows_shape(&s, 0))?;
    t.check(gather_slots(&cache, &s, &[], &mut empty).is_ok(), || {
        "gather of no slots into a 0-row buffer".into()
    });
    t.check(scatter_slots(&mut cache, &s, &[], &empty).is_ok(), || {
        "scatter of no slots from a 0-row buffer".into()
    });
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall seconds of 20 calls after 3 warm-ups.
fn time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut v = Vec::with_capacity(20);
    for _ in 0..20 {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// The figure: gathers and a scatter of a realistic bf16 layer.
fn bench(rng: &mut Rng) -> Result<()> {
    let dev = DeviceContext::get(0)?;
    {
        // The fixed cost of a call: list upload, launch and the waits, for one slot.
        let s = PagedShape {
            kv: 2,
            num_blocks: 4096,
            block_size: 16,
            num_kv_heads: 8,
            head_dim: 128,
            hnd: false,
        };
        let cache = CudaTensor::zeros(&dev, DType::BF16, &s.cache_shape())?;
        let mut out = CudaTensor::zeros(&dev, DType::BF16, &rows_shape(&s, 1))?;
        let slot = [rng.below(4096 * 16) as u64];
        let secs = time(|| gather_slots(&cache, &s, &slot, &mut out))?;
        println!(
            "paged_check: bench gather bf16 NHD of 1 slot (the fixed cost of a call): median \
             {:.1} us",
            secs * 1e6
        );
    }
    for (label, nblk) in [("256 random blocks", 256usize), ("all 4096 blocks", 4096)] {
        for hnd in [false, true] {
            let s = PagedShape {
                kv: 2,
                num_blocks: 4096,
                block_size: 16,
                num_kv_heads: 8,
                head_dim: 128,
                hnd,
            };
            let cache = CudaTensor::zeros(&dev, DType::BF16, &s.cache_shape())?;
            let mut slots = Vec::with_capacity(nblk * 16);
            for b in rng.distinct(s.num_blocks, nblk) {
                slots.extend(b * 16..(b + 1) * 16);
            }
            let mut out = CudaTensor::zeros(&dev, DType::BF16, &rows_shape(&s, slots.len()))?;
            let bytes = out.numel() * 2;
            let secs = time(|| gather_slots(&cache, &s, &slots, &mut out))?;
            let layout = if hnd { "HND" } else { "NHD" };
            println!(
                "paged_check: bench gather bf16 {layout} 2x4096x16x8x128, {label} = {} slots \
                 ({:.1} MiB): median {:.1} us per call, {:.0} GB/s (read+write)",
                slots.len(),
                bytes as f64 / (1 << 20) as f64,
                secs * 1e6,
                2.0 * bytes as f64 / secs / 1e9
            );
            if !hnd {
                let mut c = cache.clone();
                let secs = time(|| scatter_slots(&mut c, &s, &slots, &out))?;
                println!(
                    "paged_check: bench scatter bf16 NHD, {label}: median {:.1} us per call, \
                     {:.0} GB/s (read+write)",
                    secs * 1e6,
                    2.0 * bytes as f64 / secs / 1e9
                );
                let mut dst = CudaTensor::zeros(&dev, DType::BF16, &rows_shape(&s, slots.len()))?;
                let secs = time(|| {
                    Communicator::copy(&out.view(), &mut dst.view_mut())?;
                    dev.synchronize()
                })?;
                println!(
                    "paged_check: bench reference cuMemcpyDtoD of the same {:.1} MiB + wait: \
                     median {:.1} us, {:.0} GB/s (read+write)",
                    bytes as f64 / (1 << 20) as f64,
                    secs * 1e6,
                    2.0 * bytes as f64 / secs / 1e9
                );
            }
        }
    }
    Ok(())
}

fn run() -> Result<bool> {
    let mut rng = Rng(0x5EED_0F9A_6ED0_C5A1);
    let dtypes = [DType::F32, DType::BF16, DType::F16, DType::U8, DType::F64];
    let mut all = Tally::default();
    for dtype in dtypes {
        for hnd in [false, true] {
            let mut t = Tally::default();
            let t0 = Instant::now();
            for kv in [1, 2] {
                for block_size in [1, 16] {
                    for num_kv_heads in [1, 5, 8] {
                        for head_dim in [3, 64, 128] {
                            let num_blocks = if block_size == 1 {
                                3 + rng.below(60)
                            } else {
                                2 + rng.below(12)
                            };
                            let s = PagedShape {
                                kv,
                                num_blocks,
                                block_size,
                                num_kv_heads,
                                head_dim,
                                hnd,
                            };
                            let seed = rng.next();
                            check_config(&mut t, &mut rng, dtype, &s, seed)?;
                        }
                    }
                }
            }
            println!(
                "paged_check: {dtype} {}: {} checks, {} wrong ({:.1} s)",
                if hnd { "HND" } else { "NHD" },
                t.total(),
                t.bad.len(),
                t0.elapsed().as_secs_f64()
            );
            all.ok += t.ok;
            all.bad.extend(t.bad);
        }
    }
    let mut t = Tally::default();
    check_validation(&mut t)?;
    println!(
        "paged_check: validation: {} checks, {} wrong",
        t.total(),
        t.bad.len()
    );
    all.ok += t.ok;
    all.bad.extend(t.bad);

    bench(&mut rng)?;

    for b in all.bad.iter().take(20) {
        println!("paged_check: WRONG {b}");
    }
    println!(
        "paged_check: {} checks, {} wrong",
        all.total(),
        all.bad.len()
    );
    Ok(all.bad.is_empty())
}

fn main() -> ExitCode {
    if device_count() == 0 {
        println!("paged_check: no CUDA device (or no driver); nothing checked");
        return ExitCode::from(77);
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            println!("paged_check: error: {e}");
            ExitCode::from(1)
        }
    }
}
