//! The gloo communicator (feature `gloo`) against the oracles, ranks as threads, rendezvous
//! through a real dist-store TCP store. Integers must match exactly; floats within the
//! rounding of a different combination order (gloo's ring), and identically on every rank.
#![cfg(feature = "gloo")]

use std::sync::Arc;
use std::time::Duration;

use dist_core::local::run_threads;
use dist_core::{reference, DType, DeviceCommunicator, HostTensor, ReduceOp, Store};
use dist_cpu::gloo::GlooCommunicator;
use dist_store::{ClientOptions, ServerOptions, StoreServer, TcpStoreClient};

const T: Duration = Duration::from_secs(60);

fn close(a: &HostTensor, b: &HostTensor) -> bool {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return false;
    }
    if !a.dtype().is_float() {
        return a == b;
    }
    let tol = match a.dtype() {
        DType::F16 | DType::BF16 => 2e-2,
        _ => 1e-5,
    };
    let f = |t: &HostTensor| dist_core::conformance::to_f64(t).expect("a float tensor");
    f(a).iter()
        .zip(f(b))
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn gloo_collectives_match_the_oracles() {
    let server = StoreServer::start(ServerOptions {
        host: "127.0.0.1".into(),
        port: 0,
        ..Default::default()
    })
    .unwrap();
    let port = server.port();
    for world in [1usize, 2, 3, 4] {
        let dtypes = [
            DType::F32,
            DType::F64,
            DType::BF16,
            DType::F16,
            DType::I32,
            DType::I8,
            DType::U64,
        ];
        let out = run_threads(world, T, |r, _g| {
            let store: Arc<dyn Store> = Arc::new(
                TcpStoreClient::connect(
                    "127.0.0.1",
                    port,
                    ClientOptions {
                        timeout: T,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            let c = GlooCommunicator::new(store, &format!("gloo-w{world}"), r, world, T).unwrap();
            for (i, &d) in dtypes.iter().enumerate() {
                for len in [0usize, 1, 7, 4096 / d.size(), 100_003] {
                    let ins: Vec<HostTensor> = (0..world)
                        .map(|q| HostTensor::random(d, &[len], (i * 100 + q) as u64))
                        .collect();
                    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                        let want = reference::all_reduce(&ins, op).unwrap();
                        let got = c.all_reduce(&ins[r], op).unwrap();
                        assert!(
                            close(&got, &want),
                            "all_reduce world {world} {d} len {len} {op}"
                        );
                    }
                    let want = reference::all_gather(&ins, 0).unwrap();
                    assert!(
                        c.all_gather(&ins[r], 0).unwrap() == want,
                        "all_gather {d} {len}"
                    );
                    let src = len % world;
                    let mut t = ins[r].clone();
                    c.broadcast(&mut t.view_mut(), src).unwrap();
                    assert!(t == ins[src], "broadcast {d} {len}");
                    if world > 1 {
                        let (next, prev) = ((r + 1) % world, (r + world - 1) % world);
                        let mut got = HostTensor::zeros(d, &[len]);
                        if r % 2 == 0 {
                            c.send(&ins[r].view(), next).unwrap();
                            c.recv(&mut got.view_mut(), prev).unwrap();
                        } else {
                            c.recv(&mut got.view_mut(), prev).unwrap();
                            c.send(&ins[r].view(), next).unwrap();
                        }
                        assert!(got == ins[prev], "send/recv {d} {len}");
                    }
                }
                let x: Vec<HostTensor> = (0..world)
                    .map(|q| HostTensor::random(d, &[3, 2 * world, 5], (i * 7 + q) as u64))
                    .collect();
                for dim in [0isize, 1, 2] {
                    let want = reference::all_gather(&x, dim).unwrap();
                    assert!(
                        c.all_gather(&x[r], dim).unwrap() == want,
                        "all_gather 3-d dim {dim}"
                    );
                    let g = c.gather(&x[r], world - 1, dim).unwrap();
                    assert_eq!(g.is_some(), r == world - 1);
                }
                let want = reference::reduce_scatter(&x, 1, ReduceOp::Sum).unwrap();
                let got = c.reduce_scatter(&x[r], 1, ReduceOp::Sum).unwrap();
                assert!(close(&got, &want[r]), "reduce_scatter {d}");
                let sizes: Vec<usize> = (0..world).map(|q| q % 3).collect();
                let v: Vec<HostTensor> = (0..world)
                    .map(|q| HostTensor::random(d, &[2, sizes[q]], (i * 11 + q) as u64))
                    .collect();
                let want = reference::all_gatherv(&v, 1, &sizes).unwrap();
                assert!(
                    c.all_gatherv(&v[r], 1, &sizes).unwrap() == want,
                    "all_gatherv {d}"
                );
            }
            // Every rank holds the same bits after a float all-reduce.
            let mine = HostTensor::random(DType::F32, &[10_000], r as u64);
            let s = c.all_reduce(&mine, ReduceOp::Sum).unwrap();
            let all = c.all_gather(&s, 0).unwrap();
            let b = all.as_bytes();
            let n = s.nbytes();
            for q in 0..world {
                assert_eq!(&b[q * n..(q + 1) * n], s.as_bytes(), "rank {q} differs");
            }
            c.barrier().unwrap();
            // fp8 is refused for reductions, moved as bytes otherwise.
            let f8 = HostTensor::random(DType::F8E4M3, &[9], r as u64);
            assert!(c.all_reduce(&f8, ReduceOp::Sum).is_err());
            assert_eq!(c.all_gather(&f8, 0).unwrap().nbytes(), 9 * world);
        });
        for (r, o) in out.into_iter().enumerate() {
            assert!(o.is_ok(), "world {world} rank {r} panicked");
        }
    }
}
