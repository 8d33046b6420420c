//! `ParallelState`: the world group and the TP, DCP, PCP, PP, DP and EP groups of one process,
//! built from a [`ParallelConfig`] with vLLM's exact rank layout, plus the process-wide handle
//! behind vLLM-style calls (`get_tp_group()`, `tensor_model_parallel_all_reduce(x)`).
//!
//! Building groups needs I/O (a store, shared memory), which this crate does not do: the caller
//! passes a [`GroupFactory`] that makes a group's host group and, optionally, its MessageQueue
//! broadcaster. The `dist` facade provides one over the job's TCP store.
//!
//! Differences from vLLM: every process builds only the groups it belongs to (host groups over a
//! store need no collective `new_group` over the world); a group's store namespace is its kind
//! plus the index of its rank list, so groups never collide.

use std::any::Any;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::coordinator::CoordinatorParts;
use crate::diag::Diagnostics;
use crate::{
    Backend, Broadcaster, CommunicatorContext, Device, Error, GroupCoordinator, HostGroup,
    ParallelConfig, Result, Store,
};

/// This process's place in the job.
#[derive(Debug, Clone)]
pub struct WorldInfo {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank on this node (device index).
    pub local_rank: usize,
    /// The device this process's tensors live on.
    pub device: Device,
    /// Deadline of every blocking call in every group.
    pub timeout: Duration,
}

/// Makes the I/O parts of a group.
pub trait GroupFactory: Send + Sync {
    /// The job's store.
    fn store(&self) -> Arc<dyn Store>;
    /// The host group of the ranks `ranks` (global, in group order) for this process (which is in
    /// `ranks`). `key` (`"tp/g1"`: the kind and the index of the rank list) is the same on every
    /// rank of the group; the factory must keep re-initialisations apart, e.g. by counting the
    /// requests per kind (the part before '/'): every rank asks for exactly one group of each kind
    /// per initialisation, in the same order. Collective over `ranks`.
    fn host_group(
        &self,
        key: &str,
        ranks: &[usize],
        timeout: Duration,
    ) -> Result<Arc<dyn HostGroup>>;
    /// A MessageQueue broadcaster (writer = group rank 0) over a group's host group, or `None` when
    /// the factory has none. Collective over the group.
    fn broadcaster(
        &self,
        _key: &str,
        _host: &Arc<dyn HostGroup>,
    ) -> Result<Option<Box<dyn Broadcaster>>> {
        Ok(None)
    }
    /// The deadline of the groups of `kind` (`"tp"`, `"pp"`…); `default` is the job's.
    fn timeout_for(&self, _kind: &str, default: Duration) -> Duration {
        default
    }
    /// The job's diagnostics, attached to every group.
    fn diagnostics(&self) -> Option<Arc<dyn Diagnostics>> {
        None
    }
    /// Whether groups check that every rank calls the same collective (`DIST_CHECK_COLLECTIVES`).
    fn check_collectives(&self) -> bool {
        false
    }
}

/// Numbers the re-initialisations of each kind of group, so a factory can give a rebuilt group
/// a fresh namespace (`"tp/g0#2"`) on which every rank agrees: each rank asks for exactly one group
/// of each kind per initialisation, in the same order, whatever the index of its rank list.
#[derive(Debug, Clone, Default)]
pub struct GroupGenerations(Arc<Mutex<std::collections::HashMap<String, usize>>>);

impl GroupGenerations {
    /// The generation (from 1) of the group with `key` (`"tp/g1"`): the count of requests for its kind.
    pub fn next(&self, key: &str) -> usize {
        let kind = key.split('/').next().unwrap_or(key);
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = g.entry(kind.to_string()).or_insert(0);
        *n += 1;
        *n
    }
}

/// The groups of one process.
#[derive(Debug)]
pub struct ParallelState<B: Backend> {
    config: ParallelConfig,
    world: Arc<GroupCoordinator<B>>,
    tp: Arc<GroupCoordinator<B>>,
    dcp: Arc<GroupCoordinator<B>>,
    pcp: Arc<GroupCoordinator<B>>,
    pp: Arc<GroupCoordinator<B>>,
    dp: Arc<GroupCoordinator<B>>,
    ep: Option<Arc<GroupCoordinator<B>>>,
}

/// Options of one group's construction.
struct GroupSpec<'a> {
    kind: &'a str,
    groups: &'a [Vec<usize>],
    device_communicator: bool,
    mq: bool,
}

impl<B: Backend> ParallelState<B> {
    /// Builds the world group and every model-parallel group of `config` (vLLM's
    /// `init_distributed_environment` + `initialize_model_parallel`). Collective over the world.
    pub fn initialize(
        world: &WorldInfo,
        factory: &dyn GroupFactory,
        config: ParallelConfig,
    ) -> Result<Self> {
        crate::ensure_arg!(
            config.world_size == world.world_size,
            "config world size {} differs from the job's {}",
            config.world_size,
            world.world_size
        );
        crate::ensure_arg!(
            world.rank < world.world_size,
            "rank {} out of range for world size {}",
            world.rank,
            world.world_size
        );
        let layout = config.layout()?;
        let all: Vec<Vec<usize>> = vec![(0..world.world_size).collect()];
        let build = |spec: GroupSpec<'_>| -> Result<Arc<GroupCoordinator<B>>> {
            build_group::<B>(world, factory, spec)
        };
        let world_group = build(GroupSpec {
            kind: "world",
            groups: &all,
            device_communicator: false,
            mq: false,
        })?;
        let tp = build(GroupSpec {
            kind: "tp",
            groups: &layout.tp,
            device_communicator: true,
            mq: true,
        })?;
        let dcp = build(GroupSpec {
            kind: "dcp",
            groups: &layout.dcp,
            device_communicator: true,
            mq: true,
        })?;
        let pcp = build(GroupSpec {
            kind: "pcp",
            groups: &layout.pcp,
            device_communicator: true,
            mq: false,
        })?;
        let pp = build(GroupSpec {
            kind: "pp",
            groups: &layout.pp,
            device_communicator: true,
            mq: false,
        })?;
        let dp = build(GroupSpec {
            kind: "dp",
            groups: &layout.dp,
            device_communicator: true,
            mq: false,
        })?;
        let ep = match &layout.ep {
            Some(g) => Some(build(GroupSpec {
                kind: "ep",
                groups: g,
                device_communicator: true,
                mq: false,
            })?),
            None => None,
        };
        Ok(ParallelState {
            config,
            world: world_group,
            tp,
            dcp,
            pcp,
            pp,
            dp,
            ep,
        })
    }

    /// The configuration the groups were built from.
    pub fn config(&self) -> &ParallelConfig {
        &self.config
    }
    /// The world group (no device communicator, as in vLLM).
    pub fn world(&self) -> &Arc<GroupCoordinator<B>> {
        &self.world
    }
    /// This process's tensor-parallel group.
    pub fn tp(&self) -> &Arc<GroupCoordinator<B>> {
        &self.tp
    }
    /// Decode-context-parallel group.
    pub fn dcp(&self) -> &Arc<GroupCoordinator<B>> {
        &self.dcp
    }
    /// Prefill-context-parallel group.
    pub fn pcp(&self) -> &Arc<GroupCoordinator<B>> {
        &self.pcp
    }
    /// Pipeline-parallel group.
    pub fn pp(&self) -> &Arc<GroupCoordinator<B>> {
        &self.pp
    }
    /// Data-parallel group.
    pub fn dp(&self) -> &Arc<GroupCoordinator<B>> {
        &self.dp
    }
    /// Expert-parallel group, when built.
    pub fn ep(&self) -> Option<&Arc<GroupCoordinator<B>>> {
        self.ep.as_ref()
    }

    /// Destroys every model-parallel group (vLLM's `destroy_model_parallel`) and the world group.
    pub fn destroy(&self) -> Result<()> {
        let mut first_err = None;
        for g in [&self.tp, &self.dcp, &self.pcp, &self.pp, &self.dp]
            .into_iter()
            .chain(self.ep.as_ref())
            .chain([&self.world])
        {
            if let Err(e) = g.destroy() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn build_group<B: Backend>(
    world: &WorldInfo,
    factory: &dyn GroupFactory,
    spec: GroupSpec<'_>,
) -> Result<Arc<GroupCoordinator<B>>> {
    let (index, ranks) = spec
        .groups
        .iter()
        .enumerate()
        .find(|(_, g)| g.contains(&world.rank))
        .ok_or_else(|| {
            Error::invalid(format!("rank {} is in no {} group", world.rank, spec.kind))
        })?;
    let unique_name = unique_name(spec.kind);
    let key = format!("{}/g{index}", spec.kind);
    let timeout = factory.timeout_for(spec.kind, world.timeout);
    let host = factory.host_group(&key, ranks, timeout)?;
    let rank_in_group = ranks
        .iter()
        .position(|&r| r == world.rank)
        .expect("found above");
    let comm = if spec.device_communicator && ranks.len() > 1 {
        let ctx = CommunicatorContext {
            group_name: format!("{unique_name}/g{index}"),
            ranks: ranks.clone(),
            rank_in_group,
            local_rank: world.local_rank,
            host_group: host.clone(),
            store: factory.store(),
            timeout,
        };
        Some(B::create_communicator(&ctx)?)
    } else {
        None
    };
    let mq = if spec.mq && ranks.len() > 1 {
        factory.broadcaster(&key, &host)?
    } else {
        None
    };
    tracing::debug!(group = %unique_name, ?ranks, rank_in_group, "group built");
    Ok(Arc::new(GroupCoordinator::new(CoordinatorParts {
        unique_name,
        ranks: ranks.clone(),
        rank: world.rank,
        local_rank: world.local_rank,
        device: world.device,
        host,
        comm,
        mq,
        diag: factory.diagnostics(),
        check_collectives: factory.check_collectives(),
    })?))
}

/// vLLM's `_get_unique_name`: `"tp:0"`, `"tp:1"`… with a counter per base name in this process.
pub fn unique_name(base: &str) -> String {
    static COUNTERS: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
    let mut c = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let n = match c.iter_mut().find(|(b, _)| b == base) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            c.push((base.to_string(), 0));
            0
        }
    };
    format!("{base}:{n}")
}

// ---------------------------------------------------------------------------------------------
// The process-wide handle.

struct Global {
    state: Arc<dyn Any + Send + Sync>,
    tp_patch: Option<Arc<dyn Any + Send + Sync>>,
}

static GLOBAL: RwLock<Option<Global>> = RwLock::new(None);

fn read_global() -> std::sync::RwLockReadGuard<'static, Option<Global>> {
    GLOBAL.read().unwrap_or_else(|e| e.into_inner())
}
fn write_global() -> std::sync::RwLockWriteGuard<'static, Option<Global>> {
    GLOBAL.write().unwrap_or_else(|e| e.into_inner())
}

/// Installs `state` as this process's model-parallel state (vLLM's module globals).
pub fn set_global<B: Backend>(state: Arc<ParallelState<B>>) -> Result<()> {
    let mut g = write_global();
    crate::ensure_arg!(
        g.is_none(),
        "model parallel groups are already initialized; destroy them first"
    );
    *g = Some(Global {
        state,
        tp_patch: None,
    });
    Ok(())
}

/// The process-wide state for backend `B`.
pub fn global<B: Backend>() -> Result<Arc<ParallelState<B>>> {
    let g = read_global();
    let g = g
        .as_ref()
        .ok_or_else(|| Error::NotInitialized("model parallel groups are not initialized".into()))?;
    g.state.clone().downcast::<ParallelState<B>>().map_err(|_| {
        Error::invalid(format!(
            "the model parallel state was built for another backend than {}",
            B::NAME
        ))
    })
}

/// True once model-parallel groups are initialized (vLLM: TP and PP both set).
pub fn model_parallel_is_initialized() -> bool {
    read_global().is_some()
}

/// Initializes the process-wide groups if needed; otherwise checks the sizes agree
/// (vLLM's `ensure_model_parallel_initialized`).
pub fn ensure_model_parallel_initialized<B: Backend>(
    world: &WorldInfo,
    factory: &dyn GroupFactory,
    config: ParallelConfig,
) -> Result<Arc<ParallelState<B>>> {
    if model_parallel_is_initialized() {
        let s = global::<B>()?;
        let c = s.config();
        crate::ensure_arg!(
            c.tp == config.tp && c.pp == config.pp && c.pcp == config.pcp,
            "model parallel groups exist with tp={} pp={} pcp={}, asked for tp={} pp={} pcp={}",
            c.tp,
            c.pp,
            c.pcp,
            config.tp,
            config.pp,
            config.pcp
        );
        return Ok(s);
    }
    let s = Arc::new(ParallelState::<B>::initialize(world, factory, config)?);
    set_global(s.clone())?;
    Ok(s)
}

/// Destroys the process-wide groups and clears the handle (vLLM's `destroy_model_parallel` +
/// `destroy_distributed_environment`). Safe to call when nothing is initialized.
pub fn destroy_model_parallel<B: Backend>() -> Result<()> {
    let taken = write_global().take();
    if let Some(g) = taken {
        if let Ok(s) = g.state.downcast::<ParallelState<B>>() {
            return s.destroy();
        }
    }
    Ok(())
}

/// The tensor-parallel group (the patched one inside [`patch_tensor_parallel_group`]).
pub fn get_tp_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    {
        let g = read_global();
        if let Some(p) = g.as_ref().and_then(|g| g.tp_patch.clone()) {
            return p
                .downcast::<GroupCoordinator<B>>()
                .map_err(|_| Error::invalid("patched TP group is of another backend"));
        }
    }
    Ok(global::<B>()?.tp().clone())
}
/// The pipeline-parallel group.
pub fn get_pp_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    Ok(global::<B>()?.pp().clone())
}
/// The data-parallel group.
pub fn get_dp_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    Ok(global::<B>()?.dp().clone())
}
/// The decode-context-parallel group.
pub fn get_dcp_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    Ok(global::<B>()?.dcp().clone())
}
/// The prefill-context-parallel group.
pub fn get_pcp_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    Ok(global::<B>()?.pcp().clone())
}
/// The expert-parallel group.
pub fn get_ep_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    global::<B>()?
        .ep()
        .cloned()
        .ok_or_else(|| Error::NotInitialized("expert parallel group was not built (ep off)".into()))
}
/// The world group.
pub fn get_world_group<B: Backend>() -> Result<Arc<GroupCoordinator<B>>> {
    Ok(global::<B>()?.world().clone())
}
/// Tensor-parallel world size.
pub fn get_tensor_model_parallel_world_size<B: Backend>() -> Result<usize> {
    Ok(get_tp_group::<B>()?.world_size())
}
/// This process's tensor-parallel rank.
pub fn get_tensor_model_parallel_rank<B: Backend>() -> Result<usize> {
    Ok(get_tp_group::<B>()?.rank_in_group())
}

/// Restores the TP group when dropped; see [`patch_tensor_parallel_group`].
#[derive(Debug)]
pub struct TpPatchGuard {
    _private: (),
}

impl Drop for TpPatchGuard {
    fn drop(&mut self) {
        if let Some(g) = write_global().as_mut() {
            g.tp_patch = None;
        }
    }
}

/// Makes `tp` the TP group that [`get_tp_group`] returns until the guard drops (vLLM's
/// `patch_tensor_parallel_group`, used by draft models with another TP size). Not re-entrant.
pub fn patch_tensor_parallel_group<B: Backend>(
    tp: Arc<GroupCoordinator<B>>,
) -> Result<TpPatchGuard> {
    let mut g = write_global();
    let g = g
        .as_mut()
        .ok_or_else(|| Error::NotInitialized("model parallel groups are not initialized".into()))?;
    crate::ensure_arg!(g.tp_patch.is_none(), "the TP group is already patched");
    g.tp_patch = Some(tp);
    Ok(TpPatchGuard { _private: () })
}

/// `get_tp_group().all_reduce(x)`.
pub fn tensor_model_parallel_all_reduce<B: Backend>(x: B::Tensor) -> Result<B::Tensor> {
    get_tp_group::<B>()?.all_reduce(x)
}
/// `get_tp_group().all_gather(x, dim)`.
pub fn tensor_model_parallel_all_gather<B: Backend>(x: B::Tensor, dim: isize) -> Result<B::Tensor> {
    get_tp_group::<B>()?.all_gather(x, dim)
}
/// `get_tp_group().reduce_scatter(x, dim)`.
pub fn tensor_model_parallel_reduce_scatter<B: Backend>(
    x: B::Tensor,
    dim: isize,
) -> Result<B::Tensor> {
    get_tp_group::<B>()?.reduce_scatter(x, dim)
}
/// `get_tp_group().gather(x, dst, dim)`.
pub fn tensor_model_parallel_gather<B: Backend>(
    x: B::Tensor,
    dst: usize,
    dim: isize,
) -> Result<Option<B::Tensor>> {
    get_tp_group::<B>()?.gather(x, dst, dim)
}
