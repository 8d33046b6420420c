//! Which connections an engine keeps, without I/O: the counts and times that bound them.
//!
//! * A connection accepted from the listening socket is **handshaking** until its `Hello` (and,
//!   with a shared secret, its `Auth`) is done, which must happen within the handshake timeout
//!   (the shell's deadline). At most [`MAX_HANDSHAKING`] are kept: a new one evicts the oldest,
//!   so connections that never finish their handshake cannot lock out a peer that does (it needs
//!   a round trip, they need to outpace it by that many connections per round trip).
//! * A connection whose handshake is done is **open**. At most `max_open` accepted ones are
//!   kept; when a handshake completes with all of them open, the least recently active *idle*
//!   one (no frame being handled, nothing bound to it in the ledger) is closed to make room, and
//!   only when every one of them is busy is the newcomer refused. Its peer reconnects when it
//!   needs it again, so closing an idle connection costs a handshake, not a request.
//! * An open connection idle for the idle timeout is closed (the shell checks, with the ledger's
//!   word on whether it is busy).
//! * Connections this engine dialed are tracked for their idle time but are never counted or
//!   evicted: their number is the number of peers this engine sends to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::ledger::ConnId;

/// Most accepted connections in their handshake at once.
pub(crate) const MAX_HANDSHAKING: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Handshaking,
    Open,
    Dialed,
}

#[derive(Debug)]
struct Slot {
    kind: Kind,
    since: Instant,
    last_active: Instant,
    in_frame: bool,
}

/// The connection table; see the module docs.
#[derive(Debug)]
pub(crate) struct Admission {
    max_open: usize,
    max_handshaking: usize,
    slots: HashMap<ConnId, Slot>,
}

impl Admission {
    /// At most `max_open` open accepted connections and `max_handshaking` handshaking ones.
    pub(crate) fn new(max_open: usize, max_handshaking: usize) -> Self {
        Admission {
            max_open: max_open.max(1),
            max_handshaking: max_handshaking.max(1),
            slots: HashMap::new(),
        }
    }

    fn count(&self, kind: Kind) -> usize {
        self.slots.values().filter(|s| s.kind == kind).count()
    }

    /// A connection `id` was accepted at `now`; returns the handshaking one to close for it.
    pub(crate) fn accept(&mut self, id: ConnId, now: Instant) -> Option<ConnId> {
        let evict = if self.count(Kind::Handshaking) >= self.max_handshaking {
            let oldest = self
                .slots
                .iter()
                .filter(|(_, s)| s.kind == Kind::Handshaking)
                .min_by_key(|(c, s)| (s.since, **c))
                .map(|(c, _)| *c);
            if let Some(c) = oldest {
                self.slots.remove(&c);
            }
            oldest
        } else {
            None
        };
        self.slots.insert(
            id,
            Slot {
                kind: Kind::Handshaking,
                since: now,
                last_active: now,
                in_frame: false,
            },
        );
        evict
    }

    /// `id` finished its handshake at `now`. `Ok(Some(c))`: it is open, and `c` (idle) is to be
    /// closed to make room; `Err`: every open connection is busy, refuse `id`.
    pub(crate) fn opened(
        &mut self,
        id: ConnId,
        now: Instant,
        busy: impl Fn(ConnId) -> bool,
    ) -> Result<Option<ConnId>, String> {
        let mut evict = None;
        if self.count(Kind::Open) >= self.max_open {
            let victim = self
                .slots
                .iter()
                .filter(|(c, s)| s.kind == Kind::Open && !s.in_frame && !busy(**c))
                .min_by_key(|(c, s)| (s.last_active, **c))
                .map(|(c, _)| *c);
            match victim {
                Some(c) => {
                    self.slots.remove(&c);
                    evict = Some(c);
                }
                None => {
                    self.slots.remove(&id);
                    return Err(format!("{} connections are open and busy", self.max_open));
                }
            }
        }
        match self.slots.get_mut(&id) {
            Some(s) => {
                s.kind = Kind::Open;
                s.last_active = now;
            }
            // Evicted during its handshake.
            None => return Err("evicted during its handshake".into()),
        }
        Ok(evict)
    }

    /// This engine dialed `id` at `now`.
    pub(crate) fn dialed(&mut self, id: ConnId, now: Instant) {
        self.slots.insert(
            id,
            Slot {
                kind: Kind::Dialed,
                since: now,
                last_active: now,
                in_frame: false,
            },
        );
    }

    /// A frame arrived on `id` at `now`; it is handled until [`Self::end_frame`].
    pub(crate) fn begin_frame(&mut self, id: ConnId, now: Instant) {
        if let Some(s) = self.slots.get_mut(&id) {
            s.in_frame = true;
            s.last_active = now;
        }
    }

    /// The frame on `id` was handled at `now`.
    pub(crate) fn end_frame(&mut self, id: ConnId, now: Instant) {
        if let Some(s) = self.slots.get_mut(&id) {
            s.in_frame = false;
            s.last_active = now;
        }
    }

    /// `id` was used at `now` (a request sent on it).
    pub(crate) fn touch(&mut self, id: ConnId, now: Instant) {
        if let Some(s) = self.slots.get_mut(&id) {
            s.last_active = now;
        }
    }

    /// How long `id` has been idle at `now` (`None` while it handles a frame, or if unknown).
    pub(crate) fn idle_for(&self, id: ConnId, now: Instant) -> Option<Duration> {
        self.slots
            .get(&id)
            .filter(|s| !s.in_frame)
            .map(|s| now.saturating_duration_since(s.last_active))
    }

    /// `id` is closed.
    pub(crate) fn closed(&mut self, id: ConnId) {
        self.slots.remove(&id);
    }

    /// (handshaking, open accepted, dialed) connections.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (
            self.count(Kind::Handshaking),
            self.count(Kind::Open),
            self.count(Kind::Dialed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn handshakes_are_capped_and_the_oldest_gives_way() {
        let mut a = Admission::new(8, 3);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(a.accept(i, t0 + i as u32 * MS), None);
        }
        assert_eq!(a.accept(3, t0 + 3 * MS), Some(0));
        assert_eq!(a.accept(4, t0 + 4 * MS), Some(1));
        assert_eq!(a.counts(), (3, 0, 0));
        // An evicted handshake cannot open.
        assert!(a.opened(0, t0 + 5 * MS, |_| false).is_err());
        assert_eq!(a.opened(2, t0 + 5 * MS, |_| false), Ok(None));
        assert_eq!(a.counts(), (2, 1, 0));
    }

    #[test]
    fn open_connections_are_capped_and_the_least_recently_active_idle_one_gives_way() {
        let mut a = Admission::new(2, 8);
        let t0 = Instant::now();
        for i in 0..2 {
            a.accept(i, t0);
            assert_eq!(a.opened(i, t0 + i as u32 * MS, |_| false), Ok(None));
        }
        // 0 is older but handles a frame; 1 is idle: 1 goes.
        a.begin_frame(0, t0 + 5 * MS);
        a.accept(2, t0 + 6 * MS);
        assert_eq!(a.opened(2, t0 + 6 * MS, |_| false), Ok(Some(1)));
        // 0 in a frame, 2 busy in the ledger: the newcomer is refused.
        a.accept(3, t0 + 7 * MS);
        assert!(a.opened(3, t0 + 7 * MS, |c| c == 2).is_err());
        assert_eq!(a.counts(), (0, 2, 0));
        // Dialed connections are not counted and never chosen.
        a.dialed(10, t0);
        a.end_frame(0, t0 + 8 * MS);
        a.accept(4, t0 + 9 * MS);
        assert_eq!(a.opened(4, t0 + 9 * MS, |_| false), Ok(Some(2)));
        assert_eq!(a.counts(), (0, 2, 1));
    }

    #[test]
    fn idle_time_counts_from_the_last_frame_and_not_during_one() {
        let mut a = Admission::new(2, 2);
        let t0 = Instant::now();
        a.dialed(1, t0);
        assert_eq!(a.idle_for(1, t0 + 50 * MS), Some(50 * MS));
        a.begin_frame(1, t0 + 60 * MS);
        assert_eq!(a.idle_for(1, t0 + 500 * MS), None);
        a.end_frame(1, t0 + 600 * MS);
        assert_eq!(a.idle_for(1, t0 + 700 * MS), Some(100 * MS));
        a.touch(1, t0 + 800 * MS);
        assert_eq!(a.idle_for(1, t0 + 800 * MS), Some(Duration::ZERO));
        a.closed(1);
        assert_eq!(a.idle_for(1, t0), None);
    }
}
