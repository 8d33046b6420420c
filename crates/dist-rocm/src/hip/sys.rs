//! The raw HIP runtime ABI this crate uses: handle types, the few structs, the enum values of
//! `hip_runtime_api.h` / `driver_types.h`, the function-pointer types and the table of bound
//! functions. Nothing here is called directly; [`super::result`] wraps each function.
//!
//! Only calls whose C signature has been the same from HIP 5 to HIP 7 are bound: no
//! `hipDeviceProp_t` (its layout changed in 6.0) and no `hipDeviceAttribute_t` (its values
//! changed in 6.0). The values below are also CUDA's runtime values for the same names
//! (`hipErrorNotReady` = `cudaErrorNotReady` = 600…), which is what HIP's NVIDIA platform relies on.
#![allow(non_camel_case_types, non_upper_case_globals)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `hipError_t`: a status code.
pub type hipError_t = c_int;
/// `hipStream_t`: an opaque stream handle (RCCL's `hipStream_t` is the same pointer).
pub type hipStream_t = *mut c_void;
/// `hipEvent_t`.
pub type hipEvent_t = *mut c_void;
/// `hipGraph_t`.
pub type hipGraph_t = *mut c_void;
/// `hipGraphExec_t`.
pub type hipGraphExec_t = *mut c_void;
/// `hipMemcpyKind`.
pub type hipMemcpyKind = c_int;
/// `hipStreamCaptureMode`.
pub type hipStreamCaptureMode = c_int;
/// `hipStreamCaptureStatus`.
pub type hipStreamCaptureStatus = c_int;

/// Bytes of an IPC handle (`HIP_IPC_HANDLE_SIZE`).
pub const HIP_IPC_HANDLE_SIZE: usize = 64;

/// `hipIpcMemHandle_t`: an opaque 64-byte handle to device memory another process can open.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct hipIpcMemHandle_t {
    /// The handle's bytes.
    pub reserved: [c_char; HIP_IPC_HANDLE_SIZE],
}

/// Successful completion.
pub const hipSuccess: hipError_t = 0;
/// A parameter is invalid.
pub const hipErrorInvalidValue: hipError_t = 1;
/// Out of device memory.
pub const hipErrorOutOfMemory: hipError_t = 2;
/// The runtime is not initialised.
pub const hipErrorNotInitialized: hipError_t = 3;
/// The installed driver is older than the runtime (or absent).
pub const hipErrorInsufficientDriver: hipError_t = 35;
/// No device: `hipGetDeviceCount` found none.
pub const hipErrorNoDevice: hipError_t = 100;
/// The device ordinal is out of range.
pub const hipErrorInvalidDevice: hipError_t = 101;
/// Asynchronous work has not completed yet (not an error).
pub const hipErrorNotReady: hipError_t = 600;

/// `hipMemcpyHostToDevice`.
pub const hipMemcpyHostToDevice: hipMemcpyKind = 1;
/// `hipMemcpyDeviceToHost`.
pub const hipMemcpyDeviceToHost: hipMemcpyKind = 2;
/// `hipMemcpyDeviceToDevice`.
pub const hipMemcpyDeviceToDevice: hipMemcpyKind = 3;

/// `hipStreamNonBlocking`: no implicit synchronisation with the null stream.
pub const hipStreamNonBlocking: c_uint = 1;
/// `hipEventDefault`.
pub const hipEventDefault: c_uint = 0;
/// `hipEventDisableTiming`.
pub const hipEventDisableTiming: c_uint = 2;
/// `hipIpcMemLazyEnablePeerAccess` (0 in HIP; CUDA's is 1).
pub const hipIpcMemLazyEnablePeerAccess: c_uint = 0;

/// `hipStreamCaptureModeGlobal`.
pub const hipStreamCaptureModeGlobal: hipStreamCaptureMode = 0;
/// `hipStreamCaptureModeThreadLocal`.
pub const hipStreamCaptureModeThreadLocal: hipStreamCaptureMode = 1;
/// `hipStreamCaptureModeRelaxed`.
pub const hipStreamCaptureModeRelaxed: hipStreamCaptureMode = 2;
/// `hipStreamCaptureStatusNone`.
pub const hipStreamCaptureStatusNone: hipStreamCaptureStatus = 0;
/// `hipStreamCaptureStatusActive`.
pub const hipStreamCaptureStatusActive: hipStreamCaptureStatus = 1;
/// `hipStreamCaptureStatusInvalidated`.
pub const hipStreamCaptureStatusInvalidated: hipStreamCaptureStatus = 2;

/// `const char* hipGetErrorString(hipError_t)` (also `hipGetErrorName`).
pub type hipGetErrorString_t = unsafe extern "C" fn(hipError_t) -> *const c_char;
/// `hipError_t f(int*)`: `hipRuntimeGetVersion`, `hipDriverGetVersion`, `hipGetDeviceCount`, `hipGetDevice`.
pub type hipGetInt_t = unsafe extern "C" fn(*mut c_int) -> hipError_t;
/// `hipSetDevice(int)`.
pub type hipSetDevice_t = unsafe extern "C" fn(c_int) -> hipError_t;
/// `hipError_t f(void)`: `hipDeviceSynchronize`.
pub type hipVoid_t = unsafe extern "C" fn() -> hipError_t;
/// `hipDeviceGetName(char*, int len, int device)` (also `hipDeviceGetPCIBusId`).
pub type hipDeviceGetName_t = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> hipError_t;
/// `hipDeviceTotalMem(size_t*, int device)`.
pub type hipDeviceTotalMem_t = unsafe extern "C" fn(*mut usize, c_int) -> hipError_t;
/// `hipStreamCreateWithFlags(hipStream_t*, unsigned)`.
pub type hipStreamCreateWithFlags_t = unsafe extern "C" fn(*mut hipStream_t, c_uint) -> hipError_t;
/// `hipError_t f(hipStream_t)`: `hipStreamDestroy`, `hipStreamQuery`, `hipStreamSynchronize`.
pub type hipStreamFn_t = unsafe extern "C" fn(hipStream_t) -> hipError_t;
/// `hipMalloc(void**, size_t)`.
pub type hipMalloc_t = unsafe extern "C" fn(*mut *mut c_void, usize) -> hipError_t;
/// `hipFree(void*)` (also `hipIpcCloseMemHandle`).
pub type hipFree_t = unsafe extern "C" fn(*mut c_void) -> hipError_t;
/// `hipMemsetAsync(void*, int, size_t, hipStream_t)`.
pub type hipMemsetAsync_t =
    unsafe extern "C" fn(*mut c_void, c_int, usize, hipStream_t) -> hipError_t;
/// `hipMemcpyAsync(void* dst, const void* src, size_t, hipMemcpyKind, hipStream_t)`.
pub type hipMemcpyAsync_t = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    usize,
    hipMemcpyKind,
    hipStream_t,
) -> hipError_t;
/// `hipMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream)`.
pub type hipMemcpy2DAsync_t = unsafe extern "C" fn(
    *mut c_void,
    usize,
    *const c_void,
    usize,
    usize,
    usize,
    hipMemcpyKind,
    hipStream_t,
) -> hipError_t;
/// `hipEventCreateWithFlags(hipEvent_t*, unsigned)`.
pub type hipEventCreateWithFlags_t = unsafe extern "C" fn(*mut hipEvent_t, c_uint) -> hipError_t;
/// `hipError_t f(hipEvent_t)`: `hipEventDestroy`, `hipEventQuery`.
pub type hipEventFn_t = unsafe extern "C" fn(hipEvent_t) -> hipError_t;
/// `hipEventRecord(hipEvent_t, hipStream_t)`.
pub type hipEventRecord_t = unsafe extern "C" fn(hipEvent_t, hipStream_t) -> hipError_t;
/// `hipStreamWaitEvent(hipStream_t, hipEvent_t, unsigned flags)`.
pub type hipStreamWaitEvent_t = unsafe extern "C" fn(hipStream_t, hipEvent_t, c_uint) -> hipError_t;
/// `hipEventElapsedTime(float* ms, hipEvent_t start, hipEvent_t stop)`.
pub type hipEventElapsedTime_t =
    unsafe extern "C" fn(*mut f32, hipEvent_t, hipEvent_t) -> hipError_t;
/// `hipIpcGetMemHandle(hipIpcMemHandle_t*, void*)`.
pub type hipIpcGetMemHandle_t =
    unsafe extern "C" fn(*mut hipIpcMemHandle_t, *mut c_void) -> hipError_t;
/// `hipIpcOpenMemHandle(void**, hipIpcMemHandle_t, unsigned flags)` (the handle by value).
pub type hipIpcOpenMemHandle_t =
    unsafe extern "C" fn(*mut *mut c_void, hipIpcMemHandle_t, c_uint) -> hipError_t;
/// `hipStreamBeginCapture(hipStream_t, hipStreamCaptureMode)`.
pub type hipStreamBeginCapture_t =
    unsafe extern "C" fn(hipStream_t, hipStreamCaptureMode) -> hipError_t;
/// `hipStreamEndCapture(hipStream_t, hipGraph_t*)`.
pub type hipStreamEndCapture_t = unsafe extern "C" fn(hipStream_t, *mut hipGraph_t) -> hipError_t;
/// `hipStreamIsCapturing(hipStream_t, hipStreamCaptureStatus*)`.
pub type hipStreamIsCapturing_t =
    unsafe extern "C" fn(hipStream_t, *mut hipStreamCaptureStatus) -> hipError_t;
/// `hipGraphInstantiateWithFlags(hipGraphExec_t*, hipGraph_t, unsigned long long)`.
pub type hipGraphInstantiateWithFlags_t =
    unsafe extern "C" fn(*mut hipGraphExec_t, hipGraph_t, u64) -> hipError_t;
/// `hipGraphLaunch(hipGraphExec_t, hipStream_t)`.
pub type hipGraphLaunch_t = unsafe extern "C" fn(hipGraphExec_t, hipStream_t) -> hipError_t;
/// `hipGraphExecDestroy(hipGraphExec_t)` / `hipGraphDestroy(hipGraph_t)`.
pub type hipGraphFn_t = unsafe extern "C" fn(*mut c_void) -> hipError_t;

/// Declares the table once: each field's name, C signature and C name.
macro_rules! functions {
    ($($field:ident: $ty:ty = $name:ident,)*) => {
        /// The bound functions, every one required. Field names are the C names without `hip`,
        /// in snake case; [`Functions::NAMES`] lists the C names in field order.
        #[derive(Clone, Copy, Debug)]
        pub struct Functions {
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub $field: $ty,
            )*
        }

        impl Functions {
            /// The C names of the fields, in order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            /// Binds every function through `lookup`, which returns the address of a C name
            /// (or a one-line reason it has none). The first missing name is the error.
            ///
            /// # Safety
            /// Every address `lookup` returns must be a function with the C signature that
            /// HIP's `hip_runtime_api.h` declares for that name, and must stay valid for the
            /// life of the table.
            pub unsafe fn bind(
                mut lookup: impl FnMut(&'static str) -> std::result::Result<*const c_void, String>,
            ) -> std::result::Result<Functions, String> {
                Ok(Functions {
                    $($field: {
                        let name = stringify!($name);
                        let p = lookup(name).map_err(|e| format!("missing symbol {name}: {e}"))?;
                        if p.is_null() {
                            return Err(format!("missing symbol {name}: null address"));
                        }
                        // SAFETY: the caller guarantees `p` is a function of this C signature;
                        // a data pointer and a function pointer have the same size on every
                        // target HIP supports.
                        unsafe { std::mem::transmute::<*const c_void, $ty>(p) }
                    },)*
                })
            }
        }
    };
}

functions! {
    get_error_string: hipGetErrorString_t = hipGetErrorString,
    get_error_name: hipGetErrorString_t = hipGetErrorName,
    runtime_get_version: hipGetInt_t = hipRuntimeGetVersion,
    driver_get_version: hipGetInt_t = hipDriverGetVersion,
    get_device_count: hipGetInt_t = hipGetDeviceCount,
    get_device: hipGetInt_t = hipGetDevice,
    set_device: hipSetDevice_t = hipSetDevice,
    device_get_name: hipDeviceGetName_t = hipDeviceGetName,
    device_get_pci_bus_id: hipDeviceGetName_t = hipDeviceGetPCIBusId,
    device_total_mem: hipDeviceTotalMem_t = hipDeviceTotalMem,
    device_synchronize: hipVoid_t = hipDeviceSynchronize,
    stream_create_with_flags: hipStreamCreateWithFlags_t = hipStreamCreateWithFlags,
    stream_destroy: hipStreamFn_t = hipStreamDestroy,
    stream_query: hipStreamFn_t = hipStreamQuery,
    stream_synchronize: hipStreamFn_t = hipStreamSynchronize,
    malloc: hipMalloc_t = hipMalloc,
    free: hipFree_t = hipFree,
    memset_async: hipMemsetAsync_t = hipMemsetAsync,
    memcpy_async: hipMemcpyAsync_t = hipMemcpyAsync,
    memcpy_2d_async: hipMemcpy2DAsync_t = hipMemcpy2DAsync,
    event_create_with_flags: hipEventCreateWithFlags_t = hipEventCreateWithFlags,
    event_destroy: hipEventFn_t = hipEventDestroy,
    event_record: hipEventRecord_t = hipEventRecord,
    event_query: hipEventFn_t = hipEventQuery,
    stream_wait_event: hipStreamWaitEvent_t = hipStreamWaitEvent,
    event_elapsed_time: hipEventElapsedTime_t = hipEventElapsedTime,
    ipc_get_mem_handle: hipIpcGetMemHandle_t = hipIpcGetMemHandle,
    ipc_open_mem_handle: hipIpcOpenMemHandle_t = hipIpcOpenMemHandle,
    ipc_close_mem_handle: hipFree_t = hipIpcCloseMemHandle,
    stream_begin_capture: hipStreamBeginCapture_t = hipStreamBeginCapture,
    stream_end_capture: hipStreamEndCapture_t = hipStreamEndCapture,
    stream_is_capturing: hipStreamIsCapturing_t = hipStreamIsCapturing,
    graph_instantiate_with_flags: hipGraphInstantiateWithFlags_t = hipGraphInstantiateWithFlags,
    graph_launch: hipGraphLaunch_t = hipGraphLaunch,
    graph_exec_destroy: hipGraphFn_t = hipGraphExecDestroy,
    graph_destroy: hipGraphFn_t = hipGraphDestroy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_handle_is_64_bytes() {
        assert_eq!(std::mem::size_of::<hipIpcMemHandle_t>(), 64);
        assert_eq!(std::mem::align_of::<hipIpcMemHandle_t>(), 1);
    }

    #[test]
    fn names_are_unique_and_bind_reports_the_first_missing() {
        let mut n = Functions::NAMES.to_vec();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), Functions::NAMES.len());
        assert_eq!(Functions::NAMES.len(), 36);
        // SAFETY: the lookup returns no address at all, so nothing is ever called.
        let e = unsafe { Functions::bind(|_| Err("absent".into())) }.unwrap_err();
        assert_eq!(e, "missing symbol hipGetErrorString: absent");
        // Every name the table binds is asked for, once, in NAMES order.
        extern "C" fn never_called() {}
        let mut asked = Vec::new();
        // SAFETY: the table built here is dropped without any of its functions being called.
        let t = unsafe {
            Functions::bind(|name| {
                asked.push(name);
                Ok(never_called as *const c_void)
            })
        };
        assert!(t.is_ok());
        assert_eq!(asked, Functions::NAMES.to_vec());
    }
}
