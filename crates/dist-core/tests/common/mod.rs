//! Support shared by the integration tests of dist-core.

use std::sync::Arc;
use std::time::Duration;

use dist_core::host_comm::{HostBackend, HostCommunicator};
use dist_core::{CoordinatorParts, Device, GroupCoordinator, HostGroup};

/// Rank `rank` of an `n`-rank coordinator named `name` over `host`, with a host communicator of
/// deadline `timeout` where one is given (none: the coordinator has no device communicator).
pub fn host_coordinator(
    name: &str,
    rank: usize,
    n: usize,
    host: Arc<dyn HostGroup>,
    timeout: Option<Duration>,
) -> GroupCoordinator<HostBackend> {
    GroupCoordinator::new(CoordinatorParts {
        unique_name: name.into(),
        ranks: (0..n).collect(),
        rank,
        local_rank: rank,
        device: Device::CPU,
        host: host.clone(),
        comm: timeout.map(|t| HostCommunicator::new(host, t)),
        mq: None,
        diag: None,
        check_collectives: false,
    })
    .unwrap()
}
