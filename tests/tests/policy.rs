//! What the scheduler decides, end to end but with the daemon run inside the test process
//! (`Daemon::in_process`, [`cybd::run_until`]): queue order (priority, then submission order
//! within a priority, `priority` moving a queued job), per-class slots, dependencies
//! (gating starts, failures propagating), retry policies and `cybctl retry`, hold/release
//! and pause/resume. Jobs still run under real supervisors forked by a real `cybd launcher`,
//! and every call goes through the real `cybctl`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cyb_proto::Class;
use cyb_tests::{Daemon, TestConfig, epoch, shown, wait_until};
use serde_json::json;

/// Generous limit for things that take well under a second on an idle host.
const LONG: Duration = Duration::from_secs(30);

/// One cpu_short slot: a running job keeps every later one queued.
fn one_slot() -> TestConfig {
    TestConfig::new().class_slots(Class::CpuShort, 1)
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("cyb-policy-").tempdir().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----- retry

#[test]
fn retry_policy_and_manual_retry() {
    let d = Daemon::in_process(TestConfig::new());
    let tmp = tempdir();
    let dir = tmp.path();
    let counting = |name: &str, then: &str| {
        format!(
            "n=$(cat {name} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {name}; echo attempt $CYB_ATTEMPT; {then}"
        )
    };
    // Fails twice, then succeeds.
    let flaky = d.submit_file(
        dir,
        "flaky.json",
        &json!({
            "name": "flaky", "cwd": dir, "shell": counting("flaky.count", "[ $n -ge 3 ]"),
            "retry": {"max_attempts": 3, "backoff": "200ms"}
        }),
    );
    // Always fails.
    let always = d.submit_file(
        dir,
        "always.json",
        &json!({
            "name": "always", "cwd": dir, "shell": counting("always.count", "exit 1"),
            "retry": {"max_attempts": 2, "backoff": "200ms"}
        }),
    );
    // Fails with a code the policy does not retry.
    let picky = d.submit_file(
        dir,
        "picky.json",
        &json!({
            "name": "picky", "cwd": dir, "shell": counting("picky.count", "exit 4"),
            "retry": {"max_attempts": 3, "backoff": "200ms", "on_exit_codes": [3]}
        }),
    );

    let r = d.wait_result(flaky, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    assert_eq!(file(dir, "flaky.count").trim(), "3");
    // Backoff 200 ms, then 400 ms, between the attempts.
    let span = epoch(&r["finished_at"]) - epoch(&r["submitted_at"]);
    assert!(
        span >= 0.6,
        "three attempts with 200 ms + 400 ms backoff took {span:.3} s"
    );
    let log = file(&d.run_dir(flaky), "stdout.log");
    assert!(log.contains("attempt 1") && log.contains("attempt 3"), "{log}");

    let r = d.wait_result(always, LONG);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(r["exit_code"], 1, "{r}");
    assert_eq!(file(dir, "always.count").trim(), "2");

    let r = d.wait_result(picky, LONG);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["attempts"], 1, "exit 4 is not in on_exit_codes [3]: {r}");
    assert_eq!(r["exit_code"], 4, "{r}");
    assert_eq!(file(dir, "picky.count").trim(), "1");

    // cybctl retry runs an ended job again.
    let ids = always.to_string();
    let after = d.ctl_json(&["retry", &ids]);
    assert!(
        ["queued", "running"].contains(&after["state"].as_str().unwrap_or("")),
        "{after}"
    );
    let out = d.ctl(&["wait", &ids]);
    assert_eq!(code(&out), 1, "{}", shown(&out));
    assert_eq!(
        file(dir, "always.count").trim(),
        "3",
        "the retried job did not run again"
    );
    let r = d.wait_result(always, LONG);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    // Only ended jobs can be retried.
    let running = d.submit(&[], &["sleep", "60"]);
    d.wait_state(running, "running", LONG);
    let out = d.ctl(&["retry", &running.to_string()]);
    assert_eq!(code(&out), 1, "{}", shown(&out));
    d.ctl_ok(&["cancel", &running.to_string()]);
}

// ----- dependencies

#[test]
fn dependencies_gate_starts_and_failures_propagate() {
    let d = Daemon::in_process(TestConfig::new());
    let a = d.submit(&[], &["sleep", "1"]);
    let b = d.submit(&["--after", &a.to_string()], &["sh", "-c", "echo b-ran"]);
    d.wait_state(a, "running", LONG);
    assert_eq!(d.job_state(b), "queued", "B must wait for A");
    let rb = d.wait_result(b, LONG);
    let ra = d.wait_result(a, LONG);
    assert_eq!(ra["state"], "succeeded", "{ra}");
    assert_eq!(rb["state"], "succeeded", "{rb}");
    assert!(
        epoch(&rb["started_at"]) >= epoch(&ra["finished_at"]),
        "B started at {} before A finished at {}",
        rb["started_at"],
        ra["finished_at"]
    );

    // A failing dependency fails its dependents without running them.
    let f = d.submit(&[], &["sh", "-c", "sleep 1; exit 2"]);
    let fs = f.to_string();
    let c = d.submit(&["--after", &fs], &["sh", "-c", "echo c-ran"]);
    let rc = d.wait_result(c, LONG);
    assert_eq!(rc["state"], "failed", "{rc}");
    assert_eq!(rc["reason"], "dependency_failed", "{rc}");
    assert!(rc.get("started_at").is_none(), "{rc}");
    assert!(
        rc["message"].as_str().unwrap_or("").contains(&fs),
        "names job {f}: {rc}"
    );
    assert_eq!(d.wait_result(f, LONG)["state"], "failed");
    // ... also when it had already failed at submission, and down a chain.
    let e = d.submit(
        &["--after", &fs, "--after", &a.to_string()],
        &["sh", "-c", "echo e-ran"],
    );
    let g = d.submit(&["--after", &c.to_string()], &["sh", "-c", "echo g-ran"]);
    for id in [e, g] {
        let r = d.wait_result(id, LONG);
        assert_eq!(r["state"], "failed", "{r}");
        assert_eq!(r["reason"], "dependency_failed", "{r}");
    }
    for id in [c, e, g] {
        assert!(!d.run_dir(id).join("stdout.log").exists(), "job {id} ran");
    }
    // An unknown dependency is an invalid spec.
    let out = d.ctl(&["submit", "--after", "999", "--", "true"]);
    assert_eq!(code(&out), 65, "{}", shown(&out));
}

// ----- per-class slots

/// Each class runs at most its `slots` jobs at once, and a full class holds back no other.
#[test]
fn each_class_runs_at_most_its_slots() {
    let d = Daemon::in_process(
        TestConfig::new()
            .class_slots(Class::CpuShort, 2)
            .class_slots(Class::CpuLong, 1),
    );
    let tmp = tempdir();
    let dir = s(tmp.path());
    let wait_go = ["sh", "-c", "while [ ! -e go ]; do sleep 0.05; done"];
    let short: Vec<u64> = (0..4)
        .map(|_| d.submit(&["--cwd", dir, "--class", "cpu_short"], &wait_go))
        .collect();
    let long: Vec<u64> = (0..2)
        .map(|_| d.submit(&["--cwd", dir, "--class", "cpu_long"], &wait_go))
        .collect();
    // The first ones in each class start; the rest wait for a slot of their own class.
    for &id in &short[..2] {
        d.wait_state(id, "running", LONG);
    }
    d.wait_state(long[0], "running", LONG);
    std::thread::sleep(Duration::from_millis(500));
    for &id in short[2..].iter().chain(&long[1..]) {
        assert_eq!(d.job_state(id), "queued", "job {id}: its class's slots are taken");
    }
    let stats = d.ctl_json(&["stats"]);
    let class = |name: &str| {
        stats["classes"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["class"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no class {name} in {stats}"))
    };
    let (cs, cl) = (class("cpu_short"), class("cpu_long"));
    assert_eq!(
        (&cs["slots"], &cs["running"], &cs["queued"]),
        (&json!(2), &json!(2), &json!(2)),
        "{cs}"
    );
    assert_eq!(
        (&cl["slots"], &cl["running"], &cl["queued"]),
        (&json!(1), &json!(1), &json!(1)),
        "{cl}"
    );

    // Ending one cpu_short job lets exactly one more of that class start.
    d.ctl_ok(&["cancel", &short[0].to_string()]);
    d.wait_result(short[0], LONG);
    assert!(
        wait_until(LONG, || d.job_state(short[2]) == "running"),
        "the next cpu_short job did not take the freed slot"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.job_state(short[3]), "queued");
    assert_eq!(
        d.job_state(long[1]),
        "queued",
        "a cpu_short slot is not a cpu_long one"
    );

    std::fs::write(tmp.path().join("go"), "").unwrap();
    for &id in short[1..].iter().chain(&long) {
        assert_eq!(d.wait_result(id, LONG)["state"], "succeeded", "job {id}");
    }
}

// ----- queue order

#[test]
fn queue_order_is_priority_then_submission_order() {
    let d = Daemon::in_process(one_slot());
    let tmp = tempdir();
    let dir = s(tmp.path());
    let blocker = d.submit(
        &["--cwd", dir],
        &["sh", "-c", "while [ ! -e go ]; do sleep 0.05; done"],
    );
    d.wait_state(blocker, "running", LONG);
    let job = |name: &str, prio: &str| {
        d.submit(
            &["--cwd", dir, "--name", name, "--priority", prio],
            &["sh", "-c", &format!("echo {name} >> order.log")],
        )
    };
    let p0_first = job("p0-first", "0");
    let p5 = job("p5", "5");
    let p0_second = job("p0-second", "0");
    let p10 = job("p10", "10");
    let raised = job("raised", "0");
    let held = job("held", "50");

    // Hold and release one: it keeps its place among the 0s.
    let h = d.ctl_json(&["hold", &p0_first.to_string()]);
    assert_eq!(h["state"], "held", "{h}");
    let r = d.ctl_json(&["release", &p0_first.to_string()]);
    assert_eq!(r["state"], "queued", "{r}");
    // One stays held.
    d.ctl_ok(&["hold", &held.to_string()]);
    // `priority` moves a queued job.
    let p = d.ctl_json(&["priority", &raised.to_string(), "20"]);
    assert_eq!(p["priority"], 20, "{p}");
    for id in [p0_first, p5, p0_second, p10, raised] {
        assert_eq!(d.job_state(id), "queued", "job {id}");
    }

    std::fs::write(tmp.path().join("go"), "").unwrap();
    for id in [p0_first, p5, p0_second, p10, raised] {
        assert_eq!(d.wait_result(id, LONG)["state"], "succeeded", "job {id}");
    }
    let order = file(tmp.path(), "order.log");
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        ["raised", "p10", "p5", "p0-first", "p0-second"],
        "start order"
    );
    // Start times agree.
    let starts: Vec<f64> = [raised, p10, p5, p0_first, p0_second]
        .iter()
        .map(|id| epoch(&d.wait_result(*id, LONG)["started_at"]))
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]),
        "started_at out of order: {starts:?}"
    );
    assert_eq!(d.job_state(held), "held");
    assert!(!d.run_dir(held).join("stdout.log").exists());
}

#[test]
fn hold_release_pause_resume() {
    let d = Daemon::in_process(TestConfig::new());
    d.ctl_ok(&["pause"]);
    assert_eq!(d.ctl_json(&["stats"])["paused"], true);
    let held = d.submit(&[], &["sh", "-c", "echo held-ran"]);
    let queued = d.submit(&[], &["sh", "-c", "echo queued-ran"]);
    let h = d.ctl_json(&["hold", &held.to_string()]);
    assert_eq!(h["state"], "held", "{h}");
    // Holding twice is harmless.
    d.ctl_ok(&["hold", &held.to_string()]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.job_state(queued), "queued", "paused: nothing starts");
    assert_eq!(d.job_state(held), "held");
    assert!(!d.run_dir(queued).join("stdout.log").exists());

    d.ctl_ok(&["resume"]);
    assert_eq!(d.ctl_json(&["stats"])["paused"], false);
    let r = d.wait_result(queued, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(file(&d.run_dir(queued), "stdout.log"), "queued-ran\n");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.job_state(held), "held", "resume does not release a held job");

    let out = d.ctl(&["release", &queued.to_string()]);
    assert_eq!(
        code(&out),
        1,
        "release of a job that is not held: {}",
        shown(&out)
    );
    let out = d.ctl(&["hold", &queued.to_string()]);
    assert_eq!(code(&out), 1, "hold of an ended job: {}", shown(&out));

    let r = d.ctl_json(&["release", &held.to_string()]);
    assert_eq!(r["state"], "queued", "{r}");
    let r = d.wait_result(held, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(file(&d.run_dir(held), "stdout.log"), "held-ran\n");
}
