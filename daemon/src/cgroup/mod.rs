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
//! Every call here is blocking file I/O on cgroupfs (kill and remove may wait up to a few
//! seconds for dying processes): call it from a blocking thread.

mod devices;
mod layout;

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;

pub use devices::{DEFAULT_RULES, DeviceAllow, DeviceKind, DeviceRule, DeviceRuleError};
pub use layout::{
    CgroupMount, Layout, Membership, Mode, V1_CONTROLLERS, parse_mountinfo, parse_proc_cgroup, resolve,
};

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

const JOB_PREFIX: &str = "job_";
const PROBE_PREFIX: &str = "probe_";
/// A v1 memory cgroup kept for the next job ([`Spare`]).
const SPARE_PREFIX: &str = "spare_";

/// The kernel charges memory to a v1 memory cgroup in per-CPU batches of 64 pages, so its
/// `memory.usage_in_bytes` is exact only to that much per CPU. An empty memory cgroup that
/// still shows at most this residue per CPU (charge stock, kernel objects freed a little
/// later) may serve the next job: its peak figure keeps the precision it has anyway.
const SPARE_RESIDUE_PER_CPU: u64 = 64 * 4096;

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

/// v2 controllers enabled for the children of a cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
struct V2Controllers {
    memory: bool,
    cpu: bool,
    pids: bool,
}

/// One cgroup (a base, a job or a probe) as directories in each hierarchy the driver uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Dirs {
    unified: Option<PathBuf>,
    /// Controllers the unified directory's parent gives it (for jobs) or gives its children
    /// (for the base).
    v2: V2Controllers,
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    pids: Option<PathBuf>,
    devices: Option<PathBuf>,
    freezer: Option<PathBuf>,
}

impl Dirs {
    fn v1_fields(&self) -> [&Option<PathBuf>; 6] {
        [
            &self.memory,
            &self.cpu,
            &self.cpuacct,
            &self.pids,
            &self.devices,
            &self.freezer,
        ]
    }

    fn join(&self, name: &str) -> Dirs {
        let j = |d: &Option<PathBuf>| d.as_ref().map(|d| d.join(name));
        Dirs {
            unified: j(&self.unified),
            v2: self.v2,
            memory: j(&self.memory),
            cpu: j(&self.cpu),
            cpuacct: j(&self.cpuacct),
            pids: j(&self.pids),
            devices: j(&self.devices),
            freezer: j(&self.freezer),
        }
    }

    /// Every distinct v1 directory (co-mounted controllers share one).
    fn v1_all(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for d in self.v1_fields().into_iter().flatten() {
            if !out.contains(&d.as_path()) {
                out.push(d);
            }
        }
        out
    }

    /// Every distinct directory, the unified one first.
    fn all(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = self.unified.as_deref().into_iter().collect();
        out.extend(self.v1_all());
        out
    }

    fn is_empty(&self) -> bool {
        self.all().is_empty()
    }
}

/// One write to a cgroup file; `if_present` ones are skipped where the kernel lacks the
/// file (swap accounting, `memory.oom.group`...).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileWrite {
    path: PathBuf,
    value: String,
    if_present: bool,
}

fn put(path: &Path, file: &str, value: impl Into<String>) -> FileWrite {
    FileWrite {
        path: path.join(file),
        value: value.into(),
        if_present: false,
    }
}

fn put_if_present(path: &Path, file: &str, value: impl Into<String>) -> FileWrite {
    FileWrite {
        path: path.join(file),
        value: value.into(),
        if_present: true,
    }
}

/// The quota for `cpus` CPUs per [`CPU_PERIOD_US`], in µs.
fn cpu_quota_us(cpus: f64) -> Result<u64> {
    // The kernel's ceiling on a CFS quota is 2^44 - 1 µs.
    const MAX_QUOTA: f64 = ((1u64 << 44) - 1) as f64;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus must be a positive number, not {cpus}"
        )));
    }
    let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0);
    if quota > MAX_QUOTA {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus {cpus} is more than the kernel can express"
        )));
    }
    Ok(quota as u64)
}

/// The file writes that put `limits` on the job cgroup `d`, in order, checking the limits
/// first. Device rules for v1 are included; the BPF device filter is attached separately.
fn plan_limits(d: &Dirs, limits: &Limits) -> Result<Vec<FileWrite>> {
    let unsupported = |what| CgroupError::Unsupported {
        what,
        why: "no such controller in this cgroup setup".to_string(),
    };
    let v2 = |enabled: bool| d.unified.as_deref().filter(|_| enabled);
    let mut w = Vec::new();
    if let Some(bytes) = limits.memory_bytes {
        if bytes == 0 {
            return Err(CgroupError::InvalidLimit(
                "memory must be more than 0 bytes".to_string(),
            ));
        }
        let n = bytes.to_string();
        if let Some(m) = &d.memory {
            // limit_in_bytes first: memsw may never be below it.
            w.push(put(m, "memory.limit_in_bytes", n.clone()));
            w.push(put_if_present(m, "memory.memsw.limit_in_bytes", n));
        } else if let Some(u) = v2(d.v2.memory) {
            w.push(put(u, "memory.max", n));
            w.push(put_if_present(u, "memory.swap.max", "0"));
            w.push(put_if_present(u, "memory.oom.group", "1"));
        } else {
            return Err(unsupported("a memory limit"));
        }
    }
    if let Some(cpus) = limits.cpus {
        let quota = cpu_quota_us(cpus)?;
        if let Some(c) = &d.cpu {
            w.push(put(c, "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
            w.push(put(c, "cpu.cfs_quota_us", quota.to_string()));
        } else if let Some(u) = v2(d.v2.cpu) {
            w.push(put(u, "cpu.max", format!("{quota} {CPU_PERIOD_US}")));
        } else {
            return Err(unsupported("a CPU quota"));
        }
    }
    if let Some(n) = limits.pids {
        if n == 0 {
            return Err(CgroupError::InvalidLimit("pids must be at least 1".to_string()));
        }
        match (&d.pids, v2(d.v2.pids)) {
            (Some(p), _) => w.push(put(p, "pids.max", n.to_string())),
            (None, Some(u)) => w.push(put(u, "pids.max", n.to_string())),
            (None, None) => return Err(unsupported("a pids limit")),
        }
    }
    if let (Some(allow), Some(dev)) = (&limits.devices, &d.devices) {
        for (file, value) in devices::v1_writes(&allow.effective()) {
            w.push(put(dev, file, value));
        }
    }
    Ok(w)
}

fn apply_writes(writes: &[FileWrite]) -> Result<()> {
    for w in writes {
        if w.if_present && !w.path.exists() {
            continue;
        }
        write_file(&w.path, &w.value)?;
    }
    Ok(())
}

/// Writes `value` to a cgroup file with one write(2), as cgroupfs wants.
fn write_file(path: &Path, value: &str) -> Result<()> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// Reads a cgroup file; `None` when it does not exist.
///
/// Into a page-sized buffer, read by read: cgroup files are small, have no size to ask for
/// (`fs::read_to_string` would `statx` each and then read in 32-byte probes), and a
/// supervisor reads half a dozen of them as every job ends.
fn read_opt(path: &Path) -> Result<Option<String>> {
    let err = |source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match io::Read::read(&mut f, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")))
}

fn parse_err(path: &Path, what: impl Into<String>) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A file holding one number; `None` when it does not exist.
fn read_u64(path: &Path) -> Result<Option<u64>> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    let t = text.trim();
    t.parse()
        .map(Some)
        .map_err(|_| parse_err(path, format!("not a number: {t:?}")))
}

/// The value of `key` in a flat-keyed file (`key value` lines); `None` when the file or
/// the key is absent.
fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(' ')
            && k == key
        {
            return v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| parse_err(path, format!("bad {key} value {v:?}")));
        }
    }
    Ok(None)
}

/// The pids in `dir/cgroup.procs` and in those of its descendants; none when `dir` is gone.
fn read_pids_recursive(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let Some(text) = read_opt(&procs)? else {
        return Ok(());
    };
    for l in text.lines() {
        let pid: i32 = l
            .trim()
            .parse()
            .map_err(|_| parse_err(&procs, format!("bad pid {l:?}")))?;
        // A process outside our pid namespace shows as 0; never signal 0 or less.
        if pid > 0 {
            out.push(pid);
        }
    }
    for child in child_cgroups(dir)? {
        read_pids_recursive(&child, out)?;
    }
    Ok(())
}

/// The sub-cgroups (subdirectories) of `dir`; none when `dir` is gone.
fn child_cgroups(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Creates a directory; one that already exists is fine.
fn mkdir_exist_ok(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes a cgroup directory and its descendants (rmdir only: cgroupfs removes the files
/// with the directory), retrying while exiting processes keep it busy.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<()> {
    // Usually a job made no cgroups of its own: one rmdir, no listing of the directory.
    match fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for child in child_cgroups(dir)? {
        remove_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name != DAEMON_LEAF
        && !name.contains('/')
        && !name.contains('\0')
        && !name.starts_with(JOB_PREFIX)
        && !name.starts_with(PROBE_PREFIX)
        && !name.starts_with(SPARE_PREFIX)
        && !name.starts_with("cgroup.");
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

fn job_name(job_id: u64) -> String {
    format!("{JOB_PREFIX}{job_id}")
}

/// The job id in a directory name `job_<id>`, written exactly as [`job_name`] writes it.
fn parse_job_name(name: &str) -> Option<u64> {
    let id: u64 = name.strip_prefix(JOB_PREFIX)?.parse().ok()?;
    (job_name(id) == name).then_some(id)
}

/// The name job `job_id`'s memory cgroup gets as a spare after attempt `attempt`: unique,
/// as job ids are never reused.
fn spare_name(job_id: u64, attempt: u32) -> String {
    format!("{SPARE_PREFIX}{job_id}_{attempt}")
}

/// The pid in a probe directory name `probe_<pid>_<n>`.
fn parse_probe_name(name: &str) -> Option<u32> {
    name.strip_prefix(PROBE_PREFIX)?.split_once('_')?.0.parse().ok()
}

/// The driver: the cybd subtree in each hierarchy, and what it can enforce.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: Mode,
    base: Dirs,
    caps: Capabilities,
    /// The BPF device filter loads (unified hierarchy present).
    bpf: bool,
    /// The unified base has `cgroup.kill` (kernel ≥ 5.14).
    cgroup_kill: bool,
    /// What is missing and why, for [`Cgroups::describe`].
    notes: Vec<String>,
    /// Loaded device filter programs by rule set: loading (the verifier) costs far more
    /// than attaching, and most jobs share a handful of rule sets.
    programs: ProgramCache,
    /// Memory cgroups of ended jobs, kept for the next ones ([`Spare`]).
    spares: SparePool,
}

/// Spare v1 memory cgroups, oldest first, shared by clones of the driver; at most `cap`
/// (0: memory cgroups are never reused).
#[derive(Debug, Clone, Default)]
struct SparePool(std::sync::Arc<std::sync::Mutex<SpareList>>);

#[derive(Debug, Default)]
struct SpareList {
    cap: usize,
    /// The most a spare may still be charged for when taken (the charge batch of every CPU).
    residue: u64,
    list: std::collections::VecDeque<Spare>,
}

/// A job's v1 memory cgroup that outlived its job, to serve the next job with the same
/// memory limit instead of a new one.
///
/// Making and removing a v1 memory cgroup (two dozen control files, a css brought up and
/// taken down by kernel workers) is the costliest part of confining a short job on a
/// hybrid or v1 host, and all of it holds the kernel's global cgroup lock. A memory cgroup
/// can be renamed where a unified one cannot, so the supervisor of an ended job resets it
/// and renames `job_<id>` to `spare_<id>_<attempt>` ([`JobCgroup::park`]), and the next job
/// renames it to its own `job_<id>` ([`Cgroups::create_for`]). Only cgroups the job could
/// not write to are kept (the daemon is root and the job is not: its control files are
/// root's), only empty ones whose usage is down to the kernel's charge residue, and only
/// for a job with the same memory limit, so every control file holds what a new cgroup
/// with that limit would. The peak is reset; the OOM kill count, which cannot be, is kept
/// as a baseline the next job's count is read against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Spare {
    /// Its directory name under the memory hierarchy's base (`spare_<id>_<attempt>`).
    name: String,
    /// The memory limit its control files hold.
    memory_bytes: Option<u64>,
    /// Its counters when its last job left.
    base: Baseline,
}

/// Counters of a reused cgroup that cannot be reset, as its last job left them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Baseline {
    /// `oom_kill` of `memory.oom_control`.
    oom_kills: u64,
}

/// What [`JobCgroup::park`] needs to know: the name the memory cgroup gets, and the limit
/// it was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Reuse {
    spare: String,
    memory_bytes: Option<u64>,
}

/// BPF device programs already loaded, shared by clones of the driver.
#[derive(Debug, Clone, Default)]
struct ProgramCache(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Vec<DeviceRule>, OwnedFd>>>);

/// At most this many distinct rule sets stay loaded (one per GPU combination in use).
const PROGRAM_CACHE: usize = 256;

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

/// Which device-control mechanism [`Cgroups::probe_devices`] tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMechanism {
    /// The cgroup v1 `devices` controller.
    V1,
    /// The BPF_CGROUP_DEVICE program on the unified hierarchy.
    Bpf,
}

/// What one mechanism did in [`Cgroups::probe_device_denial`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The denied node gave EPERM and the allowed one opened.
    Denies,
    /// The denied node opened anyway.
    DoesNotDeny,
    /// Not present on this host.
    Unavailable(String),
    /// The probe itself could not run or gave an unexpected answer.
    Failed(String),
}

/// Which device-control mechanisms really deny on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProbe {
    pub v1: ProbeOutcome,
    pub bpf: ProbeOutcome,
}

impl DeviceProbe {
    /// Whether at least one mechanism denies, so device rules are enforced.
    pub fn enforced(&self) -> bool {
        self.v1 == ProbeOutcome::Denies || self.bpf == ProbeOutcome::Denies
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Denies => write!(f, "denies"),
            ProbeOutcome::DoesNotDeny => write!(f, "does NOT deny"),
            ProbeOutcome::Unavailable(why) => write!(f, "unavailable ({why})"),
            ProbeOutcome::Failed(why) => write!(f, "probe failed ({why})"),
        }
    }
}

impl fmt::Display for DeviceProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v1 devices controller: {}; v2 BPF device filter: {}",
            self.v1, self.bpf
        )
    }
}

impl Cgroups {
    /// A driver that confines nothing, saying why.
    pub fn none(reason: impl Into<String>) -> Cgroups {
        Cgroups {
            mode: Mode::None,
            base: Dirs::default(),
            caps: Capabilities::default(),
            bpf: false,
            cgroup_kill: false,
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
        let (mut bpf, mut cgroup_kill, mut freeze_v2) = (false, false, false);
        if let Some(own) = &layout.unified
            && let Some(mount) = &layout.unified_mount
            && let Some((dir, v2)) = setup_unified(own, mount, base_name, &V2_WANTED, &mut notes)
        {
            cgroup_kill = dir.join("cgroup.kill").exists();
            freeze_v2 = dir.join("cgroup.freeze").exists();
            match devices::load_device_program(&DEFAULT_RULES) {
                Ok(_) => bpf = true,
                Err(e) => notes.push(format!(
                    "devices: cannot load a BPF device filter: {}{}",
                    e.source, e.log
                )),
            }
            base.unified = Some(dir);
            base.v2 = v2;
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
        let freeze = freeze_v2 || base.freezer.is_some();
        let caps = Capabilities {
            memory: base.memory.is_some() || (base.unified.is_some() && base.v2.memory),
            cpu: base.cpu.is_some() || (base.unified.is_some() && base.v2.cpu),
            pids: base.pids.is_some() || (base.unified.is_some() && base.v2.pids),
            devices: base.devices.is_some() || bpf,
            kill: cgroup_kill || freeze,
            freeze,
        };
        Cgroups {
            mode,
            base,
            caps,
            bpf,
            cgroup_kill,
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
        s.push_str(if self.cgroup_kill {
            "; kill via cgroup.kill"
        } else if c.freeze {
            "; kill via freezer"
        } else {
            "; kill by signalling each process"
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
            cgroup_kill: self.cgroup_kill,
            reuse: None,
            base: Baseline::default(),
        }
    }

    /// Keeps up to `cap` memory cgroups of ended jobs for later ones ([`Spare`]); 0 (the
    /// default) makes every job's anew. Only hosts with a v1 memory hierarchy reuse them.
    pub fn set_spare_capacity(&self, cap: usize) {
        let cap = if self.base.memory.is_some() { cap } else { 0 };
        let cpus = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_CONF)
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
        pool.cap = cap;
        pool.residue = SPARE_RESIDUE_PER_CPU * cpus;
    }

    /// Takes `spare` (from an ended job's [`JobCgroup::park`]) into the pool. Returns the
    /// spare that no longer fits, the oldest, for [`Cgroups::discard_spare`] (blocking,
    /// so not done here: this only takes a lock).
    pub fn keep_spare(&self, spare: Spare) -> Option<Spare> {
        let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
        if !spare.name.starts_with(SPARE_PREFIX) || spare.name.contains('/') {
            return None;
        }
        pool.list.push_back(spare);
        (pool.list.len() > pool.cap)
            .then(|| pool.list.pop_front())
            .flatten()
    }

    /// Removes a spare memory cgroup (empty, so one rmdir). Blocking.
    pub fn discard_spare(&self, spare: &Spare) -> Result<()> {
        match &self.base.memory {
            Some(m) => remove_tree(&m.join(&spare.name), Instant::now() + REMOVE_TIMEOUT),
            None => Ok(()),
        }
    }

    /// How many spare memory cgroups the pool holds.
    pub fn spare_count(&self) -> usize {
        self.spares.0.lock().unwrap_or_else(|p| p.into_inner()).list.len()
    }

    /// Like [`Cgroups::create`], for attempt `attempt` of a job; `reusable`: the job cannot
    /// write to its cgroup (the daemon is root, the job is not), so its memory cgroup may
    /// come from the pool of spares and may go back there when it ends ([`Spare`]).
    pub fn create_for(
        &self,
        job_id: u64,
        attempt: u32,
        limits: &Limits,
        reusable: bool,
    ) -> Result<JobCgroup> {
        let Some(mem_base) = self.base.memory.as_ref().filter(|_| reusable) else {
            return self.create(job_id, limits);
        };
        let (spare, residue) = {
            let mut pool = self.spares.0.lock().unwrap_or_else(|p| p.into_inner());
            let at = pool
                .list
                .iter()
                .rposition(|s| s.memory_bytes == limits.memory_bytes);
            (at.and_then(|i| pool.list.remove(i)), pool.residue)
        };
        let mut base = Baseline::default();
        let mut reused = false;
        if let Some(sp) = spare {
            let from = mem_base.join(&sp.name);
            // Checked now rather than when its job ended: the kernel objects a job leaves
            // are uncharged a moment after it (RCU), and the peak restarts from what is left.
            let clean = read_u64(&from.join("memory.usage_in_bytes"))
                .ok()
                .flatten()
                .is_some_and(|usage| usage <= residue)
                // Writing 0 sets the peak to the current usage.
                && write_file(&from.join("memory.max_usage_in_bytes"), "0").is_ok();
            match clean.then(|| fs::rename(&from, mem_base.join(job_name(job_id)))) {
                Some(Ok(())) => {
                    base = sp.base;
                    reused = true;
                }
                // Still charged, gone (swept), or a job_<id> left by a crash: the plain way
                // below.
                _ => {
                    let _ = remove_tree(&from, Instant::now() + REMOVE_TIMEOUT);
                }
            }
        }
        let (mut job, kept) = self.create_inner(job_id, limits, reused)?;
        if kept {
            job.base = base;
        }
        job.reuse = Some(Reuse {
            spare: spare_name(job_id, attempt),
            memory_bytes: limits.memory_bytes,
        });
        Ok(job)
    }

    /// Whether [`JobCgroup::kill`] uses `cgroup.kill` where the kernel has it (the
    /// default). Off, it freezes the cgroup and signals each process, as on kernels before
    /// 5.14: for testing that path, or to avoid a `cgroup.kill` that misbehaves.
    pub fn use_cgroup_kill(&mut self, on: bool) {
        self.cgroup_kill = on
            && self
                .base
                .unified
                .as_ref()
                .is_some_and(|u| u.join("cgroup.kill").exists());
    }

    /// Creates the cgroup of job `job_id` with `limits` and returns it, empty: the job's
    /// process then joins ([`JobCgroup::procs_files`] and [`join_in_child`], or
    /// [`JobCgroup::add_pid`]).
    ///
    /// A limit this host cannot enforce is an error ([`CgroupError::Unsupported`]), never
    /// silently dropped: check [`Cgroups::capabilities`] first to run without it.
    ///
    /// If the job's cgroup already exists (left by a daemon that crashed between creating
    /// it and recording the job as started, or of an earlier attempt of the job), whatever
    /// runs in it is killed and it is removed and made afresh, so the limits, the device
    /// filter and the statistics are this run's only. Use [`Cgroups::open_existing`] to
    /// adopt a job that is still meant to run.
    pub fn create(&self, job_id: u64, limits: &Limits) -> Result<JobCgroup> {
        self.create_inner(job_id, limits, false).map(|(job, _)| job)
    }

    /// [`Cgroups::create`]; `memory_made`: the job's memory directory is there already, a
    /// spare renamed for it (configured for `limits.memory_bytes`, empty, peak reset).
    /// Also returns whether that spare is still the job's memory cgroup (a left-over
    /// cgroup of the job makes all of it anew).
    fn create_inner(&self, job_id: u64, limits: &Limits, memory_made: bool) -> Result<(JobCgroup, bool)> {
        if self.mode == Mode::None {
            return Err(CgroupError::Unavailable(self.notes.join("; ")));
        }
        let c = self.caps;
        for (asked, can, what) in [
            (limits.memory_bytes.is_some(), c.memory, "a memory limit"),
            (limits.cpus.is_some(), c.cpu, "a CPU quota"),
            (limits.pids.is_some(), c.pids, "a pids limit"),
            (limits.devices.is_some(), c.devices, "device rules"),
        ] {
            if asked && !can {
                return Err(CgroupError::Unsupported {
                    what,
                    why: self.describe(),
                });
            }
        }
        let all = self.job(job_id);
        let job = self.needed(all.clone(), limits);
        let plan = plan_limits(&job.dirs, limits)?;
        // Made directly; only a directory that already exists (a crash left it) costs the
        // clean-up and a second try.
        let mut spare_kept = memory_made;
        for round in 0..2 {
            let mut left_over = false;
            for d in job.dirs.all() {
                if memory_made && round == 0 && job.dirs.memory.as_deref() == Some(d) {
                    continue;
                }
                match fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && round == 0 => {
                        left_over = true;
                        break;
                    }
                    Err(source) => {
                        let _ = job.remove();
                        return Err(CgroupError::Create {
                            path: d.to_path_buf(),
                            source,
                        });
                    }
                }
            }
            if !left_over {
                break;
            }
            spare_kept = false;
            all.kill()?;
            all.remove()?;
        }
        if let Err(e) = self.configure(&job, &plan, limits) {
            let _ = job.remove();
            return Err(e);
        }
        Ok((job, spare_kept))
    }

    /// `job` in only the hierarchies it needs: each cgroup directory costs a mkdir, its
    /// writes and an rmdir per job, which is most of what confining a short job costs.
    /// With a unified hierarchy, tracking, kill (`cgroup.kill` or `cgroup.freeze`), CPU
    /// time (`cpu.stat`) and the BPF device filter are all there, so the v1 cpuacct,
    /// freezer and devices directories are not needed; the v1 cpu and pids directories
    /// are made only for a job with a CPU quota or a pids limit. Memory stays, for the
    /// peak and OOM accounting.
    fn needed(&self, mut job: JobCgroup, limits: &Limits) -> JobCgroup {
        let d = &mut job.dirs;
        if d.unified.is_some() {
            d.cpuacct = None;
            d.freezer = None;
            if self.bpf {
                d.devices = None;
            }
        }
        if limits.cpus.is_none() && !d.v2.cpu {
            d.cpu = None;
        }
        if limits.pids.is_none() && !d.v2.pids {
            d.pids = None;
        }
        job
    }

    fn configure(&self, job: &JobCgroup, plan: &[FileWrite], limits: &Limits) -> Result<()> {
        apply_writes(plan)?;
        if limits.memory_bytes.is_some()
            && let Some(m) = &job.dirs.memory
        {
            // v1 copies oom_kill_disable from the parent; a job hitting its limit with the
            // killer off would hang instead of ending.
            let f = m.join("memory.oom_control");
            if read_keyed(&f, "oom_kill_disable")? == Some(1) {
                write_file(&f, "0")?;
            }
        }
        if let Some(allow) = &limits.devices
            && self.bpf
            && let Some(u) = &job.dirs.unified
        {
            self.attach_cached(u, &allow.effective())?;
        }
        Ok(())
    }

    /// Attaches the device filter for `rules` to `dir`, loading the program only the first
    /// time a rule set is seen.
    fn attach_cached(&self, dir: &Path, rules: &[DeviceRule]) -> Result<()> {
        let mut cache = self.programs.0.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(rules) {
            if cache.len() >= PROGRAM_CACHE {
                cache.clear();
            }
            let prog = load_filter(dir, rules)?;
            cache.insert(rules.to_vec(), prog);
        }
        let prog = cache.get(rules).ok_or_else(|| CgroupError::BpfAttach {
            path: dir.to_path_buf(),
            source: io::Error::other("device program cache lost an entry"),
        })?;
        devices::attach_device_program(dir, prog).map_err(|source| CgroupError::BpfAttach {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// The cgroup of job `job_id` if it exists in any hierarchy (a job still running
    /// after a daemon restart, to adopt), without touching it.
    pub fn open_existing(&self, job_id: u64) -> Option<JobCgroup> {
        if self.mode == Mode::None {
            return None;
        }
        let mut job = self.job(job_id);
        // Only the hierarchies it was made in (see `needed`).
        let d = &mut job.dirs;
        for dir in [
            &mut d.unified,
            &mut d.memory,
            &mut d.cpu,
            &mut d.cpuacct,
            &mut d.pids,
            &mut d.devices,
            &mut d.freezer,
        ] {
            if dir.as_ref().is_some_and(|p| !p.exists()) {
                *dir = None;
            }
        }
        job.exists().then_some(job)
    }

    /// Kills and removes the cgroup of every job for which `keep(id)` is false (jobs that
    /// are no longer running; after a daemon was killed and restarted), and leftover probe
    /// cgroups of other processes. Errors are collected, not fatal.
    pub fn sweep_stale(&self, keep: &dyn Fn(u64) -> bool) -> SweepReport {
        let mut report = SweepReport::default();
        let mut ids = BTreeSet::new();
        let mut probes = BTreeSet::new();
        let mut spares = BTreeSet::new();
        for dir in self.base.all() {
            let Ok(entries) = fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(id) = parse_job_name(name) {
                    ids.insert(id);
                } else if name.starts_with(SPARE_PREFIX) {
                    // The pool lives in the daemon's memory: a new daemon starts without.
                    spares.insert(dir.join(name));
                } else if parse_probe_name(name).is_some_and(|pid| pid != std::process::id()) {
                    probes.insert(name.to_string());
                }
            }
        }
        for id in ids {
            if keep(id) {
                report.kept.push(id);
                continue;
            }
            let job = self.job(id);
            match job.kill().and_then(|()| job.remove()) {
                Ok(()) => report.removed.push(id),
                Err(e) => report.failed.push((id, e)),
            }
        }
        for name in probes {
            let probe = self.handle(0, self.base.join(&name));
            let _ = probe.kill().and_then(|()| probe.remove());
        }
        for dir in spares {
            let _ = remove_tree(&dir, Instant::now() + REMOVE_TIMEOUT);
        }
        report
    }

    /// Removes the subtree's base directories, if no job cgroup is left in them (for tests
    /// and uninstalling; the daemon keeps its base).
    pub fn remove_base(&self) -> Result<()> {
        for d in self.base.all() {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(CgroupError::Remove {
                        path: d.to_path_buf(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks for real which mechanisms deny a device: for each, a throw-away cgroup that
    /// allows only `c 1:5` (a clone of /dev/zero), and a child that joins it and opens
    /// a clone of /dev/null (`c 1:3`: must fail with EPERM) and of /dev/zero (must open).
    /// The nodes are made with mknod in a private temporary directory on a filesystem
    /// that allows device nodes. Takes a few milliseconds.
    pub fn probe_device_denial(&self) -> DeviceProbe {
        let rules = [DeviceRule::char(1, Some(5), true, true)];
        let outcome = |mech| match self.probe_devices(mech, &rules, &[(1, 3), (1, 5)]) {
            Err(CgroupError::Unsupported { why, .. }) => ProbeOutcome::Unavailable(why),
            Err(e) => ProbeOutcome::Failed(e.to_string()),
            Ok(r) => match (r[0], r[1]) {
                (Err(Errno::EPERM), Ok(())) => ProbeOutcome::Denies,
                (Ok(()), _) => ProbeOutcome::DoesNotDeny,
                (a, b) => ProbeOutcome::Failed(format!("opening c 1:3 gave {a:?}, c 1:5 gave {b:?}")),
            },
        };
        DeviceProbe {
            v1: outcome(DeviceMechanism::V1),
            bpf: outcome(DeviceMechanism::Bpf),
        }
    }

    /// Makes a throw-away cgroup in which only `mech` confines devices to `allow` (no
    /// default set), mknods character devices `nodes` (major, minor) in a temporary
    /// directory, and for each forks a child that joins the cgroup and opens the node
    /// read-only: `Ok(())` if it opened, else the errno (EPERM: denied by the cgroup).
    /// Removes the nodes and the cgroup again.
    pub fn probe_devices(
        &self,
        mech: DeviceMechanism,
        allow: &[DeviceRule],
        nodes: &[(u32, u32)],
    ) -> Result<Vec<Result<(), Errno>>> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let (dirs, what) = match mech {
            DeviceMechanism::V1 => (
                Dirs {
                    devices: self.base.devices.clone(),
                    ..Dirs::default()
                },
                "the v1 devices controller",
            ),
            DeviceMechanism::Bpf => (
                Dirs {
                    unified: self.base.unified.clone().filter(|_| self.bpf),
                    ..Dirs::default()
                },
                "a BPF device filter",
            ),
        };
        if dirs.is_empty() {
            let why = format!("{what} is not available ({})", self.describe());
            return Err(CgroupError::Unsupported {
                what: "device rules",
                why,
            });
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PROBE_PREFIX}{}_{seq}", std::process::id());
        let probe = self.handle(0, dirs.join(&name));
        if probe.exists() {
            probe.kill()?;
            probe.remove()?;
        }
        let result = (|| -> Result<Vec<Result<(), Errno>>> {
            for d in probe.dirs.all() {
                fs::create_dir(d).map_err(|source| CgroupError::Create {
                    path: d.to_path_buf(),
                    source,
                })?;
            }
            if let Some(dev) = &probe.dirs.devices {
                for (file, value) in devices::v1_writes(allow) {
                    write_file(&dev.join(file), &value)?;
                }
            }
            if let Some(u) = &probe.dirs.unified {
                attach_filter(u, allow)?;
            }
            let scratch = ScratchDir::new()?;
            let procs = probe.procs_files()?;
            let fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
            nodes
                .iter()
                .map(|&(major, minor)| {
                    let node = scratch.mknod_char(major, minor)?;
                    open_in_child(&fds, &node).map_err(|source| CgroupError::Probe { path: node, source })
                })
                .collect()
        })();
        let cleanup = probe.kill().and_then(|()| probe.remove());
        let out = result?;
        cleanup?;
        Ok(out)
    }
}

/// The v2 controllers enabled for jobs, where available.
const V2_WANTED: [&str; 3] = ["memory", "cpu", "pids"];

fn read_or_empty(dir: &Path, file: &str) -> String {
    read_opt(&dir.join(file)).ok().flatten().unwrap_or_default()
}

/// Writes `+c` to `dir/cgroup.subtree_control` for each of `ctrls`; the failures.
fn enable_controllers(dir: &Path, ctrls: &[&str]) -> Vec<(String, io::Error)> {
    let f = dir.join("cgroup.subtree_control");
    ctrls
        .iter()
        .filter_map(|c| {
            let r = OpenOptions::new()
                .write(true)
                .open(&f)
                .and_then(|mut h| h.write_all(format!("+{c}").as_bytes()));
            r.err().map(|e| (c.to_string(), e))
        })
        .collect()
}

/// Whether [`enable_for_children`] got past the no-internal-processes rule.
#[derive(Debug, PartialEq, Eq)]
enum Enabled {
    Done,
    /// `parent` holds processes other than this one.
    OthersPresent,
}

/// Enables those of `wanted` that `parent` has for its children. cgroup v2 refuses that
/// (EBUSY) while `parent` holds processes: if the only one is this process, it moves into
/// the leaf `parent/daemon/` and tries again; if others are there too, it leaves them.
/// Other failures are noted.
fn enable_for_children(parent: &Path, wanted: &[&str], notes: &mut Vec<String>) -> Enabled {
    let available = read_or_empty(parent, "cgroup.controllers");
    let enabled = read_or_empty(parent, "cgroup.subtree_control");
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| words(&available).contains(c) && !words(&enabled).contains(c))
        .collect();
    if missing.is_empty() {
        return Enabled::Done;
    }
    let mut failed = enable_controllers(parent, &missing);
    if failed.iter().any(|(_, e)| e.raw_os_error() == Some(libc::EBUSY)) {
        let me = std::process::id().to_string();
        if words(&read_or_empty(parent, "cgroup.procs")) != [me.as_str()] {
            return Enabled::OthersPresent;
        }
        let leaf = parent.join(DAEMON_LEAF);
        match mkdir_exist_ok(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), &me)) {
            Ok(()) => failed = enable_controllers(parent, &missing),
            Err(e) => notes.push(format!("cannot move cybd into {}: {e}", leaf.display())),
        }
    }
    for (c, e) in failed {
        notes.push(format!(
            "{c}: cannot enable in {}: {e}",
            parent.join("cgroup.subtree_control").display()
        ));
    }
    Enabled::Done
}

/// Sets up the subtree in the unified hierarchy: `<own>/<base>` with `wanted` controllers
/// for its children (see the module documentation), where `<own>` is `own` or, when
/// that is the daemon's leaf, its parent. If `<own>` holds other processes, the subtree
/// goes to the top of the mount (`mount`) instead when controllers can be had there, else
/// it stays, without controllers. Returns the base and the controllers jobs get.
fn setup_unified(
    own: &Path,
    mount: &Path,
    base_name: &str,
    wanted: &[&str],
    notes: &mut Vec<String>,
) -> Option<(PathBuf, V2Controllers)> {
    let mut parent = match own.parent() {
        Some(p) if own.file_name() == Some(OsStr::new(DAEMON_LEAF)) => p,
        _ => own,
    };
    if enable_for_children(parent, wanted, notes) == Enabled::OthersPresent {
        let why = format!(
            "{} holds other processes, so its children can get no controllers",
            parent.display()
        );
        let mut fallback_notes = Vec::new();
        if mount != parent
            && enable_for_children(mount, wanted, &mut fallback_notes) == Enabled::Done
            && mkdir_exist_ok(&mount.join(base_name)).is_ok()
        {
            notes.push(format!(
                "{why}: job cgroups are under {} instead (run cybd as a systemd service with \
                 Delegate=yes to keep them in its own)",
                mount.display()
            ));
            notes.extend(fallback_notes);
            parent = mount;
        } else {
            notes.push(format!("{why}; run cybd as a systemd service with Delegate=yes"));
        }
    }
    let base = parent.join(base_name);
    if let Err(e) = mkdir_exist_ok(&base) {
        notes.push(format!("cannot create {}: {e}", base.display()));
        return None;
    }
    let enabled_parent = read_or_empty(parent, "cgroup.subtree_control");
    let enabled_base = read_or_empty(&base, "cgroup.subtree_control");
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| words(&enabled_parent).contains(c) && !words(&enabled_base).contains(c))
        .collect();
    for (c, e) in enable_controllers(&base, &missing) {
        notes.push(format!(
            "{c}: cannot enable in {}: {e}",
            base.join("cgroup.subtree_control").display()
        ));
    }
    let enabled_base = read_or_empty(&base, "cgroup.subtree_control");
    let on = |c: &str| words(&enabled_base).contains(&c);
    Some((
        base,
        V2Controllers {
            memory: on("memory"),
            cpu: on("cpu"),
            pids: on("pids"),
        },
    ))
}

/// Loads the device program for `rules` and attaches it to the unified cgroup `dir`.
fn attach_filter(dir: &Path, rules: &[DeviceRule]) -> Result<()> {
    let prog = load_filter(dir, rules)?;
    // The cgroup holds the program from now on; our descriptor may close.
    devices::attach_device_program(dir, &prog).map_err(|source| CgroupError::BpfAttach {
        path: dir.to_path_buf(),
        source,
    })
}

fn load_filter(dir: &Path, rules: &[DeviceRule]) -> Result<OwnedFd> {
    devices::load_device_program(rules).map_err(|e| CgroupError::BpfLoad {
        path: dir.to_path_buf(),
        log: if e.log.is_empty() {
            String::new()
        } else {
            format!(" (verifier: {})", e.log)
        },
        source: e.source,
    })
}

/// One job's cgroup, in every hierarchy the driver uses. A handle of paths: cheap to
/// clone, and valid across daemon restarts ([`Cgroups::open_existing`]). Serializable, so
/// the daemon can hand it to the job's supervisor.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobCgroup {
    id: u64,
    dirs: Dirs,
    /// Kill with `cgroup.kill` ([`Cgroups::use_cgroup_kill`]).
    cgroup_kill: bool,
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

    /// `cgroup.procs` of every directory, opened write-only and close-on-exec, for a
    /// forked child to join with [`join_in_child`] before it execs. Open them before
    /// forking, and join before dropping privileges.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>> {
        self.dirs
            .all()
            .into_iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }

    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy. Its
    /// existing children stay where they are.
    pub fn add_pid(&self, pid: i32) -> Result<()> {
        for d in self.dirs.all() {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in the cgroup, in any hierarchy, sorted.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for d in self.dirs.all() {
            read_pids_recursive(d, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn v1_pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for d in self.dirs.v1_all() {
            read_pids_recursive(d, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Whether any process is left in the cgroup (or a descendant), in any hierarchy.
    pub fn is_populated(&self) -> Result<bool> {
        if let Some(u) = &self.dirs.unified
            && let Some(n) = read_keyed(&u.join("cgroup.events"), "populated")?
            && n > 0
        {
            return Ok(true);
        }
        Ok(!self.v1_pids()?.is_empty())
    }

    /// Waits until the cgroup is empty; false if processes are still there after `timeout`.
    pub fn wait_empty(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_populated()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every process in the cgroup and returns once none is left: `cgroup.kill` where
    /// there is a unified cgroup (else freeze, SIGKILL each, thaw), and on v1 freeze with
    /// the freezer, SIGKILL each, thaw; repeated until the cgroup is empty, for up to
    /// [`KILL_TIMEOUT`]. Blocks.
    pub fn kill(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            if !self.is_populated()? {
                return Ok(());
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::StillPopulated {
                    path: self
                        .dirs
                        .all()
                        .first()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default(),
                    pids: self.pids().unwrap_or_default(),
                    waited: start.elapsed(),
                });
            }
            if let Some(u) = self.dirs.unified.as_deref().filter(|u| u.exists()) {
                if self.cgroup_kill {
                    write_file(&u.join("cgroup.kill"), "1")?;
                } else if u.join("cgroup.freeze").exists() {
                    self.kill_frozen(u, true)?;
                } else {
                    let mut pids = Vec::new();
                    read_pids_recursive(u, &mut pids)?;
                    self.signal_all(&pids)?;
                }
                if self.wait_empty(Duration::from_millis(200))? {
                    return Ok(());
                }
            }
            // Processes only v1 sees (v1-only hosts, or one that left the unified cgroup).
            if !self.v1_pids()?.is_empty() {
                match self.dirs.freezer.as_deref().filter(|f| f.exists()) {
                    Some(f) => self.kill_frozen(f, false)?,
                    None => self.signal_all(&self.v1_pids()?)?,
                }
            }
            self.wait_empty(Duration::from_millis(100))?;
        }
    }

    /// Freezes the cgroup `dir` (`unified`: cgroup.freeze, else the v1 freezer), SIGKILLs
    /// everything in it (v1: in any v1 hierarchy of the job), and thaws it (frozen
    /// processes die once thawed), even on error.
    fn kill_frozen(&self, dir: &Path, unified: bool) -> Result<()> {
        set_frozen_dir(dir, unified, true)?;
        let pids = if unified {
            let mut pids = Vec::new();
            read_pids_recursive(dir, &mut pids).map(|()| pids)
        } else {
            self.v1_pids()
        };
        let r = pids.and_then(|pids| self.signal_all(&pids));
        let thaw = set_frozen_dir(dir, unified, false);
        r.and(thaw)
    }

    fn signal_all(&self, pids: &[i32]) -> Result<()> {
        for &pid in pids {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => {
                    let path = self
                        .dirs
                        .all()
                        .first()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default();
                    return Err(CgroupError::Signal { path, pid, source });
                }
            }
        }
        Ok(())
    }

    /// Freezes (stops every process, which the kernel then does not schedule) or thaws the
    /// cgroup, and waits up to a second for the freeze to complete.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        if let Some(u) = self
            .dirs
            .unified
            .as_deref()
            .filter(|u| u.join("cgroup.freeze").exists())
        {
            return set_frozen_dir(u, true, frozen);
        }
        if let Some(f) = self.dirs.freezer.as_deref() {
            return set_frozen_dir(f, false, frozen);
        }
        Err(CgroupError::Unsupported {
            what: "freezing",
            why: "no cgroup.freeze and no v1 freezer".to_string(),
        })
    }

    /// What the job used so far (absent files give `None`, e.g. a kernel without
    /// `memory.peak`).
    pub fn stats(&self) -> Result<Stats> {
        self.stats_raw().map(|(s, _)| s)
    }

    /// [`JobCgroup::stats`], and then [`JobCgroup::park`] on what they read (the v1 OOM
    /// count is read once, not once for each): the end of a job in its supervisor.
    pub fn finish(&mut self) -> Result<(Stats, Option<Spare>)> {
        let (s, v1_oom_kills) = self.stats_raw()?;
        Ok((s, self.park_counted(v1_oom_kills)))
    }

    /// [`JobCgroup::stats`] and the v1 memory cgroup's `oom_kill` count as read.
    fn stats_raw(&self) -> Result<(Stats, Option<u64>)> {
        let d = &self.dirs;
        let v2 = |enabled: bool| d.unified.as_deref().filter(|_| enabled);
        let mut s = Stats::default();
        let mut v1_oom_kills = None;
        if let Some(m) = &d.memory {
            s.peak_memory_bytes = read_u64(&m.join("memory.max_usage_in_bytes"))?;
            v1_oom_kills = read_keyed(&m.join("memory.oom_control"), "oom_kill")?;
            s.oom_killed = v1_oom_kills.is_some_and(|n| n > self.base.oom_kills);
        } else if let Some(u) = v2(d.v2.memory) {
            s.peak_memory_bytes = read_u64(&u.join("memory.peak"))?;
            s.oom_killed = read_keyed(&u.join("memory.events"), "oom_kill")?.is_some_and(|n| n > 0);
        }
        if let Some(c) = &d.cpuacct {
            s.cpu_usage_ms = read_u64(&c.join("cpuacct.usage"))?.map(|ns| ns / 1_000_000);
        } else if let Some(u) = &d.unified {
            // usage_usec is there even without the cpu controller.
            s.cpu_usage_ms = read_keyed(&u.join("cpu.stat"), "usage_usec")?.map(|us| us / 1000);
        }
        Ok((s, v1_oom_kills))
    }

    /// After the job ended and [`JobCgroup::kill`] and [`JobCgroup::stats`]: if this
    /// cgroup was made reusable ([`Cgroups::create_for`]) and its memory cgroup is empty
    /// and holds no more than the kernel's charge residue, resets its peak and renames it
    /// to its spare name, and returns the [`Spare`] for the daemon's pool
    /// ([`Cgroups::keep_spare`]). The rest of the cgroup is still to be removed with
    /// [`JobCgroup::remove`], which leaves the spare alone. `None`: nothing was kept, and
    /// `remove` removes all of it.
    pub fn park(&mut self) -> Option<Spare> {
        self.park_counted(None)
    }

    /// [`JobCgroup::park`]; `oom_kills`: the memory cgroup's `oom_kill` count if it was
    /// read since the job's processes were killed (else it is read here).
    fn park_counted(&mut self, oom_kills: Option<u64>) -> Option<Spare> {
        let reuse = self.reuse.as_ref()?;
        let mem = self.dirs.memory.as_ref()?;
        // Emptied by the kill before; a job without root cannot make sub-cgroups, but a
        // cgroup is kept only if it is plainly so.
        let procs = read_opt(&mem.join("cgroup.procs")).ok()??;
        if !procs.trim().is_empty() || !child_cgroups(mem).ok()?.is_empty() {
            return None;
        }
        let oom_kills = match oom_kills {
            Some(n) => n,
            None => read_keyed(&mem.join("memory.oom_control"), "oom_kill")
                .ok()?
                .unwrap_or(0),
        };
        let to = mem.parent()?.join(&reuse.spare);
        fs::rename(mem, &to).ok()?;
        let spare = Spare {
            name: reuse.spare.clone(),
            memory_bytes: reuse.memory_bytes,
            base: Baseline { oom_kills },
        };
        self.dirs.memory = None;
        Some(spare)
    }

    /// Removes the cgroup in every hierarchy (and any sub-cgroups the job made), retrying
    /// for up to 2 s while exiting processes keep it busy. [`JobCgroup::kill`] it first: a
    /// cgroup with live processes cannot be removed. Read [`JobCgroup::stats`] before.
    /// Removing a cgroup that is already gone is not an error.
    pub fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut first = None;
        for d in self.dirs.all() {
            if let Err(e) = remove_tree(d, deadline) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn set_frozen_dir(dir: &Path, unified: bool, frozen: bool) -> Result<()> {
    let (file, value) = match (unified, frozen) {
        (true, true) => ("cgroup.freeze", "1"),
        (true, false) => ("cgroup.freeze", "0"),
        (false, true) => ("freezer.state", "FROZEN"),
        (false, false) => ("freezer.state", "THAWED"),
    };
    write_file(&dir.join(file), value)?;
    if !frozen {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let done = if unified {
            read_keyed(&dir.join("cgroup.events"), "frozen")? == Some(1)
        } else {
            read_opt(&dir.join("freezer.state"))?.is_some_and(|s| s.trim() == "FROZEN")
        };
        // A process in uninterruptible sleep can hold off the freeze; go on regardless.
        if done || Instant::now() >= deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
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

/// A private directory for probe device nodes, on a filesystem that allows device nodes
/// (not mounted nodev); removed with its contents on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let candidates = [
            std::env::temp_dir(),
            PathBuf::from("/var/tmp"),
            PathBuf::from("/dev"),
        ];
        let parent = candidates
            .iter()
            .find(|c| {
                nix::sys::statvfs::statvfs(c.as_path())
                    .is_ok_and(|s| !s.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV))
            })
            .ok_or_else(|| CgroupError::Probe {
                path: candidates[0].clone(),
                source: io::Error::other("no writable filesystem without nodev for the probe's device nodes"),
            })?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".cybd-devprobe-{}-{seq}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| CgroupError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(ScratchDir { path })
    }

    fn mknod_char(&self, major: u32, minor: u32) -> Result<PathBuf> {
        use nix::sys::stat::{Mode as FileMode, SFlag, makedev, mknod};
        let path = self.path.join(format!("c{major}_{minor}"));
        mknod(
            &path,
            SFlag::S_IFCHR,
            FileMode::from_bits_truncate(0o600),
            makedev(major.into(), minor.into()),
        )
        .map_err(|e| CgroupError::Create {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Exit code of a probe child that could not join the cgroup (errnos are below 200).
const JOIN_FAILED: i32 = 255;

/// Forks a child that joins the cgroups `procs` and opens `path` read-only; returns what
/// the open gave.
fn open_in_child(procs: &[RawFd], path: &Path) -> io::Result<Result<(), Errno>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let child = move || -> i32 {
        if join_in_child(procs).is_err() {
            return JOIN_FAILED;
        }
        match raw_open_readonly(&cpath) {
            Ok(()) => 0,
            Err(errno) => errno,
        }
    };
    // SAFETY: the child closure only calls write(2), open(2) and reads errno, all
    // async-signal-safe, on data prepared before the fork, and allocates nothing.
    let status = unsafe { fork_wait(&child)? };
    match status {
        0 => Ok(Ok(())),
        JOIN_FAILED => Err(io::Error::other("the probe child could not join the cgroup")),
        errno => Ok(Err(Errno::from_raw(errno))),
    }
}

/// open(2) read-only and close-on-exec; the errno on failure. The descriptor is left open:
/// only for a child about to exit. Async-signal-safe.
fn raw_open_readonly(path: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: path is a valid NUL-terminated string; open(2) is async-signal-safe.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if fd >= 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Forks; the child runs `child` and exits with its return value (0..=255) without
/// unwinding or running destructors; the parent waits and returns that exit code.
///
/// # Safety
///
/// The process may have other threads, so `child` must only do async-signal-safe things
/// (no allocation, no locks).
unsafe fn fork_wait(child: &dyn Fn() -> i32) -> io::Result<i32> {
    // SAFETY: the caller guarantees the child side is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child at once, running no atexit handlers or destructors
        // that belong to the parent.
        unsafe { libc::_exit(code) };
    }
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                return Err(io::Error::other(format!("the probe child died of {sig}")));
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory standing in for cgroup directories: `dirs` names the
    /// hierarchies, `files` the cgroup files each holds (the kernel's files exist before
    /// anything is written; written files are never created).
    fn fake(v1: &[&str], unified: Option<V2Controllers>, files: &[&str]) -> (tempfile::TempDir, Dirs) {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = Dirs::default();
        let mk = |name: &str| {
            let p = tmp.path().join(name).join("job_7");
            fs::create_dir_all(&p).unwrap();
            for f in files {
                fs::write(p.join(f), "").unwrap();
            }
            Some(p)
        };
        for c in v1 {
            let p = mk(c);
            match *c {
                "memory" => d.memory = p,
                "cpu" => d.cpu = p,
                "cpuacct" => d.cpuacct = p,
                "pids" => d.pids = p,
                "devices" => d.devices = p,
                "freezer" => d.freezer = p,
                _ => unreachable!(),
            }
        }
        if let Some(v2) = unified {
            d.unified = mk("unified");
            d.v2 = v2;
        }
        (tmp, d)
    }

    fn read(dir: &Option<PathBuf>, file: &str) -> Option<String> {
        fs::read_to_string(dir.as_ref().unwrap().join(file)).ok()
    }

    const V1_FILES: &[&str] = &[
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
        "pids.max",
        "devices.allow",
        "devices.deny",
    ];
    const V2_ALL: V2Controllers = V2Controllers {
        memory: true,
        cpu: true,
        pids: true,
    };

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(5),
            devices: Some(DeviceAllow::new(vec!["c 195:0 rw".parse().unwrap()])),
        }
    }

    #[test]
    fn v1_limit_files() {
        let (_tmp, d) = fake(&["memory", "cpu", "pids", "devices"], None, V1_FILES);
        let plan = plan_limits(&d, &limits()).unwrap();
        apply_writes(&plan).unwrap();
        assert_eq!(read(&d.memory, "memory.limit_in_bytes").unwrap(), "67108864");
        assert_eq!(
            read(&d.memory, "memory.memsw.limit_in_bytes").unwrap(),
            "67108864"
        );
        assert_eq!(read(&d.cpu, "cpu.cfs_period_us").unwrap(), "100000");
        assert_eq!(read(&d.cpu, "cpu.cfs_quota_us").unwrap(), "50000");
        assert_eq!(read(&d.pids, "pids.max").unwrap(), "5");
        assert_eq!(read(&d.devices, "devices.deny").unwrap(), "a");
        // One write per rule; the file keeps the last.
        assert_eq!(read(&d.devices, "devices.allow").unwrap(), "c 195:0 rw");
        let allows: Vec<&str> = plan
            .iter()
            .filter(|w| w.path.ends_with("devices.allow"))
            .map(|w| w.value.as_str())
            .collect();
        assert_eq!(allows.len(), DEFAULT_RULES.len() + 1);
        assert_eq!(allows[0], "c 1:3 rwm");
        // Order matters where the kernel checks one file against another.
        let order: Vec<String> = plan
            .iter()
            .map(|w| w.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            order[..5],
            [
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "cpu.cfs_period_us",
                "cpu.cfs_quota_us",
                "pids.max"
            ]
        );
        assert_eq!(order[5], "devices.deny");
    }

    #[test]
    fn v1_without_swap_accounting() {
        let (_tmp, d) = fake(&["memory"], None, &["memory.limit_in_bytes"]);
        let l = Limits {
            memory_bytes: Some(1 << 30),
            ..Limits::default()
        };
        apply_writes(&plan_limits(&d, &l).unwrap()).unwrap();
        assert_eq!(read(&d.memory, "memory.limit_in_bytes").unwrap(), "1073741824");
        assert_eq!(
            read(&d.memory, "memory.memsw.limit_in_bytes"),
            None,
            "must not be created"
        );
    }

    #[test]
    fn v2_limit_files() {
        let files = [
            "memory.max",
            "memory.swap.max",
            "memory.oom.group",
            "cpu.max",
            "pids.max",
        ];
        let (_tmp, d) = fake(&[], Some(V2_ALL), &files);
        let plan = plan_limits(&d, &limits()).unwrap();
        apply_writes(&plan).unwrap();
        assert_eq!(read(&d.unified, "memory.max").unwrap(), "67108864");
        assert_eq!(read(&d.unified, "memory.swap.max").unwrap(), "0");
        assert_eq!(read(&d.unified, "memory.oom.group").unwrap(), "1");
        assert_eq!(read(&d.unified, "cpu.max").unwrap(), "50000 100000");
        assert_eq!(read(&d.unified, "pids.max").unwrap(), "5");
        // Devices go to the BPF filter, not to files.
        assert!(!plan.iter().any(|w| w.path.to_string_lossy().contains("devices")));
        let two = Limits {
            cpus: Some(2.0),
            ..Limits::default()
        };
        assert_eq!(plan_limits(&d, &two).unwrap()[0].value, "200000 100000");
        let tiny = Limits {
            cpus: Some(0.001),
            ..Limits::default()
        };
        assert_eq!(plan_limits(&d, &tiny).unwrap()[0].value, "1000 100000");
    }

    #[test]
    fn hybrid_takes_limits_from_v1() {
        // The unified cgroup has no controllers; the limits go to v1.
        let (_tmp, d) = fake(
            &["memory", "cpu", "pids", "devices"],
            Some(V2Controllers::default()),
            V1_FILES,
        );
        let plan = plan_limits(&d, &limits()).unwrap();
        assert!(
            plan.iter()
                .all(|w| !w.path.starts_with(d.unified.as_ref().unwrap()))
        );
        assert_eq!(plan.len(), 5 + 1 + DEFAULT_RULES.len() + 1);
    }

    #[test]
    fn bad_and_unsupported_limits() {
        let (_tmp, d) = fake(
            &[],
            Some(V2Controllers {
                memory: false,
                cpu: true,
                pids: true,
            }),
            &[],
        );
        for cpus in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            let l = Limits {
                cpus: Some(cpus),
                ..Limits::default()
            };
            assert!(
                matches!(plan_limits(&d, &l), Err(CgroupError::InvalidLimit(_))),
                "{cpus}"
            );
        }
        let l = Limits {
            pids: Some(0),
            ..Limits::default()
        };
        assert!(matches!(plan_limits(&d, &l), Err(CgroupError::InvalidLimit(_))));
        let l = Limits {
            memory_bytes: Some(1),
            ..Limits::default()
        };
        assert!(matches!(
            plan_limits(&d, &l),
            Err(CgroupError::Unsupported { .. })
        ));
        assert!(plan_limits(&d, &Limits::default()).unwrap().is_empty());
    }

    #[test]
    fn stats_from_files() {
        let (_tmp, d) = fake(&["memory", "cpuacct"], None, &[]);
        let m = d.memory.as_ref().unwrap();
        fs::write(m.join("memory.max_usage_in_bytes"), "123456\n").unwrap();
        fs::write(
            m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(d.cpuacct.as_ref().unwrap().join("cpuacct.usage"), "2500000000\n").unwrap();
        let job = JobCgroup {
            id: 7,
            dirs: d,
            cgroup_kill: false,
            reuse: None,
            base: Baseline::default(),
        };
        let s = job.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                peak_memory_bytes: Some(123456),
                cpu_usage_ms: Some(2500),
                oom_killed: true
            }
        );

        let (_tmp, d) = fake(&[], Some(V2_ALL), &[]);
        let u = d.unified.clone().unwrap();
        fs::write(u.join("memory.peak"), "4096\n").unwrap();
        fs::write(
            u.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 0\n",
        )
        .unwrap();
        fs::write(
            u.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n",
        )
        .unwrap();
        let job = JobCgroup {
            id: 7,
            dirs: d,
            cgroup_kill: false,
            reuse: None,
            base: Baseline::default(),
        };
        let s = job.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                peak_memory_bytes: Some(4096),
                cpu_usage_ms: Some(1500),
                oom_killed: false
            }
        );
        // A kernel without memory.peak.
        fs::remove_file(u.join("memory.peak")).unwrap();
        assert_eq!(job.stats().unwrap().peak_memory_bytes, None);
        fs::write(u.join("cpu.stat"), "usage_usec lots\n").unwrap();
        let e = job.stats().unwrap_err().to_string();
        assert!(e.starts_with("cannot parse ") && e.contains("cpu.stat"), "{e}");
    }

    #[test]
    fn names() {
        assert_eq!(parse_job_name("job_42"), Some(42));
        for bad in ["job_", "job_042", "job_+4", "job_x", "jobs_4", "probe_1_2"] {
            assert_eq!(parse_job_name(bad), None, "{bad}");
        }
        assert_eq!(parse_probe_name("probe_123_0"), Some(123));
        for bad in ["", "..", ".", "a/b", "daemon", "job_1", "probe_x", "cgroup.procs"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("cybd").unwrap();
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
        c.cgroup_kill = true;
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

    #[test]
    fn unified_setup_takes_the_parent_of_the_daemon_leaf() {
        // A service started in its leaf (DelegateSubgroup=daemon) whose subtree is set up
        // already: nothing to write, nobody to move.
        let tmp = tempfile::tempdir().unwrap();
        let svc = tmp.path().join("cybd.service");
        fs::create_dir_all(svc.join(DAEMON_LEAF)).unwrap();
        fs::create_dir_all(svc.join("cybd")).unwrap();
        fs::write(svc.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        fs::write(svc.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        fs::write(svc.join("cybd/cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        let mut notes = Vec::new();
        let got = setup_unified(&svc.join(DAEMON_LEAF), tmp.path(), "cybd", &V2_WANTED, &mut notes);
        assert_eq!(got, Some((svc.join("cybd"), V2_ALL)));
        assert!(notes.is_empty(), "{notes:?}");
        // Called on the service cgroup itself, with only memory available.
        fs::write(svc.join("cgroup.controllers"), "memory\n").unwrap();
        fs::write(svc.join("cgroup.subtree_control"), "memory\n").unwrap();
        fs::write(svc.join("cybd/cgroup.subtree_control"), "memory\n").unwrap();
        let got = setup_unified(&svc, tmp.path(), "cybd", &V2_WANTED, &mut notes);
        let only_memory = V2Controllers {
            memory: true,
            cpu: false,
            pids: false,
        };
        assert_eq!(got, Some((svc.join("cybd"), only_memory)));
        assert!(notes.is_empty(), "{notes:?}");
        // No such directory: nothing created, the reason noted.
        let got = setup_unified(
            &tmp.path().join("gone/x"),
            tmp.path(),
            "cybd",
            &V2_WANTED,
            &mut notes,
        );
        assert_eq!(got, None);
        assert!(
            notes[0].starts_with("cannot create ") && notes[0].contains("gone/x/cybd"),
            "{notes:?}"
        );
    }

    /// Undoes what [`unified_setup_on_the_real_kernel`] changed, also when it fails.
    struct RealSetupCleanup {
        mount: PathBuf,
        dirs: Vec<PathBuf>,
        disable: Option<&'static str>,
        sleeper: Option<std::process::Child>,
    }

    impl Drop for RealSetupCleanup {
        fn drop(&mut self) {
            if let Some(mut c) = self.sleeper.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for d in &self.dirs {
                let _ = remove_tree(d, Instant::now() + Duration::from_secs(2));
            }
            if let Some(c) = self.disable {
                let _ = write_file(&self.mount.join("cgroup.subtree_control"), &format!("-{c}"));
            }
        }
    }

    /// The no-internal-processes handling of [`setup_unified`] on the real kernel, with a
    /// domain controller the unified mount offers (hugetlb on a hybrid host): a daemon alone
    /// in its cgroup moves into the `daemon` leaf; one sharing it with other processes puts
    /// the subtree at the top of the mount. Needs root; skipped without.
    #[test]
    fn unified_setup_on_the_real_kernel() {
        const CHILD: &str = "CYB_CGROUP_UNIFIED_SETUP_CHILD";
        if let Ok(spec) = std::env::var(CHILD) {
            // The child: alone in its cgroup, like a daemon that systemd started there.
            let parts: Vec<&str> = spec.split('|').collect();
            let mut notes = Vec::new();
            let got = setup_unified(
                Path::new(parts[0]),
                Path::new(parts[1]),
                "base",
                &[parts[2]],
                &mut notes,
            );
            let own = fs::read_to_string("/proc/self/cgroup").unwrap();
            println!("BASE={:?}", got.map(|g| g.0));
            println!("NOTES={notes:?}");
            println!(
                "CGROUP={}",
                own.lines().find(|l| l.starts_with("0::")).unwrap_or("")
            );
            return;
        }
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root");
            return;
        }
        let layout = resolve(
            &parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap()),
            &parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap()),
        );
        let Some(mount) = layout.unified_mount else {
            println!("skipped: no cgroup2 mount");
            return;
        };
        let top = read_or_empty(&mount, "cgroup.controllers");
        let Some(ctrl) = ["hugetlb", "pids", "memory"]
            .into_iter()
            .find(|c| words(&top).contains(c))
        else {
            println!("skipped: the cgroup2 mount offers no domain controller");
            return;
        };
        let tag = format!("cybd-unit-{}", std::process::id());
        let (own, alone) = (mount.join(&tag), mount.join(format!("{tag}-alone")));
        let fallback_base = mount.join(format!("{tag}-base"));
        let mut cleanup = RealSetupCleanup {
            mount: mount.clone(),
            dirs: vec![own.clone(), alone.clone(), fallback_base.clone()],
            disable: None,
            sleeper: None,
        };
        if !words(&read_or_empty(&mount, "cgroup.subtree_control")).contains(&ctrl) {
            assert!(enable_controllers(&mount, &[ctrl]).is_empty());
            cleanup.disable = Some(ctrl);
        }
        let spawn_into = |dir: &Path, cmd: &mut std::process::Command| {
            use std::os::unix::process::CommandExt;
            let procs = OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .unwrap();
            let fd = procs.as_raw_fd();
            // SAFETY: join_in_child only calls write(2), which is async-signal-safe.
            unsafe { cmd.pre_exec(move || join_in_child(&[fd])) };
            let child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
            drop(procs);
            child
        };

        // Another process in `own`: the subtree goes to the top of the mount.
        fs::create_dir(&own).unwrap();
        cleanup.sleeper = Some(spawn_into(&own, std::process::Command::new("sleep").arg("30")));
        let mut notes = Vec::new();
        let got = setup_unified(&own, &mount, &format!("{tag}-base"), &[ctrl], &mut notes);
        assert_eq!(got.map(|g| g.0), Some(fallback_base.clone()));
        assert!(
            notes[0].contains("holds other processes") && notes[0].contains("instead"),
            "{notes:?}"
        );
        assert!(words(&read_or_empty(&fallback_base, "cgroup.subtree_control")).contains(&ctrl));
        assert_eq!(
            read_or_empty(&own, "cgroup.subtree_control").trim(),
            "",
            "own left alone"
        );

        // Alone in `alone`: into the leaf, controllers enabled below.
        fs::create_dir(&alone).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "--exact",
            "cgroup::tests::unified_setup_on_the_real_kernel",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{}|{}|{ctrl}", alone.display(), mount.display()));
        let out = spawn_into(&alone, &mut cmd).wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let want_base = alone.join("base");
        assert!(text.contains(&format!("BASE=Some({want_base:?})")), "{text}");
        assert!(text.contains("NOTES=[]"), "{text}");
        let cgroup_line = text.lines().find_map(|l| l.strip_prefix("CGROUP=")).unwrap_or("");
        assert!(
            cgroup_line.ends_with(&format!("/{tag}-alone/{DAEMON_LEAF}")),
            "{text}"
        );
        assert!(words(&read_or_empty(&alone, "cgroup.subtree_control")).contains(&ctrl));
        assert!(words(&read_or_empty(&want_base, "cgroup.subtree_control")).contains(&ctrl));
        drop(cleanup);
        assert!(!own.exists() && !alone.exists() && !fallback_base.exists());
    }

    #[test]
    fn remove_tree_of_plain_dirs_and_pids_of_missing_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job_1");
        fs::create_dir_all(job.join("sub/subsub")).unwrap();
        remove_tree(&job, Instant::now()).unwrap();
        assert!(!job.exists());
        remove_tree(&job, Instant::now()).unwrap();
        let mut pids = Vec::new();
        read_pids_recursive(&job, &mut pids).unwrap();
        assert!(pids.is_empty());
        fs::create_dir(&job).unwrap();
        fs::write(job.join("cgroup.procs"), "12\n0\n13\n").unwrap();
        read_pids_recursive(&job, &mut pids).unwrap();
        assert_eq!(
            pids,
            [12, 13],
            "0 (a process outside our pid namespace) is never listed"
        );
    }
}
