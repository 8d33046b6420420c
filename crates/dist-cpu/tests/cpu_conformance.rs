//! The shared-memory communicator through the workspace's conformance suite
//! (`dist_core::conformance::check_all`: every op, owned and into poisoned outputs, all-to-all-v,
//! grouped point-to-point), ranks as threads, with the default buffers and with buffers small
//! enough that every message and collective goes in many chunks.

use std::time::Duration;

use dist_core::conformance::{check_all, Suite};
use dist_core::local::run_threads;
use dist_cpu::{CpuBackend, CpuCommunicator, ShmCommunicator, ShmConfig};

const T: Duration = Duration::from_secs(120);

fn run(world: usize, cfg: Option<ShmConfig>, suite: &Suite) {
    let out = run_threads(world, T, |_, g| {
        let c = ShmCommunicator::with_config(&g, &format!("conf-w{world}"), T, cfg).unwrap();
        check_all::<CpuBackend>(&CpuCommunicator::Shm(c), suite)
    });
    for (r, x) in out.into_iter().enumerate() {
        let checks = x
            .unwrap_or_else(|_| panic!("world {world} rank {r} panicked"))
            .unwrap_or_else(|e| panic!("world {world} rank {r}: {e}"));
        assert!(checks > 100, "world {world} rank {r}: only {checks} checks");
    }
}

#[test]
fn shm_default_buffers_every_world() {
    for world in [1, 2, 3, 4] {
        run(world, None, &Suite::quick(true));
    }
}

#[test]
fn shm_tiny_buffers_chunk_everything() {
    let cfg = Some(ShmConfig {
        half_bytes: 8192,
        slot_bytes: 512,
        threads: 1,
    });
    let mut suite = Suite::quick(true);
    suite.lengths = vec![0, 1, 7, 5000];
    for world in [2, 3] {
        run(world, cfg, &suite);
    }
}
