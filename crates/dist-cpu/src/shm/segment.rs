//! Named POSIX shared-memory segments.
//!
//! Names are `/{SEGMENT_PREFIX}{pid}-{start ticks}-{pid namespace}.{tag}`: the creator's identity
//! ([`ProcessId`]) is part of the name, so that a new job can tell segments of dead processes from
//! live ones and remove them ([`remove_stale_segments`]) without being fooled by a reused pid,
//! and so that a peer can check the creator of a segment it mapped ([`Segment::creator`]). The
//! creator reserves the pages with `posix_fallocate`, so a `/dev/shm` too small for the segment
//! is an error at creation, not a `SIGBUS` on first touch.
//!
//! Words in a segment are reached through [`Segment::word`], which checks bounds and alignment
//! and hands out only types that are valid in any state and mutated only atomically
//! ([`ShmWord`]); bulk copies stay `unsafe` in the modules that own the protocol.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use super::process::{Liveness, ProcessId};
use super::Doorbell;

/// Prefix of every segment this workspace creates.
pub const SEGMENT_PREFIX: &str = "distrs.";

/// A mapped shared-memory segment. The creator unlinks the name on drop (or earlier, with
/// [`Segment::unlink`]); every handle unmaps.
#[derive(Debug)]
pub struct Segment {
    name: String,
    ptr: *mut u8,
    len: usize,
    owner: AtomicBool,
}

// SAFETY: the mapping is plain shared memory; synchronisation of its contents is the user's job
// (atomics in the segment), and the pointer itself may move between threads.
unsafe impl Send for Segment {}
// SAFETY: as above; shared access goes through atomics (`word`) or the owner's unsafe copies.
unsafe impl Sync for Segment {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::sync::atomic::AtomicU32 {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
    impl Sealed for super::Doorbell {}
}

/// Types that may be used in place in a shared segment through `&T` by several processes.
///
/// # Safety
/// Every bit pattern (zero-filled memory included) is a valid value, and all mutation goes
/// through atomic operations, so another process writing the same bytes concurrently is not a
/// data race. Sealed: implemented for `AtomicU32`, `AtomicU64` and [`Doorbell`].
pub unsafe trait ShmWord: Sync + sealed::Sealed {}
// SAFETY: an atomic integer: any bits are a valid value; all access is atomic.
unsafe impl ShmWord for AtomicU32 {}
// SAFETY: as above.
unsafe impl ShmWord for AtomicU64 {}
// SAFETY: `Doorbell` is `repr(C)` of two `AtomicU32`s, valid when zero (its docs).
unsafe impl ShmWord for Doorbell {}

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
        format!("{SEGMENT_PREFIX}{}.{tag}", ProcessId::me().tag())
    }

    /// The process that created the segment named `name` (from the name); `None` for a name this
    /// workspace did not make.
    pub fn creator_of(name: &str) -> Option<ProcessId> {
        let rest = name.strip_prefix('/').unwrap_or(name);
        let rest = rest.strip_prefix(SEGMENT_PREFIX)?;
        ProcessId::parse_tag(rest.split('.').next()?)
    }

    /// Creates a zero-filled segment of `len` bytes named [`Segment::name_for`]`(tag)`.
    ///
    /// Fails with a clear error when the name exists or `/dev/shm` cannot hold `len` bytes.
    pub fn create(tag: &str, len: usize) -> Result<Segment> {
        crate::ensure_arg!(len > 0, "a shared segment needs at least one byte");
        crate::ensure_arg!(
            tag.len() < 180 && !tag.contains('/'),
            "bad segment tag {tag:?} (no '/', under 180 bytes)"
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
                owner: AtomicBool::new(true),
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
                            owner: AtomicBool::new(false),
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
    /// Removes the name now (mappings stay valid); the creator also does this on drop. Does
    /// nothing on a handle that did not create the segment, or after the first call.
    pub fn unlink(&self) {
        if self.owner.swap(false, Ordering::AcqRel) {
            unlink_name(&self.name);
        }
    }

    /// The process that created this segment (from its name).
    pub fn creator(&self) -> Option<ProcessId> {
        Self::creator_of(&self.name)
    }

    /// On a handle that did not create the segment: removes its name if its creator is dead
    /// (the creator cannot do it any more). True when the name was removed here.
    pub fn unlink_if_orphaned(&self) -> bool {
        !self.owner.load(Ordering::Acquire)
            && self.creator().is_some_and(|c| c.liveness().is_dead())
            && unlink_name(&self.name)
    }

    /// The word of type `T` at byte `off`, used in place by every process that maps the segment.
    ///
    /// # Panics
    /// When `off` is not aligned for `T` or the word does not fit in the segment.
    pub fn word<T: ShmWord>(&self, off: usize) -> &T {
        assert!(
            off % std::mem::align_of::<T>() == 0
                && off
                    .checked_add(std::mem::size_of::<T>())
                    .is_some_and(|end| end <= self.len),
            "word of {} bytes at offset {off} of a {}-byte segment",
            std::mem::size_of::<T>(),
            self.len
        );
        // SAFETY: in bounds and aligned (asserted; the mapping is page aligned); the mapping
        // lives as long as `&self`; `T: ShmWord` is valid for any bits and mutated only
        // atomically, so shared use by other processes is sound.
        unsafe { &*(self.ptr.add(off) as *const T) }
    }
}

/// `shm_unlink(/name)`; true when a name was removed.
fn unlink_name(name: &str) -> bool {
    match cname(name) {
        // SAFETY: valid C string; unlinking a missing name is harmless.
        Ok(c) => unsafe { libc::shm_unlink(c.as_ptr()) == 0 },
        Err(_) => false,
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
/// (left behind by a crash). Returns how many were removed. Segments of live processes stay, as
/// do those whose creator cannot be judged from here (another pid namespace).
pub fn remove_stale_segments() -> usize {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(creator) = Segment::creator_of(&name) else {
            continue;
        };
        if let Liveness::Dead(why) = creator.liveness() {
            if unlink_name(&name) {
                tracing::info!(segment = %name, pid = creator.pid, "removed stale shared-memory segment: its creator's {why}");
                removed += 1;
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

    fn make_name(name: &str) {
        let c = cname(name).unwrap();
        // SAFETY: valid C string; the fd is closed right away.
        unsafe {
            let fd = libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600);
            assert!(fd >= 0);
            libc::close(fd);
        }
    }

    #[test]
    fn stale_segments_of_dead_or_replaced_creators_are_removed() {
        let me = ProcessId::me();
        // pid 2^22+7 is above the default pid_max and cannot exist (an old-style name, too).
        let gone = format!("{SEGMENT_PREFIX}{}.stale-test", (1 << 22) + 7);
        // Our own pid with another start time: a process that had our pid before us.
        let reused = format!(
            "{SEGMENT_PREFIX}{}-{}-{}.stale-test",
            me.pid,
            me.start_ticks + 1,
            me.pid_ns
        );
        // A pid namespace we cannot judge: left alone.
        let foreign = format!("{SEGMENT_PREFIX}{}-1-1.stale-test", (1 << 22) + 7);
        let live = Segment::create("stale-test-live", 64).unwrap();
        for n in [&gone, &reused, &foreign] {
            make_name(n);
        }
        // Other tests sweep in parallel: check what is left, not the count.
        remove_stale_segments();
        let exists = |n: &str| std::path::Path::new(&format!("/dev/shm/{n}")).exists();
        assert!(!exists(&gone) && !exists(&reused));
        assert!(exists(&foreign) && exists(live.name()));
        unlink_name(&foreign);
    }

    #[test]
    fn names_carry_the_creator_and_orphans_are_unlinked_by_peers() {
        let a = Segment::create(&format!("test-creator-{}", line!()), 4096).unwrap();
        assert_eq!(a.creator(), Some(ProcessId::me()));
        assert_eq!(Segment::creator_of("other.1-2-3.x"), None);
        let b = Segment::open(a.name(), 4096, Duration::ZERO).unwrap();
        // The creator lives: a peer does not unlink.
        assert!(!b.unlink_if_orphaned());
        a.unlink();
        a.unlink();
        assert!(!std::path::Path::new(&format!("/dev/shm/{}", a.name())).exists());
    }

    #[test]
    fn words_are_bounds_and_alignment_checked() {
        let s = Segment::create(&format!("test-words-{}", line!()), 128).unwrap();
        s.word::<AtomicU64>(120).store(7, Ordering::Relaxed);
        assert_eq!(s.word::<AtomicU32>(120).load(Ordering::Relaxed), 7);
        s.word::<Doorbell>(64).ring();
        for bad in [121usize, 124, 128, usize::MAX - 3] {
            let r = std::panic::catch_unwind(|| s.word::<AtomicU64>(bad).load(Ordering::Relaxed));
            assert!(r.is_err(), "offset {bad}");
        }
        assert!(std::panic::catch_unwind(|| s.word::<Doorbell>(96).ring()).is_err());
    }
}
