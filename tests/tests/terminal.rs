//! What a person sees of cybctl on a terminal, shown under a real pseudo-terminal
//! (`script` of util-linux, with `stty cols N`): tables and `show` fit the width, states
//! are coloured, `NO_COLOR` turns colour off, and a pipe gets everything in full and
//! uncoloured. Also: the order `ls` lists in (and says it does), and the completions and
//! man pages, which refer only to pages that exist.

use std::process::Command;

use cyb_tests::{Daemon, bin, have, require, shown, text};

/// A long job name, cut on a narrow terminal.
const NAME: &str = "preprocess-the-whole-imagenet-training-set-again";

/// Runs `cybctl --socket S ARGS` under a pseudo-terminal `cols` wide, with `env` set;
/// returns what it printed, with the terminal's `\r\n` made `\n`.
fn on_terminal(d: &Daemon, cols: u16, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut line = format!(
        "stty cols {cols} rows 50; exec '{}' --socket '{}'",
        bin("cybctl").display(),
        d.socket().display()
    );
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR")
        .env_remove("CLICOLOR_FORCE")
        .env("TERM", "xterm-256color");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run script");
    assert!(out.status.success(), "{}", shown(&out));
    text(&out.stdout).replace("\r\n", "\n")
}

/// `s` without its ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn widest(s: &str) -> usize {
    strip_ansi(s)
        .lines()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
}

/// A daemon with a succeeded, a failed and a running job, all with long names.
fn daemon_with_jobs() -> (Daemon, u64) {
    let d = Daemon::start();
    let ok = d.submit(&["--name", NAME], &["true"]);
    let bad = d.submit(&["--name", NAME], &["sh", "-c", "exit 3"]);
    for id in [ok, bad] {
        d.ctl(&["wait", &id.to_string()]);
    }
    let running = d.submit(
        &["--name", NAME],
        &[
            "sh",
            "-c",
            "sleep 30 # and a long command line to make `show` wrap its value",
        ],
    );
    d.wait_state(running, "running", std::time::Duration::from_secs(30));
    (d, running)
}

#[test]
fn tables_fit_the_terminal_and_colour_states() {
    if !require(have("script"), "script (util-linux, for a pseudo-terminal)") {
        return;
    }
    let (d, running) = daemon_with_jobs();

    // Not a terminal: every cell in full, no escape codes, whatever the environment says.
    let piped = d
        .ctl_cmd(&["ls"])
        .env("CLICOLOR_FORCE", "1")
        .env("COLUMNS", "40")
        .output()
        .unwrap();
    let piped = text(&piped.stdout);
    assert!(piped.contains(NAME), "{piped}");
    assert!(!piped.contains('\x1b'), "{piped:?}");
    assert!(widest(&piped) > 60, "{piped}");

    // A terminal 60 columns wide: every line fits, the names are cut with `…`, states are
    // coloured (succeeded green, failed red, running blue).
    for args in [vec!["ls"], vec!["show", &running.to_string()], vec!["stats"]] {
        let shown_ = on_terminal(&d, 60, &[], &args);
        assert!(
            widest(&shown_) <= 60,
            "cybctl {args:?} is wider than 60:\n{shown_}"
        );
        assert!(
            shown_.contains("\x1b["),
            "cybctl {args:?} has no colour: {shown_:?}"
        );
    }
    let ls = on_terminal(&d, 60, &[], &["ls"]);
    let plain = strip_ansi(&ls);
    assert!(plain.contains('…'), "{plain}");
    assert!(!plain.contains(NAME), "{plain}");
    assert!(ls.contains("\x1b[32msucceeded"), "{ls:?}");
    assert!(ls.contains("31mfailed"), "{ls:?}");
    assert!(ls.contains("34mrunning"), "{ls:?}");
    // Wider terminal, wider names.
    let wide = strip_ansi(&on_terminal(&d, 200, &[], &["ls"]));
    assert!(wide.contains(NAME), "{wide}");

    // `show` wraps a long value onto indented lines instead of cutting it.
    let show = strip_ansi(&on_terminal(&d, 60, &[], &["show", &running.to_string()]));
    let runs: Vec<&str> = show
        .lines()
        .skip_while(|l| !l.starts_with("runs"))
        .take_while(|l| l.starts_with("runs") || l.starts_with(' '))
        .collect();
    assert!(runs.len() > 1, "{show}");
    let joined: String = runs
        .iter()
        .map(|l| l.get(13..).unwrap_or("").trim())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(joined.contains("to make `show` wrap its value"), "{show}");

    // NO_COLOR: still fitted, never coloured.
    for args in [
        vec!["ls"],
        vec!["show", &running.to_string()],
        vec!["stats"],
        vec!["health"],
    ] {
        let t = on_terminal(&d, 60, &[("NO_COLOR", "1")], &args);
        assert!(
            !t.contains('\x1b'),
            "cybctl {args:?} coloured under NO_COLOR: {t:?}"
        );
    }
    assert!(widest(&on_terminal(&d, 60, &[("NO_COLOR", "1")], &["ls"])) <= 60);

    // --json on a terminal is indented for reading, but never cut.
    let json = on_terminal(&d, 60, &[], &["--json", "ls"]);
    assert!(json.contains(NAME) && json.lines().count() > 3, "{json}");
    d.ctl_ok(&["cancel", &running.to_string()]);
}

#[test]
fn ls_lists_oldest_first_and_says_so() {
    let d = Daemon::start();
    let ids: Vec<u64> = (0..4).map(|_| d.submit(&[], &["true"])).collect();
    let listed = |args: &[&str]| -> Vec<u64> {
        d.ctl_ok(args)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(listed(&["ls"]), ids);
    // --limit keeps the newest, still oldest first.
    assert_eq!(listed(&["ls", "--limit", "2"]), ids[2..]);
    let json = d.ctl_json(&["ls", "--limit", "2"]);
    let json_ids: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(json_ids, ids[2..]);
    // And the help says that order, not another.
    let help = d.ctl_ok(&["--help"]);
    assert!(help.contains("List jobs, oldest first"), "{help}");
    assert!(!help.contains("newest first"), "{help}");
    let help = d.ctl_ok(&["ls", "--help"]);
    assert!(
        help.contains("oldest first") && help.contains("newest N"),
        "{help}"
    );
}

#[test]
fn completions_and_man_pages_are_commands_and_refer_to_pages_that_exist() {
    let run = |args: &[&str]| {
        let out = Command::new(bin("cybctl")).args(args).output().unwrap();
        assert!(out.status.success(), "cybctl {args:?}: {}", shown(&out));
        text(&out.stdout)
    };
    assert!(
        run(&["completions", "bash"]).contains("complete -F _cybctl"),
        "bash"
    );
    assert!(run(&["completions", "zsh"]).starts_with("#compdef cybctl"), "zsh");
    assert!(
        run(&["completions", "fish"]).contains("complete -c cybctl"),
        "fish"
    );
    let help = run(&["--help"]);
    for cmd in ["completions", "man", "state"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} not in --help:\n{help}"
        );
    }
    let page = run(&["man"]);
    assert!(page.contains("\n.TH cybctl 1 "), "{page}");

    // The packages' pages (packaging/build.sh writes them the same way): every page they
    // name is one of them.
    let dir = tempfile::tempdir().unwrap();
    for b in ["cybctl", "cybd"] {
        let out = Command::new(bin(b))
            .arg("generate-docs")
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{b} generate-docs: {}", shown(&out));
    }
    let cybctl_page = std::fs::read_to_string(dir.path().join("cybctl.1")).unwrap();
    assert_eq!(cybctl_page, page, "generate-docs and `cybctl man` differ");
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".1") || n.ends_with(".8"))
        .collect();
    pages.sort();
    assert_eq!(pages, ["cybctl.1", "cybd.8"]);
    for p in &pages {
        let roff = std::fs::read_to_string(dir.path().join(p)).unwrap();
        let plain = roff
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\fI", "")
            .replace("\\-", "-");
        for r in references(&plain) {
            let (name, section) = r.trim_end_matches(')').split_once('(').unwrap();
            assert!(
                pages.contains(&format!("{name}.{section}")),
                "{p} refers to {r}, which is not installed"
            );
        }
    }
    // A man page reader shows it (man-db reads roff from a file).
    if have("man") {
        let f = dir.path().join("cybctl.1");
        let out = Command::new("man")
            .arg("-l")
            .arg(&f)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        let t = text(&out.stdout);
        assert!(
            t.contains("COMMANDS") && t.contains("SEE ALSO"),
            "{}",
            shown(&out)
        );
    }
}

/// Every `name(N)` in `text`.
fn references(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for (i, _) in text.match_indices('(') {
        let name: String = text[..i]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect::<Vec<char>>()
            .into_iter()
            .rev()
            .collect();
        let rest = &text.as_bytes()[i + 1..];
        if !name.is_empty() && rest.len() > 1 && rest[0].is_ascii_digit() && rest[1] == b')' {
            refs.push(format!("{name}({})", rest[0] as char));
        }
    }
    refs
}
