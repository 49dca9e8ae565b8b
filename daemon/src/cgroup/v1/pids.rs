//! v1 `pids`: the limit on processes and threads.

use std::path::Path;

use crate::cgroup::fsio::{FileWrite, put};

/// The write limiting the cgroup to `n` processes and threads.
pub(in crate::cgroup) fn limit_writes(dir: &Path, n: u64, w: &mut Vec<FileWrite>) {
    w.push(put(dir, "pids.max", n.to_string()));
}
