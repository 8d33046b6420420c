//! The all-reduce benchmark behind `dist bench --backend cuda` and the `cuda_bench` example:
//! CUDA-event timed, in the table format of `ci/device/cuda_bench_torch.py`.

use std::time::Instant;

use cudarc::driver::{result as cu, sys};
use dist_core::{DType, DeviceCommunicator, Error, ReduceOp, Result};

use crate::driver::cuda_err;
use crate::{Communicator, CudaGraph};

/// How each call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `all_reduce_in_place` (what torch's `dist.all_reduce(t)` does).
    InPlace,
    /// `all_reduce` into a new tensor, dropped after the call (the allocation cache reuses it).
    OutOfPlace,
    /// `GRAPH_CALLS` out-of-place calls captured in one CUDA graph, timed per replayed call.
    Graph,
}

/// Calls captured per graph in [`Mode::Graph`].
pub const GRAPH_CALLS: usize = 10;

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Message size.
    pub bytes: usize,
    /// Timed calls.
    pub iters: usize,
    /// Device time per call (event time / calls).
    pub gpu_us: f64,
    /// Host time to enqueue one call.
    pub host_us: f64,
    /// bytes / device time.
    pub algbw_gbs: f64,
    /// algbw · 2(n−1)/n (nccl-tests' bus bandwidth; 0 at one rank).
    pub busbw_gbs: f64,
}

struct Event(sys::CUevent);
impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is ours and destroyed once.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

fn event() -> Result<Event> {
    cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
        .map(Event)
        .map_err(|e| cuda_err("cuEventCreate", e))
}

/// Message sizes 8 B, 32 B, … (×4) up to `max_bytes`.
pub fn sizes(max_bytes: usize) -> Vec<usize> {
    std::iter::successors(Some(8usize), |b| b.checked_mul(4))
        .take_while(|b| *b <= max_bytes)
        .collect()
}

/// Calls per size: about 2 GB of traffic, between 20 and 200.
pub fn iters_for(bytes: usize) -> usize {
    (2_000_000_000 / bytes.max(1)).clamp(20, 200)
}

/// Times fp32 sum all-reduces of each size on `comm` (5 warm-up calls, then `iters_for` calls
/// between two events on the device's stream).
pub fn all_reduce_sweep(comm: &Communicator, sizes: &[usize], mode: Mode) -> Result<Vec<Row>> {
    let dev = comm.context().clone();
    let world = comm.world_size();
    let stream = dev.stream();
    let (e0, e1) = (event()?, event()?);
    let mut rows = Vec::new();
    for &bytes in sizes {
        dist_core::ensure_arg!(
            bytes % 4 == 0,
            "bench size {bytes} is not a multiple of 4 (fp32)"
        );
        let mut t = comm.empty(DType::F32, &[bytes / 4])?;
        let mut iters = iters_for(bytes);
        let graph = if mode == Mode::Graph {
            iters = iters.div_ceil(GRAPH_CALLS);
            for _ in 0..3 {
                drop(comm.all_reduce(&t, ReduceOp::Sum)?);
            }
            comm.synchronize()?;
            comm.begin_capture()?;
            let g = CudaGraph::capture(&dev, || {
                (0..GRAPH_CALLS)
                    .map(|_| comm.all_reduce(&t, ReduceOp::Sum))
                    .collect::<Result<Vec<_>>>()
            });
            comm.end_capture()?;
            Some(g?)
        } else {
            None
        };
        let call = |t: &mut crate::CudaTensor| -> Result<()> {
            match (&graph, mode) {
                (Some((g, _)), _) => g.replay(),
                (None, Mode::InPlace) => comm.all_reduce_in_place(&mut &mut *t, ReduceOp::Sum),
                (None, _) => comm.all_reduce(t, ReduceOp::Sum).map(drop),
            }
        };
        for _ in 0..5 {
            call(&mut t)?;
        }
        comm.synchronize()?;
        let h0 = Instant::now();
        // SAFETY: live event and stream.
        unsafe { cu::event::record(e0.0, stream) }.map_err(|e| cuda_err("cuEventRecord", e))?;
        for _ in 0..iters {
            call(&mut t)?;
        }
        // SAFETY: as above.
        unsafe { cu::event::record(e1.0, stream) }.map_err(|e| cuda_err("cuEventRecord", e))?;
        let host = h0.elapsed();
        comm.synchronize()?;
        // SAFETY: both events recorded and complete.
        let ms = unsafe { cu::event::elapsed(e0.0, e1.0) }
            .map_err(|e| cuda_err("cuEventElapsedTime", e))?;
        let calls = if graph.is_some() {
            iters * GRAPH_CALLS
        } else {
            iters
        };
        let gpu_us = ms as f64 * 1000.0 / calls as f64;
        if !gpu_us.is_finite() || gpu_us <= 0.0 {
            return Err(Error::protocol(format!(
                "bench: event time {ms} ms for {calls} calls"
            )));
        }
        let algbw = bytes as f64 / (gpu_us * 1e-6) / 1e9;
        rows.push(Row {
            bytes,
            iters: calls,
            gpu_us,
            host_us: host.as_secs_f64() * 1e6 / calls as f64,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (world as f64 - 1.0) / world as f64,
        });
    }
    Ok(rows)
}

/// The table header (same columns as `ci/device/cuda_bench_torch.py`).
pub fn header() -> String {
    format!(
        "{:>12} {:>10} {:>10} {:>10} {:>10}",
        "bytes", "gpu_us", "host_us", "algbw_GBs", "busbw_GBs"
    )
}

/// One formatted row.
pub fn format_row(r: &Row) -> String {
    format!(
        "{:>12} {:>10.2} {:>10.2} {:>10.3} {:>10.3}",
        r.bytes, r.gpu_us, r.host_us, r.algbw_gbs, r.busbw_gbs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_ladder() {
        assert_eq!(sizes(512), vec![8, 32, 128, 512]);
        assert_eq!(*sizes(512 << 20).last().unwrap(), 512 << 20);
        assert_eq!(sizes(512 << 20).len(), 14);
        assert_eq!(iters_for(8), 200);
        assert_eq!(iters_for(512 << 20), 20);
    }

    #[test]
    fn row_format() {
        let r = Row {
            bytes: 1024,
            iters: 10,
            gpu_us: 2.5,
            host_us: 1.25,
            algbw_gbs: 0.4096,
            busbw_gbs: 0.0,
        };
        assert_eq!(
            format_row(&r).split_whitespace().collect::<Vec<_>>(),
            vec!["1024", "2.50", "1.25", "0.410", "0.000"]
        );
        assert_eq!(header().split_whitespace().count(), 5);
    }
}
