//! Building a queue — collectively over a group, or side by side from a [`Handle`] — and
//! waiting until every reader is there.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::{Error, HostGroup, HostGroupExt, Result};

use crate::shm::WaitOutcome;

use super::admission::Secrets;
use super::reader::{LocalReader, RemoteReader};
use super::remote::{self, Acceptor, KIND_READY};
use super::ring::{self, Geometry, Ring};
use super::writer::Writer;
use super::{
    env_flag, lock, secret, Handle, MessageQueue, Options, Role, HARD_MAX_MESSAGE, POLL_SLICE,
};

static QUEUE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A segment tag unique within this process (its identity is in the segment's name).
fn segment_tag() -> String {
    let salt = secret::random_token().map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
    format!(
        "mq.{}.{salt:08x}",
        QUEUE_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The IP the writer listens on by default (see [`Options::bind_ip`]).
fn default_ip() -> IpAddr {
    for var in ["DIST_HOST_IP", "VLLM_HOST_IP"] {
        if let Some(ip) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
            return ip;
        }
    }
    if let Ok(master) = std::env::var("MASTER_ADDR") {
        let target = format!("{}:80", master.trim());
        if let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&target) {
            for a in addrs {
                let any: IpAddr = if a.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                // A UDP "connect" sends nothing; it only picks the route and the local address.
                if let Ok(s) = std::net::UdpSocket::bind((any, 0)) {
                    if s.connect(a).is_ok() {
                        if let Ok(l) = s.local_addr() {
                            return l.ip();
                        }
                    }
                }
            }
        }
    }
    Ipv4Addr::LOCALHOST.into()
}

fn backend_error(message: String) -> Error {
    Error::Backend {
        backend: "shm",
        code: None,
        message,
    }
}

impl MessageQueue {
    /// Collective over `group`: makes a queue whose writer is `writer_rank` and whose readers are
    /// all the other ranks, with `max_chunks` chunks of `max_chunk_bytes`; returns once every
    /// reader is attached ([`MessageQueue::wait_until_ready`]). Deadlines: `group.timeout()`.
    pub fn create_from_group(
        group: &dyn HostGroup,
        writer_rank: usize,
        max_chunk_bytes: usize,
        max_chunks: usize,
    ) -> Result<MessageQueue> {
        let opts = Options {
            max_chunk_bytes,
            max_chunks,
            timeout: group.timeout(),
            ..Options::default()
        };
        Self::create_from_group_with(group, writer_rank, opts, true)
    }

    /// [`MessageQueue::create_from_group`] with every option; `blocking = false` skips
    /// [`MessageQueue::wait_until_ready`] (each rank must then call it).
    pub fn create_from_group_with(
        group: &dyn HostGroup,
        writer_rank: usize,
        opts: Options,
        blocking: bool,
    ) -> Result<MessageQueue> {
        let r = Self::build_on_group(group, writer_rank, opts, blocking);
        if r.is_err() && group.rank() != writer_rank {
            // A writer that died while setting up cannot remove its ring; nobody else knows it.
            crate::shm::remove_stale_segments();
        }
        r
    }

    fn build_on_group(
        group: &dyn HostGroup,
        writer_rank: usize,
        opts: Options,
        blocking: bool,
    ) -> Result<MessageQueue> {
        let ws = group.world_size();
        let rank = group.rank();
        crate::ensure_arg!(
            writer_rank < ws,
            "mq: writer rank {writer_rank} out of range for world size {ws}"
        );
        let force_remote = opts.force_remote || env_flag("DIST_MQ_FORCE_REMOTE");

        // 1. Who shares the writer's node (the workspace's one definition of it), and who
        // asked for TCP anyway (a writer asking sends everyone over TCP).
        let keys: Vec<(crate::shm::NodeKey, bool)> =
            group.all_gather_obj(&(crate::shm::node_key(), force_remote))?;
        let (local, remote): (Vec<usize>, Vec<usize>) = (0..ws)
            .filter(|&r| r != writer_rank)
            .partition(|&r| keys[r].0 == keys[writer_rank].0 && !keys[r].1 && !keys[writer_rank].1);

        // 2. The writer makes the ring and the listener and says where they are (or why not).
        let mut writer = None;
        let made: Option<std::result::Result<Handle, String>> = (rank == writer_rank).then(|| {
            match Self::create_writer(writer_rank, &local, &remote, opts.clone()) {
                Ok(w) => {
                    let h = w.handle.clone();
                    writer = Some(w);
                    Ok(h)
                }
                Err(e) => Err(e.to_string()),
            }
        });
        let handle: std::result::Result<Handle, String> =
            group.broadcast_obj(made.as_ref(), writer_rank)?;
        let handle = handle.map_err(|e| {
            backend_error(format!(
                "mq: the writer (rank {writer_rank}) could not make the queue: {e}"
            ))
        })?;

        // 3. Every reader opens its side, and everyone learns who could not.
        let mine = match writer {
            Some(w) => Ok(w),
            None => Self::open_reader(&handle, rank, opts.clone()),
        };
        let report: std::result::Result<(), String> =
            mine.as_ref().map(|_| ()).map_err(|e| e.to_string());
        let reports: Vec<std::result::Result<(), String>> = group.all_gather_obj(&report)?;
        let failed: Vec<String> = reports
            .iter()
            .enumerate()
            .filter_map(|(r, x)| x.as_ref().err().map(|e| format!("rank {r}: {e}")))
            .collect();
        let mq = mine?;
        if !failed.is_empty() {
            return Err(backend_error(format!(
                "mq: readers could not open their side of the queue (writer rank {writer_rank}): {}",
                failed.join("; ")
            )));
        }

        // 4. Every local reader has attached: the name can go, so a crash leaves nothing.
        if let Role::Writer(w) = &mq.role {
            w.unlink_when_attached();
        }
        if blocking {
            mq.wait_until_ready(opts.timeout)?;
        }
        Ok(mq)
    }

    /// Makes the writer's side without a group: `local_reader_ranks` read shared memory (on this
    /// node), `remote_reader_ranks` connect over TCP. Give [`MessageQueue::handle`] to the readers.
    pub fn create_writer(
        writer_rank: usize,
        local_reader_ranks: &[usize],
        remote_reader_ranks: &[usize],
        opts: Options,
    ) -> Result<MessageQueue> {
        let mut all: Vec<usize> = local_reader_ranks
            .iter()
            .chain(remote_reader_ranks)
            .copied()
            .collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        crate::ensure_arg!(
            all.len() == n && !all.contains(&writer_rank),
            "mq: reader ranks must be distinct and differ from the writer's ({writer_rank})"
        );
        crate::ensure_arg!(
            opts.max_message_bytes <= HARD_MAX_MESSAGE,
            "mq: max_message_bytes {} over the hard cap {HARD_MAX_MESSAGE}",
            opts.max_message_bytes
        );
        let local = local_reader_ranks.to_vec();
        let remote = remote_reader_ranks.to_vec();
        let geo = Geometry::new(local.len(), opts.max_chunks, opts.max_chunk_bytes)?;
        let token = secret::random_token().map_err(|e| Error::io("mq: reading /dev/urandom", e))?;
        let ring = if local.is_empty() {
            None
        } else {
            crate::shm::remove_stale_segments();
            Some(Ring::create(&segment_tag(), geo, &token)?)
        };
        let (acceptor, remote_addr) = if remote.is_empty() {
            (None, None)
        } else {
            let ip = opts.bind_ip.unwrap_or_else(default_ip);
            let l = TcpListener::bind((ip, 0))
                .map_err(|e| Error::io(format!("mq: listening on {ip} for remote readers"), e))?;
            let addr = l
                .local_addr()
                .map_err(|e| Error::io("mq: listener address", e))?
                .to_string();
            let acc = Acceptor::start(
                l,
                remote.clone(),
                Secrets {
                    token,
                    store_token: opts.store_token.clone(),
                },
                opts.max_chunks,
                format!("writer rank {writer_rank}"),
            )?;
            (Some(acc), Some(addr))
        };
        let handle = Handle {
            writer_rank,
            local_reader_ranks: local.clone(),
            remote_reader_ranks: remote,
            segment: ring.as_ref().map(|r| r.name().to_string()),
            slots: geo.slots as u64,
            max_chunks: geo.chunks as u64,
            max_chunk_bytes: geo.chunk_bytes as u64,
            max_message_bytes: opts.max_message_bytes as u64,
            remote_addr,
            token,
        };
        let spin = opts.spin(1 + local.len());
        Ok(MessageQueue {
            rank: writer_rank,
            handle,
            opts,
            spin,
            role: Role::Writer(Writer::new(ring, acceptor, local, geo.chunks)),
            cancel: AtomicBool::new(false),
        })
    }

    /// Opens reader `rank`'s side from the writer's handle: the ring if `rank` is a local reader,
    /// a TCP connection otherwise.
    pub fn open_reader(handle: &Handle, rank: usize, mut opts: Options) -> Result<MessageQueue> {
        let geo = handle.geometry()?;
        crate::ensure_arg!(
            handle.max_message_bytes as usize <= HARD_MAX_MESSAGE,
            "mq handle: max_message_bytes {} over the hard cap",
            handle.max_message_bytes
        );
        opts.max_message_bytes = handle.max_message_bytes as usize;
        opts.max_chunks = geo.chunks;
        opts.max_chunk_bytes = geo.chunk_bytes;
        let deadline = Instant::now() + opts.timeout;
        let role = if let Some(slot) = handle.local_reader_ranks.iter().position(|&r| r == rank) {
            let name = handle
                .segment
                .as_deref()
                .ok_or_else(|| Error::invalid("mq handle: local readers but no segment"))?;
            crate::ensure_arg!(
                slot < geo.slots,
                "mq handle: {} local readers but {} slots",
                handle.local_reader_ranks.len(),
                geo.slots
            );
            let ring = Ring::open(name, geo, &handle.token, opts.timeout)?;
            Role::Local(LocalReader::attach(ring, slot, opts.max_message_bytes))
        } else if handle.remote_reader_ranks.contains(&rank) {
            let addr = handle
                .remote_addr
                .as_deref()
                .ok_or_else(|| Error::invalid("mq handle: remote readers but no address"))?;
            Role::Remote(RemoteReader::connect(
                addr,
                rank,
                &handle.token,
                opts.store_token.clone(),
                opts.max_message_bytes,
                deadline,
            )?)
        } else {
            return Err(Error::invalid(format!(
                "mq: rank {rank} is not a reader of this queue (writer {}, local readers {:?}, remote readers {:?})",
                handle.writer_rank, handle.local_reader_ranks, handle.remote_reader_ranks
            )));
        };
        let spin = opts.spin(1 + handle.local_reader_ranks.len());
        Ok(MessageQueue {
            rank,
            handle: handle.clone(),
            opts,
            spin,
            role,
            cancel: AtomicBool::new(false),
        })
    }

    /// Collective: the writer waits until every reader has attached (local) or connected and
    /// proved its token (remote), then releases them; readers wait for that. Fails after
    /// `timeout` naming the ranks that did not come.
    pub fn wait_until_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let op = self.op("wait_until_ready");
        match &self.role {
            Role::Writer(w) => {
                if let Some(ring) = w.ring() {
                    let n = self.handle.local_reader_ranks.len();
                    let all_attached = || {
                        (0..n).all(|i| ring.attached(i).load(Ordering::SeqCst) != ring::SLOT_EMPTY)
                    };
                    let outcome = ring.space_bell().wait_with(
                        self.spin,
                        deadline,
                        POLL_SLICE,
                        all_attached,
                        || self.check_cancel(op),
                    )?;
                    if outcome == WaitOutcome::TimedOut {
                        let missing = (0..n)
                            .filter(|&i| {
                                ring.attached(i).load(Ordering::SeqCst) == ring::SLOT_EMPTY
                            })
                            .map(|i| self.handle.local_reader_ranks[i])
                            .collect();
                        return Err(Error::Timeout {
                            op: op.to_string(),
                            waited: start.elapsed(),
                            missing_ranks: missing,
                            detail: "local readers did not attach to the ring".into(),
                        });
                    }
                    w.unlink_when_attached();
                }
                if let Some(acc) = w.acceptor() {
                    let mut links = lock(&acc.links);
                    while links.iter().any(Option::is_none) {
                        self.check_cancel(op)?;
                        let now = Instant::now();
                        if now >= deadline {
                            let addr = self.handle.remote_addr.as_deref().unwrap_or("?");
                            return Err(self.handle.remote_readers_timeout(
                                op,
                                start,
                                &links,
                                format!(
                                    "remote readers did not connect to {addr} with the queue's token"
                                ),
                            ));
                        }
                        links = acc
                            .cv
                            .wait_timeout(links, (deadline - now).min(POLL_SLICE))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    let ready = Arc::new(remote::encode_frame(KIND_READY, &[]));
                    for l in links.iter().flatten() {
                        l.push(u64::MAX, ready.clone());
                    }
                }
                if let Some(ring) = w.ring() {
                    ring.ready().store(1, Ordering::SeqCst);
                    ring.data_bell().ring();
                }
                Ok(())
            }
            Role::Local(r) => {
                let ring = r.ring();
                let outcome = ring.data_bell().wait_with(
                    self.spin,
                    deadline,
                    POLL_SLICE,
                    || ring.ready().load(Ordering::SeqCst) != 0,
                    || {
                        self.check_cancel(op)?;
                        if ring.shutdown().load(Ordering::Acquire) != ring::SHUTDOWN_NONE {
                            return Err(Error::Shutdown(format!(
                                "{op}: the writer shut the queue down"
                            )));
                        }
                        r.check_writer(self.handle.writer_rank, op)
                    },
                )?;
                match outcome {
                    WaitOutcome::Ready => Ok(()),
                    WaitOutcome::TimedOut => Err(Error::Timeout {
                        op: op.to_string(),
                        waited: start.elapsed(),
                        missing_ranks: vec![self.handle.writer_rank],
                        detail: "the writer did not release the readers (are all readers up?)"
                            .into(),
                    }),
                }
            }
            Role::Remote(r) => r.wait_ready(self, deadline, start, op),
        }
    }
}
