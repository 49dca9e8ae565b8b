//! The cgroup v1 controllers: one file each, holding its limit writes and stat reads.

pub(super) mod cpu;
pub(super) mod devices;
pub(super) mod freezer;
pub(super) mod memory;
pub(super) mod pids;
