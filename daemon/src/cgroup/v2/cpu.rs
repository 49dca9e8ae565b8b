//! v2 `cpu`: the quota (`cpu.max`) and CPU time used (`cpu.stat`).

use std::path::Path;

use crate::cgroup::fsio::{FileWrite, put, read_keyed};
use crate::cgroup::{CPU_PERIOD_US, Result};

/// The write for a quota of `quota` µs per [`CPU_PERIOD_US`].
pub(in crate::cgroup) fn quota_writes(dir: &Path, quota: u64, w: &mut Vec<FileWrite>) {
    w.push(put(dir, "cpu.max", format!("{quota} {CPU_PERIOD_US}")));
}

/// CPU time in ms from `usage_usec` of `cpu.stat`, which is there even without the cpu
/// controller.
pub(in crate::cgroup) fn usage_ms(dir: &Path) -> Result<Option<u64>> {
    Ok(read_keyed(&dir.join("cpu.stat"), "usage_usec")?.map(|us| us / 1000))
}
