//! v1 `memory`: the limit (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`), the
//! OOM killer switch, and peak use and OOM kills read back; also what reusing a memory
//! cgroup ([`crate::cgroup::Spare`]) reads and resets.

use std::path::Path;

use crate::cgroup::Result;
use crate::cgroup::fsio::{FileWrite, put, put_if_present, read_keyed, read_u64, write_file};

/// The writes that limit memory and swap together to `bytes`.
pub(in crate::cgroup) fn limit_writes(dir: &Path, bytes: u64, w: &mut Vec<FileWrite>) {
    let n = bytes.to_string();
    // limit_in_bytes first: memsw may never be below it.
    w.push(put(dir, "memory.limit_in_bytes", n.clone()));
    w.push(put_if_present(dir, "memory.memsw.limit_in_bytes", n));
}

/// v1 copies `oom_kill_disable` from the parent; a job hitting its limit with the killer
/// off would hang instead of ending. Switches it on if it is off.
pub(in crate::cgroup) fn enable_oom_killer(dir: &Path) -> Result<()> {
    let f = dir.join("memory.oom_control");
    if read_keyed(&f, "oom_kill_disable")? == Some(1) {
        write_file(&f, "0")?;
    }
    Ok(())
}

/// `memory.max_usage_in_bytes`.
pub(in crate::cgroup) fn peak(dir: &Path) -> Result<Option<u64>> {
    read_u64(&dir.join("memory.max_usage_in_bytes"))
}

/// `oom_kill` of `memory.oom_control`: how often the OOM killer struck in the cgroup's life.
pub(in crate::cgroup) fn oom_kills(dir: &Path) -> Result<Option<u64>> {
    read_keyed(&dir.join("memory.oom_control"), "oom_kill")
}

/// `memory.usage_in_bytes`.
pub(in crate::cgroup) fn usage(dir: &Path) -> Result<Option<u64>> {
    read_u64(&dir.join("memory.usage_in_bytes"))
}

/// Sets the peak to the current usage (writing 0 to `memory.max_usage_in_bytes`).
pub(in crate::cgroup) fn reset_peak(dir: &Path) -> Result<()> {
    write_file(&dir.join("memory.max_usage_in_bytes"), "0")
}
