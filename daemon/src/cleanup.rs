//! Cleanup: removing ended jobs for good, their record `<spool>/jobs/<id>.json` and their run
//! directory `<logs>/run_<id>/`, so that a crash at any instant leaves each job either whole
//! (record and run directory) or gone, and no id is ever given out again.
//!
//! The scheduler decides which jobs go (`scheduler/clean.rs`); this does the file-system
//! work, off the async runtime, one batch at a time, in this order:
//!
//! 1. the high-water mark `jobs/max_id` is made durable at or above every id handed out, so
//!    that removing the newest records cannot make a restarted daemon give their ids again;
//! 2. each run directory is renamed to its tombstone `<logs>/run_<id>.removing`, then the
//!    logs directory is fsynced: from here on the job is being removed;
//! 3. each record is unlinked, then the records' directory is fsynced;
//! 4. the tombstones are removed (and the job's delivered callback entry).
//!
//! A job whose rename or unlink fails is put back whole and reported as kept. At start-up,
//! before the store is read, [`finish_interrupted`] finishes what a crash interrupted: for
//! each tombstone it unlinks the record (if still there), fsyncs, and removes the tree. A
//! record without its run directory never occurs: the rename is durable before the unlink.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cyb_proto::JobId;
use nix::unistd::UnlinkatFlags;
use tracing::{info, warn};

use crate::config::Paths;
use crate::fsutil;

/// The suffix of a run directory being removed.
pub const TOMBSTONE: &str = ".removing";

/// The name of the high-water mark file in the records' directory.
pub const HIGH_WATER: &str = "max_id";

/// One batch at a time: the high-water mark is only ever raised, and tombstones of two
/// batches never meet.
static BATCH: Mutex<()> = Mutex::new(());

/// A job to remove: its id and its run directory as its record names it.
#[derive(Clone, Debug)]
pub struct Doomed {
    pub id: JobId,
    pub run_dir: PathBuf,
}

/// The tombstone of job `id`'s run directory.
pub fn tombstone(logs: &Path, id: JobId) -> PathBuf {
    logs.join(format!("run_{id}{TOMBSTONE}"))
}

/// The id of a tombstone's file name (`run_<id>.removing`).
fn tombstone_id(name: &str) -> Option<JobId> {
    name.strip_prefix("run_")?.strip_suffix(TOMBSTONE)?.parse().ok()
}

/// Reads the high-water mark in `jobs` (0 when there is none).
pub fn read_high_water(jobs: &Path) -> JobId {
    std::fs::read_to_string(jobs.join(HIGH_WATER))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes the high-water mark in `jobs` durable at `max` or above (never lowered).
pub fn raise_high_water(jobs: &Path, max: JobId) -> io::Result<()> {
    let max = max.max(read_high_water(jobs));
    let dir = fsutil::open_dir(jobs)?;
    fsutil::write_at(
        &dir,
        HIGH_WATER,
        format!("{max}\n").as_bytes(),
        fsutil::WriteOpts {
            mode: 0o644,
            sync: true,
            ..Default::default()
        },
    )?;
    fsutil::sync_dir(&dir)
}

fn unlink(dir: &std::os::fd::OwnedFd, name: &str) -> io::Result<()> {
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes `jobs` as the module's doc says (blocking). `high_water` is the highest id handed
/// out so far. Returns, per job, whether it is gone (`Ok`) or kept whole (`Err`, why).
pub fn remove(paths: &Paths, doomed: Vec<Doomed>, high_water: JobId) -> Vec<(JobId, Result<(), String>)> {
    let _one = BATCH.lock().unwrap_or_else(|p| p.into_inner());
    let jobs_path = paths.jobs();
    if let Err(e) = raise_high_water(&jobs_path, high_water) {
        let why = format!(
            "cannot record the highest job id in {}: {e}",
            jobs_path.join(HIGH_WATER).display()
        );
        return doomed.into_iter().map(|d| (d.id, Err(why.clone()))).collect();
    }
    let dirs = fsutil::open_dir(&jobs_path).and_then(|j| Ok((j, fsutil::open_dir(&paths.logs)?)));
    let (jobs, logs) = match dirs {
        Ok(d) => d,
        Err(e) => {
            let why = format!(
                "cannot open {} or {}: {e}",
                jobs_path.display(),
                paths.logs.display()
            );
            return doomed.into_iter().map(|d| (d.id, Err(why.clone()))).collect();
        }
    };
    let mut out = Vec::with_capacity(doomed.len());
    // 2. Tombstones.
    let mut marked: Vec<(Doomed, Option<PathBuf>)> = Vec::with_capacity(doomed.len());
    let mut other_parents: Vec<PathBuf> = Vec::new();
    for d in doomed {
        let grave = tombstone(&paths.logs, d.id);
        match std::fs::rename(&d.run_dir, &grave) {
            Ok(()) => {
                if let Some(p) = d.run_dir.parent()
                    && p != paths.logs
                    && !other_parents.iter().any(|o| o == p)
                {
                    other_parents.push(p.to_path_buf());
                }
                marked.push((d, Some(grave)));
            }
            // Never made (a job cancelled before it ran whose result.json failed).
            Err(e) if e.kind() == io::ErrorKind::NotFound => marked.push((d, None)),
            Err(e) => out.push((
                d.id,
                Err(format!(
                    "cannot rename {} to {}: {e}",
                    d.run_dir.display(),
                    grave.display()
                )),
            )),
        }
    }
    let mut synced = fsutil::sync_dir(&logs);
    for p in &other_parents {
        synced = synced.and_then(|()| fsutil::sync_dir(&fsutil::open_dir(p)?));
    }
    if let Err(e) = synced {
        // Not known to be durable: put every tombstone back.
        let why = format!("cannot fsync {}: {e}", paths.logs.display());
        for (d, grave) in marked {
            if let Some(g) = grave
                && let Err(e) = std::fs::rename(&g, &d.run_dir)
            {
                warn!(job_id = d.id, "cannot rename {} back: {e}", g.display());
            }
            out.push((d.id, Err(why.clone())));
        }
        return out;
    }
    // 3. Records.
    let mut unlinked = Vec::with_capacity(marked.len());
    for (d, grave) in marked {
        match unlink(&jobs, &format!("{}.json", d.id)) {
            Ok(()) => unlinked.push((d, grave)),
            Err(e) => {
                if let Some(g) = &grave
                    && let Err(e) = std::fs::rename(g, &d.run_dir)
                {
                    warn!(job_id = d.id, "cannot rename {} back: {e}", g.display());
                }
                out.push((
                    d.id,
                    Err(format!(
                        "cannot remove {}: {e}",
                        jobs_path.join(format!("{}.json", d.id)).display()
                    )),
                ));
            }
        }
    }
    if let Err(e) = fsutil::sync_dir(&jobs) {
        // The records are gone from the directory but maybe not from the disk: the
        // tombstones stay for the next start-up to finish with.
        warn!(
            "cannot fsync {} ({e}); the run directories of removed jobs are left as *{TOMBSTONE} until cybd starts again",
            jobs_path.display()
        );
        out.extend(unlinked.into_iter().map(|(d, _)| (d.id, Ok(()))));
        return out;
    }
    // 4. Trees.
    for (d, grave) in unlinked {
        if let Some(g) = grave
            && let Err(e) = std::fs::remove_dir_all(&g)
        {
            warn!(job_id = d.id, "cannot remove {}: {e}", g.display());
        }
        crate::callback::outbox::forget(paths, d.id);
        out.push((d.id, Ok(())));
    }
    out
}

/// Finishes the removals a crash interrupted (blocking; at start-up, before the store is
/// read): for each tombstone in `<logs>`, its record is unlinked and the tree removed.
/// Returns how many were finished.
pub fn finish_interrupted(paths: &Paths) -> usize {
    let _one = BATCH.lock().unwrap_or_else(|p| p.into_inner());
    let Ok(rd) = std::fs::read_dir(&paths.logs) else {
        return 0;
    };
    let graves: Vec<(JobId, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((tombstone_id(e.file_name().to_str()?)?, e.path())))
        .collect();
    if graves.is_empty() {
        return 0;
    }
    let jobs_path = paths.jobs();
    let jobs = match fsutil::open_dir(&jobs_path) {
        Ok(j) => j,
        Err(e) => {
            warn!("cannot open {} to finish removing jobs: {e}", jobs_path.display());
            return 0;
        }
    };
    let mut ok = Vec::new();
    for (id, grave) in graves {
        match unlink(&jobs, &format!("{id}.json")) {
            Ok(()) => ok.push((id, grave)),
            Err(e) => warn!(
                job_id = id,
                "cannot remove the record of job {id}, which was being removed: {e}"
            ),
        }
    }
    if let Err(e) = fsutil::sync_dir(&jobs) {
        warn!("cannot fsync {}: {e}", jobs_path.display());
        return 0;
    }
    for (id, grave) in &ok {
        if let Err(e) = std::fs::remove_dir_all(grave) {
            warn!(job_id = id, "cannot remove {}: {e}", grave.display());
        }
        crate::callback::outbox::forget(paths, *id);
    }
    if !ok.is_empty() {
        info!(
            "finished removing {} job(s) whose removal was interrupted",
            ok.len()
        );
    }
    ok.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(root: &Path) -> Paths {
        let p = Paths {
            spool: root.join("spool"),
            logs: root.join("logs"),
            socket: root.join("s.sock"),
            runtime: root.join("run"),
        };
        std::fs::create_dir_all(p.jobs()).unwrap();
        std::fs::create_dir_all(&p.logs).unwrap();
        p
    }

    fn job(p: &Paths, id: JobId) -> Doomed {
        std::fs::write(p.jobs().join(format!("{id}.json")), b"{}").unwrap();
        let run = p.run_dir(id);
        std::fs::create_dir_all(run.join("artifacts")).unwrap();
        std::fs::write(run.join("stdout.log"), b"out").unwrap();
        Doomed { id, run_dir: run }
    }

    #[test]
    fn removal_takes_record_and_run_dir_and_raises_the_mark() {
        let t = tempfile::tempdir().unwrap();
        let p = paths(t.path());
        let a = job(&p, 1);
        let b = job(&p, 2);
        let keep = job(&p, 3);
        let mut never_ran = job(&p, 4);
        std::fs::remove_dir_all(&never_ran.run_dir).unwrap();
        never_ran.run_dir = p.run_dir(4);
        let res = remove(&p, vec![a, b, never_ran], 9);
        assert!(res.iter().all(|(_, r)| r.is_ok()), "{res:?}");
        for id in [1, 2, 4] {
            assert!(!p.jobs().join(format!("{id}.json")).exists());
            assert!(!p.run_dir(id).exists());
            assert!(!tombstone(&p.logs, id).exists());
        }
        assert!(p.jobs().join("3.json").exists() && keep.run_dir.exists());
        assert_eq!(read_high_water(&p.jobs()), 9);
        // Never lowered.
        raise_high_water(&p.jobs(), 5).unwrap();
        assert_eq!(read_high_water(&p.jobs()), 9);
    }

    #[test]
    fn an_interrupted_removal_is_finished_at_start_up() {
        let t = tempfile::tempdir().unwrap();
        let p = paths(t.path());
        // Stopped after the rename: record and tombstone.
        let a = job(&p, 1);
        std::fs::rename(&a.run_dir, tombstone(&p.logs, 1)).unwrap();
        // Stopped after the unlink: a tombstone alone.
        let b = job(&p, 2);
        std::fs::rename(&b.run_dir, tombstone(&p.logs, 2)).unwrap();
        std::fs::remove_file(p.jobs().join("2.json")).unwrap();
        let c = job(&p, 3);
        assert_eq!(finish_interrupted(&p), 2);
        for id in [1, 2] {
            assert!(!p.jobs().join(format!("{id}.json")).exists());
            assert!(!tombstone(&p.logs, id).exists());
        }
        assert!(p.jobs().join("3.json").exists() && c.run_dir.exists());
        assert_eq!(tombstone_id("run_12.removing"), Some(12));
        assert_eq!(tombstone_id("run_12"), None);
    }
}
