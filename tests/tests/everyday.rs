//! What a new user meets in the first hour (issue 17): jobs get the submitter's environment
//! as sbatch gives it (`--export` restricts it), a command that is not found says which PATH
//! was searched, a user-mode daemon and its cybctl find each other without
//! `XDG_RUNTIME_DIR` (under `su`/`runuser`), and a submission is told which of its limits
//! this host will not enforce. Real `cybd` and `cybctl` processes throughout.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cyb_tests::{Daemon, TEST_USER, bin, root_and_test_user, shown, text, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cyb-everyday-")
        .tempdir()
        .unwrap()
}

/// A job from `cybctl submit` finds programs on the submitter's PATH and sees their
/// variables; `--export NONE` gives it a clean environment, and then a command that is
/// not found names the PATH that was searched.
#[test]
fn submit_passes_the_callers_environment_and_export_restricts_it() {
    let d = Daemon::start();
    let t = tempdir();
    // A tool in a directory only the caller's PATH has, as ~/bin or a venv would be.
    let tools = t.path().join("venv/bin");
    std::fs::create_dir_all(&tools).unwrap();
    let tool = tools.join("mytool");
    std::fs::write(&tool, "#!/bin/sh\necho \"mytool ran with GREETING=$GREETING\"\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", tools.display());
    let submit = |extra: &[&str]| -> Value {
        let mut c = d.ctl_cmd(&["--json", "submit", "--wait"]);
        c.args(extra).args(["--", "mytool"]);
        c.env("PATH", &path)
            .env("GREETING", "hello")
            .current_dir(t.path());
        let out = c.output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", shown(&out)))
    };
    let ran = submit(&[]);
    assert_eq!(ran["state"], "succeeded", "{ran}");
    let id = ran["id"].as_u64().unwrap();
    let out = std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap();
    assert_eq!(out, "mytool ran with GREETING=hello\n");
    // The run directory is open to the user's group: job.json names the variables but
    // keeps their values to the record.
    let job: Value = serde_json::from_slice(&std::fs::read(d.run_dir(id).join("job.json")).unwrap()).unwrap();
    assert_eq!(job["spec"]["env"]["GREETING"], "(hidden)", "{job}");
    assert_eq!(d.record(id)["spec"]["env"]["GREETING"], "hello");

    // Only the names listed: PATH, but not GREETING.
    let listed = submit(&["--export", "PATH"]);
    let id = listed["id"].as_u64().unwrap();
    let out = std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap();
    assert_eq!(out, "mytool ran with GREETING=\n");

    // NONE: cybd's own PATH, where mytool is not; the failure names the PATH searched.
    let none = submit(&["--export", "NONE"]);
    let r = d.wait_result(none["id"].as_u64().unwrap(), LONG);
    assert_eq!(r["reason"], "spawn_failed", "{r}");
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("No such file or directory") && msg.contains("PATH=/usr/local/bin:/usr/bin:/bin"),
        "{msg}"
    );

    // A GPU variable of the submitter's shell never reaches a job: cybd sets its own.
    let mut c = d.ctl_cmd(&["--json", "submit", "--wait", "--shell", "echo \"[$CYB_JOB_ID]\""]);
    let out = c.env("CYB_JOB_ID", "999").output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["id"].as_u64().unwrap();
    let log = std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap();
    assert_eq!(log, format!("[{id}]\n"));
}

/// The test user's private home for one test (HOME points there, so nothing of a real
/// home is touched).
fn private_home(uid: u32, gid: u32) -> tempfile::TempDir {
    let home = tempfile::Builder::new()
        .prefix("cyb-home-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(home.path(), Some(uid), Some(gid)).unwrap();
    home
}

/// `cmd` as the test user with HOME=`home` and no XDG_RUNTIME_DIR, as `su`/`runuser` leave it.
fn as_test_user(home: &Path, cmd: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args([
        "-u",
        TEST_USER,
        "--",
        "env",
        "-u",
        "XDG_RUNTIME_DIR",
        "-u",
        "CYB_SOCKET",
    ])
    .arg(format!("HOME={}", home.display()))
    .arg(cmd)
    .current_dir(home);
    c
}

/// Under `runuser` (no XDG_RUNTIME_DIR, no /run/user/<uid>), `cybd --user` and `cybctl`
/// agree on `~/.local/state/cyb/cybd.sock`; a submission asking for limits user mode does
/// not enforce is told so on stderr; a runtime directory that cannot be made is named, with
/// the variable it came from.
#[test]
fn user_mode_without_xdg_runtime_dir() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let home = private_home(uid, gid);
    let run_user = format!("/run/user/{uid}");
    if Path::new(&run_user).exists() {
        eprintln!(
            "note: {run_user} exists here; the test covers the fallback after it only when it is absent"
        );
    }
    let daemon = as_test_user(home.path(), &bin("cybd"))
        .arg("--user")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        as_test_user(home.path(), &bin("cybctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let socket = if Path::new(&run_user).exists() {
        Path::new(&run_user).join("cyb/cybd.sock")
    } else {
        home.path().join(".local/state/cyb/cybd.sock")
    };
    let up = wait_until(LONG, || socket.exists() && code(&ctl(&["stats"])) == 0);
    if !up {
        let out = cyb_tests::terminate(daemon);
        panic!(
            "user-mode daemon did not come up at {}: {}",
            socket.display(),
            shown(&out)
        );
    }
    let out = ctl(&[
        "submit",
        "--wait",
        "--memory",
        "4G",
        "--cpus",
        "1",
        "--",
        "sh",
        "-c",
        "echo hi from $USER",
    ]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("memory, cpus: not enforced on this host (user mode)"),
        "stderr: {err}"
    );
    // Without limits, nothing to say.
    let out = ctl(&["submit", "--wait", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert!(!text(&out.stderr).contains("not enforced"), "{}", shown(&out));
    let logs = home.path().join(".local/state/cyb/logs/run_1/stdout.log");
    assert_eq!(
        std::fs::read_to_string(&logs).unwrap(),
        format!("hi from {TEST_USER}\n")
    );
    cyb_tests::terminate(daemon);

    // A runtime directory it may not create: the failure names the path and the variable.
    let out = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "env", "XDG_RUNTIME_DIR=/root/not-yours"])
        .arg(format!("HOME={}", home.path().display()))
        .arg(bin("cybd"))
        .arg("--user")
        .current_dir(home.path())
        .output()
        .unwrap();
    assert_ne!(code(&out), 0);
    let err = text(&out.stderr);
    assert!(
        err.contains("/root/not-yours/cyb") && err.contains("XDG_RUNTIME_DIR"),
        "{err}"
    );
}
