//! Device test of dist-rocm, one process per rank (torchrun's environment).
//!
//! - Any world with one GPU per rank: the checks every GPU backend shares
//!   (`dist-nccl/examples/common/checks.rs`: dist-core's conformance suite through the `Backend`
//!   trait, graph capture and replay of all_reduce and all_gather(dim 1)), then refusals after
//!   `destroy`.
//! - `--hip-from-cudart` (the ABI test on NVIDIA machines, not a ROCm test): installs a HIP
//!   runtime served by `libcudart` (`common/cudart_shim.rs`) before anything else; with
//!   `DIST_NCCL_SO_PATH` pointing at `libnccl.so.2` the crate's RCCL entry point
//!   (`dist_nccl::library(Flavor::Rccl)`) loads NCCL, which has the same C ABI.
//!
//! Exits 0 when every check passed, 77 (skipped, with a line saying `SKIPPED`) when there is no
//! HIP runtime or no device for every rank. `--worlds` prints the supported world sizes.

#[path = "../../dist-nccl/examples/common/checks.rs"]
mod checks;
#[path = "common/cudart_shim.rs"]
mod cudart_shim;

use std::time::{Duration, Instant};

use dist_core::Backend;
use dist_core::Result;
use dist_rocm::{DeviceContext, GpuRuntime, RocmBackend};

/// The exit status `cargo xtask test-multiproc` counts as skipped.
const SKIP: i32 = 77;

fn run(e: &dist_store::RankEnv, ck: &mut checks::Checks) -> Result<()> {
    let ctx = e.job_context("tp:0", Duration::from_secs(120))?;
    let t0 = Instant::now();
    let comm = RocmBackend::create_communicator(&ctx)?;
    let lib = dist_nccl::library(dist_nccl::Flavor::Rccl)?;
    if e.rank == 0 {
        let dev = comm.context();
        println!(
            "world {}: HIP runtime {} ({}), device {} '{}' bus {}; RCCL entry point loaded {} from {}; set up in {:?}",
            e.world,
            dev.runtime().version(),
            dev.runtime().path,
            dev.ordinal(),
            dev.name().unwrap_or_default(),
            dev.pci_bus_id().unwrap_or_default(),
            lib.version(),
            lib.path,
            t0.elapsed()
        );
    }
    checks::nccl_suite(&comm, ck)?;
    checks::destroy_then_refused(&comm, ck)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worlds") {
        println!("1,2,4,8");
        return;
    }
    let e = dist_store::RankEnv::from_env().expect("torchrun environment");
    if args.iter().any(|a| a == "--hip-from-cudart") {
        match cudart_shim::install() {
            Ok(rt) if e.rank == 0 => {
                println!(
                    "ABI TEST (not a ROCm test): HIP runtime = {} version {}",
                    rt.path,
                    rt.version()
                )
            }
            Ok(_) => {}
            Err(err) => {
                println!(
                    "rank {}: SKIPPED: no cudart for the ABI test ({err})",
                    e.rank
                );
                std::process::exit(SKIP);
            }
        }
    }
    // Every rank needs its own device (RCCL refuses two ranks on one GPU). Every rank decides
    // the same way, so no rank is left waiting for a peer that skipped.
    if let Err(err) = DeviceContext::get(e.local_rank) {
        println!(
            "rank {}: SKIPPED: no ROCm device for local rank {} ({err})",
            e.rank, e.local_rank
        );
        std::process::exit(SKIP);
    }
    let n = dist_rocm::device_count();
    if n < e.world {
        println!(
            "rank {}: SKIPPED: world {} needs one GPU per rank, {n} visible",
            e.rank, e.world
        );
        std::process::exit(SKIP);
    }
    let mut ck = checks::Checks::default();
    let t0 = Instant::now();
    let r = run(&e, &mut ck);
    checks::finish(e.rank, e.world, ck, r, t0)
}
