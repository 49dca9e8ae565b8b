//! Reusing v1 memory cgroups: a job's memory cgroup kept after it ends ([`Spare`]) and
//! renamed for the next job with the same memory limit.

use std::collections::VecDeque;
use std::fs;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::dirs::{SPARE_PREFIX, job_name, spare_name};
use super::fsio::{child_cgroups, read_opt, remove_tree};
use super::{Cgroups, JobCgroup, Limits, REMOVE_TIMEOUT, Result, v1};

/// The kernel charges memory to a v1 memory cgroup in per-CPU batches of 64 pages, so its
/// `memory.usage_in_bytes` is exact only to that much per CPU. An empty memory cgroup that
/// still shows at most this residue per CPU (charge stock, kernel objects freed a little
/// later) may serve the next job: its peak figure keeps the precision it has anyway.
const SPARE_RESIDUE_PER_CPU: u64 = 64 * 4096;

/// Spare v1 memory cgroups, oldest first, shared by clones of the driver; at most `cap`
/// (0: memory cgroups are never reused).
#[derive(Debug, Clone, Default)]
pub(super) struct SparePool(Arc<Mutex<SpareList>>);

#[derive(Debug, Default)]
struct SpareList {
    cap: usize,
    /// The most a spare may still be charged for when taken (the charge batch of every CPU).
    residue: u64,
    list: VecDeque<Spare>,
}

/// A job's v1 memory cgroup that outlived its job, to serve the next job with the same
/// memory limit instead of a new one.
///
/// Making and removing a v1 memory cgroup (two dozen control files, a css brought up and
/// taken down by kernel workers) is the costliest part of confining a short job on a
/// hybrid or v1 host, and all of it holds the kernel's global cgroup lock. A memory cgroup
/// can be renamed where a unified one cannot, so the supervisor of an ended job resets it
/// and renames `job_<id>` to `spare_<id>_<attempt>` ([`JobCgroup::park`]), and the next job
/// renames it to its own `job_<id>` ([`Cgroups::create_for`]). Only cgroups the job could
/// not write to are kept (the daemon is root and the job is not: its control files are
/// root's), only empty ones whose usage is down to the kernel's charge residue, and only
/// for a job with the same memory limit, so every control file holds what a new cgroup
/// with that limit would. The peak is reset; the OOM kill count, which cannot be, is kept
/// as a baseline the next job's count is read against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spare {
    /// Its directory name under the memory hierarchy's base (`spare_<id>_<attempt>`).
    name: String,
    /// The memory limit its control files hold.
    memory_bytes: Option<u64>,
    /// Its counters when its last job left.
    base: Baseline,
}

/// Counters of a reused cgroup that cannot be reset, as its last job left them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// `oom_kill` of `memory.oom_control`.
    pub(super) oom_kills: u64,
}

/// What [`JobCgroup::park`] needs to know: the name the memory cgroup gets, and the limit
/// it was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Reuse {
    pub spare: String,
    pub memory_bytes: Option<u64>,
}

impl Cgroups {
    /// Keeps up to `cap` memory cgroups of ended jobs for later ones ([`Spare`]); 0 (the
    /// default) makes every job's anew. Only hosts with a v1 memory hierarchy reuse them.
    pub fn set_spare_capacity(&self, cap: usize) {
        let cap = if self.base.memory.is_some() { cap } else { 0 };
        let cpus = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_CONF)
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
        pool.cap = cap;
        pool.residue = SPARE_RESIDUE_PER_CPU * cpus;
    }

    /// Takes `spare` (from an ended job's [`JobCgroup::park`]) into the pool. Returns the
    /// spare that no longer fits, the oldest, for [`Cgroups::discard_spare`] (blocking,
    /// so not done here: this only takes a lock).
    pub fn keep_spare(&self, spare: Spare) -> Option<Spare> {
        let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
        if !spare.name.starts_with(SPARE_PREFIX) || spare.name.contains('/') {
            return None;
        }
        pool.list.push_back(spare);
        (pool.list.len() > pool.cap)
            .then(|| pool.list.pop_front())
            .flatten()
    }

    /// Removes a spare memory cgroup (empty, so one rmdir). Blocking.
    pub fn discard_spare(&self, spare: &Spare) -> Result<()> {
        match &self.base.memory {
            Some(m) => remove_tree(&m.join(&spare.name), Instant::now() + REMOVE_TIMEOUT),
            None => Ok(()),
        }
    }

    /// How many spare memory cgroups the pool holds.
    pub fn spare_count(&self) -> usize {
        self.spares.0.lock().unwrap_or_else(|p| p.into_inner()).list.len()
    }

    /// Like [`Cgroups::create`], for attempt `attempt` of a job; `reusable`: the job cannot
    /// write to its cgroup (the daemon is root, the job is not), so its memory cgroup may
    /// come from the pool of spares and may go back there when it ends ([`Spare`]).
    pub fn create_for(
        &self,
        job_id: u64,
        attempt: u32,
        limits: &Limits,
        reusable: bool,
    ) -> Result<JobCgroup> {
        let Some(mem_base) = self.base.memory.as_ref().filter(|_| reusable) else {
            return self.create(job_id, limits);
        };
        let (spare, residue) = {
            let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
            let at = pool
                .list
                .iter()
                .rposition(|s| s.memory_bytes == limits.memory_bytes);
            (at.and_then(|i| pool.list.remove(i)), pool.residue)
        };
        let mut base = Baseline::default();
        let mut reused = false;
        if let Some(sp) = spare {
            let from = mem_base.join(&sp.name);
            // Checked now rather than when its job ended: the kernel objects a job leaves
            // are uncharged a moment after it (RCU), and the peak restarts from what is left.
            let clean = v1::memory::usage(&from)
                .ok()
                .flatten()
                .is_some_and(|usage| usage <= residue)
                // Writing 0 sets the peak to the current usage.
                && v1::memory::reset_peak(&from).is_ok();
            match clean.then(|| fs::rename(&from, mem_base.join(job_name(job_id)))) {
                Some(Ok(())) => {
                    base = sp.base;
                    reused = true;
                }
                // Still charged, gone (swept), or a job_<id> left by a crash: the plain way
                // below.
                _ => {
                    let _ = remove_tree(&from, Instant::now() + REMOVE_TIMEOUT);
                }
            }
        }
        let (mut job, kept) = self.create_inner(job_id, limits, reused)?;
        if kept {
            job.base = base;
        }
        job.reuse = Some(Reuse {
            spare: spare_name(job_id, attempt),
            memory_bytes: limits.memory_bytes,
        });
        Ok(job)
    }
}

impl JobCgroup {
    /// After the job ended and [`JobCgroup::kill`] and [`JobCgroup::stats`]: if this
    /// cgroup was made reusable ([`Cgroups::create_for`]) and its memory cgroup is empty
    /// and holds no more than the kernel's charge residue, resets its peak and renames it
    /// to its spare name, and returns the [`Spare`] for the daemon's pool
    /// ([`Cgroups::keep_spare`]). The rest of the cgroup is still to be removed with
    /// [`JobCgroup::remove`], which leaves the spare alone. `None`: nothing was kept, and
    /// `remove` removes all of it.
    pub fn park(&mut self) -> Option<Spare> {
        self.park_counted(None)
    }

    /// [`JobCgroup::park`]; `oom_kills`: the memory cgroup's `oom_kill` count if it was
    /// read since the job's processes were killed (else it is read here).
    pub(super) fn park_counted(&mut self, oom_kills: Option<u64>) -> Option<Spare> {
        let reuse = self.reuse.as_ref()?;
        let mem = self.dirs.memory.as_ref()?;
        // Emptied by the kill before; a job without root cannot make sub-cgroups, but a
        // cgroup is kept only if it is plainly so.
        let procs = read_opt(&mem.join("cgroup.procs")).ok()??;
        if !procs.trim().is_empty() || !child_cgroups(mem).ok()?.is_empty() {
            return None;
        }
        let oom_kills = match oom_kills {
            Some(n) => n,
            None => v1::memory::oom_kills(mem).ok()?.unwrap_or(0),
        };
        let to = mem.parent()?.join(&reuse.spare);
        fs::rename(mem, &to).ok()?;
        let spare = Spare {
            name: reuse.spare.clone(),
            memory_bytes: reuse.memory_bytes,
            base: Baseline { oom_kills },
        };
        self.dirs.memory = None;
        Some(spare)
    }
}
