//! One thin function per HIP call: arguments passed through, a failing status turned into
//! [`Error::Backend`] with `backend: "hip"`, the status code and the runtime's own name and
//! message for it. "No device" statuses (`hipErrorNoDevice`, `hipErrorInsufficientDriver`)
//! become the message "no ROCm device: …" ([`is_no_device`] recognises them).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use dist_core::{Error, Result};

use super::sys::{self, hipError_t};
use super::Runtime;

/// The prefix of every "no device" error's message.
pub const NO_DEVICE: &str = "no ROCm device";

fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: HIP returns static NUL-terminated strings for these calls.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `hipGetErrorName(status)`, `hipGetErrorString(status)`.
pub fn error_strings(rt: &Runtime, status: hipError_t) -> (String, String) {
    // SAFETY: both take any status value and return a static string (or null).
    let name = cstr(unsafe { (rt.fns.get_error_name)(status) })
        .unwrap_or_else(|| format!("status {status}"));
    // SAFETY: as above.
    let msg = cstr(unsafe { (rt.fns.get_error_string)(status) }).unwrap_or_default();
    (name, msg)
}

/// The error for "there is no AMD GPU": [`Error::Backend`] with `code` `hipErrorNoDevice` and a
/// message starting with [`NO_DEVICE`].
pub fn no_device(detail: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "hip",
        code: Some(sys::hipErrorNoDevice as i64),
        message: format!("{NO_DEVICE}: {detail}"),
    }
}

/// True for the errors [`no_device`] and [`check`] make when no AMD GPU can be used.
pub fn is_no_device(e: &Error) -> bool {
    matches!(e, Error::Backend { backend: "hip", message, .. } if message.starts_with(NO_DEVICE))
}

/// `Ok(())` for `hipSuccess`, else the error naming `call`.
pub fn check(rt: &Runtime, status: hipError_t, call: &str) -> Result<()> {
    if status == sys::hipSuccess {
        return Ok(());
    }
    let (name, msg) = error_strings(rt, status);
    let text = if msg.is_empty() || msg == name {
        format!("{call}: {name}")
    } else {
        format!("{call}: {name}: {msg}")
    };
    if status == sys::hipErrorNoDevice || status == sys::hipErrorInsufficientDriver {
        return Err(Error::Backend {
            backend: "hip",
            code: Some(status as i64),
            message: format!("{NO_DEVICE}: {text}"),
        });
    }
    Err(Error::Backend {
        backend: "hip",
        code: Some(status as i64),
        message: text,
    })
}

/// `hipRuntimeGetVersion`.
pub fn runtime_get_version(rt: &Runtime) -> Result<i32> {
    let mut v: c_int = 0;
    check(
        rt,
        // SAFETY: one int written through a valid pointer.
        unsafe { (rt.fns.runtime_get_version)(&mut v) },
        "hipRuntimeGetVersion",
    )?;
    Ok(v)
}

/// `hipDriverGetVersion`.
pub fn driver_get_version(rt: &Runtime) -> Result<i32> {
    let mut v: c_int = 0;
    check(
        rt,
        // SAFETY: as above.
        unsafe { (rt.fns.driver_get_version)(&mut v) },
        "hipDriverGetVersion",
    )?;
    Ok(v)
}

/// `hipGetDeviceCount` (without a device, HIP answers `hipErrorNoDevice`: an error here).
pub fn get_device_count(rt: &Runtime) -> Result<usize> {
    let mut n: c_int = 0;
    check(
        rt,
        // SAFETY: as above.
        unsafe { (rt.fns.get_device_count)(&mut n) },
        "hipGetDeviceCount",
    )?;
    Ok(n.max(0) as usize)
}

/// `hipGetDevice`: the calling thread's current device.
pub fn get_device(rt: &Runtime) -> Result<usize> {
    let mut n: c_int = 0;
    // SAFETY: as above.
    check(rt, unsafe { (rt.fns.get_device)(&mut n) }, "hipGetDevice")?;
    Ok(n.max(0) as usize)
}

fn ordinal_arg(ordinal: usize) -> Result<c_int> {
    c_int::try_from(ordinal).map_err(|_| Error::invalid(format!("device ordinal {ordinal}")))
}

/// `hipSetDevice`: makes `ordinal` the calling thread's device.
pub fn set_device(rt: &Runtime, ordinal: usize) -> Result<()> {
    let o = ordinal_arg(ordinal)?;
    // SAFETY: plain value argument.
    check(rt, unsafe { (rt.fns.set_device)(o) }, "hipSetDevice")
}

fn string_query(
    rt: &Runtime,
    f: sys::hipDeviceGetName_t,
    ordinal: usize,
    call: &str,
) -> Result<String> {
    let o = ordinal_arg(ordinal)?;
    let mut buf = [0 as c_char; 256];
    check(
        rt,
        // SAFETY: the buffer holds 256 chars and its length is passed; HIP NUL-terminates within it.
        unsafe { f(buf.as_mut_ptr(), buf.len() as c_int - 1, o) },
        call,
    )?;
    Ok(cstr(buf.as_ptr()).unwrap_or_default())
}

/// `hipDeviceGetName`.
pub fn device_get_name(rt: &Runtime, ordinal: usize) -> Result<String> {
    string_query(rt, rt.fns.device_get_name, ordinal, "hipDeviceGetName")
}

/// `hipDeviceGetPCIBusId` (`"0000:c1:00.0"`).
pub fn device_get_pci_bus_id(rt: &Runtime, ordinal: usize) -> Result<String> {
    string_query(
        rt,
        rt.fns.device_get_pci_bus_id,
        ordinal,
        "hipDeviceGetPCIBusId",
    )
}

/// `hipDeviceTotalMem`, in bytes.
pub fn device_total_mem(rt: &Runtime, ordinal: usize) -> Result<usize> {
    let o = ordinal_arg(ordinal)?;
    let mut b = 0usize;
    check(
        rt,
        // SAFETY: one size_t written through a valid pointer.
        unsafe { (rt.fns.device_total_mem)(&mut b, o) },
        "hipDeviceTotalMem",
    )?;
    Ok(b)
}

/// `hipDeviceSynchronize` (unbounded: used only where a deadline cannot apply, e.g. tear-down).
pub fn device_synchronize(rt: &Runtime) -> Result<()> {
    check(
        rt,
        // SAFETY: no arguments.
        unsafe { (rt.fns.device_synchronize)() },
        "hipDeviceSynchronize",
    )
}

/// `hipStreamCreateWithFlags` on the current device.
pub fn stream_create_with_flags(rt: &Runtime, flags: c_uint) -> Result<sys::hipStream_t> {
    let mut s: sys::hipStream_t = std::ptr::null_mut();
    check(
        rt,
        // SAFETY: one handle written through a valid pointer.
        unsafe { (rt.fns.stream_create_with_flags)(&mut s, flags) },
        "hipStreamCreateWithFlags",
    )?;
    Ok(s)
}

/// `hipStreamDestroy`.
///
/// # Safety
/// `s` is a live stream nothing uses afterwards.
pub unsafe fn stream_destroy(rt: &Runtime, s: sys::hipStream_t) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.stream_destroy)(s) },
        "hipStreamDestroy",
    )
}

/// `hipStreamQuery`: `Ok(true)` when all work has run, `Ok(false)` while some is pending.
///
/// # Safety
/// `s` is a live stream.
pub unsafe fn stream_query(rt: &Runtime, s: sys::hipStream_t) -> Result<bool> {
    // SAFETY: forwarded contract.
    match unsafe { (rt.fns.stream_query)(s) } {
        sys::hipSuccess => Ok(true),
        sys::hipErrorNotReady => Ok(false),
        st => check(rt, st, "hipStreamQuery").map(|_| false),
    }
}

/// `hipStreamSynchronize` (unbounded; [`dist_nccl::wait_stream`] is the bounded wait).
///
/// # Safety
/// `s` is a live stream.
pub unsafe fn stream_synchronize(rt: &Runtime, s: sys::hipStream_t) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.stream_synchronize)(s) },
        "hipStreamSynchronize",
    )
}

/// `hipMalloc` on the current device.
pub fn malloc(rt: &Runtime, bytes: usize) -> Result<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: one pointer written through a valid pointer.
    check(rt, unsafe { (rt.fns.malloc)(&mut p, bytes) }, "hipMalloc")?;
    Ok(p)
}

/// `hipFree` (waits for the device, as CUDA's).
///
/// # Safety
/// `p` came from [`malloc`] and is freed once; no pending work uses it.
pub unsafe fn free(rt: &Runtime, p: *mut c_void) -> Result<()> {
    // SAFETY: forwarded contract.
    check(rt, unsafe { (rt.fns.free)(p) }, "hipFree")
}

/// `hipMemsetAsync`.
///
/// # Safety
/// `p` is device memory of at least `bytes` bytes alive until the work runs; `s` is live.
pub unsafe fn memset_async(
    rt: &Runtime,
    p: *mut c_void,
    value: u8,
    bytes: usize,
    s: sys::hipStream_t,
) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.memset_async)(p, value as c_int, bytes, s) },
        "hipMemsetAsync",
    )
}

/// `hipMemcpyAsync`.
///
/// # Safety
/// `dst`/`src` are valid for `bytes` bytes of the memory kinds `kind` names, alive until the
/// copy has run (host memory: until the stream is synchronised); `s` is live.
pub unsafe fn memcpy_async(
    rt: &Runtime,
    dst: *mut c_void,
    src: *const c_void,
    bytes: usize,
    kind: sys::hipMemcpyKind,
    s: sys::hipStream_t,
) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.memcpy_async)(dst, src, bytes, kind, s) },
        "hipMemcpyAsync",
    )
}

/// `hipMemcpy2DAsync`: `height` rows of `width` bytes, rows `spitch` / `dpitch` bytes apart.
///
/// # Safety
/// Both strided ranges are valid memory of the kinds `kind` names until the copy has run.
#[allow(clippy::too_many_arguments)]
pub unsafe fn memcpy_2d_async(
    rt: &Runtime,
    dst: *mut c_void,
    dpitch: usize,
    src: *const c_void,
    spitch: usize,
    width: usize,
    height: usize,
    kind: sys::hipMemcpyKind,
    s: sys::hipStream_t,
) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.memcpy_2d_async)(dst, dpitch, src, spitch, width, height, kind, s) },
        "hipMemcpy2DAsync",
    )
}

/// `hipEventCreateWithFlags` on the current device.
pub fn event_create_with_flags(rt: &Runtime, flags: c_uint) -> Result<sys::hipEvent_t> {
    let mut e: sys::hipEvent_t = std::ptr::null_mut();
    check(
        rt,
        // SAFETY: one handle written through a valid pointer.
        unsafe { (rt.fns.event_create_with_flags)(&mut e, flags) },
        "hipEventCreateWithFlags",
    )?;
    Ok(e)
}

/// `hipEventDestroy`.
///
/// # Safety
/// `e` is a live event nothing uses afterwards.
pub unsafe fn event_destroy(rt: &Runtime, e: sys::hipEvent_t) -> Result<()> {
    // SAFETY: forwarded contract.
    check(rt, unsafe { (rt.fns.event_destroy)(e) }, "hipEventDestroy")
}

/// `hipEventRecord`.
///
/// # Safety
/// `e` and `s` are live and of the same device.
pub unsafe fn event_record(rt: &Runtime, e: sys::hipEvent_t, s: sys::hipStream_t) -> Result<()> {
    // SAFETY: forwarded contract.
    check(rt, unsafe { (rt.fns.event_record)(e, s) }, "hipEventRecord")
}

/// `hipEventQuery`: `Ok(true)` once the recorded work has run.
///
/// # Safety
/// `e` is live.
pub unsafe fn event_query(rt: &Runtime, e: sys::hipEvent_t) -> Result<bool> {
    // SAFETY: forwarded contract.
    match unsafe { (rt.fns.event_query)(e) } {
        sys::hipSuccess => Ok(true),
        sys::hipErrorNotReady => Ok(false),
        st => check(rt, st, "hipEventQuery").map(|_| false),
    }
}

/// `hipStreamWaitEvent`: later work on `s` waits for `e`'s last record.
///
/// # Safety
/// `s` and `e` are live and of the same device.
pub unsafe fn stream_wait_event(
    rt: &Runtime,
    s: sys::hipStream_t,
    e: sys::hipEvent_t,
) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract; flags must be 0.
        unsafe { (rt.fns.stream_wait_event)(s, e, 0) },
        "hipStreamWaitEvent",
    )
}

/// `hipEventElapsedTime` in milliseconds between two completed events.
///
/// # Safety
/// Both events are live, recorded and complete.
pub unsafe fn event_elapsed_time(
    rt: &Runtime,
    start: sys::hipEvent_t,
    stop: sys::hipEvent_t,
) -> Result<f32> {
    let mut ms = 0f32;
    check(
        rt,
        // SAFETY: forwarded contract; one float written through a valid pointer.
        unsafe { (rt.fns.event_elapsed_time)(&mut ms, start, stop) },
        "hipEventElapsedTime",
    )?;
    Ok(ms)
}

/// `hipIpcGetMemHandle` of the allocation that `p` starts.
///
/// # Safety
/// `p` is the start of a live [`malloc`] allocation.
pub unsafe fn ipc_get_mem_handle(rt: &Runtime, p: *mut c_void) -> Result<sys::hipIpcMemHandle_t> {
    let mut h = sys::hipIpcMemHandle_t {
        reserved: [0; sys::HIP_IPC_HANDLE_SIZE],
    };
    check(
        rt,
        // SAFETY: forwarded contract; the handle is written through a valid pointer.
        unsafe { (rt.fns.ipc_get_mem_handle)(&mut h, p) },
        "hipIpcGetMemHandle",
    )?;
    Ok(h)
}

/// `hipIpcOpenMemHandle`: maps another process's allocation into this one (current device).
pub fn ipc_open_mem_handle(
    rt: &Runtime,
    h: sys::hipIpcMemHandle_t,
    flags: c_uint,
) -> Result<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    check(
        rt,
        // SAFETY: the handle is passed by value; one pointer written through a valid pointer. A
        // handle that names nothing is reported by HIP as an error.
        unsafe { (rt.fns.ipc_open_mem_handle)(&mut p, h, flags) },
        "hipIpcOpenMemHandle",
    )?;
    Ok(p)
}

/// `hipIpcCloseMemHandle`.
///
/// # Safety
/// `p` came from [`ipc_open_mem_handle`], is closed once, and no pending work uses it.
pub unsafe fn ipc_close_mem_handle(rt: &Runtime, p: *mut c_void) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.ipc_close_mem_handle)(p) },
        "hipIpcCloseMemHandle",
    )
}

/// `hipStreamBeginCapture`.
///
/// # Safety
/// `s` is live and not capturing.
pub unsafe fn stream_begin_capture(
    rt: &Runtime,
    s: sys::hipStream_t,
    mode: sys::hipStreamCaptureMode,
) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.stream_begin_capture)(s, mode) },
        "hipStreamBeginCapture",
    )
}

/// `hipStreamEndCapture`: the captured graph.
///
/// # Safety
/// `s` is live and capturing.
pub unsafe fn stream_end_capture(rt: &Runtime, s: sys::hipStream_t) -> Result<sys::hipGraph_t> {
    let mut g: sys::hipGraph_t = std::ptr::null_mut();
    check(
        rt,
        // SAFETY: forwarded contract; one handle written through a valid pointer.
        unsafe { (rt.fns.stream_end_capture)(s, &mut g) },
        "hipStreamEndCapture",
    )?;
    Ok(g)
}

/// `hipStreamIsCapturing`.
///
/// # Safety
/// `s` is live.
pub unsafe fn stream_is_capturing(
    rt: &Runtime,
    s: sys::hipStream_t,
) -> Result<sys::hipStreamCaptureStatus> {
    let mut st = sys::hipStreamCaptureStatusNone;
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.stream_is_capturing)(s, &mut st) },
        "hipStreamIsCapturing",
    )?;
    Ok(st)
}

/// `hipGraphInstantiateWithFlags(graph, 0)`.
///
/// # Safety
/// `g` is a live graph.
pub unsafe fn graph_instantiate(rt: &Runtime, g: sys::hipGraph_t) -> Result<sys::hipGraphExec_t> {
    let mut e: sys::hipGraphExec_t = std::ptr::null_mut();
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.graph_instantiate_with_flags)(&mut e, g, 0) },
        "hipGraphInstantiateWithFlags",
    )?;
    Ok(e)
}

/// `hipGraphLaunch`.
///
/// # Safety
/// `e` and `s` are live.
pub unsafe fn graph_launch(
    rt: &Runtime,
    e: sys::hipGraphExec_t,
    s: sys::hipStream_t,
) -> Result<()> {
    // SAFETY: forwarded contract.
    check(rt, unsafe { (rt.fns.graph_launch)(e, s) }, "hipGraphLaunch")
}

/// `hipGraphExecDestroy`.
///
/// # Safety
/// `e` is live and destroyed once.
pub unsafe fn graph_exec_destroy(rt: &Runtime, e: sys::hipGraphExec_t) -> Result<()> {
    check(
        rt,
        // SAFETY: forwarded contract.
        unsafe { (rt.fns.graph_exec_destroy)(e) },
        "hipGraphExecDestroy",
    )
}

/// `hipGraphDestroy`.
///
/// # Safety
/// `g` is live and destroyed once.
pub unsafe fn graph_destroy(rt: &Runtime, g: sys::hipGraph_t) -> Result<()> {
    // SAFETY: forwarded contract.
    check(rt, unsafe { (rt.fns.graph_destroy)(g) }, "hipGraphDestroy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_is_recognised() {
        let e = no_device("hipGetDeviceCount found 0 devices");
        assert!(is_no_device(&e));
        assert!(e.to_string().contains("no ROCm device"), "{e}");
        assert!(!is_no_device(&Error::invalid("x")));
        assert!(!is_no_device(&Error::Backend {
            backend: "hip",
            code: Some(2),
            message: "hipMalloc: hipErrorOutOfMemory".into()
        }));
    }
}
