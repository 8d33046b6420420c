//! A stand-in for NCCL's C ABI over host memory, for ranks that are threads of one process (with
//! the host runtime of `super`): every call runs when it is made, streams are ignored.
//!
//! A collective is a *round*: each rank deposits a copy of what it sends and waits until every
//! rank of the communicator has, then computes its own result from the deposits (reductions with
//! dist-core's `reduce_bytes`, in rank order). Sends go to a mailbox per (source, destination),
//! receives wait for their message. Inside `ncclGroupStart`/`ncclGroupEnd` the calls are queued
//! and run at the end: sends first, then the collectives in order, then the receives, so no
//! grouped pattern can deadlock (as NCCL's groups). Every wait gives up after 20 s with an error
//! status. Sizes of matched messages must agree, else `ncclInvalidUsage`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dist_core::{DType, ReduceOp};
use dist_nccl::sys::{self, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use dist_nccl::{Flavor, Library};

const INVALID_ARGUMENT: ncclResult_t = 4;
const INVALID_USAGE: ncclResult_t = 5;
const REMOTE: ncclResult_t = 6;
const WAIT: Duration = Duration::from_secs(20);

/// Bytes in 8-byte aligned storage (reductions view them as any element type).
#[derive(Clone, Default)]
struct Bytes {
    words: Vec<u64>,
    len: usize,
}

impl Bytes {
    /// A copy of `len` bytes at `p` (empty for a null pointer).
    unsafe fn copy(p: *const c_void, len: usize) -> Bytes {
        let mut b = Bytes::zeroed(len);
        if len > 0 && !p.is_null() {
            // SAFETY: the caller's buffer holds `len` bytes; ours holds at least as many.
            unsafe { std::ptr::copy(p as *const u8, b.words.as_mut_ptr() as *mut u8, len) };
        }
        b
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: the words hold at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
    fn zeroed(len: usize) -> Bytes {
        Bytes {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

#[derive(Default)]
struct Exchange {
    /// Round `seq`: each rank's deposit, and how many ranks have yet to read them.
    rounds: HashMap<u64, (Vec<Option<Bytes>>, usize)>,
    /// Messages from `src` to `dst`, in order.
    mail: HashMap<(usize, usize), std::collections::VecDeque<Bytes>>,
}

struct Shared {
    world: usize,
    state: Mutex<Exchange>,
    cv: Condvar,
}

struct FakeComm {
    shared: Arc<Shared>,
    rank: usize,
    seq: u64,
}

enum Op {
    Coll(Box<dyn FnOnce() -> ncclResult_t>),
    Send(Box<dyn FnOnce() -> ncclResult_t>),
    Recv(Box<dyn FnOnce() -> ncclResult_t>),
}

thread_local! {
    static GROUP: RefCell<Option<(usize, Vec<Op>)>> = const { RefCell::new(None) };
}

/// Runs `op` now, or queues it inside a group.
fn submit(op: Op) -> ncclResult_t {
    GROUP.with(|g| match g.borrow_mut().as_mut() {
        Some((_, q)) => {
            q.push(op);
            sys::ncclSuccess
        }
        None => match op {
            Op::Coll(f) | Op::Send(f) | Op::Recv(f) => f(),
        },
    })
}

fn dtype(dt: ncclDataType_t) -> Option<DType> {
    Some(match dt {
        sys::ncclInt8 => DType::I8,
        sys::ncclUint8 => DType::U8,
        sys::ncclInt32 => DType::I32,
        sys::ncclUint32 => DType::U32,
        sys::ncclInt64 => DType::I64,
        sys::ncclUint64 => DType::U64,
        sys::ncclFloat16 => DType::F16,
        sys::ncclFloat32 => DType::F32,
        sys::ncclFloat64 => DType::F64,
        sys::ncclBfloat16 => DType::BF16,
        _ => return None,
    })
}

fn op(o: ncclRedOp_t) -> Option<ReduceOp> {
    Some(match o {
        sys::ncclSum => ReduceOp::Sum,
        sys::ncclProd => ReduceOp::Prod,
        sys::ncclMax => ReduceOp::Max,
        sys::ncclMin => ReduceOp::Min,
        sys::ncclAvg => ReduceOp::Avg,
        _ => return None,
    })
}

/// The communicator behind a handle.
///
/// # Safety
/// `c` came from `comm_init_rank` and is used by one thread at a time (NCCL's rule too).
unsafe fn comm<'a>(c: ncclComm_t) -> &'a mut FakeComm {
    // SAFETY: forwarded contract.
    unsafe { &mut *(c as *mut FakeComm) }
}

/// One round: deposits `mine`, waits for every rank's, returns them all in rank order.
fn round(c: &mut FakeComm, mine: Bytes) -> Result<Vec<Bytes>, ncclResult_t> {
    let seq = c.seq;
    c.seq += 1;
    let sh = c.shared.clone();
    let mut g = sh.state.lock().unwrap();
    let world = sh.world;
    g.rounds
        .entry(seq)
        .or_insert_with(|| (vec![None; world], world))
        .0[c.rank] = Some(mine);
    sh.cv.notify_all();
    let start = Instant::now();
    while g.rounds[&seq].0.iter().any(Option::is_none) {
        if start.elapsed() > WAIT {
            return Err(REMOTE);
        }
        g = sh.cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
    }
    let e = g.rounds.get_mut(&seq).expect("present");
    let all =
        e.0.iter()
            .map(|b| b.clone().expect("all deposited"))
            .collect();
    e.1 -= 1;
    if e.1 == 0 {
        g.rounds.remove(&seq);
    }
    Ok(all)
}

/// Writes `src` to `dst`.
///
/// # Safety
/// `dst` holds `src.len()` bytes.
unsafe fn put(dst: *mut c_void, src: &[u8]) {
    // SAFETY: forwarded contract.
    unsafe { std::ptr::copy(src.as_ptr(), dst as *mut u8, src.len()) };
}

/// Reduces the deposits' byte ranges `[at, at + len)` into `dst`.
///
/// # Safety
/// `dst` holds `len` bytes.
unsafe fn reduce_into(
    dst: *mut c_void,
    all: &[Bytes],
    at: usize,
    len: usize,
    dt: DType,
    o: ReduceOp,
) -> Result<(), ncclResult_t> {
    let mut out = Bytes::zeroed(len);
    let ins: Vec<&[u8]> = all.iter().map(|b| &b.bytes()[at..at + len]).collect();
    dist_core::reduce_bytes(dt, out.bytes_mut(), &ins, o).map_err(|_| INVALID_ARGUMENT)?;
    // SAFETY: forwarded contract.
    unsafe { put(dst, out.bytes()) };
    Ok(())
}

unsafe extern "C" fn get_error_string(_: ncclResult_t) -> *const c_char {
    c"fake NCCL error".as_ptr()
}
unsafe extern "C" fn get_version(v: *mut c_int) -> ncclResult_t {
    // SAFETY: a valid out-pointer.
    unsafe { *v = 22809 };
    sys::ncclSuccess
}
unsafe extern "C" fn get_unique_id(id: *mut ncclUniqueId) -> ncclResult_t {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut b = [0 as c_char; sys::NCCL_UNIQUE_ID_BYTES];
    for (i, x) in n.to_le_bytes().iter().enumerate() {
        b[i] = *x as c_char;
    }
    // SAFETY: a valid out-pointer.
    unsafe { (*id).internal = b };
    sys::ncclSuccess
}
unsafe extern "C" fn comm_init_rank(
    c: *mut ncclComm_t,
    n: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    static REG: OnceLock<Mutex<HashMap<Vec<u8>, Arc<Shared>>>> = OnceLock::new();
    let key: Vec<u8> = id.internal.iter().map(|b| *b as u8).collect();
    let shared = REG
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key)
        .or_insert_with(|| {
            Arc::new(Shared {
                world: n as usize,
                state: Mutex::new(Exchange::default()),
                cv: Condvar::new(),
            })
        })
        .clone();
    if shared.world != n as usize || rank < 0 || rank >= n {
        return INVALID_ARGUMENT;
    }
    let fc = Box::new(FakeComm {
        shared,
        rank: rank as usize,
        seq: 0,
    });
    // SAFETY: a valid out-pointer.
    unsafe { *c = Box::into_raw(fc) as ncclComm_t };
    sys::ncclSuccess
}
unsafe extern "C" fn comm_free(c: ncclComm_t) -> ncclResult_t {
    // SAFETY: made by comm_init_rank, freed once (destroy or abort).
    drop(unsafe { Box::from_raw(c as *mut FakeComm) });
    sys::ncclSuccess
}
/// Queues or runs `f` on the communicator `c` with element type `dt` (an unknown type, or an
/// unknown `op` where there is one, is `ncclInvalidArgument` at once).
fn call(
    kind: fn(Box<dyn FnOnce() -> ncclResult_t>) -> Op,
    dt: ncclDataType_t,
    c: ncclComm_t,
    f: impl FnOnce(&mut FakeComm, DType) -> Result<(), ncclResult_t> + 'static,
) -> ncclResult_t {
    let Some(d) = dtype(dt) else {
        return INVALID_ARGUMENT;
    };
    let c = c as usize;
    submit(kind(Box::new(move || {
        // SAFETY: NCCL's contract: the handle is live and used by this thread only.
        let fc = unsafe { comm(c as ncclComm_t) };
        f(fc, d).err().unwrap_or(sys::ncclSuccess)
    })))
}

// The calls below run under NCCL's contract: every buffer holds the elements the call names,
// alive until the call has run (at once here, or at the group's end).

unsafe extern "C" fn all_reduce(
    s: *const c_void,
    r: *mut c_void,
    n: usize,
    dt: ncclDataType_t,
    o: ncclRedOp_t,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    let Some(o) = op(o) else {
        return INVALID_ARGUMENT;
    };
    call(Op::Coll, dt, c, move |fc, d| {
        // SAFETY: both buffers hold n elements.
        let all = round(fc, unsafe { Bytes::copy(s, n * d.size()) })?;
        // SAFETY: as above.
        unsafe { reduce_into(r, &all, 0, n * d.size(), d, o) }
    })
}
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn reduce(
    s: *const c_void,
    r: *mut c_void,
    n: usize,
    dt: ncclDataType_t,
    o: ncclRedOp_t,
    root: c_int,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    let Some(o) = op(o) else {
        return INVALID_ARGUMENT;
    };
    call(Op::Coll, dt, c, move |fc, d| {
        let me = fc.rank;
        // SAFETY: the send buffer holds n elements.
        let all = round(fc, unsafe { Bytes::copy(s, n * d.size()) })?;
        if me != root as usize {
            return Ok(());
        }
        // SAFETY: the root's receive buffer holds n elements.
        unsafe { reduce_into(r, &all, 0, n * d.size(), d, o) }
    })
}
unsafe extern "C" fn all_gather(
    s: *const c_void,
    r: *mut c_void,
    n: usize,
    dt: ncclDataType_t,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    call(Op::Coll, dt, c, move |fc, d| {
        let len = n * d.size();
        // SAFETY: the send buffer holds n elements.
        let all = round(fc, unsafe { Bytes::copy(s, len) })?;
        for (i, b) in all.iter().enumerate() {
            // SAFETY: the receive buffer holds world * n elements.
            unsafe { put((r as usize + i * len) as *mut c_void, b.bytes()) };
        }
        Ok(())
    })
}
unsafe extern "C" fn reduce_scatter(
    send: *const c_void,
    recv: *mut c_void,
    per_rank: usize,
    dt: ncclDataType_t,
    o: ncclRedOp_t,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    let Some(o) = op(o) else {
        return INVALID_ARGUMENT;
    };
    call(Op::Coll, dt, c, move |fc, d| {
        let (len, me, world) = (per_rank * d.size(), fc.rank, fc.shared.world);
        // SAFETY: the send buffer holds world * n elements.
        let all = round(fc, unsafe { Bytes::copy(send, world * len) })?;
        // SAFETY: the receive buffer holds n elements.
        unsafe { reduce_into(recv, &all, me * len, len, d, o) }
    })
}
unsafe extern "C" fn broadcast(
    s: *const c_void,
    r: *mut c_void,
    n: usize,
    dt: ncclDataType_t,
    root: c_int,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    call(Op::Coll, dt, c, move |fc, d| {
        let mine = if fc.rank == root as usize {
            // SAFETY: the root's send buffer holds n elements.
            unsafe { Bytes::copy(s, n * d.size()) }
        } else {
            Bytes::default()
        };
        let all = round(fc, mine)?;
        // SAFETY: every receive buffer holds n elements.
        unsafe { put(r, all[root as usize].bytes()) };
        Ok(())
    })
}
unsafe extern "C" fn send(
    b: *const c_void,
    n: usize,
    dt: ncclDataType_t,
    peer: c_int,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    call(Op::Send, dt, c, move |fc, d| {
        // SAFETY: the buffer holds n elements.
        let msg = unsafe { Bytes::copy(b, n * d.size()) };
        let mut g = fc.shared.state.lock().unwrap();
        g.mail
            .entry((fc.rank, peer as usize))
            .or_default()
            .push_back(msg);
        fc.shared.cv.notify_all();
        Ok(())
    })
}
unsafe extern "C" fn recv(
    b: *mut c_void,
    n: usize,
    dt: ncclDataType_t,
    peer: c_int,
    c: ncclComm_t,
    _: sys::cudaStream_t,
) -> ncclResult_t {
    call(Op::Recv, dt, c, move |fc, d| {
        let sh = fc.shared.clone();
        let key = (peer as usize, fc.rank);
        let mut g = sh.state.lock().unwrap();
        let start = Instant::now();
        loop {
            if let Some(m) = g.mail.get_mut(&key).and_then(|q| q.pop_front()) {
                if m.len != n * d.size() {
                    return Err(INVALID_USAGE);
                }
                // SAFETY: the buffer holds n elements.
                unsafe { put(b, m.bytes()) };
                return Ok(());
            }
            if start.elapsed() > WAIT {
                return Err(REMOTE);
            }
            g = sh.cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
        }
    })
}
unsafe extern "C" fn group_start() -> ncclResult_t {
    GROUP.with(|g| {
        let mut g = g.borrow_mut();
        match g.as_mut() {
            Some((depth, _)) => *depth += 1,
            None => *g = Some((1, Vec::new())),
        }
    });
    sys::ncclSuccess
}
unsafe extern "C" fn group_end() -> ncclResult_t {
    let ops = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        match g.as_mut() {
            Some((depth, _)) if *depth > 1 => {
                *depth -= 1;
                None
            }
            Some(_) => g.take().map(|(_, q)| q),
            None => Some(Vec::new()),
        }
    });
    let Some(ops) = ops else {
        return sys::ncclSuccess;
    };
    let (mut colls, mut recvs) = (Vec::new(), Vec::new());
    let mut st = sys::ncclSuccess;
    for o in ops {
        match o {
            Op::Send(f) => st = st.max(f()),
            Op::Coll(f) => colls.push(f),
            Op::Recv(f) => recvs.push(f),
        }
    }
    for f in colls.into_iter().chain(recvs) {
        st = st.max(f());
    }
    st
}

/// Installs the stand-in as this process's NCCL (once; later calls return the installed one).
pub fn install() -> &'static Library {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let fns = sys::Functions {
            get_error_string,
            get_version,
            get_unique_id,
            comm_init_rank,
            all_reduce,
            reduce,
            all_gather,
            reduce_scatter,
            send,
            recv,
            broadcast,
            comm_destroy: comm_free,
            comm_abort: comm_free,
            group_start,
            group_end,
            comm_get_async_error: None,
            comm_init_rank_config: None,
            comm_window_register: None,
            comm_window_deregister: None,
        };
        // SAFETY: every function above has the C signature of its NCCL name and NCCL's semantics
        // for host memory; they are statics of this test binary.
        let lib =
            unsafe { Library::from_functions(Flavor::Nccl, fns, "host-memory NCCL stand-in") }
                .expect("the stand-in's ncclGetVersion");
        dist_nccl::install_library(lib).expect("installed first");
    });
    dist_nccl::library(Flavor::Nccl).expect("installed")
}
