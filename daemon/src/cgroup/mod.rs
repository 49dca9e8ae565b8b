//! The cgroup driver: confines each job in a cgroup of its own, enforces its limits
//! (memory, CPU quota, pids, device access), kills all of it at once, and reads back what it
//! used.
//!
//! # Where the cgroups are
//!
//! [`Cgroups::detect`] finds the cgroup mounts and this process's own cgroup in each
//! hierarchy (`/proc/self/mountinfo`, `/proc/self/cgroup`; see [`parse_mountinfo`] and
//! [`resolve`]) and roots a subtree `<own>/<base>/` there; job `N` lives in
//! `<own>/<base>/job_N/` in every hierarchy the driver uses. Under systemd `<own>` is the
//! service's cgroup, which `Delegate=yes` hands to the daemon.
//!
//! - **v2** (unified hierarchy with controllers): cgroup v2 forbids processes in a cgroup
//!   whose children get controllers ("no internal processes"). So `memory`, `cpu` and
//!   `pids` (those of them in `<own>/cgroup.controllers`) are enabled in
//!   `<own>/cgroup.subtree_control` and `<own>/<base>/cgroup.subtree_control`, and when
//!   `<own>` holds the daemon itself, the daemon first moves into the leaf
//!   `<own>/daemon/` ([`DAEMON_LEAF`]). If our own cgroup is already named `daemon` (a
//!   unit with `DelegateSubgroup=daemon`, which systemd ≥ 254 offers, or a re-executed
//!   daemon) its parent is taken as `<own>`. When `<own>` holds other processes too (run
//!   from a login shell, whose session scope holds the shell; run by `cargo test`), the
//!   daemon leaves them be and roots its subtree at the top of the unified mount instead
//!   (`/sys/fs/cgroup/<base>/`), if it may; otherwise jobs are still tracked, killed and
//!   device-filtered under `<own>`, but the limits are reported as not enforced.
//!   With controllers enabled in the service's cgroup, systemd cannot start a new main
//!   process in it while jobs still run below it (a restart with `KillMode=process` fails
//!   with status 219/CGROUP): the unit wants `DelegateSubgroup=daemon`.
//! - **v1**: `<own>/<base>/job_N/` in each of the memory, cpu, cpuacct, pids, devices and
//!   freezer hierarchies that is mounted (co-mounted `cpu,cpuacct` share a directory).
//! - **Hybrid** (v1 controllers plus a cgroup2 mount without them): limits in v1, and the
//!   unified cgroup for tracking (`cgroup.events`), `cgroup.kill`, `cgroup.freeze` and the
//!   BPF device filter, which the kernel applies even with no controllers in that mount.
//!
//! Nothing usable (no mounts, not root, read-only): a driver of [`Mode::None`] that says
//! why; [`Cgroups::detect`] never fails.
//!
//! # A job's life
//!
//! [`Cgroups::create`] makes the cgroups and writes the [`Limits`]; the job's process joins
//! before its first instruction: the parent opens [`JobCgroup::procs_files`], the child
//! (forked, or cloned by [`crate::spawn`]) calls [`join_in_child`] (async-signal-safe)
//! before exec. [`JobCgroup::kill`] kills
//! everything in it (double forks and `setsid` do not escape a cgroup),
//! [`JobCgroup::stats`] reads peak memory, CPU time and whether the OOM killer struck, and
//! [`JobCgroup::remove`] removes it; on hosts with a v1 memory hierarchy
//! [`JobCgroup::park`] first keeps the memory cgroup of an unprivileged job for the next
//! one ([`Spare`], [`Cgroups::create_for`]). After a restart, [`Cgroups::open_existing`] finds a
//! running job's cgroup and [`Cgroups::sweep_stale`] removes those of jobs that are gone.
//!
//! Only the job belongs in its cgroup, never its supervisor: `kill` ends everything in it,
//! and on v2 so does the OOM killer (`memory.oom.group`).
//!
//! # Which hierarchy does what
//!
//! Detection decides once which hierarchy serves each operation, in a [`Routing`]
//! ([`Cgroups::routing`]): memory, CPU quota, CPU time, pids, devices, kill, freeze and
//! tracking each go to v1, v2 or nothing. Every job carries a copy, and its creation,
//! limits, kill, freeze and statistics follow it.
//!
//! # Where the code is
//!
//! This file is the facade; `routing.rs` the table; `dirs.rs` a cgroup's directories and
//! names; `fsio.rs` the cgroupfs reads and writes; `limits.rs` the plan of limit writes;
//! `lifecycle.rs` creating, adopting and sweeping job cgroups; `job.rs` what a job's
//! cgroup does once made; `spare.rs` reused v1 memory cgroups; `probe.rs` the device
//! denial probe; `layout.rs` the mounts and this process's cgroups; `devices.rs` the
//! device rules and the BPF program built from them. `v1/` and `v2/` hold one file per
//! controller (its limit writes and stat reads; v2 also `kill.rs`, `freezer.rs` for
//! `cgroup.freeze` and `cgroup.events`, `devices.rs` for the BPF filter, `setup.rs` for the
//! subtree under the no-internal-processes rule).
//!
//! Every call here is blocking file I/O on cgroupfs (kill and remove may wait up to a few
//! seconds for dying processes): call it from a blocking thread.

mod devices;
mod dirs;
mod fsio;
mod job;
mod layout;
mod lifecycle;
mod limits;
mod probe;
mod routing;
mod spare;
mod v1;
mod v2;

use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use serde::Serialize;

pub use devices::{DEFAULT_RULES, DeviceAllow, DeviceKind, DeviceRule, DeviceRuleError};
pub use layout::{
    CgroupMount, Layout, Membership, Mode, V1_CONTROLLERS, parse_mountinfo, parse_proc_cgroup, resolve,
};
pub use probe::{DeviceMechanism, DeviceProbe, ProbeOutcome};
pub use routing::{KillVia, Routing, Via};
pub use spare::{Baseline, Spare};

use dirs::{Dirs, check_name, job_name};
use fsio::mkdir_exist_ok;
use routing::Found;
use spare::{Reuse, SparePool};
use v2::devices::ProgramCache;

/// The leaf cgroup the daemon moves itself into on v2, so that its own cgroup may have
/// controllers enabled for the jobs' subtree.
pub const DAEMON_LEAF: &str = "daemon";

/// Period of the CPU quota: `cpus` × this much CPU time per this much wall time.
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`JobCgroup::kill`] keeps killing before it reports processes that will not die
/// (uninterruptible sleep on a dead NFS server, say).
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`JobCgroup::remove`] retries a cgroup still busy with exiting processes.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a cgroup operation failed. Messages name the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups are not used here: {0}")]
    Unavailable(String),
    #[error(
        "invalid cgroup base name {0:?}: want one plain path component, not {DAEMON_LEAF:?}, job_*, probe_* or spare_*"
    )]
    BadName(String),
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("cannot enforce {what} here: {why}")]
    Unsupported { what: &'static str, why: String },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot parse {}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
    #[error("cannot load the device filter for {}: {source}{log}", path.display())]
    BpfLoad {
        path: PathBuf,
        source: io::Error,
        log: String,
    },
    #[error("cannot attach the device filter to {}: {source}", path.display())]
    BpfAttach { path: PathBuf, source: io::Error },
    #[error("cannot kill process {pid} of {}: {source}", path.display())]
    Signal { path: PathBuf, pid: i32, source: Errno },
    #[error("{} still has processes {pids:?} after {waited:?} of killing", path.display())]
    StillPopulated {
        path: PathBuf,
        pids: Vec<i32>,
        waited: Duration,
    },
    #[error("device probe in {}: {source}", path.display())]
    Probe { path: PathBuf, source: io::Error },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// What a job may use. `None` leaves that resource unconfined (only the daemon's own
/// limits apply).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Memory, RAM and swap together, in bytes. Beyond it the kernel's OOM killer ends the
    /// job (on v2 the whole job: `memory.oom.group`; on v1 the largest process).
    /// v2: `memory.max`, `memory.swap.max` 0, `memory.oom.group` 1; v1:
    /// `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes` (where swap accounting
    /// exists), and the OOM killer switched on in `memory.oom_control` if inherited off.
    pub memory_bytes: Option<u64>,
    /// CPU time as a number of CPUs (0.5: half of one CPU; 4: four CPUs), as a quota per
    /// [`CPU_PERIOD_US`]: v2 `cpu.max` `"<quota> <period>"`, v1 `cpu.cfs_period_us` and
    /// `cpu.cfs_quota_us`. The quota is at least 1 ms.
    pub cpus: Option<f64>,
    /// Processes and threads at once: `pids.max`.
    pub pids: Option<u64>,
    /// Device nodes the job may open beyond [`DEFAULT_RULES`]; all others are denied.
    pub devices: Option<DeviceAllow>,
}

/// What this host lets the driver enforce.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub memory: bool,
    pub cpu: bool,
    pub pids: bool,
    pub devices: bool,
    /// The whole cgroup can be killed without a race against forks: `cgroup.kill` or a
    /// freezer. Without, [`JobCgroup::kill`] still signals every process until none is
    /// left.
    pub kill: bool,
    /// The cgroup can be frozen ([`JobCgroup::set_frozen`]).
    pub freeze: bool,
}

/// What a job used, read back from its cgroup (before [`JobCgroup::remove`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Highest memory use: v2 `memory.peak` (kernel ≥ 5.19), v1
    /// `memory.max_usage_in_bytes`. Page cache counts.
    pub peak_memory_bytes: Option<u64>,
    /// CPU time of all its processes: v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`.
    pub cpu_usage_ms: Option<u64>,
    /// The OOM killer killed something in it (v2 `memory.events` / v1 `memory.oom_control`
    /// `oom_kill` > 0).
    pub oom_killed: bool,
}

/// The driver: the cybd subtree in each hierarchy, and what it can enforce.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: Mode,
    base: Dirs,
    caps: Capabilities,
    /// Which hierarchy serves what, decided by [`Cgroups::detect`].
    routing: Routing,
    /// The unified base has `cgroup.kill` (kernel ≥ 5.14).
    has_cgroup_kill: bool,
    /// What is missing and why, for [`Cgroups::describe`].
    notes: Vec<String>,
    /// Loaded device filter programs by rule set.
    programs: ProgramCache,
    /// Memory cgroups of ended jobs, kept for the next ones ([`Spare`]).
    spares: SparePool,
}

/// What [`Cgroups::sweep_stale`] did.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Job cgroups killed and removed.
    pub removed: Vec<u64>,
    /// Job cgroups left alone because `keep` said so.
    pub kept: Vec<u64>,
    /// Job cgroups that could not be killed or removed.
    pub failed: Vec<(u64, CgroupError)>,
}

impl Cgroups {
    /// A driver that confines nothing, saying why.
    pub fn none(reason: impl Into<String>) -> Cgroups {
        Cgroups {
            mode: Mode::None,
            base: Dirs::default(),
            caps: Capabilities::default(),
            routing: Routing::default(),
            has_cgroup_kill: false,
            notes: vec![reason.into()],
            programs: ProgramCache::default(),
            spares: SparePool::default(),
        }
    }

    /// Finds the cgroup hierarchies and sets up the subtree `<own>/<base_name>/` in each
    /// (see the module documentation); on v2 this may move the calling process into
    /// `<own>/daemon/`. Call it once, early, before starting jobs. Never fails: without
    /// usable cgroups the driver has [`Mode::None`] and [`Cgroups::describe`] says why.
    pub fn detect(base_name: &str) -> Cgroups {
        let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
            Ok(t) => t,
            Err(e) => return Cgroups::none(format!("cannot read /proc/self/mountinfo: {e}")),
        };
        let own = match fs::read_to_string("/proc/self/cgroup") {
            Ok(t) => t,
            Err(e) => return Cgroups::none(format!("cannot read /proc/self/cgroup: {e}")),
        };
        Cgroups::detect_from(base_name, &mountinfo, &own)
    }

    /// [`Cgroups::detect`] from given texts of `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`.
    pub fn detect_from(base_name: &str, mountinfo: &str, proc_cgroup: &str) -> Cgroups {
        if let Err(e) = check_name(base_name) {
            return Cgroups::none(e.to_string());
        }
        let layout = resolve(&parse_mountinfo(mountinfo), &parse_proc_cgroup(proc_cgroup));
        if layout.mode() == Mode::None {
            return Cgroups::none("no cgroup hierarchy is mounted where this process can see its cgroup");
        }
        let mut notes = Vec::new();
        let mut base = Dirs::default();
        for (ctrl, own) in &layout.v1 {
            let dir = own.join(base_name);
            if let Err(e) = mkdir_exist_ok(&dir) {
                notes.push(format!("{ctrl}: cannot create {}: {e}", dir.display()));
                continue;
            }
            let mut ok = |file: &str| {
                let there = dir.join(file).exists();
                if !there {
                    notes.push(format!("{ctrl}: no {file} in {}", dir.display()));
                }
                there
            };
            let slot = match ctrl.as_str() {
                "memory" if ok("memory.limit_in_bytes") => &mut base.memory,
                "cpu" if ok("cpu.cfs_quota_us") => &mut base.cpu,
                "cpuacct" if ok("cpuacct.usage") => &mut base.cpuacct,
                "pids" if ok("pids.max") => &mut base.pids,
                "devices" if ok("devices.allow") => &mut base.devices,
                "freezer" if ok("freezer.state") => &mut base.freezer,
                _ => continue,
            };
            *slot = Some(dir);
        }
        let mut found = Found::default();
        if let Some(own) = &layout.unified
            && let Some(mount) = &layout.unified_mount
            && let Some((dir, v2)) =
                v2::setup::setup_unified(own, mount, base_name, &v2::setup::V2_WANTED, &mut notes)
        {
            found.cgroup_kill = dir.join("cgroup.kill").exists();
            found.cgroup_freeze = dir.join("cgroup.freeze").exists();
            match devices::load_device_program(&DEFAULT_RULES) {
                Ok(_) => found.bpf = true,
                Err(e) => notes.push(format!(
                    "devices: cannot load a BPF device filter: {}{}",
                    e.source, e.log
                )),
            }
            base.unified = Some(dir);
            found.v2 = v2;
        }
        if base.is_empty() {
            // Usually the same error in every hierarchy: the first says enough.
            let first = match notes.len() {
                0 => String::new(),
                1 => format!("{}; ", notes[0]),
                n => format!("{} (and {} more); ", notes[0], n - 1),
            };
            return Cgroups::none(format!(
                "{first}cybd needs root, or a delegated cgroup, to manage cgroups"
            ));
        }
        let has_v1 = !base.v1_all().is_empty();
        let mode = match (base.unified.is_some(), has_v1) {
            (true, true) => Mode::Hybrid,
            (true, false) => Mode::V2,
            _ => Mode::V1,
        };
        let routing = Routing::from_base(&base, found);
        let caps = Capabilities {
            memory: routing.memory != Via::None,
            cpu: routing.cpu != Via::None,
            pids: routing.pids != Via::None,
            devices: routing.devices != Via::None,
            kill: routing.kill != KillVia::Signal,
            freeze: routing.freeze != Via::None,
        };
        Cgroups {
            mode,
            base,
            caps,
            routing,
            has_cgroup_kill: found.cgroup_kill,
            notes,
            programs: ProgramCache::default(),
            spares: SparePool::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Which hierarchy serves each operation on a job (decided by [`Cgroups::detect`]).
    pub fn routing(&self) -> Routing {
        self.routing
    }

    /// What is missing or degraded, and why (empty when everything works).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The subtree's directories, one per hierarchy used (the unified one first).
    pub fn base_paths(&self) -> Vec<PathBuf> {
        self.base.all().into_iter().map(Path::to_path_buf).collect()
    }

    /// One line for `cybctl health`, e.g. "cgroup v1+v2 hybrid: memory, cpu, pids, devices
    /// enforced; kill via cgroup.kill".
    pub fn describe(&self) -> String {
        let head = match self.mode {
            Mode::V2 => "cgroup v2",
            Mode::V1 => "cgroup v1",
            Mode::Hybrid => "cgroup v1+v2 hybrid",
            Mode::None => return format!("cgroups not used: {}", self.notes.join("; ")),
        };
        let c = self.caps;
        let all = [
            ("memory", c.memory),
            ("cpu", c.cpu),
            ("pids", c.pids),
            ("devices", c.devices),
        ];
        let on: Vec<&str> = all.iter().filter(|x| x.1).map(|x| x.0).collect();
        let off: Vec<&str> = all.iter().filter(|x| !x.1).map(|x| x.0).collect();
        let mut s = if on.is_empty() {
            format!("{head}: no limits enforced")
        } else {
            format!("{head}: {} enforced", on.join(", "))
        };
        if !off.is_empty() {
            s.push_str(&format!("; not enforced: {}", off.join(", ")));
        }
        s.push_str(match self.routing.kill {
            KillVia::CgroupKill => "; kill via cgroup.kill",
            KillVia::Freeze(_) => "; kill via freezer",
            KillVia::Signal => "; kill by signalling each process",
        });
        if !self.notes.is_empty() {
            s.push_str(&format!(" ({})", self.notes.join("; ")));
        }
        s
    }

    fn job(&self, job_id: u64) -> JobCgroup {
        self.handle(job_id, self.base.join(&job_name(job_id)))
    }

    fn handle(&self, id: u64, dirs: Dirs) -> JobCgroup {
        JobCgroup {
            id,
            dirs,
            routing: self.routing,
            reuse: None,
            base: Baseline::default(),
        }
    }

    /// Whether [`JobCgroup::kill`] uses `cgroup.kill` where the kernel has it (the
    /// default). Off, it freezes the cgroup and signals each process, as on kernels before
    /// 5.14: for testing that path, or to avoid a `cgroup.kill` that misbehaves.
    pub fn use_cgroup_kill(&mut self, on: bool) {
        self.routing.kill = Routing::kill_via(on && self.has_cgroup_kill, self.routing.freeze);
    }
}

/// One job's cgroup, in every hierarchy the driver uses. A handle of paths: cheap to
/// clone, and valid across daemon restarts ([`Cgroups::open_existing`]). Serializable, so
/// the daemon can hand it to the job's supervisor.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobCgroup {
    id: u64,
    dirs: Dirs,
    /// Which hierarchy serves what ([`Cgroups::routing`], as [`Cgroups::use_cgroup_kill`]
    /// left it when the cgroup was made).
    routing: Routing,
    /// Set when its memory cgroup may be kept for another job ([`JobCgroup::park`]).
    #[serde(default)]
    reuse: Option<Reuse>,
    /// Counters its memory cgroup had before this job (a reused one).
    #[serde(default)]
    base: Baseline,
}

impl JobCgroup {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Every directory of this cgroup, the unified one first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.all().into_iter().map(Path::to_path_buf).collect()
    }

    /// The directory in the unified hierarchy, if the driver uses it.
    pub fn unified_path(&self) -> Option<&Path> {
        self.dirs.unified.as_deref()
    }

    /// The directory in the v1 hierarchy of `controller` (`"memory"`, `"pids"`...).
    pub fn v1_path(&self, controller: &str) -> Option<&Path> {
        match controller {
            "memory" => self.dirs.memory.as_deref(),
            "cpu" => self.dirs.cpu.as_deref(),
            "cpuacct" => self.dirs.cpuacct.as_deref(),
            "pids" => self.dirs.pids.as_deref(),
            "devices" => self.dirs.devices.as_deref(),
            "freezer" => self.dirs.freezer.as_deref(),
            _ => None,
        }
    }

    fn exists(&self) -> bool {
        self.dirs.all().iter().any(|d| d.exists())
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` files `fds` are (from
/// [`JobCgroup::procs_files`]): writes "0", which means "the writer", to each.
///
/// Async-signal-safe (only write(2)), so it may run in a child between fork (or a
/// `CLONE_VM` clone) and exec, e.g. in `std::process::Command::pre_exec`. Call it before dropping privileges: the kernel
/// checks the writer's permission on the cgroup.
pub fn join_in_child(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) of one byte from a static buffer to a caller-given descriptor;
        // async-signal-safe, and a bad descriptor only yields EBADF.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n != 1 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_without_a_usable_base() {
        let none = Cgroups::detect_from("a/b", "", "");
        assert_eq!(none.mode(), Mode::None);
        assert!(
            none.describe()
                .starts_with("cgroups not used: invalid cgroup base name"),
            "{}",
            none.describe()
        );
        let none = Cgroups::detect_from("cybd", "", "0::/\n");
        assert_eq!(none.capabilities(), Capabilities::default());
        assert!(matches!(
            none.create(1, &Limits::default()),
            Err(CgroupError::Unavailable(_))
        ));
        assert!(none.open_existing(1).is_none());
    }

    #[test]
    fn describe_lines() {
        let mut c = Cgroups::none("x");
        c.mode = Mode::Hybrid;
        c.notes.clear();
        c.routing.kill = KillVia::CgroupKill;
        c.caps = Capabilities {
            memory: true,
            cpu: true,
            pids: true,
            devices: true,
            kill: true,
            freeze: true,
        };
        assert_eq!(
            c.describe(),
            "cgroup v1+v2 hybrid: memory, cpu, pids, devices enforced; kill via cgroup.kill"
        );
        c.mode = Mode::V2;
        c.caps.memory = false;
        c.caps.cpu = false;
        c.notes.push("/x holds other processes".into());
        assert_eq!(
            c.describe(),
            "cgroup v2: pids, devices enforced; not enforced: memory, cpu; kill via cgroup.kill (/x holds other processes)"
        );
    }
}
