//! The hybrid choice, made once: which hierarchy serves each job operation on this host.
//!
//! [`super::Cgroups::detect`] fills a [`Routing`] from what it found (the v1 controllers
//! mounted, the controllers the unified base gives its children, whether the BPF device
//! filter loads, whether `cgroup.kill` and `cgroup.freeze` exist); every job carries a
//! copy, and creating, limiting, killing, freezing and reading back a job consult it
//! rather than look again.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::dirs::{Dirs, V2Controllers};

/// Which hierarchy serves an operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Via {
    /// A cgroup v1 controller hierarchy.
    V1,
    /// The unified (v2) hierarchy.
    V2,
    /// Nothing here: the operation is not available.
    #[default]
    None,
}

/// How [`super::JobCgroup::kill`] kills a whole cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KillVia {
    /// Writing `cgroup.kill` (unified, kernel ≥ 5.14).
    CgroupKill,
    /// Freezing (`cgroup.freeze` or the v1 freezer), SIGKILL to each process, thawing.
    Freeze(Via),
    /// SIGKILL to each process, repeated until none is left.
    #[default]
    Signal,
}

/// Which hierarchy serves each operation on a job, decided once at detection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// Memory limit, peak and OOM kills.
    pub memory: Via,
    /// CPU quota.
    pub cpu: Via,
    /// CPU time used: v1 `cpuacct.usage` or v2 `cpu.stat` (there without the controller).
    pub cpu_usage: Via,
    /// Pids limit.
    pub pids: Via,
    /// Device rules: the v1 devices controller or the v2 BPF device filter.
    pub devices: Via,
    pub kill: KillVia,
    pub freeze: Via,
    /// Whether processes are left: v2 `cgroup.events` (and the v1 `cgroup.procs` for any
    /// process only v1 sees), or v1 `cgroup.procs`.
    pub tracking: Via,
}

/// What detection found in the driver's base directories.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Found {
    /// Controllers the unified base gives its children.
    pub v2: V2Controllers,
    /// The BPF device filter loads.
    pub bpf: bool,
    /// The unified base has `cgroup.kill`.
    pub cgroup_kill: bool,
    /// The unified base has `cgroup.freeze`.
    pub cgroup_freeze: bool,
}

impl Routing {
    /// The routing for a driver whose base directories are `base`: v1 controllers where
    /// they are mounted (a controller is in one hierarchy only), else the unified one where
    /// it has the controller; everything the unified hierarchy does without controllers
    /// (tracking, kill, freeze, device filter, CPU time) from it where it is there.
    pub(super) fn from_base(base: &Dirs, found: Found) -> Routing {
        let unified = base.unified.is_some();
        let pick = |v1: bool, v2: bool| match (v1, unified && v2) {
            (true, _) => Via::V1,
            (false, true) => Via::V2,
            (false, false) => Via::None,
        };
        let freeze = if unified && found.cgroup_freeze {
            Via::V2
        } else if base.freezer.is_some() {
            Via::V1
        } else {
            Via::None
        };
        Routing {
            memory: pick(base.memory.is_some(), found.v2.memory),
            cpu: pick(base.cpu.is_some(), found.v2.cpu),
            cpu_usage: if unified {
                Via::V2
            } else if base.cpuacct.is_some() {
                Via::V1
            } else {
                Via::None
            },
            pids: pick(base.pids.is_some(), found.v2.pids),
            devices: if unified && found.bpf {
                Via::V2
            } else if base.devices.is_some() {
                Via::V1
            } else {
                Via::None
            },
            kill: Routing::kill_via(unified && found.cgroup_kill, freeze),
            freeze,
            tracking: if unified { Via::V2 } else { Via::V1 },
        }
    }

    /// `cgroup.kill` if `cgroup_kill`, else by freezing where that is possible.
    pub(super) fn kill_via(cgroup_kill: bool, freeze: Via) -> KillVia {
        match (cgroup_kill, freeze) {
            (true, _) => KillVia::CgroupKill,
            (false, Via::None) => KillVia::Signal,
            (false, via) => KillVia::Freeze(via),
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::V1 => "v1",
            Via::V2 => "v2",
            Via::None => "none",
        })
    }
}

impl fmt::Display for KillVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillVia::CgroupKill => f.write_str("v2 cgroup.kill"),
            KillVia::Freeze(via) => write!(f, "{via} freezer"),
            KillVia::Signal => f.write_str("signals"),
        }
    }
}

impl fmt::Display for Routing {
    /// E.g. "memory v1, cpu v1, cpu time v2, pids v1, devices v2, kill v2 cgroup.kill,
    /// freeze v2, tracking v2".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory {}, cpu {}, cpu time {}, pids {}, devices {}, kill {}, freeze {}, tracking {}",
            self.memory,
            self.cpu,
            self.cpu_usage,
            self.pids,
            self.devices,
            self.kill,
            self.freeze,
            self.tracking
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn hybrid_v1_and_v2_routes() {
        let p = |s: &str| Some(PathBuf::from(s));
        let v1 = Dirs {
            memory: p("/m"),
            cpu: p("/c"),
            cpuacct: p("/c"),
            pids: p("/p"),
            devices: p("/d"),
            freezer: p("/f"),
            ..Dirs::default()
        };
        let r = Routing::from_base(&v1, Found::default());
        assert_eq!(
            r.to_string(),
            "memory v1, cpu v1, cpu time v1, pids v1, devices v1, kill v1 freezer, freeze v1, tracking v1"
        );
        let hybrid = Dirs {
            unified: p("/u"),
            ..v1
        };
        let found = Found {
            bpf: true,
            cgroup_kill: true,
            cgroup_freeze: true,
            ..Found::default()
        };
        let r = Routing::from_base(&hybrid, found);
        assert_eq!(
            r.to_string(),
            "memory v1, cpu v1, cpu time v2, pids v1, devices v2, kill v2 cgroup.kill, freeze v2, tracking v2"
        );
        let v2 = Dirs {
            unified: p("/u"),
            ..Dirs::default()
        };
        let found = Found {
            v2: V2Controllers {
                memory: true,
                cpu: false,
                pids: true,
            },
            cgroup_freeze: true,
            ..Found::default()
        };
        let r = Routing::from_base(&v2, found);
        assert_eq!(
            r.to_string(),
            "memory v2, cpu none, cpu time v2, pids v2, devices none, kill v2 freezer, freeze v2, tracking v2"
        );
    }
}
