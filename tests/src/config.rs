//! [`TestConfig`]: the daemon's configuration for a test, built with typed methods rather
//! than TOML text assembled by hand. Both harnesses take one: the binary one writes it as
//! the `cybd.toml` the daemon is started with, the in-process one writes the same file and
//! loads it with the daemon's own [`cybd::Config::load`].
//!
//! Every test daemon gets `allow_root_jobs = true` (tests run as root), a 2 s `kill_grace`
//! and a 1 s `rescan_interval` unless told otherwise; the harness adds `[paths]` and a
//! `[cgroups] name` of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cyb_proto::Class;
use toml::{Table, Value};

/// A configuration under construction; see the module documentation.
#[derive(Clone, Debug)]
pub struct TestConfig {
    table: Table,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A duration as the config file takes it (`"1500ms"`).
fn dur(d: Duration) -> Value {
    Value::String(format!("{}ms", d.as_millis()))
}

fn int(n: u64) -> Value {
    Value::Integer(i64::try_from(n).expect("a config number fits in an i64"))
}

fn path_str(p: &Path) -> Value {
    Value::String(p.to_str().expect("test paths are UTF-8").to_string())
}

/// `table[key]` as a table, created when missing.
fn sub<'a>(table: &'a mut Table, key: &str) -> &'a mut Table {
    let v = table
        .entry(key.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    match v {
        Value::Table(t) => t,
        other => panic!("config key `{key}` is {other}, not a table"),
    }
}

/// `over` laid onto `base`: tables merge key by key, anything else in `over` replaces.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl TestConfig {
    /// The harness's defaults (see the module documentation).
    pub fn new() -> Self {
        let mut table = Table::new();
        table.insert("allow_root_jobs".into(), Value::Boolean(true));
        table.insert("kill_grace".into(), dur(Duration::from_secs(2)));
        table.insert("rescan_interval".into(), dur(Duration::from_secs(1)));
        TestConfig { table }
    }

    fn set(mut self, key: &str, v: Value) -> Self {
        self.table.insert(key.into(), v);
        self
    }

    fn set_in(mut self, section: &[&str], key: &str, v: Value) -> Self {
        let mut t = &mut self.table;
        for s in section {
            t = sub(t, s);
        }
        t.insert(key.into(), v);
        self
    }

    /// `allow_root_jobs` (true unless set).
    pub fn allow_root_jobs(self, allow: bool) -> Self {
        self.set("allow_root_jobs", Value::Boolean(allow))
    }

    /// `kill_grace` (2 s unless set).
    pub fn kill_grace(self, d: Duration) -> Self {
        self.set("kill_grace", dur(d))
    }

    /// `rescan_interval` (1 s unless set).
    pub fn rescan_interval(self, d: Duration) -> Self {
        self.set("rescan_interval", dur(d))
    }

    /// `max_job_bytes`.
    pub fn max_job_bytes(self, n: u64) -> Self {
        self.set("max_job_bytes", int(n))
    }

    /// `max_log_bytes`.
    pub fn max_log_bytes(self, n: u64) -> Self {
        self.set("max_log_bytes", int(n))
    }

    /// `require_limits`: refuse jobs that cannot be confined.
    pub fn require_limits(self, on: bool) -> Self {
        self.set("require_limits", Value::Boolean(on))
    }

    /// `[cgroups] enabled`.
    pub fn cgroups(self, enabled: bool) -> Self {
        self.set_in(&["cgroups"], "enabled", Value::Boolean(enabled))
    }

    /// `[cgroups] name`; without it the harness picks one unique to the daemon.
    pub fn cgroup_name(self, name: &str) -> Self {
        self.set_in(&["cgroups"], "name", Value::String(name.into()))
    }

    /// `[classes.<class>] slots`: jobs of the class that may run at once.
    pub fn class_slots(self, class: Class, slots: usize) -> Self {
        self.set_in(&["classes", class.as_str()], "slots", int(slots as u64))
    }

    /// `[classes.<class>] timeout`.
    pub fn class_timeout(self, class: Class, d: Duration) -> Self {
        self.set_in(&["classes", class.as_str()], "timeout", dur(d))
    }

    /// `[classes.<class>] max_timeout`.
    pub fn class_max_timeout(self, class: Class, d: Duration) -> Self {
        self.set_in(&["classes", class.as_str()], "max_timeout", dur(d))
    }

    /// `[classes.<class>] memory`, in bytes.
    pub fn class_memory(self, class: Class, bytes: u64) -> Self {
        self.set_in(&["classes", class.as_str()], "memory", int(bytes))
    }

    /// `[rpc] max_connections_per_user`.
    pub fn rpc_max_connections_per_user(self, n: usize) -> Self {
        self.set_in(&["rpc"], "max_connections_per_user", int(n as u64))
    }

    /// `[rpc] idle_timeout`.
    pub fn rpc_idle_timeout(self, d: Duration) -> Self {
        self.set_in(&["rpc"], "idle_timeout", dur(d))
    }

    /// `[rpc] header_timeout`.
    pub fn rpc_header_timeout(self, d: Duration) -> Self {
        self.set_in(&["rpc"], "header_timeout", dur(d))
    }

    /// `[gpus] source = "static"` with `common` as `common_devices`, and one `[[gpu]]`
    /// entry per node in `nodes`: index `i`, uuid `GPU-test-<i>`, that one device node.
    pub fn static_gpus(self, common: &[PathBuf], nodes: &[PathBuf]) -> Self {
        let mut c = self
            .set_in(&["gpus"], "source", Value::String("static".into()))
            .set_in(
                &["gpus"],
                "common_devices",
                Value::Array(common.iter().map(|p| path_str(p)).collect()),
            );
        let entries = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut g = Table::new();
                g.insert("index".into(), int(i as u64));
                g.insert("uuid".into(), Value::String(format!("GPU-test-{i}")));
                g.insert("devices".into(), Value::Array(vec![path_str(n)]));
                Value::Table(g)
            })
            .collect();
        c.table.insert("gpu".into(), Value::Array(entries));
        c
    }

    /// TOML laid over what is set so far, for a key the methods above do not cover. Prefer
    /// adding a method: this is what the builder replaces.
    pub fn toml(mut self, text: &str) -> Self {
        let over: Table = text
            .parse()
            .unwrap_or_else(|e| panic!("bad TOML given to TestConfig::toml ({e}): {text}"));
        merge(&mut self.table, over);
        self
    }

    /// `[paths]`: set by the harness, which owns the directories.
    pub(crate) fn paths(self, spool: &Path, logs: &Path, socket: &Path, runtime: &Path) -> Self {
        self.set_in(&["paths"], "spool", path_str(spool))
            .set_in(&["paths"], "logs", path_str(logs))
            .set_in(&["paths"], "socket", path_str(socket))
            .set_in(&["paths"], "runtime", path_str(runtime))
    }

    /// Whether `[cgroups] name` was set.
    pub(crate) fn has_cgroup_name(&self) -> bool {
        self.table
            .get("cgroups")
            .and_then(Value::as_table)
            .is_some_and(|t| t.contains_key("name"))
    }

    /// The configuration as a file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table serializes")
    }
}

/// Raw TOML, as the harness took it before the builder (kept so tests written that way
/// still build; new tests use the methods).
impl From<&str> for TestConfig {
    fn from(text: &str) -> Self {
        TestConfig::new().toml(text)
    }
}

impl From<&String> for TestConfig {
    fn from(text: &String) -> Self {
        TestConfig::from(text.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(c: &TestConfig) -> cybd::Config {
        let text = c.to_toml();
        cybd::Config::parse(&text, Path::new("t.toml"), false, &|_| None)
            .unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }

    #[test]
    fn what_the_builder_sets_is_what_the_daemon_reads() {
        let c = TestConfig::new()
            .class_slots(Class::CpuShort, 1)
            .class_timeout(Class::CpuShort, Duration::from_millis(1500))
            .class_max_timeout(Class::CpuShort, Duration::from_secs(4))
            .class_memory(Class::CpuLong, 32 << 20)
            .require_limits(true)
            .cgroups(false)
            .max_log_bytes(10 << 10)
            .rpc_idle_timeout(Duration::from_secs(1))
            .static_gpus(&[PathBuf::from("/dev/ctl")], &[PathBuf::from("/dev/g0")]);
        let cfg = parse(&c);
        assert!(cfg.allow_root_jobs);
        assert_eq!(cfg.kill_grace, Duration::from_secs(2));
        let short = cfg.class(Class::CpuShort);
        assert_eq!(
            (short.slots, short.timeout, short.max_timeout),
            (1, Duration::from_millis(1500), Duration::from_secs(4))
        );
        assert_eq!(cfg.class(Class::CpuLong).memory, Some(32 << 20));
        assert!(cfg.require_limits && !cfg.cgroups_enabled);
        assert_eq!(cfg.max_log_bytes, 10 << 10);
        assert_eq!(cfg.rpc.idle_timeout, Duration::from_secs(1));
        assert_eq!(cfg.gpus.entries.len(), 1);
        assert_eq!(cfg.gpus.entries[0].uuid.as_deref(), Some("GPU-test-0"));
    }

    #[test]
    fn raw_toml_merges_over_the_builder_instead_of_repeating_a_key() {
        let c = TestConfig::new()
            .class_slots(Class::CpuShort, 1)
            .toml("allow_root_jobs = false\n[classes.cpu_short]\ntimeout = \"5s\"\n");
        let cfg = parse(&c);
        assert!(!cfg.allow_root_jobs);
        assert_eq!(cfg.class(Class::CpuShort).slots, 1);
        assert_eq!(cfg.class(Class::CpuShort).timeout, Duration::from_secs(5));
        assert!(!c.has_cgroup_name());
        assert!(c.cgroup_name("x").has_cgroup_name());
    }
}
