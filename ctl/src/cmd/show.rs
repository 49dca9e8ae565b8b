//! `cybctl show`: one job in detail: state and why, exit code or signal, times, run directory
//! and what it runs. `--json` prints the record itself.

use cyb_proto::spec::Payload;
use cyb_proto::{CallbackState, CallbackStatus, JobId, JobRecord, JobState, Timestamp};
use time::{OffsetDateTime, UtcOffset};

use super::Ctx;
use crate::exit;
use crate::output;
use crate::term::{self, Term};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job's id
    pub id: JobId,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let rec = conn.show(args.id).await?;
    if ctx.json {
        output::json(&rec)?;
    } else {
        let mut text = render(&rec, OffsetDateTime::now_utc(), ctx.tz, &ctx.term);
        if matches!(rec.state, JobState::Queued { .. })
            && let Some(why) = docker_waits(&conn, &rec).await
        {
            text.push_str(&format!("waiting      for the docker engine: {why}\n"));
        }
        output::print(&text)?;
    }
    Ok(exit::OK)
}

/// Why a docker job cannot start now, if the engine is what it waits for.
pub async fn docker_waits(conn: &crate::conn::Conn, rec: &JobRecord) -> Option<String> {
    rec.spec.docker.as_ref()?;
    let h = conn.health().await.ok()?;
    (h.docker.configured && !h.docker.reachable)
        .then(|| h.docker.problem.unwrap_or_else(|| "it is not reachable".into()))
}

/// Aligned `key  value` lines.
struct Lines(Vec<(&'static str, String)>);

impl Lines {
    fn add(&mut self, key: &'static str, value: impl Into<String>) {
        self.0.push((key, value.into()));
    }

    /// On a terminal a value too long for its width goes on over indented lines, and the
    /// job's state (the first word of `state`) is coloured.
    fn render(&self, term: &Term, state: cyb_proto::StateName) -> String {
        let width = self.0.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let room = term.width.map(|w| w.saturating_sub(width + 2).max(20));
        let mut out = String::new();
        for (k, v) in &self.0 {
            for (i, line) in output::wrap(v, room).into_iter().enumerate() {
                let key = if i == 0 { *k } else { "" };
                let line = match line.strip_prefix(state.as_str()) {
                    Some(rest) if i == 0 && *k == "state" => {
                        format!("{}{rest}", term.paint(state.as_str(), term::state_style(state)))
                    }
                    _ => line,
                };
                out.push_str(format!("{key:<width$}  {line}").trim_end());
                out.push('\n');
            }
        }
        out
    }
}

fn render(rec: &JobRecord, now: OffsetDateTime, tz: UtcOffset, term: &Term) -> String {
    let at = |t: Timestamp| format!("{} ({})", output::long_time(t.0, tz), output::relative(t.0, now));
    let mut l = Lines(Vec::new());
    l.add(
        "job",
        if rec.name().is_empty() {
            rec.id.to_string()
        } else {
            format!("{} ({})", rec.id, rec.name())
        },
    );

    match &rec.state {
        JobState::Queued { since } => l.add("state", format!("queued since {}", at(*since))),
        JobState::Held { since, by } => l.add("state", format!("held by {by} since {}", at(*since))),
        JobState::Waiting {
            until,
            next_attempt,
            last,
        } => {
            l.add(
                "state",
                format!("waiting: attempt {next_attempt} starts at {}", at(*until)),
            );
            let mut was = format!("{}: {}", last.reason, last.message);
            if let Some(s) = output::exit_status(last) {
                was.push_str(&format!(" ({s})"));
            }
            l.add("last attempt", was);
        }
        JobState::Running {
            started_at,
            attempt,
            gpus,
            handle,
        } => {
            let sup = match handle.supervisor() {
                Some(s) => format!(", supervisor pid {}", s.pid),
                None => String::new(),
            };
            if let cyb_proto::job::RunHandle::Docker {
                container,
                container_id,
                ..
            } = handle
            {
                let id = container_id
                    .as_deref()
                    .map(|c| &c[..c.len().min(12)])
                    .unwrap_or("not created yet");
                l.add("container", format!("{container} ({id})"));
            }
            l.add("state", format!("running (attempt {attempt}{sup})"));
            l.add("started", at(*started_at));
            if !gpus.is_empty() {
                let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
                l.add("gpus", list.join(","));
            }
        }
        JobState::Succeeded { outcome }
        | JobState::Failed { outcome }
        | JobState::TimedOut { outcome }
        | JobState::Cancelled { outcome, .. } => {
            l.add("state", format!("{} ({})", rec.state.name(), outcome.reason));
            if !outcome.message.is_empty() {
                l.add("message", outcome.message.clone());
            }
            if let Some(code) = outcome.exit_code {
                l.add("exit code", code.to_string());
            }
            if let Some(sig) = outcome.signal {
                l.add("signal", format!("{sig} ({})", output::signal_name(sig)));
            }
            if let JobState::Cancelled { by, .. } = &rec.state {
                l.add("cancelled by", by.clone());
            }
            if let Some(b) = outcome.peak_memory_bytes {
                l.add(
                    "peak memory",
                    bytesize::ByteSize::b(b).display().iec().to_string(),
                );
            }
            if let Some(ms) = outcome.cpu_usage_ms {
                l.add("cpu time", format!("{:.2}s", ms as f64 / 1000.0));
            }
            if !outcome.gpus.is_empty() {
                let list: Vec<String> = outcome
                    .gpus
                    .iter()
                    .map(|g| match &g.uuid {
                        Some(u) => format!("{} ({u})", g.index),
                        None => g.index.to_string(),
                    })
                    .collect();
                l.add("gpus", list.join(", "));
            }
            if let Some(c) = &outcome.container_id {
                l.add("container", c.clone());
            }
            for e in &outcome.errors {
                l.add("error", e.clone());
            }
        }
    }

    l.add("user", format!("{} (uid {})", rec.owner.user, rec.owner.uid));
    l.add(
        "class",
        format!(
            "{}, priority {}, backend {}",
            rec.spec.class(),
            rec.priority,
            rec.spec.backend()
        ),
    );
    l.add("attempts", rec.attempts.to_string());
    l.add("submitted", at(rec.submitted_at));
    if let Some(first) = rec.first_started_at {
        l.add(
            "first start",
            format!(
                "{} (queued {})",
                at(first),
                output::between(rec.submitted_at, first)
            ),
        );
    }
    if let Some(o) = rec.state.outcome().filter(|_| rec.state.is_terminal()) {
        let ran = o
            .started_at
            .map(|s| format!(", ran {}", output::between(s, o.finished_at)))
            .unwrap_or_default();
        l.add("finished", format!("{}{ran}", at(o.finished_at)));
    }
    if !rec.run_dir.is_empty() {
        l.add("run dir", rec.run_dir.clone());
    }
    l.add("runs", payload(rec));
    if let Some(cwd) = &rec.spec.cwd {
        l.add("cwd", cwd.clone());
    }
    if let Some(d) = &rec.spec.docker {
        if let Some(w) = &d.workdir {
            l.add("workdir", w.clone());
        }
        for m in &d.mounts {
            l.add("mount", m.clone());
        }
        l.add("network", d.network.clone().unwrap_or_else(|| "none".into()));
    }
    if let Some(r) = &rec.spec.resources {
        let mut parts = Vec::new();
        if let Some(m) = r.memory {
            parts.push(format!("memory {}", bytesize::ByteSize::b(m.0).display().iec()));
        }
        if let Some(c) = r.cpus {
            parts.push(format!("cpus {c}"));
        }
        if let Some(p) = r.pids {
            parts.push(format!("pids {p}"));
        }
        if let Some(g) = r.gpus.filter(|g| *g > 0) {
            parts.push(format!("gpus {g}"));
        }
        if !parts.is_empty() {
            l.add("asked for", parts.join(", "));
        }
    }
    if !rec.spec.env.is_empty() {
        // A value shown as `(hidden)`: the caller is neither the job's owner nor an admin.
        let vars: Vec<String> = rec.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        l.add("env", output::shell_join(&vars));
    }
    if let Some(c) = &rec.spec.context {
        l.add("context", context_line(c));
    }
    if !rec.spec.depends_on.is_empty() {
        let ids: Vec<String> = rec.spec.depends_on.iter().map(i64::to_string).collect();
        l.add("after", ids.join(", "));
    }
    if let Some(t) = rec.spec.timeout {
        l.add("timeout", humantime::format_duration(t.0).to_string());
    }
    if let Some(c) = &rec.callback {
        l.add("callback", callback(c, &at, now));
    } else if let Some(u) = &rec.spec.callback_url {
        l.add("callback", format!("{u}, when the job ends"));
    }
    l.render(term, rec.state.name())
}

/// The longest `context` shown in full; a longer one is only measured.
const CONTEXT_CHARS: usize = 200;

/// `context` in one line: its JSON without layout, or its size when that is long.
fn context_line(c: &cyb_proto::spec::RawJson) -> String {
    let compact = c
        .to_value()
        .map_or_else(|_| c.get().to_string(), |v| v.to_string());
    if compact.chars().count() <= CONTEXT_CHARS {
        compact
    } else {
        format!("{} bytes of JSON (`cybctl show --json` prints it)", c.get().len())
    }
}

/// Where the callback's delivery stands, in one line.
fn callback(c: &CallbackStatus, at: &dyn Fn(Timestamp) -> String, now: OffsetDateTime) -> String {
    let why = c
        .last_error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    let tries = |n: u32| {
        if n == 1 {
            "1 attempt".to_string()
        } else {
            format!("{n} attempts")
        }
    };
    match &c.state {
        CallbackState::Delivered { at: t, status } => {
            format!("delivered {} (HTTP {status}, {})", at(*t), tries(c.attempts))
        }
        CallbackState::Retrying { next_try } if c.attempts == 0 && c.last_error.is_none() => {
            format!("pending, first try {}", output::relative(next_try.0, now))
        }
        CallbackState::Retrying { next_try } => format!(
            "retrying ({}, next try {}){why}",
            tries(c.attempts),
            output::relative(next_try.0, now)
        ),
        CallbackState::GivenUp { .. } => format!("given up after {}{why}", tries(c.attempts)),
    }
}

/// What the job runs, in one line.
fn payload(rec: &JobRecord) -> String {
    match rec.spec.payload() {
        Some(Payload::Command(argv)) => output::shell_join(argv),
        Some(Payload::Shell(script)) => format!("sh -c {}", output::shell_join(&[script.to_string()])),
        Some(Payload::Docker(d)) => {
            let mut s = format!("docker image {}", d.image);
            let mut argv: Vec<String> = d.entrypoint.clone().unwrap_or_default();
            argv.extend(d.command.clone().unwrap_or_default());
            match (&d.entrypoint, argv.is_empty()) {
                (_, true) => s.push_str(" (its own entrypoint and command)"),
                (Some(_), false) => s.push_str(&format!(
                    ", entrypoint and command: {}",
                    output::shell_join(&argv)
                )),
                (None, false) => s.push_str(&format!(", command: {}", output::shell_join(&argv))),
            }
            s
        }
        Some(Payload::Task(t)) => {
            let kind = serde_json::to_value(t.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from));
            format!("builtin task {}", kind.unwrap_or_default())
        }
        None => "nothing".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::job::Origin;
    use cyb_proto::{Outcome, Owner, Reason};
    use time::macros::datetime;

    fn ts(t: OffsetDateTime) -> Timestamp {
        Timestamp(t)
    }

    #[test]
    fn failed_job() {
        let spec = cyb_proto::parse_job(
            br#"{"name":"build","command":["make","-C","my dir"],"cwd":"/src","depends_on":[3]}"#,
        )
        .unwrap();
        let rec = JobRecord {
            id: 7,
            spec,
            owner: Owner {
                uid: 1000,
                gid: 1000,
                user: "alice".into(),
            },
            origin: Origin::Rpc { pid: Some(1) },
            submitted_at: ts(datetime!(2025-11-23 14:00:00 UTC)),
            priority: 5,
            attempts: 1,
            first_started_at: Some(ts(datetime!(2025-11-23 14:00:01 UTC))),
            run_dir: "/logs/run_7".into(),
            callback: None,
            state: JobState::Failed {
                outcome: Box::new(Outcome {
                    reason: Reason::ExitCode,
                    message: "exited with status 2".into(),
                    exit_code: Some(2),
                    signal: None,
                    started_at: Some(ts(datetime!(2025-11-23 14:00:01 UTC))),
                    finished_at: ts(datetime!(2025-11-23 14:00:05 UTC)),
                    peak_memory_bytes: None,
                    cpu_usage_ms: None,
                    gpus: vec![cyb_proto::job::HeldGpu {
                        index: 1,
                        uuid: Some("GPU-5e1c".into()),
                    }],
                    container_id: None,
                    errors: vec!["artifacts not collected: no space left on device".into()],
                }),
            },
        };
        let now = datetime!(2025-11-23 14:10:00 UTC);
        let text = render(&rec, now, UtcOffset::UTC, &Term::default());
        for want in [
            "job          7 (build)\n",
            "state        failed (exit_code)\n",
            "message      exited with status 2\n",
            "exit code    2\n",
            "gpus         1 (GPU-5e1c)\n",
            "error        artifacts not collected: no space left on device\n",
            "class        cpu_short, priority 5, backend native\n",
            "finished     2025-11-23 14:00:05 +00:00 (9m 55s ago), ran 4.0s\n",
            "run dir      /logs/run_7\n",
            "runs         make -C 'my dir'\n",
            "after        3\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A 40-column terminal: the long lines go on under their value, the state is red.
        let narrow = render(
            &rec,
            now,
            UtcOffset::UTC,
            &Term {
                width: Some(40),
                color: true,
            },
        );
        assert!(
            narrow.contains("\x1b[1m\x1b[31mfailed\x1b[0m (exit_code)"),
            "{narrow:?}"
        );
        assert!(
            narrow
                .lines()
                .filter(|l| !l.contains('\x1b'))
                .all(|l| l.chars().count() <= 40),
            "{narrow}"
        );
        assert!(
            narrow.contains("error        artifacts not collected: no\n             space left on device\n"),
            "{narrow}"
        );
    }

    #[test]
    fn callback_states() {
        let now = datetime!(2025-11-23 14:10:00 UTC);
        let at = |t: Timestamp| output::relative(t.0, now);
        let c = |attempts, state, last_error: Option<&str>| CallbackStatus {
            url: "http://h/x".into(),
            webhook_id: "msg_1".into(),
            attempts,
            state,
            last_error: last_error.map(str::to_string),
        };
        let retrying = CallbackState::Retrying {
            next_try: ts(datetime!(2025-11-23 14:10:48 UTC)),
        };
        for (status, want) in [
            (c(0, retrying.clone(), None), "pending, first try in 48s"),
            (
                c(2, retrying, Some("answered 500 Internal Server Error")),
                "retrying (2 attempts, next try in 48s): answered 500 Internal Server Error",
            ),
            (
                c(
                    1,
                    CallbackState::Delivered {
                        at: ts(datetime!(2025-11-23 14:09:00 UTC)),
                        status: 204,
                    },
                    None,
                ),
                "delivered 1m 00s ago (HTTP 204, 1 attempt)",
            ),
            (
                c(
                    6,
                    CallbackState::GivenUp {
                        at: ts(datetime!(2025-11-23 14:09:00 UTC)),
                    },
                    Some("answered 410 Gone"),
                ),
                "given up after 6 attempts: answered 410 Gone",
            ),
        ] {
            assert_eq!(callback(&status, &at, now), want);
        }
    }
}
