//! The tensor-parallel MLP at TP 1, 2 and 4 (ranks as threads) equals the single-process result.

use std::time::Duration;

use dist_core::host_comm::HostBackend;
use dist_core::local::{run_threads, ThreadGroupFactory};
use dist_core::{DType, Device, HostTensor, ParallelConfig, ParallelState, WorldInfo};

#[test]
fn tp_output_equals_single_process() {
    let (hidden, ffn, tokens) = (16, 64, 5);
    let x = HostTensor::random(DType::F32, &[tokens, hidden], 42);
    let want = tp_mlp::single_process(hidden, ffn, &x).unwrap();
    for tp in [1, 2, 4] {
        let factories = ThreadGroupFactory::for_job(tp);
        let out = run_threads(tp, Duration::from_secs(30), |rank, _| {
            let world = WorldInfo {
                rank,
                world_size: tp,
                local_rank: rank,
                device: Device::CPU,
                timeout: Duration::from_secs(30),
            };
            let cfg = ParallelConfig {
                tp,
                ..ParallelConfig::new(tp)
            };
            let state =
                ParallelState::<HostBackend>::initialize(&world, &factories[rank], cfg).unwrap();
            let mlp = tp_mlp::TpMlp::new(hidden, ffn, state.tp().rank_in_group(), tp).unwrap();
            mlp.forward(state.tp(), &x).unwrap()
        });
        for o in out {
            let got = o.unwrap();
            let (g, w) = (
                got.as_slice::<f32>().unwrap(),
                want.as_slice::<f32>().unwrap(),
            );
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "tp={tp}: {a} vs {b}"
                );
            }
        }
    }
}
