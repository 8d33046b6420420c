//! A bounded multi-producer, single-consumer queue with deadlines on both ends.
//!
//! `std::sync::mpsc::sync_channel` cannot wait for room with a timeout on stable Rust, and the
//! publisher also needs "wait until drained" at shutdown, so this is a `Mutex<VecDeque>` with two
//! condition variables (the waits sleep on a futex; nothing spins).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct BoundedQueue<T> {
    cap: usize,
    state: Mutex<State<T>>,
    /// Signalled when an item is pushed or the queue is closed.
    not_empty: Condvar,
    /// Signalled when an item is popped (room, or drained).
    not_full: Condvar,
}

/// Why a push failed; the item comes back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    /// Still full at the deadline.
    Full(T),
    /// The queue was closed.
    Closed(T),
}

/// What a pop found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pop<T> {
    /// The oldest item.
    Item(T),
    /// Nothing arrived before the timeout.
    Empty,
    /// The queue is closed and drained.
    Closed,
}

impl<T> BoundedQueue<T> {
    pub(crate) fn new(cap: usize) -> Self {
        BoundedQueue {
            cap: cap.max(1),
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the deque inconsistent; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `item`, waiting until `deadline` for room.
    pub(crate) fn push(&self, item: T, deadline: Instant) -> Result<(), PushError<T>> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Err(PushError::Closed(item));
            }
            if st.items.len() < self.cap {
                st.items.push_back(item);
                drop(st);
                self.not_empty.notify_one();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PushError::Full(item));
            }
            st = self
                .not_full
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Takes the oldest item, waiting up to `timeout` for one.
    pub(crate) fn pop(&self, timeout: Duration) -> Pop<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(item) = st.items.pop_front() {
                drop(st);
                self.not_full.notify_all();
                return Pop::Item(item);
            }
            if st.closed {
                return Pop::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Pop::Empty;
            }
            st = self
                .not_empty
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Refuses further pushes; the consumer still drains what is queued.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Items queued now.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_with_deadlines() {
        let q = BoundedQueue::new(2);
        let far = Instant::now() + Duration::from_secs(5);
        q.push(1, far).unwrap();
        q.push(2, far).unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            q.push(3, Instant::now() + Duration::from_millis(30)),
            Err(PushError::Full(3))
        ));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(q.pop(Duration::ZERO), Pop::Item(1));
        q.push(3, far).unwrap();
        q.close();
        assert!(matches!(q.push(4, far), Err(PushError::Closed(4))));
        assert_eq!(q.pop(Duration::ZERO), Pop::Item(2));
        assert_eq!(q.pop(Duration::ZERO), Pop::Item(3));
        assert_eq!(q.pop(Duration::from_secs(5)), Pop::Closed);
    }

    #[test]
    fn producers_wake_when_room_appears() {
        let q = Arc::new(BoundedQueue::new(1));
        let far = Instant::now() + Duration::from_secs(10);
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        q.push(p * 1000 + i, far).unwrap();
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 400 {
            match q.pop(Duration::from_secs(10)) {
                Pop::Item(x) => got.push(x),
                other => panic!("{other:?}"),
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(q.pop(Duration::from_millis(1)), Pop::Empty);
        for p in 0..4 {
            let mine: Vec<_> = got.iter().filter(|&&x| x / 1000 == p).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "per-producer order kept"
            );
            assert_eq!(mine.len(), 100);
        }
    }
}
