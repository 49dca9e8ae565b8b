//! The command line: global flags and the list of subcommands (each subcommand's own flags
//! live in its file under `cmd/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cmd;

const LONG_ABOUT: &str = "\
cybctl: the command-line client of cybd, the job daemon.

The socket is --socket PATH, else $CYB_SOCKET, else for a non-root user
your `cybd --user` daemon's socket if it exists ($XDG_RUNTIME_DIR/cyb/cybd.sock; without
that variable /run/user/UID/cyb/cybd.sock if that directory is yours, else
~/.local/state/cyb/cybd.sock), else /run/cyb/cybd.sock (the system daemon).

Exit codes:
    0    success
    1    any other error
    2    bad usage
    3    no such job
    65   invalid job spec
    69   daemon unreachable
    77   permission denied
    124  wait --timeout ran out
    141  stdout was closed by its reader
`wait`, `submit --wait` and `submit --follow` end with the job's own exit code.";

#[derive(Debug, Parser)]
#[command(name = "cybctl", version, about = "Command-line client of the cybd job daemon", long_about = LONG_ABOUT)]
pub struct Cli {
    /// The daemon's socket [default: see above]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print JSON instead of human-readable text
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Queue a job: `-- CMD ARGS...`, `--shell SCRIPT` or `-f FILE`
    Submit(Box<cmd::submit::Args>),
    /// List jobs, newest first
    Ls(cmd::ls::Args),
    /// Show one job in detail
    Show(cmd::show::Args),
    /// Print a job's stdout (or stderr) log
    Logs(cmd::logs::Args),
    /// Cancel a job (a running one is stopped)
    Cancel(cmd::cancel::Args),
    /// Queue a job that has ended again
    Retry(cmd::retry::Args),
    /// Keep a queued job from starting
    Hold(cmd::hold::Args),
    /// Let a held job start again
    Release(cmd::release::Args),
    /// Change a job's priority (higher runs first)
    Priority(cmd::priority::Args),
    /// Wait for a job to end; exits with the job's exit code
    Wait(cmd::wait::Args),
    /// Remove ended jobs, their records and run directories (default: all of yours)
    Clean(cmd::clean::Args),
    /// Show the daemon's counters
    Stats,
    /// Show what is enforced on this host (cgroups, device control, GPUs)
    Health,
    /// Show the GPUs, their use and who holds each
    Gpus,
    /// Stop starting new jobs; running jobs go on (admins only)
    Pause,
    /// Start jobs again after `pause` (admins only)
    Resume,
    /// Check a job file without submitting it
    Validate(cmd::validate::Args),
    /// Print the JSON Schema of the job spec
    Schema,
    /// (packaging) Write the man page and shell completions into DIR
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long)]
        out: PathBuf,
    },
}

/// Writes `cybctl.1` and bash, zsh and fish completions into `out` (for the packages).
pub fn generate_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(out)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(out.join("cybctl.1"), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "cybctl", out)?;
    }
    Ok(())
}
