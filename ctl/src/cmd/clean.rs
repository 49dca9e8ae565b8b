//! `cybctl clean`: removes ended jobs, their records and run directories, as `pueue clean`
//! does: with no arguments every one of your jobs that has ended.

use std::time::Duration;

use cyb_proto::StateName;
use cyb_proto::rpc::{CleanReport, CleanRequest};

use super::Ctx;
use crate::exit;
use crate::output;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Only ended jobs (succeeded, failed, timed_out, cancelled) are ever removed, never
queued, held, waiting or running ones, nor an ended job that a job which has not
ended depends on. With no arguments: every ended job of yours. Removed jobs are gone
from `ls` and `show`; their ids are never given out again.")]
pub struct Args {
    /// Only these jobs (all must have ended and be yours, or nothing is removed)
    #[arg(value_name = "ID", conflicts_with_all = ["older_than", "states", "user", "all_users"])]
    pub ids: Vec<cyb_proto::JobId>,

    /// Only jobs that ended at least this long ago (e.g. 7d, 12h, 30m)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,

    /// Only jobs that ended in this state (repeatable): succeeded, failed, timed_out,
    /// cancelled
    #[arg(long = "state", value_name = "STATE")]
    pub states: Vec<StateName>,

    /// Only this user's jobs (another user's: admins only)
    #[arg(long, value_name = "USER", conflicts_with = "all_users")]
    pub user: Option<String>,

    /// Every user's jobs (admins only)
    #[arg(long)]
    pub all_users: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    if let Some(s) = args.states.iter().find(|s| !s.is_terminal()) {
        return Err(crate::exit::Failure::usage(format!(
            "--state {s}: only ended jobs can be cleaned (succeeded, failed, timed_out, cancelled)"
        ))
        .into());
    }
    let explicit = !args.ids.is_empty();
    let req = CleanRequest {
        ids: args.ids,
        states: args.states,
        older_than_ms: args
            .older_than
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        user: args.user,
        all_users: args.all_users,
    };
    let report = ctx.connect().await?.clean(req).await?;
    for k in &report.kept {
        output::note(&format!("kept job {}: {}", k.id, k.why));
    }
    if ctx.json {
        output::json(&report)?;
    } else {
        output::print(&format!("{}\n", summary(&report)))?;
    }
    // Named jobs that stayed: the command did not do what it was asked.
    Ok(if explicit && !report.kept.is_empty() {
        exit::ERROR
    } else {
        exit::OK
    })
}

fn summary(r: &CleanReport) -> String {
    let n = r.removed.len();
    let mut line = format!("removed {n} job{}", if n == 1 { "" } else { "s" });
    if !r.kept.is_empty() {
        line.push_str(&format!(" ({} kept, see above)", r.kept.len()));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::rpc::KeptJob;

    #[test]
    fn the_summary_counts() {
        let mut r = CleanReport::default();
        assert_eq!(summary(&r), "removed 0 jobs");
        r.removed = vec![4];
        assert_eq!(summary(&r), "removed 1 job");
        r.removed = vec![4, 5];
        r.kept = vec![KeptJob {
            id: 2,
            why: "x".into(),
        }];
        assert_eq!(summary(&r), "removed 2 jobs (1 kept, see above)");
    }
}
