//! What the server allows a peer that is hostile or broken, as plain data structures with the
//! time passed in (no I/O): tested without sockets, used by the event loops of
//! [`crate::server`].
//!
//! - [`LogLimiter`]: a peer can make us drop its connection as often as it likes; each drop is
//!   worth a log line only up to a few per second, the rest are counted and summed up.
//! - [`AuthPenalties`]: an address that keeps presenting a wrong token is answered later and
//!   later (up to [`MAX_PENALTY`]), and once it has [`MAX_HELD_PER_ADDR`] connections waiting
//!   for their answer, its further refused connections are closed without one.
//! - [`MemoryBudget`]: the bytes of partially received requests, across every connection, are
//!   capped. A connection may always buffer a small message ([`SMALL_MESSAGE`]); beyond that it
//!   reads only while the budget has room, except the connection whose large message started
//!   first, which always may — so large messages finish one after the other instead of
//!   starving each other, and a peer must really send bytes (not just claim lengths) to use
//!   the budget. While connections wait for it, a large message whose sender has gone quiet
//!   for [`STALL`] (nothing arrives, nothing is waiting in the socket) is dropped: an honest
//!   client writes its request in one go, and a stalled one must not hold memory others need.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets through at most `per_window` events per `window`; counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    start: Option<Instant>,
    shown: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// At most `per_window` lines per `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogLimiter {
            per_window,
            window,
            start: None,
            shown: 0,
            suppressed: 0,
        }
    }

    fn roll(&mut self, now: Instant) -> u64 {
        match self.start {
            Some(s) if now < s + self.window => 0,
            _ => {
                self.start = Some(now);
                self.shown = 0;
                std::mem::take(&mut self.suppressed)
            }
        }
    }

    /// An event at `now`: `Some(n)` to log it (with `n` events suppressed before it and not
    /// yet reported), `None` to count it silently.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let before = self.roll(now);
        if self.shown < self.per_window {
            self.shown += 1;
            Some(before)
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Suppressed events of a window that has ended (to report even when no new event comes).
    pub fn take_suppressed(&mut self, now: Instant) -> Option<u64> {
        match self.start {
            Some(s) if now >= s + self.window && self.suppressed > 0 => {
                Some(std::mem::take(&mut self.suppressed))
            }
            _ => None,
        }
    }
}

/// Wrong tokens an address may present before its refusals are delayed.
pub const FREE_FAILURES: u32 = 3;
/// The longest delay of a refusal.
pub const MAX_PENALTY: Duration = Duration::from_secs(2);
/// Refused connections of one address held waiting for their (delayed) answer; more are closed
/// at once.
pub const MAX_HELD_PER_ADDR: u32 = 16;
/// An address with no failure for this long starts afresh.
pub const PENALTY_MEMORY: Duration = Duration::from_secs(60);
/// Addresses remembered (the oldest is forgotten beyond).
const MAX_ADDRS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Penalty {
    failures: u32,
    last: Instant,
    held: u32,
}

/// Wrong-token counts per peer address (see the module docs).
#[derive(Debug, Default)]
pub struct AuthPenalties {
    addrs: HashMap<IpAddr, Penalty>,
}

/// What to do with a connection that presented a wrong token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer the refusal now and close.
    Answer,
    /// Hold the connection and answer after this long (then call [`AuthPenalties::release`]).
    Delay(Duration),
    /// Close without an answer: the address already has its share of held connections.
    Drop,
}

impl AuthPenalties {
    /// Records a wrong token from `addr` at `now`.
    pub fn failure(&mut self, addr: IpAddr, now: Instant) -> Verdict {
        if self.addrs.len() >= MAX_ADDRS && !self.addrs.contains_key(&addr) {
            // Forget the address whose last failure is oldest (and holds nothing).
            if let Some(old) = self
                .addrs
                .iter()
                .filter(|(_, p)| p.held == 0)
                .min_by_key(|(_, p)| p.last)
                .map(|(a, _)| *a)
            {
                self.addrs.remove(&old);
            }
        }
        let p = self.addrs.entry(addr).or_insert(Penalty {
            failures: 0,
            last: now,
            held: 0,
        });
        if now.saturating_duration_since(p.last) > PENALTY_MEMORY {
            p.failures = 0;
        }
        p.failures = p.failures.saturating_add(1);
        p.last = now;
        if p.failures <= FREE_FAILURES {
            return Verdict::Answer;
        }
        if p.held >= MAX_HELD_PER_ADDR {
            return Verdict::Drop;
        }
        p.held += 1;
        let exp = (p.failures - FREE_FAILURES - 1).min(16);
        let d = Duration::from_millis(50).saturating_mul(1 << exp);
        Verdict::Delay(d.min(MAX_PENALTY))
    }

    /// A connection held after [`Verdict::Delay`] is gone.
    pub fn release(&mut self, addr: IpAddr) {
        if let Some(p) = self.addrs.get_mut(&addr) {
            p.held = p.held.saturating_sub(1);
        }
    }

    /// Failures remembered for `addr`.
    pub fn failures(&self, addr: IpAddr) -> u32 {
        self.addrs.get(&addr).map_or(0, |p| p.failures)
    }
}

/// A message up to this size may always be buffered, whatever the budget says.
pub const SMALL_MESSAGE: usize = 64 * 1024;

/// A large partial message with no new bytes for this long, while others wait for the budget,
/// is dropped.
pub const STALL: Duration = Duration::from_secs(2);

/// The memory budget for partially received requests, shared by every connection of a server.
///
/// Memory held in partial requests stays below `limit` + `SMALL_MESSAGE` per connection + one
/// read per event loop + the one large message allowed past the budget.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    next_ticket: AtomicU64,
    /// Connections with a large message in progress, by when it started.
    large: Mutex<BTreeSet<u64>>,
    /// Connections not read from until the budget frees.
    waiting: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            large: Mutex::new(BTreeSet::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A connection starts (`true`) or stops (`false`) waiting for the budget.
    pub fn set_waiting(&self, waiting: bool) {
        if waiting {
            self.waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// True when the budget is spent and connections wait for it.
    pub fn contended(&self) -> bool {
        self.used() >= self.limit && self.waiting.load(Ordering::Relaxed) > 0
    }

    /// The cap.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn large(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.large.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many bytes a connection holding `have` bytes of a partial message may read now
    /// (`want` at most); 0: stop reading it until the budget frees. `ticket` is the
    /// connection's place among large messages, taken here and given back with
    /// [`Self::settle`] or [`Self::forget`].
    pub fn allowance(&self, have: usize, want: usize, ticket: &mut Option<u64>) -> usize {
        if have < SMALL_MESSAGE && self.used() >= self.limit {
            return want.min(SMALL_MESSAGE - have);
        }
        if self.used() < self.limit {
            return want;
        }
        let t = *ticket.get_or_insert_with(|| {
            let t = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            self.large().insert(t);
            t
        });
        if self.large().first() == Some(&t) {
            want
        } else {
            0
        }
    }

    /// True when `ticket` is the oldest large message in progress (it may always read).
    pub fn is_head(&self, ticket: u64) -> bool {
        self.large().first() == Some(&ticket)
    }

    /// True when the budget has room.
    pub fn has_room(&self) -> bool {
        self.used() < self.limit
    }

    /// Records that a connection's partial bytes went from `old` to `new`; gives back its
    /// ticket once it holds no large message. `true` when this freed memory while connections
    /// wait for it (the caller then wakes whoever serves them).
    pub fn settle(&self, old: usize, new: usize, ticket: &mut Option<u64>) -> bool {
        let freed = new < old || (new < SMALL_MESSAGE && ticket.is_some());
        if new > old {
            self.used.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(old - new, Ordering::Relaxed);
        }
        if new < SMALL_MESSAGE {
            self.forget(ticket);
        } else if ticket.is_none() {
            // Take a place in line as soon as a large message starts, so the oldest one is
            // known when the budget runs out.
            let t = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            self.large().insert(t);
            *ticket = Some(t);
        }
        freed && self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Gives back a ticket (the connection closed or its large message ended).
    pub fn forget(&self, ticket: &mut Option<u64>) {
        if let Some(t) = ticket.take() {
            self.large().remove(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_limited_per_window_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, Duration::from_secs(1));
        let shown: Vec<Option<u64>> = (0..12_000)
            .map(|i| l.allow(t0 + Duration::from_micros(i * 80)))
            .filter(|x| x.is_some())
            .collect();
        // 12,000 events in 0.96 s: three lines.
        assert_eq!(shown, vec![Some(0); 3]);
        assert_eq!(l.take_suppressed(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.take_suppressed(t0 + Duration::from_secs(1)), Some(11_997));
        assert_eq!(l.allow(t0 + Duration::from_secs(2)), Some(0));
        // Suppressed events not yet reported come with the next line shown.
        for _ in 0..5 {
            l.allow(t0 + Duration::from_secs(2));
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(4)), Some(3));
    }

    #[test]
    fn wrong_tokens_are_answered_later_and_then_dropped() {
        let t0 = Instant::now();
        let mut p = AuthPenalties::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..FREE_FAILURES {
            assert_eq!(p.failure(a, t0), Verdict::Answer);
        }
        let mut delays = Vec::new();
        for _ in 0..MAX_HELD_PER_ADDR {
            match p.failure(a, t0) {
                Verdict::Delay(d) => delays.push(d),
                v => panic!("{v:?}"),
            }
        }
        assert_eq!(delays[0], Duration::from_millis(50));
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(*delays.last().unwrap(), MAX_PENALTY);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        // Every slot held: dropped without an answer; another address is not affected.
        assert_eq!(p.failure(a, t0), Verdict::Drop);
        assert_eq!(p.failure(b, t0), Verdict::Answer);
        p.release(a);
        assert_eq!(p.failure(a, t0), Verdict::Delay(MAX_PENALTY));
        // Forgotten after a quiet minute.
        let later = t0 + PENALTY_MEMORY + Duration::from_secs(1);
        assert_eq!(p.failure(b, later), Verdict::Answer);
        assert_eq!(p.failures(b), 1);
    }

    #[test]
    fn the_budget_lets_small_messages_and_the_oldest_large_one_through() {
        let b = MemoryBudget::new(1 << 20);
        let (mut t1, mut t2, mut t3) = (None, None, None);
        // Under the budget anything reads.
        assert_eq!(b.allowance(0, 256 << 10, &mut t1), 256 << 10);
        assert!(!b.settle(0, 600 << 10, &mut t1));
        assert!(t1.is_some(), "a large message takes its place in line");
        assert!(!b.settle(0, 500 << 10, &mut t2));
        assert!(b.used() > b.limit());
        // Over it: the oldest large message still reads, the second waits, a small one reads
        // up to the small-message size.
        assert_eq!(b.allowance(600 << 10, 1 << 20, &mut t1), 1 << 20);
        assert_eq!(b.allowance(500 << 10, 1 << 20, &mut t2), 0);
        assert_eq!(b.allowance(1000, 256 << 10, &mut t3), SMALL_MESSAGE - 1000);
        assert!(t3.is_none());
        // The first completes: the second is next in line, and whoever serves it is told
        // once a connection waits.
        b.set_waiting(true);
        assert!(b.settle(600 << 10, 0, &mut t1));
        b.set_waiting(false);
        assert!(t1.is_none());
        assert_eq!(b.allowance(500 << 10, 1 << 20, &mut t2), 1 << 20);
        assert!(!b.settle(500 << 10, 0, &mut t2));
        assert_eq!(b.used(), 0);
        assert!(!b.contended());
        b.settle(0, 2 << 20, &mut t1);
        assert!(!b.contended());
        b.set_waiting(true);
        assert!(b.contended());
        b.set_waiting(false);
        assert!(!b.settle(2 << 20, 0, &mut t1));
    }
}
