//! GroupCoordinator on memory the caller owns: an engine's `Vec<f32>`s lent as views to every
//! collective, the tensor-dict protocol from and into views, all-to-all-v with counts exchanged,
//! grouped point-to-point, and misuse as typed errors. Ranks as threads over the host-group
//! communicator; results against the oracles.

use std::collections::BTreeMap;
use std::time::Duration;

use dist_core::communicator::P2pOp;
use dist_core::host_comm::HostBackend;
use dist_core::local::{run_threads, ThreadGroupFactory};
use dist_core::{
    reference, DType, Device, DictValue, Error, HostTensor, HostView, HostViewMut, ParallelConfig,
    ParallelState, ReduceOp, Value, WorldInfo,
};

const T: Duration = Duration::from_secs(30);

fn state(
    rank: usize,
    f: &ThreadGroupFactory,
    world: usize,
    tp: usize,
) -> ParallelState<HostBackend> {
    let info = WorldInfo {
        rank,
        world_size: world,
        local_rank: rank,
        device: Device::CPU,
        timeout: T,
    };
    let cfg = ParallelConfig {
        tp,
        pp: world / tp,
        ..ParallelConfig::new(world)
    };
    ParallelState::initialize(&info, f, cfg).unwrap()
}

/// Rank `r`'s engine data: `len` f32s from a seed.
fn data(r: usize, len: usize, tag: u64) -> Vec<f32> {
    HostTensor::random(DType::F32, &[len], tag * 1000 + r as u64)
        .to_vec::<f32>()
        .unwrap()
}

fn tensors(n: usize, shape: &[usize], tag: u64) -> Vec<HostTensor> {
    let len = shape.iter().product();
    (0..n)
        .map(|r| HostTensor::from_vec(shape, data(r, len, tag)).unwrap())
        .collect()
}

fn run(world: usize, tp: usize, f: impl Fn(usize, ParallelState<HostBackend>) + Sync) {
    let factories = ThreadGroupFactory::for_job(world);
    let out = run_threads(world, T, |rank, _| {
        f(rank, state(rank, &factories[rank], world, tp))
    });
    for (r, o) in out.into_iter().enumerate() {
        o.unwrap_or_else(|_| panic!("rank {r} panicked"));
    }
}

#[test]
fn engine_slices_through_every_collective() {
    run(4, 4, |rank, s| {
        let g = s.tp();
        let n = g.world_size();
        let shape = [2usize, 6];
        let ins = tensors(n, &shape, 1);
        // all_reduce in place on the engine's Vec.
        let mut mine = data(rank, 12, 1);
        g.all_reduce_in_place(&mut HostViewMut::new(&mut mine, &shape).unwrap())
            .unwrap();
        let want = reference::all_reduce(&ins, ReduceOp::Sum).unwrap();
        assert_eq!(mine, want.to_vec::<f32>().unwrap());
        // all_reduce into another Vec; the input is untouched.
        let input = data(rank, 12, 1);
        let mut out = vec![f32::NAN; 12];
        g.all_reduce_into(
            &HostView::new(&input, &shape).unwrap(),
            &mut HostViewMut::new(&mut out, &shape).unwrap(),
        )
        .unwrap();
        assert_eq!(out, want.to_vec::<f32>().unwrap());
        assert_eq!(input, data(rank, 12, 1));
        // all_gather / reduce_scatter along dim 1 into caller buffers.
        let mut gathered = vec![f32::NAN; 12 * n];
        g.all_gather_into(
            &HostView::new(&input, &shape).unwrap(),
            &mut HostViewMut::new(&mut gathered, &[2, 6 * n]).unwrap(),
            1,
        )
        .unwrap();
        assert_eq!(
            gathered,
            reference::all_gather(&ins, 1)
                .unwrap()
                .to_vec::<f32>()
                .unwrap()
        );
        let rs_ins = tensors(n, &[2, 4 * n], 2);
        let mut part = vec![f32::NAN; 8];
        g.reduce_scatter_into(
            &rs_ins[rank].view(),
            &mut HostViewMut::new(&mut part, &[2, 4]).unwrap(),
            1,
        )
        .unwrap();
        let rs_want = reference::reduce_scatter(&rs_ins, 1, ReduceOp::Sum).unwrap();
        assert_eq!(part, rs_want[rank].to_vec::<f32>().unwrap());
        // gather to rank 2: only it passes an output.
        let mut at2 = vec![f32::NAN; 12 * n];
        let mut ov = HostViewMut::new(&mut at2, &[2 * n, 6]).unwrap();
        g.gather_into(
            &HostView::new(&input, &shape).unwrap(),
            (rank == 2).then_some(&mut ov),
            2,
            0,
        )
        .unwrap();
        if rank == 2 {
            assert_eq!(
                at2,
                reference::all_gather(&ins, 0)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap()
            );
        }
        // broadcast from rank 3 in place.
        let mut b = data(rank, 12, 1);
        g.broadcast_in_place(&mut HostViewMut::from_slice(&mut b), 3)
            .unwrap();
        assert_eq!(b, data(3, 12, 1));
        // send/recv around the ring, the receiver's buffer its own.
        let mut got = vec![0f32; 12];
        if rank % 2 == 0 {
            g.send_view(&HostView::from_slice(&input), None).unwrap();
            g.recv_into(&mut HostViewMut::from_slice(&mut got), None)
                .unwrap();
        } else {
            g.recv_into(&mut HostViewMut::from_slice(&mut got), None)
                .unwrap();
            g.send_view(&HostView::from_slice(&input), None).unwrap();
        }
        assert_eq!(got, data((rank + n - 1) % n, 12, 1));
    });
}

#[test]
fn all_to_all_v_exchanges_counts_and_rows() {
    run(4, 4, |rank, s| {
        let g = s.tp();
        let n = g.world_size();
        // Rank s sends (s + d) % 3 rows of 5 to rank d.
        let counts: Vec<Vec<usize>> = (0..n)
            .map(|s| (0..n).map(|d| (s + d) % 3).collect())
            .collect();
        let ins: Vec<HostTensor> = (0..n)
            .map(|s| {
                let rows: usize = counts[s].iter().sum();
                HostTensor::from_vec(&[rows, 5], data(s, rows * 5, 3)).unwrap()
            })
            .collect();
        let want = reference::all_to_all_v(&ins, &counts).unwrap();
        let (out, recv) = g.all_to_all_v(&ins[rank].view(), &counts[rank]).unwrap();
        assert_eq!(recv, (0..n).map(|s| counts[s][rank]).collect::<Vec<_>>());
        assert_eq!(out, want[rank]);
        // The same into the caller's buffer.
        let mut buf = vec![f32::NAN; want[rank].numel()];
        let shape = want[rank].shape().to_vec();
        g.all_to_all_v_into(
            &ins[rank].view(),
            &counts[rank],
            &mut HostViewMut::new(&mut buf, &shape).unwrap(),
            &recv,
        )
        .unwrap();
        assert_eq!(buf, want[rank].to_vec::<f32>().unwrap());
    });
}

#[test]
fn batch_send_recv_moves_a_full_mesh() {
    run(3, 3, |rank, s| {
        let g = s.tp();
        let n = g.world_size();
        let msg = |src: usize, dst: usize| data(src * 10 + dst, 100 + src * 7 + dst, 4);
        let peers: Vec<usize> = (0..n).filter(|&p| p != rank).collect();
        let sends: Vec<Vec<f32>> = peers.iter().map(|&p| msg(rank, p)).collect();
        let mut recvs: Vec<Vec<f32>> = peers
            .iter()
            .map(|&p| vec![0f32; msg(p, rank).len()])
            .collect();
        let sv: Vec<HostView<'_>> = sends.iter().map(|v| HostView::from_slice(v)).collect();
        let mut rv: Vec<HostViewMut<'_>> = recvs
            .iter_mut()
            .map(|v| HostViewMut::from_slice(v))
            .collect();
        let mut ops: Vec<P2pOp<'_, HostView<'_>, HostViewMut<'_>>> = rv
            .iter_mut()
            .zip(&peers)
            .map(|(v, &p)| P2pOp::Recv(v, p))
            .collect();
        ops.extend(sv.iter().zip(&peers).map(|(v, &p)| P2pOp::Send(v, p)));
        g.batch_send_recv(&mut ops).unwrap();
        drop(ops);
        drop(rv);
        for (v, &p) in recvs.iter().zip(&peers) {
            assert_eq!(*v, msg(p, rank));
        }
    });
}

#[test]
fn misuse_is_a_typed_error_before_anything_moves() {
    run(2, 2, |rank, s| {
        let g = s.tp();
        let x = vec![1f32; 6];
        // A length that does not match the shape.
        assert!(matches!(
            HostView::new(&x, &[4, 2]),
            Err(Error::InvalidArgument(_))
        ));
        // An output of the wrong shape or dtype: every rank fails at once, nobody hangs.
        let mut small = vec![0f32; 6];
        let e = g
            .all_gather_into(
                &HostView::from_slice(&x),
                &mut HostViewMut::from_slice(&mut small),
                0,
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let mut ints = vec![0i32; 6];
        let e = g
            .all_reduce_into(
                &HostView::from_slice(&x),
                &mut HostViewMut::from_slice(&mut ints),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        // A gather output passed by a rank that is not the destination.
        let mut out = vec![0f32; 12];
        let mut ov = HostViewMut::from_slice(&mut out);
        let e = g
            .gather_into(&HostView::from_slice(&x), Some(&mut ov), 1 - rank, 0)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        // Counts that do not sum to the rows.
        let e = g
            .all_to_all_v_into(&HostView::from_slice(&x), &[1, 1], &mut ov, &[6, 6])
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        // Everyone is still in step after the refusals.
        let mut y = vec![rank as f32; 3];
        g.all_reduce_in_place(&mut HostViewMut::from_slice(&mut y))
            .unwrap();
        assert_eq!(y, vec![1.0; 3]);
    });
}

#[test]
fn tensor_dicts_from_views_into_views() {
    // TP 2 × PP 2: stage 0 sends its hidden states (the same on every TP rank, as after a TP
    // all-reduce) as views, each TP rank only its slice; stage 1 receives into buffers it owns.
    run(4, 2, |rank, s| {
        let pp = s.pp();
        let tp = s.tp();
        let hidden = |_: usize| data(0, 24, 5);
        if pp.is_first_rank() {
            let h = hidden(rank);
            let res = data(7, 6, 6);
            let dict = vec![
                (
                    "hidden".to_string(),
                    DictValue::Tensor(HostView::new(&h, &[4, 6]).unwrap()),
                ),
                (
                    "residual".to_string(),
                    DictValue::Tensor(HostView::new(&res, &[6]).unwrap()),
                ),
                ("step".to_string(), DictValue::Value(Value::Int(41))),
            ];
            let mut over = BTreeMap::new();
            over.insert("residual".to_string(), false);
            pp.send_tensor_dict_views(&dict, None, Some(tp), Some(&over))
                .unwrap();
            // Second round: the receiver gives no output for "hidden" and must say so.
            pp.send_tensor_dict_views(&dict[..1], None, Some(tp), None)
                .unwrap();
        } else {
            let mut h = vec![f32::NAN; 24];
            let mut res = vec![f32::NAN; 6];
            let values = {
                let mut outs = [
                    ("hidden", HostViewMut::new(&mut h, &[4, 6]).unwrap()),
                    ("residual", HostViewMut::new(&mut res, &[6]).unwrap()),
                ];
                pp.recv_tensor_dict_into(None, Some(tp), &mut outs).unwrap()
            };
            assert_eq!(h, hidden(rank));
            assert_eq!(res, data(7, 6, 6));
            assert_eq!(values, vec![("step".to_string(), Value::Int(41))]);
            let mut wrong = vec![0f32; 24];
            let mut outs = [("other", HostViewMut::new(&mut wrong, &[4, 6]).unwrap())];
            let e = pp
                .recv_tensor_dict_into(None, Some(tp), &mut outs)
                .unwrap_err();
            assert!(e.to_string().contains("'hidden'"), "{e}");
        }
    });
}

#[test]
fn a_one_rank_group_copies_into_outputs() {
    run(1, 1, |_, s| {
        let g = s.tp();
        let x = data(0, 6, 8);
        let mut out = vec![0f32; 6];
        g.all_gather_into(
            &HostView::new(&x, &[2, 3]).unwrap(),
            &mut HostViewMut::new(&mut out, &[2, 3]).unwrap(),
            1,
        )
        .unwrap();
        assert_eq!(out, x);
        let mut y = x.clone();
        g.all_reduce_in_place(&mut HostViewMut::from_slice(&mut y))
            .unwrap();
        assert_eq!(y, x);
    });
}
