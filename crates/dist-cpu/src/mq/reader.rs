//! The readers' side: `dequeue` from the ring (a local reader) or from the writer's TCP
//! stream (a remote reader). Chunk headers are checked by the
//! [`Assembly`](super::assembly::Assembly) before any byte is copied.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dist_core::{decode_obj, Error, Result};
use serde::de::DeserializeOwned;

use crate::shm::{Liveness, ProcessId, ProcessWatch, WaitOutcome};

use super::assembly::Assembly;
use super::remote::{Inbound, RecvEnd, KIND_MSG, KIND_READY, KIND_SHUTDOWN};
use super::ring::{self, Ring};
use super::{lock, MessageQueue, Op, Role, POLL_SLICE};

#[derive(Debug)]
struct ReaderState {
    next_seq: u64,
    asm: Assembly,
    broken: Option<String>,
}

/// A reader on the writer's node: its slot in the ring.
#[derive(Debug)]
pub(super) struct LocalReader {
    ring: Ring,
    slot: usize,
    state: Mutex<ReaderState>,
    writer: ProcessWatch,
}

impl LocalReader {
    /// Attaches to slot `slot` of `ring`: says who it is, then tells a writer that may wait.
    pub(super) fn attach(ring: Ring, slot: usize, cap: usize) -> LocalReader {
        ring.set_reader_id(slot, &ProcessId::me());
        ring.attached(slot)
            .store(ring::SLOT_ATTACHED, Ordering::SeqCst);
        ring.space_bell().ring();
        let writer = ring.writer_id().watch();
        LocalReader {
            ring,
            slot,
            state: Mutex::new(ReaderState {
                next_seq: 0,
                asm: Assembly::new(cap),
                broken: None,
            }),
            writer,
        }
    }

    pub(super) fn ring(&self) -> &Ring {
        &self.ring
    }

    pub(super) fn shutdown(&self) {
        // This reader will not read again: let the writer know (it names us on its next
        // enqueue) and wake our own blocked dequeue.
        self.ring
            .attached(self.slot)
            .store(ring::SLOT_LEFT, Ordering::SeqCst);
        self.ring.space_bell().ring();
        self.ring.data_bell().ring();
    }

    /// `PeerLost` when the writer's process is gone; then its ring's name is removed too (the
    /// writer cannot do it any more).
    pub(super) fn check_writer(&self, writer_rank: usize, op: Op<'_>) -> Result<()> {
        if let Liveness::Dead(why) = self.writer.liveness() {
            self.ring.segment().unlink_if_orphaned();
            return Err(Error::PeerLost {
                rank: writer_rank,
                op: op.to_string(),
                detail: format!("the writer's {why}"),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
struct RemoteState {
    inbound: Inbound,
    /// Messages that arrived while waiting for READY.
    stash: VecDeque<Vec<u8>>,
    ready: bool,
    /// Connections opened again before READY.
    reconnects: u32,
    broken: Option<String>,
}

/// Times a remote reader connects again when the writer closes its connection before READY.
const MAX_RECONNECTS: u32 = 8;

/// A reader on another node: its connection to the writer.
#[derive(Debug)]
pub(super) struct RemoteReader {
    state: Mutex<RemoteState>,
    /// A clone of the socket, to unblock a pending read on shutdown.
    control: Mutex<TcpStream>,
    /// What it takes to connect again (before READY, a connection the writer dropped is retried).
    addr: String,
    store_token: Option<Vec<u8>>,
}

impl RemoteReader {
    pub(super) fn connect(
        addr: &str,
        rank: usize,
        token: &[u8; 16],
        store_token: Option<Vec<u8>>,
        cap: usize,
        deadline: Instant,
    ) -> Result<RemoteReader> {
        let inbound = Inbound::connect(addr, rank, token, store_token.as_deref(), cap, deadline)?;
        let control = inbound
            .stream
            .try_clone()
            .map_err(|e| Error::io("mq: cloning the reader's socket", e))?;
        Ok(RemoteReader {
            state: Mutex::new(RemoteState {
                inbound,
                stash: VecDeque::new(),
                ready: false,
                reconnects: 0,
                broken: None,
            }),
            control: Mutex::new(control),
            addr: addr.to_string(),
            store_token,
        })
    }

    pub(super) fn shutdown(&self) {
        let _ = lock(&self.control).shutdown(std::net::Shutdown::Both);
    }

    /// Reads until READY, keeping the messages that come before it.
    pub(super) fn wait_ready(
        &self,
        mq: &MessageQueue,
        deadline: Instant,
        start: Instant,
        op: Op<'_>,
    ) -> Result<()> {
        let mut st = lock(&self.state);
        while !st.ready {
            match mq.recv_frame(self, &mut st, deadline, start, op)? {
                Some(p) => st.stash.push_back(p),
                None => st.ready = true,
            }
        }
        Ok(())
    }
}

impl MessageQueue {
    /// Receives the next message, waiting at most [`Options::timeout`](super::Options::timeout).
    pub fn dequeue_bytes(&self) -> Result<Vec<u8>> {
        self.dequeue_bytes_timeout(self.opts.timeout)
    }

    /// Receives the next message as a typed value (postcard, capped).
    pub fn dequeue<T: DeserializeOwned>(&self) -> Result<T> {
        let b = self.dequeue_bytes()?;
        decode_obj(&b, self.opts.max_message_bytes)
    }

    /// Receives the next typed value, waiting at most `timeout`.
    pub fn dequeue_timeout<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        let b = self.dequeue_bytes_timeout(timeout)?;
        decode_obj(&b, self.opts.max_message_bytes)
    }

    /// Receives the next message, waiting at most `timeout`. A timeout in the middle of a
    /// message keeps what arrived; the next call continues it.
    pub fn dequeue_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let deadline = start + timeout;
        match &self.role {
            Role::Writer(_) => Err(Error::invalid(format!(
                "mq: rank {} is the writer; readers dequeue",
                self.rank
            ))),
            Role::Local(r) => self.dequeue_local(r, deadline, start),
            Role::Remote(r) => {
                let op = self.op("dequeue");
                let mut st = lock(&r.state);
                if let Some(m) = st.stash.pop_front() {
                    return Ok(m);
                }
                loop {
                    match self.recv_frame(r, &mut st, deadline, start, op)? {
                        Some(m) => return Ok(m),
                        None => st.ready = true,
                    }
                }
            }
        }
    }

    /// Fails when the ring says the writer shut the queue down (after what was published).
    fn check_ring_shutdown(ring: &Ring, op: Op<'_>) -> Result<()> {
        match ring.shutdown().load(Ordering::Acquire) {
            ring::SHUTDOWN_NONE => Ok(()),
            ring::SHUTDOWN_ABORTED => Err(Error::Shutdown(format!(
                "{op}: the writer aborted the queue in the middle of a message"
            ))),
            _ => Err(Error::Shutdown(format!(
                "{op}: the writer shut the queue down"
            ))),
        }
    }

    fn dequeue_local(&self, r: &LocalReader, deadline: Instant, start: Instant) -> Result<Vec<u8>> {
        let ring = &r.ring;
        let op = self.op("dequeue");
        let mut st = lock(&r.state);
        self.check_cancel(op)?;
        if let Some(b) = &st.broken {
            return Err(Error::protocol(format!("{op}: {b}")));
        }
        loop {
            let k = st.next_seq;
            let ready = || ring.write_seq().load(Ordering::Acquire) > k;
            if !ready() {
                let mut last_live = Instant::now();
                let outcome =
                    ring.data_bell()
                        .wait_with(self.spin, deadline, POLL_SLICE, ready, || {
                            self.check_cancel(op)?;
                            Self::check_ring_shutdown(ring, op)?;
                            let now = Instant::now();
                            if now.duration_since(last_live) >= POLL_SLICE {
                                last_live = now;
                                r.check_writer(self.handle.writer_rank, op)?;
                            }
                            Ok(())
                        })?;
                if outcome == WaitOutcome::TimedOut {
                    let detail = match st.asm.progress() {
                        Some((got, total)) => format!(
                            "no chunk {k} from the writer; {got} of a {total}-byte message received, the rest is kept"
                        ),
                        None => format!("no message from the writer (waiting for chunk {k})"),
                    };
                    return Err(Error::Timeout {
                        op: op.to_string(),
                        waited: start.elapsed(),
                        missing_ranks: vec![self.handle.writer_rank],
                        detail,
                    });
                }
            }
            let h = match ring.chunk_header(k) {
                Ok(h) => h,
                Err(e) => {
                    st.broken = Some(e.to_string());
                    return Err(e);
                }
            };
            let buf = match st.asm.accept(&h) {
                Ok(b) => b,
                Err(why) => {
                    let e = format!("{op}: corrupt chunk {k}: {why}");
                    st.broken = Some(e.clone());
                    return Err(Error::protocol(e));
                }
            };
            ring.read_chunk_into(k, h.len, buf);
            // Release the chunk; wake the writer only if it sleeps waiting for room.
            ring.read_seq(r.slot).store(k + 1, Ordering::Release);
            ring.space_bell().notify();
            st.next_seq = k + 1;
            if let Some(m) = st.asm.finish(&h) {
                return Ok(m);
            }
        }
    }

    /// Next frame on a remote reader: `Some(message)` or `None` for READY. Before READY, a
    /// connection the writer closed (it pushed it out while flooded, say) is opened again.
    fn recv_frame(
        &self,
        r: &RemoteReader,
        st: &mut RemoteState,
        deadline: Instant,
        start: Instant,
        op: Op<'_>,
    ) -> Result<Option<Vec<u8>>> {
        loop {
            self.check_cancel(op)?;
            if let Some(b) = &st.broken {
                return Err(Error::Shutdown(format!("{op}: {b}")));
            }
            let cancelled = || self.cancel.load(Ordering::Acquire);
            let writer = self.handle.writer_rank;
            let lost = match st.inbound.next_frame(deadline, POLL_SLICE, cancelled) {
                Ok(f) => {
                    return match f.kind {
                        KIND_MSG => Ok(Some(f.payload)),
                        KIND_READY => Ok(None),
                        KIND_SHUTDOWN => {
                            st.broken = Some("the writer shut the queue down".into());
                            Err(Error::Shutdown(format!(
                                "{op}: the writer shut the queue down"
                            )))
                        }
                        k => Err(Error::protocol(format!("{op}: frame kind {k}"))),
                    }
                }
                Err(_) if cancelled() => {
                    return Err(Error::Shutdown(format!("{op}: this queue was shut down")))
                }
                Err(RecvEnd::TimedOut) => {
                    return Err(Error::Timeout {
                        op: op.to_string(),
                        waited: start.elapsed(),
                        missing_ranks: vec![writer],
                        detail: if st.inbound.dec.is_idle() {
                            "no message from the writer".into()
                        } else {
                            "a message is partly received; the rest is kept".into()
                        },
                    })
                }
                Err(RecvEnd::Bad(e)) => {
                    st.broken = Some(e.to_string());
                    let _ = st.inbound.stream.shutdown(std::net::Shutdown::Both);
                    return Err(e);
                }
                Err(RecvEnd::Eof) => "the writer closed the connection".to_string(),
                Err(RecvEnd::Failed(e)) => format!("connection error: {e}"),
            };
            if !st.ready && st.reconnects < MAX_RECONNECTS && Instant::now() < deadline {
                // Not admitted yet: the writer may have pushed us out among junk; knock again,
                // briefly (a writer that is gone refuses at once).
                st.reconnects += 1;
                std::thread::sleep(Duration::from_millis(10).min(deadline - Instant::now()));
                let again = Inbound::connect(
                    &r.addr,
                    self.rank,
                    &self.handle.token,
                    r.store_token.as_deref(),
                    self.opts.max_message_bytes,
                    deadline.min(Instant::now() + Duration::from_millis(200)),
                );
                if let Ok(inbound) = again {
                    if let Ok(c) = inbound.stream.try_clone() {
                        *lock(&r.control) = c;
                    }
                    st.inbound = inbound;
                    continue;
                }
            }
            st.broken = Some(lost.clone());
            return Err(Error::PeerLost {
                rank: writer,
                op: op.to_string(),
                detail: lost,
            });
        }
    }
}
