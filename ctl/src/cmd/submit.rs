//! `cybctl submit`: builds a job spec from a file and/or flags, sends it, and optionally
//! waits for the job or streams its output.

use std::path::{Path, PathBuf};

use clap::ArgGroup;
use cyb_proto::{Class, JobId, SpecError, SubmitRequest};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{Ctx, logs, validate, wait};
use crate::exit::{self, Failure};
use crate::output;

/// The spec fields that say what to run; a payload given by flags replaces the file's.
const PAYLOAD_FIELDS: [&str; 4] = ["command", "shell", "docker", "task"];

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("payload").required(true).multiple(true).args(["file", "shell", "command", "image"])))]
pub struct Args {
    /// Job file (JSON, as in the spool; `-` reads stdin); flags given alongside replace its fields
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Run SCRIPT with /bin/sh -c instead of a command
    #[arg(long, value_name = "SCRIPT", conflicts_with = "command")]
    pub shell: Option<String>,

    /// Run the command (after `--`; the image's own without one) in a container of IMAGE on
    /// this host's Docker engine (only images the admin allows; sets `docker.image`)
    #[arg(long, value_name = "IMAGE", conflicts_with = "shell")]
    pub image: Option<String>,

    /// Bind-mount a host path into the container, read-only with `:ro` (repeatable; only
    /// under the admin's `[docker] allowed_mount_prefixes`; sets `docker.mounts`)
    #[arg(long = "mount", value_name = "HOST:CTR[:ro]", requires = "image")]
    pub mounts: Vec<String>,

    /// Docker network to join [default: none] (only networks the admin allows)
    #[arg(long, value_name = "NAME", requires = "image")]
    pub network: Option<String>,

    /// Working directory in the container [default: the image's]
    #[arg(long, value_name = "DIR", requires = "image")]
    pub workdir: Option<String>,

    /// Override the image's entrypoint with PROGRAM
    #[arg(long, value_name = "PROGRAM", requires = "image")]
    pub entrypoint: Option<String>,

    /// Job name [default: chosen by cybd from the command]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Job class: cpu_short, cpu_long, gpu or gpu_slurm
    #[arg(long, value_name = "CLASS")]
    pub class: Option<Class>,

    /// Priority; higher runs first
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub priority: Option<i32>,

    /// Start only after job ID has succeeded (repeatable; added to the file's `depends_on`)
    #[arg(long = "after", value_name = "ID")]
    pub after: Vec<JobId>,

    /// Wall-clock limit, e.g. 90s, 10m, "1h 30m"
    #[arg(long, value_name = "DURATION", value_parser = duration_text)]
    pub timeout: Option<String>,

    /// Whole GPUs the job needs (class gpu; sets `resources.gpus`)
    #[arg(long, value_name = "N")]
    pub gpus: Option<u32>,

    /// Memory limit, RAM and swap together, e.g. 512M, 8G (K/M/G/T are powers of 1024, as in Docker, Slurm and systemd; sets `resources.memory`)
    #[arg(long, value_name = "SIZE", value_parser = size_text)]
    pub memory: Option<String>,

    /// CPU time quota in CPUs, e.g. 0.5 or 4 (sets `resources.cpus`)
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,

    /// Most processes and threads at once (sets `resources.pids`)
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,

    /// Extra environment variable (repeatable; added to the file's `env`)
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,

    /// Which of your environment variables the job gets, as sbatch's --export: ALL (the
    /// default), NONE (the default with --image: a container keeps its image's
    /// environment, as with `docker run`), or a comma-separated list of NAME or NAME=VALUE.
    /// `--env` and the file's `env` are added on top either way.
    #[arg(long, value_name = "ALL|NONE|NAME[=VALUE],...")]
    pub export: Option<String>,

    /// Working directory [default: the current directory]
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub cwd: Option<PathBuf>,

    /// Wait for the job to end and exit with its exit code
    #[arg(long)]
    pub wait: bool,

    /// Stream the job's stdout to stdout and its stderr to stderr until it ends, then exit with
    /// its exit code
    #[arg(long)]
    pub follow: bool,

    /// Print the job's id alone on stdout (as `sbatch --parsable`), for scripts and workflow
    /// tools; with --wait nothing else is printed there
    #[arg(long, conflicts_with = "follow")]
    pub parsable: bool,

    /// The program and its arguments, after `--`
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Checks a `--memory` value early, but sends it as written.
fn size_text(s: &str) -> Result<String, String> {
    cyb_proto::spec::parse_size(s).map(|_| s.trim().to_string())
}

/// Checks a `--timeout` value early, but sends it as written.
fn duration_text(s: &str) -> Result<String, String> {
    humantime::parse_duration(s.trim())
        .map(|_| s.trim().to_string())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 90s, 10m, \"1h 30m\""))
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    if args.follow && ctx.json {
        return Err(Failure::usage(
            "`submit --follow` streams the job's output and has no --json form; use `--wait --json`",
        )
        .into());
    }
    let (base, context) = match &args.file {
        Some(file) => {
            let (map, context) = read_spec_object(file)?;
            (Some(map), context)
        }
        None => (None, None),
    };
    let cwd = std::env::current_dir();
    let mut spec = build_spec(base, &args, cwd.as_deref().ok())?;
    let caller =
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let export = match (&args.export, spec.contains_key("docker")) {
        (Some(e), _) => e.as_str(),
        (None, true) => "NONE",
        (None, false) => "ALL",
    };
    export_env(&mut spec, export, caller)?;
    let default_cwd = if spec.contains_key("cwd") || spec.contains_key("docker") {
        None
    } else {
        let cwd = cwd.map_err(|e| {
            anyhow::Error::new(e)
                .context("cannot tell the current directory (the job's default cwd); give --cwd DIR")
        })?;
        Some(utf8(&cwd, "the current directory")?.to_string())
    };
    let spec_json = serde_json::to_string(&WithContext(&spec, context.as_deref()))?;

    let conn = ctx.connect().await?;
    let submitted = conn
        .submit(SubmitRequest {
            spec_json,
            default_cwd,
        })
        .await?;
    let id = submitted.id;
    if let Some(n) = &submitted.not_enforced {
        output::note(&n.to_string());
    }
    if spec.contains_key("docker")
        && let Ok(h) = conn.health().await
        && h.docker.configured
        && !h.docker.reachable
    {
        output::note(&format!(
            "job {id} waits in the queue until the docker engine is back: {}",
            h.docker.problem.as_deref().unwrap_or("it is not reachable")
        ));
    }

    if args.follow {
        output::note(&format!("submitted job {id}"));
        let first = conn.show(id).await?;
        let rec = logs::follow(
            &conn,
            first,
            vec![
                logs::Tail::new(logs::STDOUT_LOG, logs::Sink::Stdout),
                logs::Tail::new(logs::STDERR_LOG, logs::Sink::Stderr),
            ],
        )
        .await?;
        if rec.wait_exit_code() != 0 {
            output::note(&output::end_line(&rec));
        }
        return Ok(rec.wait_exit_code());
    }
    if args.wait {
        if args.parsable {
            output::print(&format!("{id}\n"))?;
        } else if !ctx.json {
            output::print(&format!("submitted job {id}\n"))?;
        }
        let rec = wait::until_end(&conn, id, None).await?;
        if ctx.json && !args.parsable {
            output::json(&rec)?;
        } else if !args.parsable {
            output::print(&format!("{}\n", output::end_line(&rec)))?;
        }
        return Ok(rec.wait_exit_code());
    }
    if args.parsable {
        output::print(&format!("{id}\n"))?;
    } else if ctx.json {
        output::json(&submitted)?;
    } else {
        output::print(&format!("submitted job {id}\n"))?;
    }
    Ok(exit::OK)
}

/// Puts the caller's environment, as `--export` selects it, under the spec's `env`: the
/// spec's own variables (the file's `env`, `--env`) win. Variables cybd would refuse (a
/// `CYB_` name, a NUL) and ones that are not UTF-8 are left out.
pub fn export_env(
    spec: &mut Map<String, Value>,
    export: &str,
    caller: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let passable = |k: &str, v: &str| {
        !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0') && !k.starts_with("CYB_")
    };
    let caller: Vec<(String, String)> = caller.filter(|(k, v)| passable(k, v)).collect();
    let mut env = Map::new();
    match export.trim() {
        "ALL" => {
            for (k, v) in caller {
                env.insert(k, json!(v));
            }
        }
        "NONE" => {}
        list => {
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                if let Some((k, v)) = item.split_once('=') {
                    if k.is_empty() || k.starts_with("CYB_") {
                        return Err(Failure::usage(format!(
                            "--export {item}: `{k}` cannot be passed (empty, or a name starting with CYB_, which cybd sets)"
                        ))
                        .into());
                    }
                    env.insert(k.to_string(), json!(v));
                } else if item == "ALL" {
                    for (k, v) in &caller {
                        env.entry(k.clone()).or_insert_with(|| json!(v));
                    }
                } else if let Some((_, v)) = caller.iter().find(|(k, _)| k == item) {
                    env.insert(item.to_string(), json!(v));
                }
            }
        }
    }
    if let Some(Value::Object(own)) = spec.get("env") {
        for (k, v) in own {
            env.insert(k.clone(), v.clone());
        }
    }
    if !env.is_empty() {
        spec.insert("env".into(), Value::Object(env));
    }
    Ok(())
}

/// A spec object with its `context` as written: the daemon keeps `context` byte for byte,
/// so cybctl must not parse and rewrite it on the way.
struct WithContext<'a>(&'a Map<String, Value>, Option<&'a RawValue>);

impl serde::Serialize for WithContext<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        if let Some(c) = self.1 {
            m.serialize_entry("context", c)?;
        }
        m.end()
    }
}

/// A job file's fields but `context`, and its `context` as written.
type SpecFile = (Map<String, Value>, Option<Box<RawValue>>);

/// Reads `-f FILE`: a JSON object, at most [`validate::MAX_JOB_FILE_BYTES`]. Its `context`
/// is returned aside, as written.
fn read_spec_object(file: &Path) -> anyhow::Result<SpecFile> {
    let bytes = validate::read_job_file(file)?;
    let name = file.display();
    let invalid = |field: &str, e: serde_json::Error| -> anyhow::Error {
        Failure::new(
            exit::INVALID_SPEC,
            format!("{name}: {}", SpecError::from_json(field, &e)),
        )
        .into()
    };
    let whole = serde_json::from_slice::<&RawValue>(&bytes).map_err(|e| invalid(".", e))?;
    if !whole.get().starts_with('{') {
        return Err(Failure::new(
            exit::INVALID_SPEC,
            format!("{name}: a job file holds one JSON object"),
        )
        .into());
    }
    let fields: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_str(whole.get()).map_err(|e| invalid(".", e))?;
    let mut map = Map::new();
    let mut context = None;
    for (k, v) in fields {
        if k == "context" {
            context = Some(v.to_owned());
        } else {
            let v = serde_json::from_str::<Value>(v.get()).map_err(|e| invalid(&k, e))?;
            map.insert(k, v);
        }
    }
    Ok((map, context))
}

/// The spec object: `base` (the file's, if any) with the flags' fields put in. Scalars and
/// the payload replace the file's; `--env` and `--after` add to its `env` and `depends_on`.
/// `cwd` is the current directory, used to make a relative `--cwd` absolute.
pub fn build_spec(
    base: Option<Map<String, Value>>,
    args: &Args,
    cwd: Option<&Path>,
) -> anyhow::Result<Map<String, Value>> {
    let mut spec = base.unwrap_or_default();
    if let Some(shell) = &args.shell {
        set_payload(&mut spec, "shell", json!(shell));
    }
    if let Some(image) = &args.image {
        let mut d = Map::new();
        d.insert("image".into(), json!(image));
        if !args.command.is_empty() {
            d.insert("command".into(), json!(args.command));
        }
        if let Some(e) = &args.entrypoint {
            d.insert("entrypoint".into(), json!([e]));
        }
        if !args.mounts.is_empty() {
            d.insert("mounts".into(), json!(args.mounts));
        }
        if let Some(n) = &args.network {
            d.insert("network".into(), json!(n));
        }
        if let Some(w) = &args.workdir {
            d.insert("workdir".into(), json!(w));
        }
        set_payload(&mut spec, "docker", Value::Object(d));
    } else if !args.command.is_empty() {
        set_payload(&mut spec, "command", json!(args.command));
    }
    if let Some(name) = &args.name {
        spec.insert("name".into(), json!(name));
    }
    if let Some(class) = args.class {
        spec.insert("class".into(), json!(class.as_str()));
    }
    if let Some(p) = args.priority {
        spec.insert("priority".into(), json!(p));
    }
    if let Some(t) = &args.timeout {
        spec.insert("timeout".into(), json!(t));
    }
    let resources = [
        ("gpus", args.gpus.map(|n| json!(n))),
        ("memory", args.memory.as_ref().map(|m| json!(m))),
        ("cpus", args.cpus.map(|c| json!(c))),
        ("pids", args.pids.map(|p| json!(p))),
    ];
    for (key, value) in resources {
        let Some(value) = value else { continue };
        let r = spec.entry("resources").or_insert_with(|| json!({}));
        if !r.is_object() {
            *r = json!({});
        }
        if let Value::Object(r) = r {
            r.insert(key.into(), value);
        }
    }
    if !args.after.is_empty() {
        let deps = spec.entry("depends_on").or_insert_with(|| json!([]));
        if !deps.is_array() {
            *deps = json!([]);
        }
        if let Value::Array(list) = deps {
            for id in &args.after {
                let id = json!(id);
                if !list.contains(&id) {
                    list.push(id);
                }
            }
        }
    }
    if !args.env.is_empty() {
        let env = spec.entry("env").or_insert_with(|| json!({}));
        if !env.is_object() {
            *env = json!({});
        }
        if let Value::Object(vars) = env {
            for kv in &args.env {
                let (k, v) = parse_env(kv)?;
                vars.insert(k.to_string(), json!(v));
            }
        }
    }
    if let Some(dir) = &args.cwd {
        let abs = if dir.is_absolute() {
            dir.clone()
        } else {
            let Some(base) = cwd else {
                return Err(Failure::usage(format!(
                    "--cwd {}: a relative directory needs a current directory, and it cannot be told",
                    dir.display()
                ))
                .into());
            };
            base.join(dir)
        };
        spec.insert("cwd".into(), json!(utf8(&abs, "--cwd")?));
    }
    Ok(spec)
}

fn set_payload(spec: &mut Map<String, Value>, field: &str, value: Value) {
    for f in PAYLOAD_FIELDS {
        spec.remove(f);
    }
    spec.insert(field.into(), value);
}

/// Splits `NAME=VALUE`.
fn parse_env(kv: &str) -> anyhow::Result<(&str, &str)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => Err(Failure::usage(format!("--env `{kv}`: expected NAME=VALUE")).into()),
    }
}

fn utf8<'a>(p: &'a Path, what: &str) -> anyhow::Result<&'a str> {
    p.to_str()
        .ok_or_else(|| Failure::usage(format!("{what} {}: the path is not valid UTF-8", p.display())).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> Args {
        let cli = Cli::try_parse_from(std::iter::once("cybctl").chain(argv.iter().copied())).unwrap();
        match cli.command {
            Command::Submit(a) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn build(argv: &[&str]) -> Map<String, Value> {
        build_spec(None, &args(argv), Some(Path::new("/home/u"))).unwrap()
    }

    #[test]
    fn command_with_flags() {
        let spec = build(&[
            "submit",
            "--env",
            "A=1",
            "--after",
            "3",
            "--priority",
            "5",
            "--",
            "echo",
            "hi",
        ]);
        assert_eq!(
            Value::Object(spec),
            json!({"command": ["echo", "hi"], "env": {"A": "1"}, "depends_on": [3], "priority": 5})
        );
    }

    fn caller() -> impl Iterator<Item = (String, String)> {
        [
            ("PATH", "/home/u/venv/bin:/usr/bin"),
            ("HOME", "/home/u"),
            ("CYB_SOCKET", "/x"),
            ("TOKEN", "t"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
    }

    #[test]
    fn the_callers_environment_is_passed_as_sbatch_does_and_export_restricts_it() {
        let with = |export: &str, argv: &[&str]| {
            let mut spec = build(argv);
            export_env(&mut spec, export, caller()).unwrap();
            spec.get("env").cloned().unwrap_or(json!({}))
        };
        let cmd = ["submit", "--", "true"];
        assert_eq!(
            with("ALL", &cmd),
            json!({"PATH": "/home/u/venv/bin:/usr/bin", "HOME": "/home/u", "TOKEN": "t"}),
            "everything but what cybd sets itself"
        );
        assert_eq!(with("NONE", &cmd), json!({}));
        assert_eq!(
            with("PATH,NOSUCH,X=1", &cmd),
            json!({"PATH": "/home/u/venv/bin:/usr/bin", "X": "1"})
        );
        // --env wins over the caller's value.
        assert_eq!(
            with("TOKEN", &["submit", "--env", "TOKEN=mine", "--", "true"]),
            json!({"TOKEN": "mine"})
        );
        let mut spec = build(&cmd);
        assert!(export_env(&mut spec, "CYB_JOB_ID=3", caller()).is_err());
        // The flag parses, and defaults to ALL.
        assert_eq!(args(&cmd).export, None);
        assert_eq!(
            args(&["submit", "--export", "NONE", "--", "true"])
                .export
                .as_deref(),
            Some("NONE")
        );
    }

    #[test]
    fn every_flag() {
        let spec = build(&[
            "submit",
            "--shell",
            "make -j4",
            "--name",
            "build",
            "--class",
            "cpu_long",
            "--priority",
            "-2",
            "--after",
            "1",
            "--after",
            "2",
            "--timeout",
            "10m",
            "--env",
            "X=a=b",
            "--env",
            "EMPTY=",
            "--cwd",
            "src",
        ]);
        assert_eq!(
            Value::Object(spec),
            json!({
                "shell": "make -j4", "name": "build", "class": "cpu_long", "priority": -2,
                "depends_on": [1, 2], "timeout": "10m", "env": {"X": "a=b", "EMPTY": ""}, "cwd": "/home/u/src"
            })
        );
    }

    #[test]
    fn env_without_equals_is_named() {
        let e = build_spec(None, &args(&["submit", "--env", "NOPE", "--", "true"]), None).unwrap_err();
        assert!(e.to_string().contains("`NOPE`"), "{e}");
        assert_eq!(exit::code_of(&e), exit::USAGE);
        let e = build_spec(None, &args(&["submit", "--env", "=x", "--", "true"]), None).unwrap_err();
        assert!(e.to_string().contains("`=x`"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = json!({
            "command": ["old"], "name": "from-file", "priority": 1,
            "env": {"A": "file", "B": "file"}, "depends_on": [3]
        });
        let Value::Object(base) = file else { unreachable!() };
        let a = args(&[
            "submit",
            "-f",
            "job.json",
            "--shell",
            "new",
            "--priority",
            "9",
            "--env",
            "A=flag",
            "--after",
            "3",
            "--after",
            "4",
        ]);
        let spec = build_spec(Some(base), &a, None).unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({
                "shell": "new", "name": "from-file", "priority": 9,
                "env": {"A": "flag", "B": "file"}, "depends_on": [3, 4]
            })
        );
    }

    #[test]
    fn resource_flags_fill_resources_and_keep_the_files_others() {
        let mut base = Map::new();
        base.insert("resources".into(), json!({"memory": "1GiB", "pids": 10}));
        let a = args(&[
            "submit", "--gpus", "2", "--cpus", "1.5", "--memory", "512MiB", "--class", "gpu", "--shell", "x",
        ]);
        let spec = build_spec(Some(base), &a, None).unwrap();
        assert_eq!(
            spec["resources"],
            json!({"gpus": 2, "cpus": 1.5, "memory": "512MiB", "pids": 10})
        );
        let parsed = cyb_proto::parse_job(serde_json::to_string(&spec).unwrap().as_bytes()).unwrap();
        assert_eq!(parsed.gpus(), 2);
    }

    #[test]
    fn the_result_is_a_valid_spec() {
        let spec = build(&["submit", "--class", "gpu", "--timeout", "90s", "--", "nvidia-smi"]);
        let parsed = cyb_proto::parse_job(serde_json::to_string(&spec).unwrap().as_bytes()).unwrap();
        assert_eq!(parsed.class(), Class::Gpu);
    }

    #[test]
    fn usage_errors_come_from_clap() {
        let parse =
            |argv: &[&str]| Cli::try_parse_from(std::iter::once("cybctl").chain(argv.iter().copied()));
        // Nothing to run.
        assert!(parse(&["submit", "--name", "x"]).is_err());
        // Both a shell script and a command.
        assert!(parse(&["submit", "--shell", "true", "--", "true"]).is_err());
        assert!(parse(&["submit", "--timeout", "soon", "--", "true"]).is_err());
        assert!(parse(&["submit", "--memory", "lots", "--", "true"]).is_err());
        assert!(parse(&["submit", "--class", "huge", "--", "true"]).is_err());
    }
}
