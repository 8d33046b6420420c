//! All-reduce benchmark of dist-cuda at world size 1 (NCCL), CUDA-event timed, in the format of
//! `ci/device/cuda_bench_torch.py` so the two tables sit side by side (see [`dist_cuda::bench`]).
//!
//! Usage: `cuda_bench [--max-bytes N] [--mode in-place|out-of-place|graph]`.

use std::time::Duration;

use dist_cuda::bench::{all_reduce_sweep, format_row, header, sizes, Mode};
use dist_cuda::{Communicator, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1");
        return Ok(());
    }
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let max_bytes: usize = arg("--max-bytes")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(512 << 20);
    let mode = match arg("--mode").as_deref() {
        None | Some("in-place") => Mode::InPlace,
        Some("out-of-place") => Mode::OutOfPlace,
        Some("graph") => Mode::Graph,
        Some(m) => return Err(format!("unknown --mode {m}").into()),
    };
    let e = dist_store::RankEnv::from_env()?;
    let ctx = e.job_context("bench", Duration::from_secs(60))?;
    let comm = Communicator::new(
        &ctx,
        &Options {
            device: Some(e.local_rank),
            nccl: true,
            custom_all_reduce: e.world > 1,
            custom_ar_max_size: None,
        },
    )?;
    let rows = all_reduce_sweep(&comm, &sizes(max_bytes), mode)?;
    if e.rank == 0 {
        println!(
            "# dist-cuda all_reduce ({mode:?}), world {}, fp32, custom AR {}",
            e.world,
            comm.has_custom_ar()
        );
        println!("{}", header());
        for r in &rows {
            println!("{}", format_row(r));
        }
    }
    dist_core::DeviceCommunicator::destroy(&comm)?;
    Ok(())
}
