//! GroupCoordinator and ParallelState with ranks as threads, over the host-group communicator:
//! vLLM's `test_comm_ops.py` cases (TP=2, PP=2, TP=2×PP=2) against the oracles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dist_core::conformance::{check_all, compare, Suite};
use dist_core::host_comm::{HostBackend, HostCommunicator};
use dist_core::local::{run_threads, ThreadGroupFactory};
use dist_core::{
    reference, DType, Device, DictValue, HostTensor, ParallelConfig, ParallelState, Value,
    WorldInfo,
};

const T: Duration = Duration::from_secs(30);

#[test]
fn host_communicator_conformance() {
    for world in [1, 2, 3, 4] {
        let out = run_threads(world, T, |_, g| {
            let comm = HostCommunicator::new(Arc::new(g), T);
            let mut suite = Suite::quick(true);
            suite.lengths = vec![0, 1, 7, 1000];
            check_all::<HostBackend>(&comm, &suite)
        });
        for (r, o) in out.into_iter().enumerate() {
            let n = o
                .expect("no panic")
                .unwrap_or_else(|e| panic!("world {world} rank {r}: {e}"));
            assert!(n > 100, "only {n} checks ran");
        }
    }
}

fn state(rank: usize, f: &ThreadGroupFactory, cfg: ParallelConfig) -> ParallelState<HostBackend> {
    let world = WorldInfo {
        rank,
        world_size: cfg.world_size,
        local_rank: rank,
        device: Device::CPU,
        timeout: T,
    };
    ParallelState::initialize(&world, f, cfg).unwrap()
}

fn cfg(world: usize, tp: usize, pp: usize) -> ParallelConfig {
    ParallelConfig {
        world_size: world,
        tp,
        pp,
        dp: 1,
        pcp: 1,
        dcp: 1,
        ep: false,
    }
}

#[test]
fn tp_all_reduce_and_all_gather_every_dim() {
    for (world, tp, pp) in [(2, 2, 1), (4, 2, 2), (4, 4, 1)] {
        let c = cfg(world, tp, pp);
        let layout = c.layout().unwrap();
        let factories = ThreadGroupFactory::for_job(world);
        let out = run_threads(world, T, |rank, _| {
            let s = state(rank, &factories[rank], c);
            let tpg = s.tp().clone();
            assert_eq!(tpg.ranks(), layout.group_of("tp", rank).unwrap());
            assert_eq!(s.pp().ranks(), layout.group_of("pp", rank).unwrap());
            // all_reduce: rank r's tensor is seeded by its global rank
            let inputs: Vec<HostTensor> = tpg
                .ranks()
                .iter()
                .map(|&g| HostTensor::random(DType::F32, &[3, 5], 100 + g as u64))
                .collect();
            let mine = inputs[tpg.rank_in_group()].clone();
            let got = tpg.all_reduce(mine.clone()).unwrap();
            compare(
                "tp all_reduce",
                &reference::all_reduce(&inputs, dist_core::ReduceOp::Sum).unwrap(),
                &got,
                true,
            )
            .unwrap();
            // all_gather along each dim of a 3-D tensor
            let inputs3: Vec<HostTensor> = tpg
                .ranks()
                .iter()
                .map(|&g| HostTensor::random(DType::BF16, &[2, 3, 4], 200 + g as u64))
                .collect();
            for dim in [-3isize, -2, -1, 0, 1, 2] {
                let got = tpg
                    .all_gather(inputs3[tpg.rank_in_group()].clone(), dim)
                    .unwrap();
                compare(
                    "tp all_gather",
                    &reference::all_gather(&inputs3, dim).unwrap(),
                    &got,
                    true,
                )
                .unwrap();
            }
            s.destroy().unwrap();
            assert!(
                tpg.all_reduce(mine).is_err(),
                "a destroyed group must refuse work"
            );
        });
        for o in out {
            o.unwrap();
        }
    }
}

fn sample_dict(rank: usize) -> Vec<(String, DictValue<HostTensor>)> {
    let mut nested = BTreeMap::new();
    nested.insert("a".to_string(), Value::Int(1));
    nested.insert(
        "b".to_string(),
        Value::List(vec![Value::Str("x".into()), Value::Null]),
    );
    vec![
        (
            "hidden".into(),
            DictValue::Tensor(HostTensor::random(DType::F16, &[4, 6], 7 + rank as u64)),
        ),
        (
            "ids".into(),
            DictValue::Tensor(HostTensor::random(DType::I64, &[5], 9)),
        ),
        (
            "empty".into(),
            DictValue::Tensor(HostTensor::zeros(DType::F32, &[0, 8])),
        ),
        ("name".into(), DictValue::Value(Value::Str("step-3".into()))),
        (
            "list".into(),
            DictValue::Value(Value::List(vec![Value::Int(1), Value::Float(2.5)])),
        ),
        ("nested".into(), DictValue::Value(Value::Map(nested))),
        (
            "odd".into(),
            DictValue::Tensor(HostTensor::random(DType::BF16, &[7], 11)),
        ),
    ]
}

fn assert_dict_eq(a: &[(String, DictValue<HostTensor>)], b: &[(String, DictValue<HostTensor>)]) {
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        match (va, vb) {
            (DictValue::Tensor(x), DictValue::Tensor(y)) => compare(ka, x, y, true).unwrap(),
            (DictValue::Value(x), DictValue::Value(y)) => assert_eq!(x, y, "{ka}"),
            _ => panic!("{ka}: kinds differ"),
        }
    }
}

#[test]
fn tensor_dicts_broadcast_and_pp_send_with_all_gather_group() {
    let (world, tp, pp) = (4, 2, 2);
    let c = cfg(world, tp, pp);
    let factories = ThreadGroupFactory::for_job(world);
    let out = run_threads(world, T, |rank, _| {
        let s = state(rank, &factories[rank], c);
        let (tpg, ppg) = (s.tp(), s.pp());
        // broadcast_tensor_dict over TP from group rank 1
        let src = 1;
        let src_global = tpg.ranks()[src];
        let d = (tpg.rank_in_group() == src).then(|| sample_dict(src_global));
        let got = tpg.broadcast_tensor_dict(d, src).unwrap();
        assert_dict_eq(&got, &sample_dict(src_global));
        // PP: stage 0 sends to stage 1, with and without the TP all-gather optimisation
        for use_ag in [false, true] {
            let ag = use_ag.then_some(tpg.as_ref());
            if ppg.rank_in_group() == 0 {
                // every TP rank of the sending stage holds the same full tensors
                ppg.send_tensor_dict(&sample_dict(0), None, ag, None)
                    .unwrap();
            } else {
                let got = ppg.recv_tensor_dict(None, ag).unwrap();
                assert_dict_eq(&got, &sample_dict(0));
            }
        }
        // send/recv of a single tensor and an object along PP
        if ppg.is_first_rank() {
            ppg.send(&HostTensor::random(DType::I32, &[9], 5), None)
                .unwrap();
            ppg.send_object(&("meta", 42u32), 1).unwrap();
        } else {
            let t = ppg.recv(DType::I32, &[9], None).unwrap();
            compare(
                "pp recv",
                &HostTensor::random(DType::I32, &[9], 5),
                &t,
                true,
            )
            .unwrap();
            let o: (String, u32) = ppg.recv_object(0).unwrap();
            assert_eq!(o, ("meta".to_string(), 42));
        }
        // broadcast_object over the world group from the last rank
        let v = vec![1u64, 2, 3];
        let w = s.world();
        let got: Vec<u64> = w
            .broadcast_object((w.rank_in_group() == 3).then_some(&v), 3)
            .unwrap();
        assert_eq!(got, v);
        w.barrier().unwrap();
        // MoE dispatch/combine over the world group's peers: sizes per rank
        let sizes = [1usize, 0, 3, 2];
        let tpg2 = s.tp();
        let tp_sizes = [sizes[tpg2.ranks()[0]], sizes[tpg2.ranks()[1]]];
        let hs: Vec<HostTensor> = tpg2
            .ranks()
            .iter()
            .map(|&g| HostTensor::random(DType::F32, &[sizes[g], 4], 50 + g as u64))
            .collect();
        let lg: Vec<HostTensor> = tpg2
            .ranks()
            .iter()
            .map(|&g| HostTensor::random(DType::F32, &[sizes[g], 2], 60 + g as u64))
            .collect();
        let me = tpg2.rank_in_group();
        let (h, l) = tpg2
            .dispatch(hs[me].clone(), lg[me].clone(), &tp_sizes)
            .unwrap();
        compare(
            "dispatch hidden",
            &reference::all_gatherv(&hs, 0, &tp_sizes).unwrap(),
            &h,
            true,
        )
        .unwrap();
        compare(
            "dispatch logits",
            &reference::all_gatherv(&lg, 0, &tp_sizes).unwrap(),
            &l,
            true,
        )
        .unwrap();
        let total: usize = tp_sizes.iter().sum();
        let full: Vec<HostTensor> = tpg2
            .ranks()
            .iter()
            .map(|&g| HostTensor::random(DType::F32, &[total, 4], 70 + g as u64))
            .collect();
        let back = tpg2.combine(full[me].clone(), &tp_sizes).unwrap();
        let want =
            reference::reduce_scatterv(&full, 0, &tp_sizes, dist_core::ReduceOp::Sum).unwrap();
        compare("combine", &want[me], &back, true).unwrap();
        // graph_capture is a plain scope on the host
        assert_eq!(tpg2.graph_capture(|| Ok(5)).unwrap(), 5);
        s.destroy().unwrap();
    });
    for o in out {
        o.unwrap();
    }
}

#[test]
fn destroy_then_reinitialise_gets_new_unique_names() {
    let world = 2;
    let c = cfg(world, 2, 1);
    let factories = ThreadGroupFactory::for_job(world);
    let out = run_threads(world, T, |rank, _| {
        let a = state(rank, &factories[rank], c);
        let name_a = a.tp().unique_name().to_string();
        a.destroy().unwrap();
        let b = state(rank, &factories[rank], c);
        assert_ne!(b.tp().unique_name(), name_a);
        let x = HostTensor::from_vec(&[2], vec![rank as i32, 1]).unwrap();
        let y = b.tp().all_reduce(x).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, 2]);
    });
    for o in out {
        o.unwrap();
    }
}

#[test]
fn mismatch_detector_names_the_odd_rank() {
    let world = 3;
    let c = cfg(world, 3, 1);
    let factories: Vec<ThreadGroupFactory> = ThreadGroupFactory::for_job(world)
        .into_iter()
        .map(|f| f.with_check_collectives())
        .collect();
    let out = run_threads(world, T, |rank, _| {
        let s = state(rank, &factories[rank], c);
        let tpg = s.tp();
        // agreeing calls pass
        tpg.all_reduce(HostTensor::zeros(DType::F32, &[4])).unwrap();
        // rank 2 passes a different size: every rank gets an error naming it, nobody hangs
        let n = if rank == 2 { 8 } else { 4 };
        let e = tpg
            .all_reduce(HostTensor::zeros(DType::F32, &[n]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 called #2 all_reduce f32 [8]"), "{e}");
        // rank 1 calls a different collective
        let x = HostTensor::zeros(DType::F32, &[3]);
        let e = if rank == 1 {
            tpg.all_gather(x, 0).unwrap_err()
        } else {
            tpg.all_reduce(x).unwrap_err()
        };
        assert!(e.to_string().contains("rank 1 called #3 all_gather"), "{e}");
    });
    for o in out {
        o.unwrap();
    }
}
