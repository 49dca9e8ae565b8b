//! A full disk: what cybd could not record it must not run, and what ended while it could
//! not write is recorded once there is room again, without a restart. The spool's record
//! directory (and the logs) sit on small tmpfs mounts that the tests fill up and free.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cyb_tests::{Daemon, TestConfig, is_root, require, wait_until};

/// Fills the file system holding `dir` until a write fails; removing the returned file
/// gives the room back.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // The last partial page too.
    while f.write_all(&[0u8; 512]).is_ok() {}
    path
}

fn marks(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn total_jobs(d: &Daemon) -> u64 {
    d.ctl_json(&["stats"])["total_jobs"].as_u64().unwrap()
}

#[test]
fn refused_submissions_never_run_and_spool_files_are_taken_once_room_returns() {
    if !require(is_root(), "root (to mount a small tmpfs under the spool)") {
        return;
    }
    let mut jobs_dir = PathBuf::new();
    let d = Daemon::start_prepared(TestConfig::new(), |d| {
        jobs_dir = d.mount_tmpfs("spool/jobs", "1m")
    });
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("marks");
    let filler = fill(&jobs_dir);

    // An RPC submission is refused, saying why.
    let refused = d.ctl(&[
        "submit",
        "--",
        "sh",
        "-c",
        &format!("echo rpc >> {}", log.display()),
    ]);
    assert!(!refused.status.success(), "submit on a full disk was accepted");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("cannot record the job") && why.contains("No space left"),
        "{why}"
    );

    // Spool files dropped meanwhile stay where they are, however often intake tries them.
    let names: Vec<String> = (0..20).map(|i| format!("job{i:02}")).collect();
    for n in &names {
        d.drop_job(
            &format!("{n}.json"),
            &format!(r#"{{"shell": "echo {n} >> {}"}}"#, log.display()),
        );
    }
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(total_jobs(&d), 0, "jobs that were never recorded are counted");
    assert!(d.ctl_json(&["ls"]).as_array().unwrap().is_empty());
    let st = d.ctl_json(&["stats"]);
    assert!(
        st["store_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "stats does not say why submissions are refused: {st}"
    );
    assert!(marks(&log).is_empty(), "a refused job ran: {:?}", marks(&log));
    let waiting = std::fs::read_dir(d.incoming()).unwrap().count();
    assert_eq!(
        waiting, 20,
        "spool files left incoming/ while nothing could be recorded"
    );

    // Room again: each file is taken exactly once, and the refused submission never runs.
    std::fs::remove_file(&filler).unwrap();
    let all_ran = wait_until(Duration::from_secs(30), || marks(&log).len() >= 20);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_ran,
        "spool jobs did not run once there was room: {:?}",
        marks(&log)
    );
    assert_eq!(marks(&log), names, "each spool file must run exactly once");
    assert_eq!(total_jobs(&d), 20);
    assert_eq!(std::fs::read_dir(d.incoming()).unwrap().count(), 0);
    assert!(
        d.ctl_json(&["stats"])
            .get("store_error")
            .is_none_or(|e| e.is_null())
    );
}

#[test]
fn a_job_ending_while_the_disk_is_full_is_recorded_once_there_is_room() {
    if !require(is_root(), "root (to mount small tmpfs file systems)") {
        return;
    }
    // A record update is written into a spare file, in place, so on a full disk it still
    // succeeds while the new version fits the pages the old one had. This job's end must
    // not: its queued record fills most of one page, its end record needs a second. The
    // sizes come from a probe job on a daemon of its own.
    let record_size = |d: &Daemon, id: u64| {
        std::fs::metadata(d.jobs_dir().join(format!("{id}.json")))
            .unwrap()
            .len()
    };
    let probe = Daemon::start();
    probe.ctl_ok(&["pause"]);
    // No caller environment (cybctl passes it by default): the sizes are the spec's alone.
    let pid = probe.submit(&["--export", "NONE", "--env", "PAD="], &["sleep", "3"]);
    let queued = record_size(&probe, pid);
    probe.ctl_ok(&["resume"]);
    probe.wait_state(pid, "succeeded", Duration::from_secs(20));
    let ended = record_size(&probe, pid);
    assert!(
        ended > queued + 64,
        "the end record is not larger: {queued} -> {ended}"
    );
    let pad = "x".repeat((4096 - queued - (ended - queued) / 2) as usize);
    drop(probe);

    let (mut jobs_dir, mut logs_dir) = (PathBuf::new(), PathBuf::new());
    let d = Daemon::start_prepared(TestConfig::new(), |d| {
        jobs_dir = d.mount_tmpfs("spool/jobs", "1m");
        logs_dir = d.mount_tmpfs("logs", "1m");
    });
    let id = d.submit(
        &["--export", "NONE", "--env", &format!("PAD={pad}")],
        &["sleep", "3"],
    );
    d.wait_state(id, "running", Duration::from_secs(10));
    // Running is recorded while the start is prepared; the disk fills once the job's
    // supervisor has its logs open (the job itself runs).
    assert!(
        wait_until(Duration::from_secs(10), || d
            .run_dir(id)
            .join("stdout.log")
            .exists()),
        "job {id} did not start"
    );
    let fillers = [fill(&jobs_dir), fill(&logs_dir)];

    // The job ends while nothing can be written: the daemon stays up, answers, says why.
    let told = wait_until(Duration::from_secs(15), || {
        d.ctl_json(&["stats"])["store_error"].is_string()
    });
    assert!(told, "stats does not say records cannot be written:\n{}", d.log());
    let t = std::time::Instant::now();
    let ls = d.ctl_json(&["ls"]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "ls took {:?} on a full disk",
        t.elapsed()
    );
    assert_eq!(ls.as_array().unwrap().len(), 1);
    let st = d.ctl_json(&["stats"]);
    assert!(
        st["store_error"].as_str().unwrap().contains("No space left"),
        "{st}"
    );
    assert_eq!(
        d.record(id)["state"],
        "running",
        "the record changed on a full disk?"
    );
    assert!(d.result(id).is_none());

    // Room again: without a restart, the record becomes terminal and result.json appears.
    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    let recorded = wait_until(Duration::from_secs(10), || {
        d.record(id)["state"] == "succeeded" && d.result(id).is_some()
    });
    assert!(
        recorded,
        "the end was not recorded: {}\n{}",
        d.record(id),
        d.log()
    );
    assert_eq!(d.result(id).unwrap()["state"], "succeeded");
    assert!(wait_until(Duration::from_secs(5), || !d.exit_file(id).exists()));
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0));
}
