//! The unified (v2) hierarchy: setting up the subtree ([`setup`]), the controllers (one
//! file each, holding its limit writes and stat reads), and what the unified hierarchy
//! does without controllers: tracking and freezing (`cgroup.events`, `cgroup.freeze`),
//! killing (`cgroup.kill`) and the BPF device filter.

pub(super) mod cpu;
pub(super) mod devices;
pub(super) mod freezer;
pub(super) mod kill;
pub(super) mod memory;
pub(super) mod pids;
pub(super) mod setup;
