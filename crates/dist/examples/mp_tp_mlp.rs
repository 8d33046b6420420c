//! The tensor-parallel MLP of `examples/tp-mlp` (a model crate that depends on `dist-core` only),
//! run by real processes on the CPU backend: the output on every rank equals the single-process result.

use dist::{DType, DistEnv, HostTensor, InitOptions, ParallelConfig};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1,2,4");
        return;
    }
    let env = DistEnv::init(&InitOptions::default()).expect("init");
    let tp = env.world().world_size;
    let state = env
        .initialize_model_parallel::<dist::DefaultBackend>(ParallelConfig {
            tp,
            ..ParallelConfig::new(tp)
        })
        .expect("groups");
    let (hidden, ffn, tokens) = (32, 128, 7);
    let x = HostTensor::random(DType::F32, &[tokens, hidden], 3);
    let mlp = tp_mlp::TpMlp::new(hidden, ffn, state.tp().rank_in_group(), tp).expect("shard");
    let got = mlp.forward(state.tp(), &x).expect("forward");
    let want = tp_mlp::single_process(hidden, ffn, &x).expect("reference");
    let bad = got
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .zip(want.as_slice::<f32>().unwrap())
        .filter(|(a, b)| {
            // a NaN difference is a mismatch too
            let d = (**a - **b).abs();
            d.is_nan() || d > 1e-5 * (1.0 + b.abs())
        })
        .count();
    if bad > 0 {
        eprintln!(
            "rank {}: {bad} outputs differ from the single-process MLP",
            env.world().rank
        );
        std::process::exit(1);
    }
    if env.world().rank == 0 {
        println!("mp_tp_mlp: tp={tp}: output equals the single-process result");
    }
}
