//! Ended jobs are kept as small summaries in memory and whole only in the store (issue 15,
//! item 6). Every request about them is answered as it was while they were held whole:
//! `show`, `wait`, `ls`, `stats`, `cancel`, `priority`, `retry`, permission checks and
//! dependencies, both in the daemon that ran them and after a restart, which reads them
//! back as summaries.

use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::Duration;

use cyb_tests::{Daemon, root_and_test_user, shown, text, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Until `cybd`'s `ls` shows job `id` in `state`: the end is recorded and reported.
fn listed_as(d: &Daemon, id: u64, state: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(LONG, || {
        let ls = d.ctl_json(&["ls"]);
        last = ls
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id).cloned())
            .unwrap_or(Value::Null);
        last["state"] == state
    });
    assert!(ok, "job {id} is not listed {state}: {last}\n{}", d.log());
    last
}

fn check_ended_jobs(d: &Daemon, ok: u64, bad: u64, round: &str) {
    let (oks, bads) = (ok.to_string(), bad.to_string());
    // Summaries, as `ls` printed them while the jobs were held whole.
    let a = listed_as(d, ok, "succeeded");
    assert_eq!(a["name"], "history-ok", "{round}: {a}");
    assert_eq!(a["exit_code"], 0, "{round}: {a}");
    assert!(a["started_at"].is_string(), "{round}: {a}");
    let b = listed_as(d, bad, "failed");
    assert_eq!(b["exit_code"], 3, "{round}: {b}");
    assert_eq!(b["reason"], "exit_code", "{round}: {b}");
    assert_eq!(b["user"], a["user"], "{round}");
    let failed = d.ctl_json(&["ls", "--state", "failed"]);
    assert!(
        failed.as_array().unwrap().iter().all(|j| j["state"] == "failed"),
        "{round}: {failed}"
    );
    // The whole record, read back from the store.
    let show = d.ctl_json(&["show", &oks]);
    assert_eq!(show["spec"]["command"][1], "-c", "{round}: {show}");
    assert_eq!(show["state"], "succeeded", "{round}: {show}");
    assert_eq!(show["spec"]["env"]["HISTORY_MARK"], "kept", "{round}: {show}");
    // `wait` on an ended job answers at once, with its exit status.
    let out = d.ctl(&["wait", &bads]);
    assert_eq!(code(&out), 3, "{round}: {}", shown(&out));
    // An ended job cannot be cancelled; the answer names its state.
    let out = d.ctl(&["cancel", &oks]);
    assert_ne!(code(&out), 0, "{round}: {}", shown(&out));
    assert!(
        text(&out.stderr).contains("already ended (succeeded)"),
        "{round}: {}",
        shown(&out)
    );
    // Its priority can still be changed, and the change is on disk.
    let changed = d.ctl_json(&["priority", &oks, "7"]);
    assert_eq!(changed["priority"], 7, "{round}: {changed}");
    assert_eq!(d.record(ok)["priority"], 7, "{round}");
    assert_eq!(d.ctl_json(&["show", &oks])["priority"], 7, "{round}");
    // Dependencies on ended jobs: a succeeded one lets a job run, a failed one fails it.
    let after_ok = d.submit(&["--after", &oks], &["true"]);
    let after_bad = d.submit(&["--after", &bads], &["true"]);
    assert_eq!(d.wait_result(after_ok, LONG)["state"], "succeeded", "{round}");
    let r = d.wait_result(after_bad, LONG);
    assert_eq!(r["state"], "failed", "{round}: {r}");
    assert_eq!(r["reason"], "dependency_failed", "{round}: {r}");
    // Another user may neither change nor retry them.
    if let Some((uid, gid)) = root_and_test_user() {
        let out = d.ctl_cmd(&["retry", &bads]).uid(uid).gid(gid).output().unwrap();
        assert_ne!(code(&out), 0, "{round}: {}", shown(&out));
        assert!(
            text(&out.stderr).contains("belongs to"),
            "{round}: {}",
            shown(&out)
        );
    }
}

#[test]
fn ended_jobs_answer_every_request_in_the_daemon_that_ran_them_and_after_a_restart() {
    let mut d = Daemon::start();
    let ok = d.submit(
        &["--name", "history-ok", "--env", "HISTORY_MARK=kept"],
        &["sh", "-c", "echo fine"],
    );
    let bad = d.submit(&["--name", "history-bad"], &["sh", "-c", "exit 3"]);
    d.wait_result(ok, LONG);
    d.wait_result(bad, LONG);
    // Both are summaries now (the daemon logs each it keeps so, at debug level).
    let summaries = |d: &Daemon| d.log().matches("ended job kept as a summary").count();
    assert!(wait_until(LONG, || summaries(&d) >= 2), "{}", d.log());
    check_ended_jobs(&d, ok, bad, "same daemon");
    let read_back = d.log().matches("reading the record of an ended job back").count();
    assert!(read_back >= 2, "show and wait read the records back: {read_back}");
    let total = d.ctl_json(&["stats"])["total_jobs"].clone();
    d.restart();
    assert_eq!(d.ctl_json(&["stats"])["total_jobs"], total, "after restart");
    check_ended_jobs(&d, ok, bad, "after restart");

    // A retried job runs again and ends again; it is back among the summaries after.
    let bads = bad.to_string();
    let again = d.ctl_json(&["retry", &bads]);
    assert!(
        ["queued", "running"].contains(&again["state"].as_str().unwrap_or("")),
        "{again}"
    );
    let out = d.ctl(&["wait", &bads]);
    assert_eq!(code(&out), 3, "{}", shown(&out));
    let r = d.wait_state(bad, "failed", LONG);
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(d.ctl_json(&["show", &bads])["attempts"], 2);
    d.restart();
    assert_eq!(
        d.ctl_json(&["show", &bads])["attempts"],
        2,
        "after a second restart"
    );
    // `stats` agrees with the records (debug builds also check it against a full count).
    let stats = d.ctl_json(&["stats"]);
    assert_eq!(
        stats["total_jobs"].as_u64(),
        Some(d.records().len() as u64),
        "{stats}"
    );
}
