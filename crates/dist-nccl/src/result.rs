//! One thin function per NCCL call: arguments passed through, status turned into [`Result`].
//!
//! A non-zero status becomes [`Error::Backend`] with `backend = "nccl"` (or `"rccl"`), the status
//! code, and the library's own message from `ncclGetErrorString`, prefixed with the call's name.
//! Pointer arguments are the caller's responsibility, hence `unsafe`.

use std::ffi::{c_int, c_void};

use dist_core::{Error, Result};

use crate::loader::{Flavor, Library};
use crate::sys::{
    self, cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

/// Turns a status into a `Result`, with NCCL's message.
pub fn check(lib: &Library, status: ncclResult_t, call: &str) -> Result<()> {
    if status == sys::ncclSuccess {
        return Ok(());
    }
    Err(Error::Backend {
        backend: match lib.flavor {
            Flavor::Nccl => "nccl",
            Flavor::Rccl => "rccl",
        },
        code: Some(status as i64),
        message: format!("{call}: {}", lib.error_string(status)),
    })
}

/// `ncclGetUniqueId`.
pub fn get_unique_id(lib: &Library) -> Result<ncclUniqueId> {
    let mut id = ncclUniqueId {
        internal: [0; sys::NCCL_UNIQUE_ID_BYTES],
    };
    // SAFETY: writes 128 bytes into a valid ncclUniqueId.
    let st = unsafe { (lib.fns.get_unique_id)(&mut id) };
    check(lib, st, "ncclGetUniqueId")?;
    Ok(id)
}

/// `ncclCommInitRank`. Blocks until all `nranks` ranks have called it with the same id.
///
/// # Safety
/// The calling thread's current device must be the one the communicator is for.
pub unsafe fn comm_init_rank(
    lib: &Library,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> Result<ncclComm_t> {
    let mut comm: ncclComm_t = std::ptr::null_mut();
    // SAFETY: comm is a valid out-pointer; the id is passed by value.
    let st = unsafe { (lib.fns.comm_init_rank)(&mut comm, nranks, id, rank) };
    check(lib, st, "ncclCommInitRank")?;
    Ok(comm)
}

/// `ncclCommInitRankConfig`, where the library has it.
///
/// # Safety
/// As [`comm_init_rank`].
pub unsafe fn comm_init_rank_config(
    lib: &Library,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
    config: &mut sys::ncclConfig_t,
) -> Result<ncclComm_t> {
    let f = lib.fns.comm_init_rank_config.ok_or_else(|| {
        Error::unsupported(format!(
            "ncclCommInitRankConfig is absent from {}",
            lib.path
        ))
    })?;
    let mut comm: ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer and config for the duration of the call.
    let st = unsafe { f(&mut comm, nranks, id, rank, config) };
    check(lib, st, "ncclCommInitRankConfig")?;
    Ok(comm)
}

/// Writes one `pub unsafe fn $name(lib, args…) -> Result<()>` per entry: the library's
/// `$name` entry point called with the arguments as given, its status through [`check`] under the
/// NCCL name `$call`. The entries' docs carry their safety contracts.
macro_rules! forward {
    ($($(#[$doc:meta])* $name:ident => $call:literal($($arg:ident: $ty:ty),* $(,)?);)*) => {$(
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(lib: &Library, $($arg: $ty),*) -> Result<()> {
            // SAFETY: forwarded contract.
            check(lib, unsafe { (lib.fns.$name)($($arg),*) }, $call)
        }
    )*};
}

forward! {
    /// `ncclAllReduce`.
    ///
    /// # Safety
    /// `send` and `recv` are device buffers of `count` elements of `dt` on the communicator's
    /// device, alive until the work on `stream` completes.
    all_reduce => "ncclAllReduce"(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: ncclDataType_t,
        op: ncclRedOp_t,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclReduce` to `root`.
    ///
    /// # Safety
    /// As [`all_reduce`]; `recv` matters on `root` only.
    reduce => "ncclReduce"(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: ncclDataType_t,
        op: ncclRedOp_t,
        root: c_int,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclAllGather`: `recv` holds `nranks * send_count` elements, rank-major.
    ///
    /// # Safety
    /// As [`all_reduce`] with the sizes above.
    all_gather => "ncclAllGather"(
        send: *const c_void,
        recv: *mut c_void,
        send_count: usize,
        dt: ncclDataType_t,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclReduceScatter`: `send` holds `nranks * recv_count` elements.
    ///
    /// # Safety
    /// As [`all_reduce`] with the sizes above.
    reduce_scatter => "ncclReduceScatter"(
        send: *const c_void,
        recv: *mut c_void,
        recv_count: usize,
        dt: ncclDataType_t,
        op: ncclRedOp_t,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclBroadcast` from `root` (`send` is read on `root` only and may be null elsewhere).
    ///
    /// # Safety
    /// As [`all_reduce`].
    broadcast => "ncclBroadcast"(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: ncclDataType_t,
        root: c_int,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclSend` to `peer`.
    ///
    /// # Safety
    /// As [`all_reduce`].
    send => "ncclSend"(
        buf: *const c_void,
        count: usize,
        dt: ncclDataType_t,
        peer: c_int,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );

    /// `ncclRecv` from `peer`.
    ///
    /// # Safety
    /// As [`all_reduce`].
    recv => "ncclRecv"(
        buf: *mut c_void,
        count: usize,
        dt: ncclDataType_t,
        peer: c_int,
        comm: ncclComm_t,
        stream: cudaStream_t,
    );
}

/// `ncclGroupStart`.
pub fn group_start(lib: &Library) -> Result<()> {
    // SAFETY: no arguments; thread-local group state.
    check(lib, unsafe { (lib.fns.group_start)() }, "ncclGroupStart")
}

/// `ncclGroupEnd`.
pub fn group_end(lib: &Library) -> Result<()> {
    // SAFETY: no arguments; closes this thread's group.
    check(lib, unsafe { (lib.fns.group_end)() }, "ncclGroupEnd")
}

forward! {
    /// `ncclCommAbort`.
    ///
    /// # Safety
    /// `comm` is a live communicator not used again afterwards.
    comm_abort => "ncclCommAbort"(comm: ncclComm_t);

    /// `ncclCommDestroy` (bound for completeness; the safe layer aborts, as vLLM does).
    ///
    /// # Safety
    /// As [`comm_abort`].
    comm_destroy => "ncclCommDestroy"(comm: ncclComm_t);
}

/// `ncclCommGetAsyncError`: `Ok(None)` where the library lacks it, else the pending status.
///
/// # Safety
/// `comm` is a live communicator.
pub unsafe fn comm_get_async_error(
    lib: &Library,
    comm: ncclComm_t,
) -> Result<Option<ncclResult_t>> {
    let Some(f) = lib.fns.comm_get_async_error else {
        return Ok(None);
    };
    let mut st: ncclResult_t = sys::ncclSuccess;
    // SAFETY: valid out-pointer, live comm.
    check(lib, unsafe { f(comm, &mut st) }, "ncclCommGetAsyncError")?;
    Ok(Some(st))
}

/// `ncclCommWindowRegister` with `flags` (vLLM uses [`sys::NCCL_WIN_COLL_SYMMETRIC`]).
///
/// # Safety
/// `buf` is `size` bytes of device memory from `ncclMemAlloc`, alive until deregistered.
pub unsafe fn comm_window_register(
    lib: &Library,
    comm: ncclComm_t,
    buf: *mut c_void,
    size: usize,
    flags: c_int,
) -> Result<sys::ncclWindow_t> {
    let f = lib.fns.comm_window_register.ok_or_else(|| {
        Error::unsupported(format!(
            "ncclCommWindowRegister is absent (NCCL {} < 2.27.3)",
            lib.version()
        ))
    })?;
    let mut w: sys::ncclWindow_t = std::ptr::null_mut();
    // SAFETY: forwarded contract; valid out-pointer.
    let st = unsafe { f(comm, buf, size, &mut w, flags) };
    check(lib, st, "ncclCommWindowRegister")?;
    Ok(w)
}

/// `ncclCommWindowDeregister`.
///
/// # Safety
/// `win` came from [`comm_window_register`] on `comm`.
pub unsafe fn comm_window_deregister(
    lib: &Library,
    comm: ncclComm_t,
    win: sys::ncclWindow_t,
) -> Result<()> {
    let f = lib
        .fns
        .comm_window_deregister
        .ok_or_else(|| Error::unsupported("ncclCommWindowDeregister is absent"))?;
    // SAFETY: forwarded contract.
    check(lib, unsafe { f(comm, win) }, "ncclCommWindowDeregister")
}
