//! Supervisor: the small per-job process (`cybd supervise`) between the daemon and a native
//! job, in the manner of containerd-shim and conmon.
//!
//! The daemon starts it, records its pid, then hands it the launch description on stdin. It
//! drops to the job's user, starts the command in a session of its own with a clean
//! environment, copies stdout/stderr into the run directory (capped, the cut marked),
//! enforces the time limit (TERM, grace, KILL of the whole process group), obeys SIGTERM as
//! "cancel", collects artifacts as the job's user, and writes `exit.json`. It does not depend
//! on the daemon staying alive: a restarted daemon finds it by `supervisor.json` and adopts it.
//!
//! If stdin closes before a launch description arrives (the daemon died in between), it
//! writes an `exit.json` that says the job never started, so the job is queued again rather
//! than lost or run twice.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cyb_proto::Timestamp;
use nix::fcntl::{OFlag, openat};
use nix::sys::signal::{Signal, killpg};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid, fchown};
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, WriteOpts};

pub const SUPERVISOR_FILE: &str = "supervisor.json";
pub const EXIT_FILE: &str = "exit.json";
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
}

enum Control {
    Cancel,
    Exited,
}

/// Entry point of `cybd supervise`: returns the process exit code.
pub fn main(run_dir: &Path, attempt: u32) -> i32 {
    let dir = match fsutil::open_dir(run_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cybd supervise: {e}");
            return 1;
        }
    };
    // Signals first, so a cancel that arrives while we start is not lost.
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    match signals {
        Ok(mut sigs) => {
            let tx = ctl_tx.clone();
            std::thread::spawn(move || {
                for s in sigs.forever() {
                    if s != signal_hook::consts::SIGHUP {
                        let _ = tx.send(Control::Cancel);
                    }
                }
            });
        }
        Err(e) => eprintln!("cybd supervise: cannot install signal handlers: {e}"),
    }
    let mut exit = ExitRecord {
        attempt,
        pid: std::process::id() as i32,
        ..Default::default()
    };
    let mut input = Vec::new();
    let launch = match io::stdin().lock().read_to_end(&mut input) {
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
        return finish(&dir, &exit, 0);
    };
    run(&dir, run_dir, &launch, &mut exit, ctl_tx, ctl_rx);
    exit.finished_at = Some(Timestamp::now());
    finish(&dir, &exit, launch.log_gid)
}

fn finish(dir: &OwnedFd, exit: &ExitRecord, gid: u32) -> i32 {
    let bytes = match serde_json::to_vec_pretty(exit) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cybd supervise: cannot encode exit record: {e}");
            return 1;
        }
    };
    let owner = if nix::unistd::geteuid().is_root() {
        Some((0, gid))
    } else {
        None
    };
    match fsutil::write_at(
        dir,
        EXIT_FILE,
        &bytes,
        WriteOpts {
            mode: 0o640,
            owner,
            sync: false,
        },
    ) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cybd supervise: cannot write {EXIT_FILE}: {e}");
            1
        }
    }
}

fn run(
    dir: &OwnedFd,
    run_dir: &Path,
    l: &Launch,
    exit: &mut ExitRecord,
    ctl_tx: mpsc::Sender<Control>,
    ctl_rx: mpsc::Receiver<Control>,
) {
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
    let cwd = match CString::new(l.cwd.clone()) {
        Ok(c) => c,
        Err(_) => {
            exit.error = Some("cwd contains a NUL byte".into());
            return;
        }
    };
    let Some((prog, args)) = l.argv.split_first() else {
        exit.error = Some("empty command".into());
        return;
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(out_w)
        .stderr(err_w);
    let (uid, gid) = (l.uid, l.gid);
    let gids: Vec<Gid> = l.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (setsid, setgroups, setgid, setuid, chdir, signal) on memory prepared before the fork;
    // it allocates nothing, and this process has no other threads that could hold locks
    // besides the signal thread, which takes none the child needs.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            if as_root {
                nix::unistd::setgroups(&gids).map_err(io::Error::from)?;
                nix::unistd::setgid(Gid::from_raw(gid)).map_err(io::Error::from)?;
                nix::unistd::setuid(Uid::from_raw(uid)).map_err(io::Error::from)?;
            }
            nix::unistd::chdir(cwd.as_c_str()).map_err(io::Error::from)?;
            // The job starts with default signal handling and nothing blocked.
            let _ = nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            );
            for s in [Signal::SIGPIPE, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                let _ = nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl);
            }
            Ok(())
        });
    }
    if let Err(e) = ensure_artifacts_dir(dir, run_dir, l, as_root) {
        exit.error = Some(e);
        return;
    }
    exit.started_at = Some(Timestamp::now());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            exit.error = Some(format!(
                "cannot start `{prog}` in {} as uid {}: {e}",
                l.cwd, l.uid
            ));
            return;
        }
    };
    drop(cmd); // closes our copies of the pipes' write ends
    exit.started = true;
    let pgid = Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let readers = [(out_r, out_file), (err_r, err_file)].map(|(r, f)| {
        let tx = done_tx.clone();
        let cap = l.max_log_bytes;
        std::thread::spawn(move || {
            copy_capped(r, f, cap);
            let _ = tx.send(());
        })
    });
    drop(done_tx);
    // The control thread: time limit and cancel, each TERM, grace, then KILL of the group.
    let deadline = Instant::now() + Duration::from_millis(l.timeout_ms);
    let grace = Duration::from_millis(l.grace_ms);
    let control = std::thread::spawn(move || {
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match ctl_rx.recv_timeout(left) {
            Ok(Control::Exited) | Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            Ok(Control::Cancel) => Some(Control::Cancel),
            // `Exited` stands for "timed out" from here on.
            Err(mpsc::RecvTimeoutError::Timeout) => Some(Control::Exited),
        };
        let _ = killpg(pgid, Signal::SIGTERM);
        if let Ok(Control::Exited) = ctl_rx.recv_timeout(grace) {
            return why;
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        why
    });
    let status = child.wait();
    let _ = ctl_tx.send(Control::Exited);
    // The job is over: nothing it left in its process group may outlive it.
    let _ = killpg(pgid, Signal::SIGKILL);
    match control.join() {
        Ok(Some(Control::Cancel)) => exit.cancelled = true,
        Ok(Some(Control::Exited)) => exit.timed_out = true,
        _ => {}
    }
    match status {
        Ok(s) => {
            exit.exit_code = s.code();
            exit.signal = s.signal();
        }
        Err(e) => exit.error = Some(format!("cannot wait for the job: {e}")),
    }
    // Output still buffered in the pipes is copied; a process that escaped the group and
    // holds a pipe open does not keep us here for more than a moment.
    let until = Instant::now() + Duration::from_secs(2);
    for _ in 0..readers.len() {
        if done_rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    if !l.artifacts.is_empty() {
        exit.artifacts_error = collect_artifacts(run_dir, l, as_root).err();
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
    let adir = fsutil::open_dir(&dest).map_err(|e| e.to_string())?;
    if as_root {
        fchown(
            adir.as_fd(),
            Some(Uid::from_raw(l.uid)),
            Some(Gid::from_raw(l.gid)),
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

/// Copies `r` into `f` until EOF, keeping at most `cap` bytes and marking the cut.
fn copy_capped(mut r: impl Read, mut f: File, cap: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut cut = false;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if cut {
            continue; // keep draining so the job never blocks on a full pipe
        }
        let room = cap.saturating_sub(written);
        let take = (n as u64).min(room) as usize;
        if take > 0 && f.write_all(&buf[..take]).is_err() {
            cut = true;
            continue;
        }
        written += take as u64;
        if take < n {
            cut = true;
            let _ = writeln!(f, "\n[cybd: output truncated at {cap} bytes]");
        }
    }
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
