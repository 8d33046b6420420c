//! [`Communicator`]: every `DeviceCommunicator` op as a cached compiled program, and
//! [`TpuBackend`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dist_core::communicator::{
    all_gather_shape, all_gatherv_shape, check_all_to_all_v, check_collective_dim, check_output,
    reduce_scatter_shape, reduce_scatterv_shape, P2pOp,
};
use dist_core::{
    Backend, CommunicatorContext, DType, Device, DeviceCommunicator, DeviceKind, Error,
    HostGroupExt, HostTensor, ReduceOp, Result, Tensor,
};

use crate::program::{compile_options, OpKind, ProgramKey};
use crate::safe::{
    global_client, parse_create_options, Client, ClientConfig, Executable, CREATE_OPTIONS_ENV,
};
use crate::tensor::TpuTensor;

/// The backend: PJRT buffers and the program-based communicator.
#[derive(Debug, Clone, Copy, Default)]
pub struct TpuBackend;

/// Compilation and execution counts of one communicator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    /// Programs compiled (cache misses).
    pub compilations: u64,
    /// Programs launched.
    pub executions: u64,
    /// Programs in the cache.
    pub cached: usize,
}

/// The communicator of one group over a PJRT client: each collective is a StableHLO program,
/// compiled at its first use per (op, dtype, shape, replica groups, devices) and cached.
pub struct Communicator {
    client: &'static Client,
    index: usize,
    rank: usize,
    world: usize,
    group: String,
    /// Global device id of each rank's device.
    device_ids: Vec<i64>,
    timeout: Mutex<Duration>,
    cache: Mutex<HashMap<ProgramKey, Arc<Executable>>>,
    compilations: AtomicU64,
    executions: AtomicU64,
    destroyed: AtomicBool,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("group", &self.group)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device_ids", &self.device_ids)
            .field("platform", &self.client.platform)
            .finish()
    }
}

impl Communicator {
    /// Builds the communicator of `ctx`'s group. Collective over the host group (each rank's
    /// global device id is all-gathered; two ranks on one device are refused).
    ///
    /// The process's client is created at the first call: with the create options of
    /// `DIST_PJRT_CREATE_OPTIONS` and, for a group of several ranks, key-value callbacks over
    /// `ctx.store`. Each rank uses its one addressable device, or device `local_rank` when the
    /// client sees several.
    pub fn new(ctx: &CommunicatorContext) -> Result<Communicator> {
        let world = ctx.ranks.len();
        let rank = ctx.rank_in_group;
        dist_core::ensure_arg!(
            rank < world,
            "rank {rank} out of range for group {} of {world}",
            ctx.group_name
        );
        let global_rank = ctx.ranks[rank];
        let options = match std::env::var(CREATE_OPTIONS_ENV) {
            Ok(s) => parse_create_options(&s, global_rank, world, ctx.local_rank)?,
            Err(_) => Vec::new(),
        };
        let config = ClientConfig {
            options,
            kv: (world > 1).then(|| (ctx.store.clone(), ctx.timeout)),
            timeout: ctx.timeout,
        };
        let client = global_client(&config)?;
        let index = if client.devices.len() == 1 {
            0
        } else {
            ctx.local_rank
        };
        dist_core::ensure_arg!(
            index < client.devices.len(),
            "local rank {} has no device: the {} client sees {} addressable devices",
            ctx.local_rank,
            client.platform,
            client.devices.len()
        );
        let my_id = client.devices[index].id;
        let device_ids: Vec<i64> = if world == 1 {
            vec![my_id]
        } else {
            ctx.host_group.all_gather_obj(&my_id)?
        };
        dist_core::ensure_arg!(
            device_ids.len() == world,
            "got {} device ids for {world} ranks",
            device_ids.len()
        );
        for (i, a) in device_ids.iter().enumerate() {
            if let Some(j) = device_ids[i + 1..].iter().position(|b| b == a) {
                return Err(Error::invalid(format!(
                    "group {}: ranks {i} and {} both use PJRT device {a}",
                    ctx.group_name,
                    i + 1 + j
                )));
            }
        }
        Ok(Communicator {
            client,
            index,
            rank,
            world,
            group: ctx.group_name.clone(),
            device_ids,
            timeout: Mutex::new(ctx.timeout),
            cache: Mutex::new(HashMap::new()),
            compilations: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
        })
    }

    /// The process's client.
    pub fn client(&self) -> &'static Client {
        self.client
    }

    /// Compilation and execution counts.
    pub fn stats(&self) -> ProgramStats {
        ProgramStats {
            compilations: self.compilations.load(Ordering::Relaxed),
            executions: self.executions.load(Ordering::Relaxed),
            cached: self.cache.lock().unwrap_or_else(|e| e.into_inner()).len(),
        }
    }

    fn live(&self, op: &str) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(Error::NotInitialized(format!(
                "{} {op}: communicator destroyed",
                self.group
            )));
        }
        Ok(())
    }

    fn check_tensor(&self, t: &TpuTensor, op: &str) -> Result<()> {
        dist_core::ensure_arg!(
            t.device() == self.device(),
            "{} {op}: tensor on {} but the communicator is on {}",
            self.group,
            t.device(),
            self.device()
        );
        Ok(())
    }

    fn group_key(&self, op: OpKind, t: &TpuTensor) -> ProgramKey {
        ProgramKey {
            op,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            replica_groups: vec![(0..self.world).collect()],
            devices: self.device_ids.clone(),
        }
    }

    fn local_key(&self, op: OpKind, t: &TpuTensor) -> ProgramKey {
        ProgramKey {
            op,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            replica_groups: vec![vec![0]],
            devices: vec![self.device_ids[self.rank]],
        }
    }

    /// The cached executable of `key`, compiling it at its first use.
    pub fn program(&self, key: &ProgramKey) -> Result<Arc<Executable>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.get(key) {
            return Ok(e.clone());
        }
        let text = key.text()?;
        let exe = Arc::new(
            self.client
                .compile(&text, &compile_options(&key.devices))
                .map_err(|e| match e {
                    Error::Backend {
                        backend,
                        code,
                        message,
                    } => Error::Backend {
                        backend,
                        code,
                        message: format!(
                            "compiling {:?} {} {:?}: {message}",
                            key.op, key.dtype, key.shape
                        ),
                    },
                    other => other,
                })?,
        );
        self.compilations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(group = %self.group, rank = self.rank, op = ?key.op, dtype = %key.dtype, shape = ?key.shape, "compiled");
        cache.insert(key.clone(), exe.clone());
        Ok(exe)
    }

    fn run(&self, key: ProgramKey, input: &TpuTensor, op: &str) -> Result<TpuTensor> {
        self.live(op)?;
        let exe = self.program(&key)?;
        let out_shape = key.output_shape();
        let name = format!("{} {op}", self.group);
        let buf = self
            .client
            .execute(&exe, &[input.buffer()], self.timeout(), &name)?;
        self.executions.fetch_add(1, Ordering::Relaxed);
        Ok(TpuTensor::new(buf, input.dtype(), out_shape, self.index))
    }

    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<TpuTensor> {
        TpuTensor::from_host(self.client, &HostTensor::zeros(dtype, shape), self.index)
    }

    fn check_reducible(&self, t: &TpuTensor, op: &str) -> Result<()> {
        dist_core::ensure_arg!(
            t.dtype().is_reducible(),
            "{} {op}: cannot reduce {}",
            self.group,
            t.dtype()
        );
        Ok(())
    }

    fn check_peer(&self, r: usize, what: &str) -> Result<()> {
        dist_core::ensure_arg!(
            r < self.world,
            "{} {what} {r} out of range for world size {}",
            self.group,
            self.world
        );
        Ok(())
    }

    /// Point-to-point through a two-replica collective_permute over (src, dst).
    fn permute(&self, t: &TpuTensor, src: usize, dst: usize, op: &str) -> Result<TpuTensor> {
        dist_core::ensure_arg!(
            src != dst,
            "{} {op}: a rank cannot send to itself",
            self.group
        );
        let key = ProgramKey {
            op: OpKind::Permute {
                pairs: vec![(0, 1)],
            },
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            replica_groups: vec![vec![0, 1]],
            devices: vec![self.device_ids[src], self.device_ids[dst]],
        };
        self.run(key, t, op)
    }
}

impl DeviceCommunicator for Communicator {
    type Tensor = TpuTensor;
    /// PJRT buffers cannot be lent: views are references to the backend's own tensors, and an
    /// op that writes a view replaces its buffer (PJRT buffers are immutable).
    type View<'a> = &'a TpuTensor;
    type ViewMut<'a> = &'a mut TpuTensor;

    fn view(t: &TpuTensor) -> &TpuTensor {
        t
    }
    fn view_mut(t: &mut TpuTensor) -> &mut TpuTensor {
        t
    }
    fn copy(src: &&TpuTensor, dst: &mut &mut TpuTensor) -> Result<()> {
        dist_core::communicator::check_copy(src, dst)?;
        let shape = dst.shape().to_vec();
        **dst = if src.shape() == shape.as_slice() {
            (*src).clone()
        } else {
            <TpuBackend as dist_core::Backend>::reshape((*src).clone(), &shape)?
        };
        Ok(())
    }

    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
    }
    fn device(&self) -> Device {
        Device::new(DeviceKind::Tpu, self.index)
    }

    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<TpuTensor> {
        self.zeros(dtype, shape)
    }

    fn all_reduce(&self, input: &TpuTensor, op: ReduceOp) -> Result<TpuTensor> {
        self.check_tensor(input, "all_reduce")?;
        self.check_reducible(input, "all_reduce")?;
        if input.numel() == 0 {
            return self.zeros(input.dtype(), input.shape());
        }
        self.run(
            self.group_key(OpKind::AllReduce(op), input),
            input,
            "all_reduce",
        )
    }

    fn all_reduce_in_place(&self, tensor: &mut &mut TpuTensor, op: ReduceOp) -> Result<()> {
        **tensor = self.all_reduce(tensor, op)?;
        Ok(())
    }

    fn all_gather(&self, input: &TpuTensor, dim: isize) -> Result<TpuTensor> {
        self.check_tensor(input, "all_gather")?;
        let d = check_collective_dim(input.shape(), dim, "all_gather")?;
        let key = self.group_key(OpKind::AllGather { dim: d }, input);
        if input.numel() == 0 {
            return self.zeros(input.dtype(), &key.output_shape());
        }
        self.run(key, input, "all_gather")
    }

    fn all_gatherv(&self, input: &TpuTensor, dim: isize, sizes: &[usize]) -> Result<TpuTensor> {
        self.check_tensor(input, "all_gatherv")?;
        let d = check_collective_dim(input.shape(), dim, "all_gatherv")?;
        dist_core::ensure_arg!(
            sizes.len() == self.world && sizes[self.rank] == input.shape()[d],
            "{} all_gatherv: sizes {sizes:?} do not match world {} / this rank's {} rows",
            self.group,
            self.world,
            input.shape()[d]
        );
        let max = sizes.iter().copied().max().unwrap_or(0);
        let mut out_shape = input.shape().to_vec();
        out_shape[d] = sizes.iter().sum();
        if out_shape.iter().product::<usize>() == 0 {
            return self.zeros(input.dtype(), &out_shape);
        }
        if sizes.iter().all(|s| *s == max) {
            return self.all_gather(input, dim);
        }
        let padded;
        let x = if input.shape()[d] < max {
            padded = self.run(
                self.local_key(OpKind::PadTo { dim: d, len: max }, input),
                input,
                "all_gatherv pad",
            )?;
            &padded
        } else {
            input
        };
        self.run(
            self.group_key(
                OpKind::GatherV {
                    dim: d,
                    sizes: sizes.to_vec(),
                },
                x,
            ),
            x,
            "all_gatherv",
        )
    }

    fn reduce_scatter(&self, input: &TpuTensor, dim: isize, op: ReduceOp) -> Result<TpuTensor> {
        self.check_tensor(input, "reduce_scatter")?;
        self.check_reducible(input, "reduce_scatter")?;
        let d = check_collective_dim(input.shape(), dim, "reduce_scatter")?;
        dist_core::ensure_arg!(
            input.shape()[d] % self.world == 0,
            "{} reduce_scatter: dim {d} of {:?} is not divisible by world size {}",
            self.group,
            input.shape(),
            self.world
        );
        let key = self.group_key(OpKind::ReduceScatter { dim: d, op }, input);
        if input.numel() == 0 {
            return self.zeros(input.dtype(), &key.output_shape());
        }
        self.run(key, input, "reduce_scatter")
    }

    fn reduce_scatterv(
        &self,
        input: &TpuTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<TpuTensor> {
        self.check_tensor(input, "reduce_scatterv")?;
        self.check_reducible(input, "reduce_scatterv")?;
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        let out_shape = reduce_scatterv_shape(input.shape(), d, sizes, self.world, self.rank)?;
        if input.numel() == 0 {
            return self.zeros(input.dtype(), &out_shape);
        }
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.reduce_scatter(input, dim, op);
        }
        let all = self.all_reduce(input, op)?;
        if out_shape.iter().product::<usize>() == 0 {
            return self.zeros(input.dtype(), &out_shape);
        }
        let start: usize = sizes[..self.rank].iter().sum();
        self.run(
            self.local_key(
                OpKind::Slice {
                    dim: d,
                    start,
                    len: sizes[self.rank],
                },
                &all,
            ),
            &all,
            "reduce_scatterv slice",
        )
    }

    fn gather(&self, input: &TpuTensor, dst: usize, dim: isize) -> Result<Option<TpuTensor>> {
        self.check_peer(dst, "gather dst")?;
        let g = self.all_gather(input, dim)?;
        Ok((self.rank == dst).then_some(g))
    }

    fn broadcast(&self, tensor: &mut &mut TpuTensor, src: usize) -> Result<()> {
        self.check_tensor(tensor, "broadcast")?;
        self.check_peer(src, "broadcast src")?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        **tensor = self.run(
            self.group_key(OpKind::Broadcast { src }, tensor),
            tensor,
            "broadcast",
        )?;
        Ok(())
    }

    fn send(&self, tensor: &&TpuTensor, dst: usize) -> Result<()> {
        self.check_tensor(tensor, "send")?;
        self.check_peer(dst, "send dst")?;
        if self.world == 1 {
            return Err(Error::invalid(format!(
                "send to {dst}: a world-size-1 group has no peer"
            )));
        }
        if tensor.numel() == 0 {
            return Ok(());
        }
        self.permute(tensor, self.rank, dst, &format!("send to {dst}"))?;
        Ok(())
    }

    fn recv(&self, tensor: &mut &mut TpuTensor, src: usize) -> Result<()> {
        self.check_tensor(tensor, "recv")?;
        self.check_peer(src, "recv src")?;
        if self.world == 1 {
            return Err(Error::invalid(format!(
                "recv from {src}: a world-size-1 group has no peer"
            )));
        }
        if tensor.numel() == 0 {
            return Ok(());
        }
        **tensor = self.permute(tensor, src, self.rank, &format!("recv from {src}"))?;
        Ok(())
    }

    fn all_reduce_into(
        &self,
        input: &&TpuTensor,
        output: &mut &mut TpuTensor,
        op: ReduceOp,
    ) -> Result<()> {
        check_output("all_reduce", &**output, input.dtype(), input.shape())?;
        **output = self.all_reduce(input, op)?;
        Ok(())
    }
    fn all_gather_into(
        &self,
        input: &&TpuTensor,
        output: &mut &mut TpuTensor,
        dim: isize,
    ) -> Result<()> {
        let shape = all_gather_shape(input.shape(), dim, self.world, "all_gather")?;
        check_output("all_gather", &**output, input.dtype(), &shape)?;
        **output = self.all_gather(input, dim)?;
        Ok(())
    }
    fn all_gatherv_into(
        &self,
        input: &&TpuTensor,
        output: &mut &mut TpuTensor,
        dim: isize,
        sizes: &[usize],
    ) -> Result<()> {
        let shape = all_gatherv_shape(input.shape(), dim, sizes, self.world, self.rank)?;
        check_output("all_gatherv", &**output, input.dtype(), &shape)?;
        **output = self.all_gatherv(input, dim, sizes)?;
        Ok(())
    }
    fn reduce_scatter_into(
        &self,
        input: &&TpuTensor,
        output: &mut &mut TpuTensor,
        dim: isize,
        op: ReduceOp,
    ) -> Result<()> {
        let shape = reduce_scatter_shape(input.shape(), dim, self.world)?;
        check_output("reduce_scatter", &**output, input.dtype(), &shape)?;
        **output = self.reduce_scatter(input, dim, op)?;
        Ok(())
    }
    fn reduce_scatterv_into(
        &self,
        input: &&TpuTensor,
        output: &mut &mut TpuTensor,
        dim: isize,
        sizes: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        let d = check_collective_dim(input.shape(), dim, "reduce_scatterv")?;
        let shape = reduce_scatterv_shape(input.shape(), d, sizes, self.world, self.rank)?;
        check_output("reduce_scatterv", &**output, input.dtype(), &shape)?;
        **output = self.reduce_scatterv(input, dim, sizes, op)?;
        Ok(())
    }
    fn gather_into(
        &self,
        input: &&TpuTensor,
        output: Option<&mut &mut TpuTensor>,
        dst: usize,
        dim: isize,
    ) -> Result<()> {
        dist_core::ensure_arg!(
            output.is_some() == (self.rank == dst),
            "gather to {dst}: only the destination passes an output"
        );
        if let Some(o) = &output {
            let shape = all_gather_shape(input.shape(), dim, self.world, "gather")?;
            check_output("gather", &***o, input.dtype(), &shape)?;
        }
        let g = self.gather(input, dst, dim)?;
        if let (Some(o), Some(g)) = (output, g) {
            **o = g;
        }
        Ok(())
    }
    /// Each pair in one global order (peers ascending; the lower rank sends first), since a
    /// send and its receive run one collective-permute program together.
    fn batch_send_recv(&self, ops: &mut [P2pOp<'_, &TpuTensor, &mut TpuTensor>]) -> Result<()> {
        let mut peers: Vec<usize> = ops.iter().map(|o| o.peer()).collect();
        peers.sort_unstable();
        peers.dedup();
        for p in peers {
            for phase in 0..2 {
                let sending = (phase == 0) == (self.rank < p);
                for o in ops.iter_mut().filter(|o| o.peer() == p) {
                    match o {
                        P2pOp::Send(t, _) if sending => self.send(t, p)?,
                        P2pOp::Recv(t, _) if !sending => self.recv(t, p)?,
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
    fn all_to_all_v_into(
        &self,
        input: &&TpuTensor,
        send_counts: &[usize],
        output: &mut &mut TpuTensor,
        recv_counts: &[usize],
    ) -> Result<()> {
        check_all_to_all_v(*input, send_counts, &**output, recv_counts, self.world)?;
        if self.world == 1 {
            return Self::copy(input, output);
        }
        Err(Error::unsupported(
            "all_to_all_v on PJRT: StableHLO's all_to_all needs equal splits; use the all-gather / reduce-scatter MoE path",
        ))
    }
    fn destroy(&self) -> Result<()> {
        self.destroyed.store(true, Ordering::Release);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }
}

impl Backend for TpuBackend {
    const NAME: &'static str = "tpu";
    type Tensor = TpuTensor;
    type Communicator = Communicator;

    fn create_communicator(ctx: &CommunicatorContext) -> Result<Communicator> {
        Communicator::new(ctx)
    }

    fn to_host(t: &TpuTensor) -> Result<HostTensor> {
        t.to_host()
    }

    fn from_host(t: &HostTensor, device: Device) -> Result<TpuTensor> {
        dist_core::ensure_arg!(
            device.kind == DeviceKind::Tpu,
            "the tpu backend holds tensors on PJRT devices, not {device}"
        );
        let client = global_client(&ClientConfig {
            options: Vec::new(),
            kv: None,
            timeout: dist_core::DEFAULT_TIMEOUT,
        })?;
        TpuTensor::from_host(client, t, device.index)
    }
}
