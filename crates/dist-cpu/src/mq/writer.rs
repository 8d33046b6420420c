//! The writer's side: `enqueue`, waiting for room in the ring and in remote readers' queues,
//! watching the readers, the stuck-reader report, shutdown. The bookkeeping is the
//! [`Tracker`](super::tracker::Tracker); this file reads the ring and the sockets for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dist_core::{encode_obj, Error, Result};
use serde::Serialize;

use crate::shm::{liveness_all, Liveness, ProcessWatch, WaitOutcome};

use super::remote::{self, Acceptor, Link, KIND_MSG, KIND_SHUTDOWN};
use super::ring::{self, Ring};
use super::tracker::{blocking, Plan, Slot, Tracker};
use super::{lock, MessageQueue, Op, Role, StuckReader, LIVENESS_EVERY, POLL_SLICE};

#[derive(Debug)]
struct WriterState {
    tracker: Tracker,
    /// Messages enqueued so far.
    msg_no: u64,
    last_live_check: Instant,
    /// A watch on each local reader's process, made once its slot says who it is.
    watches: Vec<Option<ProcessWatch>>,
    /// Why the queue cannot be used any more.
    broken: Option<String>,
}

/// The writer's role: the ring for local readers, the listener and links for remote ones.
#[derive(Debug)]
pub(super) struct Writer {
    ring: Option<Ring>,
    acceptor: Option<Arc<Acceptor>>,
    state: Mutex<WriterState>,
    /// The ring's name has been removed from `/dev/shm`.
    unlinked: AtomicBool,
}

impl Writer {
    pub(super) fn new(
        ring: Option<Ring>,
        acceptor: Option<Arc<Acceptor>>,
        local_ranks: Vec<usize>,
        chunks: usize,
    ) -> Writer {
        let n = local_ranks.len();
        Writer {
            unlinked: AtomicBool::new(ring.is_none()),
            ring,
            acceptor,
            state: Mutex::new(WriterState {
                tracker: Tracker::new(local_ranks, chunks),
                msg_no: 0,
                last_live_check: Instant::now(),
                watches: (0..n).map(|_| None).collect(),
                broken: None,
            }),
        }
    }

    pub(super) fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    pub(super) fn acceptor(&self) -> Option<&Arc<Acceptor>> {
        self.acceptor.as_ref()
    }

    /// Removes the ring's name once every local reader has attached (or left): from then on a
    /// crash of any rank leaves nothing in `/dev/shm`. Cheap once done.
    pub(super) fn unlink_when_attached(&self) {
        if self.unlinked.load(Ordering::Relaxed) {
            return;
        }
        let Some(ring) = &self.ring else { return };
        let all = (0..ring.geo.slots)
            .all(|i| ring.attached(i).load(Ordering::Acquire) != ring::SLOT_EMPTY);
        if all {
            ring.segment().unlink();
            self.unlinked.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn shutdown(&self) {
        if let Some(ring) = &self.ring {
            let _ = ring.shutdown().compare_exchange(
                ring::SHUTDOWN_NONE,
                ring::SHUTDOWN_CLOSED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            ring.data_bell().ring();
            ring.space_bell().ring();
        }
        if let Some(acc) = &self.acceptor {
            acc.stop();
            let bye = Arc::new(remote::encode_frame(KIND_SHUTDOWN, &[]));
            for l in lock(&acc.links).iter().flatten() {
                l.push(u64::MAX, bye.clone());
            }
        }
    }

    /// Lets queued frames go out for a moment, then closes every link (on drop).
    pub(super) fn close_links(&self) {
        if let Some(acc) = &self.acceptor {
            for l in lock(&acc.links).iter().flatten() {
                l.close(Duration::from_millis(200));
            }
        }
    }
}

impl MessageQueue {
    /// Broadcasts `data` to every reader, waiting at most [`Options::timeout`](super::Options::timeout) for room.
    pub fn enqueue_bytes(&self, data: &[u8]) -> Result<()> {
        self.enqueue_bytes_timeout(data, self.opts.timeout)
    }

    /// Broadcasts a typed value (postcard).
    pub fn enqueue<T: Serialize + ?Sized>(&self, obj: &T) -> Result<()> {
        self.enqueue_bytes(&encode_obj(obj)?)
    }

    /// Broadcasts a typed value, waiting at most `timeout`.
    pub fn enqueue_timeout<T: Serialize + ?Sized>(&self, obj: &T, timeout: Duration) -> Result<()> {
        self.enqueue_bytes_timeout(&encode_obj(obj)?, timeout)
    }

    /// Broadcasts `data`, waiting at most `timeout` for room in the ring and in every remote
    /// reader's queue. On a timeout the error names the readers holding the writer up and what
    /// they have not read; the message was not sent (except for a message larger than the whole
    /// ring cut in the middle, which aborts the queue).
    pub fn enqueue_bytes_timeout(&self, data: &[u8], timeout: Duration) -> Result<()> {
        let Role::Writer(w) = &self.role else {
            return Err(Error::invalid(format!(
                "mq: rank {} is a reader; only the writer (rank {}) enqueues",
                self.rank, self.handle.writer_rank
            )));
        };
        let op = self.op("enqueue");
        crate::ensure_arg!(
            data.len() <= self.opts.max_message_bytes,
            "{op}: message of {} bytes over the cap of {} bytes",
            data.len(),
            self.opts.max_message_bytes
        );
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = lock(&w.state);
        self.check_cancel(op)?;
        if let Some(b) = &st.broken {
            return Err(Error::Shutdown(format!("{op}: {b}")));
        }
        w.unlink_when_attached();
        if st.last_live_check.elapsed() >= LIVENESS_EVERY {
            self.check_readers(w, &mut st, None, op)?;
            st.last_live_check = Instant::now();
        }
        let mut next_warn = start + self.opts.warn_interval;

        // Room in every remote reader's queue first: once there, it stays (only we push).
        let links = self.connected_links(w, deadline, start, op)?;
        for l in &links {
            loop {
                if let Some(why) = l.lost() {
                    return Err(Error::PeerLost {
                        rank: l.rank,
                        op: op.to_string(),
                        detail: why,
                    });
                }
                if l.has_room() {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(self.stuck_timeout(w, &st, op, start, None));
                }
                if now >= next_warn {
                    self.warn_stuck(w, &st, start);
                    next_warn += self.opts.warn_interval;
                }
                self.check_cancel(op)?;
                l.wait_room(deadline.min(now + POLL_SLICE));
            }
        }

        // The ring.
        if let Some(ring) = &w.ring {
            let plan = Plan::new(data.len(), ring.geo.chunk_bytes, ring.geo.chunks);
            let first = st.tracker.next_seq();
            self.wait_space(
                w,
                ring,
                &mut st,
                first + plan.reserve - 1,
                deadline,
                start,
                &mut next_warn,
            )?;
            for i in 0..plan.chunks {
                let k = st.tracker.next_seq();
                if i >= plan.reserve {
                    if let Err(e) =
                        self.wait_space(w, ring, &mut st, k, deadline, start, &mut next_warn)
                    {
                        st.broken = Some(format!(
                            "the writer gave up in the middle of a {}-byte message (chunk {i} of {}): {e}",
                            data.len(),
                            plan.chunks
                        ));
                        ring.shutdown()
                            .store(ring::SHUTDOWN_ABORTED, Ordering::SeqCst);
                        ring.data_bell().ring();
                        return Err(e);
                    }
                }
                let (bytes, flags) = plan.piece(i);
                ring.write_chunk(k, &data[bytes], data.len() as u64, flags);
                st.tracker.publish(Instant::now());
                ring.write_seq().store(k + 1, Ordering::Release);
                ring.data_bell().notify();
            }
        }

        if !links.is_empty() {
            let frame = Arc::new(remote::encode_frame(KIND_MSG, data));
            for l in &links {
                l.push(st.msg_no, frame.clone());
            }
        }
        st.msg_no += 1;
        Ok(())
    }

    /// Every remote reader's link, once all have connected (waiting until `deadline`).
    fn connected_links(
        &self,
        w: &Writer,
        deadline: Instant,
        start: Instant,
        op: Op<'_>,
    ) -> Result<Vec<Arc<Link>>> {
        let Some(acc) = &w.acceptor else {
            return Ok(Vec::new());
        };
        let mut links = lock(&acc.links);
        loop {
            if links.iter().all(Option::is_some) {
                return Ok(links.iter().flatten().cloned().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.handle.remote_readers_timeout(
                    op,
                    start,
                    &links,
                    "remote readers have not connected".into(),
                ));
            }
            self.check_cancel(op)?;
            links = acc
                .cv
                .wait_timeout(links, (deadline - now).min(POLL_SLICE))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every local reader is done with the chunk that chunk `k` replaces.
    #[allow(clippy::too_many_arguments)]
    fn wait_space(
        &self,
        w: &Writer,
        ring: &Ring,
        st: &mut WriterState,
        k: u64,
        deadline: Instant,
        start: Instant,
        next_warn: &mut Instant,
    ) -> Result<()> {
        let read = |i: usize| ring.read_seq(i).load(Ordering::Acquire);
        if st.tracker.room_for(k, read) {
            return Ok(());
        }
        let op = self.op("enqueue");
        let need = st.tracker.need(k);
        let n = st.tracker.ranks().len();
        let mut last_live = Instant::now();
        let outcome = ring.space_bell().wait_with(
            self.spin,
            deadline,
            POLL_SLICE,
            || (0..n).all(|i| read(i) >= need),
            || {
                self.check_cancel(op)?;
                let now = Instant::now();
                if now.duration_since(last_live) >= POLL_SLICE {
                    last_live = now;
                    self.check_readers(w, st, Some(need), op)?;
                }
                if now >= *next_warn {
                    self.warn_stuck(w, st, start);
                    *next_warn += self.opts.warn_interval;
                }
                Ok(())
            },
        )?;
        if outcome == WaitOutcome::TimedOut && !st.tracker.room_for(k, read) {
            return Err(self.stuck_timeout(w, st, op, start, Some(need)));
        }
        let room = st.tracker.room_for(k, read);
        debug_assert!(room);
        Ok(())
    }

    /// Fails with [`Error::PeerLost`] for a reader that is gone (only among those that have not
    /// read up to `need` chunks, when given).
    fn check_readers(
        &self,
        w: &Writer,
        st: &mut WriterState,
        need: Option<u64>,
        op: Op<'_>,
    ) -> Result<()> {
        if let Some(ring) = &w.ring {
            let n = st.tracker.ranks().len();
            let slots: Vec<Slot> = (0..n)
                .map(|i| Slot::from_word(ring.attached(i).load(Ordering::Acquire)))
                .collect();
            for (i, s) in slots.iter().enumerate() {
                if *s == Slot::Attached && st.watches[i].is_none() {
                    st.watches[i] = Some(ring.reader_id(i).watch());
                }
            }
            // One system call for every reader's liveness.
            let watched: Vec<&ProcessWatch> = st.watches.iter().flatten().collect();
            let mut alive = liveness_all(&watched).into_iter();
            let liveness: Vec<Liveness> = st
                .watches
                .iter()
                .map(|w| match w {
                    Some(_) => alive.next().expect("one answer per watch"),
                    None => Liveness::Unknown,
                })
                .collect();
            for i in 0..n {
                let read = ring.read_seq(i).load(Ordering::Acquire);
                if let Some(detail) = st.tracker.lost(read, slots[i], &liveness[i], need) {
                    return Err(Error::PeerLost {
                        rank: st.tracker.ranks()[i],
                        op: op.to_string(),
                        detail,
                    });
                }
            }
        }
        if let Some(acc) = &w.acceptor {
            for l in lock(&acc.links).iter().flatten() {
                l.check_peer();
                if let Some(why) = l.lost() {
                    return Err(Error::PeerLost {
                        rank: l.rank,
                        op: op.to_string(),
                        detail: why,
                    });
                }
            }
        }
        Ok(())
    }

    fn stuck_report(&self, w: &Writer, st: &WriterState) -> Vec<StuckReader> {
        let mut out = match &w.ring {
            Some(ring) => st
                .tracker
                .behind(|i| ring.read_seq(i).load(Ordering::Acquire), Instant::now()),
            None => Vec::new(),
        };
        if let Some(acc) = &w.acceptor {
            for l in lock(&acc.links).iter().flatten() {
                if let Some(lag) = l.lag() {
                    out.push(StuckReader {
                        rank: l.rank,
                        remote: true,
                        oldest_unread: lag.msg_no,
                        unread: lag.queued as u64,
                        waited: lag.waited,
                    });
                }
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.waited));
        out
    }

    /// On the writer: every reader that has not read everything published, oldest first — which
    /// chunk (or remote message) it has not read and for how long. Empty on a reader. This is
    /// what the writer logs every [`Options::warn_interval`](super::Options::warn_interval)
    /// while it waits for room (and puts in its timeout error); called from another thread, it
    /// waits for an `enqueue` in progress to end.
    pub fn stuck_readers(&self) -> Vec<StuckReader> {
        match &self.role {
            Role::Writer(w) => self.stuck_report(w, &lock(&w.state)),
            _ => Vec::new(),
        }
    }

    fn warn_stuck(&self, w: &Writer, st: &WriterState, start: Instant) {
        let report = self.stuck_report(w, st);
        let list: Vec<String> = report.iter().map(ToString::to_string).collect();
        tracing::warn!(
            writer = self.rank,
            waited = ?start.elapsed(),
            "mq: no free chunk for {:.1?}; {}",
            start.elapsed(),
            if list.is_empty() { "no reader is behind (remote readers connecting?)".to_string() } else { list.join("; ") }
        );
    }

    fn stuck_timeout(
        &self,
        w: &Writer,
        st: &WriterState,
        op: Op<'_>,
        start: Instant,
        need: Option<u64>,
    ) -> Error {
        let report = self.stuck_report(w, st);
        let held = blocking(&report, need);
        Error::Timeout {
            op: op.to_string(),
            waited: start.elapsed(),
            missing_ranks: held.iter().map(|s| s.rank).collect(),
            detail: held
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}
