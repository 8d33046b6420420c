//! Every collective of `NcclCommunicator` — the re-layouts of `all_gather(dim)` /
//! `reduce_scatter(dim)`, the v-variants as grouped broadcasts and reduces, gather, grouped
//! point-to-point, all-to-all-v — through dist-core's conformance suite (every op owned and into
//! poisoned outputs, every dtype, empty and odd sizes) against the oracles, with ranks as threads
//! over the host runtime and a stand-in for NCCL (`common`): what the communicator asks NCCL to
//! do is checked here without a GPU. Also the same with the views on an engine's stream.

mod common;

use std::time::Duration;

use common::{fake_nccl, id, new_stream, take_fences, thread_context, Host};
use dist_core::conformance::{check_all, Suite};
use dist_core::local::run_threads;
use dist_core::{reference, DType, DeviceCommunicator, HostTensor, Tensor};
use dist_nccl::{GpuBackend, GpuTensor, GpuView, GpuViewMut, NcclCommunicator, Options};

type Comm = NcclCommunicator<Host>;

fn comm(hg: dist_core::local::ThreadGroup) -> Comm {
    let ctx = thread_context(hg);
    Comm::new(
        &ctx,
        &Options {
            device: None,
            nccl: true,
        },
    )
    .expect("communicator")
}

#[test]
fn conformance_at_worlds_1_to_4() {
    fake_nccl::install();
    for world in 1..=4 {
        let r = run_threads(world, Duration::from_secs(60), |_, hg| {
            let c = comm(hg);
            // The quick suite's sizes, the largest (2^18 + 3) left out: every element goes
            // through host copies here.
            let suite = Suite {
                lengths: vec![0, 1, 7, 1024, 4099],
                ..Suite::quick(true)
            };
            let n = check_all::<GpuBackend<Host>>(&c, &suite)?;
            c.destroy()?;
            Ok::<_, dist_core::Error>(n)
        });
        for (rank, x) in r.into_iter().enumerate() {
            let n = x
                .expect("rank thread")
                .unwrap_or_else(|e| panic!("world {world} rank {rank}: {e}"));
            assert!(n > 100, "world {world} rank {rank}: {n} checks");
        }
    }
}

/// Views on an engine's stream while the communicator is on its own, then with the communicator
/// on the engine's stream: the same results, fenced the first time and not the second; the
/// re-layout's temporaries on the engine's stream go back to the cache through an event.
#[test]
fn collectives_on_an_engines_stream() {
    fake_nccl::install();
    let world = 3;
    let r = run_threads(world, Duration::from_secs(60), |rank, hg| {
        let c = comm(hg);
        let engine = new_stream();
        let shape = [2usize, 3, 4];
        let xs: Vec<HostTensor> = (0..world)
            .map(|q| HostTensor::random(DType::F32, &shape, 9 + q as u64))
            .collect();
        let want = reference::all_gather(&xs, 1)?;
        let mut checks = Vec::new();
        for round in 0..2 {
            if round == 1 {
                // SAFETY: the host runtime's streams are ids that never die.
                unsafe { c.set_stream(engine, std::sync::Arc::new(())) }?;
            }
            let x = GpuTensor::<Host>::from_host(&xs[rank], 0)?;
            let out = GpuTensor::<Host>::zeros(c.context(), DType::F32, want.shape())?;
            take_fences();
            {
                let (xb, ob) = (x.nbytes(), out.nbytes());
                // SAFETY: the tensors hold these bytes, alive and otherwise unused meanwhile.
                let v = unsafe {
                    GpuView::from_raw_parts(&**c.context(), x.ptr(), xb, DType::F32, &shape, engine)
                }?;
                let os = want.shape().to_vec();
                // SAFETY: as above.
                let mut o = unsafe {
                    GpuViewMut::from_raw_parts(
                        &**c.context(),
                        out.ptr(),
                        ob,
                        DType::F32,
                        &os,
                        engine,
                    )
                }?;
                c.all_gather_into(&v, &mut o, 1)?;
            }
            // The log is the process's: this rank's engine stream is its own to look for. It
            // waits for the op when the communicator is elsewhere, never when it is there.
            let waits = take_fences()
                .iter()
                .filter(|f| **f == (false, id(engine)))
                .count();
            checks.push((out.to_host()? == want, waits == usize::from(round == 0)));
        }
        c.reset_stream()?;
        c.destroy()?;
        Ok::<_, dist_core::Error>(checks)
    });
    for x in r {
        assert_eq!(
            x.expect("rank thread").expect("rank"),
            vec![(true, true), (true, true)]
        );
    }
}
