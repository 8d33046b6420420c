//! An in-process [`HostGroup`] whose ranks are threads: the control plane for tests that run
//! ranks as threads, and for single-process tools. It has the same semantics and deadlines as
//! the real host groups (collectives matched by call order, messages per pair in order).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Error, HostGroup, Result};

#[derive(Debug, Default)]
struct State {
    /// Collective contributions by sequence number: one slot per rank.
    rounds: HashMap<u64, Round>,
    /// Messages from src to dst, in order.
    mail: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

#[derive(Debug)]
struct Round {
    kind: &'static str,
    slots: Vec<Option<Vec<u8>>>,
    readers_left: usize,
}

#[derive(Debug)]
struct Shared {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank's handle of an in-process group; make all of them with [`ThreadGroup::new`].
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
    seq: Mutex<u64>,
    timeout: Duration,
}

impl ThreadGroup {
    /// Handles for ranks `0..n`, each to be moved to its own thread.
    pub fn new(n: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
                seq: Mutex::new(0),
                timeout,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts this rank's contribution to the next collective and waits for every rank's.
    fn round(&self, kind: &'static str, data: Option<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
            *s += 1;
            *s
        };
        let n = self.shared.n;
        let start = Instant::now();
        let mut st = self.lock();
        {
            let r = st.rounds.entry(seq).or_insert_with(|| Round {
                kind,
                slots: vec![None; n],
                readers_left: n,
            });
            if r.kind != kind {
                return Err(Error::invalid(format!(
                    "collective mismatch at call {seq}: rank {} called {kind}, another rank called {}",
                    self.rank, r.kind
                )));
            }
            r.slots[self.rank] = Some(data.unwrap_or_default());
        }
        self.shared.cv.notify_all();
        let (mut st, ()) = self.wait(
            st,
            start,
            || format!("thread group {kind}"),
            |st| {
                let r = &st.rounds[&seq];
                let missing: Vec<usize> = (0..n).filter(|&i| r.slots[i].is_none()).collect();
                match missing.is_empty() {
                    true => Ok(()),
                    false => Err(missing),
                }
            },
        )?;
        let r = st.rounds.get_mut(&seq).expect("round exists");
        let out = r.slots.clone();
        r.readers_left -= 1;
        if r.readers_left == 0 {
            st.rounds.remove(&seq);
        }
        Ok(out)
    }

    /// Waits on the group's condition variable until `ready` gives its value, or this rank's
    /// deadline (from `start`) passes: a timeout of the call `op()` names, with the ranks `ready`
    /// last said were missing.
    fn wait<'a, R>(
        &self,
        mut st: MutexGuard<'a, State>,
        start: Instant,
        op: impl FnOnce() -> String,
        mut ready: impl FnMut(&mut State) -> std::result::Result<R, Vec<usize>>,
    ) -> Result<(MutexGuard<'a, State>, R)> {
        loop {
            let missing = match ready(&mut st) {
                Ok(r) => return Ok((st, r)),
                Err(missing) => missing,
            };
            let waited = start.elapsed();
            if waited >= self.timeout {
                return Err(Error::Timeout {
                    op: op(),
                    waited,
                    missing_ranks: missing,
                    detail: String::new(),
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, self.timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        crate::ensure_arg!(
            r < self.shared.n,
            "{what} {r} out of range for world size {}",
            self.shared.n
        );
        Ok(())
    }
}

impl HostGroup for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn barrier(&self) -> Result<()> {
        self.round("barrier", None).map(|_| ())
    }
    fn broadcast_bytes(&self, data: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        self.check_rank(src, "broadcast src")?;
        if self.rank == src {
            crate::ensure_arg!(data.is_some(), "broadcast: the source must pass data");
        }
        let all = self.round(
            "broadcast",
            data.filter(|_| self.rank == src).map(<[u8]>::to_vec),
        )?;
        Ok(all[src].clone().unwrap_or_default())
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.round("all_gather", Some(data.to_vec()))?;
        Ok(all.into_iter().map(Option::unwrap_or_default).collect())
    }
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.check_rank(dst, "send dst")?;
        self.lock()
            .mail
            .entry((self.rank, dst))
            .or_default()
            .push_back(data.to_vec());
        self.shared.cv.notify_all();
        Ok(())
    }
    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        self.check_rank(src, "recv src")?;
        let start = Instant::now();
        let me = self.rank;
        let (st, m) = self.wait(
            self.lock(),
            start,
            || "thread group recv".into(),
            |st| {
                st.mail
                    .get_mut(&(src, me))
                    .and_then(VecDeque::pop_front)
                    .ok_or_else(|| vec![src])
            },
        )?;
        drop(st);
        Ok(m)
    }
}

/// The context of a one-rank group named `group_name` (rank 0, local rank 0, a [`ThreadGroup`]
/// and a [`MemStore`] of its own, deadline `timeout`): what a backend's communicator is created
/// from in a single-process test or tool.
pub fn one_rank_context(group_name: &str, timeout: Duration) -> crate::CommunicatorContext {
    let hg = ThreadGroup::new(1, timeout).pop().expect("one rank");
    crate::CommunicatorContext {
        group_name: group_name.into(),
        ranks: vec![0],
        rank_in_group: 0,
        local_rank: 0,
        host_group: Arc::new(hg),
        store: Arc::new(MemStore::new()),
        timeout,
    }
}

/// Runs `f(rank, group)` on `n` threads with a [`ThreadGroup`] and returns the results in rank order.
/// A panicking rank is reported as an error for that rank.
pub fn run_threads<T: Send>(
    n: usize,
    timeout: Duration,
    f: impl Fn(usize, ThreadGroup) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    let groups = ThreadGroup::new(n, timeout);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(r, g)| {
                let f = &f;
                s.spawn(move || f(r, g))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostGroupExt;

    #[test]
    fn collectives_and_messages() {
        let out = run_threads(4, Duration::from_secs(10), |r, g| {
            g.barrier().unwrap();
            let hi = "hi".to_string();
            let b: String = g.broadcast_obj((r == 2).then_some(&hi), 2).unwrap();
            assert_eq!(b, "hi");
            let all: Vec<usize> = g.all_gather_obj(&(r * 10)).unwrap();
            assert_eq!(all, vec![0, 10, 20, 30]);
            let gathered = g.gather_obj(&r, 1).unwrap();
            assert_eq!(gathered.is_some(), r == 1);
            // ring: send to next, receive from previous; and many-to-one to rank 0
            g.send_obj(&r, (r + 1) % 4).unwrap();
            let p: usize = g.recv_obj((r + 3) % 4).unwrap();
            assert_eq!(p, (r + 3) % 4);
            if r != 0 {
                g.send_obj(&(r, "x"), 0).unwrap();
            } else {
                for s in 1..4 {
                    let (who, _): (usize, String) = g.recv_obj(s).unwrap();
                    assert_eq!(who, s);
                }
            }
            r
        });
        for (i, o) in out.into_iter().enumerate() {
            assert_eq!(o.unwrap(), i);
        }
    }

    #[test]
    fn timeout_names_missing_rank() {
        let out = run_threads(3, Duration::from_millis(200), |r, g| {
            if r == 2 {
                return None;
            }
            Some(g.barrier().unwrap_err())
        });
        for o in out.into_iter().take(2) {
            match o.unwrap().unwrap() {
                Error::Timeout { missing_ranks, .. } => assert_eq!(missing_ranks, vec![2]),
                e => panic!("unexpected {e}"),
            }
        }
    }
}

/// An in-memory [`Store`](crate::Store) for ranks that are threads of one process, with
/// PyTorch's semantics (waits with deadlines, `add` as decimal text, `compare_set`).
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    cv: Condvar,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        self.cv.notify_all();
        Ok(())
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        Ok(self.multi_get(&[key], timeout)?.remove(0))
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut m = self.lock();
        let cur = match m.get(key) {
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| Error::invalid(format!("add: value of {key} is not an integer")))?,
            None => 0,
        };
        let new = cur.wrapping_add(delta);
        m.insert(key.to_string(), new.to_string().into_bytes());
        drop(m);
        self.cv.notify_all();
        Ok(new)
    }
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let mut m = self.lock();
        let out = match m.get(key) {
            None if expected.is_empty() => {
                m.insert(key.to_string(), desired.to_vec());
                desired.to_vec()
            }
            None => expected.to_vec(),
            Some(v) if v == expected => {
                m.insert(key.to_string(), desired.to_vec());
                desired.to_vec()
            }
            Some(v) => v.clone(),
        };
        drop(m);
        self.cv.notify_all();
        Ok(out)
    }
    fn check(&self, keys: &[&str]) -> Result<bool> {
        let m = self.lock();
        Ok(keys.iter().all(|k| m.contains_key(*k)))
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.multi_get(keys, timeout).map(|_| ())
    }
    fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.lock().remove(key).is_some())
    }
    fn num_keys(&self) -> Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn multi_get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let start = Instant::now();
        let mut m = self.lock();
        loop {
            let missing: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| !m.contains_key(*k))
                .collect();
            if missing.is_empty() {
                return Ok(keys.iter().map(|k| m[*k].clone()).collect());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(Error::timeout(
                    "store wait",
                    waited,
                    format!("missing keys: {missing:?}"),
                ));
            }
            m = self
                .cv
                .wait_timeout(m, timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        crate::ensure_arg!(
            keys.len() == values.len(),
            "multi_set: {} keys, {} values",
            keys.len(),
            values.len()
        );
        let mut m = self.lock();
        for (k, v) in keys.iter().zip(values) {
            m.insert(k.to_string(), v.to_vec());
        }
        drop(m);
        self.cv.notify_all();
        Ok(())
    }
    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock()
            .entry(key.to_string())
            .or_default()
            .extend_from_slice(value);
        self.cv.notify_all();
        Ok(())
    }
}

/// A [`GroupFactory`](crate::GroupFactory) for ranks that are threads: host groups are
/// [`ThreadGroup`]s made on first request and shared through a registry keyed by the group key.
#[derive(Debug, Clone)]
pub struct ThreadGroupFactory {
    rank: usize,
    check_collectives: bool,
    generations: crate::GroupGenerations,
    registry: Arc<Mutex<HashMap<String, Vec<Option<ThreadGroup>>>>>,
    store: Arc<MemStore>,
}

impl ThreadGroupFactory {
    /// One factory per rank of a job of `world_size` thread ranks, sharing one registry and store.
    pub fn for_job(world_size: usize) -> Vec<ThreadGroupFactory> {
        let registry = Arc::new(Mutex::new(HashMap::new()));
        let store = Arc::new(MemStore::new());
        (0..world_size)
            .map(|rank| ThreadGroupFactory {
                rank,
                check_collectives: false,
                generations: Default::default(),
                registry: registry.clone(),
                store: store.clone(),
            })
            .collect()
    }
}

impl ThreadGroupFactory {
    /// Makes groups built by this factory check that every rank calls the same collective.
    pub fn with_check_collectives(mut self) -> Self {
        self.check_collectives = true;
        self
    }
}

impl crate::GroupFactory for ThreadGroupFactory {
    fn check_collectives(&self) -> bool {
        self.check_collectives
    }
    fn store(&self) -> Arc<dyn crate::Store> {
        self.store.clone()
    }
    fn host_group(
        &self,
        key: &str,
        ranks: &[usize],
        timeout: Duration,
    ) -> Result<Arc<dyn HostGroup>> {
        let me = ranks.iter().position(|&r| r == self.rank).ok_or_else(|| {
            Error::invalid(format!("rank {} not in group {key} {ranks:?}", self.rank))
        })?;
        let generation = self.generations.next(key);
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let slots = reg.entry(format!("{key}#{generation}")).or_insert_with(|| {
            ThreadGroup::new(ranks.len(), timeout)
                .into_iter()
                .map(Some)
                .collect()
        });
        let g = slots[me].take().ok_or_else(|| {
            Error::invalid(format!("rank {} asked twice for group {key}", self.rank))
        })?;
        Ok(Arc::new(g))
    }
}
