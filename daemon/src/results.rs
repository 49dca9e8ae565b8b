//! Results: what a run leaves behind in its run directory, whatever backend ran it.
//!
//! The run directory `<logs>/run_<id>/` is made here before any backend starts the job
//! (owned by root and the job user's group, mode 0750), with `job.json`: the accepted spec,
//! submitter and submit time. Once a job's end is durable in its record, [`record_end`]
//! writes `result.json` (how it ended, the backend, the GPUs it held by index and UUID, and
//! every artifact or clean-up error, which also go to the log), retrying while the disk is
//! full, then lets the backend drop what it kept for re-adoption, then hands the
//! completion callback (`callback_url`) to the durable outbox ([`crate::callback`]).
//!
//! At start-up, [`scan_run_dirs`] finds the directories of ids that were never recorded.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::{JobRecord, RunResult};
use serde::Serialize;
use tracing::warn;

use crate::backend::Backend;
use crate::config::Config;
use crate::fsutil::{self, WriteOpts};

/// How long a `result.json` that found the disk full waits before it is written again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

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
    let mut made = std::fs::create_dir(path);
    if let (Err(e), Some(parent)) = (&made, path.parent())
        && e.kind() == std::io::ErrorKind::NotFound
    {
        // The logs directory itself is missing (removed while the daemon ran).
        std::fs::create_dir_all(parent)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", parent.display())))?;
        made = std::fs::create_dir(path);
    }
    match made {
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
    // The run directory is open to the job's group, which may be shared ("users"): `env`
    // (the submitter's whole environment, from cybctl) keeps its names but not its values,
    // which only the owner and admins read, from the record (`cybctl show`).
    let mut spec = rec.spec.clone();
    for v in spec.env.values_mut() {
        *v = cyb_proto::spec::HIDDEN.to_string();
    }
    let jf = JobFile {
        id: rec.id,
        spec: &spec,
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

/// The run directories under `logs`: the highest id among them, and those whose id is not
/// `known` and that hold nothing but what a job's start writes before its running record
/// is durable (`job.json`, empty logs, an empty `artifacts/`). Those are left by a crash of
/// an earlier build between the two; no job ever ran in them.
pub fn scan_run_dirs(logs: &Path, known: impl Fn(u64) -> bool) -> (u64, Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(logs) else {
        return (0, Vec::new());
    };
    let mut max = 0;
    let mut orphans = Vec::new();
    for e in rd.flatten() {
        let Some(id) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("run_"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        max = max.max(id);
        if !known(id) && e.file_type().is_ok_and(|t| t.is_dir()) && only_start_files(&e.path()) {
            orphans.push(e.path());
        }
    }
    (max, orphans)
}

fn only_start_files(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().all(|e| {
        let Ok(meta) = e.path().symlink_metadata() else {
            return false;
        };
        match e.file_name().to_str() {
            Some("job.json") => meta.is_file(),
            Some("stdout.log" | "stderr.log") => meta.is_file() && meta.len() == 0,
            Some("artifacts") => {
                meta.is_dir() && std::fs::read_dir(e.path()).is_ok_and(|mut a| a.next().is_none())
            }
            _ => false,
        }
    })
}

/// Records what job `rec` (whose terminal record is durable) left behind: `result.json`,
/// retried while the disk is full, then the backend's own clean-up, then the completion
/// callback's outbox entry if the spec has `callback_url`. Errors of the attempt
/// (artifacts, cgroup clean-up) are logged here, once.
pub async fn record_end(rec: Arc<JobRecord>, backend: Option<Arc<dyn Backend>>, cfg: Arc<Config>) {
    let id = rec.id;
    if let Some(o) = rec.state.outcome() {
        for e in &o.errors {
            warn!(job_id = id, job_user = %rec.owner.user, "job {id}: {e}");
        }
    }
    let mut told = false;
    loop {
        let r = rec.clone();
        let res = tokio::task::spawn_blocking(move || write_result(&r))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match res {
            Ok(()) => break,
            // No room for it now: it is written once there is.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                if !told {
                    warn!(
                        job_id = id,
                        job_user = %rec.owner.user,
                        "cannot write result.json in {} ({e}); retrying until it is", rec.run_dir
                    );
                    told = true;
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(e) => {
                warn!(job_id = id, job_user = %rec.owner.user, "cannot write result.json in {}: {e}", rec.run_dir);
                break;
            }
        }
    }
    if let Some(b) = backend {
        b.finished(id).await;
    }
    if let Some(e) = crate::callback::Ended::of(&rec) {
        crate::callback::enqueue(&cfg, e);
    }
}
