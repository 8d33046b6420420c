//! Weight transfer with ranks as threads: rank 0 (the trainer) pushes named tensors into ranks
//! 1 and 2; a receiver whose model lacks a name or has another shape stops every rank before any
//! bucket moves; a rank that never joins fails the others within the deadline.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::host_comm::HostBackend;
use dist_core::local::run_threads;
use dist_core::weights::{
    receive_weights, receive_weights_into, send_weights, TransferOptions, TransferStats, WeightSpec,
};
use dist_core::{DType, Error, GroupCoordinator, HostGroup, HostTensor};

fn group(
    rank: usize,
    n: usize,
    host: Arc<dyn HostGroup>,
    t: Duration,
) -> GroupCoordinator<HostBackend> {
    group_with(rank, n, host, t, true)
}

fn group_with(
    rank: usize,
    n: usize,
    host: Arc<dyn HostGroup>,
    t: Duration,
    device: bool,
) -> GroupCoordinator<HostBackend> {
    common::host_coordinator("weights:0", rank, n, host, device.then_some(t))
}

fn model() -> Vec<(String, HostTensor)> {
    vec![
        (
            "embed".into(),
            HostTensor::random(DType::BF16, &[50, 16], 1),
        ),
        (
            "layers.0.w".into(),
            HostTensor::random(DType::F32, &[16, 16], 2),
        ),
        (
            "layers.0.b".into(),
            HostTensor::random(DType::F32, &[16], 3),
        ),
        (
            "layers.0.empty".into(),
            HostTensor::zeros(DType::F16, &[0, 4]),
        ),
        (
            "layers.1.experts".into(),
            HostTensor::random(DType::I8, &[4, 100], 4),
        ),
        ("head".into(), HostTensor::random(DType::F64, &[16, 3], 5)),
    ]
}

fn specs(m: &[(String, HostTensor)]) -> Vec<WeightSpec> {
    m.iter()
        .map(|(n, t)| WeightSpec {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        })
        .collect()
}

/// Rank 0's side: sends `m` as version `version`.
fn send_model(
    grp: &GroupCoordinator<HostBackend>,
    mut m: Vec<(String, HostTensor)>,
    version: u64,
    o: &TransferOptions,
) -> dist_core::Result<TransferStats> {
    let mut w: Vec<(&str, &mut HostTensor)> = m.iter_mut().map(|(n, t)| (n.as_str(), t)).collect();
    send_weights(grp, version, &mut w, o)
}

fn opts() -> TransferOptions {
    // Small buckets: several tensors per bucket and a tensor larger than a bucket.
    TransferOptions {
        bucket_bytes: 1200,
        alone_from: 1500,
        deadline: Duration::from_secs(20),
        require_all: true,
    }
}

#[test]
fn receivers_get_every_tensor() {
    receive_all(true);
    receive_all(false); // a group without a device communicator: buckets over its host group
}

fn receive_all(device: bool) {
    let out = run_threads(3, Duration::from_secs(20), |rank, g| {
        let grp = group_with(rank, 3, Arc::new(g), Duration::from_secs(20), device);
        let m = model();
        if rank == 0 {
            let s = send_model(&grp, m, 42, &opts()).unwrap();
            assert!(s.buckets >= 3, "{s:?}");
            None
        } else {
            let mut got = Vec::new();
            let (v, s) = receive_weights(&grp, 0, &specs(&m), &opts(), |n, t| {
                got.push((n.to_string(), t));
                Ok(())
            })
            .unwrap();
            assert_eq!(v, 42);
            assert_eq!(s.tensors, m.len());
            Some(got)
        }
    });
    for o in out.into_iter().skip(1) {
        assert_eq!(o.unwrap().unwrap(), model());
    }
}

#[test]
fn receivers_load_into_their_models_memory() {
    for device in [true, false] {
        let out = run_threads(3, Duration::from_secs(20), |rank, g| {
            let grp = group_with(rank, 3, Arc::new(g), Duration::from_secs(20), device);
            let m = model();
            if rank == 0 {
                send_model(&grp, m, 9, &opts()).unwrap();
                return None;
            }
            // The receiver's model: same names and shapes, other contents, its own memory.
            let mut mine: Vec<(String, HostTensor)> = m
                .iter()
                .enumerate()
                .map(|(i, (n, t))| {
                    (
                        n.clone(),
                        HostTensor::random(t.dtype(), t.shape(), 77 + i as u64),
                    )
                })
                .collect();
            let before: Vec<usize> = mine
                .iter()
                .map(|(_, t)| t.as_bytes().as_ptr() as usize)
                .collect();
            let mut views: Vec<(&str, _)> = mine
                .iter_mut()
                .map(|(n, t)| (n.as_str(), t.view_mut()))
                .collect();
            let (v, s) = receive_weights_into(&grp, 0, &mut views, &opts()).unwrap();
            drop(views);
            assert_eq!((v, s.tensors), (9, m.len()));
            let after: Vec<usize> = mine
                .iter()
                .map(|(_, t)| t.as_bytes().as_ptr() as usize)
                .collect();
            assert_eq!(before, after, "rank {rank}: the model's tensors moved");
            Some(mine)
        });
        for o in out.into_iter().skip(1) {
            assert_eq!(
                o.unwrap().unwrap(),
                model(),
                "device communicator: {device}"
            );
        }
    }
}

#[test]
fn a_missing_name_or_shape_stops_every_rank_first() {
    for bad in ["name", "shape"] {
        let out = run_threads(3, Duration::from_secs(20), |rank, g| {
            let grp = group(rank, 3, Arc::new(g), Duration::from_secs(20));
            let m = model();
            let mut spec = specs(&m);
            if rank == 2 {
                match bad {
                    "name" => spec.retain(|s| s.name != "head"),
                    _ => spec[1].shape = vec![16, 17],
                }
            }
            let r = if rank == 0 {
                send_model(&grp, m, 1, &opts()).map(|_| ())
            } else {
                let mut loaded = 0;
                let r = receive_weights(&grp, 0, &spec, &opts(), |_, _| {
                    loaded += 1;
                    Ok(())
                });
                assert_eq!(loaded, 0, "rank {rank} loaded tensors of a refused update");
                r.map(|_| ())
            };
            r.unwrap_err().to_string()
        });
        for o in out {
            let e = o.unwrap();
            assert!(e.contains("rank 2 refused the manifest"), "{e}");
            let what = if bad == "name" {
                "no tensor 'head'"
            } else {
                "[16, 17]"
            };
            assert!(e.contains(what), "{e}");
        }
    }
}

#[test]
fn a_rank_that_never_joins_fails_the_others_in_time() {
    let limit = Duration::from_millis(500);
    let start = Instant::now();
    let out = run_threads(3, limit, |rank, g| {
        let grp = group(rank, 3, Arc::new(g), limit);
        let m = model();
        let o = TransferOptions {
            deadline: limit,
            ..opts()
        };
        match rank {
            0 => Some(send_model(&grp, m, 1, &o).map(|_| ())),
            1 => Some(receive_weights(&grp, 0, &specs(&m), &o, |_, _| Ok(())).map(|_| ())),
            _ => None, // never joins
        }
    });
    assert!(start.elapsed() < limit * 4, "{:?}", start.elapsed());
    for o in out.into_iter().take(2) {
        match o.unwrap().unwrap() {
            Err(Error::Timeout { missing_ranks, .. }) => assert!(missing_ranks.contains(&2)),
            other => panic!("expected a timeout naming rank 2, got {other:?}"),
        }
    }
}
