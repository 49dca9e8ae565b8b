//! Everything cybctl prints: JSON, aligned tables, times and durations for people, and the
//! one-line description of how a job ended. Output goes through [`print`] so that a closed
//! pipe is an error to handle, not a panic.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use cyb_proto::{JobRecord, JobState, Outcome, Timestamp};
use serde::Serialize;
use time::{OffsetDateTime, UtcOffset};

/// Writes `text` to stdout as is.
pub fn print(text: &str) -> anyhow::Result<()> {
    write_bytes(text.as_bytes())
}

/// Writes raw bytes to stdout (log contents).
pub fn write_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Writes raw bytes to stderr (a job's stderr.log under `submit --follow`).
pub fn write_err_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut err = std::io::stderr().lock();
    err.write_all(bytes)
        .and_then(|()| err.flush())
        .context("cannot write to stderr")
}

/// Prints a line to stderr, for progress notes that must stay out of stdout.
pub fn note(line: &str) {
    // Nothing useful can be done if stderr itself is gone.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Prints `value` as pretty JSON and a newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode the answer as JSON")?;
    text.push('\n');
    print(&text)
}

/// A table with a header row; columns are padded to their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns` are (header, right-aligned).
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            right_aligned: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(n) {
                let pad = widths[i].saturating_sub(cell.chars().count());
                let last = i + 1 == n;
                if self.right_aligned[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if !last {
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Shortens `s` to at most `max` characters, marking the cut with `…`.
pub fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The local UTC offset. Call it before any thread starts: the `time` crate refuses to read
/// the local offset from a multi-threaded process. Falls back to UTC.
pub fn local_offset() -> UtcOffset {
    UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A short local time for tables: `14:03:07` today, `Nov 23 14:03` this year, else
/// `2024-11-23`.
pub fn short_time(t: OffsetDateTime, now: OffsetDateTime, tz: UtcOffset) -> String {
    let t = t.to_offset(tz);
    let now = now.to_offset(tz);
    if t.date() == now.date() {
        format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
    } else if t.year() == now.year() {
        let month = MONTHS[usize::from(u8::from(t.month())) - 1];
        format!("{month} {:02} {:02}:{:02}", t.day(), t.hour(), t.minute())
    } else {
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    }
}

/// A full local time: `2025-11-23 14:03:07 +01:00`.
pub fn long_time(t: OffsetDateTime, tz: UtcOffset) -> String {
    let t = t.to_offset(tz);
    let (oh, om, _) = tz.as_hms();
    let sign = if tz.is_negative() { '-' } else { '+' };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        oh.unsigned_abs(),
        om.unsigned_abs()
    )
}

/// A duration for people, to two units at most: `250ms`, `4.2s`, `59s`, `3m 07s`, `2h 05m`,
/// `3d 04h`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 10 {
        format!("{}.{}s", s, d.subsec_millis() / 100)
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// How far `t` is from `now`: `3m 07s ago`, or `in 5.0s` for a time ahead.
pub fn relative(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let d = now - t;
    let abs = Duration::from_millis(u64::try_from(d.whole_milliseconds().unsigned_abs()).unwrap_or(u64::MAX));
    if d.is_negative() {
        format!("in {}", duration(abs))
    } else {
        format!("{} ago", duration(abs))
    }
}

/// The time between two timestamps, for `ran 4.2s` and `waited 1.0s`.
pub fn between(from: Timestamp, to: Timestamp) -> String {
    duration(Duration::from_millis(from.ms_until(to)))
}

/// `SIGKILL` for 9, or the bare number when it is not a known signal.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// An argv as a shell would need it typed: plain words stay plain, others are single-quoted.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@')
        });
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The exit code or signal of an outcome: `exit 3`, `SIGKILL`, or nothing.
pub fn exit_status(o: &Outcome) -> Option<String> {
    match (o.exit_code, o.signal) {
        (_, Some(sig)) => Some(signal_name(sig)),
        (Some(code), None) => Some(format!("exit {code}")),
        (None, None) => None,
    }
}

/// One line on where a job stands: `job 7 failed: process exited with status 3 (exit 3)`.
pub fn end_line(rec: &JobRecord) -> String {
    let state = rec.state.name();
    let mut line = format!("job {} {state}", rec.id);
    if let Some(o) = rec.state.outcome().filter(|_| rec.state.is_terminal()) {
        if !o.message.is_empty() {
            line.push_str(": ");
            line.push_str(&o.message);
        }
        // Not twice: "killed by signal 9 (SIGKILL)" names its signal already.
        if let Some(s) = exit_status(o).filter(|s| !o.message.contains(s.as_str())) {
            line.push_str(&format!(" ({s})"));
        }
    }
    if let JobState::Cancelled { by, outcome } = &rec.state
        && !outcome.message.contains(&format!("cancelled by {by}"))
    {
        line.push_str(&format!(" [cancelled by {by}]"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, offset};

    #[test]
    fn short_time_today_this_year_and_older() {
        let now = datetime!(2025-11-23 15:00:00 UTC);
        let tz = offset!(+1);
        assert_eq!(
            short_time(datetime!(2025-11-23 13:03:07 UTC), now, tz),
            "14:03:07"
        );
        assert_eq!(
            short_time(datetime!(2025-03-02 08:30:00 UTC), now, tz),
            "Mar 02 09:30"
        );
        assert_eq!(
            short_time(datetime!(2024-12-31 12:00:00 UTC), now, tz),
            "2024-12-31"
        );
    }

    #[test]
    fn short_time_uses_the_local_date() {
        // 23:30 UTC on the 22nd is already the 23rd at +01:00.
        let now = datetime!(2025-11-23 10:00:00 UTC);
        assert_eq!(
            short_time(datetime!(2025-11-22 23:30:00 UTC), now, offset!(+1)),
            "00:30:00"
        );
        assert_eq!(
            short_time(datetime!(2025-11-22 23:30:00 UTC), now, UtcOffset::UTC),
            "Nov 22 23:30"
        );
    }

    #[test]
    fn long_time_shows_the_offset() {
        let t = datetime!(2025-11-23 13:03:07 UTC);
        assert_eq!(long_time(t, offset!(+1)), "2025-11-23 14:03:07 +01:00");
        assert_eq!(long_time(t, offset!(-5:30)), "2025-11-23 07:33:07 -05:30");
        assert_eq!(long_time(t, UtcOffset::UTC), "2025-11-23 13:03:07 +00:00");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_millis(4_270)), "4.2s");
        assert_eq!(duration(Duration::from_secs(59)), "59s");
        assert_eq!(duration(Duration::from_secs(187)), "3m 07s");
        assert_eq!(duration(Duration::from_secs(7_500)), "2h 05m");
        assert_eq!(duration(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)), "3d 04h");
    }

    #[test]
    fn relative_times() {
        let now = datetime!(2025-11-23 15:00:00 UTC);
        assert_eq!(relative(datetime!(2025-11-23 14:56:53 UTC), now), "3m 07s ago");
        assert_eq!(relative(datetime!(2025-11-23 15:00:05 UTC), now), "in 5.0s");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&[("ID", true), ("NAME", false), ("STATE", false)]);
        t.row(vec!["7".into(), "train".into(), "running".into()]);
        t.row(vec!["12".into(), "x".into(), "queued".into()]);
        assert_eq!(
            t.render(),
            "ID  NAME   STATE\n 7  train  running\n12  x      queued\n"
        );
    }

    #[test]
    fn quoting_and_names() {
        assert_eq!(
            shell_join(&["echo".into(), "hi there".into(), "it's".into(), "".into()]),
            r"echo 'hi there' 'it'\''s' ''"
        );
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(ellipsize("abcdef", 4), "abc…");
        assert_eq!(ellipsize("abc", 4), "abc");
    }
}
