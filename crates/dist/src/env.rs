//! Setting up a job: the store, the world, the group factory and the model-parallel state
//! (vLLM's `init_distributed_environment` and `initialize_model_parallel`).

use std::sync::Arc;
use std::time::Duration;

use crate::diagnostics::StoreDiagnostics;
use dist_core::{
    Backend, Broadcaster, Device, DeviceKind, Error, GroupFactory, HostGroup, ParallelConfig,
    ParallelState, Result, Store, WorldInfo,
};
use dist_cpu::mq::MessageQueue;
use dist_store::{ClientOptions, StatelessProcessGroup, TcpStoreClient};

/// Environment variable with the default deadline of every blocking call, in seconds.
pub const TIMEOUT_ENV: &str = "DIST_TIMEOUT";

/// The deadline of blocking calls: `DIST_TIMEOUT` seconds, else [`dist_core::DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(dist_core::DEFAULT_TIMEOUT)
}

/// How to find the job (vLLM's `init_distributed_environment` arguments).
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// `"env://"` (torchrun's variables) or `"tcp://host:port"` (IPv6 in brackets).
    pub init_method: String,
    /// World size; `None` reads `WORLD_SIZE`.
    pub world_size: Option<usize>,
    /// Global rank; `None` reads `RANK`.
    pub rank: Option<usize>,
    /// Local rank; `None` reads `LOCAL_RANK` (default: the rank).
    pub local_rank: Option<usize>,
    /// Deadline of every blocking call.
    pub timeout: Duration,
    /// Kind of device this process's tensors live on.
    pub device_kind: DeviceKind,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            init_method: "env://".into(),
            world_size: None,
            rank: None,
            local_rank: None,
            timeout: default_timeout(),
            device_kind: DeviceKind::Cpu,
        }
    }
}

fn env_usize(k: &str) -> Result<usize> {
    std::env::var(k)
        .map_err(|_| {
            Error::invalid(format!(
                "environment variable {k} is not set (run under `dist run` or torchrun)"
            ))
        })?
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("environment variable {k} is not a number")))
}

/// Splits `tcp://host:port` (with `[v6]` hosts) into host and port.
pub fn parse_tcp_uri(uri: &str) -> Result<(String, u16)> {
    let rest = uri.strip_prefix("tcp://").ok_or_else(|| {
        Error::invalid(format!(
            "init method {uri:?} is not env:// or tcp://host:port"
        ))
    })?;
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once("]:")
            .ok_or_else(|| Error::invalid(format!("bad IPv6 address in {uri:?}")))?;
        (h, p)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| Error::invalid(format!("no port in {uri:?}")))?
    };
    let port = port
        .parse()
        .map_err(|_| Error::invalid(format!("bad port in {uri:?}")))?;
    Ok((host.to_string(), port))
}

/// A running job as seen from one process: its place, the store, and the world's host group.
#[derive(Debug)]
pub struct DistEnv {
    diagnostics: Option<Arc<StoreDiagnostics>>,
    world: WorldInfo,
    store: Arc<dyn Store>,
    world_group: Arc<StatelessProcessGroup>,
    factory: StoreGroupFactory,
}

impl DistEnv {
    /// Joins the job (vLLM's `init_distributed_environment`): connects to the store (rank 0 hosts
    /// it unless a launcher does), and checks every rank arrived with a barrier.
    pub fn init(opts: &InitOptions) -> Result<DistEnv> {
        let world_size = match opts.world_size {
            Some(w) => w,
            None => env_usize("WORLD_SIZE")?,
        };
        let rank = match opts.rank {
            Some(r) => r,
            None => env_usize("RANK")?,
        };
        let local_rank = match opts.local_rank {
            Some(r) => r,
            None if opts.init_method == "env://" => env_usize("LOCAL_RANK").unwrap_or(rank),
            None => rank,
        };
        let group = if opts.init_method == "env://" {
            StatelessProcessGroup::from_env(opts.timeout)?
        } else {
            let (host, port) = parse_tcp_uri(&opts.init_method)?;
            StatelessProcessGroup::create(&host, port, rank, world_size, opts.timeout)?
        };
        dist_core::ensure_arg!(
            group.rank() == rank && group.world_size() == world_size,
            "the launcher says rank {} of {}, the arguments say {rank} of {world_size}",
            group.rank(),
            group.world_size()
        );
        let store = group.store().clone();
        let world = WorldInfo {
            rank,
            world_size,
            local_rank,
            device: Device::new(
                opts.device_kind,
                if opts.device_kind == DeviceKind::Cpu {
                    0
                } else {
                    local_rank
                },
            ),
            timeout: opts.timeout,
        };
        let world_group = Arc::new(group);
        world_group.barrier()?;
        let diagnostics = diagnostics_connection(&opts.init_method, opts.timeout)
            .map(|s| StoreDiagnostics::start(rank, s));
        let mut factory = StoreGroupFactory::new(rank, store.clone(), true);
        factory.diagnostics = diagnostics.clone();
        Ok(DistEnv {
            diagnostics,
            factory,
            world,
            store,
            world_group,
        })
    }

    /// Joins a job whose store is already running at `host:port` (every rank a client).
    pub fn connect(
        host: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<DistEnv> {
        let client = TcpStoreClient::connect(
            host,
            port,
            ClientOptions {
                timeout,
                connect_timeout: timeout,
                ..Default::default()
            },
        )?;
        let store: Arc<dyn Store> = Arc::new(client);
        let group =
            StatelessProcessGroup::over_store(store.clone(), "world/", rank, world_size, timeout)?;
        group.barrier()?;
        Ok(DistEnv {
            diagnostics: None,
            factory: StoreGroupFactory::new(rank, store.clone(), true),
            world: WorldInfo {
                rank,
                world_size,
                local_rank: rank,
                device: Device::CPU,
                timeout,
            },
            store,
            world_group: Arc::new(group),
        })
    }

    /// This process's place.
    pub fn world(&self) -> &WorldInfo {
        &self.world
    }
    /// The job's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    /// The world's host group.
    pub fn world_group(&self) -> &Arc<StatelessProcessGroup> {
        &self.world_group
    }
    /// The job's diagnostics (flight recorder, snapshots), when its store connection could be made.
    pub fn diagnostics(&self) -> Option<&Arc<StoreDiagnostics>> {
        self.diagnostics.as_ref()
    }

    /// The factory that builds groups over this job's store.
    pub fn factory(&self) -> &StoreGroupFactory {
        &self.factory
    }

    /// Builds the model-parallel groups of `config` on backend `B` (vLLM's
    /// `initialize_model_parallel`). Collective over the world.
    pub fn initialize_model_parallel<B: Backend>(
        &self,
        config: ParallelConfig,
    ) -> Result<ParallelState<B>> {
        ParallelState::initialize(&self.world, &self.factory, config)
    }

    /// Leaves the job (vLLM's `destroy_model_parallel` + `destroy_distributed_environment`):
    /// destroys the process-wide groups of backend `B` if any, waits for every rank (so the
    /// rank hosting the store leaves last), and stops the diagnostics publisher.
    pub fn destroy<B: Backend>(self) -> Result<()> {
        let groups = dist_core::parallel_state::destroy_model_parallel::<B>();
        let barrier = self.world_group.barrier();
        if let Some(d) = &self.diagnostics {
            d.stop();
        }
        groups.and(barrier)
    }

    /// Builds the groups and installs them as the process-wide state behind `get_tp_group()`
    /// (vLLM's `ensure_model_parallel_initialized`).
    pub fn ensure_model_parallel_initialized<B: Backend>(
        &self,
        config: ParallelConfig,
    ) -> Result<Arc<ParallelState<B>>> {
        dist_core::parallel_state::ensure_model_parallel_initialized::<B>(
            &self.world,
            &self.factory,
            config,
        )
    }
}

/// Makes groups over one store: host groups are [`StatelessProcessGroup`]s whose keys live under
/// the group's key (and a generation, so re-initialised groups never read old keys);
/// broadcasters are shared-memory [`MessageQueue`]s (remote readers over TCP).
#[derive(Debug, Clone)]
pub struct StoreGroupFactory {
    rank: usize,
    store: Arc<dyn Store>,
    generations: dist_core::GroupGenerations,
    message_queues: bool,
    diagnostics: Option<Arc<StoreDiagnostics>>,
    check_collectives: bool,
}

impl StoreGroupFactory {
    /// A factory for global rank `rank` over `store`; `message_queues` attaches a MessageQueue
    /// broadcaster to the TP and DCP groups, as vLLM does.
    pub fn new(rank: usize, store: Arc<dyn Store>, message_queues: bool) -> Self {
        StoreGroupFactory {
            rank,
            store,
            generations: Default::default(),
            message_queues,
            diagnostics: None,
            check_collectives: check_collectives_from_env(),
        }
    }
}

impl GroupFactory for StoreGroupFactory {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    fn diagnostics(&self) -> Option<Arc<dyn dist_core::diag::Diagnostics>> {
        self.diagnostics
            .clone()
            .map(|d| d as Arc<dyn dist_core::diag::Diagnostics>)
    }
    fn check_collectives(&self) -> bool {
        self.check_collectives
    }
    fn timeout_for(&self, kind: &str, default: Duration) -> Duration {
        group_timeout(kind).unwrap_or(default)
    }
    fn host_group(
        &self,
        key: &str,
        ranks: &[usize],
        timeout: Duration,
    ) -> Result<Arc<dyn HostGroup>> {
        let me = ranks.iter().position(|&r| r == self.rank).ok_or_else(|| {
            Error::invalid(format!(
                "rank {} is not in group {key} {ranks:?}",
                self.rank
            ))
        })?;
        let generation = self.generations.next(key);
        let g = StatelessProcessGroup::over_store(
            self.store.clone(),
            &format!("{key}#{generation}/"),
            me,
            ranks.len(),
            timeout,
        )?;
        Ok(Arc::new(g))
    }
    fn broadcaster(
        &self,
        _key: &str,
        host: &Arc<dyn HostGroup>,
    ) -> Result<Option<Box<dyn Broadcaster>>> {
        if !self.message_queues {
            return Ok(None);
        }
        // vLLM: 4 MiB chunks, 6 of them, writer = group rank 0.
        let mq = MessageQueue::create_from_group(host.as_ref(), 0, 4 << 20, 6)?;
        Ok(Some(Box::new(MqBroadcaster(mq))))
    }
}

/// The MessageQueue as a coordinator's broadcaster.
#[derive(Debug)]
pub struct MqBroadcaster(pub MessageQueue);

impl Broadcaster for MqBroadcaster {
    fn is_writer(&self) -> bool {
        self.0.is_writer()
    }
    fn enqueue_bytes(&self, data: &[u8]) -> Result<()> {
        self.0.enqueue_bytes(data)
    }
    fn dequeue_bytes(&self) -> Result<Vec<u8>> {
        self.0.dequeue_bytes()
    }
}

/// The deadline of one kind of group from `DIST_TIMEOUT_<KIND>` (`DIST_TIMEOUT_TP=60`), seconds.
pub fn group_timeout(kind: &str) -> Option<Duration> {
    std::env::var(format!("{TIMEOUT_ENV}_{}", kind.to_ascii_uppercase()))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// Environment variable that turns on the collective mismatch detector (`1`): before each
/// collective every rank all-gathers a small descriptor of its call over the group's host group
/// (one store round trip per rank and call), and ranks that disagree get an error naming the odd
/// ones instead of a hang or a wrong result.
pub const CHECK_COLLECTIVES_ENV: &str = "DIST_CHECK_COLLECTIVES";

fn check_collectives_from_env() -> bool {
    matches!(
        std::env::var(CHECK_COLLECTIVES_ENV).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// A store connection of the diagnostics' own, with short call deadlines.
fn diagnostics_connection(init_method: &str, timeout: Duration) -> Option<Arc<dyn Store>> {
    let (host, port) = if init_method == "env://" {
        (
            std::env::var("MASTER_ADDR").ok()?,
            std::env::var("MASTER_PORT").ok()?.parse().ok()?,
        )
    } else {
        parse_tcp_uri(init_method).ok()?
    };
    let token = match std::env::var_os("DIST_STORE_TOKEN_FILE") {
        Some(p) => Some(dist_store::auth::read_token_file(std::path::Path::new(&p)).ok()?),
        None => None,
    };
    let c = TcpStoreClient::connect(
        &host,
        port,
        ClientOptions {
            timeout: Duration::from_secs(1),
            connect_timeout: timeout.min(Duration::from_secs(10)),
            token,
            ..Default::default()
        },
    )
    .map_err(|e| tracing::warn!("diagnostics disabled: cannot open a store connection: {e}"))
    .ok()?;
    Some(Arc::new(c))
}

/// vLLM's `in_the_same_node_as` (collective): which ranks of `group` share a node with group
/// rank `source_rank` — [`dist_cpu::shm::same_node`], the workspace's one definition.
pub fn in_the_same_node_as(group: &dyn HostGroup, source_rank: usize) -> Result<Vec<bool>> {
    dist_cpu::shm::same_node(group, source_rank)
}

/// vLLM's `_node_count`: nodes assigned greedily in rank order (collective).
pub fn node_count(group: &dyn HostGroup) -> Result<usize> {
    let n = group.world_size();
    let mut node = vec![0usize; n];
    let mut count = 0;
    for r in 0..n {
        if node[r] != 0 {
            continue;
        }
        count += 1;
        node[r] = count;
        let same = in_the_same_node_as(group, r)?;
        for (i, s) in same.iter().enumerate() {
            if *s && node[i] == 0 {
                node[i] = count;
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris() {
        assert_eq!(
            parse_tcp_uri("tcp://127.0.0.1:29500").unwrap(),
            ("127.0.0.1".into(), 29500)
        );
        assert_eq!(parse_tcp_uri("tcp://[::1]:7").unwrap(), ("::1".into(), 7));
        assert!(parse_tcp_uri("env://").is_err());
        assert!(parse_tcp_uri("tcp://host").is_err());
        assert!(parse_tcp_uri("tcp://host:x").is_err());
    }

    #[test]
    fn per_group_timeouts_from_env() {
        std::env::set_var("DIST_TIMEOUT_PCP", "2.5");
        assert_eq!(group_timeout("pcp"), Some(Duration::from_millis(2500)));
        let f = StoreGroupFactory::new(0, Arc::new(dist_core::local::MemStore::new()), false);
        assert_eq!(
            f.timeout_for("pcp", Duration::from_secs(9)),
            Duration::from_millis(2500)
        );
        assert_eq!(
            f.timeout_for("dcp", Duration::from_secs(9)),
            Duration::from_secs(9)
        );
        std::env::set_var("DIST_TIMEOUT_PCP", "nonsense");
        assert_eq!(group_timeout("pcp"), None);
        std::env::remove_var("DIST_TIMEOUT_PCP");
    }

    #[test]
    fn same_node_probe_with_threads() {
        let out = dist_core::local::run_threads(3, Duration::from_secs(10), |_, g| {
            let v = in_the_same_node_as(&g, 1).unwrap();
            let n = node_count(&g).unwrap();
            (v, n)
        });
        for o in out {
            let (v, n) = o.unwrap();
            assert_eq!(v, vec![true, true, true]);
            assert_eq!(n, 1);
        }
    }
}
