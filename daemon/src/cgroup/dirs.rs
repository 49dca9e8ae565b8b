//! Where a cgroup is: its directory in each hierarchy the driver uses, and the names of
//! the directories under the driver's base (`job_<id>`, `probe_<pid>_<n>`, `spare_...`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CgroupError, DAEMON_LEAF, Result};

pub(super) const JOB_PREFIX: &str = "job_";
pub(super) const PROBE_PREFIX: &str = "probe_";
/// A v1 memory cgroup kept for the next job ([`super::Spare`]).
pub(super) const SPARE_PREFIX: &str = "spare_";

/// v2 controllers enabled for the children of a cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct V2Controllers {
    pub memory: bool,
    pub cpu: bool,
    pub pids: bool,
}

/// One cgroup (a base, a job or a probe) as directories in each hierarchy the driver uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Dirs {
    pub unified: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub pids: Option<PathBuf>,
    pub devices: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
}

impl Dirs {
    fn v1_fields(&self) -> [&Option<PathBuf>; 6] {
        [
            &self.memory,
            &self.cpu,
            &self.cpuacct,
            &self.pids,
            &self.devices,
            &self.freezer,
        ]
    }

    pub fn join(&self, name: &str) -> Dirs {
        let j = |d: &Option<PathBuf>| d.as_ref().map(|d| d.join(name));
        Dirs {
            unified: j(&self.unified),
            memory: j(&self.memory),
            cpu: j(&self.cpu),
            cpuacct: j(&self.cpuacct),
            pids: j(&self.pids),
            devices: j(&self.devices),
            freezer: j(&self.freezer),
        }
    }

    /// Every distinct v1 directory (co-mounted controllers share one).
    pub fn v1_all(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for d in self.v1_fields().into_iter().flatten() {
            if !out.contains(&d.as_path()) {
                out.push(d);
            }
        }
        out
    }

    /// Every distinct directory, the unified one first.
    pub fn all(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = self.unified.as_deref().into_iter().collect();
        out.extend(self.v1_all());
        out
    }

    pub fn is_empty(&self) -> bool {
        self.all().is_empty()
    }

    /// Forgets the directories that do not exist.
    pub fn keep_existing(&mut self) {
        for dir in [
            &mut self.unified,
            &mut self.memory,
            &mut self.cpu,
            &mut self.cpuacct,
            &mut self.pids,
            &mut self.devices,
            &mut self.freezer,
        ] {
            if dir.as_ref().is_some_and(|p| !p.exists()) {
                *dir = None;
            }
        }
    }
}

pub(super) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name != DAEMON_LEAF
        && !name.contains('/')
        && !name.contains('\0')
        && !name.starts_with(JOB_PREFIX)
        && !name.starts_with(PROBE_PREFIX)
        && !name.starts_with(SPARE_PREFIX)
        && !name.starts_with("cgroup.");
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

pub(super) fn job_name(job_id: u64) -> String {
    format!("{JOB_PREFIX}{job_id}")
}

/// The job id in a directory name `job_<id>`, written exactly as [`job_name`] writes it.
pub(super) fn parse_job_name(name: &str) -> Option<u64> {
    let id: u64 = name.strip_prefix(JOB_PREFIX)?.parse().ok()?;
    (job_name(id) == name).then_some(id)
}

/// The name job `job_id`'s memory cgroup gets as a spare after attempt `attempt`: unique,
/// as job ids are never reused.
pub(super) fn spare_name(job_id: u64, attempt: u32) -> String {
    format!("{SPARE_PREFIX}{job_id}_{attempt}")
}

/// The pid in a probe directory name `probe_<pid>_<n>`.
pub(super) fn parse_probe_name(name: &str) -> Option<u32> {
    name.strip_prefix(PROBE_PREFIX)?.split_once('_')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_job_name("job_42"), Some(42));
        for bad in ["job_", "job_042", "job_+4", "job_x", "jobs_4", "probe_1_2"] {
            assert_eq!(parse_job_name(bad), None, "{bad}");
        }
        assert_eq!(parse_probe_name("probe_123_0"), Some(123));
        for bad in ["", "..", ".", "a/b", "daemon", "job_1", "probe_x", "cgroup.procs"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("cybd").unwrap();
    }
}
