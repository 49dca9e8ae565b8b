//! A job cgroup's making and unmaking at the driver's level: creating it with its limits,
//! adopting one after a restart, and sweeping those of jobs that are gone.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::time::Instant;

use super::dirs::{SPARE_PREFIX, parse_job_name, parse_probe_name};
use super::fsio::{FileWrite, apply_writes, remove_tree};
use super::limits::plan_limits;
use super::routing::{KillVia, Via};
use super::{CgroupError, Cgroups, JobCgroup, Limits, Mode, REMOVE_TIMEOUT, Result, SweepReport, v1};

impl Cgroups {
    /// Creates the cgroup of job `job_id` with `limits` and returns it, empty: the job's
    /// process then joins ([`JobCgroup::procs_files`] and [`join_in_child`], or
    /// [`JobCgroup::add_pid`]).
    ///
    /// A limit this host cannot enforce is an error ([`CgroupError::Unsupported`]), never
    /// silently dropped: check [`Cgroups::capabilities`] first to run without it.
    ///
    /// If the job's cgroup already exists (left by a daemon that crashed between creating
    /// it and recording the job as started, or of an earlier attempt of the job), whatever
    /// runs in it is killed and it is removed and made afresh, so the limits, the device
    /// filter and the statistics are this run's only. Use [`Cgroups::open_existing`] to
    /// adopt a job that is still meant to run.
    pub fn create(&self, job_id: u64, limits: &Limits) -> Result<JobCgroup> {
        self.create_inner(job_id, limits, false).map(|(job, _)| job)
    }

    /// [`Cgroups::create`]; `memory_made`: the job's memory directory is there already, a
    /// spare renamed for it (configured for `limits.memory_bytes`, empty, peak reset).
    /// Also returns whether that spare is still the job's memory cgroup (a left-over
    /// cgroup of the job makes all of it anew).
    pub(super) fn create_inner(
        &self,
        job_id: u64,
        limits: &Limits,
        memory_made: bool,
    ) -> Result<(JobCgroup, bool)> {
        if self.mode == Mode::None {
            return Err(CgroupError::Unavailable(self.notes.join("; ")));
        }
        let c = self.caps;
        for (asked, can, what) in [
            (limits.memory_bytes.is_some(), c.memory, "a memory limit"),
            (limits.cpus.is_some(), c.cpu, "a CPU quota"),
            (limits.pids.is_some(), c.pids, "a pids limit"),
            (limits.devices.is_some(), c.devices, "device rules"),
        ] {
            if asked && !can {
                return Err(CgroupError::Unsupported {
                    what,
                    why: self.describe(),
                });
            }
        }
        let all = self.job(job_id);
        let job = self.needed(all.clone(), limits);
        let plan = plan_limits(&job.dirs, &self.routing, limits)?;
        // Made directly; only a directory that already exists (a crash left it) costs the
        // clean-up and a second try.
        let mut spare_kept = memory_made;
        for round in 0..2 {
            let mut left_over = false;
            for d in job.dirs.all() {
                if memory_made && round == 0 && job.dirs.memory.as_deref() == Some(d) {
                    continue;
                }
                match fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && round == 0 => {
                        left_over = true;
                        break;
                    }
                    Err(source) => {
                        let _ = job.remove();
                        return Err(CgroupError::Create {
                            path: d.to_path_buf(),
                            source,
                        });
                    }
                }
            }
            if !left_over {
                break;
            }
            spare_kept = false;
            all.kill()?;
            all.remove()?;
        }
        if let Err(e) = self.configure(&job, &plan, limits) {
            let _ = job.remove();
            return Err(e);
        }
        Ok((job, spare_kept))
    }

    /// `job` in only the hierarchies it needs: each cgroup directory costs a mkdir, its
    /// writes and an rmdir per job, which is most of what confining a short job costs.
    /// With a unified hierarchy, tracking, kill (`cgroup.kill` or `cgroup.freeze`), CPU
    /// time (`cpu.stat`) and the BPF device filter are all there, so the v1 cpuacct,
    /// freezer and devices directories are not needed; the v1 cpu and pids directories
    /// are made only for a job with a CPU quota or a pids limit. Memory stays, for the
    /// peak and OOM accounting.
    fn needed(&self, mut job: JobCgroup, limits: &Limits) -> JobCgroup {
        let (d, r) = (&mut job.dirs, &self.routing);
        if r.cpu_usage != Via::V1 {
            d.cpuacct = None;
        }
        if r.freeze != Via::V1 && r.kill != KillVia::Freeze(Via::V1) {
            d.freezer = None;
        }
        if r.devices != Via::V1 {
            d.devices = None;
        }
        if limits.cpus.is_none() || r.cpu != Via::V1 {
            d.cpu = None;
        }
        if limits.pids.is_none() || r.pids != Via::V1 {
            d.pids = None;
        }
        job
    }

    fn configure(&self, job: &JobCgroup, plan: &[FileWrite], limits: &Limits) -> Result<()> {
        apply_writes(plan)?;
        if limits.memory_bytes.is_some()
            && self.routing.memory == Via::V1
            && let Some(m) = &job.dirs.memory
        {
            v1::memory::enable_oom_killer(m)?;
        }
        if let Some(allow) = &limits.devices
            && self.routing.devices == Via::V2
            && let Some(u) = &job.dirs.unified
        {
            self.programs.attach(u, &allow.effective())?;
        }
        Ok(())
    }

    /// The cgroup of job `job_id` if it exists in any hierarchy (a job still running
    /// after a daemon restart, to adopt), without touching it.
    pub fn open_existing(&self, job_id: u64) -> Option<JobCgroup> {
        if self.mode == Mode::None {
            return None;
        }
        let mut job = self.job(job_id);
        // Only the hierarchies it was made in (see `needed`).
        job.dirs.keep_existing();
        job.exists().then_some(job)
    }

    /// Kills and removes the cgroup of every job for which `keep(id)` is false (jobs that
    /// are no longer running; after a daemon was killed and restarted), and leftover probe
    /// cgroups of other processes. Errors are collected, not fatal.
    pub fn sweep_stale(&self, keep: &dyn Fn(u64) -> bool) -> SweepReport {
        let mut report = SweepReport::default();
        let mut ids = BTreeSet::new();
        let mut probes = BTreeSet::new();
        let mut spares = BTreeSet::new();
        for dir in self.base.all() {
            let Ok(entries) = fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(id) = parse_job_name(name) {
                    ids.insert(id);
                } else if name.starts_with(SPARE_PREFIX) {
                    // The pool lives in the daemon's memory: a new daemon starts without.
                    spares.insert(dir.join(name));
                } else if parse_probe_name(name).is_some_and(|pid| pid != std::process::id()) {
                    probes.insert(name.to_string());
                }
            }
        }
        for id in ids {
            if keep(id) {
                report.kept.push(id);
                continue;
            }
            let job = self.job(id);
            match job.kill().and_then(|()| job.remove()) {
                Ok(()) => report.removed.push(id),
                Err(e) => report.failed.push((id, e)),
            }
        }
        for name in probes {
            let probe = self.handle(0, self.base.join(&name));
            let _ = probe.kill().and_then(|()| probe.remove());
        }
        for dir in spares {
            let _ = remove_tree(&dir, Instant::now() + REMOVE_TIMEOUT);
        }
        report
    }

    /// Removes the subtree's base directories, if no job cgroup is left in them (for tests
    /// and uninstalling; the daemon keeps its base).
    pub fn remove_base(&self) -> Result<()> {
        for d in self.base.all() {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(CgroupError::Remove {
                        path: d.to_path_buf(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}
