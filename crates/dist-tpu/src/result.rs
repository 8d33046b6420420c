//! One thin function per PJRT call: arguments in, a returned `PJRT_Error*` turned into
//! [`Error::Backend`] with `backend = "pjrt"`, the status code and the plugin's own message
//! (`PJRT_Error_Message`), prefixed with the call's name; the error is always freed with
//! `PJRT_Error_Destroy`. Pointer arguments are the caller's responsibility, hence `unsafe`.

use std::ffi::{c_char, c_int};
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use crate::loader::Library;
use crate::sys::{self, Args};

fn missing(call: &str) -> Error {
    Error::unsupported(format!("{call} is absent from this PJRT plugin"))
}

/// Copies a `(ptr, len)` string the plugin owns.
///
/// # Safety
/// `p` must point to `n` readable bytes (or be null).
pub unsafe fn str_from(p: *const c_char, n: usize) -> String {
    if p.is_null() || n == 0 {
        return String::new();
    }
    // SAFETY: the caller guarantees n readable bytes at p.
    let b = unsafe { std::slice::from_raw_parts(p as *const u8, n) };
    String::from_utf8_lossy(b).into_owned()
}

/// The message and code of `err`, which is then destroyed. `err` must be non-null.
pub fn consume_error(lib: &Library, err: *mut sys::PJRT_Error) -> (Option<i64>, String) {
    let api = lib.api();
    let mut message = String::from("(no message)");
    if let Some(f) = api.PJRT_Error_Message {
        let mut a = Args::<sys::PJRT_Error_Message_Args>::new();
        a.a.error = err;
        // SAFETY: err is a live error from this plugin; the message lives as long as err.
        unsafe {
            f(a.ptr());
            message = str_from(a.a.message, a.a.message_size);
        }
    }
    let mut code = None;
    if let Some(f) = api.PJRT_Error_GetCode {
        let mut a = Args::<sys::PJRT_Error_GetCode_Args>::new();
        a.a.error = err;
        // SAFETY: as above; GetCode's own error (never expected) is ignored but freed.
        let e2 = unsafe { f(a.ptr()) };
        if e2.is_null() {
            code = Some(a.a.code as i64);
        } else {
            destroy_error(lib, e2);
        }
    }
    destroy_error(lib, err);
    (code, message)
}

fn destroy_error(lib: &Library, err: *mut sys::PJRT_Error) {
    if let Some(f) = lib.api().PJRT_Error_Destroy {
        let mut a = Args::<sys::PJRT_Error_Destroy_Args>::new();
        a.a.error = err;
        // SAFETY: err is a live error from this plugin, destroyed once.
        unsafe { f(a.ptr()) };
    }
}

/// Turns a returned `PJRT_Error*` into a `Result`.
pub fn check(lib: &Library, err: *mut sys::PJRT_Error, call: &str) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let (code, msg) = consume_error(lib, err);
    Err(Error::Backend {
        backend: "pjrt",
        code,
        message: format!("{call}: {msg}"),
    })
}

macro_rules! call {
    ($lib:expr, $slot:ident, $args:expr) => {{
        let f = $lib.api().$slot.ok_or_else(|| missing(stringify!($slot)))?;
        // SAFETY: the slot's type is the header's; args is a zeroed struct with struct_size set
        // and the caller's pointers valid for the call.
        let e = unsafe { f($args.ptr()) };
        check($lib, e, stringify!($slot))
    }};
}

/// `PJRT_Plugin_Initialize` (absent in some plugins: then nothing to do).
pub fn plugin_initialize(lib: &Library) -> Result<()> {
    if lib.api().PJRT_Plugin_Initialize.is_none() {
        return Ok(());
    }
    let mut a = Args::<sys::PJRT_Plugin_Initialize_Args>::new();
    call!(lib, PJRT_Plugin_Initialize, a)
}

/// `PJRT_Client_Create`.
///
/// # Safety
/// `options` must point to `num` valid named values; the kv callbacks and their user args must
/// stay valid for the client's life.
pub unsafe fn client_create(
    lib: &Library,
    options: &[sys::PJRT_NamedValue],
    kv: Option<crate::kv::RawCallbacks>,
) -> Result<*mut sys::PJRT_Client> {
    let mut a = Args::<sys::PJRT_Client_Create_Args>::new();
    a.a.create_options = if options.is_empty() {
        std::ptr::null()
    } else {
        options.as_ptr()
    };
    a.a.num_options = options.len();
    if let Some(kv) = kv {
        a.a.kv_get_callback = Some(kv.get);
        a.a.kv_get_user_arg = kv.user_arg;
        a.a.kv_put_callback = Some(kv.put);
        a.a.kv_put_user_arg = kv.user_arg;
    }
    call!(lib, PJRT_Client_Create, a)?;
    if a.a.client.is_null() {
        return Err(Error::Backend {
            backend: "pjrt",
            code: None,
            message: "PJRT_Client_Create returned no client".into(),
        });
    }
    Ok(a.a.client)
}

/// `PJRT_Client_Destroy`.
///
/// # Safety
/// `client` is live and used by no one after this.
pub unsafe fn client_destroy(lib: &Library, client: *mut sys::PJRT_Client) -> Result<()> {
    let mut a = Args::<sys::PJRT_Client_Destroy_Args>::new();
    a.a.client = client;
    call!(lib, PJRT_Client_Destroy, a)
}

/// `PJRT_Client_PlatformName` and `PJRT_Client_PlatformVersion`.
///
/// # Safety
/// `client` is live.
pub unsafe fn client_platform(
    lib: &Library,
    client: *mut sys::PJRT_Client,
) -> Result<(String, String)> {
    let mut a = Args::<sys::PJRT_Client_PlatformName_Args>::new();
    a.a.client = client;
    call!(lib, PJRT_Client_PlatformName, a)?;
    // SAFETY: the name is owned by the client and has platform_name_size bytes.
    let name = unsafe { str_from(a.a.platform_name, a.a.platform_name_size) };
    let mut v = Args::<sys::PJRT_Client_PlatformVersion_Args>::new();
    v.a.client = client;
    call!(lib, PJRT_Client_PlatformVersion, v)?;
    // SAFETY: as above.
    let version = unsafe { str_from(v.a.platform_version, v.a.platform_version_size) };
    Ok((name, version))
}

/// `PJRT_Client_ProcessIndex`.
///
/// # Safety
/// `client` is live.
pub unsafe fn client_process_index(lib: &Library, client: *mut sys::PJRT_Client) -> Result<i32> {
    let mut a = Args::<sys::PJRT_Client_ProcessIndex_Args>::new();
    a.a.client = client;
    call!(lib, PJRT_Client_ProcessIndex, a)?;
    Ok(a.a.process_index)
}

/// `PJRT_Client_AddressableDevices`: the device handles (owned by the client).
///
/// # Safety
/// `client` is live.
pub unsafe fn client_addressable_devices(
    lib: &Library,
    client: *mut sys::PJRT_Client,
) -> Result<Vec<*mut sys::PJRT_Device>> {
    let mut a = Args::<sys::PJRT_Client_AddressableDevices_Args>::new();
    a.a.client = client;
    call!(lib, PJRT_Client_AddressableDevices, a)?;
    if a.a.num_addressable_devices == 0 || a.a.addressable_devices.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: the plugin returns an array of num_addressable_devices pointers owned by the client.
    Ok(unsafe {
        std::slice::from_raw_parts(a.a.addressable_devices, a.a.num_addressable_devices).to_vec()
    })
}

/// `PJRT_Device_GetDescription` + `PJRT_DeviceDescription_Id` / `_ProcessIndex` / `_Kind`.
///
/// # Safety
/// `device` is a live device of a live client.
pub unsafe fn device_info(
    lib: &Library,
    device: *mut sys::PJRT_Device,
) -> Result<(i64, i32, String)> {
    let mut d = Args::<sys::PJRT_Device_GetDescription_Args>::new();
    d.a.device = device;
    call!(lib, PJRT_Device_GetDescription, d)?;
    let desc = d.a.device_description;
    let mut id = Args::<sys::PJRT_DeviceDescription_Id_Args>::new();
    id.a.device_description = desc;
    call!(lib, PJRT_DeviceDescription_Id, id)?;
    let mut pi = Args::<sys::PJRT_DeviceDescription_ProcessIndex_Args>::new();
    pi.a.device_description = desc;
    call!(lib, PJRT_DeviceDescription_ProcessIndex, pi)?;
    let mut k = Args::<sys::PJRT_DeviceDescription_Kind_Args>::new();
    k.a.device_description = desc;
    call!(lib, PJRT_DeviceDescription_Kind, k)?;
    // SAFETY: the kind string is owned by the device description.
    let kind = unsafe { str_from(k.a.device_kind, k.a.device_kind_size) };
    Ok((id.a.id as i64, pi.a.process_index, kind))
}

/// `PJRT_Client_Compile` of `code` in `format` with serialized `CompileOptionsProto` bytes.
///
/// # Safety
/// `client` is live.
pub unsafe fn client_compile(
    lib: &Library,
    client: *mut sys::PJRT_Client,
    code: &str,
    format: &str,
    options: &[u8],
) -> Result<*mut sys::PJRT_LoadedExecutable> {
    let mut code_bytes = code.as_bytes().to_vec();
    let mut p = Args::<sys::PJRT_Program>::new();
    p.a.code = code_bytes.as_mut_ptr() as *mut c_char;
    p.a.code_size = code_bytes.len();
    p.a.format = format.as_ptr() as *const c_char;
    p.a.format_size = format.len();
    let mut a = Args::<sys::PJRT_Client_Compile_Args>::new();
    a.a.client = client;
    a.a.program = p.ptr();
    a.a.compile_options = options.as_ptr() as *const c_char;
    a.a.compile_options_size = options.len();
    call!(lib, PJRT_Client_Compile, a)?;
    drop(code_bytes);
    Ok(a.a.executable)
}

/// Number of outputs per device of a loaded executable (`GetExecutable` + `NumOutputs`).
///
/// # Safety
/// `exe` is live.
pub unsafe fn executable_num_outputs(
    lib: &Library,
    exe: *mut sys::PJRT_LoadedExecutable,
) -> Result<usize> {
    let mut g = Args::<sys::PJRT_LoadedExecutable_GetExecutable_Args>::new();
    g.a.loaded_executable = exe;
    call!(lib, PJRT_LoadedExecutable_GetExecutable, g)?;
    let inner = g.a.executable;
    let mut n = Args::<sys::PJRT_Executable_NumOutputs_Args>::new();
    n.a.executable = inner;
    let r = call!(lib, PJRT_Executable_NumOutputs, n);
    let mut d = Args::<sys::PJRT_Executable_Destroy_Args>::new();
    d.a.executable = inner;
    let rd = call!(lib, PJRT_Executable_Destroy, d);
    r?;
    rd?;
    Ok(n.a.num_outputs)
}

/// `PJRT_LoadedExecutable_Destroy`.
///
/// # Safety
/// `exe` is live and not used after.
pub unsafe fn loaded_executable_destroy(
    lib: &Library,
    exe: *mut sys::PJRT_LoadedExecutable,
) -> Result<()> {
    let mut a = Args::<sys::PJRT_LoadedExecutable_Destroy_Args>::new();
    a.a.executable = exe;
    call!(lib, PJRT_LoadedExecutable_Destroy, a)
}

/// `PJRT_LoadedExecutable_Execute` on this process's one device with one argument list;
/// returns the outputs and the completion event.
///
/// # Safety
/// `exe` and every buffer are live; `num_outputs` is the executable's output count.
pub unsafe fn execute(
    lib: &Library,
    exe: *mut sys::PJRT_LoadedExecutable,
    args: &[*mut sys::PJRT_Buffer],
    num_outputs: usize,
    launch_id: i32,
) -> Result<(Vec<*mut sys::PJRT_Buffer>, *mut sys::PJRT_Event)> {
    let mut opts = Args::<sys::PJRT_ExecuteOptions>::new();
    opts.a.launch_id = launch_id as c_int;
    let arg_list: *const *mut sys::PJRT_Buffer = args.as_ptr();
    let arg_lists = [arg_list];
    let mut outs: Vec<*mut sys::PJRT_Buffer> = vec![std::ptr::null_mut(); num_outputs];
    let out_lists = [outs.as_mut_ptr()];
    let mut events: [*mut sys::PJRT_Event; 1] = [std::ptr::null_mut()];
    let mut a = Args::<sys::PJRT_LoadedExecutable_Execute_Args>::new();
    a.a.executable = exe;
    a.a.options = opts.ptr();
    a.a.argument_lists = arg_lists.as_ptr();
    a.a.num_devices = 1;
    a.a.num_args = args.len();
    a.a.output_lists = out_lists.as_ptr();
    a.a.device_complete_events = events.as_mut_ptr();
    call!(lib, PJRT_LoadedExecutable_Execute, a)?;
    Ok((outs, events[0]))
}

/// `PJRT_Client_BufferFromHostBuffer` (the runtime copies `data` during the call); returns the
/// buffer and the done-with-host-buffer event.
///
/// # Safety
/// `client` and `device` are live; `data` holds the elements of `dims` of `ty`, densely.
pub unsafe fn buffer_from_host(
    lib: &Library,
    client: *mut sys::PJRT_Client,
    device: *mut sys::PJRT_Device,
    data: &[u8],
    ty: i32,
    dims: &[i64],
) -> Result<(*mut sys::PJRT_Buffer, *mut sys::PJRT_Event)> {
    let mut a = Args::<sys::PJRT_Client_BufferFromHostBuffer_Args>::new();
    a.a.client = client;
    a.a.data = data.as_ptr() as *const _;
    a.a.type_ = ty as c_int;
    a.a.dims = dims.as_ptr();
    a.a.num_dims = dims.len();
    a.a.host_buffer_semantics = sys::HOST_BUFFER_IMMUTABLE_ONLY_DURING_CALL;
    a.a.device = device;
    call!(lib, PJRT_Client_BufferFromHostBuffer, a)?;
    Ok((a.a.buffer, a.a.done_with_host_buffer))
}

/// `PJRT_Buffer_ToHostBuffer` into `dst` with a dense row-major host layout; returns the event
/// that fires when the copy is done.
///
/// # Safety
/// `buf` is live; `dst` must stay valid and unaliased until the event is ready.
pub unsafe fn buffer_to_host(
    lib: &Library,
    buf: *mut sys::PJRT_Buffer,
    dst: *mut u8,
    dst_size: usize,
    ndim: usize,
) -> Result<*mut sys::PJRT_Event> {
    let minor_to_major: Vec<i64> = (0..ndim as i64).rev().collect();
    let mut layout = Args::<sys::PJRT_Buffer_MemoryLayout>::new();
    layout.a.type_ = sys::MEMORY_LAYOUT_TILED;
    // Writing the `tiled` member of the zeroed union (a safe write of Copy fields).
    layout.a.layout.tiled.struct_size = std::mem::size_of::<sys::PJRT_Buffer_MemoryLayout_Tiled>();
    layout.a.layout.tiled.minor_to_major = minor_to_major.as_ptr();
    layout.a.layout.tiled.minor_to_major_size = minor_to_major.len();
    let mut a = Args::<sys::PJRT_Buffer_ToHostBuffer_Args>::new();
    a.a.src = buf;
    a.a.host_layout = layout.ptr();
    a.a.dst = dst as *mut _;
    a.a.dst_size = dst_size;
    call!(lib, PJRT_Buffer_ToHostBuffer, a)?;
    Ok(a.a.event)
}

/// `PJRT_Buffer_Destroy`.
///
/// # Safety
/// `buf` is live and not used after.
pub unsafe fn buffer_destroy(lib: &Library, buf: *mut sys::PJRT_Buffer) -> Result<()> {
    let mut a = Args::<sys::PJRT_Buffer_Destroy_Args>::new();
    a.a.buffer = buf;
    call!(lib, PJRT_Buffer_Destroy, a)
}

/// `PJRT_Event_Destroy` (null is fine).
///
/// # Safety
/// `ev` is live or null and not used after.
pub unsafe fn event_destroy(lib: &Library, ev: *mut sys::PJRT_Event) -> Result<()> {
    if ev.is_null() {
        return Ok(());
    }
    let mut a = Args::<sys::PJRT_Event_Destroy_Args>::new();
    a.a.event = ev;
    call!(lib, PJRT_Event_Destroy, a)
}

/// Waits for `ev` until `timeout` (polling `PJRT_Event_IsReady`: a short spin, then yields, then
/// sleeps of growing length up to 1 ms, so a waiting rank leaves the core to its peers), then
/// returns the event's own error. The event is destroyed either way. On timeout the error
/// names `op` and the time waited; the caller must then keep alive anything the event guards.
///
/// # Safety
/// `ev` is a live event of this plugin (or null: nothing to wait for).
pub unsafe fn event_wait(
    lib: &Library,
    ev: *mut sys::PJRT_Event,
    timeout: Duration,
    op: &str,
) -> Result<()> {
    if ev.is_null() {
        return Ok(());
    }
    let start = Instant::now();
    let mut spins = 0u32;
    let mut nap = Duration::from_micros(20);
    let res = loop {
        let mut r = Args::<sys::PJRT_Event_IsReady_Args>::new();
        r.a.event = ev;
        if let Err(e) = call!(lib, PJRT_Event_IsReady, r) {
            break Err(e);
        }
        if r.a.is_ready {
            let mut er = Args::<sys::PJRT_Event_Error_Args>::new();
            er.a.event = ev;
            let f = match lib.api().PJRT_Event_Error {
                Some(f) => f,
                None => break Err(missing("PJRT_Event_Error")),
            };
            // SAFETY: the event is ready and live.
            let e = unsafe { f(er.ptr()) };
            break check(lib, e, op);
        }
        if start.elapsed() >= timeout {
            break Err(Error::timeout(
                op,
                start.elapsed(),
                "the device did not finish; with several ranks, one that never launched the same \
                 program (or died) leaves the others waiting",
            ));
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else if spins < 128 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    };
    // SAFETY: destroyed once; a pending event may be destroyed (it is a reference).
    if let Err(e) = unsafe { event_destroy(lib, ev) } {
        tracing::warn!("PJRT_Event_Destroy: {e}");
    }
    res
}
