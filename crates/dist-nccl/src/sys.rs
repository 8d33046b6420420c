//! Raw NCCL/RCCL C ABI: handle types, enums with NCCL's values and the function-pointer types.
//!
//! Written by hand from `nccl.h` (the ABI has been stable since 2.x; RCCL exports the same names
//! and signatures, with `hipStream_t` in place of `cudaStream_t`). Nothing here is safe to call
//! directly: [`crate::result`] wraps each call.
#![allow(non_camel_case_types, non_upper_case_globals)]

use std::ffi::{c_char, c_int, c_void};

/// `ncclComm_t`: an opaque communicator handle.
pub type ncclComm_t = *mut c_void;
/// `cudaStream_t` / `hipStream_t` (and the driver's `CUstream`): an opaque stream handle.
pub type cudaStream_t = *mut c_void;
/// `ncclResult_t`.
pub type ncclResult_t = c_int;
/// `ncclDataType_t`.
pub type ncclDataType_t = c_int;
/// `ncclRedOp_t`.
pub type ncclRedOp_t = c_int;
/// `ncclWindow_t` (NCCL >= 2.27).
pub type ncclWindow_t = *mut c_void;

/// `NCCL_UNIQUE_ID_BYTES`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: 128 opaque bytes that rank 0 creates and every rank passes to init.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ncclUniqueId {
    /// The bytes.
    pub internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

impl std::fmt::Debug for ncclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ncclUniqueId(..)")
    }
}

// ncclResult_t values.
/// `ncclSuccess`.
pub const ncclSuccess: ncclResult_t = 0;
/// `ncclUnhandledCudaError`.
pub const ncclUnhandledCudaError: ncclResult_t = 1;
/// `ncclSystemError`.
pub const ncclSystemError: ncclResult_t = 2;
/// `ncclInternalError`.
pub const ncclInternalError: ncclResult_t = 3;
/// `ncclInvalidArgument`.
pub const ncclInvalidArgument: ncclResult_t = 4;
/// `ncclInvalidUsage`.
pub const ncclInvalidUsage: ncclResult_t = 5;
/// `ncclRemoteError`.
pub const ncclRemoteError: ncclResult_t = 6;
/// `ncclInProgress`.
pub const ncclInProgress: ncclResult_t = 7;

// ncclDataType_t values.
/// `ncclInt8`.
pub const ncclInt8: ncclDataType_t = 0;
/// `ncclUint8`.
pub const ncclUint8: ncclDataType_t = 1;
/// `ncclInt32`.
pub const ncclInt32: ncclDataType_t = 2;
/// `ncclUint32`.
pub const ncclUint32: ncclDataType_t = 3;
/// `ncclInt64`.
pub const ncclInt64: ncclDataType_t = 4;
/// `ncclUint64`.
pub const ncclUint64: ncclDataType_t = 5;
/// `ncclFloat16`.
pub const ncclFloat16: ncclDataType_t = 6;
/// `ncclFloat32`.
pub const ncclFloat32: ncclDataType_t = 7;
/// `ncclFloat64`.
pub const ncclFloat64: ncclDataType_t = 8;
/// `ncclBfloat16`.
pub const ncclBfloat16: ncclDataType_t = 9;
/// `ncclFloat8e4m3` (NCCL >= 2.24).
pub const ncclFloat8e4m3: ncclDataType_t = 10;
/// `ncclFloat8e5m2` (NCCL >= 2.24).
pub const ncclFloat8e5m2: ncclDataType_t = 11;

// ncclRedOp_t values.
/// `ncclSum`.
pub const ncclSum: ncclRedOp_t = 0;
/// `ncclProd`.
pub const ncclProd: ncclRedOp_t = 1;
/// `ncclMax`.
pub const ncclMax: ncclRedOp_t = 2;
/// `ncclMin`.
pub const ncclMin: ncclRedOp_t = 3;
/// `ncclAvg` (NCCL >= 2.10).
pub const ncclAvg: ncclRedOp_t = 4;

/// `NCCL_WIN_COLL_SYMMETRIC`: the flag vLLM registers windows with.
pub const NCCL_WIN_COLL_SYMMETRIC: c_int = 1;

/// `ncclConfig_t` as of NCCL 2.17 (the first version with `ncclCommInitRankConfig`).
///
/// NCCL reads `size` and `version` and fills the fields a newer header added with their
/// defaults, so passing this older prefix is valid on every later version.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclConfig_t {
    /// `sizeof(ncclConfig_t)` of the header the caller was built with.
    pub size: usize,
    /// [`NCCL_CONFIG_MAGIC`].
    pub magic: u32,
    /// `NCCL_VERSION(2,17,0)` = 21700.
    pub version: u32,
    /// 1: calls block; 0: calls may return `ncclInProgress`.
    pub blocking: c_int,
    /// CGA cluster size.
    pub cga_cluster_size: c_int,
    /// Minimum CTAs per collective.
    pub min_ctas: c_int,
    /// Maximum CTAs per collective.
    pub max_ctas: c_int,
    /// Network plugin name.
    pub net_name: *const c_char,
    /// Share resources with the parent on split.
    pub split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: "use the default" for an int field.
pub const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// The magic of `NCCL_CONFIG_INITIALIZER`.
pub const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;

impl Default for ncclConfig_t {
    /// `NCCL_CONFIG_INITIALIZER` of the 2.17 header.
    fn default() -> Self {
        ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: NCCL_CONFIG_MAGIC,
            version: 21700,
            blocking: NCCL_CONFIG_UNDEF_INT,
            cga_cluster_size: NCCL_CONFIG_UNDEF_INT,
            min_ctas: NCCL_CONFIG_UNDEF_INT,
            max_ctas: NCCL_CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: NCCL_CONFIG_UNDEF_INT,
        }
    }
}

/// `const char* ncclGetErrorString(ncclResult_t)`.
pub type ncclGetErrorString_t = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
/// `ncclResult_t ncclGetVersion(int*)`.
pub type ncclGetVersion_t = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
/// `ncclResult_t ncclGetUniqueId(ncclUniqueId*)`.
pub type ncclGetUniqueId_t = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
/// `ncclResult_t ncclCommInitRank(ncclComm_t*, int nranks, ncclUniqueId, int rank)`.
pub type ncclCommInitRank_t =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
/// `ncclResult_t ncclCommInitRankConfig(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*)`.
pub type ncclCommInitRankConfig_t = unsafe extern "C" fn(
    *mut ncclComm_t,
    c_int,
    ncclUniqueId,
    c_int,
    *mut ncclConfig_t,
) -> ncclResult_t;
/// `ncclAllReduce(sendbuff, recvbuff, count, datatype, op, comm, stream)`.
pub type ncclAllReduce_t = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclReduce(sendbuff, recvbuff, count, datatype, op, root, comm, stream)`.
pub type ncclReduce_t = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclAllGather(sendbuff, recvbuff, sendcount, datatype, comm, stream)`.
pub type ncclAllGather_t = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclReduceScatter(sendbuff, recvbuff, recvcount, datatype, op, comm, stream)`: the C
/// signature of [`ncclAllReduce_t`].
pub type ncclReduceScatter_t = ncclAllReduce_t;
/// `ncclBroadcast(sendbuff, recvbuff, count, datatype, root, comm, stream)`.
pub type ncclBroadcast_t = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclSend` and `ncclRecv`: `(buff, count, datatype, peer, comm, stream)`, `Buf` the buffer.
pub type ncclPeer_t<Buf> = unsafe extern "C" fn(
    Buf,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclSend(sendbuff, count, datatype, peer, comm, stream)`.
pub type ncclSend_t = ncclPeer_t<*const c_void>;
/// `ncclRecv(recvbuff, count, datatype, peer, comm, stream)`.
pub type ncclRecv_t = ncclPeer_t<*mut c_void>;
/// `ncclCommDestroy(comm)` / `ncclCommAbort(comm)`.
pub type ncclCommFree_t = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
/// `ncclGroupStart()` / `ncclGroupEnd()`.
pub type ncclGroup_t = unsafe extern "C" fn() -> ncclResult_t;
/// `ncclCommGetAsyncError(comm, ncclResult_t*)`.
pub type ncclCommGetAsyncError_t =
    unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t;
/// `ncclCommWindowRegister(comm, buff, size, ncclWindow_t*, winFlags)` (NCCL >= 2.27.3).
pub type ncclCommWindowRegister_t =
    unsafe extern "C" fn(ncclComm_t, *mut c_void, usize, *mut ncclWindow_t, c_int) -> ncclResult_t;
/// `ncclCommWindowDeregister(comm, ncclWindow_t)`.
pub type ncclCommWindowDeregister_t =
    unsafe extern "C" fn(ncclComm_t, ncclWindow_t) -> ncclResult_t;

/// Every function the layer binds. Required ones are plain pointers; the optional ones are
/// `None` where the loaded library lacks the symbol.
#[derive(Debug, Clone, Copy)]
pub struct Functions {
    /// `ncclGetErrorString`.
    pub get_error_string: ncclGetErrorString_t,
    /// `ncclGetVersion`.
    pub get_version: ncclGetVersion_t,
    /// `ncclGetUniqueId`.
    pub get_unique_id: ncclGetUniqueId_t,
    /// `ncclCommInitRank`.
    pub comm_init_rank: ncclCommInitRank_t,
    /// `ncclAllReduce`.
    pub all_reduce: ncclAllReduce_t,
    /// `ncclReduce`.
    pub reduce: ncclReduce_t,
    /// `ncclAllGather`.
    pub all_gather: ncclAllGather_t,
    /// `ncclReduceScatter`.
    pub reduce_scatter: ncclReduceScatter_t,
    /// `ncclSend`.
    pub send: ncclSend_t,
    /// `ncclRecv`.
    pub recv: ncclRecv_t,
    /// `ncclBroadcast`.
    pub broadcast: ncclBroadcast_t,
    /// `ncclCommDestroy` (bound, not used by the safe layer, as in vLLM).
    pub comm_destroy: ncclCommFree_t,
    /// `ncclCommAbort`.
    pub comm_abort: ncclCommFree_t,
    /// `ncclGroupStart`.
    pub group_start: ncclGroup_t,
    /// `ncclGroupEnd`.
    pub group_end: ncclGroup_t,
    /// `ncclCommGetAsyncError`, where present.
    pub comm_get_async_error: Option<ncclCommGetAsyncError_t>,
    /// `ncclCommInitRankConfig`, where present (NCCL >= 2.14).
    pub comm_init_rank_config: Option<ncclCommInitRankConfig_t>,
    /// `ncclCommWindowRegister`, where present (NCCL >= 2.27.3).
    pub comm_window_register: Option<ncclCommWindowRegister_t>,
    /// `ncclCommWindowDeregister`, where present.
    pub comm_window_deregister: Option<ncclCommWindowDeregister_t>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<ncclUniqueId>(), 128);
        // size_t, 2 x u32, 4 x int, pointer, int (+ padding) on LP64.
        assert_eq!(std::mem::size_of::<ncclConfig_t>(), 48);
        let c = ncclConfig_t::default();
        assert_eq!(c.magic, 0xcafebeef);
        assert_eq!(c.size, 48);
    }
}
