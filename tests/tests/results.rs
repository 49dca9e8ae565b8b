//! The results stage, end to end: what `result.json` says about a run besides how it
//! ended (the backend, and every error around the job, which also reaches the log and
//! `cybctl show`).

use std::time::Duration;

use cyb_tests::{Daemon, shown, text};

const LONG: Duration = Duration::from_secs(30);

#[test]
fn an_artifact_that_cannot_be_collected_is_in_result_json_the_log_and_show() {
    let d = Daemon::start();
    let cwd = tempfile::tempdir().unwrap();
    // The job puts a directory where its artifact would be copied to, so the copy fails
    // (as it does on a full disk); the job itself succeeds.
    let script = "mkdir -p out \"$CYB_ARTIFACTS_DIR/out/a.txt\" && echo a > out/a.txt && echo b > out/b.txt";
    let body = serde_json::json!({"shell": script, "cwd": cwd.path(), "artifacts": ["out/*.txt"]});
    let id = d.submit_file(cwd.path(), "job.json", &body);
    let r = d.wait_result(id, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["backend"], "native", "{r}");
    assert_eq!(r["gpus"], serde_json::json!([]), "{r}");
    let errors = r["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {r}"));
    assert_eq!(errors.len(), 1, "{r}");
    let e = errors[0].as_str().unwrap();
    assert!(
        e.starts_with("not every artifact was collected:") && e.contains("out/a.txt"),
        "{e}"
    );
    // The artifact that could be copied was.
    assert!(d.run_dir(id).join("artifacts/out/b.txt").is_file());
    // The record keeps it, so `show` says it, and so does the log, with the job's id.
    let out = d.ctl(&["show", &id.to_string()]);
    let shown_text = text(&out.stdout);
    assert!(
        shown_text
            .lines()
            .any(|l| l.starts_with("error") && l.contains("out/a.txt")),
        "{}",
        shown(&out)
    );
    assert_eq!(d.record(id)["outcome"]["errors"][0], errors[0]);
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("not every artifact was collected")
            && l.contains("out/a.txt")
            && l.contains(&format!("job {id}"))),
        "the log does not say it:\n{log}"
    );
}

#[test]
fn a_clean_run_has_no_errors_and_says_its_backend() {
    let d = Daemon::start();
    let id = d.submit(&[], &["true"]);
    let r = d.wait_result(id, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["backend"], "native", "{r}");
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert!(
        d.record(id)["outcome"].get("errors").is_none(),
        "{}",
        d.record(id)
    );
}
