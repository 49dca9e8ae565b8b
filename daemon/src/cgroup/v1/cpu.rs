//! v1 `cpu` (the CFS quota) and `cpuacct` (CPU time used); often co-mounted, sharing a
//! directory.

use std::path::Path;

use crate::cgroup::fsio::{FileWrite, put, read_u64};
use crate::cgroup::{CPU_PERIOD_US, Result};

/// The writes for a quota of `quota` µs per [`CPU_PERIOD_US`].
pub(in crate::cgroup) fn quota_writes(dir: &Path, quota: u64, w: &mut Vec<FileWrite>) {
    w.push(put(dir, "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
    w.push(put(dir, "cpu.cfs_quota_us", quota.to_string()));
}

/// CPU time of the cgroup in ms, from `cpuacct.usage` (ns) of the cpuacct directory `dir`.
pub(in crate::cgroup) fn usage_ms(dir: &Path) -> Result<Option<u64>> {
    Ok(read_u64(&dir.join("cpuacct.usage"))?.map(|ns| ns / 1_000_000))
}
