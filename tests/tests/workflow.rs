//! Driving cybd from workflow tools: the output a script or a workflow engine reads
//! (`submit --parsable`, one-line `--json`, `cybctl state`), and a real Snakemake workflow
//! run through its generic cluster executor with the command line of the README
//! ("Driving cybd from workflow tools").
//!
//! Snakemake comes from PyPI, into a virtual environment under the target directory
//! (`target/snakemake-venv`), made once and kept between runs; without PyPI and without a
//! `snakemake` of the host's own, the test skips through `require`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cyb_tests::{Daemon, bin_dir, have, require, shown, text};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

/// The versions the test installs (snakemake 8 and later need the executor plugin).
const SNAKEMAKE: &str = "snakemake==9.27.1";
const PLUGIN: &str = "snakemake-executor-plugin-cluster-generic==1.0.9";

/// The README's command line, less `--jobs` and the workflow's own arguments.
const SUBMIT_CMD: &str = "cybctl submit --parsable -- sh";
const STATUS_CMD: &str = "cybctl state --format snakemake";

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn scripts_read_one_line_per_answer() {
    let d = Daemon::start();
    // --parsable: the id alone.
    let out = d.ctl(&["submit", "--parsable", "--", "sh", "-c", "exit 0"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let first: u64 = text(&out.stdout)
        .strip_suffix('\n')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an id and a newline: {}", shown(&out)));
    // --parsable --wait: the id, then nothing else on stdout, and the job's exit code.
    let out = d.ctl(&["submit", "--parsable", "--wait", "--", "sh", "-c", "exit 4"]);
    assert_eq!(code(&out), 4, "{}", shown(&out));
    let failed: u64 = text(&out.stdout)
        .strip_suffix('\n')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an id and a newline: {}", shown(&out)));
    assert_eq!(failed, first + 1);

    // --json when stdout is not a terminal: one object, one line.
    let out = d.ctl(&["--json", "submit", "--", "sleep", "30"]);
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{}", shown(&out));
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    let running = v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}"));
    d.wait_state(running, "running", LONG);
    for args in [
        vec!["--json", "ls"],
        vec!["--json", "show", "1"],
        vec!["--json", "stats"],
    ] {
        let out = d.ctl(&args);
        assert_eq!(code(&out), 0, "{}", shown(&out));
        let t = text(&out.stdout);
        assert_eq!(t.lines().count(), 1, "cybctl {args:?}: {t}");
        serde_json::from_str::<Value>(&t).unwrap_or_else(|e| panic!("cybctl {args:?}: {e}: {t}"));
    }

    // One word per state; exit 0 whatever the state.
    let held = d.submit(&["--after", &running.to_string()], &["true"]);
    d.ctl_ok(&["hold", &held.to_string()]);
    for (id, cybd, snakemake) in [
        (first, "succeeded", "success"),
        (failed, "failed", "failed"),
        (running, "running", "running"),
        (held, "held", "running"),
    ] {
        let ids = id.to_string();
        assert_eq!(d.ctl_ok(&["state", &ids]), format!("{cybd}\n"));
        assert_eq!(
            d.ctl_ok(&["state", "--format", "snakemake", &ids]),
            format!("{snakemake}\n")
        );
        let v = d.ctl_json(&["state", &ids]);
        assert_eq!(v["state"], cybd, "{v}");
    }
    d.ctl_ok(&["cancel", &running.to_string()]);
    d.wait_state(running, "cancelled", LONG);
    assert_eq!(
        d.ctl_ok(&["state", "--format", "snakemake", &running.to_string()]),
        "failed\n"
    );
    let out = d.ctl(&["state", "9999"]);
    assert_eq!(code(&out), 3, "{}", shown(&out));
    assert!(out.stdout.is_empty(), "{}", shown(&out));
}

/// A `snakemake` with the cluster-generic executor: the test's own virtual environment,
/// made when missing (PyPI), else the host's; `None` when neither can be had.
fn snakemake() -> Option<PathBuf> {
    let venv = bin_dir()
        .parent()
        .map_or_else(bin_dir, Path::to_path_buf)
        .join("snakemake-venv");
    let exe = venv.join("bin/snakemake");
    let marker = venv.join("cyb-installed");
    let wanted = format!("{SNAKEMAKE} {PLUGIN}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) && exe.exists() {
        return Some(exe);
    }
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = made
        && Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "30",
                SNAKEMAKE,
                PLUGIN,
            ])
            .status()
            .is_ok_and(|s| s.success());
    if installed {
        std::fs::write(&marker, wanted).expect("write the venv's marker");
        eprintln!(
            "installed {SNAKEMAKE} and {PLUGIN} into {} in {:?}",
            venv.display(),
            started.elapsed()
        );
        return Some(exe);
    }
    let _ = std::fs::remove_dir_all(&venv);
    eprintln!("could not install snakemake from PyPI into {}", venv.display());
    let host = Command::new("snakemake")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success() && text(&o.stdout).contains("--cluster-generic-submit-cmd"));
    (have("snakemake") && host).then(|| PathBuf::from("snakemake"))
}

/// Runs the README's Snakemake command line in `dir` against `d`, with cybctl first on
/// PATH; returns its output (killed after 100 s).
fn run_snakemake(exe: &Path, d: &Daemon, dir: &Path) -> std::process::Output {
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let start = Instant::now();
    let out = Command::new("timeout")
        .arg("100")
        .arg(exe)
        .args(["--executor", "cluster-generic"])
        .args(["--cluster-generic-submit-cmd", SUBMIT_CMD])
        .args(["--cluster-generic-status-cmd", STATUS_CMD])
        .args(["--cluster-generic-cancel-cmd", "cybctl cancel"])
        .args(["--cluster-generic-cancel-nargs", "1"])
        .args(["--jobs", "8", "--seconds-between-status-checks", "1"])
        .current_dir(dir)
        .env("PATH", path)
        .env("CYB_SOCKET", d.socket())
        .output()
        .expect("run snakemake");
    eprintln!("snakemake in {} took {:?}", dir.display(), start.elapsed());
    out
}

const SQUARES: &str = r#"
N = range(11)

rule all:
    input: "total.txt"

rule square:
    output: "sq/{i}.txt"
    shell: "echo $(( {wildcards.i} * {wildcards.i} )) > {output}"

rule total:
    input: expand("sq/{i}.txt", i=N)
    output: "total.txt"
    shell: "cat {input} | awk '{{s += $1}} END {{print s}}' > {output}"
"#;

const BROKEN: &str = r#"
rule all:
    input: "ok.txt", "broken.txt"

rule ok:
    output: "ok.txt"
    shell: "echo fine > {output}"

rule broken:
    output: "broken.txt"
    shell: "echo about to fail >&2; exit 3"
"#;

#[test]
fn snakemake_runs_a_workflow_through_cybctl() {
    let Some(exe) = snakemake() else {
        require(
            false,
            "snakemake (from PyPI, or installed with its cluster-generic executor)",
        );
        return;
    };
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();

    // Twelve jobs: eleven squares, then their sum.
    let wf = tmp.path().join("squares");
    std::fs::create_dir(&wf).unwrap();
    std::fs::write(wf.join("Snakefile"), SQUARES).unwrap();
    let out = run_snakemake(&exe, &d, &wf);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    for i in 0..11u32 {
        let got = std::fs::read_to_string(wf.join(format!("sq/{i}.txt"))).unwrap();
        assert_eq!(got, format!("{}\n", i * i), "sq/{i}.txt");
    }
    assert_eq!(std::fs::read_to_string(wf.join("total.txt")).unwrap(), "385\n");
    let jobs = d.ctl_json(&["ls"]);
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 12, "one cybd job per rule instance: {jobs:?}");
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "{jobs:?}");

    // A rule that fails: snakemake names it and exits non-zero; the others still run.
    let wf = tmp.path().join("broken");
    std::fs::create_dir(&wf).unwrap();
    std::fs::write(wf.join("Snakefile"), BROKEN).unwrap();
    let out = run_snakemake(&exe, &d, &wf);
    assert_ne!(code(&out), 0, "{}", shown(&out));
    assert_ne!(
        code(&out),
        124,
        "snakemake was killed after 100 s: {}",
        shown(&out)
    );
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(log.contains("Error in rule broken"), "{log}");
    assert!(!log.contains("Error in rule ok"), "{log}");
    assert_eq!(std::fs::read_to_string(wf.join("ok.txt")).unwrap(), "fine\n");
    assert!(!wf.join("broken.txt").exists());
    let jobs = d.ctl_json(&["ls", "--state", "failed"]);
    let failed = jobs.as_array().unwrap();
    assert_eq!(failed.len(), 1, "{jobs}");
    let id = failed[0]["id"].to_string();
    let rec = d.ctl_json(&["show", &id]);
    assert!(
        rec["spec"]["command"][1]
            .as_str()
            .unwrap_or_default()
            .contains("snakejob.broken."),
        "{rec}"
    );
    // Its stderr is in `cybctl logs`.
    let out = d.ctl(&["logs", &id]);
    assert!(text(&out.stderr).contains("about to fail"), "{}", shown(&out));
}
