//! Process identity and liveness: is the process that wrote a pid into shared memory (or into a
//! segment's name) still there?
//!
//! A process is named by its pid, its start time (field 22 of `/proc/<pid>/stat`, clock ticks
//! since boot) and the inode of its pid namespace ([`ProcessId`]). The start time guards against
//! pid reuse: a pid whose start time changed belongs to another process, so the one we knew is
//! dead. The namespace says whether the pid means anything here: two containers may share
//! `/dev/shm` but not pids, and then liveness is [`Liveness::Unknown`] (only deadlines apply).
//!
//! [`ProcessId::liveness`] reads `/proc` (a few µs). For checks on a hot path,
//! [`ProcessWatch`] holds a pidfd opened once (and checked against the start time after it was
//! opened, so it is the right process): a check is then one `poll` system call, and pid reuse
//! cannot fool it.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// Who a process is, as far as another process on the same node can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ProcessId {
    /// The pid, in the pid namespace `pid_ns`.
    pub pid: u32,
    /// Start time in clock ticks since boot; 0 when unknown (then only the pid is checked).
    pub start_ticks: u64,
    /// Inode of the pid namespace the pid belongs to; 0 when unknown.
    pub pid_ns: u64,
}

/// Whether a process is still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or stopped: a stopped process is not dead).
    Alive,
    /// Gone, exited (a zombie) or replaced by another process with the same pid: why, in words.
    Dead(String),
    /// Cannot be judged from here (another pid namespace, or `/proc` unreadable).
    Unknown,
}

impl Liveness {
    /// True only for [`Liveness::Dead`].
    pub fn is_dead(&self) -> bool {
        matches!(self, Liveness::Dead(_))
    }
}

fn own_pid_ns() -> u64 {
    static NS: OnceLock<u64> = OnceLock::new();
    *NS.get_or_init(|| pid_ns_of("self").unwrap_or(0))
}

fn pid_ns_of(who: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{who}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

/// `(state, starttime)` from `/proc/<pid>/stat`; `None` when the process does not exist.
fn stat_of(pid: u32) -> Option<(char, u64)> {
    let mut s = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .take(4096)
        .read_to_string(&mut s)
        .ok()?;
    parse_stat(&s)
}

/// Parses the state and start time out of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from the
/// last `)`.
fn parse_stat(line: &str) -> Option<(char, u64)> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    // After the state (field 3), starttime is field 22: 18 more fields to skip.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    /// This process. (Not cached across `fork`: the pid is checked on every call.)
    pub fn me() -> ProcessId {
        static ME: OnceLock<ProcessId> = OnceLock::new();
        let pid = std::process::id();
        let cached = *ME.get_or_init(|| Self::read(pid));
        if cached.pid == pid {
            cached
        } else {
            Self::read(pid)
        }
    }

    fn read(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start_ticks: stat_of(pid).map_or(0, |(_, s)| s),
            pid_ns: own_pid_ns(),
        }
    }

    /// The process that has `pid` in this pid namespace now; `None` when there is none.
    pub fn of_pid(pid: u32) -> Option<ProcessId> {
        let (_, start_ticks) = stat_of(pid)?;
        Some(ProcessId {
            pid,
            start_ticks,
            pid_ns: own_pid_ns(),
        })
    }

    /// Is this process still running? Reads `/proc` (a few µs); see [`ProcessWatch`] for checks
    /// on a hot path.
    pub fn liveness(&self) -> Liveness {
        if self.pid == 0 || self.pid_ns == 0 || self.pid_ns != own_pid_ns() {
            return Liveness::Unknown;
        }
        if self.pid == std::process::id() {
            let me = ProcessId::me();
            return if self.start_ticks == 0 || self.start_ticks == me.start_ticks {
                Liveness::Alive
            } else {
                Liveness::Dead(format!(
                    "process {} exited (its pid now belongs to this process)",
                    self.pid
                ))
            };
        }
        match stat_of(self.pid) {
            None => {
                if std::path::Path::new("/proc/self/stat").exists() {
                    Liveness::Dead(format!("process {} no longer exists", self.pid))
                } else {
                    Liveness::Unknown
                }
            }
            Some((st, _)) if st == 'Z' || st == 'X' => {
                Liveness::Dead(format!("process {} has exited (state {st})", self.pid))
            }
            Some((_, start)) if self.start_ticks != 0 && start != self.start_ticks => {
                Liveness::Dead(format!(
                    "process {} exited (its pid now belongs to another process)",
                    self.pid
                ))
            }
            Some(_) => Liveness::Alive,
        }
    }

    /// A watch on this process for cheap repeated checks.
    pub fn watch(&self) -> ProcessWatch {
        ProcessWatch::new(*self)
    }

    /// The form used in segment names: `<pid>-<start ticks>-<pid namespace>`.
    pub(crate) fn tag(&self) -> String {
        format!("{}-{}-{}", self.pid, self.start_ticks, self.pid_ns)
    }

    /// Parses [`ProcessId::tag`]'s form; a bare `<pid>` (older names) gives a pid-only identity
    /// in this namespace.
    pub(crate) fn parse_tag(s: &str) -> Option<ProcessId> {
        let mut f = s.split('-');
        let pid = f.next()?.parse().ok()?;
        let (start_ticks, pid_ns) = match (f.next(), f.next(), f.next()) {
            (None, _, _) => (0, own_pid_ns()),
            (Some(a), Some(b), None) => (a.parse().ok()?, b.parse().ok()?),
            _ => return None,
        };
        Some(ProcessId {
            pid,
            start_ticks,
            pid_ns,
        })
    }
}

/// A process watched through a pidfd: [`ProcessWatch::liveness`] is one `poll` system call.
/// Without pidfds (old kernels, another pid namespace) it falls back to
/// [`ProcessId::liveness`].
#[derive(Debug)]
pub struct ProcessWatch {
    id: ProcessId,
    fd: Option<OwnedFd>,
    /// Known dead since the watch was made (the pid was gone or reused).
    dead: Option<String>,
}

impl ProcessWatch {
    fn new(id: ProcessId) -> ProcessWatch {
        let mut w = ProcessWatch {
            id,
            fd: None,
            dead: None,
        };
        if id.pid == 0
            || id.pid_ns == 0
            || id.pid_ns != own_pid_ns()
            || id.pid == std::process::id()
        {
            return w;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id.pid as libc::pid_t, 0) };
        if fd < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                w.dead = Some(format!("process {} no longer exists", id.pid));
            }
            return w;
        }
        // SAFETY: `fd` is a descriptor pidfd_open just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // The pid may have been reused between the identity being taken and the open: the
        // start time after the open settles which process the descriptor names.
        match stat_of(id.pid) {
            Some((_, start)) if id.start_ticks != 0 && start != id.start_ticks => {
                w.dead = Some(format!(
                    "process {} exited (its pid now belongs to another process)",
                    id.pid
                ));
            }
            _ => w.fd = Some(fd),
        }
        w
    }

    /// The process watched.
    pub fn id(&self) -> ProcessId {
        self.id
    }

    /// Is the process still running?
    pub fn liveness(&self) -> Liveness {
        if let Some(why) = &self.dead {
            return Liveness::Dead(why.clone());
        }
        let Some(fd) = &self.fd else {
            return self.id.liveness();
        };
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call, timeout 0 (no blocking).
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & libc::POLLIN != 0 {
            Liveness::Dead(format!("process {} has exited", self.id.pid))
        } else if n < 0 {
            self.id.liveness()
        } else {
            Liveness::Alive
        }
    }
}

/// [`ProcessWatch::liveness`] of several watches with one `poll` system call for all those that
/// hold a pidfd (a writer checking its readers on every enqueue pays one call, not one per
/// reader).
pub fn liveness_all(watches: &[&ProcessWatch]) -> Vec<Liveness> {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = watches
        .iter()
        .filter_map(|w| w.fd.as_ref())
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call; the
    // descriptors are owned by the watches, which outlive it; timeout 0 (no blocking).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    let mut polled = fds.iter();
    watches
        .iter()
        .map(|w| match (&w.dead, &w.fd) {
            (Some(why), _) => Liveness::Dead(why.clone()),
            (None, Some(_)) => {
                let p = polled.next().expect("one pollfd per descriptor");
                if n < 0 {
                    w.id.liveness()
                } else if p.revents & libc::POLLIN != 0 {
                    Liveness::Dead(format!("process {} has exited", w.id.pid))
                } else {
                    Liveness::Alive
                }
            }
            (None, None) => w.id.liveness(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "4242 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R 1 2"), None);
    }

    #[test]
    fn tags_roundtrip_and_old_names_parse() {
        let m = ProcessId::me();
        assert_eq!(ProcessId::parse_tag(&m.tag()), Some(m));
        let old = ProcessId::parse_tag("4242").unwrap();
        assert_eq!((old.pid, old.start_ticks), (4242, 0));
        for bad in ["", "x", "1-2", "1-2-3-4", "1-x-3"] {
            assert_eq!(ProcessId::parse_tag(bad), None, "{bad}");
        }
    }

    #[test]
    fn self_is_alive_and_a_dead_child_is_not() {
        let m = ProcessId::me();
        assert!(m.start_ticks > 0 && m.pid_ns > 0);
        assert_eq!(m.liveness(), Liveness::Alive);
        assert_eq!(m.watch().liveness(), Liveness::Alive);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId::of_pid(child.id()).unwrap();
        let watch = id.watch();
        assert!(watch.fd.is_some());
        assert_eq!(watch.liveness(), Liveness::Alive);
        assert_eq!(id.liveness(), Liveness::Alive);
        child.kill().unwrap();
        // Wait until it is a zombie (not reaped yet): both checks say dead.
        let t = std::time::Instant::now();
        while !id.liveness().is_dead() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(watch.liveness().is_dead());
        let me = m.watch();
        let both = liveness_all(&[&me, &watch]);
        assert!(both[0] == Liveness::Alive && both[1].is_dead(), "{both:?}");
        child.wait().unwrap();
        assert!(id.liveness().is_dead() && watch.liveness().is_dead());
        assert!(id.watch().liveness().is_dead());
        let foreign = ProcessId { pid_ns: 1, ..id };
        assert_eq!(foreign.liveness(), Liveness::Unknown);
    }

    /// The start time guards against pid reuse: an identity whose start time differs from the
    /// running process with that pid is dead.
    #[test]
    fn a_reused_pid_is_not_the_process_we_knew() {
        let m = ProcessId::me();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let real = ProcessId::of_pid(child.id()).unwrap();
        let ghost = ProcessId {
            start_ticks: real.start_ticks.wrapping_sub(1).max(1),
            ..real
        };
        assert!(ghost.liveness().is_dead(), "{:?}", ghost.liveness());
        assert!(ghost.watch().liveness().is_dead());
        assert_eq!(real.liveness(), Liveness::Alive);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(m.liveness(), Liveness::Alive);
    }
}
