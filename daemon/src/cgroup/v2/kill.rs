//! v2 `cgroup.kill` (kernel ≥ 5.14): SIGKILL to everything in a cgroup and below, with no
//! race against forks.

use std::path::Path;

use crate::cgroup::Result;
use crate::cgroup::fsio::write_file;

/// Kills everything in the unified cgroup `dir`.
pub(in crate::cgroup) fn kill(dir: &Path) -> Result<()> {
    write_file(&dir.join("cgroup.kill"), "1")
}
