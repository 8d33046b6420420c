//! Test-program plumbing shared by the examples: torchrun's environment and a store-free host
//! group over files in a directory (atomic rename), enough for rendezvous on one machine
//! while `dist-store` is not a dependency of this crate.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dist_core::{CommunicatorContext, Error, HostGroup, Result, Store};

/// torchrun's variables.
#[derive(Debug, Clone)]
pub struct Env {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub port: String,
}

pub fn env() -> Env {
    let get = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    Env {
        rank: get("RANK", "0").parse().expect("RANK"),
        world: get("WORLD_SIZE", "1").parse().expect("WORLD_SIZE"),
        local_rank: get("LOCAL_RANK", "0").parse().expect("LOCAL_RANK"),
        port: get("MASTER_PORT", "29500"),
    }
}

/// A host group whose messages are files in one directory.
#[derive(Debug)]
pub struct FileGroup {
    dir: PathBuf,
    rank: usize,
    world: usize,
    seq: AtomicU64,
    p2p: Mutex<Vec<(u64, u64)>>,
    timeout: Duration,
}

impl FileGroup {
    pub fn new(tag: &str, rank: usize, world: usize, timeout: Duration) -> Result<FileGroup> {
        let dir = std::env::temp_dir().join(format!("dist-rocm-fg-{tag}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        Ok(FileGroup {
            dir,
            rank,
            world,
            seq: AtomicU64::new(0),
            p2p: Mutex::new(vec![(0, 0); world]),
            timeout,
        })
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.{}", self.rank));
        let fin = self.dir.join(name);
        std::fs::write(&tmp, data).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(format!("rename {}", fin.display()), e))
    }
    fn take_all(&self, op: &str, names: &[(usize, String)]) -> Result<Vec<Vec<u8>>> {
        let start = Instant::now();
        let mut out: Vec<Option<Vec<u8>>> = vec![None; names.len()];
        let mut sleep = Duration::from_micros(50);
        loop {
            for (i, (_, n)) in names.iter().enumerate() {
                if out[i].is_none() {
                    if let Ok(b) = std::fs::read(self.dir.join(n)) {
                        out[i] = Some(b);
                    }
                }
            }
            if out.iter().all(Option::is_some) {
                return Ok(out.into_iter().map(Option::unwrap).collect());
            }
            if start.elapsed() > self.timeout {
                let missing = names
                    .iter()
                    .zip(&out)
                    .filter(|(_, o)| o.is_none())
                    .map(|((r, _), _)| *r)
                    .collect();
                return Err(Error::Timeout {
                    op: format!("file group {op}"),
                    waited: start.elapsed(),
                    missing_ranks: missing,
                    detail: format!("dir {}", self.dir.display()),
                });
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(5));
        }
    }
}

impl HostGroup for FileGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn barrier(&self) -> Result<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }
    fn broadcast_bytes(&self, data: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        let s = self.seq.fetch_add(1, Ordering::SeqCst);
        let name = format!("bc{s}");
        if self.rank == src {
            let d = data.ok_or_else(|| Error::invalid("broadcast source passes no data"))?;
            self.put(&name, d)?;
            return Ok(d.to_vec());
        }
        Ok(self.take_all("broadcast", &[(src, name)])?.remove(0))
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let s = self.seq.fetch_add(1, Ordering::SeqCst);
        self.put(&format!("ag{s}_{}", self.rank), data)?;
        let names: Vec<_> = (0..self.world).map(|r| (r, format!("ag{s}_{r}"))).collect();
        self.take_all("all_gather", &names)
    }
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        let n = {
            let mut g = self.p2p.lock().unwrap();
            g[dst].0 += 1;
            g[dst].0
        };
        self.put(&format!("p2p{}_{}_{n}", self.rank, dst), data)
    }
    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        let n = {
            let mut g = self.p2p.lock().unwrap();
            g[src].1 += 1;
            g[src].1
        };
        Ok(self
            .take_all("recv", &[(src, format!("p2p{src}_{}_{n}", self.rank))])?
            .remove(0))
    }
}

/// A store that this program never uses: every call is `Unsupported`.
#[derive(Debug)]
pub struct NoStore;

impl Store for NoStore {
    fn set(&self, _: &str, _: &[u8]) -> Result<()> {
        Err(Error::unsupported("NoStore"))
    }
    fn get(&self, _: &str, _: Duration) -> Result<Vec<u8>> {
        Err(Error::unsupported("NoStore"))
    }
    fn add(&self, _: &str, _: i64) -> Result<i64> {
        Err(Error::unsupported("NoStore"))
    }
    fn compare_set(&self, _: &str, _: &[u8], _: &[u8]) -> Result<Vec<u8>> {
        Err(Error::unsupported("NoStore"))
    }
    fn check(&self, _: &[&str]) -> Result<bool> {
        Err(Error::unsupported("NoStore"))
    }
    fn wait(&self, _: &[&str], _: Duration) -> Result<()> {
        Err(Error::unsupported("NoStore"))
    }
    fn delete(&self, _: &str) -> Result<bool> {
        Err(Error::unsupported("NoStore"))
    }
    fn num_keys(&self) -> Result<u64> {
        Err(Error::unsupported("NoStore"))
    }
    fn multi_get(&self, _: &[&str], _: Duration) -> Result<Vec<Vec<u8>>> {
        Err(Error::unsupported("NoStore"))
    }
    fn multi_set(&self, _: &[&str], _: &[&[u8]]) -> Result<()> {
        Err(Error::unsupported("NoStore"))
    }
    fn append(&self, _: &str, _: &[u8]) -> Result<()> {
        Err(Error::unsupported("NoStore"))
    }
}

pub fn context(e: &Env, group: &str, timeout: Duration) -> Result<CommunicatorContext> {
    let hg = Arc::new(FileGroup::new(
        &format!("{}-{group}", e.port).replace(':', "_"),
        e.rank,
        e.world,
        timeout,
    )?);
    Ok(CommunicatorContext {
        group_name: group.to_string(),
        ranks: (0..e.world).collect(),
        rank_in_group: e.rank,
        local_rank: e.local_rank,
        host_group: hg,
        store: Arc::new(NoStore),
        timeout,
    })
}
