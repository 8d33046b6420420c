//! The few OS calls `std` does not offer: the open-file limit, signal flags, signalling
//! process groups and the parent-death signal. Every `unsafe` block of the crate is here.

use std::sync::atomic::{AtomicI32, Ordering};

/// Raises the soft open-file limit to the hard limit (a server holding thousands of
/// connections needs more than the common default of 1,024) and returns the soft limit then in
/// force (`None` when it cannot be read). A failure to raise it is ignored: the server caps its
/// connections below the limit it has.
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit read by the call; no memory is retained.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return Some(want.rlim_cur);
        }
    }
    Some(lim.rlim_cur)
}

static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Installs handlers for SIGINT and SIGTERM that only record the signal; read it with
/// [`take_signal`].
pub fn catch_termination_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = record_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is fully initialised, its handler is async-signal-safe (one atomic
        // store) and lives for the whole program; the old action is not requested.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The last SIGINT/SIGTERM received since the previous call, if any.
pub fn take_signal() -> Option<i32> {
    match LAST_SIGNAL.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Sends `sig` to the process group `pgid` (a child started as its own group leader).
pub fn signal_group(pgid: u32, sig: i32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) takes plain integers; a negative pid names the process group. A group
    // that no longer exists yields ESRCH, which is ignored.
    let _ = unsafe { libc::kill(-(pgid as i32), sig) };
}

/// The name of a signal number, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}

/// Makes the child that `cmd` starts receive SIGKILL when the thread that spawned it dies (the
/// launcher killed, even with SIGKILL, takes its ranks along; Linux's parent-death signal),
/// and exit at once if that parent is already gone by the time the child runs. The signal
/// survives `exec` (except of set-uid programs).
pub fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit) on plain integers; it touches no
    // memory of the parent's other threads and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then we were re-parented already
            // and no signal will come.
            if libc::getppid() != parent {
                libc::_exit(128 + libc::SIGKILL);
            }
            Ok(())
        });
    }
}
