//! Every collective of the shared-memory communicator against the `dist_core::reference` oracles,
//! on random data, with ranks as threads: world sizes 1, 2, 3, 4, 8, every dtype, lengths 0, 1,
//! 7, 4 KiB and 1 MiB + 3 elements, several dims, chunks much smaller than the tensors.
//! (64 MiB and real processes: `examples/mp_cpu_collectives.rs`.)

use std::time::Duration;

use dist_core::local::run_threads;
use dist_core::{reference, DType, DeviceCommunicator, Error, HostTensor, ReduceOp};
use dist_cpu::{ShmCommunicator, ShmConfig};

const T: Duration = Duration::from_secs(60);

/// Small halves and slots so that every size above a few KiB is chunked and double-buffered.
fn small_cfg() -> Option<ShmConfig> {
    Some(ShmConfig {
        half_bytes: 8192,
        slot_bytes: 512,
        threads: 1,
    })
}

fn inputs(dtype: DType, shape: &[usize], world: usize, seed: u64) -> Vec<HostTensor> {
    (0..world)
        .map(|r| HostTensor::random(dtype, shape, seed * 1000 + r as u64))
        .collect()
}

/// Ranks as threads, each with its own communicator over an in-process host group.
fn with_comms<R: Send>(
    world: usize,
    cfg: Option<ShmConfig>,
    f: impl Fn(usize, &ShmCommunicator) -> R + Sync,
) -> Vec<R> {
    run_threads(world, T, |r, g| {
        let c = ShmCommunicator::with_config(&g, &format!("test-w{world}"), T, cfg).unwrap();
        f(r, &c)
    })
    .into_iter()
    .enumerate()
    .map(|(r, x)| x.unwrap_or_else(|_| panic!("rank {r} panicked")))
    .collect()
}

fn sizes_1d(dtype: DType) -> Vec<usize> {
    vec![0, 1, 7, 4096 / dtype.size()]
}

#[test]
fn all_reduce_every_dtype_op_and_world() {
    for world in [1, 2, 3, 4, 8] {
        with_comms(world, small_cfg(), |r, c| {
            for (i, dtype) in DType::ALL.iter().copied().enumerate() {
                for len in sizes_1d(dtype) {
                    let ins = inputs(dtype, &[len], world, i as u64);
                    for (k, op) in ReduceOp::ALL.iter().copied().enumerate() {
                        if !dtype.is_reducible() {
                            let e = c.all_reduce(&ins[r], op).unwrap_err();
                            assert!(matches!(e, Error::Unsupported(_)), "{e}");
                            continue;
                        }
                        let want = reference::all_reduce(&ins, op).unwrap();
                        let got = if k % 2 == 0 {
                            c.all_reduce(&ins[r], op).unwrap()
                        } else {
                            let mut t = ins[r].clone();
                            c.all_reduce_in_place(&mut t.view_mut(), op).unwrap();
                            t
                        };
                        assert!(got == want, "world {world} rank {r} {dtype} len {len} {op}");
                    }
                }
            }
        });
    }
}

#[test]
fn large_all_reduce_is_bit_identical() {
    // 1 MiB + 3 elements, through small (chunked) and default halves, on the reduce-scatter +
    // all-gather path; half types accumulate in f32.
    for (world, cfg) in [(2, None), (3, small_cfg()), (4, None), (8, small_cfg())] {
        let n = (1 << 20) + 3;
        let cases = [
            (DType::F32, ReduceOp::Sum),
            (DType::BF16, ReduceOp::Avg),
            (DType::I8, ReduceOp::Max),
        ];
        let all: Vec<_> = cases
            .iter()
            .map(|&(d, op)| {
                let ins = inputs(d, &[n], world, 77);
                let want = reference::all_reduce(&ins, op).unwrap();
                (ins, want, op)
            })
            .collect();
        with_comms(world, cfg, |r, c| {
            for (ins, want, op) in &all {
                let got = c.all_reduce(&ins[r], *op).unwrap();
                assert!(got == *want, "world {world} {:?} {op}", want.dtype());
            }
        });
    }
}

#[test]
fn gathers_and_scatters_along_every_dim() {
    for world in [1, 2, 3, 4, 8] {
        // (dtype, shape of one rank's all-gather input, dims)
        let cases: Vec<(DType, Vec<usize>)> = vec![
            (DType::F32, vec![0]),
            (DType::F32, vec![1]),
            (DType::F16, vec![7]),
            (DType::BF16, vec![2048]),
            (DType::I64, vec![3, 5, 2]),
            (DType::U8, vec![4, 1, 7]),
            (DType::F8E4M3, vec![5, 3]),
            (DType::I32, vec![0, 3]),
            (DType::F64, vec![2, 3, 4, 5]),
        ];
        with_comms(world, small_cfg(), |r, c| {
            for (i, (dtype, shape)) in cases.iter().enumerate() {
                let ins = inputs(*dtype, shape, world, 100 + i as u64);
                for dim in 0..shape.len() as isize {
                    for d in [dim, dim - shape.len() as isize] {
                        let want = reference::all_gather(&ins, d).unwrap();
                        let got = c.all_gather(&ins[r], d).unwrap();
                        assert!(
                            got == want,
                            "all_gather world {world} {dtype} {shape:?} dim {d}"
                        );
                        let dst = (i + 1) % world;
                        let g = c.gather(&ins[r], dst, d).unwrap();
                        assert_eq!(g.is_some(), r == dst);
                        if let Some(g) = g {
                            assert!(g == want, "gather world {world} {dtype} {shape:?} dim {d}");
                        }
                    }
                    // all_gatherv: rank q contributes (q + i) % 3 rows along dim.
                    let sizes: Vec<usize> = (0..world).map(|q| (q + i) % 3).collect();
                    let vins: Vec<HostTensor> = (0..world)
                        .map(|q| {
                            let mut s = shape.clone();
                            s[dim as usize] = sizes[q];
                            HostTensor::random(*dtype, &s, 500 + q as u64)
                        })
                        .collect();
                    let want = reference::all_gatherv(&vins, dim, &sizes).unwrap();
                    let got = c.all_gatherv(&vins[r], dim, &sizes).unwrap();
                    assert!(
                        got == want,
                        "all_gatherv world {world} {dtype} {shape:?} dim {dim} {sizes:?}"
                    );
                    // reduce_scatter on an input with world * len rows along dim.
                    if !dtype.is_reducible() {
                        let e = c.reduce_scatter(&ins[r], dim, ReduceOp::Sum).unwrap_err();
                        assert!(
                            matches!(e, Error::Unsupported(_) | Error::InvalidArgument(_)),
                            "{e}"
                        );
                        continue;
                    }
                    let mut big = shape.clone();
                    big[dim as usize] *= world;
                    let rins = inputs(*dtype, &big, world, 300 + i as u64);
                    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                        let want = reference::reduce_scatter(&rins, dim, op).unwrap();
                        let got = c.reduce_scatter(&rins[r], dim, op).unwrap();
                        assert!(
                            got == want[r],
                            "reduce_scatter world {world} {dtype} {big:?} dim {dim} {op}"
                        );
                    }
                    let mut vshape = shape.clone();
                    vshape[dim as usize] = sizes.iter().sum();
                    let vr = inputs(*dtype, &vshape, world, 400 + i as u64);
                    let want = reference::reduce_scatterv(&vr, dim, &sizes, ReduceOp::Min).unwrap();
                    let got = c
                        .reduce_scatterv(&vr[r], dim, &sizes, ReduceOp::Min)
                        .unwrap();
                    assert!(
                        got == want[r],
                        "reduce_scatterv world {world} {dtype} {vshape:?} dim {dim} {sizes:?}"
                    );
                }
            }
        });
    }
}

#[test]
fn large_gathers_and_scatters() {
    // 1 MiB + 3 elements per rank, chunked through 8 KiB halves, along dim 0 and the last dim.
    for world in [2, 3, 8] {
        let n = (1 << 20) + 3;
        let ins = inputs(DType::F32, &[n], world, 9);
        let ag = reference::all_gather(&ins, 0).unwrap();
        let rs_in = inputs(DType::BF16, &[world, n], world, 10);
        let rs = reference::reduce_scatter(&rs_in, 0, ReduceOp::Sum).unwrap();
        let rs1_in = inputs(DType::F16, &[3, world * 5], world, 11);
        let rs1 = reference::reduce_scatter(&rs1_in, 1, ReduceOp::Sum).unwrap();
        let bc = reference::broadcast(&ins, world - 1).unwrap();
        with_comms(
            world,
            if world == 3 { None } else { small_cfg() },
            |r, c| {
                assert!(
                    c.all_gather(&ins[r], 0).unwrap() == ag,
                    "all_gather world {world}"
                );
                assert!(
                    c.reduce_scatter(&rs_in[r], 0, ReduceOp::Sum).unwrap() == rs[r],
                    "rs world {world}"
                );
                assert!(
                    c.reduce_scatter(&rs1_in[r], -1, ReduceOp::Sum).unwrap() == rs1[r],
                    "rs dim1 world {world}"
                );
                let mut t = if r == world - 1 {
                    ins[r].clone()
                } else {
                    HostTensor::zeros(DType::F32, &[n])
                };
                c.broadcast(&mut t.view_mut(), world - 1).unwrap();
                assert!(t == bc, "broadcast world {world}");
            },
        );
    }
}

#[test]
fn broadcast_every_dtype_and_src() {
    for world in [1, 2, 3, 4, 8] {
        with_comms(world, small_cfg(), |r, c| {
            for (i, dtype) in DType::ALL.iter().copied().enumerate() {
                for len in [0, 1, 7, 10_000] {
                    let ins = inputs(dtype, &[len, 1], world, 700 + i as u64);
                    let src = (i + len) % world;
                    let want = reference::broadcast(&ins, src).unwrap();
                    let mut t = ins[r].clone();
                    c.broadcast(&mut t.view_mut(), src).unwrap();
                    assert!(
                        t == want,
                        "broadcast world {world} {dtype} len {len} src {src}"
                    );
                }
            }
        });
    }
}

#[test]
fn send_recv_tensors_and_lists() {
    for world in [2, 3, 4, 8] {
        with_comms(world, small_cfg(), |r, c| {
            let next = (r + 1) % world;
            let prev = (r + world - 1) % world;
            for (i, dtype) in DType::ALL.iter().copied().enumerate() {
                for len in [0usize, 1, 7, 4096, 100_003] {
                    let mine = HostTensor::random(dtype, &[len], (r * 100 + i) as u64);
                    let theirs = HostTensor::random(dtype, &[len], (prev * 100 + i) as u64);
                    let mut got = HostTensor::zeros(dtype, &[len]);
                    // Even ranks send first; a ring of large sends would wait on each other.
                    if r % 2 == 0 {
                        c.send(&mine.view(), next).unwrap();
                        c.recv(&mut got.view_mut(), prev).unwrap();
                    } else {
                        c.recv(&mut got.view_mut(), prev).unwrap();
                        c.send(&mine.view(), next).unwrap();
                    }
                    assert!(got == theirs, "p2p world {world} {dtype} len {len}");
                }
            }
            // A list of mixed tensors (more than vLLM's 8) from every rank to rank 0.
            let list = |q: usize| -> Vec<HostTensor> {
                (0..12)
                    .map(|k| {
                        HostTensor::random(DType::ALL[k], &[k % 3, k * 5 + q], (q * 31 + k) as u64)
                    })
                    .collect()
            };
            if r == 0 {
                for q in 1..world {
                    assert_eq!(c.recv_list(q).unwrap(), list(q), "list from {q}");
                }
            } else {
                c.send_list(&list(r), 0).unwrap();
            }
            // Small messages are eager: a ring of sends then receives does not wait.
            let x = HostTensor::random(DType::F32, &[16], r as u64);
            c.send(&x.view(), next).unwrap();
            let mut y = HostTensor::zeros(DType::F32, &[16]);
            c.recv(&mut y.view_mut(), prev).unwrap();
            assert_eq!(y, HostTensor::random(DType::F32, &[16], prev as u64));
        });
    }
}

#[test]
fn recv_mismatch_is_an_error_and_the_stream_stays_in_step() {
    with_comms(2, small_cfg(), |r, c| {
        if r == 0 {
            c.send(&HostTensor::random(DType::F32, &[3000], 1).view(), 1)
                .unwrap();
            c.send(&HostTensor::random(DType::F32, &[5], 2).view(), 1)
                .unwrap();
        } else {
            let mut wrong = HostTensor::zeros(DType::I32, &[3000]);
            let e = c.recv(&mut wrong.view_mut(), 0).unwrap_err();
            assert!(e.to_string().contains("f32"), "{e}");
            let mut ok = HostTensor::zeros(DType::F32, &[5]);
            c.recv(&mut ok.view_mut(), 0).unwrap();
            assert_eq!(ok, HostTensor::random(DType::F32, &[5], 2));
        }
    });
}

#[test]
fn bad_arguments_are_clear_errors() {
    with_comms(2, None, |r, c| {
        let t = HostTensor::random(DType::F32, &[3], 0);
        assert!(matches!(
            c.reduce_scatter(&t, 0, ReduceOp::Sum),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            c.all_gather(&t, 1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            c.all_gatherv(&t, 0, &[3]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(c.gather(&t, 2, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            c.send(&t.view(), r),
            Err(Error::InvalidArgument(_))
        ));
        let s = HostTensor::zeros(DType::F32, &[]);
        assert!(matches!(
            c.all_gather(&s, 0),
            Err(Error::InvalidArgument(_))
        ));
        // The communicator still works after refused calls.
        let got = c.all_reduce(&t, ReduceOp::Max).unwrap();
        assert_eq!(got, t);
    });
}

#[test]
fn absent_peer_times_out_naming_it_and_closed_peer_is_lost() {
    let out = with_comms(3, None, |r, c| {
        c.set_timeout(Duration::from_millis(300));
        let t = HostTensor::random(DType::F32, &[1000], r as u64);
        if r == 2 {
            // Rank 2 joins late; the others published their data before giving up, so its
            // first call may complete, but the next finds them failed.
            std::thread::sleep(Duration::from_millis(800));
            let _ = c.all_reduce(&t, ReduceOp::Sum);
            let e = c.all_reduce(&t, ReduceOp::Sum).unwrap_err();
            assert!(matches!(e, Error::PeerLost { .. }), "{e}");
            return None;
        }
        let start = std::time::Instant::now();
        let e = c.all_reduce(&t, ReduceOp::Sum).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "waited {:?}",
            start.elapsed()
        );
        // The communicator refuses later calls.
        assert!(matches!(
            c.all_reduce(&t, ReduceOp::Sum),
            Err(Error::NotInitialized(_))
        ));
        Some(e)
    });
    for e in out.into_iter().flatten() {
        match e {
            Error::Timeout { missing_ranks, .. } => assert_eq!(missing_ranks, vec![2]),
            // The other waiting rank may see the first one fail first; it blames rank 2.
            Error::PeerLost { rank, .. } => assert_eq!(rank, 2),
            e => panic!("unexpected {e}"),
        }
    }
    // A peer that destroyed its communicator is reported as lost, not waited for.
    with_comms(2, None, |r, c| {
        if r == 1 {
            c.destroy().unwrap();
            assert!(matches!(
                c.all_reduce(&HostTensor::zeros(DType::F32, &[1]), ReduceOp::Sum),
                Err(Error::NotInitialized(_))
            ));
        } else {
            let mut t = HostTensor::zeros(DType::F32, &[1]);
            let e = c.recv(&mut t.view_mut(), 1).unwrap_err();
            assert!(matches!(e, Error::PeerLost { rank: 1, .. }), "{e}");
        }
    });
}

#[test]
fn helper_threads_split_large_all_reduces() {
    // Chunks of 1 MiB through 3 helper threads per rank: the reduction and copies are split
    // among them; results stay bit-identical.
    let cfg = Some(ShmConfig {
        half_bytes: 1 << 20,
        slot_bytes: 4096,
        threads: 3,
    });
    for world in [2, 3] {
        let cases = [
            (DType::F32, ReduceOp::Sum),
            (DType::BF16, ReduceOp::Avg),
            (DType::I32, ReduceOp::Min),
        ];
        let all: Vec<_> = cases
            .iter()
            .map(|&(d, op)| {
                let ins = inputs(d, &[(3 << 20) / d.size() + 5], world, 42);
                let want = reference::all_reduce(&ins, op).unwrap();
                (ins, want, op)
            })
            .collect();
        with_comms(world, cfg, |r, c| {
            assert_eq!(c.config().threads, 3);
            for (ins, want, op) in &all {
                let got = c.all_reduce(&ins[r], *op).unwrap();
                assert!(got == *want, "world {world} {:?} {op}", want.dtype());
            }
        });
    }
}

#[test]
fn world_of_64_ranks() {
    let world = 64;
    let ins = inputs(DType::F32, &[1000], world, 5);
    let want = reference::all_reduce(&ins, ReduceOp::Sum).unwrap();
    let ag = reference::all_gather(&ins, 0).unwrap();
    with_comms(world, None, |r, c| {
        assert!(c.all_reduce(&ins[r], ReduceOp::Sum).unwrap() == want);
        assert!(c.all_gather(&ins[r], 0).unwrap() == ag);
    });
}
