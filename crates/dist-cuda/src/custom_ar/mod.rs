//! vLLM's custom all-reduce (`custom_all_reduce.py`, `custom_all_reduce.cuh`): CUDA IPC buffers exchanged over the host group, the
//! per-block signal/barrier protocol, one-shot and two-shot kernels compiled with NVRTC at first
//! use, the eager copy-in path and the CUDA-graph path with graph-buffer registration.
//!
//! Layout of the shared memory of each rank:
//! - `meta`: a `Signal` (2 560 B: `start[36][8]`, `end[36][8]`, `_flag[36]`, u32) followed by
//!   `max_size` bytes of two-shot scratch;
//! - `buffer`: `max_size` bytes, the pre-registered eager input;
//! - `rank_data`: 8 MiB of `RankData` entries (8 device pointers each); entry 0 is `buffer`'s,
//!   later entries are filled by graph registration.
//!
//! Every rank opens every peer's `meta` and `buffer` with `cuIpcOpenMemHandle` (lazy peer
//! access); its own slot is its local pointer. Ranks sharing one GPU (as in the device tests)
//! open each other's memory the same way.

pub mod policy;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys};
use dist_core::{decode_obj, encode_obj, DType, Error, HostGroup, Result};
use dist_nccl::{FastAllReduce, GpuRuntime, RawStream};

use crate::driver::{
    allocation_base, check, load_kernels, per_device, Cu, DeviceContext, FaultFlags, KernelFn,
};
use crate::ipc::{ipc_close, ipc_handle, ipc_open};
use crate::DeviceBuffer;
pub use policy::Algo;

/// The kernels' CUDA C source (no headers; NVRTC compiles it for the device's architecture).
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Compiles [`KERNEL_SOURCE`] with NVRTC for compute capability `cc`; returns the PTX.
pub fn compile_ptx(cc: (i32, i32)) -> Result<String> {
    crate::driver::compile_ptx(KERNEL_SOURCE, cc, "the custom all-reduce kernels")
}

/// The compiled kernels of one device: `ar{1,2}_{kind}_{ngpus}`.
struct Kernels {
    funcs: HashMap<(u8, usize, Algo), KernelFn>,
}

fn kind_of(dtype: DType) -> Option<u8> {
    match dtype {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        _ => None,
    }
}

impl Kernels {
    /// Compiled once per process and device, at first use.
    fn get(dev: &Arc<DeviceContext>) -> Result<Arc<Kernels>> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
        per_device(&CACHE, dev, || {
            let mut keys = Vec::new();
            let mut names = Vec::new();
            for kind in 0..3u8 {
                for ng in policy::WORLD_SIZES {
                    for (algo, n) in [(Algo::OneShot, 1), (Algo::TwoShot, 2)] {
                        keys.push((kind, ng, algo));
                        names.push(format!("ar{n}_{kind}_{ng}"));
                    }
                }
            }
            let funcs = load_kernels(dev, KERNEL_SOURCE, "the custom all-reduce kernels", &names)?;
            Ok(Kernels {
                funcs: keys.into_iter().zip(funcs).collect(),
            })
        })
    }
}

/// `create_shared_buffer`: a zeroed allocation on every rank and every peer's allocation
/// opened here. `ptrs[r]` is rank `r`'s buffer as mapped in this process.
pub struct SharedBuffer {
    own: DeviceBuffer,
    ptrs: Vec<u64>,
    opened: Vec<u64>,
}

impl std::fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SharedBuffer({} B, {} ranks)",
            self.own.len(),
            self.ptrs.len()
        )
    }
}

impl SharedBuffer {
    /// Collective over `host`: allocates and zeroes `bytes`, exchanges IPC handles, opens peers'.
    pub fn create(
        dev: &Arc<DeviceContext>,
        host: &dyn HostGroup,
        bytes: usize,
    ) -> Result<SharedBuffer> {
        let own = DeviceBuffer::zeroed(dev, bytes.max(16))?;
        dev.synchronize()?; // zeroed before any peer can see it
        let h = ipc_handle(own.ptr())?;
        let all = host.all_gather_bytes(&h)?;
        let me = host.rank();
        let mut out = SharedBuffer {
            own,
            ptrs: Vec::with_capacity(all.len()),
            opened: Vec::new(),
        };
        dev.bind()?;
        for (r, hb) in all.iter().enumerate() {
            if r == me {
                out.ptrs.push(out.own.ptr());
            } else {
                let p = ipc_open(hb)?;
                out.opened.push(p);
                out.ptrs.push(p);
            }
        }
        Ok(out)
    }
    /// Rank `r`'s buffer as mapped here.
    pub fn ptrs(&self) -> &[u64] {
        &self.ptrs
    }
    /// This rank's own allocation.
    pub fn local(&self) -> u64 {
        self.own.ptr()
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        if self.own.device().bind().is_ok() {
            for p in self.opened.drain(..) {
                ipc_close(p);
            }
        }
    }
}

/// The custom all-reduce of one group on one device.
pub struct CustomAllreduce {
    dev: Arc<DeviceContext>,
    rank: usize,
    world: usize,
    fully_connected: bool,
    max_size: usize,
    forced: Option<Algo>,
    block_limit: usize,
    kernels: Arc<Kernels>,
    meta: SharedBuffer,
    buffer: SharedBuffer,
    rank_data: DeviceBuffer,
    rank_data_used: usize,
    signals: [u64; 8],
    graph_unreg: Vec<u64>,
    /// Outputs of in-place calls captured into graphs (the kernel may not write the input its
    /// peers read): kept for as long as the graphs may be replayed.
    graph_out: Vec<DeviceBuffer>,
    opened: HashMap<Vec<u8>, u64>,
    cc: (i32, i32),
    faults: Arc<FaultFlags>,
}

/// Writes `bytes` at offset `at` of `buf` from the host and waits.
fn write_h2d(buf: &DeviceBuffer, at: usize, bytes: &[u8]) -> Result<()> {
    dist_core::ensure_arg!(
        at.checked_add(bytes.len()).is_some_and(|e| e <= buf.len()),
        "write of {} bytes at {at} into {buf:?}",
        bytes.len()
    );
    let dev = buf.device();
    dev.bind()?;
    // SAFETY: the range lies inside the buffer (checked above), which lives past the wait.
    unsafe { dev.copy_h2d(buf.ptr() + at as u64, bytes, dev.stream()) }?;
    dev.synchronize()
}

impl std::fmt::Debug for CustomAllreduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomAllreduce")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("max_size", &self.max_size)
            .field("fully_connected", &self.fully_connected)
            .field("registered", &self.rank_data_used)
            .finish()
    }
}

/// Whether every pair of the group's devices can reach each other: same device, or peer access
/// with native atomics (the NVLink stand-in, since PCIe peers usually lack them). Devices of other
/// ranks that this process cannot see count as not connected.
fn topology(mine: &[u8], all: &[Vec<u8>]) -> Result<(bool, bool)> {
    let n = cu::device::get_count().cu("cuDeviceGetCount")?.max(0);
    let mut by_uuid: HashMap<Vec<u8>, sys::CUdevice> = HashMap::new();
    for i in 0..n {
        let d = cu::device::get(i).cu("cuDeviceGet")?;
        let u = cu::device::get_uuid(d).cu("cuDeviceGetUuid")?;
        by_uuid.insert(u.bytes.iter().map(|b| *b as u8).collect(), d);
    }
    let me = by_uuid.get(mine).copied();
    let mut all_p2p = true;
    let mut all_atomic = true;
    for u in all {
        if u.as_slice() == mine {
            continue;
        }
        let (Some(a), Some(b)) = (me, by_uuid.get(u).copied()) else {
            all_p2p = false;
            all_atomic = false;
            continue;
        };
        let mut can = 0;
        // SAFETY: valid out-pointer and device handles.
        check("cuDeviceCanAccessPeer", unsafe {
            sys::cuDeviceCanAccessPeer(&mut can, a, b)
        })?;
        let mut atomic = 0;
        // SAFETY: as above.
        check("cuDeviceGetP2PAttribute", unsafe {
            sys::cuDeviceGetP2PAttribute(
                &mut atomic,
                sys::CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED,
                a,
                b,
            )
        })?;
        all_p2p &= can != 0;
        all_atomic &= can != 0 && atomic != 0;
    }
    Ok((all_p2p, all_atomic))
}

impl CustomAllreduce {
    /// Collective over `host`. `Ok(None)` when the group does not qualify (the reason is
    /// logged): vLLM then falls back to NCCL.
    pub fn new(
        dev: &Arc<DeviceContext>,
        host: &dyn HostGroup,
        group_name: &str,
        max_size: Option<usize>,
        timeout: std::time::Duration,
    ) -> Result<Option<CustomAllreduce>> {
        let world = host.world_size();
        let rank = host.rank();
        // Group name and world size are the same on every rank: decided alike without talking.
        if let Err(why) = policy::should_create(group_name, false, world, true) {
            tracing::info!(group = group_name, "custom all-reduce disabled: {why}");
            return Ok(None);
        }
        // The environment and the visible devices are per process: agree on them in one
        // exchange, so that no rank goes on to create buffers its peers will not.
        let disabled = policy::env_flag(std::env::var(policy::DISABLE_ENV).ok().as_deref());
        let forced = policy::parse_algo(std::env::var(policy::ALGO_ENV).ok().as_deref());
        dev.bind()?;
        let uuid = dev.uuid()?;
        let mut mine = vec![disabled as u8, forced.is_ok() as u8];
        mine.extend_from_slice(&uuid);
        let all = host.all_gather_bytes(&mine)?;
        if let Some(r) = all.iter().position(|b| b.len() != mine.len()) {
            return Err(Error::protocol(format!(
                "custom all-reduce set-up: rank {r} sent {} bytes, expected {}",
                all[r].len(),
                mine.len()
            )));
        }
        let flags: Vec<(bool, bool)> = all.iter().map(|b| (b[0] != 0, b[1] != 0)).collect();
        match policy::setup_verdict(&flags) {
            policy::SetupVerdict::Go => {}
            policy::SetupVerdict::Disabled(off) => {
                tracing::info!(
                    group = group_name,
                    "custom all-reduce disabled: {} set on ranks {off:?}",
                    policy::DISABLE_ENV
                );
                return Ok(None);
            }
            policy::SetupVerdict::BadAlgo(bad) => {
                return Err(forced.err().unwrap_or_else(|| {
                    Error::invalid(format!("{} is invalid on ranks {bad:?}", policy::ALGO_ENV))
                }));
            }
        }
        let forced = forced?;
        let uuids: Vec<Vec<u8>> = all.iter().map(|b| b[2..].to_vec()).collect();
        let (p2p, fc) = topology(&uuid, &uuids)?;
        // Each process judged with the devices it can see: the group takes the AND.
        let verdicts = host.all_gather_bytes(&[p2p as u8, fc as u8])?;
        let p2p = verdicts.iter().all(|v| v.first() == Some(&1));
        let fully_connected = verdicts.iter().all(|v| v.get(1) == Some(&1));
        if !p2p || (world > 2 && !fully_connected) {
            tracing::info!(
                group = group_name,
                p2p,
                fully_connected,
                "custom all-reduce disabled: no peer access"
            );
            return Ok(None);
        }
        let cc = dev.compute_capability()?;
        let max_size = max_size.unwrap_or_else(|| policy::max_size(cc, world, false));
        dist_core::ensure_arg!(
            max_size % 16 == 0 && max_size > 0,
            "custom all-reduce max_size {max_size} must be a positive multiple of 16"
        );
        let kernels = Kernels::get(dev)?;
        let meta = SharedBuffer::create(dev, host, policy::SIGNAL_BYTES + max_size)?;
        let buffer = SharedBuffer::create(dev, host, max_size)?;
        let rank_data = DeviceBuffer::zeroed(dev, policy::RANK_DATA_CAPACITY_BYTES)?;
        let faults = FaultFlags::new(
            dev,
            8,
            &format!("{group_name} custom all-reduce (rank {rank})"),
            timeout,
        )?;
        let mut signals = [0u64; 8];
        signals[..world].copy_from_slice(meta.ptrs());
        let mut me = CustomAllreduce {
            dev: dev.clone(),
            rank,
            world,
            fully_connected,
            max_size,
            forced,
            block_limit: policy::DEFAULT_BLOCK_LIMIT,
            kernels,
            meta,
            buffer,
            rank_data,
            rank_data_used: 0,
            signals,
            graph_unreg: Vec::new(),
            graph_out: Vec::new(),
            opened: HashMap::new(),
            cc,
            faults,
        };
        // register_buffer(buffer_ptrs): entry 0.
        let entry = me.entry_bytes(me.buffer.ptrs());
        write_h2d(&me.rank_data, 0, &entry)?;
        me.rank_data_used = 1;
        // Every rank has zeroed its signals and registered before anyone launches.
        host.barrier()?;
        tracing::info!(
            group = group_name,
            rank,
            world,
            max_size,
            fully_connected,
            "custom all-reduce ready"
        );
        Ok(Some(me))
    }

    fn entry_bytes(&self, ptrs: &[u64]) -> Vec<u8> {
        let mut e = [0u64; 8];
        e[..ptrs.len()].copy_from_slice(ptrs);
        e.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    /// Largest input in bytes (exclusive).
    pub fn max_size(&self) -> usize {
        self.max_size
    }
    /// Whether every pair of devices is connected.
    pub fn fully_connected(&self) -> bool {
        self.fully_connected
    }
    /// Overrides the automatic/env algorithm choice (`None`: automatic).
    pub fn force_algo(&mut self, a: Option<Algo>) {
        self.forced = a;
    }
    /// Number of registered `RankData` entries (1 eager + graph buffers).
    pub fn registered(&self) -> usize {
        self.rank_data_used
    }
    /// The eager buffer and the signal buffer, as mapped here (for tests of buffer sharing).
    pub fn shared_buffers(&self) -> (&SharedBuffer, &SharedBuffer) {
        (&self.meta, &self.buffer)
    }

    /// Deadline the kernels' barrier spins get (the communicator's timeout).
    pub fn set_timeout(&self, t: std::time::Duration) {
        self.faults.set_timeout(t);
    }

    /// Peers a kernel gave up waiting for (empty when healthy). Once non-empty the custom
    /// all-reduce refuses work: its barrier counters no longer agree across ranks.
    pub fn faulted_peers(&self) -> Vec<usize> {
        self.faults.faulted()
    }

    /// `should_custom_ar` for a dense input of `nbytes` bytes of `dtype`, and healthy.
    pub fn should(&self, dtype: DType, nbytes: usize) -> bool {
        self.faults.faulted().is_empty()
            && policy::should_custom_ar(
                nbytes,
                true,
                policy::supports_dtype(dtype, self.cc),
                self.world,
                self.fully_connected,
                self.max_size,
            )
    }

    /// The algorithm this call would use.
    pub fn algo_for(&self, nbytes: usize) -> Option<Algo> {
        policy::choose_algo(self.world, nbytes, self.fully_connected, self.forced)
    }

    /// True for memory this crate allocated (a whole `cuMemAlloc` allocation, which CUDA IPC
    /// can share): what the graph path needs. An engine's memory (cudarc's stream-ordered
    /// allocations among it) takes the copy-in path, captured as well.
    fn shareable(&self, p: u64) -> bool {
        // SAFETY: p is a live device address of this context, which is current. A range the
        // driver does not answer for is not one of this crate's allocations (those it does).
        let base = unsafe { allocation_base(p) };
        base.is_ok_and(|b| self.dev.allocation_serial(b).is_some())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        algo: Algo,
        kind: u8,
        rd: u64,
        out: u64,
        packed: usize,
        s: RawStream,
    ) -> Result<()> {
        let f = self
            .kernels
            .funcs
            .get(&(kind, self.world, algo))
            .ok_or_else(|| Error::unsupported(format!("no kernel for world size {}", self.world)))?
            .0;
        let (blocks, threads) = policy::launch_shape(packed, self.block_limit);
        let mut a_rd = rd;
        let mut a_sg = self.signals;
        let mut a_self = self.signals[self.rank];
        let mut a_out = out;
        let mut a_rank = self.rank as i32;
        let mut a_size = i32::try_from(packed)
            .map_err(|_| Error::invalid("custom all-reduce: size over 2^31 packs"))?;
        let mut a_fault = self.faults.device_ptr();
        let mut a_timeout: u64 = self.faults.timeout().as_nanos().min(u64::MAX as u128) as u64;
        let mut params: [*mut c_void; 8] = [
            &mut a_rd as *mut u64 as *mut c_void,
            &mut a_sg as *mut [u64; 8] as *mut c_void,
            &mut a_self as *mut u64 as *mut c_void,
            &mut a_out as *mut u64 as *mut c_void,
            &mut a_rank as *mut i32 as *mut c_void,
            &mut a_size as *mut i32 as *mut c_void,
            &mut a_fault as *mut u64 as *mut c_void,
            &mut a_timeout as *mut u64 as *mut c_void,
        ];
        // SAFETY: the parameters match the kernel's signature (RankData*, RankSignals by value
        // (8 pointers), Signal*, uint4*, int, int, unsigned*, u64); every pointer is live device
        // memory of the sizes the kernel indexes (packed 16-byte units below max_size); `s` is a
        // live stream of this context, which the caller made current.
        unsafe {
            cu::launch_kernel(
                f,
                (blocks as u32, 1, 1),
                (threads as u32, 1, 1),
                0,
                s.as_raw() as sys::CUstream,
                &mut params,
            )
        }
        .cu("cuLaunchKernel (custom all-reduce)")
    }

    /// Addresses recorded during capture and not yet registered.
    pub fn pending_graph_buffers(&self) -> usize {
        self.graph_unreg.len()
    }

    /// `register_graph_buffers`: collective over `host`. Each rank sends, for every input address
    /// it recorded during capture, the IPC handle of the allocation and the offset in it; each
    /// rank opens its peers' (cached by handle) and fills the `RankData` slots the captured
    /// kernels point at, in one copy. Addresses are not de-duplicated, as in vLLM.
    pub fn register_graph_buffers(&mut self, host: &dyn HostGroup) -> Result<usize> {
        self.dev.bind()?;
        let mut mine: Vec<(Vec<u8>, u64)> = Vec::with_capacity(self.graph_unreg.len());
        for &p in &self.graph_unreg {
            // SAFETY: p is a device address this process allocated (the graph keeps it).
            let base = unsafe { allocation_base(p) }?;
            mine.push((ipc_handle(base)?.to_vec(), p - base));
        }
        let all = host.all_gather_bytes(&encode_obj(&mine)?)?;
        let mut per_rank: Vec<Vec<(Vec<u8>, u64)>> = Vec::with_capacity(all.len());
        for (r, b) in all.iter().enumerate() {
            let v: Vec<(Vec<u8>, u64)> = decode_obj(b, host.max_object_bytes())?;
            if v.len() != mine.len() {
                return Err(Error::protocol(format!(
                    "register_graph_buffers: rank {r} captured {} custom all-reduces, rank {} captured {}",
                    v.len(),
                    self.rank,
                    mine.len()
                )));
            }
            per_rank.push(v);
        }
        let n = mine.len();
        let mut bytes = Vec::with_capacity(n * policy::RANK_DATA_BYTES);
        for i in 0..n {
            let mut ptrs = Vec::with_capacity(self.world);
            for (r, v) in per_rank.iter().enumerate() {
                if r == self.rank {
                    ptrs.push(self.graph_unreg[i]);
                } else {
                    let (h, off) = &v[i];
                    let base = match self.opened.get(h) {
                        Some(b) => *b,
                        None => {
                            let b = ipc_open(h)?;
                            self.opened.insert(h.clone(), b);
                            b
                        }
                    };
                    ptrs.push(base + off);
                }
            }
            bytes.extend(self.entry_bytes(&ptrs));
        }
        write_h2d(
            &self.rank_data,
            self.rank_data_used * policy::RANK_DATA_BYTES,
            &bytes,
        )?;
        self.rank_data_used += n;
        self.graph_unreg.clear();
        Ok(n)
    }
}

impl FastAllReduce<DeviceContext> for CustomAllreduce {
    fn accepts(&self, dtype: DType, nbytes: usize) -> bool {
        self.should(dtype, nbytes)
    }

    /// The sum on `s`. While `s` is capturing a graph and the input is memory of this crate,
    /// the kernel reads the input in place and the address is recorded for
    /// [`CustomAllreduce::register_graph_buffers`] (an in-place call then writes into a kept
    /// temporary and copies back: peers still read the input while the kernel writes);
    /// otherwise the input is first copied into the registered buffer (the eager path), and
    /// the kernel writes the output directly, in place or not.
    unsafe fn all_reduce(
        &mut self,
        dev: &DeviceContext,
        src: u64,
        dst: u64,
        dtype: DType,
        nbytes: usize,
        s: RawStream,
    ) -> Result<()> {
        dist_core::ensure_arg!(
            self.should(dtype, nbytes),
            "custom all-reduce cannot take {nbytes} B of {dtype} (max {} B)",
            self.max_size
        );
        let kind = kind_of(dtype)
            .ok_or_else(|| Error::unsupported(format!("custom all-reduce of {dtype}")))?;
        let algo = self
            .algo_for(nbytes)
            .ok_or_else(|| Error::unsupported("custom all-reduce: GPUs not fully connected"))?;
        if nbytes == 0 {
            return Ok(());
        }
        // SAFETY: `s` is a live stream of this context, current (caller's contract).
        let graph = unsafe { dev.is_capturing(s) }? && self.shareable(src);
        if !graph {
            // SAFETY: the registered buffer holds max_size > nbytes bytes; src holds nbytes
            // (caller's contract); both on this device, ordered on `s`.
            unsafe { dev.copy_d2d(self.buffer.local(), src, nbytes, s) }?;
            return self.launch(algo, kind, self.rank_data.ptr(), dst, nbytes / 16, s);
        }
        let slot = self.rank_data_used + self.graph_unreg.len();
        if (slot + 1) * policy::RANK_DATA_BYTES > policy::RANK_DATA_CAPACITY_BYTES {
            return Err(Error::invalid(
                "custom all-reduce: rank data overflow (too many graph buffers)",
            ));
        }
        let rd = self.rank_data.ptr() + (slot * policy::RANK_DATA_BYTES) as u64;
        let tmp = if src == dst {
            // SAFETY: the context is current.
            Some(unsafe { DeviceBuffer::alloc_bound(&self.dev, nbytes) }?)
        } else {
            None
        };
        self.graph_unreg.push(src);
        let out = tmp.as_ref().map_or(dst, |t| t.ptr());
        self.launch(algo, kind, rd, out, nbytes / 16, s)?;
        if let Some(t) = tmp {
            // SAFETY: t and dst hold nbytes each, on this device, ordered on `s`.
            unsafe { dev.copy_d2d(dst, t.ptr(), nbytes, s) }?;
            self.graph_out.push(t);
        }
        Ok(())
    }

    fn set_timeout(&self, t: std::time::Duration) {
        self.faults.set_timeout(t);
    }

    fn end_capture(&mut self, host: &dyn HostGroup) -> Result<usize> {
        self.register_graph_buffers(host)
    }
}

impl Drop for CustomAllreduce {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // Bounded by the kernels' own deadline (plus the wait's grace).
            if let Err(e) =
                self.dev
                    .wait("custom all-reduce teardown", self.faults.timeout(), || {
                        Ok(())
                    })
            {
                tracing::warn!("custom all-reduce teardown: {e}");
            }
            for (_, p) in self.opened.drain() {
                ipc_close(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `libnvrtc.so.13` on the loader path (no GPU): `cargo test -p dist-cuda -- --ignored`.
    #[test]
    #[ignore = "needs libnvrtc (no GPU); run with --ignored"]
    fn kernels_compile_for_sm80_and_sm90() {
        for cc in [(8, 0), (9, 0)] {
            let ptx = compile_ptx(cc).unwrap();
            for kind in 0..3 {
                for ng in policy::WORLD_SIZES {
                    for n in [1, 2] {
                        let name = format!(".entry ar{n}_{kind}_{ng}(");
                        assert!(
                            ptx.contains(&name),
                            "{name} missing from the PTX for {cc:?}"
                        );
                    }
                }
            }
            assert!(ptx.contains("st.release.sys.global.u32"));
            assert!(ptx.contains("cvt.rn.bf16.f32"));
        }
    }
}
