//! vLLM's `StatelessProcessGroup` over the store: control-plane messages between ranks with no
//! process group of any framework, implementing [`HostGroup`] (and so, through
//! [`dist_core::HostGroupExt`], typed `send_obj`/`recv_obj`/`broadcast_obj`/`all_gather_obj`).
//!
//! Keys (under the group's prefix; every value is raw bytes, objects are postcard-encoded serde
//! values capped at [`StatelessProcessGroup::max_object_bytes`]):
//! - `send_to/{dst}/from/{src}/{n}`: the n-th message from `src` to `dst`. Unlike vLLM the
//!   sender is part of the key, so two senders to one receiver never collide. The receiver
//!   deletes the key once read.
//! - `broadcast_from/{src}/{n}`: the n-th broadcast from `src` (per-source counters, as vLLM).
//! - `all_gather/{n}/{rank}`: every rank writes its part, then reads all with one `MULTI_GET`
//!   (vLLM runs `world_size` broadcasts one after the other).
//! - `barrier/{n}/…`: a counter and one release key per phase ([`store_barrier`]: O(1)
//!   requests per rank, O(world) work for the server), and an append-only list of the ranks
//!   that reported in, so a timeout names the missing ones; rank 0 leaves last and deletes
//!   the keys (it may host the store, so it must outlive the others' last request).
//!
//! Every blocking step waits on the server (`WAIT`) with the time left of the operation's
//! deadline, so a barrier's deadline holds even while a read blocks, and a timeout names the
//! ranks whose keys are missing. Data a rank wrote is deleted once older than the expiry
//! (vLLM's `data_expiration_seconds`, default one hour), checked before each write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dist_core::{HostGroup, Store, DEFAULT_MAX_OBJECT_BYTES};
use tracing::debug;

use crate::{ClientOptions, Error, Result, ServerOptions, StoreServer, TcpStoreClient};

/// vLLM's default data expiry.
pub const DEFAULT_DATA_EXPIRATION: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Counters {
    send_dst: Vec<u64>,
    recv_src: Vec<u64>,
    bcast_send: u64,
    bcast_recv_src: Vec<u64>,
    gather: u64,
    barrier: u64,
    entries: VecDeque<(String, Instant)>,
}

/// A group of `world_size` ranks that talk through a store (see the module docs).
#[derive(Debug)]
pub struct StatelessProcessGroup {
    rank: usize,
    world_size: usize,
    store: Arc<dyn Store>,
    prefix: String,
    timeout: Duration,
    data_expiration: Duration,
    max_object_bytes: usize,
    state: Mutex<Counters>,
    // Declared last: dropped after the client.
    server: Option<StoreServer>,
}

impl StatelessProcessGroup {
    /// vLLM's `create`: rank 0 hosts a store server on `host:port` (on a background thread),
    /// every rank connects to it. `timeout` bounds connecting and every later call.
    ///
    /// When rank 0 finds the port taken and the environment says a launcher hosts the store
    /// there (`TORCHELASTIC_USE_AGENT_STORE=True` and `MASTER_PORT` = `port`, as `dist run` and
    /// torchrun set), it connects as a client instead, as PyTorch does.
    pub fn create(
        host: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        check_rank(rank, world_size)?;
        let mut server = None;
        if rank == 0 {
            match StoreServer::start(ServerOptions {
                host: host.to_string(),
                port,
                ..Default::default()
            }) {
                Ok(s) => server = Some(s),
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse && agent_store_on(port) =>
                {
                    debug!(
                        port,
                        "store already hosted by the launcher; connecting as a client"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let port = server.as_ref().map_or(port, |s| s.port());
        let client = TcpStoreClient::connect(host, port, env_client_options(timeout)?)?;
        let mut g = Self::over_store(Arc::new(client), "", rank, world_size, timeout)?;
        g.server = server;
        Ok(g)
    }

    /// The group of this process as a launcher (`dist run`, torchrun) describes it: `RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`. When the launcher hosts the store
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`) every rank is a client; otherwise rank 0 hosts it.
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k)
                .map_err(|_| Error::invalid(format!("environment variable {k} is not set")))
        };
        let num = |k: &str| -> Result<usize> {
            var(k)?
                .parse()
                .map_err(|_| Error::invalid(format!("{k} is not a number")))
        };
        let rank = num("RANK")?;
        let world = num("WORLD_SIZE")?;
        let host = var("MASTER_ADDR")?;
        let port: u16 = var("MASTER_PORT")?
            .parse()
            .map_err(|_| Error::invalid("MASTER_PORT is not a port number"))?;
        if agent_store_on(port) {
            check_rank(rank, world)?;
            let client = TcpStoreClient::connect(&host, port, env_client_options(timeout)?)?;
            Self::over_store(Arc::new(client), "", rank, world, timeout)
        } else {
            Self::create(&host, port, rank, world, timeout)
        }
    }

    /// A group over an existing store, its keys under `prefix` (so several groups share one
    /// store: use the group's name, e.g. `"tp0/"`).
    pub fn over_store(
        store: Arc<dyn Store>,
        prefix: &str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        check_rank(rank, world_size)?;
        Ok(StatelessProcessGroup {
            rank,
            world_size,
            store,
            prefix: prefix.to_string(),
            timeout,
            data_expiration: DEFAULT_DATA_EXPIRATION,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            state: Mutex::new(Counters {
                send_dst: vec![0; world_size],
                recv_src: vec![0; world_size],
                bcast_recv_src: vec![0; world_size],
                ..Default::default()
            }),
            server: None,
        })
    }

    /// Sets how long written data lives before this rank deletes it (vLLM: 3,600 s).
    pub fn with_data_expiration(mut self, d: Duration) -> Self {
        self.data_expiration = d;
        self
    }

    /// Sets the largest message or object accepted.
    pub fn with_max_object_bytes(mut self, n: usize) -> Self {
        self.max_object_bytes = n;
        self
    }

    /// The store under the group.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key prefix of the group.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The server this rank hosts, if it is rank 0 of a group made by [`Self::create`].
    pub fn server(&self) -> Option<&StoreServer> {
        self.server.as_ref()
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn op(&self, what: &str) -> String {
        if self.prefix.is_empty() {
            format!("stateless_group rank {} {what}", self.rank)
        } else {
            format!(
                "stateless_group {} rank {} {what}",
                self.prefix.trim_end_matches('/'),
                self.rank
            )
        }
    }

    /// Deletes the keys this rank wrote longer ago than the expiry.
    pub fn expire_data(&self) -> Result<()> {
        let now = Instant::now();
        loop {
            let key = {
                let mut c = self.counters();
                match c.entries.front() {
                    Some((_, t)) if now.duration_since(*t) > self.data_expiration => {
                        c.entries.pop_front().map(|(k, _)| k)
                    }
                    _ => None,
                }
            };
            let Some(key) = key else { return Ok(()) };
            self.store.delete(&key)?;
        }
    }

    fn write(&self, key: String, data: &[u8]) -> Result<()> {
        self.expire_data()?;
        self.store.set(&key, data)?;
        self.counters().entries.push_back((key, Instant::now()));
        Ok(())
    }

    fn check_size(&self, op: &str, n: usize) -> Result<()> {
        if n > self.max_object_bytes {
            return Err(Error::invalid(format!(
                "{}: message of {n} bytes exceeds the cap of {} bytes",
                self.op(op),
                self.max_object_bytes
            )));
        }
        Ok(())
    }

    fn check_peer(&self, op: &str, r: usize) -> Result<()> {
        if r >= self.world_size {
            return Err(Error::invalid(format!(
                "{}: rank {r} is out of range for world size {}",
                self.op(op),
                self.world_size
            )));
        }
        Ok(())
    }

    /// Waits for `keys[i]` (written by rank `ranks[i]`) within the operation's deadline and
    /// returns their values (one `MULTI_GET`, which waits on the server; one round trip against
    /// our server). A timeout names the ranks whose keys are missing; values are size-capped.
    fn fetch_ranks(
        &self,
        op: &str,
        keys: &[String],
        ranks: &[usize],
        start: Instant,
    ) -> Result<Vec<Vec<u8>>> {
        let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        let left = (start + self.timeout).saturating_duration_since(Instant::now());
        match self.store.multi_get(&refs, left) {
            Ok(vs) => {
                for v in &vs {
                    self.check_size(op, v.len())?;
                }
                Ok(vs)
            }
            Err(e) if e.is_timeout() => Err(self.timeout_error(op, &refs, ranks, start)),
            Err(e) => Err(e),
        }
    }

    fn timeout_error(&self, op: &str, keys: &[&str], ranks: &[usize], start: Instant) -> Error {
        let mut missing = Vec::new();
        for (k, r) in keys.iter().zip(ranks) {
            if !self.store.check(&[k]).unwrap_or(false) {
                missing.push(*r);
            }
        }
        Error::Timeout {
            op: self.op(op),
            waited: start.elapsed(),
            missing_ranks: missing,
            detail: format!("deadline {:?}", self.timeout),
        }
    }
}

/// A barrier of `world` ranks over `store` in O(1) requests per rank and O(world) work for the
/// server, under the keys `{prefix}…` (use a fresh prefix per barrier; they are deleted after).
///
/// Each rank appends its number to `{prefix}arrived` and adds 1 to `{prefix}count`; the rank
/// whose add makes it `world` sets `{prefix}open`, on which every rank waits (PyTorch's store
/// barrier, `torch.distributed.elastic.utils.store.barrier`, works the same way). Then the
/// same for the departure, and rank 0 — which may host the store — waits until every rank
/// has left before deleting the keys, so it leaves last. A timeout reads the arrival list and
/// names the ranks missing from it. Works against any TCPStore server (PyTorch's too): it
/// uses only `APPEND`, `ADD`, `SET`, `WAIT`, `GET` and `DELETE_KEY`.
pub fn store_barrier(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    world: usize,
    op: &str,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    let deadline = start + timeout;
    let key = |k: &str| format!("{prefix}{k}");
    // One phase: report in, count, the last one releases; `wait`: wait for the release.
    let phase = |list: &str, count: &str, release: &str, wait: bool, op: &str| -> Result<()> {
        store.append(&key(list), &(rank as u32).to_le_bytes())?;
        if store.add(&key(count), 1)? == world as i64 {
            store.set(&key(release), b"1")?;
        }
        if !wait {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match store.wait(&[key(release).as_str()], left) {
            Err(e) if e.is_timeout() => {
                let seen = store
                    .get(&key(list), Duration::from_secs(1))
                    .unwrap_or_default();
                let mut here = vec![false; world];
                for c in seen.chunks_exact(4) {
                    let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                    if r < world {
                        here[r] = true;
                    }
                }
                let missing: Vec<usize> = (0..world).filter(|r| !here[*r]).collect();
                let detail = if missing.is_empty() {
                    format!(
                        "deadline {timeout:?}; every rank reported in but the barrier was not \
                         released (the last one may have died before releasing it)"
                    )
                } else {
                    format!("deadline {timeout:?}")
                };
                Err(Error::Timeout {
                    op: op.to_string(),
                    waited: start.elapsed(),
                    missing_ranks: missing,
                    detail,
                })
            }
            r => r,
        }
    };
    phase("arrived", "arrived_count", "open", true, op)?;
    // Only rank 0 waits for the departures: it may host the store and must leave last.
    phase(
        "left",
        "left_count",
        "closed",
        rank == 0,
        &format!("{op} (departure)"),
    )?;
    if rank == 0 {
        for k in [
            "arrived",
            "arrived_count",
            "open",
            "left",
            "left_count",
            "closed",
        ] {
            store.delete(&key(k))?;
        }
    }
    Ok(())
}

/// Client options with `timeout`, and the token of `DIST_STORE_TOKEN_FILE` when set (the
/// launcher passes it when its store requires one).
fn env_client_options(timeout: Duration) -> Result<ClientOptions> {
    let token = match std::env::var_os("DIST_STORE_TOKEN_FILE") {
        Some(p) => Some(crate::auth::read_token_file(std::path::Path::new(&p))?),
        None => None,
    };
    Ok(ClientOptions {
        timeout,
        connect_timeout: timeout,
        token,
        ..Default::default()
    })
}

fn check_rank(rank: usize, world_size: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size {
        return Err(Error::invalid(format!(
            "rank {rank} is out of range for world size {world_size}"
        )));
    }
    Ok(())
}

fn agent_store_on(port: u16) -> bool {
    let agent = std::env::var("TORCHELASTIC_USE_AGENT_STORE")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false);
    let master = std::env::var("MASTER_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok());
    agent && master == Some(port)
}

impl HostGroup for StatelessProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn barrier(&self) -> Result<()> {
        let n = {
            let mut c = self.counters();
            c.barrier += 1;
            c.barrier
        };
        store_barrier(
            self.store.as_ref(),
            &format!("{}barrier/{n}/", self.prefix),
            self.rank,
            self.world_size,
            &self.op("barrier"),
            self.timeout,
        )
    }

    fn broadcast_bytes(&self, data: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        self.check_peer("broadcast", src)?;
        let p = &self.prefix;
        if self.rank == src {
            let data = data.ok_or_else(|| {
                Error::invalid(format!(
                    "{}: the source rank must pass data",
                    self.op("broadcast")
                ))
            })?;
            self.check_size("broadcast", data.len())?;
            let n = {
                let mut c = self.counters();
                c.bcast_send += 1;
                c.bcast_send - 1
            };
            self.write(format!("{p}broadcast_from/{src}/{n}"), data)?;
            return Ok(data.to_vec());
        }
        let n = {
            let mut c = self.counters();
            c.bcast_recv_src[src] += 1;
            c.bcast_recv_src[src] - 1
        };
        let start = Instant::now();
        let key = format!("{p}broadcast_from/{src}/{n}");
        let mut v = self.fetch_ranks("broadcast", &[key], &[src], start)?;
        Ok(v.pop().unwrap_or_default())
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.check_size("all_gather", data.len())?;
        let n = {
            let mut c = self.counters();
            c.gather += 1;
            c.gather - 1
        };
        let p = &self.prefix;
        let start = Instant::now();
        let ranks: Vec<usize> = (0..self.world_size).collect();
        let keys: Vec<String> = ranks
            .iter()
            .map(|r| format!("{p}all_gather/{n}/{r}"))
            .collect();
        self.write(keys[self.rank].clone(), data)?;
        self.fetch_ranks("all_gather", &keys, &ranks, start)
    }

    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.check_peer("send", dst)?;
        self.check_size("send", data.len())?;
        let n = {
            let mut c = self.counters();
            c.send_dst[dst] += 1;
            c.send_dst[dst] - 1
        };
        let key = format!("{}send_to/{dst}/from/{}/{n}", self.prefix, self.rank);
        self.write(key, data)
    }

    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        self.check_peer("recv", src)?;
        let n = {
            let mut c = self.counters();
            c.recv_src[src] += 1;
            c.recv_src[src] - 1
        };
        let key = format!("{}send_to/{}/from/{src}/{n}", self.prefix, self.rank);
        let start = Instant::now();
        let mut v = self.fetch_ranks("recv", std::slice::from_ref(&key), &[src], start)?;
        self.store.delete(&key)?;
        Ok(v.pop().unwrap_or_default())
    }

    fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::HostGroupExt;

    fn groups(world: usize, timeout: Duration) -> (StoreServer, Vec<StatelessProcessGroup>) {
        let s = StoreServer::start(ServerOptions::default()).unwrap();
        let gs = (0..world)
            .map(|r| {
                let c = TcpStoreClient::connect("127.0.0.1", s.port(), ClientOptions::default())
                    .unwrap();
                StatelessProcessGroup::over_store(Arc::new(c), "g/", r, world, timeout).unwrap()
            })
            .collect();
        (s, gs)
    }

    #[test]
    fn collectives_across_threads() {
        let (_s, gs) = groups(4, Duration::from_secs(10));
        std::thread::scope(|sc| {
            for g in &gs {
                sc.spawn(move || {
                    let r = g.rank();
                    let all: Vec<(usize, String)> =
                        g.all_gather_obj(&(r, format!("r{r}"))).unwrap();
                    assert_eq!(
                        all,
                        (0..4).map(|i| (i, format!("r{i}"))).collect::<Vec<_>>()
                    );
                    for src in 0..4 {
                        let v = vec![src as u32; src + 1];
                        let got: Vec<u32> = g.broadcast_obj((r == src).then_some(&v), src).unwrap();
                        assert_eq!(got, v);
                    }
                    // Many-to-one: everyone sends two messages to rank 0.
                    if r != 0 {
                        g.send_obj(&(r, 1u8), 0).unwrap();
                        g.send_obj(&(r, 2u8), 0).unwrap();
                    } else {
                        for src in (1..4).rev() {
                            assert_eq!(g.recv_obj::<(usize, u8)>(src).unwrap(), (src, 1));
                            assert_eq!(g.recv_obj::<(usize, u8)>(src).unwrap(), (src, 2));
                        }
                    }
                    g.barrier().unwrap();
                    g.barrier().unwrap();
                });
            }
        });
        // Barrier keys and received messages are gone; only gathers/broadcasts remain.
        let keys = gs[0].store().num_keys().unwrap();
        assert_eq!(keys, 4 + 4, "4 all_gather parts + 4 broadcasts");
    }

    /// Counts the keys each rank names to the store in waits and reads.
    #[derive(Debug)]
    struct Spy(Arc<dyn Store>, std::sync::atomic::AtomicUsize);
    impl Store for Spy {
        fn set(&self, k: &str, v: &[u8]) -> Result<()> {
            self.0.set(k, v)
        }
        fn get(&self, k: &str, t: Duration) -> Result<Vec<u8>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.get(k, t)
        }
        fn add(&self, k: &str, d: i64) -> Result<i64> {
            self.0.add(k, d)
        }
        fn compare_set(&self, k: &str, e: &[u8], d: &[u8]) -> Result<Vec<u8>> {
            self.0.compare_set(k, e, d)
        }
        fn check(&self, ks: &[&str]) -> Result<bool> {
            self.1
                .fetch_add(ks.len(), std::sync::atomic::Ordering::Relaxed);
            self.0.check(ks)
        }
        fn wait(&self, ks: &[&str], t: Duration) -> Result<()> {
            self.1
                .fetch_add(ks.len(), std::sync::atomic::Ordering::Relaxed);
            self.0.wait(ks, t)
        }
        fn delete(&self, k: &str) -> Result<bool> {
            self.0.delete(k)
        }
        fn num_keys(&self) -> Result<u64> {
            self.0.num_keys()
        }
        fn multi_get(&self, ks: &[&str], t: Duration) -> Result<Vec<Vec<u8>>> {
            self.1
                .fetch_add(ks.len(), std::sync::atomic::Ordering::Relaxed);
            self.0.multi_get(ks, t)
        }
        fn multi_set(&self, ks: &[&str], vs: &[&[u8]]) -> Result<()> {
            self.0.multi_set(ks, vs)
        }
        fn append(&self, k: &str, v: &[u8]) -> Result<()> {
            self.0.append(k, v)
        }
    }

    #[test]
    fn a_barrier_names_o1_keys_per_rank_and_leaves_no_key() {
        const W: usize = 48;
        let s = StoreServer::start(ServerOptions::default()).unwrap();
        let spies: Vec<Arc<Spy>> = (0..W)
            .map(|_| {
                let c = TcpStoreClient::connect("127.0.0.1", s.port(), ClientOptions::default())
                    .unwrap();
                Arc::new(Spy(Arc::new(c), Default::default()))
            })
            .collect();
        std::thread::scope(|sc| {
            for (r, spy) in spies.iter().enumerate() {
                let store: Arc<dyn Store> = spy.clone();
                sc.spawn(move || {
                    let g = StatelessProcessGroup::over_store(
                        store,
                        "b/",
                        r,
                        W,
                        Duration::from_secs(20),
                    )
                    .unwrap();
                    for _ in 0..3 {
                        g.barrier().unwrap();
                    }
                });
            }
        });
        // Three barriers: rank 0 waits twice per barrier, the others once; one key each.
        let named: Vec<usize> = spies
            .iter()
            .map(|s| s.1.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        assert_eq!(named[0], 6, "{named:?}");
        assert!(named[1..].iter().all(|n| *n == 3), "{named:?}");
        assert_eq!(spies[0].num_keys().unwrap(), 0);
        assert_eq!(s.stats().wait_registrations, 0);
    }

    #[test]
    fn barrier_timeout_names_missing_ranks_and_holds_its_deadline() {
        let (_s, gs) = groups(3, Duration::from_millis(300));
        let t0 = Instant::now();
        let e = gs[1].barrier().unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        match e {
            Error::Timeout {
                missing_ranks, op, ..
            } => {
                assert_eq!(missing_ranks, vec![0, 2]);
                assert!(op.contains("barrier"), "{op}");
            }
            e => panic!("{e}"),
        }
        // Rank 1 arrives (by hand) and never leaves: rank 0 passes the arrival, then times out
        // on the departure naming rank 1.
        let st = gs[0].store().clone();
        st.append("g/x/arrived", &1u32.to_le_bytes()).unwrap();
        st.add("g/x/arrived_count", 1).unwrap();
        let e = store_barrier(
            st.as_ref(),
            "g/x/",
            0,
            2,
            "test",
            Duration::from_millis(300),
        )
        .unwrap_err();
        match e {
            Error::Timeout {
                missing_ranks, op, ..
            } => {
                assert_eq!(missing_ranks, vec![1]);
                assert_eq!(op, "test (departure)");
            }
            e => panic!("{e}"),
        }
        let e = gs[2].recv_bytes(0).unwrap_err();
        assert!(e.to_string().contains("[0]"), "{e}");
    }

    #[test]
    fn expiry_deletes_old_data_and_caps_apply() {
        let (_s, gs) = groups(1, Duration::from_secs(5));
        let g = gs
            .into_iter()
            .next()
            .unwrap()
            .with_data_expiration(Duration::from_millis(50));
        g.broadcast_bytes(Some(b"old"), 0).unwrap();
        assert!(g.store().check(&["g/broadcast_from/0/0"]).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        g.broadcast_bytes(Some(b"new"), 0).unwrap();
        assert!(!g.store().check(&["g/broadcast_from/0/0"]).unwrap());
        assert!(g.store().check(&["g/broadcast_from/0/1"]).unwrap());
        let g = g.with_max_object_bytes(4);
        assert!(g.send_bytes(b"too long", 0).is_err());
        assert!(g.send_bytes(b"ok", 5).is_err());
    }

    #[test]
    fn create_hosts_the_server_on_rank_0() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let t = Duration::from_secs(10);
        let h = std::thread::spawn(move || {
            let g = StatelessProcessGroup::create("127.0.0.1", port, 1, 2, t).unwrap();
            let v: String = g.recv_obj(0).unwrap();
            g.barrier().unwrap();
            v
        });
        let g0 = StatelessProcessGroup::create("127.0.0.1", port, 0, 2, t).unwrap();
        assert!(g0.server().is_some());
        g0.send_obj("hi", 1).unwrap();
        g0.barrier().unwrap();
        assert_eq!(h.join().unwrap(), "hi");
    }
}

/// torchrun's variables as a test or tool program sees them, with the defaults of a single
/// process (rank 0 of 1 on `127.0.0.1:29500`) when it runs without a launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world: usize,
    /// `LOCAL_RANK`.
    pub local_rank: usize,
    /// `MASTER_ADDR`.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

impl RankEnv {
    /// Reads the variables; a malformed one is an error, a missing one takes its default.
    pub fn from_env() -> Result<RankEnv> {
        fn get<T: std::str::FromStr>(k: &str, d: T) -> Result<T> {
            match std::env::var(k) {
                Ok(v) => v.trim().parse().map_err(|_| {
                    Error::invalid(format!("environment variable {k}={v:?} is malformed"))
                }),
                Err(_) => Ok(d),
            }
        }
        let rank = get("RANK", 0usize)?;
        let world = get("WORLD_SIZE", 1usize)?;
        check_rank(rank, world)?;
        Ok(RankEnv {
            rank,
            world,
            local_rank: get("LOCAL_RANK", rank)?,
            master_addr: get("MASTER_ADDR", "127.0.0.1".to_string())?,
            master_port: get("MASTER_PORT", 29500u16)?,
        })
    }

    /// The context of a communicator over the whole job named `group`: its host group is a
    /// [`StatelessProcessGroup`] (rank 0 hosts the store unless a launcher does).
    pub fn job_context(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<dist_core::CommunicatorContext> {
        let g = if agent_store_on(self.master_port) {
            StatelessProcessGroup::from_env(timeout)?
        } else {
            StatelessProcessGroup::create(
                &self.master_addr,
                self.master_port,
                self.rank,
                self.world,
                timeout,
            )?
        };
        let store = g.store().clone();
        Ok(dist_core::CommunicatorContext {
            group_name: group.to_string(),
            ranks: (0..self.world).collect(),
            rank_in_group: self.rank,
            local_rank: self.local_rank,
            host_group: Arc::new(g),
            store,
            timeout,
        })
    }
}
