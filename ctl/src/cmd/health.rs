//! `cybctl health`: what cybd enforces on this host: the cgroup layout and which limits
//! hold, whether device denial works (the daemon's start-up probe), the GPU inventory, the
//! Docker engine, and warnings a person should act on.

use cyb_proto::rpc::Health;

use super::Ctx;
use crate::exit;
use crate::output;
use crate::term::{self, Term};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    let h = ctx.connect().await?.health().await?;
    if ctx.json {
        output::json(&h)?;
    } else {
        output::print(&render(&h, &ctx.term))?;
    }
    Ok(exit::OK)
}

fn list(v: &[String]) -> String {
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

/// On a terminal, what is not enforced and the warnings are yellow, working denial green.
fn render(h: &Health, term: &Term) -> String {
    let mut out = format!(
        "cybd {}{}\n",
        h.version,
        if h.user_mode { " (user mode)" } else { "" }
    );
    out.push_str(&format!("cgroups:   {}\n", h.cgroups.description));
    out.push_str(&format!("enforced:  {}\n", list(&h.cgroups.enforced)));
    let not_enforced = list(&h.cgroups.not_enforced);
    let style = if h.cgroups.not_enforced.is_empty() {
        anstyle::Style::new()
    } else {
        term::WARN
    };
    out.push_str(&format!("not enforced: {}\n", term.paint(&not_enforced, style)));
    out.push_str(&format!(
        "devices:   {} ({})\n",
        if h.devices.enforced {
            term.paint("denial works", term::GOOD)
        } else {
            term.paint("NOT enforced", term::WARN)
        },
        h.devices.probe
    ));
    out.push_str(&format!(
        "gpus:      {} usable; {}\n",
        h.gpus.count, h.gpus.health
    ));
    out.push_str(&format!("docker:    {}\n", docker_line(&h.docker, term)));
    out.push_str(&format!(
        "require_limits: {}\n",
        if h.require_limits {
            "on (jobs that cannot be confined are refused)"
        } else {
            "off (jobs run with what can be enforced)"
        }
    ));
    for n in &h.cgroups.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    for w in &h.warnings {
        out.push_str(&format!("{}: {w}\n", term.paint("warning", term::WARN)));
    }
    out
}

/// The engine in one line: reachable (versions, cgroup driver, GPUs) or why not.
fn docker_line(d: &cyb_proto::rpc::DockerHealth, term: &Term) -> String {
    if !d.configured {
        return d
            .problem
            .clone()
            .unwrap_or_else(|| "docker jobs are not allowed here".into());
    }
    if !d.reachable {
        let why = d.problem.as_deref().unwrap_or("the engine is not reachable");
        return term.paint(
            &format!("NOT reachable: {why} (docker jobs wait in the queue)"),
            term::WARN,
        );
    }
    let gpus = match &d.gpu_problem {
        None => "its GPU runtime is there (GPU jobs get the GPUs cybd gives them)".to_string(),
        Some(why) => format!("no GPU jobs: {why}"),
    };
    format!(
        "{} on {}: engine {}, API {}, cgroup driver {} (cgroup v{}); {gpus}",
        term.paint("reachable", term::GOOD),
        d.socket,
        d.server_version,
        d.api_version,
        d.cgroup_driver,
        d.cgroup_version
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_is_not_enforced() {
        let mut h = Health::default();
        h.cgroups.description = "cgroups not used: user mode".into();
        h.cgroups.not_enforced = vec!["memory".into(), "cpu".into()];
        h.warnings = vec!["not enforced on this host: memory, cpu".into()];
        let text = render(&h, &Term::default());
        assert!(text.contains("enforced:  none"), "{text}");
        assert!(text.contains("not enforced: memory, cpu"), "{text}");
        assert!(text.contains("devices:   NOT enforced"), "{text}");
        assert!(
            text.contains("warning: not enforced on this host: memory, cpu"),
            "{text}"
        );
    }
}
