//! Process identity and liveness for the MessageQueue: who is attached to a ring, and is it still
//! there? Read from `/proc`, so no `unsafe` is needed.
//!
//! A process is named by its pid, its start time (field 22 of `/proc/<pid>/stat`, clock ticks since
//! boot) and the inode of its pid namespace. The start time guards against pid reuse; the namespace
//! inode tells whether a pid read from shared memory means anything here (two containers may share
//! `/dev/shm` but not pids — then liveness is [`Liveness::Unknown`] and only deadlines apply).

use std::io::Read;
use std::os::unix::fs::MetadataExt;

/// Who a process is, as far as another process on the same node can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ProcId {
    pub pid: u64,
    pub start_ticks: u64,
    pub pid_ns: u64,
}

/// The answer of [`liveness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Liveness {
    Alive,
    /// Gone, exited (zombie) or replaced by another process with the same pid.
    Dead(String),
    /// Cannot be judged from here (another pid namespace, or `/proc` unreadable).
    Unknown,
}

/// This process's identity.
pub(crate) fn me() -> ProcId {
    let pid = std::process::id() as u64;
    let start_ticks = stat_of(pid).map(|(_, s)| s).unwrap_or(0);
    ProcId {
        pid,
        start_ticks,
        pid_ns: pid_ns_of("self").unwrap_or(0),
    }
}

fn pid_ns_of(who: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{who}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

/// `(state, starttime)` from `/proc/<pid>/stat`; `None` when the process does not exist.
fn stat_of(pid: u64) -> Option<(char, u64)> {
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

/// Is the process `id` still running? `me` is the caller's identity (for the namespace check).
pub(crate) fn liveness(id: &ProcId, me: &ProcId) -> Liveness {
    if id.pid == 0 || id.pid_ns == 0 || id.pid_ns != me.pid_ns {
        return Liveness::Unknown;
    }
    if id.pid == me.pid {
        return Liveness::Alive;
    }
    match stat_of(id.pid) {
        None => {
            if std::path::Path::new("/proc/self/stat").exists() {
                Liveness::Dead(format!("process {} no longer exists", id.pid))
            } else {
                Liveness::Unknown
            }
        }
        Some((st, _)) if st == 'Z' || st == 'X' => {
            Liveness::Dead(format!("process {} has exited (state {st})", id.pid))
        }
        Some((_, start)) if id.start_ticks != 0 && start != id.start_ticks => {
            Liveness::Dead(format!(
                "process {} exited (its pid now belongs to another process)",
                id.pid
            ))
        }
        Some(_) => Liveness::Alive,
    }
}

/// 16 random bytes from the kernel's generator (the queue's access token).
pub(crate) fn random_token() -> std::io::Result<[u8; 16]> {
    let mut t = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    fn self_is_alive_and_a_dead_child_is_not() {
        let m = me();
        assert!(m.start_ticks > 0 && m.pid_ns > 0);
        assert_eq!(liveness(&m, &m), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcId {
            pid: child.id() as u64,
            start_ticks: 0,
            pid_ns: m.pid_ns,
        };
        child.wait().unwrap();
        assert!(matches!(liveness(&id, &m), Liveness::Dead(_)));
        let foreign = ProcId { pid_ns: 1, ..id };
        assert_eq!(liveness(&foreign, &m), Liveness::Unknown);
    }

    #[test]
    fn tokens_differ_and_compare() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_ne!(a, b);
        assert!(ct_eq(&a, &a));
        assert!(!ct_eq(&a, &b));
        assert!(!ct_eq(&a, &a[..8]));
    }
}
