//! A tiny fixed pool of helper threads per communicator, so one rank can use several cores for
//! the copies and reductions of large chunks (as vLLM's shared-memory backend does with OpenMP).
//! The calling thread works as member 0; [`Pool::run`] returns when every member is done.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A job: a borrowed closure whose lifetime [`Pool::run`] erases and then outlives.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync + 'static));
// SAFETY: the closure is `Sync`, so calling it from another thread through a shared pointer is
// fine; `Pool::run` keeps it alive until every worker has finished with it.
unsafe impl Send for JobPtr {}

#[derive(Default)]
struct State {
    generation: u64,
    job: Option<JobPtr>,
    pending: usize,
    panicked: bool,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `threads - 1` helper threads plus the caller.
pub(crate) struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` members (at least 1; 1 means the caller alone, no thread is started).
    pub(crate) fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared::default());
        let handles = (1..threads)
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("dist-cpu-{i}"))
                    .spawn(move || worker(&s, i))
                    .ok()
            })
            .collect::<Vec<_>>();
        Pool {
            threads: handles.len() + 1,
            shared,
            handles,
        }
    }

    /// Members of the pool, the caller included.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every member `i` in `0..threads()` (the caller runs `f(0)`) and returns
    /// when all are done. Panics (after every member finished) if any member panicked.
    pub(crate) fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        // SAFETY: only the lifetime is erased; the `Wait` guard below blocks (even while
        // unwinding) until every worker has finished calling the closure, so it is never used
        // after `f`'s borrow ends.
        let ptr: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f)
        };
        {
            let mut st = self.shared.lock();
            st.job = Some(JobPtr(ptr));
            st.pending = self.threads - 1;
            st.panicked = false;
            st.generation += 1;
        }
        self.shared.work.notify_all();
        struct Wait<'a>(&'a Shared);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                while st.pending > 0 {
                    st = self.0.done.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.job = None;
            }
        }
        let wait = Wait(&self.shared);
        f(0);
        drop(wait);
        if self.shared.lock().panicked {
            panic!("a dist-cpu helper thread panicked");
        }
    }
}

fn worker(s: &Shared, i: usize) {
    let mut seen = 0;
    loop {
        let job = {
            let mut st = s.lock();
            while st.generation == seen && !st.shutdown {
                st = s.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        let ok = match job {
            Some(j) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: `Pool::run` keeps the closure alive until `pending` reaches zero below.
                unsafe { (*j.0)(i) }
            }))
            .is_ok(),
            None => true,
        };
        let mut st = s.lock();
        st.panicked |= !ok;
        st.pending -= 1;
        if st.pending == 0 {
            s.done.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Cuts `[0, len)` into `parts` ranges of 64-byte multiples; range `i`.
pub(crate) fn share(len: usize, parts: usize, i: usize) -> (usize, usize) {
    let per = len.div_ceil(parts.max(1)).div_ceil(64) * 64;
    ((i * per).min(len), ((i + 1) * per).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_member_runs_each_job() {
        let p = Pool::new(4);
        assert_eq!(p.threads(), 4);
        for round in 0..100 {
            let hits = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            p.run(&|i| {
                hits.fetch_add(1, Ordering::Relaxed);
                mask.fetch_or(1 << i, Ordering::Relaxed);
            });
            assert_eq!(hits.into_inner(), 4, "round {round}");
            assert_eq!(mask.into_inner(), 0b1111);
        }
        let one = Pool::new(1);
        let hits = AtomicUsize::new(0);
        one.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.into_inner(), 1);
    }

    #[test]
    fn a_panicking_member_is_reported_after_all_finish() {
        let p = Pool::new(3);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.run(&|i| {
                if i == 2 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works.
        let hits = AtomicUsize::new(0);
        p.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.into_inner(), 3);
    }
}
