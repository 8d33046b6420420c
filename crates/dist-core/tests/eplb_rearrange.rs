//! The rearrangement of expert weights with ranks as threads (host communicator over a thread
//! group): after each plan every rank's slots hold exactly the new map's experts, bit for bit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dist_core::eplb::{rearrange_experts, rebalance_experts, PolicyParams};
use dist_core::host_comm::HostBackend;
use dist_core::local::run_threads;
use dist_core::{DType, GroupCoordinator, HostGroup, HostTensor};

const TIMEOUT: Duration = Duration::from_secs(20);

fn group(rank: usize, n: usize, host: Arc<dyn HostGroup>) -> GroupCoordinator<HostBackend> {
    common::host_coordinator("ep:0", rank, n, host, Some(TIMEOUT))
}

/// The weights of logical expert `e` of layer `l`: two tensors of different dtypes and shapes.
fn expert(l: usize, e: usize) -> Vec<HostTensor> {
    let seed = (l * 1000 + e) as u64 * 2;
    vec![
        HostTensor::random(DType::F32, &[4, 3], seed),
        HostTensor::random(DType::BF16, &[5], seed + 1),
    ]
}

fn slots_of(map: &[Vec<usize>], rank: usize, per: usize) -> Vec<Vec<Vec<HostTensor>>> {
    map.iter()
        .enumerate()
        .map(|(l, row)| {
            row[rank * per..(rank + 1) * per]
                .iter()
                .map(|&e| expert(l, e))
                .collect()
        })
        .collect()
}

/// Where every slot's tensors live: the rearrangement must write into this memory.
fn addresses(w: &[Vec<Vec<HostTensor>>]) -> Vec<usize> {
    w.iter()
        .flatten()
        .flatten()
        .map(|t| t.as_bytes().as_ptr() as usize)
        .collect()
}

#[test]
fn ranks_hold_the_plans_experts() {
    let (n, per, experts, layers) = (4, 3, 8, 2);
    let params = PolicyParams {
        num_replicas: n * per,
        num_groups: 4,
        num_nodes: 2,
        num_ranks: n,
    };
    let initial: Vec<Vec<usize>> = (0..layers)
        .map(|_| (0..n * per).map(|s| s % experts).collect())
        .collect();
    let load1: Vec<Vec<u64>> = vec![
        vec![900, 10, 20, 700, 5, 300, 40, 1],
        vec![1, 2, 3, 4, 500, 600, 700, 800],
    ];
    let plan1 = rebalance_experts(&load1, &params, None).unwrap();
    let old1: Vec<Vec<i64>> = plan1
        .iter()
        .map(|r| r.iter().map(|&e| e as i64).collect())
        .collect();
    let load2: Vec<Vec<u64>> = vec![
        vec![5, 800, 20, 7, 900, 30, 40, 1],
        vec![800, 2, 3, 700, 5, 6, 7, 600],
    ];
    let plan2 = rebalance_experts(&load2, &params, Some(&old1)).unwrap();
    assert_ne!(plan1, initial);
    assert_ne!(plan2, plan1);
    let out = run_threads(n, TIMEOUT, |rank, g| {
        let ep = group(rank, n, Arc::new(g));
        let mut w = slots_of(&initial, rank, per);
        let before = addresses(&w);
        let s1 = rearrange_experts(&ep, &initial, &plan1, &mut w).unwrap();
        assert_eq!(w, slots_of(&plan1, rank, per), "rank {rank} after plan 1");
        let s2 = rearrange_experts(&ep, &plan1, &plan2, &mut w).unwrap();
        assert_eq!(w, slots_of(&plan2, rank, per), "rank {rank} after plan 2");
        assert_eq!(addresses(&w), before, "rank {rank}: a slot's memory moved");
        (s1, s2)
    });
    let (mut moved, mut staged) = (0, 0);
    for o in out {
        let (s1, s2) = o.unwrap();
        moved += s1.iter().chain(&s2).map(|s| s.received).sum::<usize>();
        staged += s1.iter().chain(&s2).map(|s| s.staged).sum::<usize>();
    }
    assert!(moved > 0, "the plans moved no expert between ranks");
    // Both paths ran: receives straight into a slot and receives through staging.
    assert!(staged > 0 && staged < moved, "{staged} of {moved} staged");
}

#[test]
fn a_rank_with_other_maps_is_named() {
    let (n, per) = (3, 2);
    let old: Vec<Vec<usize>> = vec![(0..n * per).map(|s| s % 4).collect()];
    let new = vec![vec![3, 2, 1, 0, 0, 1]];
    let other = vec![vec![3, 2, 1, 0, 1, 0]];
    let out = run_threads(n, TIMEOUT, |rank, g| {
        let ep = group(rank, n, Arc::new(g));
        let mut w = slots_of(&old, rank, per);
        let mine = if rank == 2 { &other } else { &new };
        rearrange_experts(&ep, &old, mine, &mut w)
            .unwrap_err()
            .to_string()
    });
    for o in out {
        let e = o.unwrap();
        assert!(e.contains("ranks [2]"), "{e}");
    }
}

#[test]
fn cycles_swaps_and_duplicates_stay_in_place() {
    // Local rotations (every local copy reads a slot that is written), experts swapped across
    // ranks (every receive lands in a slot whose old expert is sent), duplicates, and a world
    // of one rank (local copies only, no communicator traffic).
    let cases: Vec<(usize, Vec<usize>, Vec<usize>)> = vec![
        (1, vec![0, 1, 2, 3], vec![3, 2, 1, 0]),
        (1, vec![0, 1, 2], vec![1, 2, 0]),
        (2, vec![0, 1, 2, 3, 4, 5], vec![2, 0, 1, 5, 3, 4]),
        (2, vec![0, 1, 2, 3, 4, 5], vec![3, 4, 5, 0, 1, 2]),
        (2, vec![0, 1, 2, 3, 4, 5], vec![3, 3, 0, 0, 1, 2]),
        (3, vec![0, 1, 2, 3, 4, 5], vec![5, 5, 3, 0, 1, 0]),
    ];
    for (n, old, new) in cases {
        let per = old.len() / n;
        let (old, new) = (vec![old], vec![new]);
        let out = run_threads(n, TIMEOUT, |rank, g| {
            let ep = group(rank, n, Arc::new(g));
            let mut w = slots_of(&old, rank, per);
            let before = addresses(&w);
            rearrange_experts(&ep, &old, &new, &mut w).unwrap();
            assert_eq!(
                w,
                slots_of(&new, rank, per),
                "rank {rank}: {old:?} -> {new:?}"
            );
            assert_eq!(addresses(&w), before, "rank {rank}: a slot's memory moved");
        });
        for o in out {
            o.unwrap();
        }
    }
}
