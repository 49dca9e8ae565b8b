//! `cybctl`: the command-line client of `cybd`, the job daemon.
//!
//! It talks to the daemon over its Unix socket (tarpc), prints human tables or, with
//! `--json`, JSON, and ends with an exit code that scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other error |
//! | 2 | bad usage |
//! | 3 | no such job |
//! | 65 | invalid job spec (EX_DATAERR) |
//! | 69 | daemon unreachable (EX_UNAVAILABLE) |
//! | 77 | permission denied (EX_NOPERM) |
//! | 124 | `wait --timeout` ran out |
//! | 141 | stdout was closed by its reader |
//!
//! `wait`, `submit --wait` and `submit --follow` end with the job's own exit code
//! ([`cyb_proto::JobRecord::wait_exit_code`]).

mod cli;
mod cmd;
mod conn;
mod exit;
mod output;
mod term;
#[cfg(test)]
mod testing;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // Read while this process still has a single thread (see `output::local_offset`).
    let tz = output::local_offset();
    let code = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(cmd::run(cli, tz)).unwrap_or_else(|e| report(&e)),
        Err(e) => report(&anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Prints `err` as one line (`cybctl: what: why`) and returns its exit code.
fn report(err: &anyhow::Error) -> i32 {
    let code = exit::code_of(err);
    // A reader that went away needs no message.
    if code != exit::BROKEN_PIPE {
        output::note(&format!("cybctl: {err:#}"));
    }
    code
}
