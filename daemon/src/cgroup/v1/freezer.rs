//! v1 `freezer`: `freezer.state`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cgroup::Result;
use crate::cgroup::fsio::{read_opt, write_file};

/// Freezes or thaws the freezer cgroup `dir`; a freeze waits up to a second to complete.
pub(in crate::cgroup) fn set_frozen(dir: &Path, frozen: bool) -> Result<()> {
    let state = dir.join("freezer.state");
    write_file(&state, if frozen { "FROZEN" } else { "THAWED" })?;
    if !frozen {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let done = read_opt(&state)?.is_some_and(|s| s.trim() == "FROZEN");
        // A process in uninterruptible sleep can hold off the freeze; go on regardless.
        if done || Instant::now() >= deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
