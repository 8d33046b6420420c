//! Multi-process test of the coordinator on the CPU backend, mirroring vLLM's
//! `tests/distributed/test_comm_ops.py`: TP all_reduce and all_gather along each dim of a 3-D
//! tensor, broadcast_tensor_dict and PP send/recv_tensor_dict (with and without the all-gather
//! group) of a dict mixing dtypes, an empty tensor, a string, a list and a nested map;
//! patch_tensor_parallel_group; in_the_same_node_as; destroy and re-initialise in one process.
//!
//! Run under `dist run --nproc-per-node N` (N in `--worlds`); each layout that divides N runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use dist::core::conformance::compare;
use dist::core::parallel_state as ps;
use dist::{
    in_the_same_node_as, node_count, reference, DType, DictValue, DistEnv, HostTensor,
    ParallelConfig, ReduceOp, Value,
};

mod common;

use common::B;

fn sample_dict(tag: u64) -> Vec<(String, DictValue<HostTensor>)> {
    let mut nested = BTreeMap::new();
    nested.insert(
        "k".to_string(),
        Value::List(vec![Value::Int(3), Value::Str("v".into())]),
    );
    nested.insert("flag".to_string(), Value::Bool(true));
    vec![
        (
            "a".into(),
            DictValue::Tensor(HostTensor::random(DType::F32, &[8, 4], tag)),
        ),
        (
            "b".into(),
            DictValue::Tensor(HostTensor::random(DType::BF16, &[6], tag + 1)),
        ),
        ("c".into(), DictValue::Value(Value::Str("test".into()))),
        (
            "d".into(),
            DictValue::Value(Value::List(vec![
                Value::Int(1),
                Value::Int(2),
                Value::Int(3),
            ])),
        ),
        ("e".into(), DictValue::Value(Value::Map(nested))),
        (
            "f".into(),
            DictValue::Tensor(HostTensor::zeros(DType::F16, &[0])),
        ),
        (
            "g".into(),
            DictValue::Tensor(HostTensor::random(DType::I64, &[3, 5], tag + 2)),
        ),
    ]
}

fn same_dict(
    a: &[(String, DictValue<HostTensor>)],
    b: &[(String, DictValue<HostTensor>)],
) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("dict sizes {} vs {}", a.len(), b.len()));
    }
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        if ka != kb {
            return Err(format!("key {ka} vs {kb}"));
        }
        match (va, vb) {
            (DictValue::Tensor(x), DictValue::Tensor(y)) => {
                compare(ka, x, y, true).map_err(|e| e.to_string())?
            }
            (DictValue::Value(x), DictValue::Value(y)) if x == y => {}
            _ => return Err(format!("{ka}: values differ")),
        }
    }
    Ok(())
}

fn check_layout(env: &DistEnv, tp: usize, pp: usize) -> Result<(), Box<dyn std::error::Error>> {
    let world = env.world().world_size;
    let rank = env.world().rank;
    let cfg = ParallelConfig {
        tp,
        pp,
        ..ParallelConfig::new(world)
    };
    let state = Arc::new(env.initialize_model_parallel::<B>(cfg)?);
    let layout = cfg.layout()?;
    let tpg = state.tp().clone();
    let ppg = state.pp().clone();
    assert_eq!(tpg.ranks(), layout.group_of("tp", rank).unwrap());
    assert_eq!(ppg.ranks(), layout.group_of("pp", rank).unwrap());

    // all_reduce: each rank's input seeded by its global rank
    let inputs: Vec<HostTensor> = tpg
        .ranks()
        .iter()
        .map(|&g| HostTensor::random(DType::F32, &[16, 3], g as u64))
        .collect();
    let got = tpg.all_reduce(inputs[tpg.rank_in_group()].clone())?;
    compare(
        "tp all_reduce",
        &reference::all_reduce(&inputs, ReduceOp::Sum)?,
        &got,
        true,
    )?;
    // all_gather along every dim of a 3-D tensor
    let in3: Vec<HostTensor> = tpg
        .ranks()
        .iter()
        .map(|&g| HostTensor::random(DType::F16, &[2, 3, 5], 100 + g as u64))
        .collect();
    for dim in -3isize..3 {
        let got = tpg.all_gather(in3[tpg.rank_in_group()].clone(), dim)?;
        compare(
            &format!("tp all_gather dim {dim}"),
            &reference::all_gather(&in3, dim)?,
            &got,
            true,
        )?;
    }
    // reduce_scatter along the last dim
    let inrs: Vec<HostTensor> = tpg
        .ranks()
        .iter()
        .map(|&g| HostTensor::random(DType::F32, &[3, 2 * tp], 200 + g as u64))
        .collect();
    let got = tpg.reduce_scatter(inrs[tpg.rank_in_group()].clone(), -1)?;
    compare(
        "tp reduce_scatter",
        &reference::reduce_scatter(&inrs, -1, ReduceOp::Sum)?[tpg.rank_in_group()],
        &got,
        true,
    )?;

    // broadcast_tensor_dict over TP (through the MessageQueue broadcaster when TP > 1)
    if tp > 1 && !tpg.has_mq_broadcaster() {
        return Err("the TP group should carry a MessageQueue broadcaster".into());
    }
    let d = (tpg.rank_in_group() == 0).then(|| sample_dict(7));
    let got = tpg.broadcast_tensor_dict(d, 0)?;
    same_dict(&got, &sample_dict(7))?;
    // and from the last rank (host-group path)
    let last = tpg.world_size() - 1;
    let d = (tpg.rank_in_group() == last).then(|| sample_dict(9));
    same_dict(&tpg.broadcast_tensor_dict(d, last)?, &sample_dict(9))?;

    // PP: each stage sends to the next, with and without the TP all-gather optimisation
    if pp > 1 {
        for ag in [None, Some(tpg.as_ref())] {
            let stage = ppg.rank_in_group();
            if stage + 1 < pp {
                ppg.send_tensor_dict(&sample_dict(30 + stage as u64), Some(stage + 1), ag, None)?;
            }
            if stage > 0 {
                let got = ppg.recv_tensor_dict(Some(stage - 1), ag)?;
                same_dict(&got, &sample_dict(30 + stage as u64 - 1))?;
            }
        }
        // plain tensor send/recv along the ring
        let t = HostTensor::random(DType::I32, &[11], 500 + rank as u64);
        let stage = ppg.rank_in_group();
        let recv_checked = || -> Result<(), Box<dyn std::error::Error>> {
            let got = ppg.recv(DType::I32, &[11], None)?;
            let want = HostTensor::random(DType::I32, &[11], 500 + ppg.prev_rank() as u64);
            Ok(compare("pp recv", &want, &got, true)?)
        };
        // Even stages send first, odd ones receive first, so that the ring never waits on itself.
        if stage % 2 == 0 {
            ppg.send(&t, None)?;
            recv_checked()?;
        } else {
            recv_checked()?;
            ppg.send(&t, None)?;
        }
    }

    // the process-wide handle and patch_tensor_parallel_group
    ps::set_global(state.clone())?;
    assert_eq!(ps::get_tensor_model_parallel_world_size::<B>()?, tp);
    {
        let world_group = state.world().clone();
        let _guard = ps::patch_tensor_parallel_group(world_group)?;
        assert_eq!(ps::get_tensor_model_parallel_world_size::<B>()?, world);
        assert!(
            ps::patch_tensor_parallel_group(state.tp().clone()).is_err(),
            "patching twice must fail"
        );
    }
    assert_eq!(ps::get_tensor_model_parallel_world_size::<B>()?, tp);
    let x = HostTensor::from_vec(&[1], vec![1.0f32])?;
    let y = ps::tensor_model_parallel_all_reduce::<B>(x)?;
    assert_eq!(y.as_slice::<f32>()?, &[tp as f32]);
    ps::destroy_model_parallel::<B>()?;
    assert!(!ps::model_parallel_is_initialized());
    Ok(())
}

fn main() {
    if common::answered_worlds("1,2,4,8") {
        return;
    }
    let env = common::init_env();
    let world = env.world().world_size;
    let mut layouts = vec![(world, 1), (1, world)];
    if world >= 4 && world % 4 == 0 {
        layouts.push((2, world / 2));
        layouts.push((world / 2, 2));
    }
    layouts.dedup();
    for (tp, pp) in layouts {
        // destroy and re-initialise in the same process: every layout builds fresh groups
        if let Err(e) = check_layout(&env, tp, pp) {
            eprintln!("rank {} tp={tp} pp={pp}: FAILED: {e}", env.world().rank);
            std::process::exit(1);
        }
    }
    let same = in_the_same_node_as(env.world_group().as_ref(), 0).unwrap();
    assert_eq!(same, vec![true; world]);
    assert_eq!(node_count(env.world_group().as_ref()).unwrap(), 1);
    let rank = env.world().rank;
    if let Err(e) = env.destroy::<B>() {
        eprintln!("rank {rank}: destroy_distributed_environment failed: {e}");
        std::process::exit(1);
    }
    if rank == 0 {
        println!("mp_coordinator: world {world}: all layouts passed");
    }
}
