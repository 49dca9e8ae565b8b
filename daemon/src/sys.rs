//! Small wrappers over Linux calls that std and nix do not offer (pidfd, waitpid), each unsafe block
//! with its SAFETY note, plus /proc readers used to identify processes against pid reuse.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Opens a pidfd for `pid`: a handle that stays bound to that process even if the pid is
/// reused, becomes readable when it exits, and can be signalled without races.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd`.
pub fn pidfd_send_signal(pidfd: RawFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments; a null siginfo pointer is allowed and means "as kill(2)".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), new at every boot.
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), which
/// together with the pid identifies a process.
pub fn proc_start_ticks(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// Whether `pid` has exited and waits to be reaped (state `Z` in /proc/PID/stat): an
/// orphaned supervisor's new parent may take its time.
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rfind(')').map(|i| st[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces or ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 on; starttime is field 22, so index 19 here.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Reaps `pid` if it has exited: `Ok(None)` while it runs.
pub fn try_wait(pid: i32) -> io::Result<Option<std::process::ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid on a child of ours, with a valid out pointer for the status.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match r {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(std::process::ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// The soft RLIMIT_NOFILE the daemon started with, which the processes it starts get back
/// (0 until [`raise_nofile_limit`] changed it).
static STARTING_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises the soft descriptor limit to the hard one, as systemd advises services that need
/// many descriptors to do themselves: every RPC connection holds one. Returns the limits
/// before and after. Children get the old soft limit back ([`restore_nofile`]), since
/// programs using select(2) break on descriptors past 1024.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
        STARTING_NOFILE.store(old, std::sync::atomic::Ordering::Relaxed);
    }
    Ok((old, r.rlim_cur))
}

/// Puts the soft descriptor limit back to what the daemon started with, if
/// [`raise_nofile_limit`] raised it. Only a system call: safe between fork and exec.
pub fn restore_nofile() -> io::Result<()> {
    let soft = STARTING_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    if soft == 0 {
        return Ok(());
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read the struct they are given; both are plain
    // system calls, async-signal-safe.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(io::Error::last_os_error());
        }
        r.rlim_cur = soft.min(r.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Asks the allocator to give the memory it holds free back to the system. glibc's malloc
/// keeps freed memory in its heaps unless it lies at their very top, so after thousands of
/// connections have come and gone the daemon would stay as large as at their peak.
/// Blocking (it walks the heaps): call it from `spawn_blocking`.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_self() {
        let me = std::process::id() as i32;
        let t = proc_start_ticks(me).unwrap();
        assert!(t > 0);
        assert_eq!(proc_start_ticks(me).unwrap(), t);
    }

    #[test]
    fn start_ticks_with_odd_comm() {
        let stat = "42 (a) b (c) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 20 21";
        assert_eq!(parse_start_ticks(stat), Some(777));
    }
}
