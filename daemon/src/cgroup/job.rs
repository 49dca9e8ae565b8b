//! What a job's cgroup does once made: joining it, tracking and killing what runs in it,
//! freezing it, reading back what it used, and removing it; each in the hierarchy the
//! job's [`Routing`](super::Routing) names.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::fsio::{read_pids_recursive, remove_tree, write_file};
use super::routing::{KillVia, Via};
use super::spare::Spare;
use super::{CgroupError, JobCgroup, KILL_TIMEOUT, REMOVE_TIMEOUT, Result, Stats, v1, v2};

impl JobCgroup {
    /// `cgroup.procs` of every directory, opened write-only and close-on-exec, for a
    /// forked child to join with [`join_in_child`] before it execs. Open them before
    /// forking, and join before dropping privileges.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>> {
        self.dirs
            .all()
            .into_iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }

    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy. Its
    /// existing children stay where they are.
    pub fn add_pid(&self, pid: i32) -> Result<()> {
        for d in self.dirs.all() {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in the cgroup, in any hierarchy, sorted.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for d in self.dirs.all() {
            read_pids_recursive(d, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn v1_pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for d in self.dirs.v1_all() {
            read_pids_recursive(d, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Whether any process is left in the cgroup (or a descendant), in any hierarchy.
    pub fn is_populated(&self) -> Result<bool> {
        if self.routing.tracking == Via::V2
            && let Some(u) = &self.dirs.unified
            && v2::freezer::populated(u)?
        {
            return Ok(true);
        }
        Ok(!self.v1_pids()?.is_empty())
    }

    /// Waits until the cgroup is empty; false if processes are still there after `timeout`.
    pub fn wait_empty(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_populated()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every process in the cgroup and returns once none is left: `cgroup.kill` where
    /// there is a unified cgroup (else freeze, SIGKILL each, thaw), and on v1 freeze with
    /// the freezer, SIGKILL each, thaw; repeated until the cgroup is empty, for up to
    /// [`KILL_TIMEOUT`]. Blocks.
    pub fn kill(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            if !self.is_populated()? {
                return Ok(());
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::StillPopulated {
                    path: self
                        .dirs
                        .all()
                        .first()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default(),
                    pids: self.pids().unwrap_or_default(),
                    waited: start.elapsed(),
                });
            }
            if let Some(u) = self.dirs.unified.as_deref().filter(|u| u.exists()) {
                match self.routing.kill {
                    KillVia::CgroupKill => v2::kill::kill(u)?,
                    KillVia::Freeze(Via::V2) => self.kill_frozen(u, Via::V2)?,
                    _ => {
                        let mut pids = Vec::new();
                        read_pids_recursive(u, &mut pids)?;
                        self.signal_all(&pids)?;
                    }
                }
                if self.wait_empty(Duration::from_millis(200))? {
                    return Ok(());
                }
            }
            // Processes only v1 sees (v1-only hosts, or one that left the unified cgroup).
            if !self.v1_pids()?.is_empty() {
                match self.dirs.freezer.as_deref().filter(|f| f.exists()) {
                    Some(f) => self.kill_frozen(f, Via::V1)?,
                    None => self.signal_all(&self.v1_pids()?)?,
                }
            }
            self.wait_empty(Duration::from_millis(100))?;
        }
    }

    /// Freezes the cgroup `dir` (`via` v2: cgroup.freeze, v1: the freezer), SIGKILLs
    /// everything in it (v1: in any v1 hierarchy of the job), and thaws it (frozen
    /// processes die once thawed), even on error.
    fn kill_frozen(&self, dir: &Path, via: Via) -> Result<()> {
        set_frozen_dir(dir, via, true)?;
        let pids = if via == Via::V2 {
            let mut pids = Vec::new();
            read_pids_recursive(dir, &mut pids).map(|()| pids)
        } else {
            self.v1_pids()
        };
        let r = pids.and_then(|pids| self.signal_all(&pids));
        let thaw = set_frozen_dir(dir, via, false);
        r.and(thaw)
    }

    fn signal_all(&self, pids: &[i32]) -> Result<()> {
        for &pid in pids {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => {
                    let path = self
                        .dirs
                        .all()
                        .first()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default();
                    return Err(CgroupError::Signal { path, pid, source });
                }
            }
        }
        Ok(())
    }

    /// Freezes (stops every process, which the kernel then does not schedule) or thaws the
    /// cgroup, and waits up to a second for the freeze to complete.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        let dir = match self.routing.freeze {
            Via::V2 => self.dirs.unified.as_deref(),
            Via::V1 => self.dirs.freezer.as_deref(),
            Via::None => None,
        };
        match dir {
            Some(d) => set_frozen_dir(d, self.routing.freeze, frozen),
            None => Err(CgroupError::Unsupported {
                what: "freezing",
                why: "no cgroup.freeze and no v1 freezer".to_string(),
            }),
        }
    }

    /// What the job used so far (absent files give `None`, e.g. a kernel without
    /// `memory.peak`).
    pub fn stats(&self) -> Result<Stats> {
        self.stats_raw().map(|(s, _)| s)
    }

    /// [`JobCgroup::stats`], and then [`JobCgroup::park`] on what they read (the v1 OOM
    /// count is read once, not once for each): the end of a job in its supervisor.
    pub fn finish(&mut self) -> Result<(Stats, Option<Spare>)> {
        let (s, v1_oom_kills) = self.stats_raw()?;
        Ok((s, self.park_counted(v1_oom_kills)))
    }

    /// [`JobCgroup::stats`] and the v1 memory cgroup's `oom_kill` count as read.
    fn stats_raw(&self) -> Result<(Stats, Option<u64>)> {
        let (d, r) = (&self.dirs, &self.routing);
        let mut s = Stats::default();
        let mut v1_oom_kills = None;
        match (r.memory, &d.memory, &d.unified) {
            (Via::V1, Some(m), _) => {
                s.peak_memory_bytes = v1::memory::peak(m)?;
                v1_oom_kills = v1::memory::oom_kills(m)?;
                s.oom_killed = v1_oom_kills.is_some_and(|n| n > self.base.oom_kills);
            }
            (Via::V2, _, Some(u)) => {
                s.peak_memory_bytes = v2::memory::peak(u)?;
                s.oom_killed = v2::memory::oom_killed(u)?;
            }
            _ => {}
        }
        match (r.cpu_usage, &d.cpuacct, &d.unified) {
            (Via::V1, Some(c), _) => s.cpu_usage_ms = v1::cpu::usage_ms(c)?,
            (Via::V2, _, Some(u)) => s.cpu_usage_ms = v2::cpu::usage_ms(u)?,
            _ => {}
        }
        Ok((s, v1_oom_kills))
    }

    /// Removes the cgroup in every hierarchy (and any sub-cgroups the job made), retrying
    /// for up to 2 s while exiting processes keep it busy. [`JobCgroup::kill`] it first: a
    /// cgroup with live processes cannot be removed. Read [`JobCgroup::stats`] before.
    /// Removing a cgroup that is already gone is not an error.
    pub fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut first = None;
        for d in self.dirs.all() {
            if let Err(e) = remove_tree(d, deadline) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Freezes or thaws `dir` of the hierarchy `via`.
fn set_frozen_dir(dir: &Path, via: Via, frozen: bool) -> Result<()> {
    match via {
        Via::V2 => v2::freezer::set_frozen(dir, frozen),
        _ => v1::freezer::set_frozen(dir, frozen),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::cgroup::limits::tests::{V2_ALL, fake};
    use crate::cgroup::spare::Baseline;

    #[test]
    fn stats_from_files() {
        let (_tmp, d, routing) = fake(&["memory", "cpuacct"], None, &[]);
        let m = d.memory.as_ref().unwrap();
        fs::write(m.join("memory.max_usage_in_bytes"), "123456\n").unwrap();
        fs::write(
            m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(d.cpuacct.as_ref().unwrap().join("cpuacct.usage"), "2500000000\n").unwrap();
        let job = JobCgroup {
            id: 7,
            dirs: d,
            routing,
            reuse: None,
            base: Baseline::default(),
        };
        let s = job.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                peak_memory_bytes: Some(123456),
                cpu_usage_ms: Some(2500),
                oom_killed: true
            }
        );

        let (_tmp, d, routing) = fake(&[], Some(V2_ALL), &[]);
        let u = d.unified.clone().unwrap();
        fs::write(u.join("memory.peak"), "4096\n").unwrap();
        fs::write(
            u.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 0\n",
        )
        .unwrap();
        fs::write(
            u.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n",
        )
        .unwrap();
        let job = JobCgroup {
            id: 7,
            dirs: d,
            routing,
            reuse: None,
            base: Baseline::default(),
        };
        let s = job.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                peak_memory_bytes: Some(4096),
                cpu_usage_ms: Some(1500),
                oom_killed: false
            }
        );
        // A kernel without memory.peak.
        fs::remove_file(u.join("memory.peak")).unwrap();
        assert_eq!(job.stats().unwrap().peak_memory_bytes, None);
        fs::write(u.join("cpu.stat"), "usage_usec lots\n").unwrap();
        let e = job.stats().unwrap_err().to_string();
        assert!(e.starts_with("cannot parse ") && e.contains("cpu.stat"), "{e}");
    }
}
