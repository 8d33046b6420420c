//! [`ShmHostGroup`]: vLLM's "cpu group" operations (barrier, bytes and typed objects) among the
//! ranks of one node, over a shared-memory communicator of its own.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use dist_core::{DType, DeviceCommunicator, Error, HostGroup, HostTensor, ReduceOp, Result};

use super::ShmCommunicator;

/// A [`HostGroup`] at shared-memory speed for ranks on one node.
///
/// It is built once over a slower *bootstrap* group (the store-backed `StatelessProcessGroup`,
/// say), which it uses only to exchange segment names. Collectives are those of its own
/// [`ShmCommunicator`] (segments separate from any device communicator's); byte messages carry
/// their length first, and every length is checked against [`HostGroup::max_object_bytes`]
/// before anything is allocated. Messages to a peer of up to two slots (256 KiB up to 8 ranks)
/// are sent without waiting for the receiver; larger ones wait for it to receive, unlike the
/// store-backed group, so a pair must not both send large messages before receiving. A rank
/// may send to itself (queued locally).
#[derive(Debug)]
pub struct ShmHostGroup {
    comm: ShmCommunicator,
    max_object_bytes: usize,
    to_self: Mutex<VecDeque<Vec<u8>>>,
}

impl ShmHostGroup {
    /// Builds the group of `bootstrap`'s ranks, named `name` (segment names and errors use it).
    /// Collective over `bootstrap`, which must have all its ranks on this node.
    pub fn new(bootstrap: &dyn HostGroup, name: &str, timeout: Duration) -> Result<Self> {
        let comm = ShmCommunicator::new(bootstrap, &format!("{name}.hg"), timeout)?;
        Ok(ShmHostGroup {
            comm,
            max_object_bytes: bootstrap.max_object_bytes(),
            to_self: Mutex::new(VecDeque::new()),
        })
    }

    /// Changes the cap on message sizes (every rank should use the same).
    pub fn with_max_object_bytes(mut self, n: usize) -> Self {
        self.max_object_bytes = n;
        self
    }

    /// The communicator underneath.
    pub fn communicator(&self) -> &ShmCommunicator {
        &self.comm
    }

    fn check_len(&self, len: u64, from: usize, what: &str) -> Result<usize> {
        if len > self.max_object_bytes as u64 {
            return Err(Error::protocol(format!(
                "{} {what}: rank {from} sends {len} bytes, over the cap of {}",
                self.comm.group_name(),
                self.max_object_bytes
            )));
        }
        Ok(len as usize)
    }
}

fn u64_tensor(v: u64) -> Result<HostTensor> {
    HostTensor::from_vec(&[1], vec![v])
}

impl HostGroup for ShmHostGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn timeout(&self) -> Duration {
        self.comm.timeout()
    }
    fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    fn barrier(&self) -> Result<()> {
        // Every rank publishes its data and waits for everyone's: a barrier.
        let mut t = HostTensor::zeros(DType::U8, &[1]);
        self.comm
            .all_reduce_in_place(&mut t.view_mut(), ReduceOp::Max)
    }

    fn broadcast_bytes(&self, data: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        self.comm.check_rank(src, "broadcast src")?;
        let me = self.rank() == src;
        crate::ensure_arg!(
            !me || data.is_some(),
            "broadcast: the source must pass data"
        );
        let mine = if me { data.unwrap_or_default() } else { &[] };
        if me {
            self.check_len(mine.len() as u64, src, "broadcast")?;
        }
        let mut len = u64_tensor(mine.len() as u64)?;
        self.comm.broadcast(&mut len.view_mut(), src)?;
        let n = self.check_len(len.as_slice::<u64>()?[0], src, "broadcast")?;
        let mut t = if me {
            HostTensor::from_slice(&[n], mine)?
        } else {
            HostTensor::zeros(DType::U8, &[n])
        };
        self.comm.broadcast(&mut t.view_mut(), src)?;
        Ok(t.as_bytes().to_vec())
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.check_len(data.len() as u64, self.rank(), "all_gather")?;
        let lens = self.comm.all_gather(&u64_tensor(data.len() as u64)?, 0)?;
        let sizes = lens
            .as_slice::<u64>()?
            .iter()
            .enumerate()
            .map(|(r, &l)| self.check_len(l, r, "all_gather"))
            .collect::<Result<Vec<usize>>>()?;
        let total: usize = sizes.iter().sum();
        crate::ensure_arg!(
            total <= self.max_object_bytes.saturating_mul(self.world_size()),
            "all_gather: {total} bytes in all"
        );
        let all =
            self.comm
                .all_gatherv(&HostTensor::from_slice(&[data.len()], data)?, 0, &sizes)?;
        let bytes = all.as_bytes();
        let mut off = 0;
        Ok(sizes
            .iter()
            .map(|&l| {
                let v = bytes[off..off + l].to_vec();
                off += l;
                v
            })
            .collect())
    }

    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.comm.check_rank(dst, "send dst")?;
        self.check_len(data.len() as u64, self.rank(), "send")?;
        if dst == self.rank() {
            self.to_self
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(data.to_vec());
            return Ok(());
        }
        self.comm.run("send_bytes", |st, o| {
            self.comm.send_message(st, o, data, DType::U8, dst)
        })
    }

    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        self.comm.check_rank(src, "recv src")?;
        if src == self.rank() {
            return self
                .to_self
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
                .ok_or_else(|| {
                    Error::invalid("recv from this rank itself: nothing was sent to it (it would never arrive)")
                });
        }
        let cap = self.max_object_bytes;
        self.comm.run("recv_bytes", |st, o| {
            self.comm
                .recv_message(st, o, None, DType::U8, src, cap)
                .map(Option::unwrap_or_default)
        })
    }
}
