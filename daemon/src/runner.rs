//! Runner: turns a job into a running thing. For native jobs (the only backend on this host
//! so far) it prepares the run directory, starts a supervisor (forked by the launcher), records
//! the supervisor's identity before handing it the job, watches it through a pidfd, and
//! adopts supervisors left running by an earlier daemon. It also writes `job.json` and
//! `result.json`.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cyb_proto::job::ProcRef;
use cyb_proto::{JobRecord, RunResult};
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::config::Config;
use crate::fsutil::{self, WriteOpts};
use crate::launcher::Launcher;
use crate::supervisor::{EXIT_FILE, ExitRecord, Launch, SUPERVISOR_FILE, SupervisorRef};
use crate::sys;
use crate::users::Account;

/// A supervisor being watched.
pub struct Running {
    pub sup: SupervisorRef,
    pub pidfd: Arc<OwnedFd>,
    pub run_dir: PathBuf,
}

impl Running {
    pub fn proc_ref(&self) -> ProcRef {
        ProcRef {
            pid: self.sup.pid,
            start_ticks: self.sup.start_ticks,
        }
    }
}

/// Asks a supervisor to cancel its job (TERM, grace, KILL).
pub fn cancel(pidfd: &OwnedFd) -> std::io::Result<()> {
    sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGTERM)
}

/// What became of a supervisor found at startup.
pub enum Adopted {
    Alive(Running),
    Ended(ExitRecord),
    /// No supervisor was ever handed the job: safe to queue it again.
    NeverLaunched,
    /// The supervisor is gone and left no exit record.
    Lost(String),
}

#[derive(Serialize)]
struct JobFile<'a> {
    id: u64,
    spec: &'a cyb_proto::JobSpec,
    user: &'a str,
    uid: u32,
    submitted_at: cyb_proto::Timestamp,
    origin: &'a cyb_proto::job::Origin,
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creates (or reopens) the run directory: owned by root and the job user's group, mode
/// 0750, so the user can read it and nobody else can, and the user cannot tamper with it.
pub fn prepare_run_dir(rec: &JobRecord) -> std::io::Result<OwnedFd> {
    let path = Path::new(&rec.run_dir);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", parent.display())))?;
    }
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", path.display()),
            ));
        }
    }
    let fd = fsutil::open_dir(path)?;
    if as_root() {
        nix::unistd::fchown(
            &fd,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(rec.owner.gid)),
        )
        .map_err(|e| std::io::Error::other(format!("cannot chown {}: {e}", path.display())))?;
    }
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o750))
        .map_err(|e| std::io::Error::other(format!("cannot chmod {}: {e}", path.display())))?;
    Ok(fd)
}

fn file_opts(rec: &JobRecord) -> WriteOpts {
    WriteOpts {
        mode: 0o640,
        owner: as_root().then_some((0, rec.owner.gid)),
        sync: false,
    }
}

/// Writes `job.json`: the accepted spec, submitter and submit time.
pub fn write_job_json(dir: &OwnedFd, rec: &JobRecord) -> std::io::Result<()> {
    let jf = JobFile {
        id: rec.id,
        spec: &rec.spec,
        user: &rec.owner.user,
        uid: rec.owner.uid,
        submitted_at: rec.submitted_at,
        origin: &rec.origin,
    };
    let mut bytes = serde_json::to_vec_pretty(&jf).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    fsutil::write_at(dir, "job.json", &bytes, file_opts(rec))
}

/// Writes `result.json` for a job in a terminal state (blocking).
pub fn write_result(rec: &JobRecord) -> std::io::Result<()> {
    let Some(result) = RunResult::of(rec) else {
        return Ok(());
    };
    // A job that ran has its run directory (and job.json, written before its supervisor was
    // handed the job); one that never ran (cancelled, dependency failed) gets them now.
    let dir = match fsutil::open_dir(Path::new(&rec.run_dir)) {
        Ok(d) => d,
        Err(_) => prepare_run_dir(rec)?,
    };
    let has_job_json =
        nix::sys::stat::fstatat(&dir, "job.json", nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
    if !has_job_json {
        write_job_json(&dir, rec)?;
    }
    let mut bytes = serde_json::to_vec_pretty(&result).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    fsutil::write_at(&dir, "result.json", &bytes, file_opts(rec))
}

/// Builds the launch description of attempt `attempt`.
/// `gpu_env` is what [`crate::host::Host::gpu_env`] gives for the job's GPUs.
pub fn launch_for(
    cfg: &Config,
    rec: &JobRecord,
    acct: &Account,
    attempt: u32,
    gpus: &[u32],
    gpu_env: Vec<(String, String)>,
) -> Result<Launch, String> {
    let argv = rec
        .spec
        .argv()
        .ok_or_else(|| format!("job {} is not a native job", rec.id))?;
    let run_dir = &rec.run_dir;
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), acct.home.clone()),
        ("USER".into(), acct.name.clone()),
        ("LOGNAME".into(), acct.name.clone()),
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
    ];
    for (k, v) in &rec.spec.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env.push(("CYB_JOB_ID".into(), rec.id.to_string()));
    env.push(("CYB_RUN_DIR".into(), run_dir.clone()));
    env.push(("CYB_ARTIFACTS_DIR".into(), format!("{run_dir}/artifacts")));
    env.push(("CYB_ATTEMPT".into(), attempt.to_string()));
    env.extend(gpu_env);
    let class = cfg.class(rec.spec.class());
    let timeout = rec.spec.timeout.map_or(class.timeout, |t| t.0);
    Ok(Launch {
        job_id: rec.id,
        attempt,
        argv,
        env,
        cwd: rec.spec.cwd.clone().unwrap_or_else(|| acct.home.clone()),
        uid: acct.uid,
        gid: acct.gid,
        groups: acct.groups.clone(),
        log_gid: acct.gid,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        grace_ms: u64::try_from(cfg.kill_grace.as_millis()).unwrap_or(u64::MAX),
        max_log_bytes: cfg.max_log_bytes,
        artifacts: rec.spec.artifacts.clone(),
        cgroup: None,
        gpus: gpus.to_vec(),
    })
}

/// A supervisor that is started and recorded in `supervisor.json`, but not yet handed its
/// job: it waits on its stdin pipe. Starting it while the job's `running` record is being
/// made durable hides the supervisor's start-up behind the fsync.
pub struct Spawned {
    stdin: std::fs::File,
    running: Running,
    job_id: u64,
}

/// Starts a supervisor for `launch` through the launcher and records its identity
/// (blocking). The job itself starts only at [`hand_over`]: a daemon that dies before then
/// leaves a supervisor that writes "never launched" and exits, so the job is queued again,
/// not run twice.
/// `held` are descriptors the supervisor keeps for its whole life (GPU lockfiles).
pub fn spawn_supervisor(
    launcher: &Launcher,
    rec: &JobRecord,
    launch: &Launch,
    held: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Spawned, String> {
    let dir = prepare_run_dir(rec).map_err(|e| e.to_string())?;
    if launch.attempt <= 1 || fsutil::open_read_at(&dir, "job.json").is_err() {
        write_job_json(&dir, rec).map_err(|e| format!("cannot write job.json in {}: {e}", rec.run_dir))?;
    }
    for stale in [EXIT_FILE, SUPERVISOR_FILE] {
        let _ = nix::unistd::unlinkat(&dir, stale, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    // A second pipe only if the launcher took the first request without answering: a
    // supervisor it may have forked then reads the first pipe's end-of-file, records "never
    // launched" and exits.
    let mut tries = 0;
    let (started, write_end) = loop {
        tries += 1;
        let (read_end, write_end) =
            std::io::pipe().map_err(|e| format!("cannot create a pipe for job {}: {e}", rec.id))?;
        let read_end = OwnedFd::from(read_end);
        match launcher.start(Path::new(&rec.run_dir), launch.attempt, &read_end, held) {
            Ok(s) => break (s, write_end),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted && tries < 2 => continue,
            Err(e) => return Err(format!("cannot start the supervisor of job {}: {e}", rec.id)),
        }
    };
    let (pid, start_ticks) = (started.pid, started.start_ticks);
    // From here on, dropping `write_end` unanswered makes the supervisor record "never
    // launched" and exit.
    let sup = SupervisorRef {
        attempt: launch.attempt,
        pid,
        start_ticks,
    };
    serde_json::to_vec(&sup)
        .map_err(std::io::Error::other)
        // Read only after a restart, and only trusted whole: the launch is sent after it.
        .and_then(|b| fsutil::write_new_at(&dir, SUPERVISOR_FILE, &b, file_opts(rec)))
        .map_err(|e| format!("cannot write {SUPERVISOR_FILE} in {}: {e}", rec.run_dir))?;
    let running = Running {
        sup,
        pidfd: Arc::new(started.pidfd),
        run_dir: PathBuf::from(&rec.run_dir),
    };
    Ok(Spawned {
        stdin: std::fs::File::from(OwnedFd::from(write_end)),
        running,
        job_id: rec.id,
    })
}

impl Spawned {
    /// The supervisor's pid.
    pub fn pid(&self) -> i32 {
        self.running.sup.pid
    }
}

/// Hands the job to its waiting supervisor (blocking); from here on the job runs.
pub fn hand_over(mut s: Spawned, launch: &Launch) -> Running {
    match serde_json::to_vec(launch) {
        Ok(payload) => {
            if let Err(e) = s.stdin.write_all(&payload) {
                // The supervisor died already; its exit record (or its absence) tells the rest.
                tracing::warn!(job_id = s.job_id, "cannot hand the job to its supervisor: {e}");
            }
        }
        // Closing stdin unanswered makes the supervisor record "never launched".
        Err(e) => tracing::error!(job_id = s.job_id, "cannot encode the launch description: {e}"),
    }
    s.running
}

/// Sends a waiting supervisor away without a job: closing its stdin makes it record "never
/// launched" and exit.
pub fn abandon(s: Spawned) {
    drop(s);
}

/// Looks for the supervisor of attempt `attempt` of a job recorded as running (blocking).
pub fn adopt(run_dir: &Path, attempt: u32) -> Adopted {
    let dir = match fsutil::open_dir(run_dir) {
        Ok(d) => d,
        Err(_) => return Adopted::NeverLaunched,
    };
    let sup: Option<SupervisorRef> = fsutil::read_at(&dir, SUPERVISOR_FILE, 64 * 1024)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &SupervisorRef| s.attempt == attempt);
    let Some(sup) = sup else {
        // The launch is sent only after supervisor.json is written.
        return Adopted::NeverLaunched;
    };
    if let Ok(fd) = sys::pidfd_open(sup.pid)
        && sys::proc_start_ticks(sup.pid).ok() == Some(sup.start_ticks)
        && !sys::is_zombie(sup.pid)
    {
        return Adopted::Alive(Running {
            sup,
            pidfd: Arc::new(fd),
            run_dir: run_dir.to_path_buf(),
        });
    }
    match read_exit(run_dir, attempt, sup.pid) {
        Some(e) if e.not_launched => Adopted::NeverLaunched,
        Some(e) => Adopted::Ended(e),
        None => Adopted::Lost(format!(
            "supervisor (pid {}) of attempt {attempt} is gone and left no {EXIT_FILE}",
            sup.pid
        )),
    }
}

/// The exit record of attempt `attempt` as written by the supervisor with pid `pid`
/// (a record left by another supervisor of the same attempt number does not count).
fn read_exit(run_dir: &Path, attempt: u32, pid: i32) -> Option<ExitRecord> {
    let dir = fsutil::open_dir(run_dir).ok()?;
    let bytes = fsutil::read_at(&dir, EXIT_FILE, 1024 * 1024).ok()?;
    serde_json::from_slice::<ExitRecord>(&bytes)
        .ok()
        .filter(|e| e.attempt == attempt && e.pid == pid)
}

/// How a watched supervisor ended.
pub enum Ended {
    Exit(ExitRecord),
    Lost(String),
}

/// Waits until the supervisor exits, then reads its exit record.
pub async fn wait(run: &Running) -> Ended {
    // SAFETY: PidFd holds an Arc of the OwnedFd, so the descriptor stays open and is not
    // replaced for as long as the AsyncFd (which owns that PidFd) exists.
    let registered = unsafe { AsyncFd::register_with_interest(PidFd(run.pidfd.clone()), Interest::READABLE) };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => {
            let e = std::io::Error::from(e);
            // Without a pollable pidfd, fall back to polling /proc.
            tracing::warn!("cannot watch supervisor {} through its pidfd: {e}", run.sup.pid);
            while sys::proc_start_ticks(run.sup.pid).ok() == Some(run.sup.start_ticks) {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    let pid = run.sup.pid;
    let run_dir = run.run_dir.clone();
    let attempt = run.sup.attempt;
    let res = tokio::task::spawn_blocking(move || read_exit(&run_dir, attempt, pid)).await;
    match res {
        Ok(Some(e)) => Ended::Exit(e),
        Ok(None) => Ended::Lost(format!(
            "supervisor (pid {pid}) exited without writing {EXIT_FILE}"
        )),
        Err(e) => Ended::Lost(format!("cannot read the exit record: {e}")),
    }
}

struct PidFd(Arc<OwnedFd>);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
