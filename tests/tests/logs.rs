//! `cybctl logs` against a real daemon: both of a job's streams by default (its stdout to
//! stdout, its stderr to stderr), `--stdout` / `--stderr` for one, and `-f` alike, where
//! the two come in the order the job wrote them.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cyb_tests::{Daemon, bin, shown, text, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// `cybctl ARGS 2>&1` against `d`: both of its streams in one pipe, in the order written.
fn joined(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut line = format!(
        "exec '{}' --socket '{}'",
        bin("cybctl").display(),
        d.socket().display()
    );
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    line.push_str(" 2>&1");
    Command::new("sh").arg("-c").arg(line).output().unwrap()
}

#[test]
fn logs_prints_both_streams_unless_one_is_chosen() {
    let d = Daemon::start();
    // What a failed build leaves: a line on stdout, the error on stderr.
    let id = d.submit(
        &[],
        &["sh", "-c", "echo 'cc -c main.c'; echo 'main.c:3: error: expected ;' >&2; echo 'make: *** [all] Error 1' >&2; exit 2"],
    );
    let ids = id.to_string();
    assert_eq!(code(&d.ctl(&["wait", &ids])), 2);

    let out = d.ctl(&["logs", &ids]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(text(&out.stdout), "cc -c main.c\n", "{}", shown(&out));
    assert_eq!(
        text(&out.stderr),
        "main.c:3: error: expected ;\nmake: *** [all] Error 1\n",
        "{}",
        shown(&out)
    );
    // Joined: stdout first, then stderr (the files carry no times).
    let out = joined(&d, &["logs", &ids]);
    assert_eq!(
        text(&out.stdout),
        "cc -c main.c\nmain.c:3: error: expected ;\nmake: *** [all] Error 1\n"
    );
    // Both selectors: the same as none.
    let out = d.ctl(&["logs", "--stdout", "--stderr", &ids]);
    assert_eq!(text(&out.stdout), "cc -c main.c\n", "{}", shown(&out));
    assert!(text(&out.stderr).contains("Error 1"), "{}", shown(&out));

    // One stream: to stdout, and nothing on stderr.
    let out = d.ctl(&["logs", "--stdout", &ids]);
    assert_eq!(text(&out.stdout), "cc -c main.c\n", "{}", shown(&out));
    assert!(out.stderr.is_empty(), "{}", shown(&out));
    let out = d.ctl(&["logs", "--stderr", &ids]);
    assert_eq!(
        text(&out.stdout),
        "main.c:3: error: expected ;\nmake: *** [all] Error 1\n",
        "{}",
        shown(&out)
    );
    assert!(out.stderr.is_empty(), "{}", shown(&out));

    // --json: the streams chosen, by name.
    let j = d.ctl_json(&["logs", &ids]);
    assert_eq!(j["stdout"], "cc -c main.c\n", "{j}");
    assert_eq!(
        j["stderr"], "main.c:3: error: expected ;\nmake: *** [all] Error 1\n",
        "{j}"
    );
    assert_eq!(j["id"].as_u64(), Some(id), "{j}");
    let j = d.ctl_json(&["logs", "--stderr", &ids]);
    assert!(j.get("stdout").is_none(), "{j}");
    assert!(
        j["stderr"].as_str().unwrap_or_default().contains("Error 1"),
        "{j}"
    );

    // A job that wrote only to stderr still shows it.
    let id = d.submit(&[], &["sh", "-c", "echo only-err >&2"]);
    d.ctl_ok(&["wait", &id.to_string()]);
    let out = d.ctl(&["logs", &id.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(text(&out.stderr), "only-err\n", "{}", shown(&out));
}

/// A job that waits for `go` in its directory, then writes out1, err1, out2, err2 with
/// 0.8 s between them (eight of `-f`'s 0.1 s polls, so a loaded machine's late poll still
/// sees them one at a time).
fn interleaving_job(d: &Daemon, dir: &std::path::Path) -> u64 {
    d.submit(
        &["--cwd", dir.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "while [ ! -e go ]; do sleep 0.05; done; echo out1; sleep 0.8; echo err1 >&2; sleep 0.8; echo out2; sleep 0.8; echo err2 >&2",
        ],
    )
}

#[test]
fn logs_follow_shows_both_streams_as_written() {
    let d = Daemon::start();

    // Joined into one pipe: in the order the job wrote them.
    let tmp = tempfile::tempdir().unwrap();
    let id = interleaving_job(&d, tmp.path());
    let ids = id.to_string();
    d.wait_state(id, "running", LONG);
    let mut line = format!(
        "exec '{}' --socket '{}' logs -f {ids} 2>&1",
        bin("cybctl").display(),
        d.socket().display()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(tmp.path().join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(text(&out.stdout), "out1\nerr1\nout2\nerr2\n", "{}", shown(&out));
    assert_eq!(d.job_state(id), "succeeded");

    // Apart: stdout to stdout, stderr to stderr, each as it comes.
    let tmp = tempfile::tempdir().unwrap();
    let id = interleaving_job(&d, tmp.path());
    d.wait_state(id, "running", LONG);
    let mut child = d
        .ctl_cmd(&["logs", "-f", &id.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let mut first_at = None;
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            first_at.get_or_insert_with(Instant::now);
            got.extend_from_slice(&buf[..n]);
        }
        (got, first_at)
    });
    std::thread::sleep(Duration::from_millis(300));
    let went = Instant::now();
    std::fs::write(tmp.path().join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let ended = Instant::now();
    let (err, first_err) = errs.join().unwrap();
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&err), "err1\nerr2\n");
    // err1 came while the job ran, not at its end.
    let first_err = first_err.expect("no stderr at all");
    assert!(
        first_err < ended - Duration::from_millis(300),
        "stderr came only at the end"
    );
    assert!(first_err > went, "stderr before the job wrote it");

    // --stderr: that stream alone, to stdout.
    let tmp = tempfile::tempdir().unwrap();
    let id = interleaving_job(&d, tmp.path());
    d.wait_state(id, "running", LONG);
    line = id.to_string();
    let child = d
        .ctl_cmd(&["logs", "-f", "--stderr", &line])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(tmp.path().join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(text(&out.stdout), "err1\nerr2\n", "{}", shown(&out));
    assert!(out.stderr.is_empty(), "{}", shown(&out));
    assert!(wait_until(LONG, || d.job_state(id) == "succeeded"));
    let v: Value = d.ctl_json(&["show", &line]);
    assert_eq!(v["state"], "succeeded", "{v}");
}
