//! Waiting on a word in shared memory: spin briefly, yield, then sleep on a futex.
//!
//! On a 2-core machine with 8 ranks, a rank that spins while its peer is descheduled steals the
//! peer's core. So waits spin for [`SPIN_ITERS`] iterations (a few microseconds), yield for
//! [`YIELD_ITERS`], then sleep in `FUTEX_WAIT` on a sequence word that the writer bumps and wakes.
//! The futex is the shared (non-private) kind, so it works across processes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Busy-spin iterations before yielding.
pub const SPIN_ITERS: u32 = 200;
/// `sched_yield` iterations before sleeping on the futex.
pub const YIELD_ITERS: u32 = 16;

/// How long a waiter stays awake before it sleeps on the futex: it spins (the CPU's pause hint,
/// no system call: the lowest latency, a core busy) for `spin`, then yields the core in a loop
/// for `yield_for`, then sleeps. At least [`SPIN_ITERS`] iterations are spun whatever `spin` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spin {
    /// Time spent spinning first.
    pub spin: Duration,
    /// Time spent yielding (`sched_yield`) after spinning.
    pub yield_for: Duration,
}

impl Spin {
    /// Stay awake for `busy` after the wait starts: spinning when this node has at least two
    /// cores for each of the `parties` processes (or threads) that wait on one another, so a
    /// spinner never takes a core someone else needs; yielding otherwise.
    pub fn for_parties(parties: usize, busy: Duration) -> Spin {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::choose(parties, cores, busy)
    }

    fn choose(parties: usize, cores: usize, busy: Duration) -> Spin {
        if parties.saturating_mul(2) <= cores {
            Spin {
                spin: busy,
                yield_for: Duration::ZERO,
            }
        } else {
            Spin {
                spin: Duration::ZERO,
                yield_for: busy,
            }
        }
    }

    /// Runs the awake phases: true as soon as `ready()` is, false once they are over.
    fn stay_awake(&self, ready: &mut impl FnMut() -> bool) -> bool {
        if spin_briefly(ready) {
            return true;
        }
        if self.spin.is_zero() && self.yield_for.is_zero() {
            return false;
        }
        let start = Instant::now();
        let mut n = 0u32;
        while !self.spin.is_zero() {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
            n = n.wrapping_add(1);
            // Reading the clock costs ~20 ns: look every 64 turns.
            if n % 64 == 0 && start.elapsed() >= self.spin {
                break;
            }
        }
        let until = self.spin + self.yield_for;
        while start.elapsed() < until {
            if ready() {
                return true;
            }
            std::thread::yield_now();
        }
        ready()
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Spurious wake-ups are possible.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; FUTEX_WAIT only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes up to `n` waiters sleeping on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access memory beyond it.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// Spins [`SPIN_ITERS`] times: true as soon as `ready()` is.
fn spin_briefly(ready: &mut impl FnMut() -> bool) -> bool {
    for _ in 0..SPIN_ITERS {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// [`spin_briefly`], then [`YIELD_ITERS`] yields: true as soon as `ready()` is.
fn spin_then_yield(ready: &mut impl FnMut() -> bool) -> bool {
    if spin_briefly(ready) {
        return true;
    }
    for _ in 0..YIELD_ITERS {
        if ready() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// How a [`wait_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition became true.
    Ready,
    /// The deadline passed first.
    TimedOut,
}

/// Waits until `ready()` is true or `deadline` passes. `seq` is the futex word the party that
/// makes `ready()` true bumps (`fetch_add(1)`) and wakes ([`futex_wake`]) afterwards.
///
/// `poll` is called between sleeps (at most every `poll_every`) so a caller can notice a dead
/// peer or a shutdown flag and bail out early by returning `Err`.
pub fn wait_until<E>(
    seq: &AtomicU32,
    deadline: Instant,
    poll_every: Duration,
    mut ready: impl FnMut() -> bool,
    mut poll: impl FnMut() -> Result<(), E>,
) -> Result<WaitOutcome, E> {
    if spin_then_yield(&mut ready) {
        return Ok(WaitOutcome::Ready);
    }
    loop {
        let s = seq.load(Ordering::Acquire);
        if ready() {
            return Ok(WaitOutcome::Ready);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(WaitOutcome::TimedOut);
        }
        poll()?;
        futex_wait(seq, s, (deadline - now).min(poll_every));
    }
}

/// A futex word with a count of sleepers, for a party that publishes often and is waited on
/// rarely: [`Doorbell::ring`] makes no system call while nobody sleeps, so a fast path between
/// spinning peers costs two atomic operations.
///
/// The waker bumps `seq` then reads `sleepers`; a sleeper bumps `sleepers` then reads `seq`
/// (all sequentially consistent), so either the waker sees the sleeper and wakes it, or the
/// sleeper sees the new `seq` and does not sleep: no wake-up is lost. It is `repr(C)` and
/// valid when zero-filled, so it can live in a shared segment.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Doorbell {
    seq: AtomicU32,
    sleepers: AtomicU32,
}

impl Doorbell {
    /// Signals waiters that the state they wait on may have changed. Call it after publishing.
    pub fn ring(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            futex_wake(&self.seq, i32::MAX);
        }
    }

    /// Like [`wait_until`], sleeping on this doorbell: spins [`SPIN_ITERS`] times, yields
    /// [`YIELD_ITERS`] times, then sleeps at most `poll_every` at a time, calling `poll` between
    /// sleeps, until `ready()` or `deadline`.
    pub fn wait_until<E>(
        &self,
        deadline: Instant,
        poll_every: Duration,
        mut ready: impl FnMut() -> bool,
        poll: impl FnMut() -> Result<(), E>,
    ) -> Result<WaitOutcome, E> {
        if spin_then_yield(&mut ready) {
            return Ok(WaitOutcome::Ready);
        }
        self.sleep_until(deadline, poll_every, ready, poll)
    }

    /// Like [`Doorbell::wait_until`], awake as `spin` says before it sleeps. `poll` is not
    /// called while awake (it is for what is too slow to check on every turn).
    pub fn wait_with<E>(
        &self,
        spin: Spin,
        deadline: Instant,
        poll_every: Duration,
        mut ready: impl FnMut() -> bool,
        poll: impl FnMut() -> Result<(), E>,
    ) -> Result<WaitOutcome, E> {
        if spin.stay_awake(&mut ready) {
            return Ok(WaitOutcome::Ready);
        }
        self.sleep_until(deadline, poll_every, ready, poll)
    }

    /// For a publisher that makes its change with plain atomic stores: a fence, then a system
    /// call only when someone sleeps. Unlike [`Doorbell::ring`], nothing is written to the
    /// doorbell while nobody sleeps, so many publishers can call it without their cores
    /// fighting over its cache line.
    ///
    /// The publisher's store, this fence, then the load of the sleeper count; a sleeper's
    /// increment of that count, then its check of the condition (all sequentially consistent
    /// or fenced): either the publisher sees the sleeper and wakes it, or the sleeper sees the
    /// change and does not sleep.
    pub fn notify(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&self.seq, i32::MAX);
        }
    }

    /// True when somebody sleeps on this doorbell now.
    pub fn has_sleepers(&self) -> bool {
        self.sleepers.load(Ordering::SeqCst) != 0
    }

    fn sleep_until<E>(
        &self,
        deadline: Instant,
        poll_every: Duration,
        mut ready: impl FnMut() -> bool,
        mut poll: impl FnMut() -> Result<(), E>,
    ) -> Result<WaitOutcome, E> {
        loop {
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let s = self.seq.load(Ordering::SeqCst);
            let outcome = if ready() {
                Some(Ok(WaitOutcome::Ready))
            } else {
                let now = Instant::now();
                if now >= deadline {
                    Some(Ok(WaitOutcome::TimedOut))
                } else if let Err(e) = poll() {
                    Some(Err(e))
                } else {
                    futex_wait(&self.seq, s, (deadline - now).min(poll_every));
                    None
                }
            };
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            if let Some(o) = outcome {
                return o;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn wakes_a_sleeper() {
        let seq = Arc::new(AtomicU32::new(0));
        let flag = Arc::new(AtomicBool::new(false));
        let (s2, f2) = (seq.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.store(true, Ordering::Release);
            s2.fetch_add(1, Ordering::Release);
            futex_wake(&s2, i32::MAX);
        });
        let start = Instant::now();
        let r = wait_until::<()>(
            &seq,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
            || flag.load(Ordering::Acquire),
            || Ok(()),
        )
        .unwrap();
        assert_eq!(r, WaitOutcome::Ready);
        assert!(start.elapsed() < Duration::from_secs(1));
        t.join().unwrap();
    }

    #[test]
    fn times_out_and_polls() {
        let seq = AtomicU32::new(0);
        let mut polls = 0;
        let r = wait_until::<()>(
            &seq,
            Instant::now() + Duration::from_millis(300),
            Duration::from_millis(10),
            || false,
            || {
                polls += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(r, WaitOutcome::TimedOut);
        assert!(polls >= 2);
        let e = wait_until(
            &seq,
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(10),
            || false,
            || Err("peer died"),
        );
        assert_eq!(e, Err("peer died"));
    }

    #[test]
    fn spin_only_with_two_cores_per_party() {
        let busy = Duration::from_micros(500);
        assert_eq!(Spin::choose(8, 16, busy).spin, busy);
        assert_eq!(Spin::choose(8, 15, busy).spin, Duration::ZERO);
        assert_eq!(Spin::choose(8, 2, busy).yield_for, busy);
        assert_eq!(Spin::choose(1, 2, busy).spin, busy);
    }

    #[test]
    fn wait_with_stays_awake_then_sleeps_and_is_woken() {
        let bell = Arc::new(Doorbell::default());
        let flag = Arc::new(AtomicBool::new(false));
        let spin = Spin {
            spin: Duration::from_millis(2),
            yield_for: Duration::from_millis(2),
        };
        // Nothing comes: awake for ~4 ms, then asleep until the deadline.
        let t = Instant::now();
        let r = bell
            .wait_with::<()>(
                spin,
                Instant::now() + Duration::from_millis(30),
                Duration::from_millis(5),
                || false,
                || Ok(()),
            )
            .unwrap();
        assert_eq!(r, WaitOutcome::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(30));
        // Set while the waiter sleeps: the ring wakes it long before its 2 s poll.
        let (b2, f2) = (bell.clone(), flag.clone());
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            f2.store(true, Ordering::Release);
            b2.ring();
        });
        let t = Instant::now();
        let r = bell
            .wait_with::<()>(
                spin,
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(2),
                || flag.load(Ordering::Acquire),
                || Ok(()),
            )
            .unwrap();
        assert_eq!(r, WaitOutcome::Ready);
        assert!(t.elapsed() < Duration::from_secs(1));
        h.join().unwrap();
        assert!(!bell.has_sleepers());
    }

    #[test]
    fn doorbell_wakes_a_sleeper_and_skips_the_syscall_when_idle() {
        let bell = Arc::new(Doorbell::default());
        bell.ring(); // nobody sleeps: no wake-up needed, must not block
        let flag = Arc::new(AtomicBool::new(false));
        let (b2, f2) = (bell.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.store(true, Ordering::Release);
            b2.ring();
        });
        let start = Instant::now();
        let r = bell
            .wait_until::<()>(
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(2),
                || flag.load(Ordering::Acquire),
                || Ok(()),
            )
            .unwrap();
        assert_eq!(r, WaitOutcome::Ready);
        // Woken by the ring, not by the 2 s poll interval.
        assert!(start.elapsed() < Duration::from_secs(1));
        t.join().unwrap();
        assert_eq!(bell.sleepers.load(Ordering::SeqCst), 0);
        let r = bell
            .wait_until::<()>(
                Instant::now() + Duration::from_millis(30),
                Duration::from_millis(5),
                || false,
                || Ok(()),
            )
            .unwrap();
        assert_eq!(r, WaitOutcome::TimedOut);
    }
}
