//! Logging against a real standalone systemd-journald (../shared/scripts/journald-start.sh):
//! the structured fields arrive, `journalctl JOB_ID=<id>` shows a job's whole life, and
//! when journald dies mid-run no log line and no job is lost (lines go to stderr).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use cyb_tests::{Daemon, is_root, require, wait_until};

/// One journald at a time on this host.
static JOURNALD: Mutex<()> = Mutex::new(());

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/scripts")
}

struct Journald(u32);

impl Journald {
    fn start() -> Option<Journald> {
        if !require(is_root(), "root (to run a standalone journald)") {
            return None;
        }
        if !require(
            std::path::Path::new("/lib/systemd/systemd-journald").exists(),
            "systemd-journald (package systemd)",
        ) {
            return None;
        }
        let script = scripts().join("journald-start.sh");
        if !require(script.exists(), "../shared/scripts/journald-start.sh") {
            return None;
        }
        // A journald stopped a moment ago may linger as a zombie until pid 1 reaps it.
        let mut out = Command::new("sh")
            .arg(&script)
            .output()
            .expect("run journald-start.sh");
        for _ in 0..50 {
            if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("already running") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            out = Command::new("sh")
                .arg(&script)
                .output()
                .expect("run journald-start.sh");
        }
        assert!(
            out.status.success(),
            "journald-start.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("journald pid");
        Some(Journald(pid))
    }

    fn stop(&mut self) {
        if self.0 != 0 {
            let _ = Command::new("sh")
                .arg(scripts().join("journald-stop.sh"))
                .arg(self.0.to_string())
                .status();
            self.0 = 0;
        }
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `journalctl FIELD=VALUE` as JSON entries.
fn journal(matches: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("journalctl")
        .args(["--no-pager", "-o", "json", "--directory", "/run/log/journal"])
        .args(matches)
        .output()
        .expect("journalctl");
    // journald may keep its files under a machine-id directory: --directory needs the leaf.
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.trim().is_empty() {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "json"])
            .args(matches)
            .output()
            .unwrap();
        text = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// EVENT values of job `id` of the daemon with pid `pid` (journals outlive test runs).
fn events_of(pid: u32, id: u64) -> Vec<String> {
    journal(&[&format!("JOB_ID={id}"), &format!("_PID={pid}")])
        .iter()
        .filter_map(|e| e["EVENT"].as_str().map(String::from))
        .collect()
}

#[test]
fn structured_fields_arrive_and_survive_journald_dying() {
    let _one = JOURNALD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut jd) = Journald::start() else { return };
    let d = Daemon::logging_to("journald", Daemon::start);
    let pid = d.pid().unwrap();
    let of_job = |id: u64| journal(&[&format!("JOB_ID={id}"), &format!("_PID={pid}")]);
    // A job's whole life is in the journal under its id.
    let id = d.submit(&["--name", "jtest"], &["sh", "-c", "exit 3"]);
    d.wait_result(id, Duration::from_secs(20));
    let ok = wait_until(Duration::from_secs(10), || {
        let ev = events_of(pid, id);
        ev.contains(&"submitted".to_string()) && ev.contains(&"failed".to_string())
    });
    assert!(ok, "journal lacks job {id}'s events: {:?}", of_job(id));
    let entries = of_job(id);
    let events: Vec<&str> = entries.iter().filter_map(|e| e["EVENT"].as_str()).collect();
    assert_eq!(events, ["submitted", "started", "failed"], "{entries:?}");
    for e in &entries {
        assert_eq!(e["JOB_USER"], "root", "{e}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "cybd", "{e}");
    }
    assert!(entries.iter().any(|e| e["CLASS"] == "cpu_short"), "{entries:?}");
    assert!(entries.iter().any(|e| {
        e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("exited with status 3"))
    }));
    // A refused file is logged as `rejected`.
    d.drop_job("bad.json", r#"{"comand": ["true"]}"#);
    d.wait_rejected("bad.json", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || !journal(&[
        "EVENT=rejected",
        &format!("_PID={pid}")
    ])
    .is_empty()));

    // journald goes away: the daemon keeps running, jobs keep running, lines go to stderr.
    jd.stop();
    let before = d.log().len();
    let id2 = d.submit(&["--wait"], &["true"]);
    let r = d.wait_result(id2, Duration::from_secs(20));
    assert_eq!(r["state"], "succeeded");
    let after = &d.log()[before..];
    assert!(
        after.contains(&format!("job {id2} submitted")),
        "stderr lacks job {id2}'s lines: {after}"
    );
    assert!(
        after.contains(&format!("job {id2} succeeded")),
        "stderr lacks job {id2}'s lines: {after}"
    );
    assert!(d.ctl(&["stats"]).status.success(), "daemon died with journald");

    // journald comes back: entries go to it again.
    let Some(_jd2) = Journald::start() else { return };
    let id3 = d.submit(&["--wait"], &["true"]);
    assert!(
        wait_until(Duration::from_secs(10), || events_of(pid, id3)
            .contains(&"finished".to_string())),
        "journal lacks job {id3} after journald came back"
    );
}
