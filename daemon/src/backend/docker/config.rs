//! `[docker]` in the config: where the engine is, and what docker jobs may use (images,
//! networks, host paths). Everything is refused until the admin allows it.

use std::path::PathBuf;
use std::time::Duration;

use cyb_proto::spec::Dur;
use serde::Deserialize;

/// `[docker]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    socket: Option<PathBuf>,
    #[serde(default)]
    allowed_images: Vec<String>,
    #[serde(default)]
    allowed_networks: Vec<String>,
    #[serde(default)]
    allowed_mount_prefixes: Vec<PathBuf>,
    pull: Option<String>,
    gpu_runtime: Option<String>,
    api_timeout: Option<Dur>,
    engine_check_interval: Option<Dur>,
    lost_engine_grace: Option<Dur>,
}

/// Whether a missing image is pulled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pull {
    /// Only images already on the engine run (the default).
    Never,
    /// An image the engine does not have is pulled first.
    Missing,
}

/// `[docker]`, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct DockerConfig {
    /// The Engine API's unix socket.
    pub socket: PathBuf,
    /// Globs over normalized image references (`docker.io/library/busybox:*`); empty: no
    /// docker jobs.
    pub allowed_images: Vec<String>,
    /// Networks a job may name (`host` only if listed); every other job gets `none`.
    pub allowed_networks: Vec<String>,
    /// Host directories under which bind mounts may come from.
    pub allowed_mount_prefixes: Vec<PathBuf>,
    pub pull: Pull,
    /// The engine runtime that says it can give containers NVIDIA GPUs (the NVIDIA
    /// container toolkit registers `nvidia`); without it GPU docker jobs are refused.
    pub gpu_runtime: String,
    /// How long one Engine API call may take.
    pub api_timeout: Duration,
    /// How often cybd asks whether the engine is there.
    pub engine_check_interval: Duration,
    /// How long a job's supervisor keeps trying to reach an engine that went away under
    /// a running container before the attempt is `lost`.
    pub lost_engine_grace: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: "/var/run/docker.sock".into(),
            allowed_images: Vec::new(),
            allowed_networks: Vec::new(),
            allowed_mount_prefixes: Vec::new(),
            pull: Pull::Never,
            gpu_runtime: "nvidia".into(),
            api_timeout: Duration::from_secs(120),
            engine_check_interval: Duration::from_secs(5),
            lost_engine_grace: Duration::from_secs(60),
        }
    }
}

impl DockerConfig {
    /// Resolves `[docker]`; an error names the key and the problem.
    pub fn resolve(raw: RawDocker) -> Result<DockerConfig, (String, String)> {
        let d = DockerConfig::default();
        let err = |k: &str, m: String| (format!("docker.{k}"), m);
        let socket = raw.socket.unwrap_or(d.socket);
        if !socket.is_absolute() {
            return Err(err(
                "socket",
                format!("`{}` is not an absolute path", socket.display()),
            ));
        }
        let pull = match raw.pull.as_deref() {
            None | Some("never") => Pull::Never,
            Some("missing") => Pull::Missing,
            Some(other) => return Err(err("pull", format!("`{other}` is not `never` or `missing`"))),
        };
        if let Err(e) = super::image::Allowlist::new(&raw.allowed_images) {
            return Err(err("allowed_images", e.to_string()));
        }
        for n in &raw.allowed_networks {
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err(err("allowed_networks", format!("`{n}` is not a network name")));
            }
        }
        for p in &raw.allowed_mount_prefixes {
            if !p.is_absolute() {
                return Err(err(
                    "allowed_mount_prefixes",
                    format!("`{}` is not an absolute path", p.display()),
                ));
            }
            if p == std::path::Path::new("/") {
                return Err(err(
                    "allowed_mount_prefixes",
                    "`/` would let a job mount any path of the host, the docker socket's directory included"
                        .into(),
                ));
            }
        }
        let dur = |v: Option<Dur>, def: Duration, key: &str, min: Duration| match v.map(|d| d.0) {
            None => Ok(def),
            Some(x) if x >= min => Ok(x),
            Some(_) => Err(err(
                key,
                format!("must be at least {}", humantime::format_duration(min)),
            )),
        };
        Ok(DockerConfig {
            socket,
            allowed_images: raw.allowed_images,
            allowed_networks: raw.allowed_networks,
            allowed_mount_prefixes: raw.allowed_mount_prefixes,
            pull,
            gpu_runtime: raw.gpu_runtime.unwrap_or(d.gpu_runtime),
            api_timeout: dur(
                raw.api_timeout,
                d.api_timeout,
                "api_timeout",
                Duration::from_secs(1),
            )?,
            engine_check_interval: dur(
                raw.engine_check_interval,
                d.engine_check_interval,
                "engine_check_interval",
                Duration::from_millis(100),
            )?,
            lost_engine_grace: dur(
                raw.lost_engine_grace,
                d.lost_engine_grace,
                "lost_engine_grace",
                Duration::ZERO,
            )?,
        })
    }
}
