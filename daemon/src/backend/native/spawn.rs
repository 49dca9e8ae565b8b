//! Spawn: starts a job's process for its supervisor the way `posix_spawn` does, with a
//! `clone(CLONE_VM | CLONE_VFORK)` that shares the supervisor's memory until `execve`,
//! rather than a `fork` that copies its page tables and then pays a copy-on-write fault for
//! every page either side touches.
//!
//! The child needs more than `posix_spawn` offers: it joins the job's cgroup, starts a
//! session, drops to the job's user (supplementary groups, gid, uid), changes directory and
//! resets signals, all before its first instruction of the job. Everything it needs
//! (argv, envp, the candidate program paths from the job's `PATH`, the stack) is prepared
//! before the clone; the child itself only makes raw system calls on that memory and never
//! allocates, takes a lock or returns into Rust code that could. A failing step is written
//! to a shared [`Failure`] the parent reads once `clone` returns (the kernel resumes the
//! parent only after the child has exec'd or exited).
//!
//! The uid/gid/groups changes are raw system calls, not glibc's wrappers: those broadcast to
//! every thread of the process, and the child shares the supervisor's thread bookkeeping.

use std::ffi::{CString, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

/// Who the job runs as, when the supervisor is root.
#[derive(Clone, Copy, Debug)]
pub struct Creds<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
}

/// What to start.
pub struct Job<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a str,
    /// `None` keeps the supervisor's own identity (user mode).
    pub creds: Option<Creds<'a>>,
    /// Open `cgroup.procs` files of the job's cgroup, one per hierarchy.
    pub cgroup_procs: &'a [RawFd],
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

/// A started job: its pid (also its process group and session) and, where the kernel has
/// `CLONE_PIDFD`, a pidfd for it.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
}

/// Why a job did not start; `step` says what the child was doing.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SpawnError {
    pub step: &'static str,
    #[source]
    pub source: io::Error,
}

/// The steps of the child, in order; the index travels through [`Failure`].
const STEPS: [&str; 9] = [
    "cannot prepare the command",
    "cannot join the job's cgroup",
    "cannot start a session",
    "cannot set the supplementary groups",
    "cannot set the group id",
    "cannot set the user id",
    "cannot change to the working directory",
    "cannot set up stdin/stdout/stderr",
    "cannot execute the command",
];
const STEP_CGROUP: i32 = 1;
const STEP_SETSID: i32 = 2;
const STEP_GROUPS: i32 = 3;
const STEP_GID: i32 = 4;
const STEP_UID: i32 = 5;
const STEP_CHDIR: i32 = 6;
const STEP_STDIO: i32 = 7;
const STEP_EXEC: i32 = 8;

/// Written by the child when a step fails: which one, and its errno.
struct Failure {
    step: AtomicI32,
    errno: AtomicI32,
}

/// Everything the child reads, prepared by the parent. Pointers point into the owned
/// vectors and strings kept alive by [`spawn`] until the clone returns.
struct Plan<'a> {
    /// Full paths to try in order (one when argv[0] has a slash; else one per `PATH` entry).
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `/bin/sh <candidate> args...` (null-terminated), for a file without a `#!` line
    /// (ENOEXEC), as execvp(3) does; slot 1 is filled in by the child. Points into a vector
    /// `spawn` owns and does not touch until the clone returns.
    sh_argv: *mut *const libc::c_char,
    cwd: CString,
    creds: Option<Creds<'a>>,
    procs: Vec<RawFd>,
    stdio: [RawFd; 3],
    /// Signals the child resets to their default action ([`Prepared::not_default`]).
    reset_signals: u64,
    failure: Failure,
}

const SH: &std::ffi::CStr = c"/bin/sh";
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
const CHILD_STACK: usize = 64 * 1024;

fn cstring(s: &str, what: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError {
        step: STEPS[0],
        source: io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")),
    })
}

/// Where to look for `prog`: itself when it names a path, else each directory of the
/// job's `PATH` (the daemon's own `PATH` never applies), as execvp(3) would.
fn candidates(prog: &str, env: &[(String, String)]) -> Result<Vec<CString>, SpawnError> {
    if prog.is_empty() {
        return Err(SpawnError {
            step: STEPS[STEP_EXEC as usize],
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
    }
    if prog.contains('/') {
        return Ok(vec![cstring(prog, "the command")?]);
    }
    // The first PATH, the one the job's own getenv(3) sees.
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let mut out = Vec::new();
    for dir in path.split(':') {
        // An empty entry means the current directory, as in execvp(3).
        let full = if dir.is_empty() {
            prog.to_string()
        } else {
            format!("{}/{prog}", dir.trim_end_matches('/'))
        };
        out.push(cstring(&full, "the command")?);
    }
    Ok(out)
}

/// A close-on-exec copy of `fd` numbered 3 or above, for the child to `dup2` onto 0..=2:
/// no source can be overwritten by an earlier `dup2`, and none leaks into the job under its
/// own number.
fn above_stdio(fd: BorrowedFd<'_>, keep: &mut Vec<OwnedFd>) -> io::Result<RawFd> {
    // try_clone_to_owned is fcntl(F_DUPFD_CLOEXEC, 3).
    let dup = fd.try_clone_to_owned()?;
    let raw = dup.as_raw_fd();
    keep.push(dup);
    Ok(raw)
}

/// The child's stack: anonymous memory with an inaccessible guard page below it, so an
/// overflow faults (killing the child) instead of writing over the supervisor's heap.
/// Pages are only touched as the child uses them.
struct ChildStack {
    base: *mut c_void,
    len: usize,
}

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: sysconf takes an integer and returns one.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = CHILD_STACK + page;
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the first page of the mapping just made, which nothing uses yet.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address (the stack grows down on every architecture cybd runs on),
    /// 16-byte aligned as the ABIs want.
    fn top(&self) -> *mut c_void {
        ((self.base as usize + self.len) & !0xf) as *mut c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the child no longer runs on it
        // (clone returns only once it has exec'd or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

// SAFETY: the mapping belongs to the process, not to a thread; `Prepared` hands it out only
// under its mutex, and a child uses it only while its parent is suspended in `clone`.
unsafe impl Send for ChildStack {}

/// What every spawn of a process needs and no spawn changes, made once per process:
/// the child's stack (reused by spawn after spawn, one at a time) and the signals whose
/// disposition the child must reset. Made by [`prepare`] in the launcher before it forks
/// supervisors, so each supervisor inherits it instead of mapping, guarding and unmapping
/// a stack of its own (three system calls, and a TLB shoot-down across CPUs for the unmap)
/// and asking about all 64 signals in its child.
struct Prepared {
    stack: Mutex<io::Result<ChildStack>>,
    /// Signals that are not at their default action in this process (ignored, or with a
    /// handler), as a bit set (bit `n - 1` for signal `n`).
    not_default: u64,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();

/// Makes the per-process state of [`spawn`] now rather than at the first spawn: call it
/// in a process that forks children which spawn (the launcher), after it has set its
/// signal dispositions. Nothing may change a disposition after this (the supervisor only
/// blocks signals and reads them from a signalfd).
pub fn prepare() {
    prepared();
}

fn prepared() -> &'static Prepared {
    PREPARED.get_or_init(|| Prepared {
        stack: Mutex::new(ChildStack::new()),
        not_default: not_default_signals(),
    })
}

/// The signals whose action is not the default here: inherited "ignored" ones (SIGPIPE
/// from the Rust runtime, SIGHUP under nohup, glibc's internal 32 and 33 left ignored by
/// its posix_spawn) and ones with handlers (the Rust runtime's SIGSEGV and SIGBUS).
fn not_default_signals() -> u64 {
    let mut set = 0u64;
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = [0u64; 4];
        // SAFETY: the raw rt_sigaction with no new action only writes the old one into
        // `old` (a kernel sigaction: handler, flags, restorer, 8-byte mask = 32 bytes).
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u64>(),
                old.as_mut_ptr(),
                8usize,
            )
        };
        // On failure the child resets it anyway.
        if r != 0 || old[0] != libc::SIG_DFL as u64 {
            set |= 1 << (sig - 1);
        }
    }
    set
}

/// Starts the job. Returns once the child has called `execve` successfully (or failed).
pub fn spawn(job: &Job<'_>) -> Result<Spawned, SpawnError> {
    let Some(prog) = job.argv.first() else {
        return Err(SpawnError {
            step: STEPS[0],
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let args: Vec<CString> = job
        .argv
        .iter()
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<_, _>>()?;
    let envs: Vec<CString> = job
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}"), "an environment variable"))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut sh_argv_buf: Vec<*const libc::c_char> = vec![SH.as_ptr(), std::ptr::null()];
    sh_argv_buf.extend(args.iter().skip(1).map(|a| a.as_ptr()));
    sh_argv_buf.push(std::ptr::null());
    let mut keep = Vec::new();
    let stdio = [
        above_stdio(job.stdin, &mut keep),
        above_stdio(job.stdout, &mut keep),
        above_stdio(job.stderr, &mut keep),
    ];
    let stdio = match stdio {
        [Ok(a), Ok(b), Ok(c)] => [a, b, c],
        [Err(e), _, _] | [_, Err(e), _] | [_, _, Err(e)] => {
            return Err(SpawnError {
                step: STEPS[STEP_STDIO as usize],
                source: e,
            });
        }
    };
    let plan = Plan {
        candidates: candidates(prog, job.env)?,
        argv,
        envp,
        sh_argv: sh_argv_buf.as_mut_ptr(),
        cwd: cstring(job.cwd, "the working directory")?,
        creds: job.creds,
        procs: job.cgroup_procs.to_vec(),
        stdio,
        reset_signals: prepared().not_default,
        failure: Failure {
            step: AtomicI32::new(-1),
            errno: AtomicI32::new(0),
        },
    };
    let prep = prepared();
    let stack = prep.stack.lock().unwrap_or_else(|p| p.into_inner());
    let top = match &*stack {
        Ok(st) => st.top(),
        Err(e) => {
            return Err(SpawnError {
                step: "cannot create a process",
                source: io::Error::new(e.kind(), e.to_string()),
            });
        }
    };

    // All signals blocked across the clone, so no handler of the supervisor ever runs on
    // the child's side of the shared memory; the child resets dispositions, then unblocks.
    // The raw system call: glibc's wrappers leave its internal signals (32, 33) unblocked.
    let all: u64 = !0;
    let mut old: u64 = 0;
    // SAFETY: rt_sigprocmask reads 8 bytes from `all` and writes 8 bytes to `old`, both ours.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all,
            &mut old,
            8usize,
        );
    }
    let mut pidfd: c_int = -1;
    let plan_ptr = &plan as *const Plan as *mut c_void;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: `child` only reads `plan` (alive until after clone returns, since CLONE_VFORK
    // suspends us until the child execs or exits) and makes async-signal-safe system calls
    // on a stack of its own, which outlives the child's use of it for the same reason.
    // With CLONE_PIDFD the kernel stores the new pidfd in `pidfd`.
    let mut pid = unsafe {
        libc::clone(
            child,
            top,
            flags | libc::CLONE_PIDFD,
            plan_ptr,
            &mut pidfd as *mut c_int,
        )
    };
    let mut err = io::Error::last_os_error();
    if pid < 0 && err.raw_os_error() == Some(libc::EINVAL) {
        // Refused with CLONE_PIDFD (kernels before 5.2 mostly ignore the bit instead, and
        // leave `pidfd` at -1): without it; the supervisor opens a pidfd after.
        pidfd = -1;
        // SAFETY: as above, without the pidfd pointer.
        pid = unsafe { libc::clone(child, top, flags, plan_ptr) };
        err = io::Error::last_os_error();
    }
    // SAFETY: restores the mask saved above; reads 8 bytes from `old`.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &old,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    drop(stack);
    drop(sh_argv_buf);
    if pid < 0 {
        return Err(SpawnError {
            step: "cannot create a process",
            source: err,
        });
    }
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: the kernel created this descriptor for us in clone and nothing owns it.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    });
    let step = plan.failure.step.load(Ordering::Acquire);
    if step >= 0 {
        // The child has exited with 127; reap it so no zombie is left.
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(SpawnError {
            step: STEPS
                .get(step as usize)
                .copied()
                .unwrap_or(STEPS[STEP_EXEC as usize]),
            source: io::Error::from_raw_os_error(plan.failure.errno.load(Ordering::Acquire)),
        });
    }
    Ok(Spawned { pid, pidfd })
}

/// The child side. Runs on its own stack in the supervisor's memory until `execve`.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Plan` that `spawn` keeps alive until this child execs or exits.
    let plan = unsafe { &*(arg as *const Plan) };
    let fail = |step: i32| -> c_int {
        // SAFETY: __errno_location returns this thread's errno slot (shared with the
        // suspended parent thread, which is fine: it is not running).
        let errno = unsafe { *libc::__errno_location() };
        plan.failure.errno.store(errno, Ordering::Relaxed);
        plan.failure.step.store(step, Ordering::Release);
        // SAFETY: ends this child process only; no Rust clean-up may run here.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (for the system calls below): each takes integers or pointers into `plan`,
    // which stays valid and unchanged while the parent is suspended.
    unsafe {
        // Into the job's cgroup first, so everything the job ever runs is inside it.
        if let Err(e) = crate::cgroup::join_in_child(&plan.procs) {
            *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO);
            return fail(STEP_CGROUP);
        }
        if libc::setsid() < 0 {
            return fail(STEP_SETSID);
        }
        if let Some(c) = &plan.creds {
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) < 0 {
                return fail(STEP_GROUPS);
            }
            if libc::syscall(libc::SYS_setgid, c.gid) < 0 {
                return fail(STEP_GID);
            }
            if libc::syscall(libc::SYS_setuid, c.uid) < 0 {
                return fail(STEP_UID);
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return fail(STEP_CHDIR);
        }
        for (target, &src) in plan.stdio.iter().enumerate() {
            if libc::dup2(src, target as c_int) < 0 {
                return fail(STEP_STDIO);
            }
        }
        // The job starts with every signal at its default action (exec keeps "ignored":
        // SIGPIPE from the Rust runtime, and glibc's internal 32 and 33, which its
        // posix_spawn leaves ignored in the launcher) and nothing blocked. Only those not
        // at their default already are reset (a handler, too: exec would reset it, but a
        // signal arriving once the mask is cleared would run it here first). The raw system
        // call, because glibc's sigaction refuses its internal signals; a zeroed kernel
        // sigaction is SIG_DFL with no flags and an empty mask.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if plan.reset_signals & (1 << (sig - 1)) != 0 {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        let none: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none,
            std::ptr::null_mut::<u64>(),
            8usize,
        );

        let mut eacces = false;
        let mut last = libc::ENOENT;
        for path in &plan.candidates {
            libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            let e = *libc::__errno_location();
            match e {
                libc::ENOEXEC => {
                    // No `#!` line: run it with /bin/sh, as execvp(3) does. Slot 1 of
                    // `sh_argv` is ours to fill (the parent is suspended).
                    *plan.sh_argv.add(1) = path.as_ptr();
                    libc::execve(SH.as_ptr(), plan.sh_argv, plan.envp.as_ptr());
                    return fail(STEP_EXEC);
                }
                // What execvp(3) passes over to try the next PATH entry.
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return fail(STEP_EXEC),
            }
            last = e;
        }
        *libc::__errno_location() = if eacces { libc::EACCES } else { last };
        fail(STEP_EXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn run(argv: &[&str], env: &[(&str, &str)], cwd: &str) -> Result<(i32, String), SpawnError> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (r, w) = io::pipe().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let s = spawn(&Job {
            argv: &argv,
            env: &env,
            cwd,
            creds: None,
            cgroup_procs: &[],
            stdin: null.as_fd(),
            stdout: w.as_fd(),
            stderr: w.as_fd(),
        })?;
        drop(w);
        let mut out = String::new();
        io::Read::read_to_string(&mut &r, &mut out).unwrap();
        let mut status = 0;
        // SAFETY: waits for the child just started.
        unsafe { libc::waitpid(s.pid, &mut status, 0) };
        assert!(s.pidfd.is_some(), "this kernel has CLONE_PIDFD");
        Ok((libc::WEXITSTATUS(status), out))
    }

    #[test]
    fn the_child_stack_has_a_guard_page_below_it() {
        let st = ChildStack::new().unwrap();
        let (base, top) = (st.base as usize, st.top() as usize);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let perms_at = |addr: usize| {
            maps.lines()
                .find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (a, b) = range.split_once('-')?;
                    let (a, b) = (
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    );
                    (a <= addr && addr < b).then(|| rest[..4].to_string())
                })
                .unwrap_or_default()
        };
        assert_eq!(perms_at(base), "---p", "guard page at the bottom");
        assert_eq!(perms_at(top - 1), "rw-p", "usable stack below the top");
        assert!(top - base >= CHILD_STACK);
    }

    #[test]
    fn runs_with_exactly_the_given_environment_and_cwd() {
        let (code, out) = run(
            &["sh", "-c", "echo \"$FOO|$PWD|$(env | wc -l)\"; exit 3"],
            &[("PATH", "/usr/bin:/bin"), ("FOO", "bar")],
            "/tmp",
        )
        .unwrap();
        assert_eq!(code, 3);
        // PATH, FOO, PWD (set by sh) and nothing from this process.
        assert_eq!(out.trim(), "bar|/tmp|3");
    }

    #[test]
    fn a_missing_program_or_cwd_names_the_step() {
        let e = run(&["no-such-program-cyb"], &[("PATH", "/usr/bin:/bin")], "/").unwrap_err();
        assert_eq!(e.step, "cannot execute the command");
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOENT));
        let e = run(&["true"], &[("PATH", "/usr/bin:/bin")], "/no/such/dir").unwrap_err();
        assert_eq!(e.step, "cannot change to the working directory");
        let e = run(&[""], &[("PATH", "/usr/bin:/bin")], "/").unwrap_err();
        assert_eq!(
            e.source.raw_os_error(),
            Some(libc::ENOENT),
            "an empty name is not found"
        );
        // The first PATH counts, as for the job's own getenv(3).
        let (code, _) = run(
            &["true"],
            &[("PATH", "/usr/bin:/bin"), ("PATH", "/nonexistent")],
            "/",
        )
        .unwrap();
        assert_eq!(code, 0);
        // Not found in the job's PATH, even where the daemon's own PATH has it.
        let e = run(&["true"], &[("PATH", "/nonexistent")], "/").unwrap_err();
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn a_script_without_a_shebang_runs_with_sh() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "echo from-sh\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (code, out) = run(&[script.to_str().unwrap()], &[("PATH", "/usr/bin:/bin")], "/").unwrap();
        assert_eq!((code, out.trim()), (0, "from-sh"));
        let d = dir.path().to_str().unwrap();
        let e = run(&["s"], &[("PATH", "/nonexistent:")], d).map(|(c, _)| c);
        assert_eq!(e.unwrap(), 0, "an empty PATH entry means the working directory");
    }
}
