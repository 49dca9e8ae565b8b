//! Host: what this machine lets cybd enforce and hand out, found once at start-up and
//! shared by the scheduler (which confines and places jobs) and the RPC server (which
//! reports it): the cgroup driver and what it enforces, whether device denial really works
//! (a probe in a throw-away cgroup), the GPU inventory and the per-GPU lockfiles.
//!
//! Everything here blocks (cgroupfs, /proc, NVML, flock): call it from `spawn_blocking`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use cyb_proto::JobRecord;
use cyb_proto::rpc::{CgroupHealth, DeviceHealth, GpuHealth, Health};
use tracing::{info, warn};

use crate::cgroup::{Cgroups, DeviceAllow, DeviceProbe, DeviceRule, JobCgroup, Limits, Mode};
use crate::config::Config;
use crate::gpu::{GpuLease, GpuLocks, Holder, Inventory, LockStatus};

/// What this host cannot do for a job, naming the field, GPU or cgroup involved.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no cgroup device control ({0})")]
    NoDeviceControl(String),
    #[error("device denial does not work on this host ({0})")]
    DenialBroken(String),
    #[error("device denial was not probed")]
    NotProbed,
    #[error("a GPU job is not started without device control: {0}")]
    Unfenced(Box<HostError>),
    #[error("require_limits is set and this host cannot enforce: {}", .0.join(", "))]
    Unenforceable(Vec<&'static str>),
    /// Under `require_limits`: `field` of the spec asks for what this host cannot enforce.
    #[error("{why}")]
    NotEnforceable { field: &'static str, why: String },
    #[error("cannot confine the job: {0}")]
    Confine(#[source] crate::cgroup::CgroupError),
    #[error(
        "cannot create the job's cgroup, and on a host with GPUs a job is not started without device control: {0}"
    )]
    UnconfinedOnGpuHost(#[source] crate::cgroup::CgroupError),
    #[error("gpu {gpu} is held outside cybd")]
    GpuHeldOutside { gpu: u32 },
}

/// What confines and equips jobs on this host.
pub struct Host {
    pub cgroups: Cgroups,
    pub probe: Option<DeviceProbe>,
    inventory: Mutex<Inventory>,
    pub locks: GpuLocks,
    user_mode: bool,
    /// The Docker engine, once the docker backend is made (for `cybctl health`).
    docker: std::sync::OnceLock<std::sync::Arc<crate::backend::docker::engine::Engine>>,
}

/// What a job gets when it starts, kept until its supervisor holds it.
pub struct Confinement {
    pub cgroup: Option<JobCgroup>,
    pub gpus: Vec<GpuLease>,
}

impl Host {
    /// Detects cgroups (unless disabled), probes device denial, loads the GPU inventory.
    pub fn init(cfg: &Config) -> Host {
        let cgroups = if !cfg.cgroups_enabled {
            Cgroups::none("cgroups disabled in the configuration ([cgroups] enabled = false)")
        } else if cfg.user_mode {
            Cgroups::none("user mode: cybd --user does not manage cgroups")
        } else {
            Cgroups::detect(&cfg.cgroup_name)
        };
        info!("cgroups: {}", cgroups.describe());
        if cgroups.mode() != Mode::None {
            info!("cgroup routing: {}", cgroups.routing());
        }
        // Enough spare memory cgroups for every slot's next job.
        let slots: usize = cfg.classes.values().map(|c| c.slots).sum();
        cgroups.set_spare_capacity(slots.clamp(1, 256));
        let probe = (cgroups.mode() != Mode::None).then(|| cgroups.probe_device_denial());
        match &probe {
            Some(p) if p.enforced() => info!("device control: {p}"),
            Some(p) => warn!("device control does not work on this host: {p}"),
            None => warn!("device control: not available without cgroups"),
        }
        let (inventory, health) = Inventory::load(&cfg.gpus);
        info!("gpus: {health}");
        let locks = GpuLocks::for_runtime(&cfg.paths.runtime);
        let usable: Vec<u32> = inventory
            .gpus
            .iter()
            .filter(|g| g.usable())
            .map(|g| g.index)
            .collect();
        if let Err(e) = locks.prepare(usable) {
            warn!("gpu lockfiles: {e}");
        }
        Host {
            cgroups,
            probe,
            inventory: Mutex::new(inventory),
            locks,
            user_mode: cfg.user_mode,
            docker: std::sync::OnceLock::new(),
        }
    }

    /// Tells health about the Docker engine docker jobs run on.
    pub fn set_docker_engine(&self, e: std::sync::Arc<crate::backend::docker::engine::Engine>) {
        let _ = self.docker.set(e);
    }

    fn inventory(&self) -> std::sync::MutexGuard<'_, Inventory> {
        self.inventory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a job can be kept to its own GPUs here: a cgroup device filter exists and the
    /// start-up probe saw it deny; `Err` says why not.
    pub fn gpu_fencing(&self) -> Result<(), HostError> {
        if self.cgroups.mode() == Mode::None || !self.cgroups.capabilities().devices {
            return Err(HostError::NoDeviceControl(self.cgroups.describe()));
        }
        match &self.probe {
            Some(p) if p.enforced() => Ok(()),
            Some(p) => Err(HostError::DenialBroken(p.to_string())),
            None => Err(HostError::NotProbed),
        }
    }

    /// The UUID of each GPU the inventory knows one for, by index.
    pub fn gpu_uuids(&self) -> std::collections::HashMap<u32, String> {
        self.inventory()
            .gpus
            .iter()
            .filter_map(|g| Some((g.index, g.uuid.clone()?)))
            .collect()
    }

    /// Indices of the GPUs jobs can be given.
    pub fn usable_gpus(&self) -> BTreeSet<u32> {
        self.inventory()
            .gpus
            .iter()
            .filter(|g| g.usable())
            .map(|g| g.index)
            .collect()
    }

    /// Usable GPUs that something other than a cybd job holds or uses now (an outside
    /// `flock` on the lockfile, or foreign compute processes when sharing is off).
    pub fn gpus_taken_outside(&self, allow_shared: bool) -> BTreeSet<u32> {
        let mut inv = self.inventory();
        if inv.nvml_loaded() {
            inv.refresh();
        }
        let mut out = BTreeSet::new();
        for g in inv.gpus.iter().filter(|g| g.usable()) {
            match self.locks.status(g.index) {
                // A cybd job's GPU: its processes are the job's, not foreign ones.
                Ok(LockStatus::HeldByCyb(_)) => {}
                Ok(LockStatus::Free) => {
                    if !allow_shared && !g.compute_processes.is_empty() {
                        out.insert(g.index);
                    }
                }
                Ok(LockStatus::HeldOutside) | Err(_) => {
                    out.insert(g.index);
                }
            }
        }
        out
    }

    /// The limits a job gets: its own, else its class's defaults, plus a device allow-list
    /// of its GPUs' nodes (every other GPU node is denied; a job without GPUs gets none).
    pub fn limits_for(&self, cfg: &Config, rec: &JobRecord, gpus: &[u32]) -> Limits {
        let class = cfg.class(rec.spec.class());
        let r = rec.spec.resources.as_ref();
        let caps = self.cgroups.capabilities();
        // A job without GPUs gets no GPU node at all, not even the common ones (nvidiactl,
        // nvidia-uvm); it also spares CPU jobs the inventory's lock.
        let nodes = if gpus.is_empty() {
            Vec::new()
        } else {
            self.inventory().job_devices(gpus)
        };
        let rules = nodes
            .iter()
            .map(|n| DeviceRule::char(n.major, Some(n.minor), true, true))
            .collect();
        Limits {
            memory_bytes: r.and_then(|r| r.memory.map(|m| m.0)).or(class.memory),
            cpus: r.and_then(|r| r.cpus).or(class.cpus),
            pids: r
                .and_then(|r| r.pids)
                .and_then(|p| u64::try_from(p).ok())
                .or(class.pids),
            devices: caps.devices.then(|| DeviceAllow::new(rules)),
        }
    }

    /// What of `limits` this host cannot enforce, in words (empty: all of it).
    pub fn unenforceable(&self, limits: &Limits, gpus: &[u32]) -> Vec<&'static str> {
        let caps = self.cgroups.capabilities();
        let mut missing = Vec::new();
        if limits.memory_bytes.is_some() && !caps.memory {
            missing.push("memory");
        }
        if limits.cpus.is_some() && !caps.cpu {
            missing.push("cpu");
        }
        if limits.pids.is_some() && !caps.pids {
            missing.push("pids");
        }
        if !gpus.is_empty() && !caps.devices {
            missing.push("devices");
        }
        if self.cgroups.mode() == Mode::None {
            missing.push("cgroup");
        }
        missing
    }

    /// What a job with `spec` would have (of its own, or from its class) that this host will
    /// not enforce, by the spec's names (`memory`, `cpus`, `pids`, `gpus`), and why; `None`
    /// when it is all enforced.
    pub fn not_enforced(&self, cfg: &Config, spec: &cyb_proto::JobSpec) -> Option<cyb_proto::NotEnforced> {
        let caps = self.cgroups.capabilities();
        let none = self.cgroups.mode() == Mode::None;
        let class = cfg.class(spec.class());
        let r = spec.resources.as_ref();
        let limits: Vec<String> = [
            (
                "memory",
                r.and_then(|r| r.memory).is_some() || class.memory.is_some(),
                caps.memory,
            ),
            (
                "cpus",
                r.and_then(|r| r.cpus).is_some() || class.cpus.is_some(),
                caps.cpu,
            ),
            (
                "pids",
                r.and_then(|r| r.pids).is_some() || class.pids.is_some(),
                caps.pids,
            ),
            ("gpus", spec.gpus() > 0, caps.devices),
        ]
        .into_iter()
        .filter(|(_, asked, can)| *asked && (none || !can))
        .map(|(name, ..)| name.to_string())
        .collect();
        if limits.is_empty() {
            return None;
        }
        let why = if self.user_mode {
            "user mode".to_string()
        } else {
            self.cgroups.describe()
        };
        Some(cyb_proto::NotEnforced { limits, why })
    }

    /// Under `require_limits`: whether every limit `spec` asks for (or its class gives it)
    /// can be enforced here; the error names the field and what is missing.
    pub fn check_enforceable(&self, cfg: &Config, spec: &cyb_proto::JobSpec) -> Result<(), HostError> {
        if self.cgroups.mode() == Mode::None {
            return Err(HostError::NotEnforceable {
                field: "resources",
                why: format!(
                    "this host cannot confine jobs ({}) and require_limits is set",
                    self.cgroups.describe()
                ),
            });
        }
        let Some(missing) = self.not_enforced(cfg, spec) else {
            return Ok(());
        };
        let field = match missing.limits.first().map(String::as_str) {
            Some("memory") => "resources.memory",
            Some("cpus") => "resources.cpus",
            Some("pids") => "resources.pids",
            Some("gpus") => "resources.gpus",
            _ => "resources",
        };
        Err(HostError::NotEnforceable {
            field,
            why: format!(
                "this host cannot enforce it ({}) and require_limits is set",
                self.cgroups.describe()
            ),
        })
    }

    /// Takes the locks of `gpus` for job `id` (all or nothing); `Err` names a GPU whose
    /// lock something else holds.
    pub fn acquire_gpus(&self, id: u64, user: &str, gpus: &[u32]) -> Result<Vec<GpuLease>, HostError> {
        let mut leases = Vec::new();
        let holder = Holder::new(id, user.to_string());
        for &i in gpus {
            // The periodic probe holds a lock for an instant while it looks: a busy lock is
            // tried a few times over a few milliseconds before it counts as taken.
            let mut got = self.locks.try_acquire(i, &holder);
            for _ in 0..3 {
                if !matches!(got, Ok(None)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                got = self.locks.try_acquire(i, &holder);
            }
            match got {
                Ok(Some(l)) => leases.push(l),
                Ok(None) => {
                    release_gpus(leases);
                    return Err(HostError::GpuHeldOutside { gpu: i });
                }
                Err(e) => {
                    warn!(job_id = id, "gpu {i}: {e}");
                    release_gpus(leases);
                    return Err(HostError::GpuHeldOutside { gpu: i });
                }
            }
        }
        Ok(leases)
    }

    /// Creates the job's cgroup; `leases` (its GPUs' locks) are given back on failure.
    pub fn prepare(
        &self,
        cfg: &Config,
        rec: &JobRecord,
        gpus: &[u32],
        leases: Vec<GpuLease>,
        attempt: u32,
    ) -> Result<Confinement, HostError> {
        if !gpus.is_empty()
            && let Err(why) = self.gpu_fencing()
        {
            release_gpus(leases);
            return Err(HostError::Unfenced(Box::new(why)));
        }
        let limits = self.limits_for(cfg, rec, gpus);
        let missing = self.unenforceable(&limits, gpus);
        if cfg.require_limits && !missing.is_empty() {
            release_gpus(leases);
            return Err(HostError::Unenforceable(missing));
        }
        // Limits the job asked for (or its class gives it) that it will not get; that this
        // host has no cgroups at all is said once, at start-up and in `cybctl health`.
        let unmet: Vec<&str> = missing.iter().copied().filter(|m| *m != "cgroup").collect();
        if !unmet.is_empty() && attempt <= 1 {
            warn!(
                job_id = rec.id,
                "not enforced for this job on this host: {}",
                unmet.join(", ")
            );
        }
        let cgroup = if self.cgroups.mode() == Mode::None {
            None
        } else {
            // Only what this host enforces is asked for; what it cannot was refused above
            // under require_limits and is logged otherwise.
            let caps = self.cgroups.capabilities();
            let enforceable = Limits {
                memory_bytes: limits.memory_bytes.filter(|_| caps.memory),
                cpus: limits.cpus.filter(|_| caps.cpu),
                pids: limits.pids.filter(|_| caps.pids),
                devices: limits.devices.clone().filter(|_| caps.devices),
            };
            // A job that cannot write to its cgroup may get a used one, and leave its own.
            let reusable = nix::unistd::geteuid().is_root() && rec.owner.uid != 0;
            match self.cgroups.create_for(rec.id, attempt, &enforceable, reusable) {
                Ok(cg) => Some(cg),
                Err(e) if cfg.require_limits => {
                    release_gpus(leases);
                    return Err(HostError::Confine(e));
                }
                Err(e) => {
                    if !gpus.is_empty() || !self.usable_gpus().is_empty() {
                        // Without its cgroup's device filter a job could open every GPU,
                        // its own or another job's.
                        release_gpus(leases);
                        return Err(HostError::UnconfinedOnGpuHost(e));
                    }
                    warn!(
                        job_id = rec.id,
                        "job runs unconfined: cannot create its cgroup: {e}"
                    );
                    None
                }
            }
        };
        Ok(Confinement { cgroup, gpus: leases })
    }

    /// Environment a GPU job gets: which GPUs it may use, in PCI bus order.
    pub fn gpu_env(&self, gpus: &[u32]) -> Vec<(String, String)> {
        if gpus.is_empty() {
            return Vec::new();
        }
        let visible = self.inventory().visible_devices(gpus);
        let indices: Vec<String> = gpus.iter().map(u32::to_string).collect();
        vec![
            ("CUDA_VISIBLE_DEVICES".into(), visible.clone()),
            ("NVIDIA_VISIBLE_DEVICES".into(), visible),
            ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
            ("CYB_GPUS".into(), indices.join(",")),
        ]
    }

    /// For `cybctl health`.
    pub fn health(&self, cfg: &Config) -> Health {
        let caps = self.cgroups.capabilities();
        let devices_ok = self.probe.as_ref().is_some_and(DeviceProbe::enforced);
        let mut enforced = Vec::new();
        let mut not_enforced = Vec::new();
        for (name, on) in [
            ("memory", caps.memory),
            ("cpu", caps.cpu),
            ("pids", caps.pids),
            ("devices", caps.devices && devices_ok),
            ("kill", caps.kill),
        ] {
            if on {
                enforced.push(name.to_string());
            } else {
                not_enforced.push(name.to_string());
            }
        }
        let inv = self.inventory();
        let mut warnings = Vec::new();
        if !not_enforced.is_empty() {
            warnings.push(format!(
                "not enforced on this host: {}{}",
                not_enforced.join(", "),
                if cfg.require_limits {
                    " (require_limits: jobs asking for these are refused)"
                } else {
                    " (jobs run without these limits)"
                }
            ));
        }
        Health {
            version: env!("CARGO_PKG_VERSION").into(),
            user_mode: self.user_mode,
            require_limits: cfg.require_limits,
            cgroups: CgroupHealth {
                mode: format!("{:?}", self.cgroups.mode()).to_lowercase(),
                description: self.cgroups.describe(),
                enforced,
                not_enforced,
                notes: self.cgroups.notes().to_vec(),
            },
            devices: DeviceHealth {
                enforced: devices_ok,
                probe: self
                    .probe
                    .as_ref()
                    .map_or_else(|| "not probed: no cgroups".to_string(), |p| p.to_string()),
            },
            gpus: GpuHealth {
                count: inv.gpus.iter().filter(|g| g.usable()).count(),
                source: inv.source.as_str().to_string(),
                health: inv.health().to_string(),
            },
            docker: self.docker_health(cfg, &mut warnings),
            warnings,
        }
    }

    fn docker_health(&self, cfg: &Config, warnings: &mut Vec<String>) -> cyb_proto::rpc::DockerHealth {
        let configured = if cfg.docker.allowed_images.is_empty() {
            Err("docker jobs are not allowed on this host: [docker] allowed_images is empty".to_string())
        } else {
            Ok(())
        };
        let Some(e) = self.docker.get() else {
            return cyb_proto::rpc::DockerHealth {
                problem: configured.err(),
                ..Default::default()
            };
        };
        let on = configured.is_ok();
        let h = e.health(configured, &cfg.docker.gpu_runtime);
        if on && !h.reachable {
            warnings.push(format!(
                "docker jobs wait in the queue: {}",
                h.problem
                    .as_deref()
                    .unwrap_or("the docker engine is not reachable")
            ));
        }
        h
    }

    /// For `cybctl gpus`.
    pub fn gpu_report(&self) -> cyb_proto::gpu::GpuReport {
        let mut inv = self.inventory();
        if inv.nvml_loaded() {
            inv.refresh();
        }
        crate::gpu::report(&inv, &self.locks)
    }

    /// Kills whatever runs in job `id`'s cgroup and removes it (a job whose supervisor
    /// vanished).
    pub fn remove_job_cgroup(&self, id: u64) {
        let Some(cg) = self.cgroups.open_existing(id) else {
            return;
        };
        if let Err(e) = cg.kill().and_then(|()| cg.remove()) {
            warn!(job_id = id, "cannot remove the cgroup of lost job {id}: {e}");
        } else {
            info!(
                job_id = id,
                "killed what was left of lost job {id} and removed its cgroup"
            );
        }
    }

    /// Keeps the memory cgroup an ended job's supervisor left for the next job (not
    /// blocking, unless the pool is full: then the oldest spare is removed).
    pub fn keep_spare(&self, spare: crate::cgroup::Spare) {
        if let Some(old) = self.cgroups.keep_spare(spare) {
            let cgroups = self.cgroups.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = cgroups.discard_spare(&old) {
                    warn!("cannot remove a spare memory cgroup: {e}");
                }
            });
        }
    }

    /// Kills and removes the cgroups of jobs that are not running any more (after a daemon
    /// restart, or a supervisor that died before cleaning up).
    pub fn sweep(&self, running: &BTreeSet<u64>) {
        if self.cgroups.mode() == Mode::None {
            return;
        }
        let report = self.cgroups.sweep_stale(&|id| running.contains(&id));
        if !report.removed.is_empty() {
            info!("removed the cgroups of ended jobs {:?}", report.removed);
        }
        if !report.failed.is_empty() {
            warn!("cannot remove job cgroups: {:?}", report.failed);
        }
    }
}

/// Gives locks back (clearing their holder text).
pub fn release_gpus(leases: Vec<GpuLease>) {
    for l in leases {
        let _ = l.release();
    }
}

/// Records the supervisor `pid` as the holder of `leases`, whose descriptors it received;
/// the daemon's own copies close when they are dropped, the supervisor's keep the locks.
pub fn hand_gpus_to(leases: Vec<GpuLease>, pid: i32) {
    for mut l in leases {
        if let Err(e) = l.set_pid(pid.unsigned_abs()) {
            warn!("gpu {}: cannot record holder pid {pid}: {e}", l.index());
        }
    }
}
