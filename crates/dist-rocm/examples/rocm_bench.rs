//! All-reduce benchmark of dist-rocm (RCCL), event-timed, in dist-cuda's table format: the GPU
//! backends' shared sweep (`dist-nccl/examples/common/bench.rs`). On an NVIDIA machine with
//! `--hip-from-cudart` it times the ROCm crate's code over cudart and NCCL: an ABI check, not a
//! ROCm measurement.
//!
//! Usage: `rocm_bench [--hip-from-cudart] [--max-bytes N] [--mode in-place|out-of-place|graph]...`

#[path = "../../dist-nccl/examples/common/bench.rs"]
mod bench;
#[path = "common/cudart_shim.rs"]
mod cudart_shim;

use dist_core::{Backend, DeviceCommunicator};
use dist_rocm::RocmBackend;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--hip-from-cudart") {
        let rt = cudart_shim::install()?;
        println!(
            "# ABI check, not a ROCm measurement: HIP runtime = {}",
            rt.path
        );
    }
    let start = bench::start()?;
    let (e, sizes) = (&start.env, bench::sizes(start.max_bytes));
    println!("# {}", dist_rocm::probe()?);
    let comm = RocmBackend::create_communicator(&start.ctx)?;
    for m in &start.modes {
        let rows = bench::sweep(&comm, &sizes, m.parse()?)?;
        if e.rank == 0 {
            let title = format!("dist-rocm all_reduce ({m}), world {}, fp32, RCCL", e.world);
            bench::print_table(&title, &rows);
        }
    }
    comm.destroy()?;
    Ok(())
}
