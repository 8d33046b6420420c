//! "Same node", decided once for the whole workspace: two processes are on the same node when
//! they can share memory through `/dev/shm` and count as one host to the network.
//!
//! A [`NodeKey`] is the kernel's boot id (a random id drawn at every boot: two machines, or two
//! boots, never share one), the identity of the `/dev/shm` file system (its device and inode: a
//! container with a private `/dev/shm` has its own), and the network namespace. Equal keys mean
//! a segment one process creates, the other can open. The network namespace is part of the key
//! so that ranks in separate network namespaces are separate nodes: they reach each other only
//! through the network, which is what the cross-node path (gloo, the MessageQueue's TCP readers)
//! is for, and how it is tested on one machine. Pid namespaces are not part of it: across them
//! memory is shared and liveness checks say [`Liveness::Unknown`](super::Liveness::Unknown).
//!
//! [`same_node`] is vLLM's `in_the_same_node_as` (one all-gather of the keys instead of a probe
//! segment, so a crash in the middle leaves nothing behind); [`node_keys`] serves callers that
//! need every rank's key.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use dist_core::{HostGroup, HostGroupExt, Result};
use serde::{Deserialize, Serialize};

/// What identifies this process's node; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeKey {
    /// `/proc/sys/kernel/random/boot_id` (the host name when that cannot be read).
    pub boot_id: String,
    /// Device and inode of `/dev/shm`.
    pub shm: (u64, u64),
    /// Inode of the network namespace.
    pub net_ns: u64,
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boot {}, /dev/shm {}:{}, netns {}",
            self.boot_id, self.shm.0, self.shm.1, self.net_ns
        )
    }
}

/// This process's node key (read once).
pub fn node_key() -> NodeKey {
    static KEY: OnceLock<NodeKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let mut boot_id = read("/proc/sys/kernel/random/boot_id");
        if boot_id.is_empty() {
            boot_id = format!("host {}", read("/proc/sys/kernel/hostname"));
        }
        let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        NodeKey {
            boot_id,
            shm: ino("/dev/shm").unwrap_or_default(),
            net_ns: ino("/proc/self/ns/net").map_or(0, |(_, i)| i),
        }
    })
    .clone()
}

/// Collective: every rank's [`NodeKey`], in rank order.
pub fn node_keys(group: &dyn HostGroup) -> Result<Vec<NodeKey>> {
    group.all_gather_obj(&node_key())
}

/// Collective (vLLM's `in_the_same_node_as`): for each rank of `group`, whether it is on the
/// same node as group rank `source_rank`.
pub fn same_node(group: &dyn HostGroup, source_rank: usize) -> Result<Vec<bool>> {
    crate::ensure_arg!(
        source_rank < group.world_size(),
        "same_node: source rank {source_rank} out of range for a group of {}",
        group.world_size()
    );
    let keys = node_keys(group)?;
    Ok(keys.iter().map(|k| *k == keys[source_rank]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::local::run_threads;
    use std::time::Duration;

    #[test]
    fn the_key_is_stable_and_complete() {
        let k = node_key();
        assert_eq!(k, node_key());
        assert!(
            !k.boot_id.is_empty() && k.shm != (0, 0) && k.net_ns != 0,
            "{k}"
        );
    }

    #[test]
    fn ranks_of_one_process_share_a_node() {
        let out = run_threads(3, Duration::from_secs(10), |_, g| {
            (same_node(&g, 2).unwrap(), same_node(&g, 3).is_err())
        });
        for r in out {
            assert_eq!(r.unwrap(), (vec![true; 3], true));
        }
    }

    /// A process in another network namespace is another node, with the same boot and
    /// `/dev/shm`: this test binary started again under `unshare --net` prints its key.
    #[test]
    #[cfg_attr(dist_cpu_not_root, ignore = "needs root (unshare --net)")]
    fn another_network_namespace_is_another_node() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .arg("--net")
            .arg(exe)
            .args([
                "--exact",
                "shm::node::tests::child_prints_its_key",
                "--ignored",
                "--nocapture",
            ])
            .env("DIST_NODE_KEY_CHILD", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("NODEKEY "))
            .unwrap()
            .1;
        let me = node_key();
        let mine = format!("{me}");
        assert_ne!(line.trim(), mine, "same key in another network namespace");
        let prefix = format!(
            "boot {}, /dev/shm {}:{}, netns ",
            me.boot_id, me.shm.0, me.shm.1
        );
        assert!(line.starts_with(&prefix), "{line} vs {mine}");
    }

    #[test]
    #[ignore = "child of another_network_namespace_is_another_node"]
    fn child_prints_its_key() {
        if std::env::var_os("DIST_NODE_KEY_CHILD").is_some() {
            println!("NODEKEY {}", node_key());
        }
    }
}
