//! The job spec, version 1: what a person writes in a job file or sends with `cybctl submit`.
//!
//! Parsing is strict: an unknown field is an error that names it, and every semantic check
//! ([`JobSpec::validate`]) names the field to blame. The daemon's intake, its RPC server and
//! `cybctl validate` all go through [`parse_job`], so they give exactly the same errors.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;

mod units;
mod values;

use units::show_f64;
pub use units::{Dur, SIZE_FORMS, Size, parse_size};
use values::opt_object;
pub use values::{Env, HIDDEN, RawJson, object};

/// The largest `context` object kept with a job, in bytes of JSON.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// The longest job name.
pub const MAX_NAME_CHARS: usize = 256;

// The ranges of the spec's numbers (docs/job-spec.md, "Ranges"). Each is checked at intake
// by [`JobSpec::validate`], so whatever is accepted can be enforced and read back.

/// The longest `timeout`, `retry.backoff` and `retry.max_backoff`: one year (humantime's
/// `1y`, 365.25 days).
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);
/// The most GPUs one job may ask for.
pub const MAX_GPUS: i64 = 1024;
/// The smallest CPU quota, in cores: the kernel's smallest CFS quota is 1 ms per 100 ms.
pub const MIN_CPUS: f64 = 0.01;
/// The largest CPU quota, in cores (as for a class's `cpus` in the config).
pub const MAX_CPUS: f64 = 4096.0;
/// The largest memory limit, in bytes: what a signed 64-bit number holds (8 EiB - 1), the
/// kernel's and the record reader's limit.
pub const MAX_MEMORY_BYTES: u64 = i64::MAX as u64;
/// The largest `pids` limit: the kernel's `PID_MAX_LIMIT` (pids.max refuses more).
pub const MAX_PIDS: i64 = 4 * 1024 * 1024;
/// The most attempts a retry policy may ask for, the first one included.
pub const MAX_ATTEMPTS: i64 = 100;

/// Job classes. Each has its own concurrency slots and default time limit.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Short CPU work (under 60 s by default).
    #[default]
    CpuShort,
    /// Long CPU work (under 15 min by default).
    CpuLong,
    /// Work on whole local GPUs (under 10 min by default).
    Gpu,
    /// Work sent to Slurm.
    GpuSlurm,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::CpuShort, Class::CpuLong, Class::Gpu, Class::GpuSlurm];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::CpuShort => "cpu_short",
            Class::CpuLong => "cpu_long",
            Class::Gpu => "gpu",
            Class::GpuSlurm => "gpu_slurm",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown class `{s}` (expected cpu_short, cpu_long, gpu or gpu_slurm)"))
    }
}

/// Run a container through the Docker Engine API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerSpec {
    /// Image reference (never pulled implicitly from a registry the host cannot reach).
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `host_path:container_path[:ro]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
    /// Network to join (`none` unless named; only networks `[docker] allowed_networks`
    /// lists are accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Working directory inside the container (the image's otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// Built-in task kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    GpuReport,
    ServiceMap,
    LogTriage,
}

/// A built-in task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub kind: TaskKind,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Resource requests. Missing values take the class defaults from the config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<i64>,
    /// CPU quota in cores (1.5 = one and a half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
}

/// Retry policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total attempts, including the first.
    pub max_attempts: i64,
    /// Delay before the second attempt; doubles with every further attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Dur>,
    /// Upper bound of the delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Dur>,
    /// Retry only on these exit codes (any failure when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_exit_codes: Vec<i64>,
}

impl RetrySpec {
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);

    /// Delay before attempt number `next_attempt` (2 for the first retry).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let base = self.backoff.map_or(Self::DEFAULT_BACKOFF, |d| d.0);
        let cap = self.max_backoff.map_or(Self::DEFAULT_MAX_BACKOFF, |d| d.0);
        let doublings = next_attempt.saturating_sub(2).min(32);
        base.saturating_mul(1u32 << doublings.min(31)).min(cap)
    }

    /// Whether a run that ended with `exit_code` (None for a signal or other failure) may be
    /// retried under this policy.
    pub fn retries_exit(&self, exit_code: Option<i32>) -> bool {
        self.on_exit_codes.is_empty() || exit_code.is_some_and(|c| self.on_exit_codes.contains(&i64::from(c)))
    }
}

/// Options for `gpu_slurm` jobs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Extra sbatch options, each `--name=value`; only allowlisted names are accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// sbatch options a job may pass through.
pub const SLURM_ALLOWED_OPTIONS: &[&str] = &[
    "--time",
    "--gres",
    "--gpus",
    "--nodes",
    "--ntasks",
    "--cpus-per-task",
    "--mem",
    "--mem-per-cpu",
    "--constraint",
    "--qos",
    "--exclusive",
    "--comment",
];

/// Job spec, version 1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "cybd job spec, version 1")]
pub struct JobSpec {
    /// Spec version; only 1 exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A label; defaults to the file name (spool) or the command (cybctl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// Higher runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Free-form data kept with the job byte for byte as given (at most 64 KiB of JSON).
    /// Only the job's owner and admins see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<RawJson>,
    /// argv, run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A script for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "opt_object")]
    pub docker: Option<DockerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "opt_object")]
    pub task: Option<TaskSpec>,
    /// Absolute working directory (default: the owner's home; cybctl sends its own cwd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment variables. Only the job's owner and admins see their values.
    #[serde(default, skip_serializing_if = "Env::is_empty")]
    pub env: Env,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "opt_object")]
    pub resources: Option<Resources>,
    /// Wall-clock limit: TERM, grace period, then KILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "opt_object")]
    pub retry: Option<RetrySpec>,
    /// Job ids that must succeed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<i64>,
    /// Globs under `cwd` copied into the run's `artifacts/` when the job ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// `result.json` is POSTed here when the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "opt_object")]
    pub slurm: Option<SlurmSpec>,
}

/// What a job runs: the one of `command`, `shell`, `docker`, `task` that is set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Payload<'a> {
    Command(&'a [String]),
    Shell(&'a str),
    Docker(&'a DockerSpec),
    Task(&'a TaskSpec),
}

/// The backend that runs a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Native,
    Docker,
    Slurm,
    Builtin,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Native => "native",
            Backend::Docker => "docker",
            Backend::Slurm => "slurm",
            Backend::Builtin => "builtin",
        })
    }
}

impl JobSpec {
    /// Takes out what only the job's owner and admins may read: each `env` value becomes
    /// [`HIDDEN`] (the names stay, so a reader still sees what the job is given) and
    /// `context` goes.
    pub fn hide_private(&mut self) {
        for v in self.env.values_mut() {
            *v = HIDDEN.to_string();
        }
        self.context = None;
        // A webhook URL often carries its token.
        if self.callback_url.is_some() {
            self.callback_url = Some(HIDDEN.to_string());
        }
    }

    pub fn class(&self) -> Class {
        self.class.unwrap_or_default()
    }

    pub fn priority(&self) -> i32 {
        self.priority.unwrap_or(0)
    }

    /// The payload. Only call on a validated spec; an unvalidated one may have none.
    pub fn payload(&self) -> Option<Payload<'_>> {
        if let Some(c) = &self.command {
            Some(Payload::Command(c))
        } else if let Some(s) = &self.shell {
            Some(Payload::Shell(s))
        } else if let Some(d) = &self.docker {
            Some(Payload::Docker(d))
        } else {
            self.task.as_ref().map(Payload::Task)
        }
    }

    /// Which backend runs this job.
    pub fn backend(&self) -> Backend {
        match self.payload() {
            Some(Payload::Docker(_)) => Backend::Docker,
            Some(Payload::Task(_)) => Backend::Builtin,
            _ if self.class() == Class::GpuSlurm => Backend::Slurm,
            _ => Backend::Native,
        }
    }

    /// The argv to exec for a native job.
    pub fn argv(&self) -> Option<Vec<String>> {
        match self.payload()? {
            Payload::Command(c) => Some(c.to_vec()),
            Payload::Shell(s) => Some(vec!["/bin/sh".into(), "-c".into(), s.into()]),
            _ => None,
        }
    }

    pub fn gpus(&self) -> u32 {
        self.resources
            .as_ref()
            .and_then(|r| r.gpus)
            .map_or(0, |g| u32::try_from(g).unwrap_or(u32::MAX))
    }

    /// Semantic checks that need nothing but the spec itself.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(v) = self.version
            && v != 1
        {
            return Err(SpecError::field(
                "version",
                format!("unsupported spec version {v} (only 1 exists)"),
            ));
        }
        let set: Vec<&str> = [
            ("command", self.command.is_some()),
            ("shell", self.shell.is_some()),
            ("docker", self.docker.is_some()),
            ("task", self.task.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        match set.as_slice() {
            [] => {
                return Err(SpecError::general(
                    "the job has nothing to run: set exactly one of `command`, `shell`, `docker`, `task`",
                ));
            }
            [_] => {}
            [a, b, ..] => {
                return Err(SpecError::field(
                    *b,
                    format!(
                        "`{a}` and `{b}` are both set: set exactly one of `command`, `shell`, `docker`, `task`"
                    ),
                ));
            }
        }
        if let Some(name) = &self.name {
            check_label("name", name, MAX_NAME_CHARS)?;
        }
        if let Some(t) = &self.tenant {
            check_label("tenant", t, 128)?;
        }
        if let Some(w) = &self.workflow_id {
            check_label("workflow_id", w, 256)?;
        }
        if let Some(ctx) = &self.context {
            let n = ctx.get().len();
            if n > MAX_CONTEXT_BYTES {
                return Err(SpecError::field(
                    "context",
                    format!("is {n} bytes of JSON; at most {MAX_CONTEXT_BYTES} are kept"),
                ));
            }
        }
        if let Some(argv) = &self.command {
            if argv.is_empty() {
                return Err(SpecError::field(
                    "command",
                    "must not be empty: give the program and its arguments",
                ));
            }
            if argv[0].is_empty() {
                return Err(SpecError::field(
                    "command[0]",
                    "the program name must not be empty",
                ));
            }
            for (i, a) in argv.iter().enumerate() {
                if a.contains('\0') {
                    return Err(SpecError::field(
                        format!("command[{i}]"),
                        "must not contain a NUL byte",
                    ));
                }
            }
        }
        if let Some(s) = &self.shell {
            if s.trim().is_empty() {
                return Err(SpecError::field("shell", "must not be empty"));
            }
            if s.contains('\0') {
                return Err(SpecError::field("shell", "must not contain a NUL byte"));
            }
        }
        if let Some(d) = &self.docker {
            if d.image.trim().is_empty() {
                return Err(SpecError::field("docker.image", "must not be empty"));
            }
            if let Some(c) = &d.command
                && c.is_empty()
            {
                return Err(SpecError::field("docker.command", "must not be empty when given"));
            }
            if let Some(w) = &d.workdir
                && (!w.starts_with('/') || w.contains('\0'))
            {
                return Err(SpecError::field(
                    "docker.workdir",
                    format!("`{w}` is not an absolute path in the container"),
                ));
            }
            if !self.artifacts.is_empty() {
                return Err(SpecError::field(
                    "artifacts",
                    "docker jobs write artifacts to /cyb/artifacts in the container (the run directory's artifacts/); `artifacts` globs are for native jobs",
                ));
            }
            if self.cwd.is_some() {
                return Err(SpecError::field(
                    "cwd",
                    "a docker job's working directory is `docker.workdir` (a path in the container)",
                ));
            }
            for (i, m) in d.mounts.iter().enumerate() {
                let parts: Vec<&str> = m.split(':').collect();
                let ok = (parts.len() == 2 || (parts.len() == 3 && matches!(parts[2], "ro" | "rw")))
                    && parts[0].starts_with('/')
                    && parts[1].starts_with('/');
                if !ok {
                    return Err(SpecError::field(
                        format!("docker.mounts[{i}]"),
                        format!(
                            "`{m}` is not `/host/path:/container/path[:ro|rw]` (both paths absolute; `:ro` read-only, `:rw` or nothing read-write)"
                        ),
                    ));
                }
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(SpecError::field(
                    "cwd",
                    format!("`{cwd}` is not an absolute path"),
                ));
            }
            if cwd.contains('\0') {
                return Err(SpecError::field("cwd", "must not contain a NUL byte"));
            }
        }
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(SpecError::field(
                    field,
                    "is not a valid variable name (empty, or has `=` or NUL)",
                ));
            }
            if v.contains('\0') {
                return Err(SpecError::field(field, "value must not contain a NUL byte"));
            }
            if k.starts_with("CYB_") {
                return Err(SpecError::field(
                    field,
                    "names starting with CYB_ are set by cybd",
                ));
            }
        }
        if let Some(r) = &self.resources {
            if let Some(g) = r.gpus {
                if g < 0 {
                    return Err(SpecError::field(
                        "resources.gpus",
                        format!("must not be negative (got {g})"),
                    ));
                }
                if g > MAX_GPUS {
                    return Err(SpecError::field(
                        "resources.gpus",
                        format!("{g} is out of range (at most {MAX_GPUS})"),
                    ));
                }
                // (A job that names no class is placed in `gpu` when it asks for GPUs.)
                if g > 0
                    && self
                        .class
                        .is_some_and(|c| !matches!(c, Class::Gpu | Class::GpuSlurm))
                {
                    return Err(SpecError::field(
                        "resources.gpus",
                        format!(
                            "asks for {g} GPU(s) but class is `{}`: use class `gpu` or `gpu_slurm`",
                            self.class()
                        ),
                    ));
                }
            }
            if let Some(c) = r.cpus
                && !(c.is_finite() && c > 0.0)
            {
                return Err(SpecError::field(
                    "resources.cpus",
                    format!("must be a positive number of cores (got {})", show_f64(c)),
                ));
            }
            if let Some(c) = r.cpus
                && !(MIN_CPUS..=MAX_CPUS).contains(&c)
            {
                return Err(SpecError::field(
                    "resources.cpus",
                    format!("{} cores is out of range ({MIN_CPUS} to {MAX_CPUS})", show_f64(c)),
                ));
            }
            if let Some(m) = r.memory {
                if m.0 == 0 {
                    return Err(SpecError::field("resources.memory", "must be more than 0 bytes"));
                }
                if m.0 > MAX_MEMORY_BYTES {
                    return Err(SpecError::field(
                        "resources.memory",
                        format!(
                            "{} bytes ({m}) is out of range (at most {MAX_MEMORY_BYTES} bytes, 8 EiB - 1)",
                            m.0
                        ),
                    ));
                }
            }
            if let Some(p) = r.pids
                && !(1..=MAX_PIDS).contains(&p)
            {
                let why = if p < 1 {
                    format!("must be at least 1 (got {p})")
                } else {
                    format!("{p} is out of range (at most {MAX_PIDS}, the kernel's limit)")
                };
                return Err(SpecError::field("resources.pids", why));
            }
        }
        if let Some(t) = self.timeout {
            if t.0.is_zero() {
                return Err(SpecError::field("timeout", "must be longer than 0s"));
            }
            check_duration("timeout", t)?;
        }
        if let Some(r) = &self.retry {
            if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
                return Err(SpecError::field(
                    "retry.max_attempts",
                    format!("must be between 1 and {MAX_ATTEMPTS} (got {})", r.max_attempts),
                ));
            }
            if let Some(b) = r.backoff {
                check_duration("retry.backoff", b)?;
            }
            if let Some(b) = r.max_backoff {
                check_duration("retry.max_backoff", b)?;
            }
            for (i, c) in r.on_exit_codes.iter().enumerate() {
                if !(0..=255).contains(c) {
                    return Err(SpecError::field(
                        format!("retry.on_exit_codes[{i}]"),
                        format!("exit codes are 0 to 255 (got {c})"),
                    ));
                }
            }
        }
        for (i, d) in self.depends_on.iter().enumerate() {
            if *d < 1 {
                return Err(SpecError::field(
                    format!("depends_on[{i}]"),
                    format!("job ids start at 1 (got {d})"),
                ));
            }
        }
        for (i, a) in self.artifacts.iter().enumerate() {
            check_artifact_glob(a).map_err(|m| SpecError::field(format!("artifacts[{i}]"), m))?;
        }
        if let Some(u) = &self.callback_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(SpecError::field(
                "callback_url",
                format!("`{u}` is not an http:// or https:// URL"),
            ));
        }
        if let Some(s) = &self.slurm {
            if self.class() != Class::GpuSlurm {
                return Err(SpecError::field("slurm", "is only for class `gpu_slurm`"));
            }
            for (i, o) in s.options.iter().enumerate() {
                let name = o.split('=').next().unwrap_or_default();
                if !SLURM_ALLOWED_OPTIONS.contains(&name) {
                    return Err(SpecError::field(
                        format!("slurm.options[{i}]"),
                        format!(
                            "`{name}` is not an allowed sbatch option (allowed: {})",
                            SLURM_ALLOWED_OPTIONS.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_duration(field: &str, d: Dur) -> Result<(), SpecError> {
    if d.0 > MAX_DURATION {
        return Err(SpecError::field(
            field,
            format!(
                "{} is out of range (at most {})",
                humantime::format_duration(d.0),
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(())
}

fn check_label(field: &str, v: &str, max: usize) -> Result<(), SpecError> {
    if v.is_empty() {
        return Err(SpecError::field(field, "must not be empty"));
    }
    if v.chars().count() > max {
        return Err(SpecError::field(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(SpecError::field(field, "must not contain control characters"));
    }
    Ok(())
}

/// An artifact glob must stay under the job's `cwd`: relative, and without `..`.
pub fn check_artifact_glob(g: &str) -> Result<(), String> {
    if g.is_empty() {
        return Err("must not be empty".into());
    }
    if g.starts_with('/') {
        return Err(format!("`{g}` is absolute: artifact globs are relative to `cwd`"));
    }
    if g.split('/').any(|c| c == "..") {
        return Err(format!("`{g}` would leave `cwd` (it contains `..`)"));
    }
    glob::Pattern::new(g).map_err(|e| format!("`{g}` is not a valid glob: {e}"))?;
    Ok(())
}

/// Parses and checks a job file's bytes: the single entry point for intake, RPC and
/// `cybctl validate`.
///
/// It never panics: should a bug in the parser or a library under it panic on some input,
/// that input is refused with an error saying so, and the caller (intake's batch of files,
/// an RPC connection, cybctl) goes on.
pub fn parse_job(bytes: &[u8]) -> Result<JobSpec, SpecError> {
    std::panic::catch_unwind(|| parse_job_checked(bytes)).unwrap_or_else(|panic| {
        Err(SpecError::general(format!(
            "cybd could not parse this job file: its parser failed ({}); this is a bug in cybd, please report it with the file",
            panic_message(&*panic)
        )))
    })
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

fn parse_job_checked(bytes: &[u8]) -> Result<JobSpec, SpecError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| SpecError::general(format!("the job file is not UTF-8 text: {e}")))?;
    let de = &mut serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    // A job is an object; serde would also take an array of its fields in order.
    let spec: JobSpec = object(serde_path_to_error::Deserializer::new(de, &mut track))
        .map_err(|e| SpecError::from_json(&track.path().to_string(), &e))?;
    spec.validate()?;
    Ok(spec)
}

/// The JSON Schema of the job spec.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(JobSpec)).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests;
