//! Logging against a real standalone systemd-journald (started by the test itself):
//! the structured fields arrive, `journalctl JOB_ID=<id>` shows a job's whole life, and
//! when journald dies mid-run no log line and no job is lost (lines go to stderr).

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use cyb_tests::{Daemon, is_root, require, wait_until};

/// One journald at a time on this host.
static JOURNALD: Mutex<()> = Mutex::new(());

const JOURNALD_BIN: &str = "/lib/systemd/systemd-journald";
/// Where journald takes native protocol datagrams.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether a process named `systemd-journal` (journald's comm) is alive.
fn journald_running() -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // "<pid> (<comm>) <state> ...": a zombie waiting for its reaper does not count.
            stat.contains("(systemd-journal) ") && !stat.contains("(systemd-journal) Z")
        })
}

/// Whether something is bound to `path` as a datagram socket now (a socket file left by a
/// journald that died is not): /proc/net/unix lists bound sockets with their paths.
fn datagram_bound(path: &str) -> bool {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; Type 0002 is SOCK_DGRAM.
            f.len() >= 8 && f[4] == "0002" && f[7] == path
        })
}

/// Directories journald makes on a host that has none of its own running: its sockets and
/// its volatile journal. Those the test's journald made are removed when it stops.
const JOURNALD_DIRS: [&str; 2] = ["/run/systemd/journal", "/run/log/journal"];

/// A standalone systemd-journald (no systemd as PID 1 needed), started by this test, and
/// which of [`JOURNALD_DIRS`] were not there before it (to remove them after it).
struct Journald(Option<std::process::Child>, Vec<&'static str>);

impl Journald {
    fn start() -> Option<Journald> {
        if !require(is_root(), "root (to run a standalone journald)") {
            return None;
        }
        if !require(
            std::path::Path::new(JOURNALD_BIN).exists(),
            "systemd-journald (package systemd)",
        ) {
            return None;
        }
        // One stopped a moment ago may linger until its parent reaps it; another one
        // running would fight this one for the sockets.
        assert!(
            wait_until(Duration::from_secs(5), || !journald_running()),
            "a systemd-journald is already running on this host"
        );
        let made: Vec<&'static str> = JOURNALD_DIRS
            .into_iter()
            .filter(|d| !std::path::Path::new(d).exists())
            .collect();
        let log = std::env::temp_dir().join("cyb-test-journald.stderr");
        let err = std::fs::File::create(&log).expect("journald's stderr file");
        let mut child = Command::new(JOURNALD_BIN)
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start systemd-journald");
        let up = wait_until(Duration::from_secs(5), || {
            datagram_bound(JOURNAL_SOCKET) || child.try_wait().ok().flatten().is_some()
        });
        assert!(
            up && child.try_wait().ok().flatten().is_none(),
            "systemd-journald did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let _ = std::fs::remove_file(&log);
        Some(Journald(Some(child), made))
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s) and reaps it.
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            if !wait_until(Duration::from_secs(5), || c.try_wait().ok().flatten().is_some()) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Stopped for good: also removes the directories this journald made.
fn stop_and_clean(j: &mut Journald) {
    j.stop();
    for d in std::mem::take(&mut j.1) {
        let _ = std::fs::remove_dir_all(d);
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        stop_and_clean(self);
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
