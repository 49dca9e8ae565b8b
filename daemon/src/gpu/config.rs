//! The GPU part of the configuration: the `[gpus]` section (where the inventory comes from,
//! whether GPUs busy with foreign work may be handed out, the device nodes every GPU job
//! needs) and the `[[gpu]]` tables that list GPUs statically, plus the checks on them.
//!
//! ```toml
//! [gpus]
//! source = "auto"          # auto | nvml | static | none
//! allow_shared = false
//! common_devices = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
//!
//! [[gpu]]
//! index = 0
//! uuid = "GPU-5c1ef1ba-0000-0000-0000-000000000000"
//! name = "NVIDIA A100-SXM4-40GB"
//! devices = ["/dev/nvidia0"]
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Device nodes every GPU job needs besides its GPUs' own, used where `common_devices` is not
/// configured. Only those that exist are allowed (`nvidia-uvm` appears once a CUDA program
/// has loaded the module, so the inventory's `refresh` looks again).
pub const DEFAULT_COMMON_DEVICES: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// Where the GPU inventory comes from (`gpus.source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    /// NVML if `libnvidia-ml.so.1` loads and initialises, else the `[[gpu]]` entries.
    #[default]
    Auto,
    /// NVML only: without it the host has no GPUs for cybd.
    Nvml,
    /// The `[[gpu]]` entries only.
    Static,
    /// No GPUs at all.
    None,
}

impl GpuSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuSource::Auto => "auto",
            GpuSource::Nvml => "nvml",
            GpuSource::Static => "static",
            GpuSource::None => "none",
        }
    }
}

/// The `[gpus]` section as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpusSection {
    #[serde(default)]
    pub source: GpuSource,
    /// Whether a GPU on which NVML shows compute processes that no cybd job started may still
    /// be given to a job. Default false: such a GPU is skipped.
    #[serde(default)]
    pub allow_shared: bool,
    /// Device nodes every GPU job needs; [`DEFAULT_COMMON_DEVICES`] when absent.
    #[serde(default)]
    pub common_devices: Option<Vec<PathBuf>>,
}

/// One `[[gpu]]` table: a GPU listed by hand, for hosts without NVML and for tests.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticGpu {
    /// The GPU's index: its lockfile is `<runtime>/gpu/<index>.lock`.
    pub index: u32,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// The device nodes that belong to this GPU, e.g. `/dev/nvidia0`. May be empty (a GPU
    /// whose device access cybd does not control).
    #[serde(default)]
    pub devices: Vec<PathBuf>,
}

/// The checked GPU configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuConfig {
    pub source: GpuSource,
    pub allow_shared: bool,
    /// Device nodes every GPU job needs (those that exist are allowed).
    pub common_devices: Vec<PathBuf>,
    /// The `[[gpu]]` entries, in file order.
    pub entries: Vec<StaticGpu>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            source: GpuSource::Auto,
            allow_shared: false,
            common_devices: DEFAULT_COMMON_DEVICES.iter().map(PathBuf::from).collect(),
            entries: Vec::new(),
        }
    }
}

/// A mistake in `[gpus]` or `[[gpu]]`. [`key`](Self::key) names the TOML key to blame
/// (`gpu[1].index`, entries counted from 0 in file order).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuConfigError {
    #[error("gpu[{entry}].index: index {index} is also given by gpu[{first}]")]
    DuplicateIndex { entry: usize, first: usize, index: u32 },
    #[error("gpu[{entry}].uuid: uuid {uuid:?} is also given by gpu[{first}]")]
    DuplicateUuid {
        entry: usize,
        first: usize,
        uuid: String,
    },
    #[error("gpu[{entry}].uuid: must not be empty (leave it out instead)")]
    EmptyUuid { entry: usize },
    #[error("{key}: device path {} is not absolute", path.display())]
    RelativeDevice { key: String, path: PathBuf },
    #[error("gpu[{entry}].devices: device {} is also listed for gpu[{first}]", path.display())]
    DuplicateDevice {
        entry: usize,
        first: usize,
        path: PathBuf,
    },
}

impl GpuConfigError {
    /// The key to blame, for `ConfigError::Key`.
    pub fn key(&self) -> String {
        match self {
            GpuConfigError::DuplicateIndex { entry, .. } => format!("gpu[{entry}].index"),
            GpuConfigError::DuplicateUuid { entry, .. } | GpuConfigError::EmptyUuid { entry } => {
                format!("gpu[{entry}].uuid")
            }
            GpuConfigError::RelativeDevice { key, .. } => key.clone(),
            GpuConfigError::DuplicateDevice { entry, .. } => format!("gpu[{entry}].devices"),
        }
    }

    /// The message without the key.
    pub fn message(&self) -> String {
        let full = self.to_string();
        let key = self.key();
        full.strip_prefix(&format!("{key}: "))
            .map_or(full.clone(), str::to_string)
    }
}

fn check_absolute(key: String, path: &Path) -> Result<(), GpuConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(GpuConfigError::RelativeDevice {
            key,
            path: path.to_path_buf(),
        })
    }
}

impl GpuConfig {
    /// Checks `[gpus]` and the `[[gpu]]` entries and fills in the defaults.
    pub fn resolve(section: GpusSection, entries: Vec<StaticGpu>) -> Result<GpuConfig, GpuConfigError> {
        let common_devices = match section.common_devices {
            Some(list) => {
                for (i, p) in list.iter().enumerate() {
                    check_absolute(format!("gpus.common_devices[{i}]"), p)?;
                }
                list
            }
            None => GpuConfig::default().common_devices,
        };
        let mut by_index: HashMap<u32, usize> = HashMap::new();
        let mut by_uuid: HashMap<&str, usize> = HashMap::new();
        let mut by_device: HashMap<&Path, usize> = HashMap::new();
        for (entry, g) in entries.iter().enumerate() {
            if let Some(&first) = by_index.get(&g.index) {
                return Err(GpuConfigError::DuplicateIndex {
                    entry,
                    first,
                    index: g.index,
                });
            }
            by_index.insert(g.index, entry);
            if let Some(uuid) = &g.uuid {
                if uuid.trim().is_empty() {
                    return Err(GpuConfigError::EmptyUuid { entry });
                }
                if let Some(&first) = by_uuid.get(uuid.as_str()) {
                    return Err(GpuConfigError::DuplicateUuid {
                        entry,
                        first,
                        uuid: uuid.clone(),
                    });
                }
                by_uuid.insert(uuid, entry);
            }
            for (i, p) in g.devices.iter().enumerate() {
                check_absolute(format!("gpu[{entry}].devices[{i}]"), p)?;
                match by_device.get(p.as_path()) {
                    Some(&first) if first != entry => {
                        return Err(GpuConfigError::DuplicateDevice {
                            entry,
                            first,
                            path: p.clone(),
                        });
                    }
                    _ => {
                        by_device.insert(p, entry);
                    }
                }
            }
        }
        Ok(GpuConfig {
            source: section.source,
            allow_shared: section.allow_shared,
            common_devices,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How the lead embeds the two tables in the config file.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        gpus: GpusSection,
        #[serde(default)]
        gpu: Vec<StaticGpu>,
    }

    fn parse(text: &str) -> Result<GpuConfig, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        GpuConfig::resolve(f.gpus, f.gpu).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, GpuConfig::default());
        assert_eq!(c.source, GpuSource::Auto);
        assert!(!c.allow_shared);
        assert_eq!(c.common_devices.len(), 4);
        assert_eq!(c.common_devices[0], Path::new("/dev/nvidiactl"));
    }

    #[test]
    fn full() {
        let c = parse(
            r#"
            [gpus]
            source = "static"
            allow_shared = true
            common_devices = ["/dev/nvidiactl"]

            [[gpu]]
            index = 1
            uuid = "GPU-b"
            devices = ["/dev/nvidia1"]

            [[gpu]]
            index = 0
            name = "Tesla T4"
            devices = ["/dev/nvidia0"]
            "#,
        )
        .unwrap();
        assert_eq!(c.source, GpuSource::Static);
        assert!(c.allow_shared);
        assert_eq!(c.common_devices, vec![PathBuf::from("/dev/nvidiactl")]);
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.entries[0].uuid.as_deref(), Some("GPU-b"));
        assert_eq!(c.entries[1].name.as_deref(), Some("Tesla T4"));
        assert_eq!(c.entries[1].devices, vec![PathBuf::from("/dev/nvidia0")]);
    }

    #[test]
    fn sources() {
        for (s, want) in [
            ("auto", GpuSource::Auto),
            ("nvml", GpuSource::Nvml),
            ("static", GpuSource::Static),
            ("none", GpuSource::None),
        ] {
            let c = parse(&format!("[gpus]\nsource = \"{s}\"\n")).unwrap();
            assert_eq!(c.source, want);
            assert_eq!(want.as_str(), s);
        }
        let e = parse("[gpus]\nsource = \"cuda\"\n").unwrap_err();
        assert!(e.contains("cuda"), "{e}");
    }

    #[test]
    fn unknown_keys() {
        let e = parse("[gpus]\nsorce = \"nvml\"\n").unwrap_err();
        assert!(e.contains("sorce"), "{e}");
        let e = parse("[[gpu]]\nindex = 0\ndevice = \"/dev/nvidia0\"\n").unwrap_err();
        assert!(e.contains("device"), "{e}");
        let e = parse("[[gpu]]\nname = \"x\"\n").unwrap_err();
        assert!(e.contains("index"), "{e}");
        let e = parse("[[gpu]]\nindex = -1\n").unwrap_err();
        assert!(e.contains("-1") || e.contains("invalid value"), "{e}");
    }

    #[test]
    fn duplicate_index() {
        let e = parse("[[gpu]]\nindex = 0\n[[gpu]]\nindex = 1\n[[gpu]]\nindex = 0\n").unwrap_err();
        assert_eq!(e, "gpu[2].index: index 0 is also given by gpu[0]");
        let f: File = toml::from_str("[[gpu]]\nindex = 3\n[[gpu]]\nindex = 3\n").unwrap();
        let err = GpuConfig::resolve(f.gpus, f.gpu).unwrap_err();
        assert_eq!(err.key(), "gpu[1].index");
        assert_eq!(err.message(), "index 3 is also given by gpu[0]");
    }

    #[test]
    fn duplicate_or_empty_uuid() {
        let e = parse("[[gpu]]\nindex = 0\nuuid = \"GPU-a\"\n[[gpu]]\nindex = 1\nuuid = \"GPU-a\"\n")
            .unwrap_err();
        assert_eq!(e, "gpu[1].uuid: uuid \"GPU-a\" is also given by gpu[0]");
        let e = parse("[[gpu]]\nindex = 0\nuuid = \"\"\n").unwrap_err();
        assert!(e.starts_with("gpu[0].uuid: must not be empty"), "{e}");
    }

    #[test]
    fn relative_devices() {
        let e = parse("[[gpu]]\nindex = 0\ndevices = [\"/dev/nvidia0\", \"dev/nvidia1\"]\n").unwrap_err();
        assert_eq!(e, "gpu[0].devices[1]: device path dev/nvidia1 is not absolute");
        let e = parse("[gpus]\ncommon_devices = [\"nvidiactl\"]\n").unwrap_err();
        assert_eq!(e, "gpus.common_devices[0]: device path nvidiactl is not absolute");
        let f: File = toml::from_str("[gpus]\ncommon_devices = [\"x\"]\n").unwrap();
        assert_eq!(
            GpuConfig::resolve(f.gpus, f.gpu).unwrap_err().key(),
            "gpus.common_devices[0]"
        );
    }

    #[test]
    fn shared_device_node() {
        let e = parse(
            "[[gpu]]\nindex = 0\ndevices = [\"/dev/nvidia0\"]\n[[gpu]]\nindex = 1\ndevices = [\"/dev/nvidia0\"]\n",
        )
        .unwrap_err();
        assert_eq!(e, "gpu[1].devices: device /dev/nvidia0 is also listed for gpu[0]");
        // The same node twice in one entry is harmless.
        parse("[[gpu]]\nindex = 0\ndevices = [\"/dev/nvidia0\", \"/dev/nvidia0\"]\n").unwrap();
    }
}
