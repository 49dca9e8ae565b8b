//! `cybctl clean` and `[retention]`, end to end, against real cybd processes.
//!
//! What is proved here:
//! - only ended jobs go, record and run directory both; queued, held and running jobs stay,
//!   and `ls`, `show` (exit 3) and `stats` agree at once;
//! - ids are never given out again after a clean, even of the newest job, across a stop and
//!   a kill -9;
//! - an ended job that a queued job depends on is kept (explicit id: refused, naming the
//!   dependent; filters: skipped with the reason), the dependent still runs after a
//!   restart, and a job retried after its dependency was cleaned fails saying so;
//! - a user cleans only their own jobs: another's by id is permission denied (77), and
//!   filters take only theirs; admins may take anyone's;
//! - `[retention]` removes the oldest ended jobs beyond `max_jobs`, and those older than
//!   `max_age`, by itself;
//! - a kill -9 at random instants during a clean of many jobs leaves each job whole (record
//!   and run directory) or gone, and start-up finishes the interrupted removals.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cyb_proto::Class;
use cyb_tests::{Daemon, Rng, TestConfig, alive, root_and_test_user, shown, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn ids_listed(d: &Daemon) -> BTreeSet<u64> {
    d.ctl_json(&["ls"])
        .as_array()
        .expect("ls --json is an array")
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect()
}

fn state(d: &Daemon, id: u64) -> String {
    d.ctl_json(&["show", &id.to_string()])["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn stats_count(d: &Daemon, state: &str) -> u64 {
    let s = d.ctl_json(&["stats"]);
    s["counts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == state)
        .and_then(|c| c[1].as_u64())
        .unwrap_or(0)
}

/// Job `id` is gone: no record, no run directory (nor its tombstone), `show` says so.
/// A job leaves the listing as its removal starts; its files go a moment later (retention
/// removes them off the scheduler), so they get a few seconds.
fn assert_gone(d: &Daemon, id: u64) {
    let record = d.jobs_dir().join(format!("{id}.json"));
    wait_until(Duration::from_secs(5), || {
        !record.exists() && !d.run_dir(id).exists()
    });
    assert!(!record.exists(), "record of job {id} left");
    assert!(!d.run_dir(id).exists(), "run directory of job {id} left");
    let out = d.ctl(&["show", &id.to_string()]);
    assert_eq!(code(&out), 3, "show {id}: {}", shown(&out));
    assert!(shown(&out).contains(&format!("no job {id}")), "{}", shown(&out));
}

/// Starts the daemon again after a kill -9 and waits until it really answers (see the same
/// helper in recovery.rs: a killed daemon's socket can accept for a moment).
fn restart(d: &mut Daemon) {
    d.restart();
    let pid = d.pid().expect("daemon started") as i32;
    let up = wait_until(LONG, || !alive(pid) || d.ctl(&["stats"]).status.success());
    assert!(
        up && alive(pid),
        "the restarted daemon did not come up; log:\n{}",
        d.log()
    );
}

/// cybctl run as `who`.
fn ctl_as(d: &Daemon, who: (u32, u32), args: &[&str]) -> Output {
    let mut c = d.ctl_cmd(args);
    c.uid(who.0).gid(who.1).current_dir("/");
    c.output().expect("run cybctl")
}

#[test]
fn clean_removes_only_ended_jobs_and_ls_show_stats_agree() {
    let d = Daemon::start_with(TestConfig::new().class_slots(Class::CpuShort, 1));
    let ok = d.submit(&[], &["true"]);
    let bad = d.submit(&[], &["false"]);
    d.wait_result(ok, LONG);
    d.wait_result(bad, LONG);
    let running = d.submit(&[], &["sleep", "30"]);
    d.wait_state(running, "running", LONG);
    let queued = d.submit(&[], &["true"]);
    let held = d.submit(&[], &["true"]);
    d.ctl_ok(&["hold", &held.to_string()]);
    assert!(d.run_dir(ok).join("stdout.log").exists());

    // By id, a job that has not ended is refused and nothing is removed.
    let out = d.ctl(&["clean", &ok.to_string(), &running.to_string()]);
    assert_eq!(code(&out), 1, "{}", shown(&out));
    assert!(
        shown(&out).contains(&format!("job {running} is running")),
        "{}",
        shown(&out)
    );
    assert_eq!(state(&d, ok), "succeeded");
    let out = d.ctl(&["clean", "999"]);
    assert_eq!(code(&out), 3, "{}", shown(&out));
    // A state that has not ended is a usage error.
    assert_eq!(code(&d.ctl(&["clean", "--state", "queued"])), 2);

    // With no arguments: every ended job of mine.
    let out = d.ctl_ok(&["clean"]);
    assert_eq!(out.trim(), "removed 2 jobs");
    for id in [ok, bad] {
        assert_gone(&d, id);
    }
    assert_eq!(ids_listed(&d), BTreeSet::from([running, queued, held]));
    assert_eq!(state(&d, running), "running");
    assert_eq!(state(&d, queued), "queued");
    assert_eq!(state(&d, held), "held");
    let s = d.ctl_json(&["stats"]);
    assert_eq!(s["total_jobs"], 3, "{s}");
    assert_eq!(stats_count(&d, "succeeded") + stats_count(&d, "failed"), 0);

    // --state and --json: the ids removed.
    d.ctl_ok(&["cancel", &held.to_string()]);
    d.ctl_ok(&["cancel", &running.to_string()]);
    d.wait_result(queued, LONG);
    let r = d.ctl_json(&["clean", "--state", "cancelled"]);
    let removed: BTreeSet<u64> = r["removed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(removed, BTreeSet::from([running, held]), "{r}");
    assert_eq!(ids_listed(&d), BTreeSet::from([queued]));
    // --older-than: the job that just ended is too young.
    assert_eq!(
        d.ctl_ok(&["clean", "--older-than", "1h"]).trim(),
        "removed 0 jobs"
    );
    assert_eq!(d.ctl_ok(&["clean", "--older-than", "0s"]).trim(), "removed 1 job");
    assert!(ids_listed(&d).is_empty());
    assert!(d.log().contains("removed 2 ended job(s)"), "{}", d.log());
}

#[test]
fn ids_are_never_reused_after_cleaning_the_newest_job() {
    let mut d = Daemon::start();
    let a = d.submit(&[], &["true"]);
    let b = d.submit(&[], &["true"]);
    d.wait_result(a, LONG);
    d.wait_result(b, LONG);
    assert_eq!(d.ctl_ok(&["clean", &b.to_string()]).trim(), "removed 1 job");
    assert_gone(&d, b);
    d.stop();
    restart(&mut d);
    let c = d.submit(&[], &["true"]);
    assert!(c > b, "job {c} after cleaning job {b} and a restart");
    d.wait_result(c, LONG);
    assert_eq!(d.ctl_ok(&["clean"]).trim(), "removed 2 jobs");
    d.kill9();
    restart(&mut d);
    let e = d.submit(&[], &["true"]);
    assert!(e > c, "job {e} after cleaning job {c} and a kill -9");
    assert!(d.ctl_json(&["stats"])["next_id"].as_u64().unwrap() > e);
}

#[test]
fn an_ended_job_a_queued_job_depends_on_is_kept() {
    let mut d = Daemon::start_with(TestConfig::new().class_slots(Class::CpuShort, 1));
    let dep = d.submit(&[], &["true"]);
    d.wait_result(dep, LONG);
    let blocker = d.submit(&[], &["sleep", "30"]);
    d.wait_state(blocker, "running", LONG);
    let child = d.submit(&["--after", &dep.to_string()], &["true"]);
    assert_eq!(state(&d, child), "queued");

    let out = d.ctl(&["clean", &dep.to_string()]);
    assert_eq!(code(&out), 1, "{}", shown(&out));
    let why = format!("job {child}, which has not ended, depends on job {dep}");
    assert!(shown(&out).contains(&why), "{}", shown(&out));
    let out = d.ctl(&["clean"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        shown(&out).contains(&format!("kept job {dep}: {why}")),
        "{}",
        shown(&out)
    );
    assert!(
        cyb_tests::text(&out.stdout).starts_with("removed 0 jobs"),
        "{}",
        shown(&out)
    );
    assert_eq!(state(&d, dep), "succeeded");

    // The dependent's dependencies are checked again after a restart, and still met.
    d.kill9();
    restart(&mut d);
    d.ctl_ok(&["cancel", &blocker.to_string()]);
    let res = d.wait_result(child, LONG);
    assert_eq!(res["state"], "succeeded", "{res}");

    // Now nothing that has not ended needs it.
    assert_eq!(d.ctl_ok(&["clean", &dep.to_string()]).trim(), "removed 1 job");
    assert_gone(&d, dep);
    // A retry checks the dependencies again: the cleaned one is missing, and it says so.
    d.ctl_ok(&["retry", &child.to_string()]);
    let rec = d.wait_state(child, "failed", LONG);
    let msg = rec["outcome"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("dependency job {dep} no longer exists")),
        "{rec}"
    );
}

#[test]
fn users_clean_their_own_jobs_and_admins_anyones() {
    let Some(user) = root_and_test_user() else { return };
    let d = Daemon::start();
    let submit_as = |who| {
        let out = ctl_as(&d, who, &["--json", "submit", "--", "true"]);
        assert!(out.status.success(), "{}", shown(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_u64().unwrap()
    };
    let mine = submit_as(user);
    let roots = d.submit(&[], &["true"]);
    d.wait_result(mine, LONG);
    d.wait_result(roots, LONG);

    let out = ctl_as(&d, user, &["clean", &roots.to_string()]);
    assert_eq!(code(&out), 77, "{}", shown(&out));
    assert!(
        shown(&out).contains("only its owner or an admin"),
        "{}",
        shown(&out)
    );
    for args in [&["clean", "--all-users"][..], &["clean", "--user", "root"]] {
        let out = ctl_as(&d, user, args);
        assert_eq!(code(&out), 77, "{args:?}: {}", shown(&out));
    }
    assert_eq!(state(&d, roots), "succeeded");
    // Filters take only the caller's own.
    let out = ctl_as(&d, user, &["clean"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(cyb_tests::text(&out.stdout).trim(), "removed 1 job");
    assert_gone(&d, mine);
    assert_eq!(state(&d, roots), "succeeded");

    // An admin (root) takes another user's jobs by name, and its own by default.
    let again = submit_as(user);
    d.wait_result(again, LONG);
    let r = d.ctl_json(&["clean", "--user", cyb_tests::TEST_USER]);
    assert_eq!(r["removed"], serde_json::json!([again]), "{r}");
    assert_eq!(d.ctl_ok(&["clean"]).trim(), "removed 1 job");
    assert_gone(&d, roots);
}

#[test]
fn retention_removes_the_oldest_beyond_max_jobs_and_those_past_max_age() {
    let d = Daemon::start_with(
        TestConfig::new().toml("[retention]\nmax_jobs = 2\nmax_age = \"4s\"\ninterval = \"1s\"\n"),
    );
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = d.submit(&[], &["true"]);
        d.wait_result(id, LONG);
        ids.push(id);
    }
    let newest: BTreeSet<u64> = ids[3..].iter().copied().collect();
    let kept = wait_until(Duration::from_secs(20), || ids_listed(&d) == newest);
    assert!(kept, "listed: {:?}; log:\n{}", ids_listed(&d), d.log());
    for &id in &ids[..3] {
        assert_gone(&d, id);
    }
    // And once they are older than max_age, the last two go too.
    let none = wait_until(Duration::from_secs(20), || ids_listed(&d).is_empty());
    assert!(none, "listed: {:?}; log:\n{}", ids_listed(&d), d.log());
    for &id in &ids[3..] {
        assert_gone(&d, id);
    }
}

/// Drops `n` job files running `true` and waits until every job has ended; returns their
/// ids.
fn run_many(d: &Daemon, round: usize, n: usize) -> BTreeSet<u64> {
    let before = ids_listed(d);
    for i in 0..n {
        d.drop_job(&format!("r{round}-{i}.json"), r#"{"command":["true"]}"#);
    }
    let mut new = BTreeSet::new();
    let done = wait_until(Duration::from_secs(120), || {
        let jobs = d.ctl_json(&["ls"]);
        let jobs = jobs.as_array().unwrap();
        new = jobs
            .iter()
            .filter_map(|j| j["id"].as_u64())
            .filter(|id| !before.contains(id))
            .collect();
        new.len() == n
            && jobs
                .iter()
                .all(|j| matches!(j["state"].as_str(), Some("succeeded")))
    });
    assert!(done, "{} of {n} jobs ended; log:\n{}", new.len(), d.log());
    new
}

/// Every id up to `max`: whole (record and run directory, listed) or gone (neither, not
/// listed), and no tombstone left.
fn check_whole_or_gone(d: &Daemon, max: u64) -> (usize, usize) {
    let listed = ids_listed(d);
    let (mut whole, mut gone) = (0, 0);
    for id in 1..=max {
        let record = d.jobs_dir().join(format!("{id}.json")).exists();
        let run = d.run_dir(id).is_dir();
        assert_eq!(
            record,
            run,
            "job {id}: record {record}, run directory {run}; log:\n{}",
            d.log()
        );
        assert_eq!(
            listed.contains(&id),
            record,
            "job {id} listed: {}",
            listed.contains(&id)
        );
        if record {
            assert!(
                d.run_dir(id).join("result.json").exists(),
                "job {id} has no result.json"
            );
            whole += 1;
        } else {
            gone += 1;
        }
    }
    let logs = d.run_dir(1).parent().unwrap().to_path_buf();
    let graves: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".removing"))
        .collect();
    assert!(graves.is_empty(), "tombstones left: {graves:?}");
    (whole, gone)
}

/// What a kill -9 left of the jobs `ids` (before the restart finishes anything): no run
/// directory without its record, no record without its run directory or its tombstone.
/// Returns (tombstones with their record, tombstones).
fn on_disk_after_kill(d: &Daemon, ids: &BTreeSet<u64>) -> (usize, usize) {
    let logs = d.run_dir(1).parent().unwrap().to_path_buf();
    let (mut with_record, mut graves) = (0, 0);
    for &id in ids {
        let record = d.jobs_dir().join(format!("{id}.json")).exists();
        let run = d.run_dir(id).is_dir();
        let grave = logs.join(format!("run_{id}.removing")).is_dir();
        assert!(!(run && grave), "job {id}: both a run directory and a tombstone");
        assert!(!run || record, "job {id}: a run directory without its record");
        assert!(
            !record || run || grave,
            "job {id}: a record without its run directory"
        );
        graves += usize::from(grave);
        with_record += usize::from(grave && record);
    }
    (with_record, graves)
}

#[test]
fn kill_9_during_a_clean_leaves_every_job_whole_or_gone() {
    let mut d = Daemon::start_with(TestConfig::new().class_slots(Class::CpuShort, 8));
    const N: usize = 200;
    const ROUNDS: usize = 8;
    let mut rng = Rng::new();
    let mut max_id = 0;
    // A clean that runs to its end, to know how long one takes.
    let first = run_many(&d, 0, N);
    max_id = max_id.max(*first.last().unwrap());
    let t0 = Instant::now();
    assert_eq!(d.ctl_ok(&["clean"]).trim(), format!("removed {N} jobs"));
    let took = t0.elapsed();
    check_whole_or_gone(&d, max_id);
    let mut partial = 0;
    for round in 1..=ROUNDS {
        let ids = run_many(&d, round, N);
        max_id = max_id.max(*ids.last().unwrap());
        let mut clean = d.ctl_cmd(&["clean"]);
        clean.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child: std::process::Child = clean.spawn().expect("run cybctl clean");
        // Odd rounds: any instant of a whole clean; even rounds: once the removal has begun
        // (a tombstone is there), within the next few milliseconds.
        let t0 = Instant::now();
        if round % 2 == 0 {
            let logs = d.run_dir(1).parent().unwrap().to_path_buf();
            let begun = || {
                std::fs::read_dir(&logs)
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.file_name().to_string_lossy().ends_with(".removing"))
                    })
                    .unwrap_or(false)
            };
            while !begun() && t0.elapsed() < LONG && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(took.as_micros() as u64 + 1)));
        }
        let delay = t0.elapsed();
        d.kill9();
        let _ = child.wait();
        let (being_removed, in_tombstones) = on_disk_after_kill(&d, &ids);
        if in_tombstones > 0 {
            partial += 1;
        }
        restart(&mut d);
        let (whole, gone) = check_whole_or_gone(&d, max_id);
        let left = ids
            .iter()
            .filter(|id| d.jobs_dir().join(format!("{id}.json")).exists())
            .count();
        eprintln!(
            "round {round}: killed after {delay:?} of {took:?} with {in_tombstones} run directories \
             renamed ({being_removed} of them with their record); after the restart {left} of {N} \
             left ({whole} whole, {gone} gone in all)"
        );
        // What is left can be cleaned, whole.
        let out = d.ctl_ok(&["clean"]);
        assert_eq!(
            out.trim(),
            format!("removed {left} job{}", if left == 1 { "" } else { "s" })
        );
    }
    eprintln!("{partial} of {ROUNDS} rounds were killed mid-clean (tombstones on disk)");
    let next = d.submit(&[], &["true"]);
    assert!(next > max_id, "job {next} reuses an id (highest seen {max_id})");
}
