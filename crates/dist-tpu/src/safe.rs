//! Owning types over the PJRT C API: [`Client`] (created with a deadline, on a helper thread),
//! [`Buffer`] and [`Executable`], each destroyed on `Drop` (which logs and never panics), and the
//! process-wide client [`global_client`].

use std::ffi::c_char;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use dist_core::{DType, Error, HostTensor, Result};

use crate::kv::KvAdapter;
use crate::loader::Library;
use crate::{result, sys};

/// Platform-specific options of `PJRT_Client_Create` (`PJRT_NamedValue`s).
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    /// `kString`.
    Str(String),
    /// `kInt64`.
    Int(i64),
    /// `kInt64List`.
    Ints(Vec<i64>),
    /// `kFloat`.
    Float(f32),
    /// `kBool`.
    Bool(bool),
}

/// Environment variable with extra client create options: `name=type:value` items separated by
/// `;`, type one of `str`, `int`, `ints` (comma-separated), `float`, `bool`; `{rank}`,
/// `{world}` and `{local_rank}` are replaced by the process's values. Example for the CUDA
/// plugin with one process per GPU: `node_id=int:{rank};num_nodes=int:{world};visible_devices=ints:{local_rank}`.
pub const CREATE_OPTIONS_ENV: &str = "DIST_PJRT_CREATE_OPTIONS";

/// Parses [`CREATE_OPTIONS_ENV`]'s syntax. Pure, so tested.
pub fn parse_create_options(
    s: &str,
    rank: usize,
    world: usize,
    local_rank: usize,
) -> Result<Vec<(String, OptionValue)>> {
    let s = s
        .replace("{rank}", &rank.to_string())
        .replace("{world}", &world.to_string())
        .replace("{local_rank}", &local_rank.to_string());
    let mut out = Vec::new();
    for item in s.split(';').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || {
            Error::invalid(format!(
                "{CREATE_OPTIONS_ENV}: '{item}' is not name=type:value"
            ))
        };
        let (name, tv) = item.split_once('=').ok_or_else(bad)?;
        let (ty, v) = tv.split_once(':').ok_or_else(bad)?;
        let num = |x: &str| {
            x.trim().parse::<i64>().map_err(|_| {
                Error::invalid(format!(
                    "{CREATE_OPTIONS_ENV}: '{x}' in '{item}' is not an integer"
                ))
            })
        };
        let val = match ty.trim() {
            "str" => OptionValue::Str(v.to_string()),
            "int" => OptionValue::Int(num(v)?),
            "ints" => OptionValue::Ints(
                v.split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(num)
                    .collect::<Result<_>>()?,
            ),
            "float" => OptionValue::Float(v.trim().parse().map_err(|_| bad())?),
            "bool" => OptionValue::Bool(match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad()),
            }),
            _ => return Err(bad()),
        };
        dist_core::ensure_arg!(
            !name.trim().is_empty(),
            "{CREATE_OPTIONS_ENV}: empty name in '{item}'"
        );
        out.push((name.trim().to_string(), val));
    }
    Ok(out)
}

/// One addressable device of a client.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    raw: RawPtr<sys::PJRT_Device>,
    /// Global device id (`PJRT_DeviceDescription_Id`), unique across processes.
    pub id: i64,
    /// The process the device belongs to.
    pub process_index: i32,
    /// Vendor's kind string (`"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`).
    pub kind: String,
}

/// A raw pointer that may cross threads (PJRT objects are thread-safe).
#[derive(Debug)]
struct RawPtr<T>(*mut T);
impl<T> Clone for RawPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RawPtr<T> {}
// SAFETY: PJRT clients, devices, buffers and executables may be used from any thread (the C
// API's contract; JAX does so).
unsafe impl<T> Send for RawPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for RawPtr<T> {}

/// A PJRT client: the plugin's runtime for this process's devices.
pub struct Client {
    lib: &'static Library,
    raw: RawPtr<sys::PJRT_Client>,
    /// `"tpu"`, `"cuda"`…
    pub platform: String,
    /// Platform version (libtpu's or CUDA's).
    pub platform_version: String,
    /// This process's index among the client's processes.
    pub process_index: i32,
    /// Addressable devices, in the plugin's order.
    pub devices: Vec<DeviceInfo>,
    /// True when created with key-value callbacks (multi-process capable).
    pub has_kv: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("plugin", &self.lib.path)
            .field("api", &self.lib.version())
            .field("platform", &self.platform)
            .field("platform_version", &self.platform_version)
            .field("process_index", &self.process_index)
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|d| (d.id, &d.kind))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Client {
    /// `PJRT_Client_Create` on a helper thread joined with `timeout` (a plugin may block, e.g.
    /// libtpu probing for TPUs or a multi-process client waiting for its peers). On timeout the
    /// helper is left to finish and a client it creates late is destroyed.
    pub fn create(
        lib: &'static Library,
        options: &[(String, OptionValue)],
        kv: Option<&'static KvAdapter>,
        timeout: Duration,
    ) -> Result<Client> {
        let opts = options.to_vec();
        let (tx, rx) = mpsc::channel::<Result<RawPtr<sys::PJRT_Client>>>();
        std::thread::Builder::new()
            .name("pjrt-client-create".into())
            .spawn(move || {
                let r = create_raw(lib, &opts, kv);
                if let Err(mpsc::SendError(Ok(late))) = tx.send(r) {
                    // SAFETY: created just now, used by no one.
                    let _ = unsafe { result::client_destroy(lib, late.0) };
                }
            })
            .map_err(|e| Error::io("spawn pjrt-client-create", e))?;
        let raw = match rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(|e| no_device_wording(lib, e))?,
            Err(_) => {
                return Err(Error::timeout(
                    "PJRT_Client_Create",
                    timeout,
                    format!("plugin {} did not create a client in time", lib.path),
                ))
            }
        };
        // From here the client is owned: a failure below destroys it through Drop.
        let mut c = Client {
            lib,
            raw,
            platform: String::new(),
            platform_version: String::new(),
            process_index: 0,
            devices: Vec::new(),
            has_kv: kv.is_some(),
        };
        // SAFETY: the client is live.
        unsafe {
            let (p, v) = result::client_platform(lib, raw.0)?;
            c.platform = p;
            c.platform_version = v;
            c.process_index = result::client_process_index(lib, raw.0)?;
            for d in result::client_addressable_devices(lib, raw.0)? {
                let (id, process_index, kind) = result::device_info(lib, d)?;
                c.devices.push(DeviceInfo {
                    raw: RawPtr(d),
                    id,
                    process_index,
                    kind,
                });
            }
        }
        if c.devices.is_empty() {
            return Err(Error::Backend {
                backend: "pjrt",
                code: None,
                message: format!(
                    "no device: the {} client of {} has no addressable devices",
                    c.platform, lib.path
                ),
            });
        }
        tracing::info!(?c, "PJRT client created");
        Ok(c)
    }

    /// The plugin.
    pub fn library(&self) -> &'static Library {
        self.lib
    }

    fn device(&self, index: usize) -> Result<&DeviceInfo> {
        self.devices.get(index).ok_or_else(|| {
            Error::invalid(format!(
                "device index {index} out of range: the {} client has {} addressable devices",
                self.platform,
                self.devices.len()
            ))
        })
    }

    /// Copies a host tensor to addressable device `index`; waits (bounded) until the runtime is
    /// done reading the host memory.
    pub fn buffer_from_host(
        &self,
        index: usize,
        t: &HostTensor,
        timeout: Duration,
    ) -> Result<Buffer> {
        let dev = self.device(index)?;
        let ty = buffer_type(t.dtype())?;
        let dims = dims_of(t.shape())?;
        // SAFETY: client and device are live; the bytes are the dense elements of `dims`.
        let (buf, done) = unsafe {
            result::buffer_from_host(self.lib, self.raw.0, dev.raw.0, t.as_bytes(), ty, &dims)?
        };
        let buf = Buffer::from_raw(self.lib, buf)?;
        // SAFETY: `done` is this call's event (or null).
        unsafe { result::event_wait(self.lib, done, timeout, "PJRT_Client_BufferFromHostBuffer")? };
        Ok(buf)
    }

    /// Compiles MLIR `text` with serialized compile options.
    pub fn compile(&self, text: &str, options: &[u8]) -> Result<Executable> {
        // SAFETY: the client is live.
        let raw = unsafe { result::client_compile(self.lib, self.raw.0, text, "mlir", options)? };
        let raw = NonNull::new(raw).ok_or_else(|| Error::Backend {
            backend: "pjrt",
            code: None,
            message: "PJRT_Client_Compile returned no executable".into(),
        })?;
        let mut exe = Executable {
            lib: self.lib,
            raw: RawPtr(raw.as_ptr()),
            num_outputs: 0,
            launches: AtomicI32::new(0),
        };
        // SAFETY: the executable is live.
        exe.num_outputs = unsafe { result::executable_num_outputs(self.lib, raw.as_ptr())? };
        dist_core::ensure_arg!(
            exe.num_outputs == 1,
            "program has {} outputs, expected 1",
            exe.num_outputs
        );
        Ok(exe)
    }

    /// Runs `exe` on this process's device with `args`, waits (bounded) for the device to finish,
    /// and returns its one output. `launch_id` is the executable's launch count, the same on
    /// every participating process when they launch in the same order.
    pub fn execute(
        &self,
        exe: &Executable,
        args: &[&Buffer],
        timeout: Duration,
        op: &str,
    ) -> Result<Buffer> {
        let raw_args: Vec<*mut sys::PJRT_Buffer> = args.iter().map(|b| b.raw.0).collect();
        let launch = exe
            .launches
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        // SAFETY: the executable and every argument buffer are live for the call.
        let (outs, ev) =
            unsafe { result::execute(self.lib, exe.raw.0, &raw_args, exe.num_outputs, launch)? };
        let mut owned = Vec::new();
        for o in outs {
            owned.push(Buffer::from_raw(self.lib, o)?);
        }
        // SAFETY: the event is this execution's.
        unsafe { result::event_wait(self.lib, ev, timeout, op)? };
        owned.pop().ok_or_else(|| Error::Backend {
            backend: "pjrt",
            code: None,
            message: format!("{op}: the program returned no output"),
        })
    }
}

fn no_device_wording(lib: &Library, e: Error) -> Error {
    match e {
        Error::Backend {
            backend,
            code,
            message,
        } if lib.is_libtpu() && !message.starts_with("no TPU") => Error::Backend {
            backend,
            code,
            message: format!(
                "no TPU: libtpu ({}) could not create a client; is this a TPU host with its chips \
                 visible (TPU_VISIBLE_CHIPS)? {message}",
                lib.path
            ),
        },
        other => other,
    }
}

fn create_raw(
    lib: &'static Library,
    opts: &[(String, OptionValue)],
    kv: Option<&'static KvAdapter>,
) -> Result<RawPtr<sys::PJRT_Client>> {
    lib.initialize()?;
    // The named values point into `opts` and `lists`, alive for the call.
    let lists: Vec<Vec<i64>> = opts
        .iter()
        .map(|(_, v)| match v {
            OptionValue::Ints(x) => x.clone(),
            _ => Vec::new(),
        })
        .collect();
    let mut values = Vec::new();
    for ((name, v), list) in opts.iter().zip(&lists) {
        let mut nv = sys::Args::<sys::PJRT_NamedValue>::new().a;
        nv.struct_size = sys::PJRT_NamedValue::STRUCT_SIZE();
        nv.name = name.as_ptr() as *const c_char;
        nv.name_size = name.len();
        match v {
            OptionValue::Str(s) => {
                nv.type_ = sys::named_value::STRING;
                nv.value.string_value = s.as_ptr() as *const c_char;
                nv.value_size = s.len();
            }
            OptionValue::Int(i) => {
                nv.type_ = sys::named_value::INT64;
                nv.value.int64_value = *i;
                nv.value_size = 1;
            }
            OptionValue::Ints(_) => {
                nv.type_ = sys::named_value::INT64_LIST;
                nv.value.int64_array_value = list.as_ptr();
                nv.value_size = list.len();
            }
            OptionValue::Float(f) => {
                nv.type_ = sys::named_value::FLOAT;
                nv.value.float_value = *f;
                nv.value_size = 1;
            }
            OptionValue::Bool(b) => {
                nv.type_ = sys::named_value::BOOL;
                nv.value.bool_value = *b;
                nv.value_size = 1;
            }
        }
        values.push(nv);
    }
    // SAFETY: the named values and the kv adapter (static) outlive the call / the client.
    let raw = unsafe { result::client_create(lib, &values, kv.map(|k| k.callbacks()))? };
    Ok(RawPtr(raw))
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: the client is live and owned; nothing uses it after drop.
        if let Err(e) = unsafe { result::client_destroy(self.lib, self.raw.0) } {
            tracing::warn!("PJRT_Client_Destroy: {e}");
        }
    }
}

/// The PJRT element type of a dtype.
pub fn buffer_type(d: DType) -> Result<i32> {
    use sys::buffer_type as t;
    Ok(match d {
        DType::I8 => t::S8,
        DType::U8 => t::U8,
        DType::I32 => t::S32,
        DType::U32 => t::U32,
        DType::I64 => t::S64,
        DType::U64 => t::U64,
        DType::F16 => t::F16,
        DType::F32 => t::F32,
        DType::F64 => t::F64,
        DType::BF16 => t::BF16,
        DType::F8E4M3 => t::F8E4M3FN,
        DType::F8E5M2 => t::F8E5M2,
        other => {
            return Err(Error::unsupported(format!(
                "dtype {other} has no PJRT buffer type here"
            )))
        }
    })
}

fn dims_of(shape: &[usize]) -> Result<Vec<i64>> {
    shape
        .iter()
        .map(|d| i64::try_from(*d).map_err(|_| Error::invalid(format!("dim {d} does not fit i64"))))
        .collect()
}

/// A device buffer. `Drop` destroys it (the runtime keeps the memory until pending work on it is done).
pub struct Buffer {
    lib: &'static Library,
    raw: RawPtr<sys::PJRT_Buffer>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({:p})", self.raw.0)
    }
}

impl Buffer {
    fn from_raw(lib: &'static Library, raw: *mut sys::PJRT_Buffer) -> Result<Buffer> {
        if raw.is_null() {
            return Err(Error::Backend {
                backend: "pjrt",
                code: None,
                message: "the plugin returned a null buffer".into(),
            });
        }
        Ok(Buffer {
            lib,
            raw: RawPtr(raw),
        })
    }

    /// Copies the buffer (of `dtype` and `shape`) into a new host tensor, waiting at most
    /// `timeout`. On timeout the host memory is leaked, since the runtime may still write it.
    pub fn to_host(&self, dtype: DType, shape: &[usize], timeout: Duration) -> Result<HostTensor> {
        let mut h = HostTensor::zeros(dtype, shape);
        let n = h.nbytes();
        if n == 0 {
            return Ok(h);
        }
        // SAFETY: the buffer is live; `h` stays alive and untouched until the event is ready
        // (or is leaked below).
        let ev = unsafe {
            result::buffer_to_host(
                self.lib,
                self.raw.0,
                h.as_bytes_mut().as_mut_ptr(),
                n,
                shape.len(),
            )?
        };
        // SAFETY: the event is this copy's.
        match unsafe { result::event_wait(self.lib, ev, timeout, "PJRT_Buffer_ToHostBuffer") } {
            Ok(()) => Ok(h),
            Err(e) => {
                if e.is_timeout() {
                    std::mem::forget(h);
                }
                Err(e)
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: owned, live, not used after.
        if let Err(e) = unsafe { result::buffer_destroy(self.lib, self.raw.0) } {
            tracing::warn!("PJRT_Buffer_Destroy: {e}");
        }
    }
}

/// A compiled, loaded program.
pub struct Executable {
    lib: &'static Library,
    raw: RawPtr<sys::PJRT_LoadedExecutable>,
    num_outputs: usize,
    launches: AtomicI32,
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("launches", &self.launches.load(Ordering::Relaxed))
            .finish()
    }
}

impl Executable {
    /// How many times it was launched.
    pub fn launches(&self) -> i32 {
        self.launches.load(Ordering::Relaxed)
    }
}

impl Drop for Executable {
    fn drop(&mut self) {
        // SAFETY: owned, live, not used after.
        if let Err(e) = unsafe { result::loaded_executable_destroy(self.lib, self.raw.0) } {
            tracing::warn!("PJRT_LoadedExecutable_Destroy: {e}");
        }
    }
}

static CLIENT: Mutex<Option<&'static Client>> = Mutex::new(None);

/// What the process-wide client is created with.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Create options.
    pub options: Vec<(String, OptionValue)>,
    /// Store for the key-value callbacks (multi-process clients).
    pub kv: Option<(std::sync::Arc<dyn dist_core::Store>, Duration)>,
    /// Deadline of the creation.
    pub timeout: Duration,
}

/// The process-wide client, created at the first call with `config` (later calls get the same
/// client; their config is ignored, except that asking for key-value callbacks from a client
/// created without them is an error). Plugins expect one client per process, and a GPU client
/// takes most of the device's memory, so there is exactly one, never destroyed.
pub fn global_client(config: &ClientConfig) -> Result<&'static Client> {
    let mut g = CLIENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = *g {
        if config.kv.is_some() && !c.has_kv {
            return Err(Error::invalid(
                "the process's PJRT client was created without a key-value store (a tensor was \
                 moved to the device before the first multi-rank communicator); create the \
                 communicator first",
            ));
        }
        return Ok(c);
    }
    let lib = crate::loader::library()?;
    let kv: Option<&'static KvAdapter> = config
        .kv
        .as_ref()
        .map(|(s, t)| &*Box::leak(Box::new(KvAdapter::new(s.clone(), *t))));
    let c: &'static Client = Box::leak(Box::new(Client::create(
        lib,
        &config.options,
        kv,
        config.timeout,
    )?));
    *g = Some(c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_options_parse_with_placeholders() {
        let o = parse_create_options(
            "node_id=int:{rank}; num_nodes=int:{world};visible_devices=ints:{local_rank},3;platform=str:cuda;frac=float:0.5;prealloc=bool:false;",
            2,
            4,
            1,
        )
        .unwrap();
        assert_eq!(
            o,
            vec![
                ("node_id".into(), OptionValue::Int(2)),
                ("num_nodes".into(), OptionValue::Int(4)),
                ("visible_devices".into(), OptionValue::Ints(vec![1, 3])),
                ("platform".into(), OptionValue::Str("cuda".into())),
                ("frac".into(), OptionValue::Float(0.5)),
                ("prealloc".into(), OptionValue::Bool(false)),
            ]
        );
        assert!(parse_create_options("", 0, 1, 0).unwrap().is_empty());
        for bad in [
            "x",
            "x=int",
            "x=int:y",
            "x=what:1",
            "=int:1",
            "x=bool:maybe",
        ] {
            assert!(parse_create_options(bad, 0, 1, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_dtype_has_a_pjrt_type() {
        for d in DType::ALL {
            assert!(buffer_type(d).is_ok(), "{d}");
        }
        assert_eq!(buffer_type(DType::BF16).unwrap(), 13);
        assert_eq!(buffer_type(DType::F8E4M3).unwrap(), 17);
    }
}
