//! The subcommands, one file each, and what they share: the global options and the
//! connection to the daemon.

pub mod cancel;
pub mod clean;
pub mod gpus;
pub mod health;
pub mod hold;
pub mod logs;
pub mod ls;
pub mod pause;
pub mod priority;
pub mod release;
pub mod resume;
pub mod retry;
pub mod schema;
pub mod show;
pub mod state;
pub mod stats;
pub mod submit;
pub mod validate;
pub mod wait;

use std::path::PathBuf;

use time::UtcOffset;

use crate::cli::{Cli, Command};
use crate::conn::{self, Conn};

/// What every subcommand may need besides its own flags.
pub struct Ctx {
    /// `--json`.
    pub json: bool,
    /// The local UTC offset, for printing times.
    pub tz: UtcOffset,
    /// The terminal stdout is, if it is one: its width and whether to colour.
    pub term: crate::term::Term,
    socket_flag: Option<PathBuf>,
}

impl Ctx {
    /// Connects to the daemon at the discovered socket.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        Conn::connect(&conn::discover_from_env(self.socket_flag.as_deref())).await
    }
}

/// Runs the command line; returns the exit code.
pub async fn run(cli: Cli, tz: UtcOffset) -> anyhow::Result<i32> {
    let ctx = Ctx {
        json: cli.json,
        tz,
        term: crate::term::Term::of_stdout(),
        socket_flag: cli.socket,
    };
    match cli.command {
        Command::Submit(a) => submit::run(&ctx, *a).await,
        Command::Ls(a) => ls::run(&ctx, a).await,
        Command::Show(a) => show::run(&ctx, a).await,
        Command::Logs(a) => logs::run(&ctx, a).await,
        Command::State(a) => state::run(&ctx, a).await,
        Command::Cancel(a) => cancel::run(&ctx, a).await,
        Command::Retry(a) => retry::run(&ctx, a).await,
        Command::Hold(a) => hold::run(&ctx, a).await,
        Command::Release(a) => release::run(&ctx, a).await,
        Command::Priority(a) => priority::run(&ctx, a).await,
        Command::Wait(a) => wait::run(&ctx, a).await,
        Command::Clean(a) => clean::run(&ctx, a).await,
        Command::Stats => stats::run(&ctx).await,
        Command::Health => health::run(&ctx).await,
        Command::Gpus => gpus::run(&ctx).await,
        Command::Pause => pause::run(&ctx).await,
        Command::Resume => resume::run(&ctx).await,
        Command::Validate(a) => validate::run(&ctx, a).await,
        Command::Schema => schema::run(),
        Command::Completions { shell } => {
            let mut text = Vec::new();
            crate::cli::completions(shell, &mut text);
            crate::output::write_bytes(&text)?;
            Ok(crate::exit::OK)
        }
        Command::Man => {
            let page =
                crate::cli::man_page().map_err(|e| anyhow::anyhow!("cannot render the man page: {e}"))?;
            crate::output::write_bytes(&page)?;
            Ok(crate::exit::OK)
        }
        Command::GenerateDocs { out } => {
            crate::cli::generate_docs(&out)
                .map_err(|e| anyhow::anyhow!("cannot write docs into {}: {e}", out.display()))?;
            Ok(crate::exit::OK)
        }
    }
}

/// The argument of the commands that act on one job.
#[derive(Debug, clap::Args)]
pub struct JobArg {
    /// The job's id
    pub id: cyb_proto::JobId,
}

/// Ends a command that changed a job: the new record as JSON, or `line` for people.
fn confirm(ctx: &Ctx, after: &cyb_proto::JobRecord, line: &str) -> anyhow::Result<i32> {
    if ctx.json {
        crate::output::json(after)?;
    } else {
        crate::output::print(&format!("{line}\n"))?;
    }
    Ok(crate::exit::OK)
}
