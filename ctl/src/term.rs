//! What cybctl knows of the terminal its stdout is: how wide it is (tables and `show` fit
//! it) and whether to colour (state names, headers). Neither applies when stdout is not a
//! terminal: a pipe or a file gets every cell in full and no escape codes.
//!
//! The width is the terminal's own (`terminal_size`, the TIOCGWINSZ ioctl), else
//! `$COLUMNS`. Colour follows anstream's reading of the environment, as clap's own help
//! does: off under `NO_COLOR` (<https://no-color.org>), `CLICOLOR=0` or `TERM=dumb`.

use std::io::IsTerminal as _;

use anstyle::{AnsiColor, Style};
use cyb_proto::StateName;

/// How stdout is to be written for people.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Term {
    /// The terminal's columns; `None` when stdout is not a terminal (nothing is cut).
    pub width: Option<usize>,
    /// Whether escape codes for colour may be written.
    pub color: bool,
}

impl Term {
    /// Looks at this process's stdout and environment.
    pub fn of_stdout() -> Term {
        let out = std::io::stdout();
        if !out.is_terminal() {
            return Term::default();
        }
        let width = terminal_size::terminal_size_of(&out)
            .map(|(w, _)| usize::from(w.0))
            .filter(|w| *w > 0)
            .or_else(|| std::env::var("COLUMNS").ok()?.trim().parse().ok())
            .filter(|w| *w > 0);
        let color = anstream::AutoStream::choice(&out) != anstream::ColorChoice::Never;
        Term { width, color }
    }

    /// `text` in `style`, or as it is when colour is off.
    pub fn paint(&self, text: &str, style: Style) -> String {
        if !self.color || style == Style::new() || text.is_empty() {
            return text.to_string();
        }
        format!("{}{text}{}", style.render(), style.render_reset())
    }
}

/// Headers of tables.
pub const HEADER: Style = Style::new().bold();
/// Something that needs a person's attention (`NOT enforced`, `paused`).
pub const WARN: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Yellow)));
/// Something that works as it should.
pub const GOOD: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Green)));

/// The colour of a job state: green succeeded, red failed and timed out, blue running,
/// yellow held and waiting, dim cancelled, none for queued.
pub fn state_style(s: StateName) -> Style {
    let fg = |c: AnsiColor| Style::new().fg_color(Some(anstyle::Color::Ansi(c)));
    match s {
        StateName::Queued => Style::new(),
        StateName::Held | StateName::Waiting => fg(AnsiColor::Yellow),
        StateName::Running => fg(AnsiColor::Blue).bold(),
        StateName::Succeeded => fg(AnsiColor::Green),
        StateName::Failed | StateName::TimedOut => fg(AnsiColor::Red).bold(),
        StateName::Cancelled => Style::new().dimmed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paints_only_with_colour_on() {
        let on = Term {
            width: None,
            color: true,
        };
        let off = Term::default();
        let red = state_style(StateName::Failed);
        assert_eq!(off.paint("failed", red), "failed");
        let painted = on.paint("failed", red);
        assert!(
            painted.starts_with('\x1b') && painted.contains("failed"),
            "{painted:?}"
        );
        assert!(painted.ends_with("\x1b[0m"), "{painted:?}");
        assert_eq!(on.paint("queued", state_style(StateName::Queued)), "queued");
    }
}
