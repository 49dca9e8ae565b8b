//! Supervisor: the small per-job process between the daemon and a native job, in the manner
//! of containerd-shim and conmon.
//!
//! The launcher forks it for the daemon, which records its pid, then hands it the launch
//! description on stdin. It is a single thread: one poll loop copies the job's output,
//! watches the time limit, reads cancel signals from a signalfd and notices the job's exit
//! through a pidfd. It
//! drops to the job's user, starts the command in a session of its own with a clean
//! environment, copies stdout/stderr into the run directory (capped, the cut marked),
//! enforces the time limit (TERM, grace, KILL of the whole process group), obeys SIGTERM as
//! "cancel", collects artifacts as the job's user, and writes its exit record
//! (`<runtime>/supervisors/<id>.exit.json`). It does not depend on the daemon staying alive: a
//! restarted daemon finds it by the `<id>.json` beside it and adopts it.
//!
//! If stdin closes before a launch description arrives (the daemon died in between), it
//! writes an exit record that says the job never started, so the job is queued again rather
//! than lost or run twice.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cyb_proto::Timestamp;
use nix::fcntl::{OFlag, openat};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid, fchown};
use serde::{Deserialize, Serialize};

use super::logfile::{LogFile, LogSink};
use crate::fsutil::{self, WriteOpts};

pub const STDOUT_FILE: &str = "stdout.log";
pub const STDERR_FILE: &str = "stderr.log";
pub const ARTIFACTS_DIR: &str = "artifacts";

/// What the daemon hands the supervisor on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    pub job_id: u64,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Group that may read the run directory's files (the job user's primary group).
    pub log_gid: u32,
    pub timeout_ms: u64,
    pub grace_ms: u64,
    pub max_log_bytes: u64,
    pub artifacts: Vec<String>,
    /// The job's cgroup, created by the daemon with its limits and device rules; the job
    /// joins it before its first instruction. The supervisor stays outside, so killing
    /// the cgroup (or the OOM killer) never takes the supervisor with it.
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::JobCgroup>,
    /// GPUs the job holds (their lockfiles are among the supervisor's held descriptors).
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Set for a docker job: the supervisor drives this container instead of starting
    /// `argv` itself (`backend::docker::shim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<crate::backend::docker::shim::DockerLaunch>,
}

/// Written by the daemon right after it starts a supervisor; used to adopt it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorRef {
    pub attempt: u32,
    pub pid: i32,
    pub start_ticks: u64,
}

/// Written by the supervisor when it is done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub attempt: u32,
    /// The supervisor that wrote it (another supervisor of the same attempt number, one that
    /// was never handed its job, may have left a record behind).
    #[serde(default)]
    pub pid: i32,
    /// False when the job's process never started (see `error`).
    pub started: bool,
    /// True when no launch description arrived: the job never began and may be queued again.
    #[serde(default)]
    pub not_launched: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub cancelled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// From the job's cgroup, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_ms: Option<u64>,
    /// The kernel's OOM killer killed a process of the job's cgroup.
    #[serde(default)]
    pub oom_killed: bool,
    /// Problems with the job's cgroup (kill, removal), for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_error: Option<String>,
    /// The job's memory cgroup, kept for another job ([`crate::cgroup::Spare`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare: Option<crate::cgroup::Spare>,
    /// The container the job ran in (docker jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// Runs one supervisor (in a process forked by the launcher, stdin the launch pipe) and
/// returns its exit code.
///
/// `held` are descriptors kept open until the supervisor exits: the job's GPU lockfiles,
/// whose locks last exactly as long as the job's supervisor.
pub fn main(run_dir: &Path, exit_file: &Path, attempt: u32, held: Vec<OwnedFd>) -> i32 {
    let code = supervise(run_dir, exit_file, attempt);
    drop(held);
    code
}

fn supervise(run_dir: &Path, exit_file: &Path, attempt: u32) -> i32 {
    let dir = match fsutil::open_dir(run_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cybd supervisor: {e}");
            return 1;
        }
    };
    // Signals first, so a cancel that arrives while we start is not lost: TERM, INT and HUP
    // are blocked and read from a signalfd by the loop in `run`.
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(sig);
    }
    if let Err(e) = mask.thread_block() {
        eprintln!("cybd supervisor: cannot block signals: {e}");
        return 1;
    }
    let signals = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("cybd supervisor: cannot create a signalfd: {e}");
            return 1;
        }
    };
    let mut exit = ExitRecord {
        attempt,
        pid: std::process::id() as i32,
        ..Default::default()
    };
    let mut input = Vec::new();
    // Straight from fd 0 (the pipe the daemon writes the launch to), not through
    // `io::stdin()`, which would set up a shared 8 KiB buffer for one read.
    let launch = match read_fd_to_end(io::stdin().as_fd(), &mut input) {
        Ok(_) if input.is_empty() => None,
        Ok(_) => match serde_json::from_slice::<Launch>(&input) {
            Ok(l) => Some(l),
            Err(e) => {
                exit.error = Some(format!("bad launch description: {e}"));
                None
            }
        },
        Err(e) => {
            exit.error = Some(format!("cannot read launch description: {e}"));
            None
        }
    };
    let Some(launch) = launch else {
        exit.not_launched = exit.error.is_none();
        if exit.not_launched {
            exit.error = Some("the daemon went away before handing over the job".into());
        }
        exit.finished_at = Some(Timestamp::now());
        return finish(exit_file, &exit);
    };
    run(&dir, run_dir, &launch, &mut exit, &signals);
    if !exit.started
        && let Some(cg) = &launch.cgroup
    {
        // The job never ran (no such program, bad cwd...): its empty cgroup goes too.
        if let Err(e) = cg.remove() {
            exit.cgroup_error = Some(e.to_string());
        }
    }
    exit.finished_at = Some(Timestamp::now());
    finish(exit_file, &exit)
}

/// Reads `fd` to its end into `out`, 16 KiB a read (a launch description is one or two).
fn read_fd_to_end(fd: std::os::fd::BorrowedFd<'_>, out: &mut Vec<u8>) -> io::Result<usize> {
    let start = out.len();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return Ok(out.len() - start),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `/dev/null`, the jobs' stdin, opened by [`prepare`] in the launcher (close-on-exec) for
/// every supervisor it forks.
static DEV_NULL: std::sync::OnceLock<io::Result<File>> = std::sync::OnceLock::new();

/// Opens what each supervisor would otherwise open for itself; the launcher calls it once
/// before it forks any.
pub fn prepare() {
    let _ = dev_null();
}

fn dev_null() -> io::Result<std::os::fd::BorrowedFd<'static>> {
    match DEV_NULL.get_or_init(|| File::open("/dev/null")) {
        Ok(f) => Ok(f.as_fd()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// Writes the exit record to `path` (in the daemon's own 0700 directory).
fn finish(path: &Path, exit: &ExitRecord) -> i32 {
    let written = serde_json::to_vec(exit)
        .map_err(io::Error::other)
        .and_then(|bytes| {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
            else {
                return Err(io::Error::other("not a file path"));
            };
            // Read only once this process has exited: no temp file needed.
            let opts = WriteOpts {
                mode: 0o600,
                owner: None,
                sync: false,
            };
            fsutil::write_new_at(&fsutil::open_dir(parent)?, name, &bytes, opts)
        });
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "cybd supervisor: cannot write the exit record {}: {e}",
                path.display()
            );
            1
        }
    }
}

fn run(dir: &OwnedFd, run_dir: &Path, l: &Launch, exit: &mut ExitRecord, signals: &SignalFd) {
    let as_root = nix::unistd::geteuid().is_root();
    if !as_root && l.uid != nix::unistd::geteuid().as_raw() {
        exit.error = Some(format!(
            "an unprivileged supervisor cannot run a job as uid {} (it runs as uid {})",
            l.uid,
            nix::unistd::geteuid()
        ));
        return;
    }
    let (out_file, err_file) = match (
        open_log(dir, STDOUT_FILE, l, as_root),
        open_log(dir, STDERR_FILE, l, as_root),
    ) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            exit.error = Some(format!(
                "cannot open the job's log files in {}: {e}",
                run_dir.display()
            ));
            return;
        }
    };
    let (out_r, out_w) = match io::pipe() {
        Ok(p) => p,
        Err(e) => {
            exit.error = Some(format!("cannot create a pipe: {e}"));
            return;
        }
    };
    let (err_r, err_w) = match io::pipe() {
        Ok(p) => p,
        Err(e) => {
            exit.error = Some(format!("cannot create a pipe: {e}"));
            return;
        }
    };
    if let Some(d) = &l.docker {
        if let Err(e) = ensure_artifacts_dir(dir, run_dir, l, as_root) {
            exit.error = Some(e);
            return;
        }
        let logs = [
            LogFile::new(out_file, l.max_log_bytes),
            LogFile::new(err_file, l.max_log_bytes),
        ];
        crate::backend::docker::shim::run(l, d, logs, signals, exit);
        if exit.started
            && let Some(cg) = &l.cgroup
        {
            finish_cgroup(cg, exit);
        }
        return;
    }
    if l.argv.is_empty() {
        exit.error = Some("empty command".into());
        return;
    }
    let devnull = match dev_null() {
        Ok(f) => f,
        Err(e) => {
            exit.error = Some(format!("cannot open /dev/null: {e}"));
            return;
        }
    };
    // The job's cgroup.procs files, opened now so the child only has to write to them.
    let procs = match l.cgroup.as_ref().map(|cg| cg.procs_files()).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => {
            exit.error = Some(format!("cannot open the job's cgroup: {e}"));
            return;
        }
    };
    let procs_raw: Vec<std::os::fd::RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let creds = super::spawn::Creds {
        uid: l.uid,
        gid: l.gid,
        groups: &l.groups,
    };
    if let Err(e) = ensure_artifacts_dir(dir, run_dir, l, as_root) {
        exit.error = Some(e);
        return;
    }
    exit.started_at = Some(Timestamp::now());
    let spawned = super::spawn::spawn(&super::spawn::Job {
        argv: &l.argv,
        env: &l.env,
        cwd: &l.cwd,
        creds: as_root.then_some(creds),
        cgroup_procs: &procs_raw,
        stdin: devnull,
        stdout: out_w.as_fd(),
        stderr: err_w.as_fd(),
    });
    // Our copies of the pipes' write ends go, so the pipes end when the job's copies do.
    drop((out_w, err_w, devnull));
    let job = match spawned {
        Ok(s) => s,
        Err(e) => {
            let mut why = format!("cannot start `{}` in {} as uid {}: {e}", l.argv[0], l.cwd, l.uid);
            if e.source.kind() == std::io::ErrorKind::NotFound && !l.argv[0].contains('/') {
                let path = l.env.iter().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v);
                why.push_str(&format!(" (searched the job's PATH={path})"));
            }
            exit.error = Some(why);
            return;
        }
    };
    drop(procs);
    exit.started = true;
    let watch = Watch {
        cgroup: l.cgroup.as_ref(),
        pgid: Pid::from_raw(job.pid),
        deadline: Instant::now() + Duration::from_millis(l.timeout_ms),
        grace: Duration::from_millis(l.grace_ms),
    };
    let outs = [
        LogSink::new(OwnedFd::from(out_r), out_file, l.max_log_bytes),
        LogSink::new(OwnedFd::from(err_r), err_file, l.max_log_bytes),
    ];
    let (status, ended_by) = watch.run(job, outs, signals);
    match ended_by {
        Some(EndedBy::Cancel) => exit.cancelled = true,
        Some(EndedBy::Timeout) => exit.timed_out = true,
        None => {}
    }
    match status {
        Ok(s) => {
            exit.exit_code = s.code();
            exit.signal = s.signal();
        }
        Err(e) => exit.error = Some(format!("cannot wait for the job: {e}")),
    }
    if let Some(cg) = &l.cgroup {
        finish_cgroup(cg, exit);
    }
    if !l.artifacts.is_empty() {
        exit.artifacts_error = collect_artifacts(run_dir, l, as_root).err();
    }
}

/// After the job (whose cgroup the watch loop already killed): what it used is read, its
/// memory cgroup is kept for another job where it may be, and the rest is removed.
pub(crate) fn finish_cgroup(cg: &crate::cgroup::JobCgroup, exit: &mut ExitRecord) {
    // The watch loop killed the cgroup when the job's main process ended.
    let mut problems = Vec::new();
    let mut cg = cg.clone();
    match cg.finish() {
        Ok((st, spare)) => {
            exit.peak_memory_bytes = st.peak_memory_bytes;
            exit.cpu_usage_ms = st.cpu_usage_ms;
            // (A docker job's engine may have said so already.)
            exit.oom_killed |= st.oom_killed;
            exit.spare = spare;
        }
        Err(e) => problems.push(e.to_string()),
    }
    if cg.remove().is_err() {
        // Something is still in it (a kill that did not finish): once more, then remove.
        if let Err(e) = cg.kill().and_then(|()| cg.remove()) {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        exit.cgroup_error = Some(problems.join("; "));
    }
}

/// Why the supervisor ended a job early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndedBy {
    Cancel,
    Timeout,
}

/// The time limit and cancel of a running job: each sends TERM to its process group, then
/// KILL after the grace period.
struct Watch<'a> {
    /// Killing the job kills its whole cgroup, when it has one.
    cgroup: Option<&'a crate::cgroup::JobCgroup>,
    pgid: Pid,
    deadline: Instant,
    grace: Duration,
}

impl Watch<'_> {
    /// KILL to the job's process group and, with a cgroup, to everything in it (processes
    /// that left the group with setsid or a double fork included).
    fn kill_all(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
        if let Some(cg) = self.cgroup {
            let _ = cg.kill();
        }
    }

    /// Runs until the job has exited and its output is copied, in one thread: a poll over
    /// the two output pipes, the signalfd (cancel) and the job's pidfd, with the next
    /// deadline as the timeout.
    fn run(
        &self,
        job: super::spawn::Spawned,
        mut outs: [LogSink; 2],
        signals: &SignalFd,
    ) -> (io::Result<std::process::ExitStatus>, Option<EndedBy>) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let pidfd = job.pidfd.or_else(|| crate::sys::pidfd_open(job.pid).ok());
        let mut buf = [0u8; 16 * 1024];
        let mut ended_by = None;
        let mut kill_at: Option<Instant> = None;
        let mut status = None;
        // Output still buffered in the pipes is copied after the job exits; a process that
        // escaped the group and holds a pipe open keeps us for at most a moment.
        let mut drain_until: Option<Instant> = None;
        loop {
            if status.is_none() {
                match crate::sys::try_wait(job.pid) {
                    Ok(Some(s)) => status = Some(Ok(s)),
                    Ok(None) => {}
                    Err(e) => status = Some(Err(e)),
                }
                if status.is_some() {
                    // The job is over: nothing it left in its process group (or cgroup) may
                    // outlive it.
                    self.kill_all();
                    drain_until = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            if let Some(s) = status.as_ref()
                && (outs.iter().all(|o| o.pipe.is_none()) || drain_until.is_some_and(|t| Instant::now() >= t))
            {
                let s = match s {
                    Ok(s) => Ok(*s),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                return (s, ended_by);
            }
            let now = Instant::now();
            if status.is_none() {
                if ended_by.is_none() && now >= self.deadline {
                    ended_by = Some(EndedBy::Timeout);
                    let _ = killpg(self.pgid, Signal::SIGTERM);
                    kill_at = Some(now + self.grace);
                }
                if kill_at.is_some_and(|t| now >= t) {
                    self.kill_all();
                    kill_at = None;
                }
            }
            let next = [
                (status.is_none() && ended_by.is_none()).then_some(self.deadline),
                kill_at,
                drain_until,
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = match next {
                Some(t) => {
                    // Rounded up, so the loop never wakes a moment before a deadline.
                    let ms = t
                        .saturating_duration_since(now)
                        .as_micros()
                        .div_ceil(1000)
                        .min(60_000);
                    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let mut fds = Vec::with_capacity(4);
            let mut which = Vec::with_capacity(4);
            for (i, o) in outs.iter().enumerate() {
                if let Some(p) = &o.pipe {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                    which.push(i);
                }
            }
            fds.push(PollFd::new(signals.as_fd(), PollFlags::POLLIN));
            let wait_pidfd = status.is_none() && pidfd.is_some();
            if let (true, Some(p)) = (wait_pidfd, &pidfd) {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            // Without a pidfd (very old kernel), poll /proc through try_wait every 50 ms.
            let timeout = if status.is_none() && pidfd.is_none() {
                PollTimeout::from(50u8)
            } else {
                timeout
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            for (k, i) in which.iter().enumerate() {
                if ready[k] {
                    outs[*i].pump(&mut buf);
                }
            }
            if ready[which.len()] {
                while let Ok(Some(sig)) = signals.read_signal() {
                    let cancel = sig.ssi_signo != Signal::SIGHUP as u32;
                    if cancel && status.is_none() && ended_by.is_none() {
                        ended_by = Some(EndedBy::Cancel);
                        let _ = killpg(self.pgid, Signal::SIGTERM);
                        kill_at = Some(Instant::now() + self.grace);
                    }
                }
            }
        }
    }
}

/// Creates `artifacts/` (CYB_ARTIFACTS_DIR) for the job's user: the job may write there,
/// and the artifact globs are copied there when it ends.
fn ensure_artifacts_dir(dir: &OwnedFd, run_dir: &Path, l: &Launch, as_root: bool) -> Result<(), String> {
    let dest = run_dir.join(ARTIFACTS_DIR);
    match nix::sys::stat::mkdirat(dir, ARTIFACTS_DIR, Mode::from_bits_truncate(0o750)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dest.display())),
    }
    if as_root {
        // By name in the run directory, which only root may change (0750, root's), so the
        // name cannot be swapped for something else meanwhile; a symlink would be changed
        // itself, never followed.
        nix::unistd::fchownat(
            dir,
            ARTIFACTS_DIR,
            Some(Uid::from_raw(l.uid)),
            Some(Gid::from_raw(l.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("cannot give {} to uid {}: {e}", dest.display(), l.uid))?;
    }
    Ok(())
}

/// Opens a log file in the run directory: a new file for the first attempt, appended to
/// (with a marker) for later ones; never through a symlink or a hard link.
fn open_log(dir: &OwnedFd, name: &str, l: &Launch, as_root: bool) -> io::Result<File> {
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    flags |= if l.attempt <= 1 {
        OFlag::O_TRUNC
    } else {
        OFlag::O_APPEND
    };
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o640)).map_err(io::Error::from)?;
    let mut f = File::from(fd);
    let meta = f.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{name} is not a plain file with one link"
        )));
    }
    if as_root {
        fchown(f.as_fd(), Some(Uid::from_raw(0)), Some(Gid::from_raw(l.log_gid))).map_err(io::Error::from)?;
    }
    if l.attempt > 1 {
        writeln!(f, "[cybd: attempt {} of job {}]", l.attempt, l.job_id)?;
    }
    Ok(f)
}

/// Copies the files matched by the artifact globs under `cwd` into `artifacts/`, running a
/// helper process as the job's user, so nothing is read that the user could not read.
fn collect_artifacts(run_dir: &Path, l: &Launch, as_root: bool) -> Result<(), String> {
    let dest = run_dir.join(ARTIFACTS_DIR);
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("collect-artifacts")
        .arg("--cwd")
        .arg(&l.cwd)
        .arg("--dest")
        .arg(&dest)
        .arg("--")
        .args(&l.artifacts)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (uid, gid) = (l.uid, l.gid);
    let gids: Vec<Gid> = l.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // SAFETY: as for the job: only system calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let _ = nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            );
            if as_root {
                nix::unistd::setgroups(&gids).map_err(io::Error::from)?;
                nix::unistd::setgid(Gid::from_raw(gid)).map_err(io::Error::from)?;
                nix::unistd::setuid(Uid::from_raw(uid)).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run the artifact collector: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Entry point of `cybd collect-artifacts` (already running as the job's user).
pub fn collect_main(cwd: &Path, dest: &Path, globs: &[String]) -> i32 {
    let mut problems = Vec::new();
    let mut copied = 0usize;
    for g in globs {
        if let Err(m) = cyb_proto::spec::check_artifact_glob(g) {
            problems.push(m);
            continue;
        }
        let pattern = cwd.join(g);
        let Some(pattern) = pattern.to_str() else { continue };
        let paths = match glob::glob(pattern) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("`{g}`: {e}"));
                continue;
            }
        };
        for p in paths.flatten() {
            match copy_artifact(cwd, &p, dest) {
                Ok(true) => copied += 1,
                Ok(false) => {}
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            }
        }
    }
    if problems.is_empty() {
        0
    } else {
        eprintln!("copied {copied} artifact(s); {}", problems.join("; "));
        1
    }
}

fn copy_artifact(cwd: &Path, src: &Path, dest: &Path) -> io::Result<bool> {
    let meta = std::fs::symlink_metadata(src)?;
    if !meta.is_file() {
        return Ok(false); // directories and symlinks are not artifacts
    }
    let rel: PathBuf = src
        .strip_prefix(cwd)
        .map_err(|_| io::Error::other("outside cwd"))?
        .to_path_buf();
    let target = dest.join(&rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(src, &target)?;
    Ok(true)
}
