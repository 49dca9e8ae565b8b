//! The native runner's mechanics: it starts a supervisor (forked by the launcher) in the
//! job's run directory, records the supervisor's identity before handing it the job,
//! watches it through a pidfd, and adopts supervisors left running by an earlier daemon.
//!
//! The daemon and a job's supervisor leave word for each other in two small files under
//! `<runtime>/supervisors/` ([`SupFiles`]), not in the run directory: they matter only while
//! the job runs and until its end is recorded, the runtime directory is a tmpfs on systemd
//! hosts (`/run/cyb`), and on the logs' disk each would cost a file creation per job. What
//! a reboot takes with that tmpfs, the record's boot id accounts for.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cyb_proto::JobRecord;
use cyb_proto::job::ProcRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::launcher::Launcher;
use super::supervisor::{ExitRecord, Launch, SupervisorRef};
use crate::backend::BackendError;
use crate::config::Config;
use crate::fsutil::{self, WriteOpts};
use crate::results::{prepare_run_dir, write_job_json};
use crate::sys;
use crate::users::Account;

/// A supervisor being watched.
pub struct Running {
    pub sup: SupervisorRef,
    pub pidfd: Arc<OwnedFd>,
    pub files: SupFiles,
}

/// The files of job `id` in the supervisors' directory ([`Config::supervisors_dir`]):
/// `<id>.json` ([`SupervisorRef`]: which supervisor runs which attempt), written by the
/// daemon before it hands that supervisor the job, and `<id>.exit.json` ([`ExitRecord`]),
/// written by the supervisor when it is done. Both are removed once the job's end is
/// durable in its record. (Supervisors started by earlier builds of cybd kept them in the run
/// directory as `supervisor.json` and `exit.json`; see [`SupFiles::legacy`].)
#[derive(Clone, Debug)]
pub struct SupFiles {
    dir: PathBuf,
    sup_name: String,
    exit_name: String,
}

impl SupFiles {
    pub fn new(cfg: &Config, id: u64) -> SupFiles {
        SupFiles {
            dir: cfg.supervisors_dir(),
            sup_name: format!("{id}.json"),
            exit_name: format!("{id}.exit.json"),
        }
    }
    /// Where a supervisor of an earlier version, still running across an upgrade, keeps them.
    fn legacy(run_dir: &Path) -> SupFiles {
        SupFiles {
            dir: run_dir.to_path_buf(),
            sup_name: "supervisor.json".into(),
            exit_name: "exit.json".into(),
        }
    }
    /// Where the supervisor writes its exit record.
    pub fn exit_path(&self) -> PathBuf {
        self.dir.join(&self.exit_name)
    }
    fn open_dir(&self) -> std::io::Result<OwnedFd> {
        fsutil::open_dir(&self.dir)
    }
    fn unlink(&self, dir: &OwnedFd) {
        for name in [&self.exit_name, &self.sup_name] {
            let _ = nix::unistd::unlinkat(dir, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
    fn read_sup(&self, attempt: u32) -> Option<SupervisorRef> {
        let dir = self.open_dir().ok()?;
        let bytes = fsutil::read_at(&dir, &self.sup_name, 64 * 1024).ok()?;
        serde_json::from_slice(&bytes)
            .ok()
            .filter(|s: &SupervisorRef| s.attempt == attempt)
    }
    /// Removes both files (blocking): once the job's end is durable, nothing reads them.
    pub fn remove(&self) {
        if let Ok(dir) = self.open_dir() {
            self.unlink(&dir);
        }
    }
}

/// Creates the supervisors' directory (mode 0700) if it is missing, and refuses one that
/// anybody but this daemon's user could change, or swap for another (blocking): exit
/// records read from it decide how jobs ended.
pub fn prepare_sup_dir(cfg: &Config) -> std::io::Result<()> {
    let dir = cfg.supervisors_dir();
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    made.map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |what: &Path, why: &str| {
        std::io::Error::other(format!(
            "refusing {} for supervisor records: {} {why}",
            dir.display(),
            what.display()
        ))
    };
    let fd = fsutil::open_dir(&dir)?;
    let st = nix::sys::stat::fstat(&fd).map_err(std::io::Error::from)?;
    if st.st_uid != me || st.st_mode & 0o022 != 0 {
        return Err(refuse(
            &dir,
            &format!("must belong to uid {me} and be writable by nobody else"),
        ));
    }
    // Every directory above it: nobody else may rename it away and put another in its place.
    for up in dir.ancestors().skip(1) {
        let st = nix::sys::stat::stat(up).map_err(std::io::Error::from)?;
        let others_write = st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0;
        if (st.st_uid != me && st.st_uid != 0) || others_write {
            return Err(refuse(
                up,
                &format!("must belong to root or uid {me} and be writable by nobody else (or sticky)"),
            ));
        }
    }
    Ok(())
}

/// Removes the files of jobs that are not running (blocking): those a daemon left when it
/// died between recording a job's end and removing them.
pub fn sweep_sup_dir(cfg: &Config, running: &std::collections::BTreeSet<u64>) {
    let Ok(entries) = std::fs::read_dir(cfg.supervisors_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let id = name.split('.').next().and_then(|n| n.parse::<u64>().ok());
        if id.is_some_and(|id| !running.contains(&id)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Running {
    pub fn proc_ref(&self) -> ProcRef {
        ProcRef {
            pid: self.sup.pid,
            start_ticks: self.sup.start_ticks,
        }
    }
}

/// Asks supervisor `sup` to cancel its job (TERM, grace, KILL), if it still runs
/// (blocking: reads /proc). The pidfd is opened first and the start time checked after, so
/// the signal cannot reach another process that reused the pid.
pub fn cancel(sup: ProcRef) -> std::io::Result<()> {
    let fd = match sys::pidfd_open(sup.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => return Err(e),
    };
    if sys::proc_start_ticks(sup.pid).ok() != Some(sup.start_ticks) {
        return Ok(());
    }
    sys::pidfd_send_signal(fd.as_raw_fd(), libc::SIGTERM)
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

/// Builds the launch description of attempt `attempt`.
/// `gpu_env` is what [`crate::host::Host::gpu_env`] gives for the job's GPUs.
pub fn launch_for(
    cfg: &Config,
    rec: &JobRecord,
    acct: &Account,
    attempt: u32,
    gpus: &[u32],
    gpu_env: Vec<(String, String)>,
) -> Result<Launch, BackendError> {
    let docker = rec.spec.docker.is_some();
    let argv = match rec.spec.argv() {
        Some(a) => a,
        // A container's command is in its create request, not here.
        None if docker => Vec::new(),
        None => {
            return Err(BackendError::WrongBackend {
                id: rec.id,
                backend: cyb_proto::spec::Backend::Native,
            });
        }
    };
    let run_dir = &rec.run_dir;
    // A container keeps its image's HOME and PATH.
    let mut env: Vec<(String, String)> = match docker {
        true => Vec::new(),
        false => vec![
            ("HOME".into(), acct.home.clone()),
            ("USER".into(), acct.name.clone()),
            ("LOGNAME".into(), acct.name.clone()),
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ],
    };
    // The job's own `env` (from cybctl: the submitter's environment) replaces the defaults;
    // what cybd sets last (its CYB_* and the GPU variables) replaces the job's, so a
    // CUDA_VISIBLE_DEVICES from the submitter's shell never names GPUs the job was not given.
    let ours = match docker {
        true => vec![
            ("CYB_JOB_ID".to_string(), rec.id.to_string()),
            (
                "CYB_ARTIFACTS_DIR".to_string(),
                crate::backend::docker::request::ARTIFACTS_MOUNT.to_string(),
            ),
            ("CYB_ATTEMPT".to_string(), attempt.to_string()),
        ],
        false => vec![
            ("CYB_JOB_ID".to_string(), rec.id.to_string()),
            ("CYB_RUN_DIR".to_string(), run_dir.clone()),
            ("CYB_ARTIFACTS_DIR".to_string(), format!("{run_dir}/artifacts")),
            ("CYB_ATTEMPT".to_string(), attempt.to_string()),
        ],
    };
    let given = rec.spec.env.iter().map(|(k, v)| (k.clone(), v.clone()));
    for (k, v) in given.chain(ours).chain(gpu_env) {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
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
        docker: None,
    })
}

/// A supervisor that is started and recorded in `<id>.json`, but not yet handed its
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
    files: SupFiles,
    rec: &JobRecord,
    launch: &Launch,
    held: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Spawned, BackendError> {
    let id = rec.id;
    let io = |path: String| move |source| BackendError::Io { id, path, source };
    let dir = prepare_run_dir(rec).map_err(io(rec.run_dir.clone()))?;
    if launch.attempt <= 1 || fsutil::open_read_at(&dir, "job.json").is_err() {
        write_job_json(&dir, rec).map_err(io(format!("{}/job.json", rec.run_dir)))?;
    }
    drop(dir);
    let sup_dir = files.open_dir().map_err(io(files.dir.display().to_string()))?;
    // An earlier attempt's files (one that failed, or was never handed its job).
    files.unlink(&sup_dir);
    // A second pipe only if the launcher took the first request without answering: a
    // supervisor it may have forked then reads the first pipe's end-of-file, records "never
    // launched" and exits.
    let mut tries = 0;
    let (started, write_end) = loop {
        tries += 1;
        let (read_end, write_end) = std::io::pipe().map_err(|e| BackendError::Supervisor {
            id,
            why: format!("cannot create a pipe: {e}"),
        })?;
        let read_end = OwnedFd::from(read_end);
        match launcher.start(
            Path::new(&rec.run_dir),
            &files.exit_path(),
            launch.attempt,
            &read_end,
            held,
        ) {
            Ok(s) => break (s, write_end),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted && tries < 2 => continue,
            Err(e) => {
                return Err(BackendError::Supervisor {
                    id,
                    why: e.to_string(),
                });
            }
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
    let opts = WriteOpts {
        mode: 0o600,
        owner: None,
        sync: false,
    };
    serde_json::to_vec(&sup)
        .map_err(std::io::Error::other)
        // Read only after a restart, and only trusted whole: the launch is sent after it.
        .and_then(|b| fsutil::write_new_at(&sup_dir, &files.sup_name, &b, opts))
        .map_err(io(files.dir.join(&files.sup_name).display().to_string()))?;
    let running = Running {
        sup,
        pidfd: Arc::new(started.pidfd),
        files,
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
/// `rebooted`: the attempt started under another boot of the host (its record's boot id),
/// so its supervisor is gone even if a process with its pid and start time exists now.
pub fn adopt(files: SupFiles, run_dir: &Path, attempt: u32, rebooted: bool) -> Adopted {
    let (files, sup) = match files.read_sup(attempt) {
        Some(sup) => (files, sup),
        None => {
            let old = SupFiles::legacy(run_dir);
            match old.read_sup(attempt) {
                Some(sup) => (old, sup),
                None if rebooted => {
                    return Adopted::Lost(
                        "the host restarted while the job ran, and its supervisor with it".into(),
                    );
                }
                // The launch is sent only after <id>.json is written.
                None => return Adopted::NeverLaunched,
            }
        }
    };
    if !rebooted
        && let Ok(fd) = sys::pidfd_open(sup.pid)
        && sys::proc_start_ticks(sup.pid).ok() == Some(sup.start_ticks)
        && !sys::is_zombie(sup.pid)
    {
        return Adopted::Alive(Running {
            sup,
            pidfd: Arc::new(fd),
            files,
        });
    }
    match read_exit(&files, attempt, sup.pid) {
        Some(e) if e.not_launched => Adopted::NeverLaunched,
        Some(e) => Adopted::Ended(e),
        None if rebooted => Adopted::Lost(format!(
            "the host restarted while the job ran, and its supervisor (pid {}) with it",
            sup.pid
        )),
        None => Adopted::Lost(format!(
            "supervisor (pid {}) of attempt {attempt} is gone and left no exit record",
            sup.pid
        )),
    }
}

/// The exit record of attempt `attempt` as written by the supervisor with pid `pid`
/// (a record left by another supervisor of the same attempt number does not count).
fn read_exit(files: &SupFiles, attempt: u32, pid: i32) -> Option<ExitRecord> {
    let dir = files.open_dir().ok()?;
    let bytes = fsutil::read_at(&dir, &files.exit_name, 1024 * 1024).ok()?;
    serde_json::from_slice::<ExitRecord>(&bytes)
        .ok()
        .filter(|e| e.attempt == attempt && e.pid == pid)
}

/// How a watched supervisor ended.
pub enum Ended {
    Exit(Box<ExitRecord>),
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
    let files = run.files.clone();
    let attempt = run.sup.attempt;
    let res = tokio::task::spawn_blocking(move || read_exit(&files, attempt, pid)).await;
    match res {
        Ok(Some(e)) => Ended::Exit(Box::new(e)),
        Ok(None) => Ended::Lost(format!(
            "supervisor (pid {pid}) exited without writing its exit record"
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;

    /// A system-mode configuration whose runtime directory is `runtime`.
    fn config(runtime: &Path) -> Config {
        let text = format!("[paths]\nruntime = \"{}\"\n", runtime.display());
        Config::parse(&text, Path::new("t.toml"), false, &|_| None).unwrap()
    }

    fn write(dir: &Path, name: &str, value: &impl Serialize) {
        std::fs::write(dir.join(name), serde_json::to_vec(value).unwrap()).unwrap();
    }

    #[test]
    fn the_supervisors_dir_is_private_and_so_is_every_directory_above_it() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(&t.path().join("run"));
        prepare_sup_dir(&cfg).unwrap();
        let mode = std::fs::metadata(cfg.supervisors_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        prepare_sup_dir(&cfg).unwrap();
        std::fs::set_permissions(cfg.supervisors_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_sup_dir(&cfg).unwrap_err().to_string();
        assert!(e.contains("writable by nobody else"), "{e}");
        assert!(e.contains(&cfg.supervisors_dir().display().to_string()), "{e}");
        std::fs::set_permissions(cfg.supervisors_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // Someone else could rename it away through a writable runtime directory...
        std::fs::set_permissions(t.path().join("run"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_sup_dir(&cfg).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} must belong", t.path().join("run").display())),
            "{e}"
        );
        // ...but not through a sticky one (/tmp, /dev/shm).
        std::fs::set_permissions(t.path().join("run"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_sup_dir(&cfg).unwrap();
    }

    #[test]
    fn files_of_a_job_are_read_by_attempt_and_supervisor_removed_and_strays_swept() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        prepare_sup_dir(&cfg).unwrap();
        let dir = cfg.supervisors_dir();
        let f = SupFiles::new(&cfg, 42);
        assert_eq!(f.exit_path(), dir.join("42.exit.json"));
        let exit = ExitRecord {
            attempt: 2,
            pid: 77,
            started: true,
            exit_code: Some(3),
            ..Default::default()
        };
        write(&dir, "42.exit.json", &exit);
        assert_eq!(read_exit(&f, 2, 77), Some(exit.clone()));
        assert_eq!(read_exit(&f, 2, 78), None, "another supervisor's record");
        assert_eq!(read_exit(&f, 1, 77), None, "another attempt's record");
        // Its supervisor (not running: pid 77's start time is not this) ended the job.
        let sup = SupervisorRef {
            attempt: 2,
            pid: 77,
            start_ticks: 1,
        };
        write(&dir, "42.json", &sup);
        assert!(matches!(adopt(f.clone(), t.path(), 2, false), Adopted::Ended(e) if e == exit));
        assert!(matches!(adopt(f.clone(), t.path(), 2, true), Adopted::Ended(e) if e == exit));
        f.remove();
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
        for name in ["5.json", "5.exit.json", "6.json", "7.exit.json", "notes"] {
            std::fs::write(dir.join(name), "{}").unwrap();
        }
        sweep_sup_dir(&cfg, &BTreeSet::from([6]));
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["6.json", "notes"]);
    }

    #[test]
    fn adoption_without_a_supervisor_file_depends_on_the_boot_and_old_run_dir_files_count() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(&t.path().join("run"));
        prepare_sup_dir(&cfg).unwrap();
        let run_dir = t.path().join("run_9");
        std::fs::create_dir(&run_dir).unwrap();
        let f = SupFiles::new(&cfg, 9);
        // Never handed its job (the daemon died before writing 9.json)...
        assert!(matches!(
            adopt(f.clone(), &run_dir, 1, false),
            Adopted::NeverLaunched
        ));
        // ...unless the attempt started under another boot, whose tmpfs took the file.
        match adopt(f.clone(), &run_dir, 1, true) {
            Adopted::Lost(why) => assert!(why.contains("host restarted"), "{why}"),
            _ => panic!("an attempt of an earlier boot without a trace must be lost"),
        }
        // A supervisor of an earlier cybd, still running across an upgrade, is found by
        // the files it keeps in the run directory: here, this very process.
        let me = std::process::id() as i32;
        let sup = SupervisorRef {
            attempt: 1,
            pid: me,
            start_ticks: sys::proc_start_ticks(me).unwrap(),
        };
        write(&run_dir, "supervisor.json", &sup);
        match adopt(f.clone(), &run_dir, 1, false) {
            Adopted::Alive(run) => {
                assert_eq!(run.sup, sup);
                assert_eq!(run.files.exit_path(), run_dir.join("exit.json"));
            }
            _ => panic!("the old supervisor was not adopted"),
        }
        // After a reboot the same pid and start time are somebody else.
        assert!(matches!(adopt(f, &run_dir, 1, true), Adopted::Lost(_)));
    }
}
