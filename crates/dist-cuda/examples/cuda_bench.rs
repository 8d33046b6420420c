//! All-reduce benchmark of dist-cuda (NCCL at world 1, the custom all-reduce beside NCCL with
//! one GPU per rank), event-timed on the communicator's stream, in the table format of
//! `ci/device/cuda_bench_torch.py`. The sweep is the GPU backends' shared one
//! (`dist-nccl/examples/common/bench.rs`); `engine` and `engine-tracked` time the in-place
//! all-reduce of an engine's cudarc `CudaSlice` on the engine's own `CudaStream` (the
//! communicator enqueues there), with cudarc's event tracking off (as candle, one stream) and on
//! (cudarc's default once a second stream exists): the view is made in every call.
//!
//! Usage: `cuda_bench [--max-bytes N] [--mode in-place|out-of-place|graph|engine|engine-tracked]...`

#[path = "../../dist-nccl/examples/common/bench.rs"]
mod bench;

use cudarc::driver::CudaContext;
use dist_core::{Backend, DeviceCommunicator, ReduceOp, Result};
use dist_cuda::{engine, Communicator, CudaBackend};

fn engine_sweep(comm: &Communicator, sizes: &[usize], tracking: bool) -> Result<Vec<bench::Row>> {
    let drv = |e| dist_cuda::driver::cuda_err("cudarc", e);
    let ctx = CudaContext::new(comm.context().ordinal()).map_err(drv)?;
    if !tracking {
        // SAFETY: the engine uses one stream and orders it itself.
        unsafe { ctx.disable_event_tracking() };
    }
    let stream = ctx.new_stream().map_err(drv)?;
    engine::use_stream(comm, &stream)?;
    let mut rows = Vec::new();
    for &bytes in sizes {
        let mut x = stream.alloc_zeros::<f32>(bytes / 4).map_err(drv)?;
        rows.push(bench::time(
            comm,
            bytes,
            bench::iters_for(bytes),
            1,
            || comm.all_reduce_in_place(&mut engine::view_mut(&mut x, &stream)?, ReduceOp::Sum),
        )?);
    }
    comm.reset_stream()?;
    Ok(rows)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let start = bench::start()?;
    let (e, sizes) = (&start.env, bench::sizes(start.max_bytes));
    let comm = CudaBackend::create_communicator(&start.ctx)?;
    for m in &start.modes {
        let rows = match m.as_str() {
            "engine" => engine_sweep(&comm, &sizes, false)?,
            "engine-tracked" => engine_sweep(&comm, &sizes, true)?,
            other => bench::sweep(&comm, &sizes, other.parse()?)?,
        };
        if e.rank == 0 {
            let ar = comm.has_custom_ar();
            let title = format!(
                "dist-cuda all_reduce ({m}), world {}, fp32, custom AR {ar}",
                e.world
            );
            bench::print_table(&title, &rows);
        }
    }
    comm.destroy()?;
    Ok(())
}
