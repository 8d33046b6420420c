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
    for _ in 0..SPIN_ITERS {
        if ready() {
            return Ok(WaitOutcome::Ready);
        }
        std::hint::spin_loop();
    }
    for _ in 0..YIELD_ITERS {
        if ready() {
            return Ok(WaitOutcome::Ready);
        }
        std::thread::yield_now();
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
        mut poll: impl FnMut() -> Result<(), E>,
    ) -> Result<WaitOutcome, E> {
        for _ in 0..SPIN_ITERS {
            if ready() {
                return Ok(WaitOutcome::Ready);
            }
            std::hint::spin_loop();
        }
        for _ in 0..YIELD_ITERS {
            if ready() {
                return Ok(WaitOutcome::Ready);
            }
            std::thread::yield_now();
        }
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
            Instant::now() + Duration::from_millis(60),
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
