//! `cybctl stats`: the daemon's counters: jobs per state, per-class slots, paused or not,
//! next id, and records quarantined at startup.

use cyb_proto::{StateName, Stats};
use time::{OffsetDateTime, UtcOffset};

use super::Ctx;
use crate::exit;
use crate::output::{self, Table};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    let stats = ctx.connect().await?.stats().await?;
    if ctx.json {
        output::json(&stats)?;
    } else {
        output::print(&render(&stats, OffsetDateTime::now_utc(), ctx.tz))?;
    }
    Ok(exit::OK)
}

fn render(s: &Stats, now: OffsetDateTime, tz: UtcOffset) -> String {
    let mut out = format!(
        "cybd {} (pid {}), up {} since {}\n",
        s.version,
        s.pid,
        output::relative(s.started_at.0, now).trim_end_matches(" ago"),
        output::long_time(s.started_at.0, tz),
    );
    out.push_str(if s.paused {
        "paused: no new jobs start\n"
    } else {
        "accepting: jobs start as slots free up\n"
    });
    out.push_str(&format!("jobs: {} in all, next id {}\n", s.total_jobs, s.next_id));
    let count = |n: StateName| {
        s.counts
            .iter()
            .find(|(state, _)| *state == n)
            .map_or(0, |(_, c)| *c)
    };
    let per_state: Vec<String> = StateName::ALL
        .iter()
        .map(|n| format!("{n} {}", count(*n)))
        .collect();
    out.push_str(&format!("states: {}\n", per_state.join(", ")));
    if !s.classes.is_empty() {
        out.push('\n');
        let mut t = Table::new(&[
            ("CLASS", false),
            ("RUNNING", true),
            ("QUEUED", true),
            ("SLOTS", true),
        ]);
        for c in &s.classes {
            t.row(vec![
                c.class.to_string(),
                c.running.to_string(),
                c.queued.to_string(),
                c.slots.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    if let Some(why) = &s.store_error {
        out.push_str(&format!(
            "\njob records cannot be written now: {why}\n  submissions are refused; ends of jobs are recorded once writes succeed again\n"
        ));
    }
    if !s.quarantined.is_empty() {
        out.push_str(&format!(
            "\nquarantined records ({}): unreadable at startup, moved aside\n",
            s.quarantined.len()
        ));
        for q in &s.quarantined {
            out.push_str(&format!("  {q}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::rpc::ClassStats;
    use cyb_proto::{Class, Timestamp};
    use time::macros::datetime;

    #[test]
    fn renders_everything() {
        let s = Stats {
            version: "0.1.0".into(),
            pid: 42,
            started_at: Timestamp(datetime!(2025-11-23 12:00:00 UTC)),
            paused: true,
            counts: vec![(StateName::Queued, 3), (StateName::Running, 2)],
            classes: vec![ClassStats {
                class: Class::CpuShort,
                slots: 4,
                running: 2,
                queued: 3,
            }],
            total_jobs: 20,
            next_id: 21,
            quarantined: vec!["/var/spool/cyb/jobs/7.json".into()],
            store_error: None,
        };
        let text = render(&s, datetime!(2025-11-23 14:05:00 UTC), UtcOffset::UTC);
        assert!(
            text.starts_with("cybd 0.1.0 (pid 42), up 2h 05m since 2025-11-23 12:00:00 +00:00\npaused"),
            "{text}"
        );
        assert!(
            text.contains("states: queued 3, held 0, waiting 0, running 2,"),
            "{text}"
        );
        assert!(text.contains("cpu_short        2       3      4"), "{text}");
        assert!(text.contains("  /var/spool/cyb/jobs/7.json"), "{text}");
    }
}
