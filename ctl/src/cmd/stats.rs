//! `cybctl stats`: the daemon's counters: jobs per state, per-class slots, paused or not,
//! next id, and records quarantined at startup.

use cyb_proto::{StateName, Stats};
use time::{OffsetDateTime, UtcOffset};

use super::Ctx;
use crate::exit;
use crate::output::{self, Table};
use crate::term::{self, Term};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    let stats = ctx.connect().await?.stats().await?;
    if ctx.json {
        output::json(&stats)?;
    } else {
        output::print(&render(&stats, OffsetDateTime::now_utc(), ctx.tz, &ctx.term))?;
    }
    Ok(exit::OK)
}

/// On a terminal, long lines are broken to fit its width and state names are coloured.
fn render(s: &Stats, now: OffsetDateTime, tz: UtcOffset, term: &Term) -> String {
    let first = format!(
        "cybd {} (pid {}), up {} since {}",
        s.version,
        s.pid,
        output::relative(s.started_at.0, now).trim_end_matches(" ago"),
        output::long_time(s.started_at.0, tz),
    );
    let mut out = output::wrap(&first, term.width.map(|w| w.saturating_sub(2))).join("\n  ");
    out.push('\n');
    if s.paused {
        out.push_str(&term.paint("paused", term::WARN));
        out.push_str(": no new jobs start\n");
    } else {
        out.push_str("accepting: jobs start as slots free up\n");
    }
    out.push_str(&format!("jobs: {} in all, next id {}\n", s.total_jobs, s.next_id));
    let count = |n: StateName| {
        s.counts
            .iter()
            .find(|(state, _)| *state == n)
            .map_or(0, |(_, c)| *c)
    };
    // `states: queued 0, held 0, ...`, broken after a comma where the terminal ends.
    let mut line_len = "states:".len();
    out.push_str("states:");
    for (i, n) in StateName::ALL.iter().enumerate() {
        let item = format!("{n} {}", count(*n));
        let sep = usize::from(i + 1 < StateName::ALL.len());
        if i > 0 && term.width.is_some_and(|w| line_len + 1 + item.len() + sep > w) {
            out.push_str("\n       ");
            line_len = "       ".len();
        }
        out.push(' ');
        out.push_str(&term.paint(n.as_str(), term::state_style(*n)));
        out.push_str(&format!(" {}", count(*n)));
        if sep == 1 {
            out.push(',');
        }
        line_len += 1 + item.len() + sep;
    }
    out.push('\n');
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
                c.class.to_string().into(),
                c.running.to_string().into(),
                c.queued.to_string().into(),
                c.slots.to_string().into(),
            ]);
        }
        out.push_str(&t.render(term));
    }
    // A paragraph broken to the terminal's width, its lines after the first indented.
    let para = |text: &str| {
        let mut p = output::wrap(text, term.width.map(|w| w.saturating_sub(2))).join("\n  ");
        p.push('\n');
        p
    };
    if let Some(why) = &s.store_error {
        const WHAT: &str = "job records cannot be written now";
        out.push('\n');
        out.push_str(&para(&format!("{WHAT}: {why}")).replacen(WHAT, &term.paint(WHAT, term::WARN), 1));
        out.push_str("  ");
        out.push_str(&para(
            "submissions are refused; ends of jobs are recorded once writes succeed again",
        ));
    }
    if !s.quarantined.is_empty() {
        out.push('\n');
        out.push_str(&para(&format!(
            "quarantined records ({}): unreadable at startup, moved aside",
            s.quarantined.len()
        )));
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
        let text = render(
            &s,
            datetime!(2025-11-23 14:05:00 UTC),
            UtcOffset::UTC,
            &Term::default(),
        );
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
        let narrow = render(
            &s,
            datetime!(2025-11-23 14:05:00 UTC),
            UtcOffset::UTC,
            &Term {
                width: Some(40),
                color: false,
            },
        );
        assert!(narrow.lines().all(|l| l.chars().count() <= 40), "{narrow}");
        assert!(
            narrow.contains("states: queued 3, held 0, waiting 0,\n        running 2,"),
            "{narrow}"
        );
    }
}
