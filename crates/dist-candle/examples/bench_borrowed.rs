//! What the candle adapter costs: an all-reduce of a candle tensor in its own storage beside the
//! communicator's in-place call on a host tensor of the same size (and the coordinator's, which
//! the adapter goes through), in one run, interleaved, median over repetitions of the slowest
//! rank's time; the adapter's own cost per call (lending a storage, no collective); then an
//! all-gather's output as a candle tensor made three ways (candle's `Tensor::zeros` written in
//! place, the adapter's calloc'd `Vec`, a buffer the caller reuses) beside the communicator's owned
//! all-gather (its output from the pool of touched host buffers).
//!
//! ```text
//! cargo build --release -p dist-candle --example bench_borrowed -p dist --bin dist
//! target/release/dist run --nproc-per-node 4 -- target/release/examples/bench_borrowed
//! ```
//! Options: `--sizes 1M,4M,16M,64M` (bytes of the all-reduced tensor / the gathered output),
//! `--reps 15`, `--dtype f32|bf16`. The three all-reduce paths run in a rotating order, each
//! sample being as many calls as make 32 MiB (one call from 32 MiB up); the time per call is printed.

use std::time::Instant;

use candle_core::{Device, Tensor};
use dist::conformance::to_f64;
use dist::{
    DType, DeviceCommunicator, DistEnv, HostGroupExt, HostTensor, InitOptions, ParallelConfig,
    ReduceOp,
};
use dist_candle::{to_candle, CandleBackend, CandleGroup};

type B = dist::DefaultBackend;
type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn parse_size(s: &str) -> Res<usize> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<usize>()? * m)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let mut sizes = vec![1 << 20, 4 << 20, 16 << 20, 64 << 20];
    let mut reps = 15usize;
    let mut dtype = DType::F32;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                sizes = it
                    .next()
                    .ok_or("--sizes needs a list")?
                    .split(',')
                    .map(parse_size)
                    .collect::<Res<_>>()?
            }
            "--reps" => reps = it.next().ok_or("--reps needs a count")?.parse()?,
            "--dtype" => dtype = it.next().ok_or("--dtype needs a type")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let env = DistEnv::init(&InitOptions::default())?;
    let world = env.world().world_size;
    let state = env.initialize_model_parallel::<B>(ParallelConfig {
        tp: world,
        ..ParallelConfig::new(world)
    })?;
    let tp = state.tp();
    let comm = tp.device_communicator().ok_or(
        "a one-rank group has no communicator: run under dist run --nproc-per-node 2 or more",
    )?;
    let host = tp.host_group().clone();
    let cg = CandleGroup::new(tp);
    let cd = to_candle(dtype).ok_or("dtype without a candle equivalent")?;
    let me = tp.rank_in_group();
    // Times one call on every rank after a barrier; the slowest rank's time.
    let time = |f: &mut dyn FnMut() -> Res<()>| -> Res<f64> {
        host.barrier()?;
        let t0 = Instant::now();
        f()?;
        let mine = t0.elapsed().as_secs_f64();
        let all: Vec<f64> = host.all_gather_obj(&mine)?;
        Ok(all.into_iter().fold(0.0, f64::max))
    };
    if me == 0 {
        println!(
            "all_reduce in place, {world} ranks, {dtype}, median of {reps} samples of 32 MiB of calls (slowest rank):"
        );
        println!(
            "{:>10} {:>14} {:>14} {:>14} {:>9} {:>9}",
            "bytes", "communicator", "coordinator", "candle", "cand/comm", "cand/coord"
        );
    }
    for &bytes in &sizes {
        let n = bytes / dtype.size();
        // Ones: the first call of each path is checked (every element = world).
        let mut host_t = HostTensor::from_vec(&[n], vec![1.0f32; n])?;
        let mut coord_t = host_t.clone();
        let cand = Tensor::ones(n, cd, &Device::Cpu)?;
        if dtype != DType::F32 {
            host_t = HostTensor::from_bytes(dtype, &[n], &dist_bytes(&cand)?)?;
            coord_t = host_t.clone();
        }
        let iters = (32 << 20) / bytes.max(1);
        let iters = iters.max(1);
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        for rep in 0..reps + 1 {
            // The three paths in a rotating order, so none always runs first; each sample is
            // `iters` calls (the per-call time is printed).
            let iters = if rep == 0 { 1 } else { iters };
            let (mut ta, mut tb, mut tc) = (0.0, 0.0, 0.0);
            for k in 0..3 {
                match (rep + k) % 3 {
                    0 => {
                        ta = time(&mut || {
                            for _ in 0..iters {
                                comm.all_reduce_in_place(&mut host_t.view_mut(), ReduceOp::Sum)?;
                            }
                            Ok(())
                        })? / iters as f64
                    }
                    1 => {
                        tb = time(&mut || {
                            for _ in 0..iters {
                                tp.all_reduce_in_place(&mut coord_t.view_mut())?;
                            }
                            Ok(())
                        })? / iters as f64
                    }
                    _ => {
                        tc = time(&mut || {
                            for _ in 0..iters {
                                cg.all_reduce_in_place(&cand)?;
                            }
                            Ok(())
                        })? / iters as f64
                    }
                }
            }
            if rep == 0 {
                // Check, then zero every buffer (sums of zeros stay finite).
                let w = world as f64;
                let h = to_f64(&host_t)?;
                let k = to_f64(&coord_t)?;
                let v = cand.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                if h.iter().chain(&k).chain(&v).any(|&x| x != w) {
                    return Err(
                        format!("rank {me}: an all-reduce of ones is not {w} everywhere").into(),
                    );
                }
                host_t = HostTensor::zeros(dtype, &[n]);
                coord_t = HostTensor::zeros(dtype, &[n]);
                cand.slice_set(&Tensor::zeros(n, cd, &Device::Cpu)?, 0, 0)?;
                continue;
            }
            a.push(ta);
            b.push(tb);
            c.push(tc);
        }
        let (a, b, c) = (median(a), median(b), median(c));
        if me == 0 {
            println!(
                "{:>10} {:>11.3} ms {:>11.3} ms {:>11.3} ms {:>9.3} {:>9.3}",
                bytes,
                a * 1e3,
                b * 1e3,
                c * 1e3,
                c / a,
                c / b
            );
        }
    }

    // The adapter's own cost per call, without the collective: lending a tensor's storage.
    if me == 0 {
        let t = Tensor::zeros(64 << 18, cd, &Device::Cpu)?;
        let n = 100_000;
        let t0 = Instant::now();
        for _ in 0..n {
            B::lend("lend", &[], &[&t], |_, w| Ok(w.len()))?;
        }
        let lend = t0.elapsed().as_secs_f64() / n as f64;
        println!(
            "lending one tensor's storage (no collective): {:.2} us per call",
            lend * 1e6
        );
        println!();
        println!(
            "all_gather output as a candle tensor, {world} ranks, {dtype}, median of {reps} (slowest rank):"
        );
        println!(
            "{:>10} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
            "out bytes",
            "zeros + into",
            "calloc (new)",
            "reused buffer",
            "comm pool",
            "calloc/zeros",
            "reused/pool"
        );
    }
    for &bytes in &sizes {
        let per = bytes / dtype.size() / world;
        let input = Tensor::ones(per, cd, &Device::Cpu)?;
        let host_in = HostTensor::from_bytes(dtype, &[per], &dist_bytes(&input)?)?;
        let reused = Tensor::zeros(per * world, cd, &Device::Cpu)?;
        let mut t = [vec![], vec![], vec![], vec![]];
        for rep in 0..reps + 1 {
            let mut got = [0.0; 4];
            for k in 0..4 {
                let path = (rep + k) % 4;
                got[path] = match path {
                    0 => time(&mut || {
                        let out = Tensor::zeros(per * world, cd, &Device::Cpu)?;
                        cg.all_gather_into(&input, &out, 0)?;
                        Ok(())
                    })?,
                    1 => time(&mut || {
                        cg.all_gather(&input, 0)?;
                        Ok(())
                    })?,
                    2 => time(&mut || Ok(cg.all_gather_into(&input, &reused, 0)?))?,
                    _ => time(&mut || {
                        comm.all_gather(&host_in, 0)?;
                        Ok(())
                    })?,
                };
            }
            if rep > 0 {
                for (v, g) in t.iter_mut().zip(got) {
                    v.push(g);
                }
            }
        }
        let [a, b, c, d] = t.map(median);
        if me == 0 {
            println!(
                "{:>10} {:>11.3} ms {:>11.3} ms {:>11.3} ms {:>11.3} ms {:>12.3} {:>12.3}",
                per * world * dtype.size(),
                a * 1e3,
                b * 1e3,
                c * 1e3,
                d * 1e3,
                b / a,
                c / d
            );
        }
    }
    Ok(())
}

/// A candle tensor's bytes (to build the host peer from the same values).
fn dist_bytes(t: &Tensor) -> Res<Vec<u8>> {
    Ok(B::lend("bytes", &[t], &[], |r, _| {
        Ok(r[0].as_bytes().to_vec())
    })?)
}
