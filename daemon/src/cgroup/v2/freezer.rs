//! v2 freezing (`cgroup.freeze`, done when `cgroup.events` says `frozen 1`) and tracking
//! (`populated` of `cgroup.events`), both core files of every unified cgroup.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cgroup::Result;
use crate::cgroup::fsio::{read_keyed, write_file};

/// Freezes or thaws the unified cgroup `dir`; a freeze waits up to a second to complete.
pub(in crate::cgroup) fn set_frozen(dir: &Path, frozen: bool) -> Result<()> {
    write_file(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    if !frozen {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let done = read_keyed(&dir.join("cgroup.events"), "frozen")? == Some(1);
        // A process in uninterruptible sleep can hold off the freeze; go on regardless.
        if done || Instant::now() >= deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process is left in `dir` or below (`populated` of `cgroup.events`).
pub(in crate::cgroup) fn populated(dir: &Path) -> Result<bool> {
    Ok(read_keyed(&dir.join("cgroup.events"), "populated")?.is_some_and(|n| n > 0))
}
