//! Everything cybctl prints: JSON, aligned tables, times and durations for people, and the
//! one-line description of how a job ended. Output goes through [`print`] so that a closed
//! pipe is an error to handle, not a panic.

use std::io::Write;
use std::time::Duration;

use anstyle::Style;
use anyhow::Context as _;
use cyb_proto::{JobRecord, JobState, Outcome, Timestamp};
use serde::Serialize;
use time::{OffsetDateTime, UtcOffset};

use crate::term::Term;

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

/// Prints `value` as JSON and a newline: indented for a person when stdout is a terminal,
/// on one line otherwise, so that a script or workflow tool reads one object per line (as
/// `sbatch --parsable` gives one id per line).
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    print(&json_text(value, std::io::stdout().is_terminal())?)
}

/// `value` as JSON, `pretty` or on one line, with a newline.
pub fn json_text<T: Serialize + ?Sized>(value: &T, pretty: bool) -> anyhow::Result<String> {
    let mut text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .context("cannot encode the answer as JSON")?;
    text.push('\n');
    Ok(text)
}

/// A table cell: its text, and the style it is painted in when colour is on.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub fn styled(text: impl Into<String>, style: Style) -> Cell {
        Cell {
            text: text.into(),
            style,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell {
            text,
            style: Style::new(),
        }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::from(text.to_string())
    }
}

/// The narrowest an elastic column is cut to (its header may be wider).
const MIN_ELASTIC: usize = 8;

/// A table with a header row; columns are padded to their widest cell. On a terminal the
/// elastic columns are cut (marked `…`) until each line fits its width, the widest first,
/// and if that is not enough the droppable columns are left out, one at a time.
pub struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    elastic: Vec<bool>,
    /// Columns left out, in this order, while the lines are too long even with the
    /// elastic columns cut to their narrowest.
    droppable: Vec<usize>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// `columns` are (header, right-aligned).
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            right_aligned: columns.iter().map(|c| c.1).collect(),
            elastic: vec![false; columns.len()],
            droppable: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Marks the columns with these headers as ones that may be cut to fit a terminal.
    pub fn elastic(mut self, headers: &[&str]) -> Self {
        for (e, h) in self.elastic.iter_mut().zip(&self.headers) {
            *e = headers.contains(h);
        }
        self
    }

    /// The columns (by header) that may be left out on a narrow terminal, the first first.
    pub fn droppable(mut self, headers: &[&str]) -> Self {
        self.droppable = headers
            .iter()
            .filter_map(|h| self.headers.iter().position(|x| x == h))
            .collect();
        self
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The columns shown and their widths: each column's widest cell, then, if `max` is
    /// given and the lines are longer, the elastic columns narrowed one character at a
    /// time, the widest first, and the droppable ones left out while that is not enough.
    fn layout(&self, max: Option<usize>) -> (Vec<bool>, Vec<usize>) {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.text.chars().count());
            }
        }
        let mut shown = vec![true; n];
        let Some(max) = max else {
            return (shown, widths);
        };
        let floor: Vec<usize> = (0..n)
            .map(|i| widths[i].min(self.headers[i].chars().count().max(MIN_ELASTIC)))
            .collect();
        let total = |shown: &[bool], widths: &[usize]| {
            let cols: Vec<usize> = (0..n).filter(|&i| shown[i]).map(|i| widths[i]).collect();
            cols.iter().sum::<usize>() + 2 * cols.len().saturating_sub(1)
        };
        let mut drops = self.droppable.iter();
        loop {
            let mut fitted = widths.clone();
            let mut over = total(&shown, &fitted).saturating_sub(max);
            while over > 0 {
                let widest = (0..n)
                    .filter(|&i| shown[i] && self.elastic[i] && fitted[i] > floor[i])
                    .max_by_key(|&i| (fitted[i], std::cmp::Reverse(i)));
                let Some(i) = widest else { break };
                fitted[i] -= 1;
                over -= 1;
            }
            match drops.next() {
                Some(&d) if over > 0 => shown[d] = false,
                _ => return (shown, fitted),
            }
        }
    }

    pub fn render(&self, term: &Term) -> String {
        let (shown, widths) = self.layout(term.width);
        let last_shown = shown.iter().rposition(|s| *s).unwrap_or(0);
        let mut out = String::new();
        let header: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell::styled(*h, crate::term::HEADER))
            .collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(shown.len()) {
                if !shown[i] {
                    continue;
                }
                let text = ellipsize(&cell.text, widths[i]);
                let pad = widths[i].saturating_sub(text.chars().count());
                let last = i == last_shown;
                let painted = term.paint(&text, cell.style);
                if self.right_aligned[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(&painted);
                } else {
                    line.push_str(&painted);
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

/// `text` broken at spaces into lines of at most `width` characters (a longer word is cut
/// across lines); one line when `width` is `None`.
pub fn wrap(text: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width.filter(|w| *w > 0) else {
        return vec![text.to_string()];
    };
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        let len = line.chars().count();
        if len > 0 && len + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        while line.chars().count() + word.len() > width {
            let room = width - line.chars().count();
            line.extend(word.drain(..room));
            lines.push(std::mem::take(&mut line));
        }
        line.extend(word);
    }
    lines.push(line);
    lines
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
            t.render(&Term::default()),
            "ID  NAME   STATE\n 7  train  running\n12  x      queued\n"
        );
    }

    #[test]
    fn tables_fit_the_terminal_by_cutting_elastic_columns() {
        let mut t = Table::new(&[("ID", true), ("NAME", false), ("STATE", false), ("REASON", false)])
            .elastic(&["NAME", "REASON"]);
        let long = "a-very-long-job-name-indeed-with-more";
        t.row(vec![
            "7".into(),
            long.into(),
            "failed".into(),
            "x".repeat(30).into(),
        ]);
        // Not a terminal: in full.
        let full = t.render(&Term::default());
        assert!(full.contains(long), "{full}");
        // 40 columns: every line fits, the widest column was cut first, the cut is marked.
        let narrow = Term {
            width: Some(40),
            color: false,
        };
        let text = t.render(&narrow);
        for line in text.lines() {
            assert!(line.chars().count() <= 40, "{line:?} is wider than 40");
        }
        assert!(text.contains("a-very-long-…  failed  xxxxxxxxxxxx…"), "{text}");
        assert!(text.contains("failed"), "{text}");
        // Too narrow for even the floor: the elastic columns stop at 8, nothing else is cut.
        let tiny = t.render(&Term {
            width: Some(10),
            color: false,
        });
        assert_eq!(
            tiny.lines().nth(1).unwrap(),
            " 7  a-very-…  failed  xxxxxxx…",
            "{tiny}"
        );
    }

    #[test]
    fn droppable_columns_go_when_cutting_is_not_enough() {
        let mut t = Table::new(&[
            ("ID", true),
            ("NAME", false),
            ("ATTEMPTS", true),
            ("CLASS", false),
        ])
        .elastic(&["NAME"])
        .droppable(&["ATTEMPTS", "CLASS"]);
        t.row(vec![
            "7".into(),
            "a-long-name-here".into(),
            "1".into(),
            "cpu_short".into(),
        ]);
        let at = |w| {
            t.render(&Term {
                width: Some(w),
                color: false,
            })
        };
        assert_eq!(
            at(80),
            "ID  NAME              ATTEMPTS  CLASS\n 7  a-long-name-here         1  cpu_short\n"
        );
        // 30: NAME cut to 8 is not enough (ID 2 + 8 + 8 + 9 + 6 = 33); ATTEMPTS goes, and
        // NAME gets back what it can.
        assert_eq!(
            at(30),
            "ID  NAME             CLASS\n 7  a-long-name-he…  cpu_short\n"
        );
        assert_eq!(at(12), "ID  NAME\n 7  a-long-…\n");
    }

    #[test]
    fn colour_does_not_move_columns() {
        let mut t = Table::new(&[("STATE", false), ("ID", true)]);
        t.row(vec![
            Cell::styled("failed", crate::term::state_style(cyb_proto::StateName::Failed)),
            "7".into(),
        ]);
        t.row(vec!["queued".into(), "12".into()]);
        let plain = t.render(&Term::default());
        let coloured = t.render(&Term {
            width: Some(80),
            color: true,
        });
        assert!(coloured.contains("\x1b["), "{coloured:?}");
        let stripped: String = strip_ansi(&coloured);
        assert_eq!(stripped, plain);
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("a b c", None), ["a b c"]);
        assert_eq!(
            wrap("make -C dir all install", Some(10)),
            ["make -C", "dir all", "install"]
        );
        assert_eq!(wrap("abcdefghijkl x", Some(5)), ["abcde", "fghij", "kl x"]);
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
