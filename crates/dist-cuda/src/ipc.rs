//! CUDA IPC: sharing device memory between processes of one host.
//!
//! [`IpcExport`] describes a device tensor for another process: the IPC handle of the
//! allocation holding it (`cuIpcGetMemHandle` of the base that `cuMemGetAddressRange` finds),
//! the tensor's offset and size in it, the allocation's serial
//! ([`DeviceContext::allocation_serial`]) and the exporter's pid and device address.
//! [`IpcImporter`] is the importer's side: it maps the allocation (`cuIpcOpenMemHandle`, lazy
//! peer access, so the exporter may be on another GPU of the host or on the same one), copies
//! the bytes into a local tensor on the device's stream and waits with a deadline. An export
//! from the importing process itself (CUDA refuses to open its own handles) is copied from its
//! device address directly.
//!
//! Mappings are kept (opening one costs far more than a copy of a few MiB), at most
//! [`IpcImporter::MAX_MAPPINGS`] per device, least recently used closed first. A kept mapping is
//! used again only for an export of the same allocation *serial*: the exporter's allocator
//! reuses an allocation under the same serial, and an address freed and allocated again gets a
//! new one, so a mapping of memory the exporter has since freed is closed and reopened, never
//! read (the handle of the new allocation may be byte-for-byte the old one's). Memory allocated
//! outside this crate has no serial (0) and is mapped for one copy only. The exporter must keep
//! the tensor alive until the importer says it has copied it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cudarc::driver::sys;
use dist_core::{Error, Result, Tensor};

use dist_nccl::GpuRuntime;

use crate::driver::{allocation_base, check, cuda_err, per_device, DeviceContext};
use crate::CudaTensor;

/// Bytes of a `CUipcMemHandle`.
pub const IPC_HANDLE_BYTES: usize = 64;
/// Bytes of an encoded [`IpcExport`].
pub const EXPORT_BYTES: usize = IPC_HANDLE_BYTES + 5 * 8;

/// A device tensor described for another process of the host; see the module docs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcExport {
    /// The allocation's IPC handle.
    pub handle: [u8; IPC_HANDLE_BYTES],
    /// Offset of the tensor's first byte in the allocation.
    pub offset: u64,
    /// Bytes of the tensor.
    pub bytes: u64,
    /// The exporter's process id.
    pub pid: u64,
    /// The tensor's device address in the exporter.
    pub ptr: u64,
    /// The allocation's serial in the exporter (0: unknown, map for one copy only).
    pub serial: u64,
}

impl std::fmt::Debug for IpcExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcExport")
            .field("offset", &self.offset)
            .field("bytes", &self.bytes)
            .field("pid", &self.pid)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("serial", &format_args!("{:#x}", self.serial))
            .finish()
    }
}

impl IpcExport {
    /// Fixed-size little-endian encoding.
    pub fn to_bytes(&self) -> [u8; EXPORT_BYTES] {
        let mut b = [0u8; EXPORT_BYTES];
        b[..IPC_HANDLE_BYTES].copy_from_slice(&self.handle);
        for (i, v) in [self.offset, self.bytes, self.pid, self.ptr, self.serial]
            .into_iter()
            .enumerate()
        {
            let at = IPC_HANDLE_BYTES + 8 * i;
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes [`IpcExport::to_bytes`]; anything but [`EXPORT_BYTES`] bytes is an error.
    pub fn from_bytes(b: &[u8]) -> Result<IpcExport> {
        if b.len() != EXPORT_BYTES {
            return Err(Error::protocol(format!(
                "IPC export of {} bytes, expected {EXPORT_BYTES}",
                b.len()
            )));
        }
        let word = |i: usize| {
            let at = IPC_HANDLE_BYTES + 8 * i;
            u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
        };
        let mut handle = [0u8; IPC_HANDLE_BYTES];
        handle.copy_from_slice(&b[..IPC_HANDLE_BYTES]);
        Ok(IpcExport {
            handle,
            offset: word(0),
            bytes: word(1),
            pid: word(2),
            ptr: word(3),
            serial: word(4),
        })
    }
}

/// Describes `t` for another process. `t` must stay alive until the importer has copied it.
/// The handle of an allocation of this crate is made once per allocation serial and kept.
pub fn export(t: &CudaTensor) -> Result<IpcExport> {
    let pid = std::process::id() as u64;
    if t.nbytes() == 0 {
        return Ok(IpcExport {
            handle: [0; IPC_HANDLE_BYTES],
            offset: 0,
            bytes: 0,
            pid,
            ptr: 0,
            serial: 0,
        });
    }
    let dev = t.context();
    dev.bind()?;
    // A tensor's storage is a whole allocation of this crate: its base is the tensor's address.
    if let Some((serial, known)) = dev.allocation_ipc(t.ptr()) {
        let handle = match known {
            Some(h) => h,
            None => {
                let h = ipc_handle(t.ptr())?;
                dev.remember_ipc_handle(t.ptr(), serial, h);
                h
            }
        };
        return Ok(IpcExport {
            handle,
            offset: 0,
            bytes: t.nbytes() as u64,
            pid,
            ptr: t.ptr(),
            serial,
        });
    }
    // SAFETY: t.ptr() is a live device address of this context, bound above.
    let base = unsafe { allocation_base(t.ptr()) }?;
    Ok(IpcExport {
        handle: ipc_handle(base)?,
        offset: t.ptr() - base,
        bytes: t.nbytes() as u64,
        pid,
        ptr: t.ptr(),
        serial: 0,
    })
}

/// Open mappings by (exporter pid, handle), and a use counter for least-recently-used.
type Mappings = (HashMap<(u64, [u8; IPC_HANDLE_BYTES]), Mapping>, u64);

#[derive(Debug)]
struct Mapping {
    serial: u64,
    base: u64,
    used: u64,
}

/// Copies peers' exports into local tensors, keeping their mappings; see the module docs.
/// One per device and process ([`IpcImporter::for_device`]), so one allocation is never
/// mapped twice.
#[derive(Debug)]
pub struct IpcImporter {
    dev: Arc<DeviceContext>,
    maps: Mutex<Mappings>,
}

impl IpcImporter {
    /// Most mappings kept open per device.
    pub const MAX_MAPPINGS: usize = 256;

    /// The importer of device `dev` in this process.
    pub fn for_device(dev: &Arc<DeviceContext>) -> Arc<IpcImporter> {
        static ALL: OnceLock<Mutex<HashMap<usize, Arc<IpcImporter>>>> = OnceLock::new();
        let made = per_device(&ALL, dev, || {
            Ok(IpcImporter {
                dev: dev.clone(),
                maps: Mutex::new((HashMap::new(), 0)),
            })
        });
        made.expect("making an importer cannot fail")
    }

    /// Closes every mapping of process `pid`'s memory (its connection is gone: what it exported
    /// is no longer read, and a kept mapping would hold its freed memory).
    pub fn forget_process(&self, pid: u64) {
        let mut g = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        g.0.retain(|(p, _), m| {
            if *p == pid {
                ipc_close(m.base);
                false
            } else {
                true
            }
        });
    }

    /// Mappings open now.
    pub fn open_mappings(&self) -> usize {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Copies the tensor `ex` describes into `out` (which must have exactly `ex.bytes` bytes
    /// and live on this importer's device), waiting for the copy at most `timeout`.
    pub fn copy(&self, ex: &IpcExport, out: &mut CudaTensor, timeout: Duration) -> Result<()> {
        if ex.bytes != out.nbytes() as u64 {
            return Err(Error::invalid(format!(
                "IPC copy of {} bytes into a tensor of {} bytes",
                ex.bytes,
                out.nbytes()
            )));
        }
        if out.context().ordinal() != self.dev.ordinal() {
            return Err(Error::invalid(format!(
                "IPC copy into a tensor on cuda:{} by the importer of cuda:{}",
                out.context().ordinal(),
                self.dev.ordinal()
            )));
        }
        if ex.bytes == 0 {
            return Ok(());
        }
        let dev = &self.dev;
        dev.bind()?;
        let op = format!("cuda ipc copy of {} bytes from pid {}", ex.bytes, ex.pid);
        let copy = |src: u64| -> Result<()> {
            // SAFETY: src maps (or, in this process, is) the exporter's allocation at the
            // tensor's offset, holding ex.bytes, kept alive by the exporter until told the copy
            // is done, which is after the wait below; out holds ex.bytes.
            unsafe { dev.copy_d2d(out.ptr(), src, ex.bytes as usize, dev.stream()) }?;
            dev.wait(&op, timeout, || Ok(()))
        };
        if ex.pid == std::process::id() as u64 {
            return copy(ex.ptr);
        }
        // The lock is held through the copy: no mapping is closed while a copy reads it.
        let mut g = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let (maps, tick) = &mut *g;
        *tick += 1;
        let key = (ex.pid, ex.handle);
        let base = match maps.get_mut(&key) {
            Some(m) if m.serial == ex.serial && ex.serial != 0 => {
                m.used = *tick;
                m.base
            }
            stale => {
                if stale.is_some() {
                    // Freed and allocated again under the same handle: never read the old one.
                    if let Some(m) = maps.remove(&key) {
                        ipc_close(m.base);
                    }
                }
                if maps.len() >= Self::MAX_MAPPINGS {
                    let oldest = maps.iter().min_by_key(|(_, m)| m.used).map(|(k, _)| *k);
                    if let Some(m) = oldest.and_then(|k| maps.remove(&k)) {
                        ipc_close(m.base);
                    }
                }
                ipc_open(&ex.handle)?
            }
        };
        let r = copy(base + ex.offset);
        match (&r, ex.serial) {
            // The copy may still be queued: leave the mapping open (leaked) rather than unmap
            // memory the device may still read.
            (Err(_), _) => {
                if dev.wait(&op, timeout, || Ok(())).is_ok() {
                    ipc_close(base);
                } else {
                    tracing::warn!("{op}: leaving the mapping open, the copy did not finish");
                }
                maps.remove(&key);
            }
            (Ok(()), 0) => ipc_close(base),
            (Ok(()), serial) => {
                maps.entry(key).or_insert(Mapping {
                    serial,
                    base,
                    used: *tick,
                });
            }
        }
        r
    }
}

/// `cuIpcGetMemHandle` of the allocation starting at `ptr`.
pub(crate) fn ipc_handle(ptr: u64) -> Result<[u8; IPC_HANDLE_BYTES]> {
    let mut h = sys::CUipcMemHandle {
        reserved: [0; IPC_HANDLE_BYTES],
    };
    // SAFETY: ptr is the base of a live cuMemAlloc allocation; h is a valid out-pointer.
    check("cuIpcGetMemHandle", unsafe {
        sys::cuIpcGetMemHandle(&mut h, ptr)
    })?;
    let mut out = [0u8; IPC_HANDLE_BYTES];
    for (o, b) in out.iter_mut().zip(h.reserved.iter()) {
        *o = *b as u8;
    }
    Ok(out)
}

/// `cuIpcOpenMemHandle` (lazy peer access) of a peer's handle; the mapped base address.
pub(crate) fn ipc_open(bytes: &[u8]) -> Result<u64> {
    if bytes.len() != IPC_HANDLE_BYTES {
        return Err(Error::protocol(format!(
            "IPC handle of {} bytes, expected {IPC_HANDLE_BYTES}",
            bytes.len()
        )));
    }
    let mut h = sys::CUipcMemHandle {
        reserved: [0; IPC_HANDLE_BYTES],
    };
    for (d, s) in h.reserved.iter_mut().zip(bytes) {
        *d = *s as _;
    }
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: valid out-pointer; the handle came from a peer's cuIpcGetMemHandle. Flag 1 is
    // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.
    check("cuIpcOpenMemHandle", unsafe {
        sys::cuIpcOpenMemHandle_v2(&mut p, h, 1)
    })?;
    Ok(p)
}

/// `cuIpcCloseMemHandle`; a failure is logged.
pub(crate) fn ipc_close(p: u64) {
    // SAFETY: p came from cuIpcOpenMemHandle and is closed once.
    let r = unsafe { sys::cuIpcCloseMemHandle(p) };
    if let Err(e) = r.result() {
        tracing::warn!(
            "cuIpcCloseMemHandle({p:#x}): {}",
            cuda_err("cuIpcCloseMemHandle", e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_bytes_round_trip_and_length_check() {
        let mut handle = [0u8; IPC_HANDLE_BYTES];
        for (i, b) in handle.iter_mut().enumerate() {
            *b = (i * 13 % 251) as u8;
        }
        let ex = IpcExport {
            handle,
            offset: 512,
            bytes: 1 << 33,
            pid: 4242,
            ptr: 0x7f00_0000_1200,
            serial: 0xdead_beef_0000_0003,
        };
        let b = ex.to_bytes();
        assert_eq!(IpcExport::from_bytes(&b).unwrap(), ex);
        assert!(IpcExport::from_bytes(&b[..EXPORT_BYTES - 1]).is_err());
        assert!(IpcExport::from_bytes(&[0; EXPORT_BYTES + 1]).is_err());
    }
}
