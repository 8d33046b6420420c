//! Multi-process test of the shared-memory communicator (run by `cargo xtask test-multiproc`
//! under `dist run --nproc-per-node N`, or by hand with torchrun's variables set).
//!
//! Every op × dtype × size (0, 1, 7, 4 KiB, 1 MiB + 3 elements) against the `dist_core`
//! oracles on random data, every rank computing all ranks' inputs from seeds; then 64 MiB f32
//! all-reduce and all-gather checked against closed-form values. Exits 0 when every check passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::{
    reference, Backend, CommunicatorContext, DType, DeviceCommunicator, HostGroup, HostTensor,
    ReduceOp,
};
use dist_cpu::{CpuBackend, CpuCommunicator};
use dist_store::StatelessProcessGroup;

type R<T> = std::result::Result<T, String>;

fn check(cond: bool, what: impl FnOnce() -> String) -> R<()> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Equal results: bit-identical on shared memory; on gloo (another combination order) floats
/// within rounding, integers exact.
fn same(c: &CpuCommunicator, got: &HostTensor, want: &HostTensor) -> bool {
    if c.kind() == "shm" || !got.dtype().is_float() || got.shape() != want.shape() {
        return got == want;
    }
    let tol = if got.dtype().size() == 2 { 2e-2 } else { 1e-5 };
    let f = |t: &HostTensor| dist_core::conformance::to_f64(t).expect("a float tensor");
    f(got)
        .iter()
        .zip(f(want))
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

fn ins(dtype: DType, shape: &[usize], world: usize, seed: u64) -> Vec<HostTensor> {
    (0..world)
        .map(|r| HostTensor::random(dtype, shape, seed * 1000 + r as u64))
        .collect()
}

fn per_dtype(c: &CpuCommunicator, dtype: DType, len: usize, seed: u64) -> R<()> {
    let e = |x: dist_core::Error| format!("{dtype} len {len}: {x}");
    let (r, n) = (c.rank(), c.world_size());
    let what = |op: &str| format!("{op} {dtype} len {len} world {n} rank {r}: wrong result");
    let large = len > 100_000;
    let x = ins(dtype, &[len], n, seed);
    if dtype.is_reducible() {
        let ops: &[ReduceOp] = if large {
            &[ReduceOp::Sum]
        } else {
            &ReduceOp::ALL
        };
        for &op in ops {
            let want = reference::all_reduce(&x, op).map_err(e)?;
            let got = c.all_reduce(&x[r], op).map_err(e)?;
            check(same(c, &got, &want), || what(&format!("all_reduce {op}")))?;
        }
        // Along dim 0 ([n, len], or about len elements in all when large) and dim 1 ([2, n * len]).
        let cases: Vec<(Vec<usize>, isize)> = if large {
            vec![(vec![n, len / n + 1], 0)]
        } else {
            vec![(vec![n, len], 0), (vec![2, n * len], 1)]
        };
        for (k, (shape, dim)) in cases.into_iter().enumerate() {
            let y = ins(dtype, &shape, n, seed + 1 + k as u64);
            let want = reference::reduce_scatter(&y, dim, ReduceOp::Sum).map_err(e)?;
            let got = c.reduce_scatter(&y[r], dim, ReduceOp::Sum).map_err(e)?;
            check(same(c, &got, &want[r]), || {
                what(&format!("reduce_scatter dim {dim}"))
            })?;
        }
        if !large {
            let sizes: Vec<usize> = (0..n).map(|q| (q * 5 + len) % 4).collect();
            let v = ins(dtype, &[3, sizes.iter().sum()], n, seed + 2);
            let want = reference::reduce_scatterv(&v, 1, &sizes, ReduceOp::Max).map_err(e)?;
            let got = c
                .reduce_scatterv(&v[r], 1, &sizes, ReduceOp::Max)
                .map_err(e)?;
            check(same(c, &got, &want[r]), || what("reduce_scatterv"))?;
        }
    }
    let want = reference::all_gather(&x, 0).map_err(e)?;
    check(c.all_gather(&x[r], 0).map_err(e)? == want, || {
        what("all_gather")
    })?;
    if !large {
        let z = ins(dtype, &[3, len, 2], n, seed + 3);
        for dim in [0isize, 1, 2] {
            let want = reference::all_gather(&z, dim).map_err(e)?;
            check(c.all_gather(&z[r], dim).map_err(e)? == want, || {
                what("all_gather 3-d")
            })?;
            let dst = (len + dim as usize) % n;
            let got = c.gather(&z[r], dst, dim).map_err(e)?;
            check(got.is_some() == (r == dst), || what("gather presence"))?;
            if let Some(g) = got {
                check(g == want, || what("gather"))?;
            }
        }
        let sizes: Vec<usize> = (0..n).map(|q| (q + len) % 3).collect();
        let v: Vec<HostTensor> = (0..n)
            .map(|q| HostTensor::random(dtype, &[2, sizes[q]], seed * 7 + q as u64))
            .collect();
        let want = reference::all_gatherv(&v, -1, &sizes).map_err(e)?;
        check(c.all_gatherv(&v[r], -1, &sizes).map_err(e)? == want, || {
            what("all_gatherv")
        })?;
    }
    let src = (seed as usize) % n;
    let mut t = x[r].clone();
    c.broadcast(&mut t.view_mut(), src).map_err(e)?;
    check(t == x[src], || what("broadcast"))?;
    if n > 1 {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut got = HostTensor::zeros(dtype, &[len]);
        if r % 2 == 0 {
            c.send(&x[r].view(), next).map_err(e)?;
            c.recv(&mut got.view_mut(), prev).map_err(e)?;
        } else {
            c.recv(&mut got.view_mut(), prev).map_err(e)?;
            c.send(&x[r].view(), next).map_err(e)?;
        }
        check(got == x[prev], || what("send/recv"))?;
    }
    Ok(())
}

/// 64 MiB of f32 whose sum over ranks is exact in any order: small integers.
fn pattern(len: usize, r: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + r * 13) % 1000) as f32).collect()
}

fn big(c: &CpuCommunicator) -> R<()> {
    let (r, n) = (c.rank(), c.world_size());
    let len = 16 << 20; // 64 MiB of f32
    let mut t = HostTensor::from_vec(&[len], pattern(len, r)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    c.all_reduce_in_place(&mut t.view_mut(), ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let took = start.elapsed();
    let got = t.as_slice::<f32>().map_err(|e| e.to_string())?;
    for (i, v) in got.iter().enumerate() {
        let want: usize = (0..n).map(|q| (i * 7 + q * 13) % 1000).sum();
        check(*v == want as f32, || {
            format!("64 MiB all_reduce: element {i} is {v}, want {want}")
        })?;
    }
    // All-gather with a 64 MiB result.
    let part = len / n;
    let x = HostTensor::from_vec(&[part], pattern(part, r)).map_err(|e| e.to_string())?;
    let g = c.all_gather(&x, 0).map_err(|e| e.to_string())?;
    let gs = g.as_slice::<f32>().map_err(|e| e.to_string())?;
    for q in 0..n {
        check(gs[q * part..(q + 1) * part] == pattern(part, q)[..], || {
            format!("64 MiB all_gather: rank {q}'s part is wrong")
        })?;
    }
    if r == 0 {
        println!("rank 0: 64 MiB f32 all_reduce over {n} ranks took {took:?}");
    }
    Ok(())
}

fn run() -> R<()> {
    let timeout = Duration::from_secs(120);
    let g = Arc::new(StatelessProcessGroup::from_env(timeout).map_err(|e| e.to_string())?);
    let ctx = CommunicatorContext {
        group_name: "mp-cpu".into(),
        ranks: (0..g.world_size()).collect(),
        rank_in_group: g.rank(),
        local_rank: g.rank(),
        host_group: g.clone(),
        store: g.store().clone(),
        timeout,
    };
    let c = CpuBackend::create_communicator(&ctx).map_err(|e| e.to_string())?;
    let start = Instant::now();
    for (i, dtype) in DType::ALL.iter().copied().enumerate() {
        for len in [0, 1, 7, 4096 / dtype.size(), (1 << 20) + 3] {
            per_dtype(&c, dtype, len, (i * 10 + len % 10) as u64)?;
        }
    }
    big(&c)?;
    g.barrier().map_err(|e| e.to_string())?;
    if g.rank() == 0 {
        println!(
            "mp_cpu_collectives: every check passed on {} at world {} in {:?}",
            c.kind(),
            g.world_size(),
            start.elapsed()
        );
    }
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1,2,3,4,8");
        // An extra run per line for `cargo xtask test-multiproc`: the gloo path, when built in.
        if cfg!(feature = "gloo") {
            println!("DIST_CPU_BACKEND=gloo");
        }
        return;
    }
    if let Err(e) = run() {
        eprintln!(
            "mp_cpu_collectives: rank {}: {e}",
            std::env::var("RANK").unwrap_or_default()
        );
        std::process::exit(1);
    }
}
