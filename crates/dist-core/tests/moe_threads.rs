//! MoE dispatch and combine with ranks as threads (host communicator over a thread group):
//! both backends against a plain single-process MoE at several world sizes
//! (`dist_core::moe::check`), a rank with a bad routing failing every rank, the backend setting.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dist_core::host_comm::HostBackend;
use dist_core::local::run_threads;
use dist_core::moe::{
    self, All2AllBackend, ExpertPlacement, MoeConfig, Routing, ALL2ALL_BACKEND_ENV,
};
use dist_core::{DType, GroupCoordinator, HostGroup, HostTensor};

const TIMEOUT: Duration = Duration::from_secs(30);

fn group(rank: usize, n: usize, host: Arc<dyn HostGroup>) -> GroupCoordinator<HostBackend> {
    common::host_coordinator("ep:0", rank, n, host, Some(TIMEOUT))
}

#[test]
fn dispatch_and_combine_match_a_plain_moe() {
    for n in [1, 2, 3, 4] {
        let out = run_threads(n, TIMEOUT, |rank, g| {
            moe::check::check_all(&group(rank, n, Arc::new(g)), 11)
        });
        for (r, o) in out.into_iter().enumerate() {
            let passed = o
                .unwrap()
                .unwrap_or_else(|e| panic!("world {n} rank {r}: {e}"));
            assert!(passed > 100, "world {n}: {passed} checks");
        }
    }
}

/// Every rank's error from a dispatch over `n` ranks with `backend` and `experts` experts, where
/// `input(rank)` is the rank's tokens and its one expert per token.
fn dispatch_errors(
    n: usize,
    backend: All2AllBackend,
    experts: usize,
    input: impl Fn(usize) -> (HostTensor, Vec<u32>) + Sync,
) -> Vec<String> {
    run_threads(n, TIMEOUT, |rank, g| {
        let ep = group(rank, n, Arc::new(g));
        let cfg = MoeConfig {
            backend,
            placement: ExpertPlacement::linear(experts, n).unwrap(),
        };
        let (x, ids) = input(rank);
        let r = Routing {
            topk_ids: &ids,
            topk_weights: &vec![1.0; ids.len()],
            top_k: 1,
        };
        moe::dispatch(&ep, &cfg, &x.view(), &r)
            .unwrap_err()
            .to_string()
    })
    .into_iter()
    .map(|o| o.unwrap())
    .collect()
}

#[test]
fn a_bad_routing_fails_every_rank_naming_it() {
    let errors = dispatch_errors(3, All2AllBackend::AllToAllV, 6, |rank| {
        // Rank 1 routes a token to expert 9 of 6.
        let ids = if rank == 1 { vec![0, 9] } else { vec![0, 5] };
        (HostTensor::zeros(DType::F32, &[2, 4]), ids)
    });
    for e in errors {
        assert!(e.contains("rank 1: ") && e.contains("expert 9"), "{e}");
    }
}

#[test]
fn ranks_that_disagree_on_the_shape_are_named() {
    let errors = dispatch_errors(2, All2AllBackend::AllGatherReduceScatter, 4, |rank| {
        (
            HostTensor::zeros(DType::F32, &[1, 4 + rank]),
            vec![rank as u32],
        )
    });
    for e in errors {
        assert!(e.contains("another top_k, dtype or hidden shape"), "{e}");
    }
}

#[test]
fn the_backend_setting() {
    assert_eq!(
        "all_to_all_v".parse::<All2AllBackend>().unwrap(),
        All2AllBackend::AllToAllV
    );
    assert_eq!(
        "allgather_reducescatter".parse::<All2AllBackend>().unwrap(),
        All2AllBackend::AllGatherReduceScatter
    );
    let e = "deepep".parse::<All2AllBackend>().unwrap_err().to_string();
    assert!(
        e.contains("all_to_all_v") && e.contains(ALL2ALL_BACKEND_ENV),
        "{e}"
    );
    assert_eq!(
        All2AllBackend::default(),
        All2AllBackend::AllGatherReduceScatter
    );
    // The environment (only this test touches the variable).
    std::env::set_var(ALL2ALL_BACKEND_ENV, "all_to_all_v");
    assert_eq!(
        All2AllBackend::from_env().unwrap(),
        All2AllBackend::AllToAllV
    );
    std::env::set_var(ALL2ALL_BACKEND_ENV, "pplx");
    assert!(All2AllBackend::from_env().is_err());
    std::env::remove_var(ALL2ALL_BACKEND_ENV);
    assert_eq!(
        All2AllBackend::from_env().unwrap(),
        All2AllBackend::AllGatherReduceScatter
    );
}
