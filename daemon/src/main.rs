//! `cybd`: argument parsing and logging setup; the daemon itself is the `cybd` library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cybd::Config;

#[derive(Parser)]
// No `help` subcommand: the man page would name a cybd-help(8) that does not exist.
#[command(
    name = "cybd",
    version,
    about = "cybd: a job daemon for GPU/CPU hosts",
    disable_help_subcommand = true
)]
struct Cli {
    /// Configuration file (default /etc/cyb/cybd.toml; in user mode ~/.config/cyb/cybd.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Run unprivileged for the current user, with paths under your home directory.
    #[arg(long)]
    user: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log level (error, warn, info, debug, trace); overrides the config.
    #[arg(long)]
    log_level: Option<String>,
    /// Where to log: journald, stderr, or auto (journald under systemd or when its socket
    /// exists and stderr is not a terminal).
    #[arg(long, value_enum, default_value = "auto")]
    log_target: cybd::logging::Target,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// (internal) Fork a supervisor per job on the daemon's request; started by the daemon.
    #[command(hide = true)]
    Launcher,
    /// (packaging) Write the man page and shell completions into OUT.
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long)]
        out: PathBuf,
    },
    /// (internal) Copy artifacts as the job's user; started by a supervisor.
    #[command(hide = true)]
    CollectArtifacts {
        #[arg(long)]
        cwd: PathBuf,
        #[arg(long)]
        dest: PathBuf,
        #[arg(last = true)]
        globs: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::Launcher) => {
            return exit_code(cybd::backend::native::launcher::main());
        }
        Some(Mode::CollectArtifacts { cwd, dest, globs }) => {
            return exit_code(cybd::backend::native::supervisor::collect_main(
                &cwd, &dest, &globs,
            ));
        }
        Some(Mode::GenerateDocs { out }) => {
            return match generate_docs(&out) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cybd: cannot write docs into {}: {e}", out.display());
                    std::process::ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match Config::load(cli.config.as_deref(), cli.user, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cybd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if cli.check_config {
        if let Some(p) = &cfg.callbacks.secret_file
            && let Err(e) = cybd::callback::read_secret(Some(p))
        {
            eprintln!("cybd: key `callbacks.secret_file`: {e}");
            return std::process::ExitCode::from(2);
        }
        println!(
            "configuration ok: spool {}, logs {}, socket {}",
            cfg.paths.spool.display(),
            cfg.paths.logs.display(),
            cfg.paths.socket.display()
        );
        return std::process::ExitCode::SUCCESS;
    }
    let level = cli.log_level.unwrap_or_else(|| cfg.log_level.clone());
    cybd::logging::init(&level, cli.log_target);
    let source = cybd::ConfigSource {
        path: cli.config.clone(),
        user_mode: cli.user,
    };
    // One runtime thread: the daemon's work is many small hand-offs between tasks, and on a
    // small host each wake-up of another worker thread costs more than the work itself
    // (perf: context switches dominated the RPC path). Blocking work goes to spawn_blocking.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cybd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(async { cybd::run(cfg, source).await.context("cybd failed") }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cybd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes `cybd.8` and bash, zsh and fish completions into `out` (for the packages).
fn generate_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(out)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(out.join("cybd.8"), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "cybd", out)?;
    }
    Ok(())
}

fn exit_code(c: i32) -> std::process::ExitCode {
    std::process::ExitCode::from(u8::try_from(c).unwrap_or(1))
}
