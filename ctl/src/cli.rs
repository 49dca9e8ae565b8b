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

On a terminal, tables are cut to its width and states are coloured; NO_COLOR
turns colour off. A pipe gets everything in full, uncoloured.

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

    /// Print JSON instead of human-readable text (indented on a terminal, else one line per answer)
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Queue a job: `-- CMD ARGS...`, `--shell SCRIPT` or `-f FILE`
    Submit(Box<cmd::submit::Args>),
    /// List jobs, oldest first (by id); --limit N keeps the newest N
    Ls(cmd::ls::Args),
    /// Show one job in detail
    Show(cmd::show::Args),
    /// Print a job's stdout and stderr (--stdout, --stderr: one of them)
    Logs(cmd::logs::Args),
    /// Print one word for a job's state (for scripts and workflow tools)
    State(cmd::state::Args),
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
    /// Print a shell's completion script: bash, zsh, fish, elvish or powershell
    #[command(after_help = "\
This shell:  source <(cybctl completions bash)
bash:        cybctl completions bash > ~/.local/share/bash-completion/completions/cybctl
zsh:         cybctl completions zsh > ~/.zfunc/_cybctl   (~/.zfunc in $fpath)
fish:        cybctl completions fish > ~/.config/fish/completions/cybctl.fish
The packages install the bash, zsh and fish scripts.")]
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `cybctl man | man -l -`
    Man,
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
    std::fs::write(out.join("cybctl.1"), man_page()?)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "cybctl", out)?;
    }
    Ok(())
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory as _;
    clap_complete::generate(shell, &mut Cli::command(), "cybctl", out);
}

/// The manual page `cybctl(1)`, in roff: clap_mangen's title, name, synopsis, description
/// and global options, then one page for everything: a COMMANDS section with each visible
/// command's synopsis, description and options (clap_mangen's own SUBCOMMANDS section would
/// refer to `cybctl-submit(1)` and the like, pages that do not exist), ENVIRONMENT, and SEE
/// ALSO naming only pages the packages install.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.extend_from_slice(b".SH COMMANDS\n");
    let globals: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.get_id().to_string())
        .collect();
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        // The global options are described once, above; -h is everywhere.
        let mut sub = sub.clone().mut_arg("help", |a| a.hide(true));
        for g in &globals {
            sub = sub.mut_arg(g, |a| a.hide(true));
        }
        let m = clap_mangen::Man::new(sub.clone());
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        page.extend_from_slice(format!(".SS \"{name}\"\n").as_bytes());
        page.extend_from_slice(&without_headings(|w| m.render_synopsis_section(w))?);
        page.extend_from_slice(b".PP\n");
        page.extend_from_slice(&without_headings(|w| m.render_description_section(w))?);
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.extend_from_slice(&without_headings(|w| m.render_options_section(w))?);
        }
        if sub.get_after_help().is_some() {
            // Its lines as written (examples, lists of words), not filled into a paragraph.
            page.extend_from_slice(b".PP\n");
            let extra = without_headings(|w| m.render_extra_section(w))?;
            for line in String::from_utf8_lossy(&extra).lines() {
                page.extend_from_slice(format!("{line}\n.br\n").as_bytes());
            }
        }
    }
    page.extend_from_slice(
        concat!(
            ".SH ENVIRONMENT\n",
            ".TP\n\\fBCYB_SOCKET\\fR\nThe daemon\\(aqs socket, when \\fB\\-\\-socket\\fR is not given.\n",
            ".TP\n\\fBNO_COLOR\\fR\nWhen set, no colour, even on a terminal (https://no\\-color.org).\n",
            ".TP\n\\fBCOLUMNS\\fR\nThe terminal\\(aqs width, where it cannot be asked.\n",
            ".SH \"SEE ALSO\"\n",
            "\\fBcybd\\fR(8)\n",
        )
        .as_bytes(),
    );
    man.render_version_section(&mut page)?;
    Ok(page)
}

/// The roff a section renders, without its `.SH` heading line.
fn without_headings(render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with(".SH "))
        .flat_map(|l| [l, "\n"])
        .collect::<String>()
        .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_refers_only_to_pages_that_exist() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        // Every `name(N)` reference, roff escapes taken out.
        let plain = page
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\fI", "")
            .replace("\\-", "-");
        let mut refs = Vec::new();
        for (i, _) in plain.match_indices('(') {
            let name: String = plain[..i]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let rest = &plain[i + 1..];
            if !name.is_empty()
                && rest.len() > 1
                && rest.as_bytes()[0].is_ascii_digit()
                && rest.as_bytes()[1] == b')'
            {
                refs.push(format!("{name}({})", &rest[..1]));
            }
        }
        refs.sort();
        refs.dedup();
        // cybd(8) is the only one, and the packages install it.
        assert_eq!(refs, ["cybd(8)"], "{page}");
        // One page for every command, with its options.
        for want in [
            ".SS \"cybctl submit\"",
            ".SS \"cybctl state\"",
            ".SS \"cybctl completions\"",
            "\\-\\-parsable",
            "\\-\\-stderr",
            "snakemake",
        ] {
            assert!(page.contains(want), "the man page lacks {want}:\n{page}");
        }
        assert!(!page.contains("cybctl\\-submit("), "{page}");
        assert!(
            !page.contains("generate"),
            "the hidden command is not shown:\n{page}"
        );
    }
}
