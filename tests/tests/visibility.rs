//! What others may see of a job: anyone lists and shows every job, but only its owner and
//! admins get the values of its `env` and its `context`; nobody finds them in the daemon's
//! log or in the records' directory.
//!
//! Two users besides root: the test user owns the job, `nobody` is the other user (neither
//! owner nor admin).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cyb_tests::{Daemon, as_user, root_and_test_user, shown, text};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);
/// The `env` value only the owner and admins may read.
const SECRET: &str = "s3cret-visibility-token";
/// A mark in the job's `context`.
const CONTEXT_MARK: &str = "ctx-visibility-ticket";
/// The other user: neither the job's owner nor an admin.
const OTHER: (u32, u32) = (65534, 65534);

fn as_who(mut cmd: Command, who: (u32, u32)) -> Command {
    use std::os::unix::process::CommandExt;
    cmd.uid(who.0).gid(who.1).current_dir("/");
    cmd
}

/// Runs cybctl as `who` and asserts it succeeds.
fn ctl_as(d: &Daemon, who: (u32, u32), args: &[&str]) -> String {
    let out: Output = as_who(d.ctl_cmd(args), who).output().expect("run cybctl");
    assert!(
        out.status.success(),
        "cybctl {args:?} as uid {}: {}",
        who.0,
        shown(&out)
    );
    text(&out.stdout)
}

fn json_as(d: &Daemon, who: (u32, u32), args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ctl_as(d, who, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cybctl {a:?} printed non-JSON ({e}): {out}"))
}

/// Submits, as `owner`, a job whose `env` holds [`SECRET`] and whose `context` holds
/// [`CONTEXT_MARK`]; returns its id.
fn submit_secret_job(d: &Daemon, owner: (u32, u32), argv: &[&str]) -> u64 {
    let body = serde_json::json!({
        "name": "secret-job",
        "command": argv,
        "cwd": "/tmp",
        "env": {"API_TOKEN": SECRET, "PLAIN": "visible-to-owner"},
        "context": {"ticket": CONTEXT_MARK},
    });
    let mut child = as_who(d.ctl_cmd(&["--json", "submit", "-f", "-"]), owner)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cybctl submit");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "submit: {}", shown(&out));
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
}

/// The owner's and an admin's view: every value and the context.
fn sees_everything(d: &Daemon, who: (u32, u32), id: u64, when: &str) {
    let ids = id.to_string();
    let rec = json_as(d, who, &["show", &ids]);
    assert_eq!(
        rec["spec"]["env"]["API_TOKEN"], SECRET,
        "{when}, uid {}: {rec}",
        who.0
    );
    assert_eq!(
        rec["spec"]["context"]["ticket"], CONTEXT_MARK,
        "{when}, uid {}: {rec}",
        who.0
    );
    let page = ctl_as(d, who, &["show", &ids]);
    assert!(
        page.contains(&format!("API_TOKEN={SECRET}")),
        "{when}, uid {}:\n{page}",
        who.0
    );
    assert!(page.contains(CONTEXT_MARK), "{when}, uid {}:\n{page}", who.0);
}

/// Another user's view: the job, its variables' names, but no value and no context.
fn sees_no_secret(d: &Daemon, id: u64, when: &str) {
    let ids = id.to_string();
    let listed = json_as(d, OTHER, &["ls"]);
    let line = listed
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == id))
        .unwrap_or_else(|| panic!("{when}: job {id} missing from ls --json: {listed}"));
    assert_eq!(line["name"], "secret-job", "{when}: {line}");
    let table = ctl_as(d, OTHER, &["ls"]);
    assert!(table.contains("secret-job"), "{when}: ls:\n{table}");
    let rec = json_as(d, OTHER, &["show", &ids]);
    assert_eq!(rec["spec"]["env"]["API_TOKEN"], "(hidden)", "{when}: {rec}");
    assert_eq!(rec["spec"]["env"]["PLAIN"], "(hidden)", "{when}: {rec}");
    assert!(rec["spec"].get("context").is_none(), "{when}: {rec}");
    assert_eq!(
        rec["spec"]["command"][0], "sleep",
        "{when}: the rest is shown: {rec}"
    );
    let page = ctl_as(d, OTHER, &["show", &ids]);
    assert!(page.contains("'API_TOKEN=(hidden)'"), "{when}:\n{page}");
    // `wait` answers with the record too (exiting 124 while the job runs on).
    let out = as_who(d.ctl_cmd(&["--json", "wait", &ids, "--timeout", "1s"]), OTHER)
        .output()
        .unwrap();
    let waited: Value = serde_json::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("{when}: wait printed non-JSON ({e}): {}", shown(&out)));
    assert_eq!(waited["spec"]["env"]["API_TOKEN"], "(hidden)", "{when}: {waited}");
    assert!(waited["spec"].get("context").is_none(), "{when}: {waited}");
    for out in [
        table,
        listed.to_string(),
        rec.to_string(),
        page,
        waited.to_string(),
    ] {
        assert!(
            !out.contains(SECRET),
            "{when}: a value reached another user: {out}"
        );
        assert!(
            !out.contains("visible-to-owner"),
            "{when}: a value reached another user: {out}"
        );
        assert!(
            !out.contains(CONTEXT_MARK),
            "{when}: the context reached another user: {out}"
        );
    }
}

#[test]
fn others_see_the_job_without_its_env_values_and_context() {
    let Some(owner) = root_and_test_user() else {
        return;
    };
    let root = (0, 0);
    let mut d = Daemon::start();
    let id = submit_secret_job(&d, owner, &["sleep", "60"]);
    d.wait_state(id, "running", LONG);

    // A job in the queue: its whole record is in memory.
    sees_everything(&d, owner, id, "running");
    sees_everything(&d, root, id, "running");
    sees_no_secret(&d, id, "running");
    // The other user may not act on it, and so gets no record that way either.
    let out = as_who(d.ctl_cmd(&["--json", "cancel", &id.to_string()]), OTHER)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", shown(&out));
    assert!(!text(&out.stdout).contains(SECRET), "{}", shown(&out));
    // Its owner may, and gets the whole record back.
    let cancelled = json_as(&d, owner, &["cancel", &id.to_string()]);
    assert_eq!(cancelled["spec"]["env"]["API_TOKEN"], SECRET, "{cancelled}");
    d.wait_result(id, LONG);

    // An ended job, read back from its record on disk, and after a restart.
    sees_everything(&d, owner, id, "ended");
    sees_no_secret(&d, id, "ended");
    d.restart();
    sees_everything(&d, root, id, "after restart");
    sees_no_secret(&d, id, "after restart");

    // The records are not for others to read either.
    let jobs = d.jobs_dir();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&jobs).unwrap().permissions());
    assert_eq!(mode & 0o007, 0, "{} has mode {mode:o}", jobs.display());
    let record = jobs.join(format!("{id}.json"));
    assert!(std::fs::read_to_string(&record).unwrap().contains(SECRET));
    let read_by_other = as_user(OTHER.0, OTHER.1, move || std::fs::read(&record).is_ok()).unwrap();
    assert!(!read_by_other, "another user can read the job's record");

    // Nor does a value reach the daemon's log (debug level here).
    let log = d.log();
    assert!(!log.contains(SECRET), "an env value reached the log:\n{log}");
}
