//! The ABI test's HIP runtime on an NVIDIA machine: a `dist_rocm::hip::sys::Functions` table
//! served by `libcudart`. This is what HIP's NVIDIA platform is (`hip/nvidia_detail/`: each
//! `hipX` is `cudaX` with the same signature and the same status values), so every HIP call of
//! the ROCm crate runs unchanged on an NVIDIA GPU. Three calls need a small adapter:
//! `hipDeviceGetName` / `hipDeviceTotalMem` (CUDA has them only in the driver API or in
//! `cudaDeviceProp`) and `hipIpcOpenMemHandle` (HIP's lazy-peer-access flag is 0, CUDA's 1).
//!
//! This is an ABI test of the ROCm crate's code, not a ROCm test: no AMD hardware or HIP
//! library is involved.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use dist_core::{Error, Result};
use dist_rocm::hip::{self, sys, Runtime};

type GetProps = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type GetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
type SetInt = unsafe extern "C" fn(c_int) -> c_int;
type IpcOpen = unsafe extern "C" fn(*mut *mut c_void, sys::hipIpcMemHandle_t, c_uint) -> c_int;

struct Shim {
    _lib: libloading::Library,
    path: String,
    get_props: GetProps,
    mem_get_info: MemGetInfo,
    get_device: GetInt,
    set_device: SetInt,
    ipc_open: IpcOpen,
}

static SHIM: OnceLock<Shim> = OnceLock::new();

const CUDA_ERROR_INVALID_VALUE: c_int = 1;
const CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

fn shim() -> &'static Shim {
    SHIM.get()
        .expect("the cudart shim is installed before any HIP call")
}

/// `hipDeviceGetName` from `cudaGetDeviceProperties` (the name is the first 256 bytes of
/// `cudaDeviceProp` in every CUDA version; the rest of the struct is never read).
unsafe extern "C" fn device_get_name(name: *mut c_char, len: c_int, dev: c_int) -> c_int {
    if name.is_null() || len <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let mut props = vec![0u8; 8192];
    // SAFETY: an 8 KiB buffer is larger than cudaDeviceProp of any CUDA release.
    let st = unsafe { (shim().get_props)(props.as_mut_ptr() as *mut c_void, dev) };
    if st != 0 {
        return st;
    }
    let n = props[..256].iter().position(|b| *b == 0).unwrap_or(255);
    let n = n.min(len as usize - 1);
    // SAFETY: the caller's buffer holds `len` chars; we write n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(props.as_ptr() as *const c_char, name, n);
        *name.add(n) = 0;
    }
    0
}

/// `hipDeviceTotalMem` from `cudaMemGetInfo` on that device (the current device is restored).
unsafe extern "C" fn device_total_mem(bytes: *mut usize, dev: c_int) -> c_int {
    let s = shim();
    let mut cur = 0;
    // SAFETY: plain cudart calls with valid out-pointers.
    unsafe {
        let st = (s.get_device)(&mut cur);
        if st != 0 {
            return st;
        }
        let st = (s.set_device)(dev);
        if st != 0 {
            return st;
        }
        let mut free = 0usize;
        let st = (s.mem_get_info)(&mut free, bytes);
        (s.set_device)(cur);
        st
    }
}

/// `hipIpcOpenMemHandle` with HIP's flag value translated to CUDA's.
unsafe extern "C" fn ipc_open(
    p: *mut *mut c_void,
    h: sys::hipIpcMemHandle_t,
    flags: c_uint,
) -> c_int {
    let f = if flags == sys::hipIpcMemLazyEnablePeerAccess {
        CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
    } else {
        flags
    };
    // SAFETY: forwarded arguments of the same C signature.
    unsafe { (shim().ipc_open)(p, h, f) }
}

fn sym(lib: &libloading::Library, names: &[&str]) -> std::result::Result<*const c_void, String> {
    for n in names {
        let mut c = n.as_bytes().to_vec();
        c.push(0);
        // SAFETY: only the address is read here; callers bind it with the cudart signature.
        if let Ok(s) = unsafe { lib.get::<*const c_void>(&c) } {
            return Ok(*s);
        }
    }
    Err(format!("none of {names:?} in libcudart"))
}

/// Loads `libcudart` (`DIST_CUDART_SO_PATH`, `libcudart.so.13`, `.so.12`, `libcudart.so`, then
/// `/usr/local/cuda/lib64`) and installs it as this process's HIP runtime. Call first in `main`.
pub fn install() -> Result<&'static Runtime> {
    let mut cands: Vec<String> = std::env::var("DIST_CUDART_SO_PATH").into_iter().collect();
    for n in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
        cands.push(n.into());
        cands.push(format!("/usr/local/cuda/lib64/{n}"));
    }
    let mut tried = Vec::new();
    let mut lib = None;
    for c in &cands {
        // SAFETY: loading cudart runs NVIDIA's initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(c) } {
            Ok(l) => {
                lib = Some((l, c.clone()));
                break;
            }
            Err(e) => tried.push(format!("{c}: {e}")),
        }
    }
    let (lib, path) = lib.ok_or_else(|| Error::LibraryNotFound {
        library: "libcudart".into(),
        tried,
    })?;
    let bind = |names: &[&str]| sym(&lib, names).map_err(Error::invalid);
    // SAFETY: each address is cudart's function of the signature it is cast to.
    let shim_fns = unsafe {
        Shim {
            get_props: std::mem::transmute::<*const c_void, GetProps>(bind(&[
                "cudaGetDeviceProperties_v2",
                "cudaGetDeviceProperties",
            ])?),
            mem_get_info: std::mem::transmute::<*const c_void, MemGetInfo>(bind(&[
                "cudaMemGetInfo",
            ])?),
            get_device: std::mem::transmute::<*const c_void, GetInt>(bind(&["cudaGetDevice"])?),
            set_device: std::mem::transmute::<*const c_void, SetInt>(bind(&["cudaSetDevice"])?),
            ipc_open: std::mem::transmute::<*const c_void, IpcOpen>(bind(&[
                "cudaIpcOpenMemHandle",
            ])?),
            path: path.clone(),
            _lib: lib,
        }
    };
    if SHIM.set(shim_fns).is_err() {
        return Err(Error::invalid("the cudart shim is already installed"));
    }
    let lib = &shim()._lib;
    // SAFETY: every address is cudart's function of the same name with `hip` → `cuda` (same C
    // signature and status values: HIP's NVIDIA platform), or one of the adapters above, whose
    // signatures are HIP's; the library stays loaded in SHIM for the process.
    let fns = unsafe {
        sys::Functions::bind(|name| match name {
            "hipDeviceGetName" => Ok(device_get_name as *const c_void),
            "hipDeviceTotalMem" => Ok(device_total_mem as *const c_void),
            "hipIpcOpenMemHandle" => Ok(ipc_open as *const c_void),
            n => {
                let c = n.replacen("hip", "cuda", 1);
                sym(lib, &[&c, &format!("{c}_v2")])
            }
        })
    }
    .map_err(Error::invalid)?;
    // SAFETY: as above.
    let rt = unsafe {
        Runtime::from_functions(
            fns,
            &format!("{path} (HIP calls mapped onto cudart: ABI test)"),
        )
    }?;
    hip::install_runtime(rt)
}
