//! `cybctl ls`: lists jobs oldest first (by id, as `squeue` and `pueue status` do, so the
//! newest are next to the prompt), as a table or JSON. `--limit N` keeps the newest N.

use cyb_proto::{JobSummary, ListFilter, StateName};
use time::{OffsetDateTime, UtcOffset};

use super::Ctx;
use crate::exit;
use crate::output::{self, Cell, Table};
use crate::term::{self, Term};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only jobs in this state (repeatable): queued, held, waiting, running, succeeded, failed,
    /// timed_out, cancelled
    #[arg(long = "state", value_name = "STATE")]
    pub states: Vec<StateName>,

    /// Only this user's jobs
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Only the newest N jobs (still listed oldest first)
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let filter = ListFilter {
        states: args.states,
        user: args.user,
        limit: args.limit,
    };
    let jobs = ctx.connect().await?.list(filter).await?;
    if ctx.json {
        output::json(&jobs)?;
    } else if jobs.is_empty() {
        output::print("no jobs\n")?;
    } else {
        output::print(&table(&jobs, OffsetDateTime::now_utc(), ctx.tz, &ctx.term))?;
    }
    Ok(exit::OK)
}

/// The jobs in the order given (the daemon's: by id). On a terminal, NAME, USER and
/// EXIT/REASON are cut to fit its width (then ATTEMPTS, PRI, CLASS, SUBMITTED and USER are
/// left out, in that order, while it is still too narrow) and states are coloured.
fn table(jobs: &[JobSummary], now: OffsetDateTime, tz: UtcOffset, term: &Term) -> String {
    let mut t = Table::new(&[
        ("ID", true),
        ("NAME", false),
        ("USER", false),
        ("CLASS", false),
        ("PRI", true),
        ("STATE", false),
        ("ATTEMPTS", true),
        ("SUBMITTED", false),
        ("EXIT/REASON", false),
    ])
    .elastic(&["NAME", "USER", "EXIT/REASON"])
    .droppable(&["ATTEMPTS", "PRI", "CLASS", "SUBMITTED", "USER"]);
    for j in jobs {
        t.row(vec![
            j.id.to_string().into(),
            j.name.clone().into(),
            j.user.clone().into(),
            j.class.to_string().into(),
            j.priority.to_string().into(),
            Cell::styled(j.state.to_string(), term::state_style(j.state)),
            j.attempts.to_string().into(),
            output::short_time(j.submitted_at.0, now, tz).into(),
            exit_or_reason(j).into(),
        ]);
    }
    t.render(term)
}

/// `0`, `3`, `3 (timeout)`, `oom_killed`, or empty while the job has not ended.
fn exit_or_reason(j: &JobSummary) -> String {
    match (j.exit_code, j.reason.as_deref()) {
        (Some(c), None | Some("success" | "exit_code")) => c.to_string(),
        (Some(c), Some(r)) => format!("{c} ({r})"),
        (None, Some(r)) => r.to_string(),
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::{Class, Timestamp};
    use time::macros::datetime;

    fn job(id: u64, state: StateName, exit_code: Option<i32>, reason: Option<&str>) -> JobSummary {
        JobSummary {
            id,
            name: "a-rather-long-job-name-that-goes-on-and-on".into(),
            user: "alice".into(),
            class: Class::CpuShort,
            priority: 0,
            state,
            attempts: 1,
            submitted_at: Timestamp(datetime!(2025-11-23 14:03:07 UTC)),
            started_at: None,
            exit_code,
            reason: reason.map(String::from),
        }
    }

    #[test]
    fn table_rows() {
        let jobs = [
            job(12, StateName::Failed, Some(3), Some("exit_code")),
            job(9, StateName::TimedOut, None, Some("timeout")),
            job(8, StateName::Queued, None, None),
        ];
        let now = datetime!(2025-11-23 15:00:00 UTC);
        let text = table(&jobs, now, UtcOffset::UTC, &Term::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  NAME"), "{text}");
        // Not a terminal: the name in full.
        assert!(
            lines[1].starts_with("12  a-rather-long-job-name-that-goes-on-and-on  alice  cpu_short"),
            "{text}"
        );
        assert!(lines[1].ends_with("14:03:07   3"), "{text}");
        assert!(lines[2].ends_with("timeout"), "{text}");
        assert!(lines[3].ends_with("14:03:07"), "{text}");
        // An 80-column terminal: the name is cut, the line fits.
        let term = Term {
            width: Some(80),
            color: false,
        };
        let text = table(&jobs, now, UtcOffset::UTC, &term);
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        assert!(text.contains("12  a-rathe…  alice"), "{text}");
        assert!(text.contains('…'), "{text}");
    }
}
