//! Every collective of `CandleGroup` on candle tensors, ranks as threads over the shared-memory
//! communicator, against `dist_core::reference` computed from the same inputs: dtypes, odd and
//! empty sizes, inputs at an offset and non-contiguous, outputs that are a region of a larger
//! buffer; and the errors of misuse.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType as C, Device, Tensor};
use dist_candle::{to_candle, CandleBackend, CandleGroup, Error};
use dist_core::local::{run_threads, ThreadGroup};
use dist_core::{
    reference, CoordinatorParts, DType, DictValue, GroupCoordinator, HostGroup, HostTensor,
    ReduceOp, Value,
};
use dist_cpu::{CpuBackend, CpuCommunicator, ShmCommunicator};

const T: Duration = Duration::from_secs(30);

fn coordinator(
    name: &str,
    rank: usize,
    ranks: Vec<usize>,
    g: ThreadGroup,
) -> GroupCoordinator<CpuBackend> {
    let host: Arc<dyn HostGroup> = Arc::new(g);
    let comm = ShmCommunicator::new(host.as_ref(), name, T).expect("shm communicator");
    GroupCoordinator::new(CoordinatorParts {
        unique_name: name.into(),
        ranks,
        rank,
        local_rank: rank,
        device: dist_core::Device::CPU,
        host,
        comm: Some(CpuCommunicator::Shm(comm)),
        mq: None,
        diag: None,
        check_collectives: false,
    })
    .expect("coordinator")
}

/// Runs `f(rank, group)` on `n` threads, each with its rank's coordinator of one group.
fn on_ranks<R: Send>(
    name: &str,
    n: usize,
    f: impl Fn(usize, CandleGroup<'_, CpuBackend>) -> R + Sync,
) -> Vec<R> {
    run_threads(n, T, |r, g| {
        let c = coordinator(name, r, (0..n).collect(), g);
        f(r, CandleGroup::new(&c))
    })
    .into_iter()
    .map(|r| r.expect("rank panicked"))
    .collect()
}

fn candle(h: &HostTensor) -> Tensor {
    let dtype = to_candle(h.dtype()).expect("candle dtype");
    Tensor::from_raw_buffer(h.as_bytes(), dtype, h.shape(), &Device::Cpu).unwrap()
}

/// The tensor's elements, read through the adapter's own views.
fn host(t: &Tensor) -> HostTensor {
    CpuBackend::lend("test", &[t], &[], |r, _| {
        HostTensor::from_bytes(r[0].dtype(), r[0].shape(), r[0].as_bytes())
    })
    .unwrap()
}

fn inputs(n: usize, dtype: DType, shape: &[usize], seed: u64) -> Vec<HostTensor> {
    (0..n)
        .map(|r| HostTensor::random(dtype, shape, seed * 100 + r as u64))
        .collect()
}

const DTYPES: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::I64];

#[test]
fn all_reduce_every_form_matches_the_oracle() {
    for n in 1..=4 {
        for (k, dtype) in DTYPES.into_iter().enumerate() {
            for shape in [&[0usize][..], &[1], &[7, 13], &[(1 << 17) + 3]] {
                let ins = inputs(n, dtype, shape, k as u64);
                let want = reference::all_reduce(&ins, ReduceOp::Sum).unwrap();
                let got = on_ranks(&format!("ar{n}{k}{}", shape.len()), n, |r, g| {
                    let t = candle(&ins[r]);
                    let inplace = t.copy().unwrap();
                    g.all_reduce_in_place(&inplace).unwrap();
                    let out = t.zeros_like().unwrap();
                    g.all_reduce_into(&t, &out).unwrap();
                    let owned = g.all_reduce(t.copy().unwrap()).unwrap();
                    // The input of the into-form is unchanged.
                    assert_eq!(host(&t), ins[r]);
                    [host(&inplace), host(&out), host(&owned)]
                });
                for (r, g) in got.iter().enumerate() {
                    for (form, t) in ["in_place", "into", "owned"].iter().zip(g) {
                        assert_eq!(t, &want, "n={n} {dtype} {shape:?} rank {r} {form}");
                    }
                }
            }
        }
    }
}

#[test]
fn all_reduce_in_place_writes_the_tensors_own_storage() {
    let ins = inputs(3, DType::F32, &[4, 6], 9);
    let want = reference::all_reduce(&ins, ReduceOp::Sum).unwrap();
    let got = on_ranks("ar_storage", 3, |r, g| {
        // A region of a larger buffer: only that region changes, the rest keeps its canaries.
        let buf = Tensor::full(-7f32, (6, 6), &Device::Cpu).unwrap();
        let region = buf.narrow(0, 1, 4).unwrap();
        region.slice_set(&candle(&ins[r]), 0, 0).unwrap();
        let alias = region.clone();
        g.all_reduce_in_place(&region).unwrap();
        (host(&alias), buf.to_vec2::<f32>().unwrap())
    });
    for (alias, buf) in got {
        assert_eq!(alias, want);
        assert!(buf[0].iter().chain(&buf[5]).all(|&x| x == -7.0));
    }
    // A non-contiguous tensor: `all_reduce` by value sums a contiguous copy; in place is refused.
    let got = on_ranks("ar_strided", 3, |r, g| {
        let t = candle(&ins[r]).t().unwrap();
        let e = g.all_reduce_in_place(&t).unwrap_err();
        assert!(matches!(e, Error::Layout { .. }), "{e}");
        host(&g.all_reduce(t).unwrap())
    });
    let want_t = candle(&want).t().unwrap().contiguous().unwrap();
    for t in got {
        assert_eq!(t, host(&want_t));
    }
}

#[test]
fn all_gather_and_reduce_scatter_along_every_dim() {
    let shape = [2usize, 4, 3];
    for n in [1usize, 2, 4] {
        for (k, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
            let ins = inputs(n, dtype, &shape, 20 + k as u64);
            for dim in [0isize, 1, 2, -1] {
                let gathered = reference::all_gather(&ins, dim).unwrap();
                let rs_in = inputs(n, dtype, &[2, 4 * n, 3], 40);
                let scattered = reference::reduce_scatter(&rs_in, 1, ReduceOp::Sum).unwrap();
                let got = on_ranks(&format!("ag{n}{k}{}", dim + 1), n, |r, g| {
                    let t = candle(&ins[r]);
                    let owned = g.all_gather(&t, dim).unwrap();
                    let out = owned.zeros_like().unwrap();
                    g.all_gather_into(&t, &out, dim).unwrap();
                    let x = candle(&rs_in[r]);
                    let rs = g.reduce_scatter(&x, 1).unwrap();
                    let rs_out = rs.zeros_like().unwrap();
                    g.reduce_scatter_into(&x, &rs_out, 1).unwrap();
                    (host(&owned), host(&out), host(&rs), host(&rs_out))
                });
                for (r, (a, b, c, d)) in got.into_iter().enumerate() {
                    assert_eq!(a, gathered, "n={n} {dtype} dim {dim} rank {r}");
                    assert_eq!(b, gathered, "n={n} {dtype} dim {dim} rank {r} into");
                    assert_eq!(c, scattered[r], "n={n} {dtype} rank {r} reduce_scatter");
                    assert_eq!(
                        d, scattered[r],
                        "n={n} {dtype} rank {r} reduce_scatter_into"
                    );
                }
            }
        }
    }
}

#[test]
fn strided_and_offset_inputs_are_read_as_their_values() {
    let n = 3;
    let base = inputs(n, DType::F32, &[5, 4], 60);
    // Each rank gathers the transpose of its tensor's last 3 rows ([4, 3]) along dim 1.
    let views: Vec<HostTensor> = base
        .iter()
        .map(|h| {
            host(
                &candle(h)
                    .narrow(0, 2, 3)
                    .unwrap()
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            )
        })
        .collect();
    let want = reference::all_gather(&views, 1).unwrap();
    let got = on_ranks("ag_strided", n, |r, g| {
        let t = candle(&base[r]).narrow(0, 2, 3).unwrap().t().unwrap();
        assert!(!t.is_contiguous());
        host(&g.all_gather(&t, 1).unwrap())
    });
    assert!(got.iter().all(|t| *t == want));
    // An offset input (a narrowed, contiguous view) is read in place.
    let rows: Vec<HostTensor> = base
        .iter()
        .map(|h| host(&candle(h).narrow(0, 1, 2).unwrap()))
        .collect();
    let want = reference::all_gather(&rows, 0).unwrap();
    let got = on_ranks("ag_offset", n, |r, g| {
        let t = candle(&base[r]).narrow(0, 1, 2).unwrap();
        assert!(t.is_contiguous() && t.layout().start_offset() == 4);
        // Into a region of a larger buffer.
        let buf = Tensor::full(9f32, (2 * n + 2, 4), &Device::Cpu).unwrap();
        let dst = buf.narrow(0, 1, 2 * n).unwrap();
        g.all_gather_into(&t, &dst, 0).unwrap();
        let v = buf.to_vec2::<f32>().unwrap();
        assert!(v[0].iter().chain(&v[2 * n + 1]).all(|&x| x == 9.0));
        host(&dst)
    });
    assert!(got.iter().all(|t| *t == want));
}

#[test]
fn v_variants_gather_broadcast_and_point_to_point() {
    let n = 4;
    let sizes = [3usize, 0, 1, 2];
    let ins: Vec<HostTensor> = (0..n)
        .map(|r| HostTensor::random(DType::F32, &[sizes[r], 5], 70 + r as u64))
        .collect();
    let agv = reference::all_gatherv(&ins, 0, &sizes).unwrap();
    let full = inputs(n, DType::F32, &[6, 5], 80);
    let rsv = reference::reduce_scatterv(&full, 0, &sizes, ReduceOp::Sum).unwrap();
    let gathered = reference::gather(&full, 2, 1).unwrap();
    let bcast = reference::broadcast(&full, 1).unwrap();
    let fp8 = inputs(n, DType::F8E4M3, &[3, 2], 90);
    let fp8_all = reference::all_gather(&fp8, 0).unwrap();
    let got = on_ranks("v_p2p", n, |r, g| {
        let a = host(&g.all_gatherv(&candle(&ins[r]), 0, &sizes).unwrap());
        let b = host(&g.reduce_scatterv(&candle(&full[r]), 0, &sizes).unwrap());
        let c = g.gather(&candle(&full[r]), 2, 1).unwrap().map(|t| host(&t));
        let t = candle(&full[r]);
        g.broadcast_in_place(&t, 1).unwrap();
        // Ring: send to the next rank, receive from the previous one (even ranks send first).
        let mine = candle(&full[r]);
        let got = if r % 2 == 0 {
            g.send(&mine, None).unwrap();
            g.recv(C::F32, &[6, 5], &Device::Cpu, None).unwrap()
        } else {
            let x = g.recv(C::F32, &[6, 5], &Device::Cpu, None).unwrap();
            g.send(&mine, None).unwrap();
            x
        };
        let f8 = host(&g.all_gather(&candle(&fp8[r]), 0).unwrap());
        (a, b, c, host(&t), host(&got), f8)
    });
    for (r, (a, b, c, d, e, f)) in got.into_iter().enumerate() {
        assert_eq!(a, agv, "rank {r} all_gatherv");
        assert_eq!(b, rsv[r], "rank {r} reduce_scatterv");
        assert_eq!(c, gathered[r], "rank {r} gather");
        assert_eq!(d, bcast, "rank {r} broadcast");
        assert_eq!(e, full[(r + n - 1) % n], "rank {r} recv");
        assert_eq!(f, fp8_all, "rank {r} fp8 all_gather");
    }
}

/// PP stages of two ranks each, TP 2 inside each stage: stage 0 sends a dict (tensors sliced
/// over TP) to stage 1, which receives into its own tensors.
#[test]
fn tensor_dicts_between_pp_stages_with_tp_slices() {
    let hidden = inputs(2, DType::F32, &[3, 8], 100);
    let residual = inputs(2, DType::BF16, &[3, 8], 110);
    let tp = ThreadGroup::new(2, T)
        .into_iter()
        .chain(ThreadGroup::new(2, T));
    let pp: Vec<ThreadGroup> = {
        // PP groups {0, 2} and {1, 3}.
        let (mut a, mut b) = (ThreadGroup::new(2, T), ThreadGroup::new(2, T));
        vec![a.remove(0), b.remove(0), a.remove(0), b.remove(0)]
    };
    type Received = Option<(HostTensor, HostTensor, Vec<(String, Value)>)>;
    let got: Vec<Received> = std::thread::scope(|s| {
        let hs: Vec<_> = tp
            .zip(pp)
            .enumerate()
            .map(|(rank, (tg, pg))| {
                let (hidden, residual) = (&hidden, &residual);
                s.spawn(move || {
                    let (stage, tp_rank) = (rank / 2, rank % 2);
                    let tpc = coordinator(
                        &format!("tp:{stage}"),
                        rank,
                        vec![2 * stage, 2 * stage + 1],
                        tg,
                    );
                    let ppc = coordinator(
                        &format!("pp:{tp_rank}"),
                        rank,
                        vec![tp_rank, tp_rank + 2],
                        pg,
                    );
                    let pp = CandleGroup::new(&ppc);
                    if stage == 0 {
                        // Every TP rank of the stage holds the same tensors (vLLM's intermediate
                        // tensors are replicated over TP).
                        let dict = vec![
                            (
                                "hidden_states".to_string(),
                                DictValue::Tensor(candle(&hidden[0])),
                            ),
                            (
                                "residual".to_string(),
                                DictValue::Tensor(candle(&residual[0])),
                            ),
                            ("step".to_string(), DictValue::Value(Value::Int(7))),
                        ];
                        pp.send_tensor_dict(&dict, None, Some(&tpc), None).unwrap();
                        None
                    } else {
                        let h = Tensor::zeros((3, 8), C::F32, &Device::Cpu).unwrap();
                        let res = Tensor::zeros((3, 8), C::BF16, &Device::Cpu).unwrap();
                        let values = pp
                            .recv_tensor_dict_into(
                                None,
                                Some(&tpc),
                                &[("residual", &res), ("hidden_states", &h)],
                            )
                            .unwrap();
                        Some((host(&h), host(&res), values))
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    });
    for (rank, g) in got.into_iter().enumerate().skip(2) {
        let (h, res, values) = g.expect("stage 1 received");
        assert_eq!(h, hidden[0], "rank {rank}");
        assert_eq!(res, residual[0], "rank {rank}");
        assert_eq!(values, vec![("step".to_string(), Value::Int(7))]);
    }
}

#[test]
fn misuse_is_a_typed_error_on_every_rank() {
    let got = on_ranks("misuse", 2, |_, g| {
        let f32s = Tensor::zeros((4, 2), C::F32, &Device::Cpu).unwrap();
        let mut errs = vec![];
        // No dist dtype.
        errs.push(g.all_reduce_in_place(&Tensor::zeros(3, C::I16, &Device::Cpu).unwrap()));
        // fp8 cannot be reduced (moved, yes).
        errs.push(g.all_reduce_in_place(&Tensor::zeros(3, C::F8E4M3, &Device::Cpu).unwrap()));
        // Output dtype differs from the input's.
        let bf = Tensor::zeros((8, 2), C::BF16, &Device::Cpu).unwrap();
        errs.push(g.all_gather_into(&f32s, &bf, 0));
        // Output of the wrong shape.
        errs.push(g.all_gather_into(
            &f32s,
            &Tensor::zeros((4, 2), C::F32, &Device::Cpu).unwrap(),
            0,
        ));
        // Non-contiguous output.
        let out = Tensor::zeros((2, 8), C::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        errs.push(g.all_gather_into(&f32s, &out, 0));
        // Input and output overlap.
        let buf = Tensor::zeros((8, 2), C::F32, &Device::Cpu).unwrap();
        errs.push(g.all_gather_into(&buf.narrow(0, 2, 4).unwrap(), &buf, 0));
        // Reduce-scatter of a dim that does not divide.
        errs.push(
            g.reduce_scatter(&Tensor::zeros(3, C::F32, &Device::Cpu).unwrap(), 0)
                .map(|_| ()),
        );
        // Afterwards the group still works.
        let ok = g
            .all_reduce(Tensor::ones(2, C::F32, &Device::Cpu).unwrap())
            .unwrap();
        (
            errs.into_iter().map(|e| e.unwrap_err()).collect::<Vec<_>>(),
            ok.to_vec1::<f32>().unwrap(),
        )
    });
    for (errs, ok) in got {
        assert_eq!(ok, vec![2.0, 2.0]);
        let kinds: Vec<&str> = errs
            .iter()
            .map(|e| match e {
                Error::DType { .. } => "dtype",
                Error::Layout { .. } => "layout",
                Error::Dist(dist_core::Error::InvalidArgument(_)) => "invalid",
                other => panic!("unexpected error {other}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["dtype", "dtype", "dtype", "invalid", "layout", "layout", "invalid"],
            "{errs:#?}"
        );
        assert!(errs[0].to_string().contains("I16"), "{}", errs[0]);
        assert!(
            errs[1].to_string().contains("cannot be reduced"),
            "{}",
            errs[1]
        );
        assert!(errs[5].to_string().contains("overlap"), "{}", errs[5]);
    }
}
