//! Configuration: the TOML file (`etc/cybd.toml` documents every key), the defaults for the
//! system and the per-user (`--user`) mode, and the checks behind `cybd --check-config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cyb_proto::Class;
use cyb_proto::spec::{Dur, Size};
use serde::Deserialize;

/// The configuration in force; replaced as a whole when SIGHUP reloads it.
pub type Live = tokio::sync::watch::Receiver<std::sync::Arc<Config>>;

/// Where the system daemon reads its config when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/cyb/cybd.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("user mode needs {0} to be set")]
    Env(&'static str),
}

/// The file as written; every key optional so the mode decides the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    paths: RawPaths,
    log_level: Option<String>,
    kill_grace: Option<Dur>,
    max_job_bytes: Option<Size>,
    max_log_bytes: Option<Size>,
    allow_root_jobs: Option<bool>,
    admin_group: Option<String>,
    rescan_interval: Option<Dur>,
    require_limits: Option<bool>,
    #[serde(default)]
    cgroups: RawCgroups,
    #[serde(default)]
    rpc: RawRpc,
    #[serde(default)]
    classes: BTreeMap<String, RawClass>,
    #[serde(default)]
    gpus: crate::gpu::config::GpusSection,
    #[serde(default)]
    gpu: Vec<crate::gpu::config::StaticGpu>,
    #[serde(default)]
    callbacks: crate::callback::RawCallbacks,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    docker: crate::backend::docker::config::RawDocker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    max_age: Option<Dur>,
    max_jobs: Option<i64>,
    interval: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCgroups {
    enabled: Option<bool>,
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRpc {
    max_connections_per_user: Option<i64>,
    idle_timeout: Option<Dur>,
    header_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    spool: Option<PathBuf>,
    logs: Option<PathBuf>,
    socket: Option<PathBuf>,
    runtime: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    slots: Option<i64>,
    timeout: Option<Dur>,
    max_timeout: Option<Dur>,
    memory: Option<Size>,
    cpus: Option<f64>,
    pids: Option<i64>,
}

/// Per-class settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassConfig {
    /// Jobs of this class that may run at once.
    pub slots: usize,
    /// Time limit of a job that sets none.
    pub timeout: Duration,
    /// The longest `timeout` a job may ask for.
    pub max_timeout: Duration,
    /// Defaults for jobs of the class that do not set `resources.memory`/`cpus`/`pids`.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

/// What one RPC client may make the daemon hold (`[rpc]`).
#[derive(Clone, Debug, PartialEq)]
pub struct RpcLimits {
    /// Connections one uid may hold open at once; root and the daemon's own user are exempt.
    pub max_connections_per_user: usize,
    /// A connection with no request in flight that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A request frame must arrive whole within this long of its first byte, and a reply
    /// must be taken within this long, or the connection is closed.
    pub header_timeout: Duration,
}

/// Which ended jobs cybd removes by itself (`[retention]`), as `cybctl clean` would.
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// Ended jobs that ended longer ago than this are removed.
    pub max_age: Option<Duration>,
    /// Beyond this many ended jobs, the oldest (lowest ids) are removed.
    pub max_jobs: Option<usize>,
    /// How often the limits are applied.
    pub interval: Duration,
}

impl Retention {
    /// Whether cybd removes anything by itself (off unless a limit is set).
    pub fn enabled(&self) -> bool {
        self.max_age.is_some() || self.max_jobs.is_some()
    }
}

/// Paths the daemon uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Paths {
    /// `incoming/`, `rejected/` and the durable records (`jobs/`) live here.
    pub spool: PathBuf,
    /// Run directories `run_<id>/`.
    pub logs: PathBuf,
    /// The RPC socket.
    pub socket: PathBuf,
    /// Runtime state (GPU lockfiles, supervisor files, ...); a tmpfs on systemd hosts.
    pub runtime: PathBuf,
}

impl Paths {
    pub fn incoming(&self) -> PathBuf {
        self.spool.join("incoming")
    }
    pub fn rejected(&self) -> PathBuf {
        self.spool.join("rejected")
    }
    pub fn jobs(&self) -> PathBuf {
        self.spool.join("jobs")
    }
    pub fn run_dir(&self, id: u64) -> PathBuf {
        self.logs.join(format!("run_{id}"))
    }
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub user_mode: bool,
    pub paths: Paths,
    /// In user mode, where the default runtime directory came from, in words (naming
    /// `XDG_RUNTIME_DIR`), for messages; `None` when `paths.runtime` set it.
    pub runtime_source: Option<String>,
    pub log_level: String,
    pub kill_grace: Duration,
    pub max_job_bytes: u64,
    pub max_log_bytes: u64,
    pub allow_root_jobs: bool,
    pub admin_group: Option<String>,
    pub rescan_interval: Duration,
    pub classes: BTreeMap<Class, ClassConfig>,
    /// Refuse jobs that cannot be confined (no usable cgroups) instead of running them
    /// unconfined.
    pub require_limits: bool,
    /// Put jobs in cgroups at all (`[cgroups] enabled`).
    pub cgroups_enabled: bool,
    /// Name of cybd's subtree inside its own cgroup (`[cgroups] name`).
    pub cgroup_name: String,
    pub gpus: crate::gpu::config::GpuConfig,
    pub rpc: RpcLimits,
    /// The binary started as `cybd launcher` to fork supervisors: not a key of the file.
    /// `/proc/self/exe` (this very binary) in `cybd`; a program that embeds the daemon
    /// (the in-process tests) sets it to the real `cybd`.
    pub cybd_exe: PathBuf,
    /// `[callbacks]`: where job callbacks may go, how they are signed and retried.
    pub callbacks: crate::callback::CallbacksConfig,
    /// `[retention]`: ended jobs removed by the daemon itself.
    pub retention: Retention,
    /// `[docker]`: the engine, and what docker jobs may use.
    pub docker: crate::backend::docker::config::DockerConfig,
}

impl Config {
    /// Where the daemon and the supervisors of running jobs leave word for each other:
    /// `<id>.json` (which supervisor runs the job) and `<id>.exit.json` (how it ended).
    /// `<runtime>/supervisors` (a tmpfs under systemd: nothing of it outlives the
    /// supervisors, and it costs the logs' disk nothing); in user mode
    /// `<spool>/supervisors`, since logind removes `$XDG_RUNTIME_DIR` at logout while the
    /// user's jobs may run on.
    pub fn supervisors_dir(&self) -> PathBuf {
        if self.user_mode {
            self.paths.spool.join("supervisors")
        } else {
            self.paths.runtime.join("supervisors")
        }
    }

    /// The largest RPC request frame the daemon reads: what a job of `max_job_bytes` needs.
    pub fn max_request_frame(&self) -> usize {
        cyb_proto::rpc::max_request_frame(self.max_job_bytes)
    }

    pub fn class(&self, c: Class) -> &ClassConfig {
        // Every class is filled in by `resolve`.
        &self.classes[&c]
    }

    /// Defaults for the mode, without any file.
    pub fn defaults(user_mode: bool, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Self::resolve(RawConfig::default(), user_mode, env, Path::new("(defaults)"))
    }

    /// Reads `path` (or the mode's default file, if it exists) and resolves it.
    pub fn load(
        path: Option<&Path>,
        user_mode: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let default_path = if user_mode {
            env("HOME").map(|h| PathBuf::from(h).join(".config/cyb/cybd.toml"))
        } else {
            Some(PathBuf::from(SYSTEM_CONFIG))
        };
        let (path, must_exist) = match path {
            Some(p) => (Some(p.to_path_buf()), true),
            None => (default_path, false),
        };
        let Some(path) = path else {
            return Self::defaults(user_mode, env);
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                return Self::defaults(user_mode, env);
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text, &path, user_mode, env)
    }

    pub fn parse(
        text: &str,
        path: &Path,
        user_mode: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Self::resolve(raw, user_mode, env, path)
    }

    fn resolve(
        raw: RawConfig,
        user_mode: bool,
        env: &dyn Fn(&str) -> Option<String>,
        path: &Path,
    ) -> Result<Config, ConfigError> {
        let key_err = |key: &str, message: String| ConfigError::Key {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let mut runtime_source = None;
        let defaults = if user_mode {
            let home = PathBuf::from(env("HOME").ok_or(ConfigError::Env("HOME"))?);
            // The same rule cybctl uses to find this daemon's socket.
            let xdg = env("XDG_RUNTIME_DIR").filter(|v| !v.is_empty());
            let found = cyb_proto::paths::user_runtime_dir(
                nix::unistd::geteuid().as_raw(),
                xdg.as_deref().map(std::ffi::OsStr::new),
                Some(home.as_os_str()),
                |p| {
                    use std::os::unix::fs::MetadataExt as _;
                    std::fs::metadata(p).ok().filter(|m| m.is_dir()).map(|m| m.uid())
                },
            )
            .ok_or(ConfigError::Env("HOME"))?;
            runtime_source = Some(found.source);
            let runtime = found.dir;
            Paths {
                spool: home.join(".local/share/cyb/spool"),
                logs: home.join(".local/state/cyb/logs"),
                socket: runtime.join("cybd.sock"),
                runtime,
            }
        } else {
            Paths {
                spool: "/var/spool/cyb".into(),
                logs: "/logs".into(),
                socket: "/run/cyb/cybd.sock".into(),
                runtime: "/run/cyb".into(),
            }
        };
        let p = raw.paths;
        let p_runtime_default = p.runtime.is_none();
        let paths = Paths {
            spool: p.spool.unwrap_or(defaults.spool),
            logs: p.logs.unwrap_or(defaults.logs),
            socket: p.socket.unwrap_or(defaults.socket),
            runtime: p.runtime.unwrap_or(defaults.runtime),
        };
        for (key, v) in [
            ("paths.spool", &paths.spool),
            ("paths.logs", &paths.logs),
            ("paths.socket", &paths.socket),
            ("paths.runtime", &paths.runtime),
        ] {
            if !v.is_absolute() {
                return Err(key_err(key, format!("`{}` is not an absolute path", v.display())));
            }
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if !matches!(log_level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
            return Err(key_err(
                "log_level",
                format!("`{log_level}` is not one of error, warn, info, debug, trace"),
            ));
        }
        let max_job_bytes = raw.max_job_bytes.map_or(1024 * 1024, |s| s.0);
        if max_job_bytes == 0 {
            return Err(key_err("max_job_bytes", "must be more than 0".into()));
        }
        let max_log_bytes = raw.max_log_bytes.map_or(64 * 1024 * 1024, |s| s.0);
        let rescan_interval = raw.rescan_interval.map_or(Duration::from_secs(2), |d| d.0);
        if rescan_interval.is_zero() {
            return Err(key_err("rescan_interval", "must be longer than 0s".into()));
        }
        let cgroup_name = raw.cgroups.name.unwrap_or_else(|| "cyb".into());
        if cgroup_name.is_empty()
            || cgroup_name.starts_with('.')
            || !cgroup_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(key_err(
                "cgroups.name",
                format!("`{cgroup_name}` is not a plain directory name (letters, digits, - _ .)"),
            ));
        }
        let rpc = RpcLimits {
            max_connections_per_user: match raw.rpc.max_connections_per_user {
                None => 32,
                Some(n) if (1..=1_000_000).contains(&n) => n as usize,
                Some(n) => {
                    return Err(key_err(
                        "rpc.max_connections_per_user",
                        format!("must be 1 to 1000000 (got {n})"),
                    ));
                }
            },
            idle_timeout: raw.rpc.idle_timeout.map_or(Duration::from_secs(60), |d| d.0),
            header_timeout: raw.rpc.header_timeout.map_or(Duration::from_secs(10), |d| d.0),
        };
        for (key, d) in [
            ("rpc.idle_timeout", rpc.idle_timeout),
            ("rpc.header_timeout", rpc.header_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(key_err(key, "must be at least 100ms".into()));
            }
        }
        let retention = Retention {
            max_age: raw.retention.max_age.map(|d| d.0),
            max_jobs: match raw.retention.max_jobs {
                None => None,
                Some(n) if n >= 0 => Some(n as usize),
                Some(n) => {
                    return Err(key_err(
                        "retention.max_jobs",
                        format!("must be 0 or more (got {n})"),
                    ));
                }
            },
            interval: raw.retention.interval.map_or(Duration::from_secs(3600), |d| d.0),
        };
        if retention.max_age.is_some_and(|d| d.is_zero()) {
            return Err(key_err("retention.max_age", "must be longer than 0s".into()));
        }
        if retention.interval < Duration::from_secs(1) {
            return Err(key_err("retention.interval", "must be at least 1s".into()));
        }
        let callbacks =
            crate::callback::CallbacksConfig::resolve(raw.callbacks).map_err(|(k, m)| key_err(&k, m))?;
        let docker = crate::backend::docker::config::DockerConfig::resolve(raw.docker)
            .map_err(|(k, m)| key_err(&k, m))?;
        let gpus = crate::gpu::config::GpuConfig::resolve(raw.gpus, raw.gpu)
            .map_err(|e| key_err(&e.key(), e.message()))?;
        let mut classes = BTreeMap::new();
        for c in Class::ALL {
            let (slots, timeout) = match c {
                Class::CpuShort => (4, Duration::from_secs(60)),
                Class::CpuLong => (2, Duration::from_secs(15 * 60)),
                Class::Gpu => (8, Duration::from_secs(10 * 60)),
                Class::GpuSlurm => (16, Duration::from_secs(10 * 60)),
            };
            classes.insert(
                c,
                ClassConfig {
                    slots,
                    timeout,
                    max_timeout: timeout,
                    memory: None,
                    cpus: None,
                    pids: None,
                },
            );
        }
        for (name, rc) in raw.classes {
            let class: Class = name.parse().map_err(|m| key_err(&format!("classes.{name}"), m))?;
            let entry = classes.entry(class).or_insert(ClassConfig {
                slots: 1,
                timeout: Duration::from_secs(60),
                max_timeout: Duration::from_secs(60),
                memory: None,
                cpus: None,
                pids: None,
            });
            if let Some(m) = rc.memory {
                if m.0 == 0 {
                    return Err(key_err(
                        &format!("classes.{name}.memory"),
                        "must be more than 0".into(),
                    ));
                }
                entry.memory = Some(m.0);
            }
            if let Some(c) = rc.cpus {
                if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
                    return Err(key_err(
                        &format!("classes.{name}.cpus"),
                        format!("must be a number of CPUs above 0 (got {c})"),
                    ));
                }
                entry.cpus = Some(c);
            }
            if let Some(p) = rc.pids {
                if p < 1 {
                    return Err(key_err(
                        &format!("classes.{name}.pids"),
                        format!("must be at least 1 (got {p})"),
                    ));
                }
                entry.pids = Some(p as u64);
            }
            if let Some(s) = rc.slots {
                if !(1..=4096).contains(&s) {
                    return Err(key_err(
                        &format!("classes.{name}.slots"),
                        format!("must be 1 to 4096 (got {s})"),
                    ));
                }
                entry.slots = s as usize;
            }
            if let Some(t) = rc.timeout {
                if t.0.is_zero() {
                    return Err(key_err(
                        &format!("classes.{name}.timeout"),
                        "must be longer than 0s".into(),
                    ));
                }
                entry.timeout = t.0;
                entry.max_timeout = entry.max_timeout.max(t.0);
            }
            if let Some(m) = rc.max_timeout {
                if m.0 < entry.timeout {
                    return Err(key_err(
                        &format!("classes.{name}.max_timeout"),
                        "must not be shorter than the class timeout".into(),
                    ));
                }
                entry.max_timeout = m.0;
            }
        }
        Ok(Config {
            user_mode,
            runtime_source: runtime_source.filter(|_| p_runtime_default),
            paths,
            log_level,
            kill_grace: raw.kill_grace.map_or(Duration::from_secs(10), |d| d.0),
            max_job_bytes,
            max_log_bytes,
            allow_root_jobs: raw.allow_root_jobs.unwrap_or(false),
            admin_group: Some(raw.admin_group.unwrap_or_else(|| "cybadm".into())).filter(|g| !g.is_empty()),
            rescan_interval,
            classes,
            require_limits: raw.require_limits.unwrap_or(false),
            cgroups_enabled: raw.cgroups.enabled.unwrap_or(true),
            cgroup_name,
            gpus,
            rpc,
            cybd_exe: PathBuf::from("/proc/self/exe"),
            callbacks,
            docker,
            retention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOME" => Some("/home/ann".into()),
            "XDG_RUNTIME_DIR" => Some("/run/user/1000".into()),
            _ => None,
        }
    }

    #[test]
    fn system_defaults() {
        let c = Config::defaults(false, &env).unwrap();
        assert_eq!(c.paths.spool, PathBuf::from("/var/spool/cyb"));
        assert_eq!(c.paths.logs, PathBuf::from("/logs"));
        assert_eq!(c.paths.socket, PathBuf::from("/run/cyb/cybd.sock"));
        assert_eq!(c.paths.runtime, PathBuf::from("/run/cyb"));
        assert_eq!(c.class(Class::CpuShort).slots, 4);
        assert_eq!(c.class(Class::CpuLong).slots, 2);
        assert_eq!(c.max_job_bytes, 1024 * 1024);
        assert!(!c.allow_root_jobs);
        assert_eq!(
            c.rpc,
            RpcLimits {
                max_connections_per_user: 32,
                idle_timeout: Duration::from_secs(60),
                header_timeout: Duration::from_secs(10),
            }
        );
        assert_eq!(c.max_request_frame(), (2 << 20) + (64 << 10));
        assert!(!c.retention.enabled(), "nothing is removed unless asked");
        assert_eq!(c.retention.interval, Duration::from_secs(3600));
        let r = Config::parse(
            "[retention]\nmax_age = \"30d\"\nmax_jobs = 10000\ninterval = \"10m\"",
            Path::new("t.toml"),
            false,
            &env,
        )
        .unwrap()
        .retention;
        assert_eq!(
            r,
            Retention {
                max_age: Some(Duration::from_secs(30 * 86400)),
                max_jobs: Some(10000),
                interval: Duration::from_secs(600),
            }
        );
        assert!(r.enabled());
    }

    #[test]
    fn user_defaults() {
        let c = Config::defaults(true, &env).unwrap();
        assert_eq!(c.paths.spool, PathBuf::from("/home/ann/.local/share/cyb/spool"));
        assert_eq!(c.paths.logs, PathBuf::from("/home/ann/.local/state/cyb/logs"));
        assert_eq!(c.paths.socket, PathBuf::from("/run/user/1000/cyb/cybd.sock"));
    }

    #[test]
    fn shipped_config_parses_to_the_defaults() {
        let text = include_str!("../../etc/cybd.toml");
        let c = Config::parse(text, Path::new("etc/cybd.toml"), false, &env).unwrap();
        assert_eq!(c, Config::defaults(false, &env).unwrap());
    }

    #[test]
    fn limits_cgroups_and_gpus() {
        let text = "require_limits = true\n\
                    [cgroups]\nname = \"cyb-a\"\n\
                    [classes.cpu_long]\nmemory = \"8GiB\"\ncpus = 2.5\npids = 4096\n\
                    [gpus]\nsource = \"static\"\n\
                    [[gpu]]\nindex = 0\nuuid = \"GPU-x\"\ndevices = [\"/dev/nvidia0\"]\n";
        let c = Config::parse(text, Path::new("t.toml"), false, &env).unwrap();
        assert!(c.require_limits && c.cgroups_enabled);
        assert_eq!(c.cgroup_name, "cyb-a");
        let long = c.class(Class::CpuLong);
        assert_eq!(
            (long.memory, long.cpus, long.pids),
            (Some(8 << 30), Some(2.5), Some(4096))
        );
        assert_eq!(c.class(Class::CpuShort).memory, None);
        assert_eq!(c.gpus.entries.len(), 1);
        assert_eq!(c.gpus.entries[0].uuid.as_deref(), Some("GPU-x"));
        let d = Config::defaults(false, &env).unwrap();
        assert!(!d.require_limits && d.cgroups_enabled);
        assert_eq!(d.cgroup_name, "cyb");
    }

    #[test]
    fn bad_keys_are_named() {
        let cases = [
            ("slots_cpu = 3", "slots_cpu"),
            ("[classes.cpu_short]\nslots = 0", "classes.cpu_short.slots"),
            ("[classes.tiny]\nslots = 1", "classes.tiny"),
            ("kill_grace = \"soon\"", "kill_grace"),
            ("[paths]\nspool = \"rel\"", "paths.spool"),
            ("log_level = \"loud\"", "log_level"),
            ("max_job_bytes = \"1 potato\"", "max_job_bytes"),
            ("[cgroups]\nname = \"../x\"", "cgroups.name"),
            ("[cgroups]\nlimit = 1", "limit"),
            ("[classes.cpu_short]\ncpus = 0.0", "classes.cpu_short.cpus"),
            ("[classes.cpu_short]\npids = 0", "classes.cpu_short.pids"),
            ("[classes.cpu_short]\nmemory = \"0B\"", "classes.cpu_short.memory"),
            ("[[gpu]]\nindex = 0\ndevices = [\"nvidia0\"]", "gpu[0]"),
            ("[[gpu]]\nindex = 0\n[[gpu]]\nindex = 0", "gpu[1].index"),
            (
                "[rpc]\nmax_connections_per_user = 0",
                "rpc.max_connections_per_user",
            ),
            ("[rpc]\nidle_timeout = \"0s\"", "rpc.idle_timeout"),
            ("[rpc]\nheader_timeout = \"10ms\"", "rpc.header_timeout"),
            ("[rpc]\nmax_connections = 5", "max_connections"),
            ("[retention]\nmax_jobs = -1", "retention.max_jobs"),
            ("[retention]\nmax_age = \"0s\"", "retention.max_age"),
            ("[retention]\ninterval = \"10ms\"", "retention.interval"),
            ("[retention]\nkeep = 3", "keep"),
        ];
        for (text, key) in cases {
            let e = Config::parse(text, Path::new("t.toml"), false, &env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }
}
