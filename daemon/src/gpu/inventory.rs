//! The GPUs of this host: from NVML (through `nvml-wrapper`, which `dlopen`s
//! `libnvidia-ml.so.1` at run time, so a host without the NVIDIA driver gets an empty
//! inventory and a health line saying why, never a crash) or from the `[[gpu]]` entries of
//! the config. Each GPU carries its device nodes with their major/minor numbers, read by
//! `stat`, which the cgroup device allow-list needs.
//!
//! A GPU that cybd cannot safely hand out stays listed, with [`Gpu::problems`] saying why
//! (a configured device node that is missing or not a character device, an NVML query that
//! failed): the daemon keeps running, `cybctl gpus` shows the reason, and
//! [`allocate`](super::allocate) skips it. [`Inventory::refresh`] looks again.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::config::{GpuConfig, GpuSource, StaticGpu};

/// The library NVML is loaded from (the name nvml-wrapper opens by default).
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// A device node and its numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

impl DeviceNode {
    /// Stats `path` (following symlinks, as opening it would); the error says what is wrong.
    pub fn stat(path: &Path) -> Result<DeviceNode, String> {
        let md = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("device node {} is missing", path.display())
            } else {
                format!("cannot stat device node {}: {e}", path.display())
            }
        })?;
        if !md.file_type().is_char_device() {
            return Err(format!("{} is not a character device", path.display()));
        }
        let rdev = md.rdev();
        Ok(DeviceNode {
            path: path.to_path_buf(),
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        })
    }
}

/// A compute process on a GPU, as NVML reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// One GPU. The live figures are `None` where NVML does not give them (always, for a GPU
/// from the config).
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    /// NVML's index (PCI bus order) or the configured one; names the lockfile.
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    /// The device nodes this GPU should have: configured, or `/dev/nvidia<minor>`.
    pub device_paths: Vec<PathBuf>,
    /// Those of [`device_paths`](Self::device_paths) that exist as character devices.
    pub devices: Vec<DeviceNode>,
    /// Compute processes on the GPU (of cybd's jobs or not); empty without NVML.
    pub compute_processes: Vec<ComputeProcess>,
    /// Why cybd does not hand this GPU out; empty when it may.
    pub problems: Vec<String>,
    /// Other things worth showing that do not stop its use.
    pub notes: Vec<String>,
}

impl Gpu {
    /// A GPU with only an index (no nodes, no figures): the start of a static entry, and a
    /// fake for tests.
    pub fn new(index: u32) -> Gpu {
        Gpu {
            index,
            uuid: None,
            name: None,
            memory_total_bytes: None,
            memory_used_bytes: None,
            utilization_percent: None,
            temperature_c: None,
            device_paths: Vec::new(),
            devices: Vec::new(),
            compute_processes: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether cybd may hand this GPU to a job (if its lock is free).
    pub fn usable(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems, then the notes, in one line; `None` when there are none.
    pub fn note(&self) -> Option<String> {
        let all: Vec<&str> = self
            .problems
            .iter()
            .chain(&self.notes)
            .map(String::as_str)
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }

    fn from_static(entry: &StaticGpu) -> Gpu {
        let mut g = Gpu::new(entry.index);
        g.uuid = entry.uuid.clone();
        g.name = entry.name.clone();
        g.device_paths = entry.devices.clone();
        g.stat_nodes();
        g
    }

    /// Stats [`device_paths`](Self::device_paths) again, adding a problem for each bad one.
    fn stat_nodes(&mut self) {
        self.devices.clear();
        for p in &self.device_paths {
            match DeviceNode::stat(p) {
                Ok(n) => self.devices.push(n),
                Err(why) => self.problems.push(why),
            }
        }
    }
}

/// Where an inventory's GPUs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InventorySource {
    Nvml,
    Static,
    /// No GPUs: disabled in the config, or NVML missing and no `[[gpu]]` entries.
    None,
}

impl InventorySource {
    pub fn as_str(self) -> &'static str {
        match self {
            InventorySource::Nvml => "nvml",
            InventorySource::Static => "static",
            InventorySource::None => "none",
        }
    }
}

/// The GPUs of this host, by index.
pub struct Inventory {
    pub source: InventorySource,
    /// Sorted by index.
    pub gpus: Vec<Gpu>,
    /// The configured common device nodes that exist as character devices.
    pub common_devices: Vec<DeviceNode>,
    /// The configured common device nodes that do not (yet) exist.
    pub missing_common: Vec<PathBuf>,
    common_paths: Vec<PathBuf>,
    /// Why NVML is not used, when the config wanted it.
    nvml_error: Option<String>,
    /// `[[gpu]]` entries not used because NVML gave the inventory.
    ignored_static: usize,
    /// `gpus.source = "none"`.
    disabled: bool,
    health: String,
    nvml: Option<Nvml>,
}

impl fmt::Debug for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inventory")
            .field("source", &self.source)
            .field("gpus", &self.gpus)
            .field("common_devices", &self.common_devices)
            .field("missing_common", &self.missing_common)
            .field("health", &self.health)
            .field("nvml_loaded", &self.nvml.is_some())
            .finish_non_exhaustive()
    }
}

/// Loads and initialises NVML from `lib`; the error is one lower-case phrase.
pub(crate) fn init_nvml(lib: &OsStr) -> Result<Nvml, String> {
    Nvml::builder()
        .lib_path(lib)
        .init()
        .map_err(|e| describe_nvml_error(lib, &e))
}

fn describe_nvml_error(lib: &OsStr, e: &NvmlError) -> String {
    let lib = lib.to_string_lossy();
    match e {
        NvmlError::LibloadingError(le) => {
            let s = le.to_string();
            if s.contains("No such file") || s.contains("cannot open shared object") {
                format!("{lib} not found (no NVIDIA driver)")
            } else {
                format!("cannot load {lib}: {s}")
            }
        }
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".to_string(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_string(),
        NvmlError::FailedToLoadSymbol(s) => {
            format!("{lib} lacks a function cybd needs (driver too old?): {s}")
        }
        other => format!("cannot initialise NVML: {other}"),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Reads one GPU from NVML: identity, device node, live figures and compute processes.
fn nvml_gpu(nvml: &Nvml, index: u32, uuid: Option<&str>) -> Gpu {
    let mut g = Gpu::new(index);
    // A GPU already known is found again by UUID, which survives renumbering.
    let dev = match uuid {
        Some(u) => nvml.device_by_uuid(u),
        None => nvml.device_by_index(index),
    };
    let dev = match dev {
        Ok(d) => d,
        Err(e) => {
            g.uuid = uuid.map(str::to_string);
            g.problems.push(format!("nvml: cannot query GPU {index}: {e}"));
            return g;
        }
    };
    g.uuid = dev.uuid().ok();
    g.name = dev.name().ok();
    if let Ok(m) = dev.memory_info() {
        g.memory_total_bytes = Some(m.total);
        g.memory_used_bytes = Some(m.used);
    }
    g.utilization_percent = dev.utilization_rates().ok().map(|u| u.gpu);
    g.temperature_c = dev.temperature(TemperatureSensor::Gpu).ok();
    match dev.minor_number() {
        Ok(minor) => g.device_paths = vec![PathBuf::from(format!("/dev/nvidia{minor}"))],
        Err(e) => g
            .problems
            .push(format!("nvml: no minor number ({e}), so no device node to allow")),
    }
    match dev.running_compute_processes() {
        Ok(procs) => {
            g.compute_processes = procs
                .into_iter()
                .map(|p| ComputeProcess {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                })
                .collect();
        }
        Err(e) => g.notes.push(format!("nvml: cannot list compute processes: {e}")),
    }
    g.stat_nodes();
    g
}

impl Inventory {
    /// Finds the GPUs as `cfg` says, and returns them with a one-line health summary (also
    /// kept in [`health`](Self::health)). Never fails: what is wrong is in the health line
    /// and in each GPU's problems. Blocking (NVML calls, `stat`).
    pub fn load(cfg: &GpuConfig) -> (Inventory, String) {
        Self::load_with(cfg, OsStr::new(NVML_LIBRARY))
    }

    /// [`load`](Self::load) with NVML taken from `nvml_lib`.
    pub fn load_with(cfg: &GpuConfig, nvml_lib: &OsStr) -> (Inventory, String) {
        let mut inv = Inventory {
            source: InventorySource::None,
            gpus: Vec::new(),
            common_devices: Vec::new(),
            missing_common: Vec::new(),
            common_paths: cfg.common_devices.clone(),
            nvml_error: None,
            ignored_static: 0,
            disabled: cfg.source == GpuSource::None,
            health: String::new(),
            nvml: None,
        };
        let nvml = match cfg.source {
            GpuSource::Auto | GpuSource::Nvml => match init_nvml(nvml_lib) {
                Ok(n) => Some(n),
                Err(why) => {
                    inv.nvml_error = Some(why);
                    None
                }
            },
            GpuSource::Static | GpuSource::None => None,
        };
        if let Some(nvml) = nvml {
            inv.source = InventorySource::Nvml;
            inv.ignored_static = cfg.entries.len();
            match nvml.device_count() {
                Ok(n) => inv.gpus = (0..n).map(|i| nvml_gpu(&nvml, i, None)).collect(),
                Err(e) => inv.nvml_error = Some(format!("cannot count GPUs: {e}")),
            }
            inv.nvml = Some(nvml);
        } else if matches!(cfg.source, GpuSource::Auto | GpuSource::Static) && !cfg.entries.is_empty() {
            inv.source = InventorySource::Static;
            inv.gpus = cfg.entries.iter().map(Gpu::from_static).collect();
        }
        inv.gpus.sort_by_key(|g| g.index);
        inv.stat_common();
        inv.health = inv.compute_health();
        let health = inv.health.clone();
        (inv, health)
    }

    /// An inventory of exactly `gpus` with no NVML behind it (source "static"), for tests
    /// and tools. [`refresh`](Self::refresh) only stats their device nodes again.
    pub fn from_gpus(mut gpus: Vec<Gpu>) -> Inventory {
        gpus.sort_by_key(|g| g.index);
        let mut inv = Inventory {
            source: InventorySource::Static,
            gpus,
            common_devices: Vec::new(),
            missing_common: Vec::new(),
            common_paths: Vec::new(),
            nvml_error: None,
            ignored_static: 0,
            disabled: false,
            health: String::new(),
            nvml: None,
        };
        inv.health = inv.compute_health();
        inv
    }

    /// Reads the live figures (memory, utilization, temperature, compute processes) again
    /// and stats every device node again, so a node that appeared (nvidia-uvm is created on
    /// first use) or vanished is seen. Returns the new health line. Blocking.
    pub fn refresh(&mut self) -> String {
        match &self.nvml {
            Some(nvml) => {
                for g in &mut self.gpus {
                    *g = nvml_gpu(nvml, g.index, g.uuid.clone().as_deref());
                }
            }
            None => {
                for g in &mut self.gpus {
                    g.problems.clear();
                    g.stat_nodes();
                }
            }
        }
        self.stat_common();
        self.health = self.compute_health();
        self.health.clone()
    }

    /// The one-line summary of the last load or refresh.
    pub fn health(&self) -> &str {
        &self.health
    }

    /// Whether NVML is loaded (and gives the live figures).
    pub fn nvml_loaded(&self) -> bool {
        self.nvml.is_some()
    }

    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// The device nodes a job on the GPUs `indices` may open: theirs and the common ones,
    /// for the cgroup device allow-list.
    pub fn job_devices(&self, indices: &[u32]) -> Vec<DeviceNode> {
        let mut v: Vec<DeviceNode> = self
            .gpus
            .iter()
            .filter(|g| indices.contains(&g.index))
            .flat_map(|g| g.devices.iter().cloned())
            .collect();
        v.extend(self.common_devices.iter().cloned());
        v
    }

    /// `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` for the GPUs `indices`: UUIDs where
    /// known (CUDA's own order is not NVML's), else the indices, comma-separated.
    pub fn visible_devices(&self, indices: &[u32]) -> String {
        indices
            .iter()
            .map(|&i| match self.gpu(i).and_then(|g| g.uuid.clone()) {
                Some(u) => u,
                None => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn stat_common(&mut self) {
        self.common_devices.clear();
        self.missing_common.clear();
        for p in &self.common_paths {
            match DeviceNode::stat(p) {
                Ok(n) => self.common_devices.push(n),
                Err(_) => self.missing_common.push(p.clone()),
            }
        }
    }

    fn compute_health(&self) -> String {
        if self.disabled {
            return "none: GPUs disabled in the config (gpus.source = \"none\"); 0 GPUs".to_string();
        }
        let n = self.gpus.len();
        let mut s = match (self.source, &self.nvml_error) {
            (InventorySource::Nvml, None) => format!("nvml: {}", plural(n, "GPU")),
            (InventorySource::Nvml, Some(e)) => format!("nvml: {e}; 0 GPUs"),
            (InventorySource::Static, None) => format!("static: {} from the config", plural(n, "GPU")),
            (InventorySource::Static, Some(e)) => {
                format!("nvml: {e}; static: {} from the config", plural(n, "GPU"))
            }
            (InventorySource::None, Some(e)) => format!("nvml: {e}; 0 GPUs"),
            (InventorySource::None, None) => "static: no [[gpu]] entries; 0 GPUs".to_string(),
        };
        if self.ignored_static > 0 {
            let entries = match self.ignored_static {
                1 => "1 [[gpu]] entry".to_string(),
                k => format!("{k} [[gpu]] entries"),
            };
            s.push_str(&format!(" ({entries} ignored: NVML found the GPUs)"));
        }
        let bad: Vec<String> = self
            .gpus
            .iter()
            .filter(|g| !g.usable())
            .map(|g| format!("gpu {}: {}", g.index, g.problems.join(", ")))
            .collect();
        if !bad.is_empty() {
            s.push_str(&format!(", {} unusable ({})", bad.len(), bad.join("; ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::config::GpusSection;

    fn nvml_present() -> bool {
        init_nvml(OsStr::new(NVML_LIBRARY)).is_ok()
    }

    fn static_cfg(entries: Vec<StaticGpu>, source: GpuSource) -> GpuConfig {
        GpuConfig::resolve(
            GpusSection {
                source,
                allow_shared: false,
                common_devices: Some(vec!["/dev/null".into(), "/nonexistent/nvidia-uvm".into()]),
            },
            entries,
        )
        .unwrap()
    }

    fn entry(index: u32, devices: &[&str]) -> StaticGpu {
        StaticGpu {
            index,
            uuid: Some(format!("GPU-test-{index}")),
            name: Some("fake".into()),
            devices: devices.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        let e = init_nvml(OsStr::new("/nonexistent/libnvidia-ml.so.1")).unwrap_err();
        assert_eq!(e, "/nonexistent/libnvidia-ml.so.1 not found (no NVIDIA driver)");
        // A file that is not a library: loading fails with the loader's reason.
        let e = init_nvml(OsStr::new("/etc/hostname")).unwrap_err();
        assert!(e.starts_with("cannot load /etc/hostname: "), "{e}");
    }

    #[test]
    fn nvml_missing_gives_an_empty_inventory() {
        let cfg = GpuConfig {
            source: GpuSource::Nvml,
            ..GpuConfig::default()
        };
        let (inv, health) = Inventory::load_with(&cfg, OsStr::new("/nonexistent/libnvidia-ml.so.1"));
        assert!(inv.gpus.is_empty());
        assert_eq!(inv.source, InventorySource::None);
        assert!(!inv.nvml_loaded());
        assert_eq!(
            health,
            "nvml: /nonexistent/libnvidia-ml.so.1 not found (no NVIDIA driver); 0 GPUs"
        );
        assert_eq!(inv.health(), health);
        // With the default library name, on a host without the driver.
        if !nvml_present() {
            let (inv, health) = Inventory::load(&GpuConfig::default());
            assert!(inv.gpus.is_empty());
            assert_eq!(
                health,
                "nvml: libnvidia-ml.so.1 not found (no NVIDIA driver); 0 GPUs"
            );
        }
    }

    #[test]
    fn auto_falls_back_to_static_entries() {
        let cfg = static_cfg(vec![entry(1, &["/dev/null"]), entry(0, &[])], GpuSource::Auto);
        let (inv, health) = Inventory::load_with(&cfg, OsStr::new("/nonexistent/libnvidia-ml.so.1"));
        assert_eq!(inv.source, InventorySource::Static);
        assert_eq!(
            health,
            "nvml: /nonexistent/libnvidia-ml.so.1 not found (no NVIDIA driver); static: 2 GPUs from the config"
        );
        assert_eq!(inv.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 1]);
        let g1 = inv.gpu(1).unwrap();
        assert!(g1.usable());
        assert_eq!(
            g1.devices,
            vec![DeviceNode {
                path: "/dev/null".into(),
                major: 1,
                minor: 3
            }]
        );
        assert!(inv.gpu(0).unwrap().usable(), "a GPU with no nodes is usable");
        assert_eq!(inv.common_devices.len(), 1);
        assert_eq!(inv.missing_common, vec![PathBuf::from("/nonexistent/nvidia-uvm")]);
    }

    #[test]
    fn static_and_none_sources() {
        let cfg = static_cfg(vec![entry(0, &[])], GpuSource::Static);
        let (inv, health) = Inventory::load(&cfg);
        assert_eq!(health, "static: 1 GPU from the config");
        assert!(!inv.nvml_loaded());
        let cfg = static_cfg(vec![entry(0, &[])], GpuSource::None);
        let (inv, health) = Inventory::load(&cfg);
        assert!(inv.gpus.is_empty());
        assert_eq!(inv.source, InventorySource::None);
        assert_eq!(
            health,
            "none: GPUs disabled in the config (gpus.source = \"none\"); 0 GPUs"
        );
        let (_, health) = Inventory::load(&static_cfg(vec![], GpuSource::Static));
        assert_eq!(health, "static: no [[gpu]] entries; 0 GPUs");
    }

    #[test]
    fn bad_nodes_make_a_gpu_unusable_not_the_daemon_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("nvidia0");
        std::fs::write(&plain, "").unwrap();
        let missing = tmp.path().join("nvidia1");
        let cfg = static_cfg(
            vec![
                entry(0, &[plain.to_str().unwrap()]),
                entry(1, &[missing.to_str().unwrap()]),
                entry(2, &["/dev/null"]),
            ],
            GpuSource::Static,
        );
        let (mut inv, health) = Inventory::load(&cfg);
        assert_eq!(inv.gpus.len(), 3);
        let g0 = inv.gpu(0).unwrap();
        assert!(!g0.usable());
        assert_eq!(
            g0.problems,
            vec![format!("{} is not a character device", plain.display())]
        );
        let g1 = inv.gpu(1).unwrap();
        assert_eq!(
            g1.note(),
            Some(format!("device node {} is missing", missing.display()))
        );
        assert!(inv.gpu(2).unwrap().usable());
        assert!(
            health.starts_with("static: 3 GPUs from the config, 2 unusable (gpu 0: "),
            "{health}"
        );
        // The node appears (here as a symlink to a character device): refresh sees it.
        std::os::unix::fs::symlink("/dev/null", &missing).unwrap();
        let health = inv.refresh();
        assert!(inv.gpu(1).unwrap().usable());
        assert_eq!(inv.gpu(1).unwrap().devices[0].major, 1);
        assert!(health.contains("1 unusable (gpu 0: "), "{health}");
    }

    #[test]
    fn devices_and_visible_list_for_a_job() {
        let mut a = Gpu::new(0);
        a.uuid = Some("GPU-a".into());
        a.devices = vec![DeviceNode {
            path: "/dev/nvidia0".into(),
            major: 195,
            minor: 0,
        }];
        let mut b = Gpu::new(1);
        b.devices = vec![DeviceNode {
            path: "/dev/nvidia1".into(),
            major: 195,
            minor: 1,
        }];
        let mut inv = Inventory::from_gpus(vec![b, a]);
        inv.common_devices = vec![DeviceNode {
            path: "/dev/nvidiactl".into(),
            major: 195,
            minor: 255,
        }];
        assert_eq!(inv.gpus[0].index, 0);
        assert_eq!(inv.visible_devices(&[1, 0]), "1,GPU-a");
        let d = inv.job_devices(&[1]);
        assert_eq!(
            d.iter().map(|n| (n.major, n.minor)).collect::<Vec<_>>(),
            vec![(195, 1), (195, 255)]
        );
        assert_eq!(inv.health(), "static: 2 GPUs from the config");
    }

    #[test]
    fn inventory_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Inventory>();
    }
}
