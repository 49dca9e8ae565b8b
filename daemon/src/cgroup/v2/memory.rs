//! v2 `memory`: `memory.max` with no swap and the whole job killed on OOM
//! (`memory.oom.group`); peak (`memory.peak`) and OOM kills (`memory.events`) read back.

use std::path::Path;

use crate::cgroup::Result;
use crate::cgroup::fsio::{FileWrite, put, put_if_present, read_keyed, read_u64};

/// The writes that limit memory (no swap) to `bytes`.
pub(in crate::cgroup) fn limit_writes(dir: &Path, bytes: u64, w: &mut Vec<FileWrite>) {
    w.push(put(dir, "memory.max", bytes.to_string()));
    w.push(put_if_present(dir, "memory.swap.max", "0"));
    w.push(put_if_present(dir, "memory.oom.group", "1"));
}

/// `memory.peak` (kernel ≥ 5.19; `None` before).
pub(in crate::cgroup) fn peak(dir: &Path) -> Result<Option<u64>> {
    read_u64(&dir.join("memory.peak"))
}

/// Whether the OOM killer struck (`oom_kill` of `memory.events` > 0).
pub(in crate::cgroup) fn oom_killed(dir: &Path) -> Result<bool> {
    Ok(read_keyed(&dir.join("memory.events"), "oom_kill")?.is_some_and(|n| n > 0))
}
