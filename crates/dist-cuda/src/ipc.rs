//! CUDA IPC: sharing device memory between processes of one host.
//!
//! [`IpcExport`] describes a device tensor for another process: the IPC handle of the
//! allocation holding it (`cuIpcGetMemHandle` of the base that `cuMemGetAddressRange` finds),
//! the tensor's offset and size in it, and the exporter's pid and device address.
//! [`copy_from_export`] is the importer's side: it maps the allocation (`cuIpcOpenMemHandle`,
//! lazy peer access, so the exporter may be on another GPU of the host or on the same one),
//! copies the bytes into a local tensor on the device's stream, waits with a deadline and unmaps.
//! An export from the importing process itself (CUDA refuses to open its own handles) is copied
//! from its device address directly.
//!
//! Mapping per copy, not cached: a cached mapping of an allocation the exporter has since freed
//! would keep reading the old memory if the driver handed the same handle out again. The
//! exporter must keep the tensor alive until the importer says it has copied it.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys;
use dist_core::{Error, Result, Tensor};

use crate::driver::{check, copy_d2d, cuda_err, DeviceContext};
use crate::tensor::CudaTensor;

/// Bytes of a `CUipcMemHandle`.
pub const IPC_HANDLE_BYTES: usize = 64;
/// Bytes of an encoded [`IpcExport`].
pub const EXPORT_BYTES: usize = IPC_HANDLE_BYTES + 4 * 8;

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
}

impl std::fmt::Debug for IpcExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcExport")
            .field("offset", &self.offset)
            .field("bytes", &self.bytes)
            .field("pid", &self.pid)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .finish()
    }
}

impl IpcExport {
    /// Fixed-size little-endian encoding.
    pub fn to_bytes(&self) -> [u8; EXPORT_BYTES] {
        let mut b = [0u8; EXPORT_BYTES];
        b[..IPC_HANDLE_BYTES].copy_from_slice(&self.handle);
        for (i, v) in [self.offset, self.bytes, self.pid, self.ptr]
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
        })
    }
}

/// Describes `t` for another process. `t` must stay alive until the importer has copied it.
pub fn export(t: &CudaTensor) -> Result<IpcExport> {
    let dev = t.context();
    dev.bind()?;
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    if t.nbytes() == 0 {
        return Ok(IpcExport {
            handle: [0; IPC_HANDLE_BYTES],
            offset: 0,
            bytes: 0,
            pid: std::process::id() as u64,
            ptr: 0,
        });
    }
    // SAFETY: valid out-pointers; t.ptr() is a live device address of this context.
    check("cuMemGetAddressRange", unsafe {
        sys::cuMemGetAddressRange_v2(&mut base, &mut size, t.ptr())
    })?;
    Ok(IpcExport {
        handle: ipc_handle(base)?,
        offset: t.ptr() - base,
        bytes: t.nbytes() as u64,
        pid: std::process::id() as u64,
        ptr: t.ptr(),
    })
}

/// Copies the tensor `ex` describes into `out` (which must have exactly `ex.bytes` bytes),
/// waiting for the copy at most `timeout`; see the module docs.
pub fn copy_from_export(ex: &IpcExport, out: &mut CudaTensor, timeout: Duration) -> Result<()> {
    if ex.bytes != out.nbytes() as u64 {
        return Err(Error::invalid(format!(
            "IPC copy of {} bytes into a tensor of {} bytes",
            ex.bytes,
            out.nbytes()
        )));
    }
    if ex.bytes == 0 {
        return Ok(());
    }
    let dev: Arc<DeviceContext> = out.context().clone();
    dev.bind()?;
    let op = format!("cuda ipc copy of {} bytes from pid {}", ex.bytes, ex.pid);
    if ex.pid == std::process::id() as u64 {
        // SAFETY: the exporter (this process) keeps ex.ptr alive for ex.bytes until told the
        // copy is done, which is after the wait below; out holds ex.bytes.
        unsafe { copy_d2d(out.ptr(), ex.ptr, ex.bytes as usize, dev.stream()) }?;
        return dev.wait(&op, timeout, || Ok(()));
    }
    let base = ipc_open(&ex.handle)?;
    // SAFETY: base maps the exporter's allocation, which holds offset + bytes (the exporter
    // read both off it and keeps it alive until told the copy is done); out holds ex.bytes.
    let r = unsafe { copy_d2d(out.ptr(), base + ex.offset, ex.bytes as usize, dev.stream()) }
        .and_then(|()| dev.wait(&op, timeout, || Ok(())));
    if r.is_err() {
        // The copy may still be queued: unmap only once the stream is idle, or never.
        if dev.wait(&op, timeout, || Ok(())).is_err() {
            tracing::warn!("{op}: leaving the mapping open, the copy did not finish");
            return r;
        }
    }
    ipc_close(base);
    r
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
        };
        let b = ex.to_bytes();
        assert_eq!(IpcExport::from_bytes(&b).unwrap(), ex);
        assert!(IpcExport::from_bytes(&b[..EXPORT_BYTES - 1]).is_err());
        assert!(IpcExport::from_bytes(&[0; EXPORT_BYTES + 1]).is_err());
    }
}
