//! The writer's view of its shared-memory readers, with no I/O: which chunk may be written
//! next, who holds the writer up and since when, what a reader's slot says about it, and how a
//! message is cut into chunks. The writer's shell (`writer.rs`) reads the ring's counters and
//! the readers' liveness and hands them in; everything decided from them is here and tested
//! without shared memory, on a clock the tests choose.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::shm::Liveness;

use super::ring::{FLAG_FIRST, FLAG_LAST, SLOT_ATTACHED, SLOT_EMPTY, SLOT_LEFT};
use super::StuckReader;

/// What a reader's slot in the ring says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Not attached yet.
    Empty,
    /// Attached and reading.
    Attached,
    /// Left: shut down or dropped its side; it will not read again.
    Left,
}

impl Slot {
    /// The slot's `attached` word; an unknown value reads as attached (liveness decides).
    pub fn from_word(w: u32) -> Slot {
        match w {
            SLOT_EMPTY => Slot::Empty,
            SLOT_LEFT => Slot::Left,
            SLOT_ATTACHED => Slot::Attached,
            _ => Slot::Attached,
        }
    }
}

/// The writer's bookkeeping of its local readers.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// Rank of the reader in each slot.
    ranks: Vec<usize>,
    /// Chunks in the ring.
    chunks: u64,
    /// Chunks published so far (the next chunk's sequence number).
    next_seq: u64,
    /// A lower bound of every reader's read count, refreshed only when it is not enough.
    min_read: u64,
    /// When the chunk now in each ring position was published.
    published: Vec<Option<Instant>>,
}

impl Tracker {
    pub fn new(ranks: Vec<usize>, chunks: usize) -> Tracker {
        Tracker {
            ranks,
            chunks: chunks as u64,
            next_seq: 0,
            min_read: 0,
            published: vec![None; chunks],
        }
    }

    /// Chunks published so far.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The readers' ranks, by slot.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// Chunks every reader must have read before chunk `k` may be written (it replaces chunk
    /// `k - chunks`).
    pub fn need(&self, k: u64) -> u64 {
        (k + 1).saturating_sub(self.chunks)
    }

    /// True when chunk `k` may be written. `read(i)` is slot `i`'s read count; it is asked for
    /// only when the bound learnt by earlier calls is not enough (a publish costs no reads of
    /// the readers' lines while the ring has room).
    pub fn room_for(&mut self, k: u64, read: impl Fn(usize) -> u64) -> bool {
        let need = self.need(k);
        if self.min_read >= need {
            return true;
        }
        let next = self.next_seq;
        self.min_read = (0..self.ranks.len())
            .map(|i| read(i).min(next))
            .min()
            .unwrap_or(next);
        self.min_read >= need
    }

    /// Records the next chunk as published at `now`; returns its sequence number.
    pub fn publish(&mut self, now: Instant) -> u64 {
        let k = self.next_seq;
        self.published[(k % self.chunks) as usize] = Some(now);
        self.next_seq = k + 1;
        k
    }

    /// Every reader that has not read all that was published, given the read counts: the
    /// oldest chunk it has not read, how many, and for how long (at `now`).
    pub fn behind(&self, read: impl Fn(usize) -> u64, now: Instant) -> Vec<StuckReader> {
        let next = self.next_seq;
        (0..self.ranks.len())
            .filter_map(|i| {
                let r = read(i).min(next);
                (r < next).then(|| {
                    let at = self.published[(r % self.chunks) as usize];
                    StuckReader {
                        rank: self.ranks[i],
                        remote: false,
                        oldest_unread: r,
                        unread: next - r,
                        waited: at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                    }
                })
            })
            .collect()
    }

    /// Whether a reader is gone, from its read count, its slot and its process's liveness:
    /// the reason, in words. A reader that has already read `need` chunks (when given) is not
    /// in the way and is not reported.
    pub fn lost(
        &self,
        read: u64,
        slot: Slot,
        liveness: &Liveness,
        need: Option<u64>,
    ) -> Option<String> {
        if need.is_some_and(|n| read >= n) {
            return None;
        }
        let progress = format!("it had read {read} of {} chunks", self.next_seq);
        match (slot, liveness) {
            (Slot::Left, _) => Some(format!(
                "the reader closed its end of the queue; {progress}"
            )),
            (Slot::Attached, Liveness::Dead(why)) => {
                Some(format!("the reader's {why}; {progress}"))
            }
            _ => None,
        }
    }
}

/// The readers named in a timeout: those among `report` that hold up chunk `need` (every
/// remote one: their queue is full).
pub(crate) fn blocking(report: &[StuckReader], need: Option<u64>) -> Vec<&StuckReader> {
    report
        .iter()
        .filter(|s| s.remote || need.map_or(true, |n| s.oldest_unread < n))
        .collect()
}

/// How a message of `len` bytes is cut into chunks of `chunk_bytes`, in a ring of `ring`
/// chunks. The writer waits for room for `reserve` chunks before writing the first, so a
/// message that fits in the ring is never left half-written by a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    len: usize,
    chunk_bytes: usize,
    /// Chunks the message takes (at least one: an empty message is one empty chunk).
    pub chunks: u64,
    /// Chunks to have room for before the first is written: all of them, or the whole ring.
    pub reserve: u64,
}

impl Plan {
    pub fn new(len: usize, chunk_bytes: usize, ring: usize) -> Plan {
        let chunks = len.div_ceil(chunk_bytes).max(1) as u64;
        Plan {
            len,
            chunk_bytes,
            chunks,
            reserve: chunks.min(ring as u64),
        }
    }

    /// Bytes and flags of chunk `i` of the message.
    pub fn piece(&self, i: u64) -> (Range<usize>, u64) {
        let lo = (i as usize) * self.chunk_bytes;
        let hi = (lo + self.chunk_bytes).min(self.len);
        let mut flags = 0;
        if i == 0 {
            flags |= FLAG_FIRST;
        }
        if i + 1 == self.chunks {
            flags |= FLAG_LAST;
        }
        (lo..hi, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn room_follows_the_slowest_reader_and_reads_lazily() {
        let mut t = Tracker::new(vec![1, 2, 3], 4);
        let reads = std::cell::Cell::new(0);
        let counts = std::cell::RefCell::new(vec![0u64; 3]);
        let read = |i: usize| {
            reads.set(reads.get() + 1);
            counts.borrow()[i]
        };
        let t0 = Instant::now();
        // The first 4 chunks need nothing read: no look at the readers at all.
        for k in 0..4 {
            assert!(t.room_for(k, read));
            assert_eq!(t.publish(t0), k);
        }
        assert_eq!(reads.get(), 0);
        // Chunk 4 replaces chunk 0: every reader must have read 1.
        assert!(!t.room_for(4, read));
        *counts.borrow_mut() = vec![2, 1, 3];
        assert!(t.room_for(4, read));
        t.publish(t0);
        // The bound learnt (1) does not cover chunk 5 (needs 2): look again; reader 2 is behind.
        assert!(!t.room_for(5, read));
        counts.borrow_mut()[1] = 5;
        let before = reads.get();
        assert!(t.room_for(5, read));
        assert!(t.room_for(5, read), "the bound is remembered");
        assert_eq!(reads.get(), before + 3);
        // A reader claiming more than was published counts as caught up, not beyond: chunk 9
        // needs 6 reads, and only 5 chunks exist.
        *counts.borrow_mut() = vec![99, 99, 99];
        assert_eq!(t.next_seq(), 5);
        assert!(!t.room_for(9, read));
    }

    #[test]
    fn the_report_names_who_is_behind_since_when() {
        let mut t = Tracker::new(vec![4, 5], 2);
        let t0 = Instant::now();
        t.publish(t0);
        t.publish(t0 + ms(10));
        let counts = [0u64, 2];
        let r = t.behind(|i| counts[i], t0 + ms(100));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].rank, r[0].oldest_unread, r[0].unread), (4, 0, 2));
        assert_eq!(r[0].waited, ms(100));
        let r = t.behind(|_| 1, t0 + ms(100));
        assert_eq!(r.iter().map(|s| s.waited).collect::<Vec<_>>(), [ms(90); 2]);
        assert!(t.behind(|_| 2, t0).is_empty());
        // Only those below `need` block chunk `need`'s writer; remote ones always do.
        let mut report = t.behind(|i| counts[i], t0 + ms(100));
        report.push(StuckReader {
            rank: 9,
            remote: true,
            oldest_unread: 7,
            unread: 1,
            waited: ms(1),
        });
        let b: Vec<usize> = blocking(&report, Some(0)).iter().map(|s| s.rank).collect();
        assert_eq!(b, [9]);
        let b: Vec<usize> = blocking(&report, Some(1)).iter().map(|s| s.rank).collect();
        assert_eq!(b, [4, 9]);
    }

    #[test]
    fn lost_readers_are_told_apart_from_slow_ones() {
        let mut t = Tracker::new(vec![1], 2);
        t.publish(Instant::now());
        let dead = Liveness::Dead("process 7 no longer exists".into());
        assert!(t.lost(0, Slot::Attached, &Liveness::Alive, None).is_none());
        assert!(t
            .lost(0, Slot::Attached, &Liveness::Unknown, None)
            .is_none());
        assert!(t.lost(0, Slot::Empty, &dead, None).is_none());
        let d = t.lost(0, Slot::Attached, &dead, None).unwrap();
        assert!(d.contains("process 7") && d.contains("read 0 of 1"), "{d}");
        let d = t.lost(0, Slot::Left, &Liveness::Alive, None).unwrap();
        assert!(d.contains("closed its end"), "{d}");
        // Gone, but it read what the writer waits for: not in the way.
        assert!(t.lost(1, Slot::Left, &dead, Some(1)).is_none());
        assert_eq!(Slot::from_word(SLOT_LEFT), Slot::Left);
        assert_eq!(Slot::from_word(77), Slot::Attached);
    }

    #[test]
    fn plans_cut_messages_and_reserve_at_most_the_ring() {
        let p = Plan::new(0, 64, 4);
        assert_eq!((p.chunks, p.reserve), (1, 1));
        assert_eq!(p.piece(0), (0..0, FLAG_FIRST | FLAG_LAST));
        let p = Plan::new(130, 64, 2);
        assert_eq!((p.chunks, p.reserve), (3, 2));
        assert_eq!(p.piece(0), (0..64, FLAG_FIRST));
        assert_eq!(p.piece(1), (64..128, 0));
        assert_eq!(p.piece(2), (128..130, FLAG_LAST));
        let p = Plan::new(128, 64, 8);
        assert_eq!((p.chunks, p.reserve), (2, 2));
        assert_eq!(p.piece(1), (64..128, FLAG_LAST));
    }
}
