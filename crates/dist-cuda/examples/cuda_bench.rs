//! All-reduce benchmark of dist-cuda at world size 1 (NCCL), CUDA-event timed, in the format of
//! `ci/device/cuda_bench_torch.py` so the two tables sit side by side.
//!
//! Per size: 5 warm-up calls, then `iters` back-to-back calls between two events on the stream.
//! `gpu_us` = event time / iters (what a call costs the stream); `host_us` = wall time to enqueue
//! one call (the launch overhead). algbw = bytes / gpu time; busbw = algbw * 2(n-1)/n, 0 at n = 1.
//!
//! Usage: `cuda_bench [--max-bytes N] [--out-of-place]`.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys};
use dist_core::{DType, DeviceCommunicator, ReduceOp};
use dist_cuda::{Communicator, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1");
        return Ok(());
    }
    let max_bytes: usize = args
        .iter()
        .position(|a| a == "--max-bytes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(512 << 20);
    let oop = args.iter().any(|a| a == "--out-of-place");
    let e = common::env();
    let ctx = common::context(&e, "bench", Duration::from_secs(60))?;
    let comm = Communicator::new(&ctx, &Options { device: Some(0), nccl: true, custom_all_reduce: false, custom_ar_max_size: None })?;
    let dev = comm.context().clone();
    let world = comm.world_size();
    let stream = dev.stream();
    let ev0 = cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?;
    let ev1 = cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?;
    println!("# dist-cuda NCCL all_reduce ({}), world {world}, fp32", if oop { "out of place" } else { "in place" });
    println!("{:>12} {:>10} {:>10} {:>10} {:>10}", "bytes", "gpu_us", "host_us", "algbw_GBs", "busbw_GBs");
    let mut bytes = 8usize;
    while bytes <= max_bytes {
        let n = bytes / 4;
        let mut t = comm.empty(DType::F32, &[n])?;
        let iters = (2_000_000_000 / bytes).clamp(20, 200);
        for _ in 0..5 {
            if oop {
                drop(comm.all_reduce(&t, ReduceOp::Sum)?);
            } else {
                comm.all_reduce_in_place(&mut t, ReduceOp::Sum)?;
            }
        }
        comm.synchronize()?;
        let mut outs = Vec::with_capacity(if oop { iters } else { 0 });
        let h0 = Instant::now();
        // SAFETY: live event and stream.
        unsafe { cu::event::record(ev0, stream) }?;
        for _ in 0..iters {
            if oop {
                outs.push(comm.all_reduce(&t, ReduceOp::Sum)?);
            } else {
                comm.all_reduce_in_place(&mut t, ReduceOp::Sum)?;
            }
        }
        // SAFETY: as above.
        unsafe { cu::event::record(ev1, stream) }?;
        let host = h0.elapsed();
        // SAFETY: ev1 was recorded.
        unsafe { cu::event::synchronize(ev1) }?;
        // SAFETY: both events recorded and complete.
        let ms = unsafe { cu::event::elapsed(ev0, ev1) }?;
        drop(outs);
        let gpu_us = ms as f64 * 1000.0 / iters as f64;
        let host_us = host.as_secs_f64() * 1e6 / iters as f64;
        let algbw = bytes as f64 / (gpu_us * 1e-6) / 1e9;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        println!("{bytes:>12} {gpu_us:>10.2} {host_us:>10.2} {algbw:>10.3} {busbw:>10.3}");
        bytes *= 4;
    }
    comm.destroy()?;
    Ok(())
}
