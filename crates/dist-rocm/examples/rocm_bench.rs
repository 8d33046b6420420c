//! All-reduce benchmark of dist-rocm (RCCL), HIP-event timed, in dist-cuda's table format (see
//! [`dist_rocm::bench`]). On an NVIDIA machine with `--hip-from-cudart` it times the ROCm crate's
//! code over cudart and NCCL: an ABI check, not a ROCm measurement.
//!
//! Usage: `rocm_bench [--hip-from-cudart] [--max-bytes N] [--mode in-place|out-of-place|graph]`.

#[path = "common/cudart_shim.rs"]
mod cudart_shim;

use std::time::Duration;

use dist_rocm::bench::{all_reduce_sweep, format_row, header, sizes, Mode};
use dist_rocm::{Communicator, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1");
        return Ok(());
    }
    if args.iter().any(|a| a == "--hip-from-cudart") {
        let rt = cudart_shim::install()?;
        println!(
            "# ABI check, not a ROCm measurement: HIP runtime = {}",
            rt.path
        );
    }
    println!("# {}", dist_rocm::probe()?);
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
        },
    )?;
    let rows = all_reduce_sweep(&comm, &sizes(max_bytes), mode)?;
    if e.rank == 0 {
        println!(
            "# dist-rocm all_reduce ({mode:?}), world {}, fp32, RCCL",
            e.world
        );
        println!("{}", header());
        for r in &rows {
            println!("{}", format_row(r));
        }
    }
    dist_core::DeviceCommunicator::destroy(&comm)?;
    Ok(())
}
