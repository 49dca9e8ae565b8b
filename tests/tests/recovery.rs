//! Crash recovery, end to end: real cybd processes that are stopped, killed with SIGKILL at
//! various instants and restarted on the same spool, with jobs whose supervisors live on.
//!
//! What is proved here:
//! - a running job survives a daemon stop and a kill -9, is re-adopted, and its real exit
//!   status is recorded;
//! - kill -9 with queued and running jobs loses nothing and runs nothing twice;
//! - the same holds at many random instants, for spool files and RPC submissions alike, and
//!   ids are never reused;
//! - an unreadable record is quarantined and reported, and its id is not reused;
//! - a job whose supervisor vanished ends `failed`/`lost`, or is retried under a policy;
//! - the queue on disk is plain JSON a person (or jq) can read;
//! - and, throughout, a daemon started right after a kill -9 comes up (see `restart`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cyb_proto::Class;
use cyb_tests::{Daemon, Rng, TestConfig, alive, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// A temporary directory every user may write (jobs write their traces there).
fn shared_dir() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("cyb-recovery-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    t
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process (a zombie waiting for a reaper does not count).
fn running(pid: i32) -> bool {
    if !alive(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

fn state_of(d: &Daemon, id: u64) -> String {
    d.ctl_json(&["show", &id.to_string()])["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Starts the daemon again at once (as a shell loop or a service manager would after a
/// crash or a stop) and waits until it serves, failing if it exits instead.
///
/// The harness's readiness probe only connects to the socket. A cybd killed while it was
/// forking a supervisor can leave its listening socket accepting connections for some
/// milliseconds after it has been reaped, with no process holding it; the probe can take
/// that socket for the new daemon, so this waits for a real answer as long as the new daemon
/// lives. The new daemon must come up: one that exits because it takes the dead socket for
/// another live cybd ("another cybd is already listening") fails here.
fn restart(d: &mut Daemon) {
    d.restart();
    let pid = d.pid().expect("daemon started") as i32;
    let serving = wait_until(LONG, || !running(pid) || d.ctl(&["stats"]).status.success());
    assert!(
        serving && running(pid),
        "the restarted daemon did not come up (alive: {}); log (tail):\n{}",
        running(pid),
        tail(&d.log(), 20)
    );
}

/// Waits for `result.json` of job `id`; on a timeout, shows what the daemon's threads are
/// doing and the end of its log.
fn wait_result(d: &Daemon, id: u64) -> Value {
    let mut found = None;
    wait_until(LONG, || {
        found = d.result(id);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "job {id} has no result.json after {LONG:?}; record: {}\ndaemon threads:\n{}\nlog (tail):\n{}",
            std::fs::read_to_string(d.jobs_dir().join(format!("{id}.json"))).unwrap_or_default(),
            d.pid().map(|p| threads(p as i32)).unwrap_or_default(),
            tail(&d.log(), 40)
        )
    })
}

/// Each thread of process `pid`: name, state, and where it waits in the kernel.
fn threads(pid: i32) -> String {
    let mut out = String::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    for t in rd.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r.trim_start().get(..1).unwrap_or(""));
        let stack: Vec<String> = read("stack").lines().take(6).map(str::to_string).collect();
        out.push_str(&format!(
            "  {} {} {} wchan={} {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan"),
            stack.join(" | ")
        ));
    }
    out
}

/// `cybctl --json stats`; a failure shows the daemon's log.
fn stats(d: &Daemon) -> Value {
    let out = d.ctl(&["--json", "stats"]);
    assert!(
        out.status.success(),
        "cybctl stats failed ({:?}): {}{}\ndaemon log (tail):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 60)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tail(text: &str, n: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Waits for a child process (cybctl) for at most `limit`; kills it if it hangs.
fn finish_child(mut c: Child, limit: Duration) -> (Option<i32>, String, String) {
    let ok = wait_until(limit, || !matches!(c.try_wait(), Ok(None)));
    if !ok {
        let _ = c.kill();
        let _ = c.wait();
        panic!("cybctl did not finish within {limit:?}");
    }
    let status = c.wait().unwrap();
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = c.stdout.take() {
        s.read_to_string(&mut out).unwrap();
    }
    if let Some(mut s) = c.stderr.take() {
        s.read_to_string(&mut err).unwrap();
    }
    (status.code(), out, err)
}

/// Every `run_<id>` directory under the logs.
fn run_dir_ids(d: &Daemon) -> Vec<u64> {
    std::fs::read_dir(d.path().join("logs"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("run_")?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

// ----- 1. a running job survives a daemon restart and is re-adopted

fn job_survives_restart(hard: bool) {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let runs = shared.path().join("runs");
    let script = format!(
        "echo $$ > {}; echo run >> {}; sleep 4; exit 5",
        pidfile.display(),
        runs.display()
    );
    let id = d.submit(&[], &["sh", "-c", &script]);
    assert!(
        wait_until(LONG, || read_pid(&pidfile).is_some()),
        "job {id} never started; log:\n{}",
        d.log()
    );
    let pid = read_pid(&pidfile).unwrap();
    assert_eq!(state_of(&d, id), "running");
    let sup_file = d.supervisor_file(id);
    let sup_before: Value = serde_json::from_str(&std::fs::read_to_string(&sup_file).unwrap()).unwrap();

    if hard {
        d.kill9();
    } else {
        d.stop();
    }
    assert!(
        running(pid),
        "the job's process {pid} died with the daemon ({})",
        if hard { "kill -9" } else { "SIGTERM" }
    );
    restart(&mut d);
    assert!(
        running(pid),
        "the job's process {pid} died when the daemon restarted"
    );
    assert_eq!(
        state_of(&d, id),
        "running",
        "the restarted daemon does not show job {id} as running; log:\n{}",
        d.log()
    );
    // The same supervisor, not a second one.
    let sup_after: Value = serde_json::from_str(&std::fs::read_to_string(&sup_file).unwrap()).unwrap();
    assert_eq!(
        sup_before, sup_after,
        "the job was started again instead of adopted"
    );

    // `wait` across the adoption returns the job's own exit code.
    let waiter = d
        .ctl_cmd(&["wait", &id.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let result = wait_result(&d, id);
    assert_eq!(result["state"], "failed", "{result}");
    assert_eq!(result["reason"], "exit_code", "{result}");
    assert_eq!(result["exit_code"], 5, "{result}");
    assert_eq!(result["attempts"], 1, "{result}");
    let rec = d.record(id);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["outcome"]["exit_code"], 5, "{rec}");
    let (code, out, err) = finish_child(waiter, LONG);
    assert_eq!(code, Some(5), "cybctl wait: {out}{err}");
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(out.status.code(), Some(5), "cybctl wait after the end");
    assert_eq!(lines(&runs), ["run"], "the job ran more or less than once");
}

#[test]
fn running_job_survives_sigterm_restart_and_keeps_its_exit_code() {
    job_survives_restart(false);
}

#[test]
fn running_job_survives_kill9_restart_and_keeps_its_exit_code() {
    job_survives_restart(true);
}

// ----- 2. kill -9 with queued and running jobs: nothing lost, nothing doubled

#[test]
fn kill9_with_queued_and_running_jobs_loses_and_doubles_nothing() {
    let mut d = Daemon::start_with(TestConfig::new().class_slots(Class::CpuShort, 2));
    let shared = shared_dir();
    let log = shared.path().join("ran.log");
    let script = format!("echo $CYB_JOB_ID >> {}; sleep 0.2", log.display());
    let ids: Vec<u64> = (0..20).map(|_| d.submit(&[], &["sh", "-c", &script])).collect();
    assert!(
        wait_until(LONG, || lines(&log).len() >= 3),
        "jobs did not start; log:\n{}",
        d.log()
    );
    d.kill9();
    let started_before = lines(&log).len();
    let ended_before = ids.iter().filter(|id| d.result(**id).is_some()).count();
    assert!(
        ended_before < 20,
        "every job ended before the kill; the test proves nothing"
    );
    eprintln!("at the kill: {started_before} jobs had started, {ended_before} had ended");
    restart(&mut d);
    for id in &ids {
        let r = wait_result(&d, *id);
        assert_eq!(r["state"], "succeeded", "job {id}: {r}");
        assert_eq!(r["attempts"], 1, "job {id} was started more than once: {r}");
    }
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for l in lines(&log) {
        *seen.entry(l.trim().parse().unwrap()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            seen.get(id).copied(),
            Some(1),
            "job {id} ran {:?} times (started before the kill: {started_before}); log:\n{}",
            seen.get(id),
            d.log()
        );
    }
    assert_eq!(seen.len(), 20, "unknown ids ran: {seen:?}");
    let recs = d.records();
    assert_eq!(recs.len(), 20, "{recs:?}");
    let distinct: BTreeSet<u64> = recs.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(distinct, ids.iter().copied().collect::<BTreeSet<_>>());
    assert!(recs.iter().all(|r| r["state"] == "succeeded"));
}

// ----- 3. kill -9 at many instants

#[test]
fn kill9_at_many_instants_loses_nothing_runs_nothing_twice_and_never_reuses_ids() {
    const ROUNDS: usize = 25;
    const FILES: usize = 4;
    const RPCS: usize = 3;
    let mut rng = Rng::new();
    let mut d = Daemon::start_with(TestConfig::new().class_slots(Class::CpuShort, 4));
    let shared = shared_dir();
    let log = shared.path().join("ran.log");
    let script = |name: &str| format!("echo \"$CYB_JOB_ID {name}\" >> {}; sleep 0.05", log.display());

    let mut spool_names: Vec<String> = Vec::new();
    let mut rpc_names: Vec<String> = Vec::new();
    // Ids printed by `cybctl submit`, with the job name they were for.
    let mut told: Vec<(u64, String)> = Vec::new();
    // The highest id known to exist (on disk or told) after the last restart.
    let mut max_known = 0u64;
    // How many kills found a job running, or a spool file not yet taken.
    let (mut hit_running, mut hit_incoming) = (0, 0);
    let started = Instant::now();
    for round in 0..ROUNDS {
        for i in 0..FILES {
            let name = format!("r{round}f{i}");
            let body = json!({ "shell": script(&name) }).to_string();
            d.drop_job(&format!("{name}.json"), &body);
            spool_names.push(name);
        }
        let kids: Vec<(String, Child)> = (0..RPCS)
            .map(|i| {
                let name = format!("r{round}c{i}");
                let child = d
                    .ctl_cmd(&[
                        "--json",
                        "submit",
                        "--name",
                        &name,
                        "--",
                        "sh",
                        "-c",
                        &script(&name),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                rpc_names.push(name.clone());
                (name, child)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.below(51)));
        d.kill9();
        if d.records().iter().any(|r| r["state"] == "running") {
            hit_running += 1;
        }
        if std::fs::read_dir(d.incoming())
            .unwrap()
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
        {
            hit_incoming += 1;
        }
        let mut told_now = Vec::new();
        for (name, child) in kids {
            let (code, out, err) = finish_child(child, Duration::from_secs(30));
            if code == Some(0) {
                let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
                told_now.push((v["id"].as_u64().unwrap(), name));
            } else {
                // Refused for want of a daemon: never told an id, so nothing to hold it to.
                assert!(
                    out.trim().is_empty(),
                    "{name}: failed submit printed {out} ({err})"
                );
            }
        }
        for (id, name) in &told_now {
            assert!(
                *id > max_known,
                "round {round}: id {id} ({name}) told to a client is not above {max_known}, \
                 an id that already existed: ids are reused"
            );
        }
        told.extend(told_now);
        // Every id that exists now, read while no daemon runs (so none is being added).
        let existing = d
            .records()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .chain(run_dir_ids(&d))
            .chain(told.iter().map(|(id, _)| *id))
            .max()
            .unwrap_or(0);
        max_known = max_known.max(existing);
        restart(&mut d);
        let next = stats(&d)["next_id"].as_u64().unwrap();
        assert!(
            next > max_known,
            "round {round}: after the restart the next id is {next}, but id {max_known} exists"
        );
    }
    eprintln!(
        "{ROUNDS} rounds in {:?}; {hit_running} kills found jobs running, {hit_incoming} found spool files \
         not yet taken",
        started.elapsed()
    );

    // Let everything settle: incoming/ drained, every job ended.
    let settled = wait_until(LONG, || {
        let left = std::fs::read_dir(d.incoming())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"));
        !left
            && d.records().iter().all(|r| {
                let id = r["id"].as_u64().unwrap();
                matches!(
                    r["state"].as_str(),
                    Some("succeeded" | "failed" | "timed_out" | "cancelled")
                ) && d.result(id).is_some()
            })
    });
    let recs = d.records();
    assert!(
        settled,
        "the queue did not settle; records: {recs:#?}\nlog:\n{}",
        d.log()
    );

    let mut by_name: HashMap<String, Vec<u64>> = HashMap::new();
    for r in &recs {
        by_name
            .entry(r["spec"]["name"].as_str().unwrap().to_string())
            .or_default()
            .push(r["id"].as_u64().unwrap());
    }
    // Every id told to a client exists, for the job it was told for.
    for (id, name) in &told {
        assert_eq!(
            by_name.get(name),
            Some(&vec![*id]),
            "job {id} ({name}) was told to a client but the store holds {:?}",
            by_name.get(name)
        );
    }
    let told_ids: BTreeSet<u64> = told.iter().map(|(id, _)| *id).collect();
    assert_eq!(told_ids.len(), told.len(), "an id was told twice: {told:?}");
    // Every spool file became exactly one job.
    for name in &spool_names {
        assert_eq!(
            by_name.get(name).map(Vec::len),
            Some(1),
            "spool file {name}.json became {:?} jobs; log:\n{}",
            by_name.get(name),
            d.log()
        );
    }
    let rejected: Vec<_> = std::fs::read_dir(d.rejected()).unwrap().flatten().collect();
    assert!(rejected.is_empty(), "files were rejected: {rejected:?}");
    // An RPC submission that was never acknowledged became at most one job.
    for name in &rpc_names {
        let n = by_name.get(name).map_or(0, Vec::len);
        assert!(n <= 1, "submission {name} became {n} jobs");
    }
    // No job ran twice, each ran as itself, and every job ran.
    let mut ran: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for l in lines(&log) {
        let (id, name) = l.split_once(' ').unwrap();
        ran.entry(id.parse().unwrap()).or_default().push(name.to_string());
    }
    for r in &recs {
        let id = r["id"].as_u64().unwrap();
        let name = r["spec"]["name"].as_str().unwrap();
        assert_eq!(
            ran.get(&id),
            Some(&vec![name.to_string()]),
            "job {id} ({name}, {}) ran {:?}",
            r["state"],
            ran.get(&id)
        );
        assert_eq!(r["state"], "succeeded", "{r}");
        assert_eq!(r["attempts"], 1, "{r}");
    }
    assert_eq!(ran.len(), recs.len(), "ids ran that have no record: {ran:?}");
    eprintln!(
        "{} jobs, {} of {} RPC submissions acknowledged",
        recs.len(),
        told.len(),
        rpc_names.len()
    );
}

// ----- 4. an unreadable record is quarantined, reported, and its id not reused

#[test]
fn unreadable_record_is_quarantined_reported_and_its_id_not_reused() {
    let mut d = Daemon::start();
    let a = d.submit(&[], &["true"]);
    let b = d.submit(&[], &["true"]);
    wait_result(&d, a);
    wait_result(&d, b);
    d.stop();
    let garbage = format!("{{\"id\": {b}, \"state\": \u{0} torn").into_bytes();
    std::fs::write(d.jobs_dir().join(format!("{b}.json")), &garbage).unwrap();
    restart(&mut d);

    let moved = d.jobs_dir().join(format!("quarantine/{b}.json"));
    assert!(moved.exists(), "{} missing; log:\n{}", moved.display(), d.log());
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        garbage,
        "the bad record was altered"
    );
    assert!(!d.jobs_dir().join(format!("{b}.json")).exists());
    let st = stats(&d);
    let q = st["quarantined"].as_array().expect("stats has `quarantined`");
    assert!(
        q.iter().any(|e| e
            .as_str()
            .is_some_and(|s| s.contains(&format!("quarantine/{b}.json")))),
        "stats --json does not list the quarantined record: {st}"
    );
    let text = d.ctl_ok(&["stats"]);
    assert!(
        text.contains("quarantined") && text.contains(&format!("quarantine/{b}.json")),
        "cybctl stats does not report the quarantined record:\n{text}"
    );
    // The daemon works: the good record is served, new jobs run, ids move on.
    assert_eq!(state_of(&d, a), "succeeded");
    let c = d.submit(&[], &["true"]);
    assert!(c > b, "new job {c} reuses or precedes quarantined id {b}");
    assert_eq!(wait_result(&d, c)["state"], "succeeded");

    // The quarantined id alone still counts: the newest record quarantined, its run
    // directory cleaned away by an operator, and the daemon restarted twice (the second time
    // only quarantine/ remembers the id).
    d.stop();
    std::fs::write(d.jobs_dir().join(format!("{c}.json")), b"not json at all").unwrap();
    std::fs::remove_dir_all(d.run_dir(c)).unwrap();
    restart(&mut d);
    assert!(d.jobs_dir().join(format!("quarantine/{c}.json")).exists());
    let next = stats(&d)["next_id"].as_u64().unwrap();
    assert!(next > c, "next id {next} would reuse quarantined id {c}");
    d.stop();
    restart(&mut d);
    let next = stats(&d)["next_id"].as_u64().unwrap();
    assert!(
        next > c,
        "after a second restart the next id {next} would reuse quarantined id {c}"
    );
    let e = d.submit(&[], &["true"]);
    assert!(e > c, "new job {e} reuses or precedes quarantined id {c}");
    assert_eq!(wait_result(&d, e)["state"], "succeeded");
}

#[test]
fn run_directory_of_a_job_never_recorded_is_removed_and_its_id_not_reused() {
    let mut d = Daemon::start();
    let a = d.submit(&[], &["sh", "-c", "echo kept"]);
    wait_result(&d, a);
    d.kill9();
    // What a crash between a start's run directory and its record left behind (earlier
    // builds wrote both at once): job.json, empty logs and artifacts/, and no record.
    let orphan = a + 11;
    let dir = d.run_dir(orphan);
    std::fs::create_dir_all(dir.join("artifacts")).unwrap();
    std::fs::copy(d.run_dir(a).join("job.json"), dir.join("job.json")).unwrap();
    std::fs::write(dir.join("stdout.log"), b"").unwrap();
    std::fs::write(dir.join("stderr.log"), b"").unwrap();
    // A directory with output in it is somebody's data: it stays.
    let foreign = d.run_dir(a + 5);
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("stdout.log"), b"results\n").unwrap();
    restart(&mut d);
    assert!(
        !dir.exists(),
        "{} is still there; log:\n{}",
        dir.display(),
        d.log()
    );
    assert!(
        foreign.join("stdout.log").exists(),
        "a run directory with output was removed"
    );
    assert!(
        d.run_dir(a).join("result.json").exists(),
        "a recorded job's run directory was touched"
    );
    // The removed directory's id is never handed out again, restart after restart.
    let b = d.submit(&[], &["true"]);
    assert!(
        b > orphan,
        "job {b} reuses or precedes the removed run directory's id {orphan}"
    );
    wait_result(&d, b);
    std::fs::remove_dir_all(d.run_dir(b)).unwrap();
    std::fs::remove_file(d.jobs_dir().join(format!("{b}.json"))).unwrap();
    d.stop();
    restart(&mut d);
    let c = d.submit(&[], &["true"]);
    assert!(
        c > orphan,
        "after restarts job {c} reuses or precedes id {orphan}"
    );
}

// ----- 5. a job whose supervisor vanished

/// Waits for the job to run, kills -9 the daemon, then its supervisor and the job's process
/// group, so that nothing is left to say how the job ended; then restarts the daemon.
fn lose_supervisor(d: &mut Daemon, id: u64, pidfile: &Path) {
    kill_all(d, id, pidfile);
    restart(d);
}

/// [`lose_supervisor`] without the restart.
fn kill_all(d: &mut Daemon, id: u64, pidfile: &Path) {
    assert!(
        wait_until(LONG, || read_pid(pidfile).is_some()),
        "job {id} never started; log:\n{}",
        d.log()
    );
    let job_pid = read_pid(pidfile).unwrap();
    assert_eq!(state_of(d, id), "running");
    d.kill9();
    let sup: Value = serde_json::from_str(&std::fs::read_to_string(d.supervisor_file(id)).unwrap()).unwrap();
    let sup_pid = sup["pid"].as_i64().unwrap() as i32;
    assert!(running(sup_pid), "supervisor {sup_pid} is not running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(LONG, || !running(sup_pid)),
        "supervisor {sup_pid} survived SIGKILL"
    );
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(job_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(LONG, || !running(job_pid)),
        "job {job_pid} survived SIGKILL"
    );
    assert!(
        !d.exit_file(id).exists(),
        "the supervisor left an exit record after all"
    );
}

/// A reboot empties the runtime directory (a tmpfs): a job recorded as running then has no
/// supervisor file at all. Its record says it started under another boot, so it ends
/// `lost`; it is not queued again as if it had never started.
#[test]
fn job_running_when_the_host_restarted_ends_lost_and_is_not_run_again() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let runs = shared.path().join("runs");
    // Sleeps only the first time, so that a second run would end at once and succeed.
    let script = format!(
        "echo run >> {runs}; [ $(wc -l < {runs}) -gt 1 ] && exit 0; echo $$ > {pid}; sleep 60",
        runs = runs.display(),
        pid = pidfile.display()
    );
    let id = d.submit(&[], &["sh", "-c", &script]);
    kill_all(&mut d, id, &pidfile);
    // What the reboot does: a new boot id, and an empty runtime directory.
    let mut rec = d.record(id);
    assert_eq!(rec["state"], "running", "{rec}");
    assert!(rec["boot_id"].is_string(), "no boot id in {rec}");
    rec["boot_id"] = json!("an-earlier-boot");
    std::fs::write(d.jobs_dir().join(format!("{id}.json")), rec.to_string()).unwrap();
    std::fs::remove_dir_all(d.runtime_dir().join("supervisors")).unwrap();
    restart(&mut d);
    let r = wait_result(&d, id);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["reason"], "lost", "{r}");
    assert!(r["message"].as_str().unwrap().contains("host restarted"), "{r}");
    assert_eq!(lines(&runs), ["run"], "the job ran again");
}

/// The files through which the daemon and a supervisor know of each other live in
/// `<runtime>/supervisors/` while the job runs, are gone once its end is recorded, and are
/// not in the run directory; stale ones (a daemon that died before removing them) are swept
/// at startup.
#[test]
fn supervisor_files_live_in_the_runtime_dir_only_while_the_job_runs() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let id = d.submit(
        &[],
        &["sh", "-c", &format!("echo $$ > {}; sleep 1", pidfile.display())],
    );
    assert!(wait_until(LONG, || read_pid(&pidfile).is_some()));
    let sup: Value = serde_json::from_str(&std::fs::read_to_string(d.supervisor_file(id)).unwrap()).unwrap();
    assert!(sup["pid"].as_i64().unwrap() > 1, "{sup}");
    let r = wait_result(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert!(
        wait_until(LONG, || !d.supervisor_file(id).exists()
            && !d.exit_file(id).exists()),
        "supervisor files of job {id} left behind"
    );
    let mut names: Vec<String> = std::fs::read_dir(d.run_dir(id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["artifacts", "job.json", "result.json", "stderr.log", "stdout.log"]
    );
    // Left by a daemon that died after recording the end of job 9999 (no such job) and
    // of job `id`, before removing their files.
    let stale = [d.supervisor_file(9999), d.exit_file(9999), d.exit_file(id)];
    for f in &stale {
        std::fs::write(f, "{}").unwrap();
    }
    d.kill9();
    restart(&mut d);
    for f in &stale {
        assert!(!f.exists(), "{} was not swept", f.display());
    }
}

#[test]
fn job_whose_supervisor_vanished_ends_failed_lost() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let script = format!("echo $$ > {}; sleep 60", pidfile.display());
    let id = d.submit(&[], &["sh", "-c", &script]);
    lose_supervisor(&mut d, id, &pidfile);
    let r = wait_result(&d, id);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["reason"], "lost", "{r}");
    let rec = d.record(id);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["outcome"]["reason"], "lost", "{rec}");
    let code = d.ctl(&["wait", &id.to_string()]).status.code();
    assert!(
        code.is_some_and(|c| c != 0),
        "cybctl wait of a lost job returned {code:?}"
    );
    // The daemon goes on working.
    let next = d.submit(&[], &["true"]);
    assert_eq!(wait_result(&d, next)["state"], "succeeded");
}

#[test]
fn job_whose_supervisor_vanished_is_retried_under_a_retry_policy() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let attempts = shared.path().join("attempts");
    let spec = json!({
        "shell": format!(
            "echo $CYB_ATTEMPT >> {}; if [ \"$CYB_ATTEMPT\" = 1 ]; then echo $$ > {}; sleep 60; fi",
            attempts.display(),
            pidfile.display()
        ),
        "retry": { "max_attempts": 2, "backoff": "1s" },
    });
    let file = shared.path().join("job.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let v = d.ctl_json(&["submit", "-f", file.to_str().unwrap()]);
    let id = v["id"].as_u64().unwrap();
    lose_supervisor(&mut d, id, &pidfile);
    let r = wait_result(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}\nlog:\n{}", d.log());
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(lines(&attempts), ["1", "2"]);
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0));
}

// ----- 6. the queue on disk is readable by a person

#[test]
fn queue_on_disk_is_plain_json_with_id_and_state_and_survives_restart() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let done = d.submit(&[], &["true"]);
    let failed = d.submit(&[], &["sh", "-c", "exit 3"]);
    wait_result(&d, done);
    wait_result(&d, failed);
    let long = d.submit(
        &[],
        &["sh", "-c", &format!("echo $$ > {}; sleep 60", pidfile.display())],
    );
    assert!(wait_until(LONG, || read_pid(&pidfile).is_some()));
    d.ctl_ok(&["pause"]);
    let queued: Vec<u64> = (0..3).map(|_| d.submit(&[], &["true"])).collect();
    d.ctl_ok(&["hold", &queued[0].to_string()]);

    let read_queue = |d: &Daemon| -> BTreeMap<u64, String> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(d.jobs_dir()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p: PathBuf = e.path();
            // Subdirectories (quarantine/) and a write in flight (`.<id>.json.*.tmp`).
            if p.is_dir() || name.starts_with('.') {
                continue;
            }
            let stem = name
                .strip_suffix(".json")
                .unwrap_or_else(|| panic!("stray file {name} in jobs/"));
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON ({e}): {text}"));
            assert!(text.contains('\n'), "{name} is not laid out for people: {text}");
            let mode = e.metadata().unwrap().permissions().mode();
            assert!(mode & 0o004 != 0, "{name} has mode {mode:o}");
            let id = v["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name} has no numeric id: {v}"));
            assert_eq!(stem, id.to_string(), "{name} holds id {id}");
            let state = v["state"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no state: {v}"));
            out.insert(id, state.to_string());
        }
        out
    };
    let want: BTreeMap<u64, String> = [
        (done, "succeeded"),
        (failed, "failed"),
        (long, "running"),
        (queued[0], "held"),
        (queued[1], "queued"),
        (queued[2], "queued"),
    ]
    .into_iter()
    .map(|(id, s)| (id, s.to_string()))
    .collect();
    assert_eq!(read_queue(&d), want);

    // The queue survives a kill -9 as it was, and the daemon serves it from there.
    d.kill9();
    assert_eq!(read_queue(&d), want);
    restart(&mut d);
    let listed: BTreeMap<u64, String> = d
        .ctl_json(&["ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_u64().unwrap(),
                j["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed, want);
    assert_eq!(read_queue(&d), want);

    // Clean up the long job.
    d.ctl_ok(&["cancel", &long.to_string()]);
    assert_eq!(wait_result(&d, long)["state"], "cancelled");
}

/// A `running` record exactly as cybd 0.1 before the backend seam (commit 4734c81) wrote
/// it, captured from that build; `@...@` are filled in from the job at hand.
const RECORD_BEFORE_BACKENDS: &str = r#"{
  "id": @ID@,
  "spec": {
    "name": "sh -c upgrade",
    "class": "cpu_short",
    "command": ["sh", "-c", @SCRIPT@],
    "cwd": "/tmp"
  },
  "owner": {"uid": 0, "gid": 0, "user": "root"},
  "origin": {"via": "rpc", "pid": 21379},
  "submitted_at": "2026-12-07T10:52:01.733224089Z",
  "priority": 0,
  "attempts": 1,
  "first_started_at": "2026-12-07T10:52:01.73643361Z",
  "run_dir": @RUN_DIR@,
  "state": "running",
  "started_at": "2026-12-07T10:52:01.73643361Z",
  "attempt": 1,
  "boot_id": @BOOT_ID@
}"#;

/// The supervisor file of the same build (`<runtime>/supervisors/<id>.json`).
const SUPERVISOR_BEFORE_BACKENDS: &str = r#"{"attempt":1,"pid":@PID@,"start_ticks":@TICKS@}"#;

#[test]
fn a_job_running_under_the_build_before_backends_is_re_adopted_after_the_upgrade() {
    let mut d = Daemon::start();
    let shared = shared_dir();
    let pidfile = shared.path().join("pid");
    let runs = shared.path().join("runs");
    let script = format!(
        "echo $$ > {}; echo run >> {}; sleep 3; exit 6",
        pidfile.display(),
        runs.display()
    );
    let id = d.submit(&[], &["sh", "-c", &script]);
    assert!(
        wait_until(LONG, || read_pid(&pidfile).is_some()),
        "job {id} never started"
    );
    d.kill9();
    // What the old build left on disk: its record and its supervisor's file, in its format.
    let now = d.record(id);
    let sup: Value = serde_json::from_str(&std::fs::read_to_string(d.supervisor_file(id)).unwrap()).unwrap();
    let q = |v: &Value| serde_json::to_string(v).unwrap();
    let record = RECORD_BEFORE_BACKENDS
        .replace("@ID@", &id.to_string())
        .replace("@SCRIPT@", &q(&json!(script)))
        .replace("@RUN_DIR@", &q(&now["run_dir"]))
        .replace("@BOOT_ID@", &q(&now["boot_id"]));
    std::fs::write(d.jobs_dir().join(format!("{id}.json")), record).unwrap();
    let sup_text = SUPERVISOR_BEFORE_BACKENDS
        .replace("@PID@", &sup["pid"].to_string())
        .replace("@TICKS@", &sup["start_ticks"].to_string());
    std::fs::write(d.supervisor_file(id), sup_text).unwrap();

    restart(&mut d);
    assert_eq!(state_of(&d, id), "running", "log:\n{}", tail(&d.log(), 20));
    assert!(
        d.log().contains("re-adopted running job"),
        "log:\n{}",
        tail(&d.log(), 20)
    );
    let shown = d.ctl_json(&["show", &id.to_string()]);
    assert_eq!(shown["supervisor"]["pid"], sup["pid"], "{shown}");
    let result = wait_result(&d, id);
    assert_eq!(
        (result["state"].as_str(), result["exit_code"].as_i64()),
        (Some("failed"), Some(6)),
        "{result}"
    );
    assert_eq!(result["backend"], "native", "{result}");
    assert_eq!(lines(&runs), ["run"], "the job ran more or less than once");
}
