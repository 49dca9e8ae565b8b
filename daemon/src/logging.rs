//! Logging: native journald entries (tracing-journald) with the structured fields `JOB_ID`,
//! `JOB_USER`, `CLASS`, `TENANT`, `EVENT` when cybd runs under journald, human-readable
//! lines on stderr otherwise. If journald goes away, each line goes to stderr instead of
//! being lost, and the daemon carries on.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// journald when started by systemd (JOURNAL_STREAM) or when the journal socket exists
    /// and stderr is not a terminal; stderr otherwise.
    Auto,
    Journald,
    Stderr,
}

fn use_journald(target: Target) -> bool {
    match target {
        Target::Journald => true,
        Target::Stderr => false,
        Target::Auto => {
            std::env::var_os("JOURNAL_STREAM").is_some()
                || (Path::new(JOURNAL_SOCKET).exists()
                    && !std::io::IsTerminal::is_terminal(&std::io::stderr()))
        }
    }
}

fn filter(level: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_new(format!("cybd={level},warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Installs the global subscriber. `level` is error|warn|info|debug|trace.
pub fn init(level: &str, target: Target) {
    let filter = filter(level);
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if use_journald(target) {
        match tracing_journald::layer() {
            Ok(j) => {
                let j = j.with_field_prefix(None).with_syslog_identifier("cybd".into());
                tracing_subscriber::registry()
                    .with(filter)
                    .with(JournaldOrStderr::new(j, stderr))
                    .init();
                return;
            }
            Err(e) => eprintln!("cybd: journald is not reachable ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::registry().with(filter).with(stderr).init();
}

/// A subscriber writing the lines [`init`] writes on stderr into `file` instead, for a
/// daemon embedded in another program (the in-process tests): that program sets it as the
/// default of the daemon's threads rather than installing a global one.
pub fn file_dispatch(level: &str, file: std::fs::File) -> tracing::Dispatch {
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    tracing::Dispatch::new(tracing_subscriber::registry().with(filter(level)).with(lines))
}

/// Sends each event to journald while it answers and to stderr while it does not.
///
/// tracing-journald drops an entry it cannot send; so before each event this layer checks
/// that journald still accepts datagrams (an empty one, which journald ignores).
pub struct JournaldOrStderr<J, F> {
    journald: J,
    stderr: F,
    probe: Option<UnixDatagram>,
}

impl<J, F> JournaldOrStderr<J, F> {
    pub fn new(journald: J, stderr: F) -> Self {
        JournaldOrStderr {
            journald,
            stderr,
            probe: UnixDatagram::unbound().ok(),
        }
    }

    fn journald_up(&self) -> bool {
        self.probe
            .as_ref()
            .is_some_and(|s| s.send_to(&[], JOURNAL_SOCKET).is_ok())
    }
}

impl<S, J, F> Layer<S> for JournaldOrStderr<J, F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    J: Layer<S>,
    F: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.journald.on_register_dispatch(subscriber);
        self.stderr.on_register_dispatch(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.journald.on_new_span(attrs, id, ctx.clone());
        self.stderr.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        self.journald.on_record(id, values, ctx.clone());
        self.stderr.on_record(id, values, ctx);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if self.journald_up() {
            self.journald.on_event(event, ctx);
        } else {
            self.stderr.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.journald.on_enter(id, ctx.clone());
        self.stderr.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.journald.on_exit(id, ctx.clone());
        self.stderr.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.journald.on_close(id.clone(), ctx.clone());
        self.stderr.on_close(id, ctx);
    }
}
