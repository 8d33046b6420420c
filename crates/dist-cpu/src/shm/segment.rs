//! Named POSIX shared-memory segments.
//!
//! Names are `/{SEGMENT_PREFIX}{pid}.{tag}`: the creator's pid is part of the name so that a new
//! job can tell segments of dead jobs (whose creator no longer exists) from live ones and remove
//! them ([`remove_stale_segments`]). The creator reserves the pages with `posix_fallocate`, so a
//! `/dev/shm` too small for the segment is an error at creation, not a `SIGBUS` on first touch.

use std::ffi::CString;
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

/// Prefix of every segment this workspace creates.
pub const SEGMENT_PREFIX: &str = "distrs.";

/// A mapped shared-memory segment. The creator unlinks the name on drop; every handle unmaps.
#[derive(Debug)]
pub struct Segment {
    name: String,
    ptr: *mut u8,
    len: usize,
    owner: bool,
}

// SAFETY: the mapping is plain shared memory; synchronisation of its contents is the user's job
// (atomics in the segment), and the pointer itself may move between threads.
unsafe impl Send for Segment {}
// SAFETY: as above; `Segment` exposes only a raw pointer and length, no interior references.
unsafe impl Sync for Segment {}

fn cname(name: &str) -> Result<CString> {
    CString::new(format!("/{name}"))
        .map_err(|_| Error::invalid(format!("segment name {name:?} has a NUL byte")))
}

fn last_os(context: String) -> Error {
    Error::io(context, std::io::Error::last_os_error())
}

impl Segment {
    /// The full name of a segment created by this process with `tag`.
    pub fn name_for(tag: &str) -> String {
        format!("{SEGMENT_PREFIX}{}.{tag}", std::process::id())
    }

    /// Creates a zero-filled segment of `len` bytes named [`Segment::name_for`]`(tag)`.
    ///
    /// Fails with a clear error when the name exists or `/dev/shm` cannot hold `len` bytes.
    pub fn create(tag: &str, len: usize) -> Result<Segment> {
        crate::ensure_arg!(len > 0, "a shared segment needs at least one byte");
        crate::ensure_arg!(
            tag.len() < 200 && !tag.contains('/'),
            "bad segment tag {tag:?} (no '/', under 200 bytes)"
        );
        let name = Self::name_for(tag);
        let c = cname(&name)?;
        // SAFETY: `c` is a valid NUL-terminated string; flags and mode are plain integers.
        let fd = unsafe {
            libc::shm_open(
                c.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o600,
            )
        };
        if fd < 0 {
            return Err(last_os(format!("shm_open(/{name}) for creation")));
        }
        let fail = |e: Error| {
            // SAFETY: fd is ours and open; the name was created by us just above.
            unsafe {
                libc::close(fd);
                libc::shm_unlink(c.as_ptr());
            }
            Err(e)
        };
        // SAFETY: fd is a valid shm descriptor.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return fail(last_os(format!("ftruncate(/{name}, {len})")));
        }
        // Reserve the pages now: on a too-small /dev/shm this fails with ENOSPC instead of a
        // SIGBUS later.
        // SAFETY: fd is a valid descriptor; offset and length are in range.
        let rc = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
        if rc != 0 {
            let avail = shm_available()
                .map(|a| format!("{a} bytes free"))
                .unwrap_or_default();
            return fail(Error::io(
                format!(
                    "/dev/shm cannot hold a {len}-byte segment ({avail}); enlarge it (docker: --shm-size or --ipc=host)"
                ),
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        match map(fd, len) {
            Ok(ptr) => Ok(Segment {
                name,
                ptr,
                len,
                owner: true,
            }),
            Err(e) => fail(e.into_error(&format!("mmap(/{name})"))),
        }
    }

    /// Opens a segment made by another process, waiting up to `timeout` for it to appear and
    /// reach `len` bytes.
    pub fn open(name: &str, len: usize, timeout: Duration) -> Result<Segment> {
        let c = cname(name)?;
        let start = Instant::now();
        let mut sleep = Duration::from_micros(50);
        loop {
            // SAFETY: `c` is a valid NUL-terminated string.
            let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_RDWR, 0) };
            if fd >= 0 {
                // SAFETY: an all-zero stat is a valid out-parameter; fd is open.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fd is open, st is a valid pointer.
                let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
                if ok && st.st_size as usize >= len {
                    let r = map(fd, len);
                    return match r {
                        Ok(ptr) => Ok(Segment {
                            name: name.to_string(),
                            ptr,
                            len,
                            owner: false,
                        }),
                        Err(e) => Err(e.into_error(&format!("mmap(/{name})"))),
                    };
                }
                // SAFETY: fd is open and ours.
                unsafe { libc::close(fd) };
            }
            if start.elapsed() >= timeout {
                return Err(Error::timeout(
                    format!("open shared segment /{name}"),
                    start.elapsed(),
                    "the segment did not appear (is its creator on another node, or dead?)",
                ));
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(5));
        }
    }

    /// The segment's name (without the leading '/').
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Base address of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (segments have at least one byte); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Removes the name now (mappings stay valid); the creator also does this on drop.
    pub fn unlink(&mut self) {
        if self.owner {
            if let Ok(c) = cname(&self.name) {
                // SAFETY: valid C string; unlinking a missing name is harmless.
                unsafe { libc::shm_unlink(c.as_ptr()) };
            }
            self.owner = false;
        }
    }
}

struct MapError(std::io::Error);
impl MapError {
    fn into_error(self, ctx: &str) -> Error {
        Error::io(ctx.to_string(), self.0)
    }
}

fn map(fd: libc::c_int, len: usize) -> std::result::Result<*mut u8, MapError> {
    // SAFETY: fd is an open shm descriptor of at least `len` bytes; we ask for a fresh shared mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping (if any) keeps the object alive; the descriptor is no longer needed.
    unsafe { libc::close(fd) };
    if p == libc::MAP_FAILED {
        return Err(MapError(err));
    }
    Ok(p as *mut u8)
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: ptr/len describe a mapping we made and nobody uses after drop.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Bytes free in `/dev/shm`, where it can be read.
pub fn shm_available() -> Option<u64> {
    let c = CString::new("/dev/shm").ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Removes segments under `/dev/shm` made by this workspace whose creating process is gone
/// (left behind by a crash). Returns how many were removed. Segments of live processes stay.
pub fn remove_stale_segments() -> usize {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SEGMENT_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            if let Ok(c) = cname(&name) {
                // SAFETY: valid C string.
                if unsafe { libc::shm_unlink(c.as_ptr()) } == 0 {
                    tracing::info!(segment = %name, pid, "removed stale shared-memory segment");
                    removed += 1;
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_unlink() {
        let tag = format!("test-seg-{}", line!());
        let a = Segment::create(&tag, 4096).unwrap();
        // SAFETY: both mappings are 4096 bytes; single-threaded test.
        unsafe { *a.as_ptr().add(10) = 42 };
        let b = Segment::open(a.name(), 4096, Duration::from_secs(1)).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *b.as_ptr().add(10) }, 42);
        let name = a.name().to_string();
        drop(a);
        drop(b);
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        let e = Segment::open(&name, 4096, Duration::from_millis(30)).unwrap_err();
        assert!(e.is_timeout(), "{e}");
    }

    #[test]
    fn too_large_is_a_clear_error() {
        let e = Segment::create("test-huge", 1 << 50).unwrap_err();
        assert!(e.to_string().contains("/dev/shm cannot hold"), "{e}");
    }

    #[test]
    fn stale_segments_of_dead_pids_are_removed() {
        // pid 2^22+7 is above the default pid_max and cannot exist.
        let name = format!("{SEGMENT_PREFIX}{}.stale-test", (1 << 22) + 7);
        let c = cname(&name).unwrap();
        // SAFETY: valid C string; the fd is closed right away.
        unsafe {
            let fd = libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600);
            assert!(fd >= 0);
            libc::close(fd);
        }
        assert!(remove_stale_segments() >= 1);
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
    }
}
