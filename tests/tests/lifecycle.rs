//! The life of a job, end to end: real `cybd` processes driven with the real `cybctl`.
//!
//! Exit codes and JSON output, following output, cancel (queued, running, TERM-ignoring, the
//! whole process group), timeouts, authorization over RPC, hostile socket clients, an
//! unreachable daemon, log truncation, artifacts and the launcher. Each test starts its own
//! daemon. What the scheduler decides (order, slots, dependencies, retries, hold and
//! release) is in `policy.rs`, on daemons run in-process.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cyb_proto::Class;
use cyb_tests::{Daemon, TestConfig, bin, gone, root_and_test_user, shown, text, wait_pids, wait_until};
use serde_json::{Value, json};

/// Generous limit for things that take well under a second on an idle host.
const LONG: Duration = Duration::from_secs(30);

/// One cpu_short slot: a running job keeps every later one queued.
fn one_slot() -> TestConfig {
    TestConfig::new().class_slots(Class::CpuShort, 1)
}

// ----- helpers

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Reads `r` line by line on a thread; each line arrives with the time it was read.
fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `child` to exit; kills it and fails after `timeout`.
fn finish(mut child: Child, what: &str, timeout: Duration) -> Output {
    let done = wait_until(timeout, || child.try_wait().unwrap().is_some());
    if !done {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(done, "{what} did not exit within {timeout:?}: {}", shown(&out));
    out
}

fn tempdir() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("cyb-lifecycle-")
        .tempdir()
        .unwrap();
    // Jobs of the test user write here too.
    std::fs::set_permissions(t.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    t
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----- exit codes and JSON

#[test]
fn exit_codes_and_json_output() {
    let d = Daemon::start();

    // submit --wait ends with the job's exit code.
    let out = d.ctl(&["submit", "--wait", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&out), 7, "{}", shown(&out));
    let first: u64 = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("submitted job ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `submitted job N` line: {}", shown(&out)));

    // submit --json prints {"id": N, "class": ..., "time_limit_secs": ...} and nothing else.
    let out = d.ctl(&["--json", "submit", "--", "sh", "-c", "echo hi; exit 5"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", shown(&out)));
    let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, ["class", "id", "time_limit_secs"], "{v}");
    let id = v["id"].as_u64().unwrap_or_else(|| panic!("no numeric id: {v}"));
    assert!(id > first, "ids grow: {first} then {id}");
    let ids = id.to_string();

    // wait returns the job's exit code.
    let out = d.ctl(&["wait", &ids]);
    assert_eq!(code(&out), 5, "{}", shown(&out));
    // A job that succeeds: 0, with --wait --json printing the ended record.
    let out = d.ctl(&["--json", "submit", "--wait", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let ok: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", shown(&out)));
    assert_eq!(ok["state"], "succeeded", "{ok}");

    // ls --json lists every job with its state and exit code.
    let ls = d.ctl_json(&["ls"]);
    let jobs = ls
        .as_array()
        .unwrap_or_else(|| panic!("ls --json is not an array: {ls}"));
    assert_eq!(jobs.len(), 3, "{ls}");
    let find = |n: u64| {
        jobs.iter()
            .find(|j| j["id"].as_u64() == Some(n))
            .unwrap_or_else(|| panic!("job {n} missing from {ls}"))
    };
    assert_eq!(find(first)["state"], "failed", "{ls}");
    assert_eq!(find(first)["exit_code"], 7, "{ls}");
    assert_eq!(find(id)["state"], "failed", "{ls}");
    assert_eq!(find(id)["exit_code"], 5, "{ls}");
    assert_eq!(find(id)["user"], "root", "{ls}");
    let ls_failed = d.ctl_json(&["ls", "--state", "succeeded"]);
    assert_eq!(ls_failed.as_array().map(Vec::len), Some(1), "{ls_failed}");

    // show --json is the job's record.
    let show = d.ctl_json(&["show", &ids]);
    assert_eq!(show["id"].as_u64(), Some(id), "{show}");
    assert_eq!(show["state"], "failed", "{show}");
    assert_eq!(show["outcome"]["exit_code"], 5, "{show}");
    assert_eq!(show["outcome"]["reason"], "exit_code", "{show}");
    assert_eq!(
        show["spec"]["command"],
        json!(["sh", "-c", "echo hi; exit 5"]),
        "{show}"
    );
    assert_eq!(show["attempts"], 1, "{show}");
    let result = d.wait_result(id, LONG);
    assert_eq!(result["exit_code"], 5, "{result}");
    assert_eq!(file(&d.run_dir(id), "stdout.log"), "hi\n");

    // Missing jobs: exit 3, saying which.
    for args in [
        ["show", "9999"],
        ["wait", "9999"],
        ["cancel", "9999"],
        ["logs", "9999"],
    ] {
        let out = d.ctl(&args);
        assert_eq!(code(&out), 3, "cybctl {args:?}: {}", shown(&out));
        assert!(
            text(&out.stderr).contains("9999"),
            "cybctl {args:?}: {}",
            shown(&out)
        );
    }
}

// ----- following output

#[test]
fn submit_follow_streams_output_while_the_job_runs() {
    let d = Daemon::start();
    let script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.4; done; echo to-stderr >&2; exit 3";
    let mut child = d
        .ctl_cmd(&["submit", "--follow", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stdout.take().unwrap());
    let out = finish(child, "submit --follow", LONG);
    let ended = Instant::now();
    let lines: Vec<(Instant, String)> = rx.try_iter().collect();
    let texts: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        texts,
        ["line1", "line2", "line3", "line4", "line5"],
        "{}",
        shown(&out)
    );
    assert_eq!(code(&out), 3, "the job's exit code: {}", shown(&out));
    assert!(text(&out.stderr).contains("to-stderr"), "{}", shown(&out));
    // Streamed, not printed at the end: the lines came over the job's ~2 s run.
    let spread = lines[4].0 - lines[0].0;
    assert!(
        spread >= Duration::from_millis(900),
        "line1..line5 arrived within {spread:?}: not streamed"
    );
    assert!(
        ended - lines[0].0 >= Duration::from_millis(900),
        "line1 came only {:?} before the end",
        ended - lines[0].0
    );
}

#[test]
fn logs_prints_stdout_or_stderr_and_follows_a_running_job() {
    let d = Daemon::start();
    let id = d.submit(&[], &["sh", "-c", "echo to-out; echo to-err >&2"]);
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert_eq!(d.ctl_ok(&["logs", &id.to_string()]), "to-out\n");
    assert_eq!(d.ctl_ok(&["logs", &id.to_string(), "--stderr"]), "to-err\n");
    let j = d.ctl_json(&["logs", &id.to_string()]);
    assert_eq!(j["stdout"], "to-out\n", "{j}");

    // logs -f on a running job: prints what is there, keeps printing until the job ends.
    let tmp = tempdir();
    let id = d.submit(
        &["--cwd", s(tmp.path())],
        &[
            "sh",
            "-c",
            "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second",
        ],
    );
    let ids = id.to_string();
    d.wait_state(id, "running", LONG);
    assert!(
        wait_until(LONG, || file(&d.run_dir(id), "stdout.log") == "first\n"),
        "the job did not write its first line"
    );
    let mut child = d
        .ctl_cmd(&["logs", "-f", &ids])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stdout.take().unwrap());
    let (_, l) = rx.recv_timeout(LONG).expect("logs -f printed nothing");
    assert_eq!(l, "first");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "logs -f exited while the job was still running"
    );
    std::fs::write(tmp.path().join("go"), "").unwrap();
    let out = finish(child, "logs -f", LONG);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let rest: Vec<String> = rx.try_iter().map(|(_, l)| l).collect();
    assert_eq!(rest, ["second"], "{}", shown(&out));
    let show = d.ctl_json(&["show", &ids]);
    assert_eq!(
        show["state"], "succeeded",
        "logs -f exited before the job ended: {show}"
    );
}

/// `submit --follow` (and `logs -f`) end when the job has ended; like `wait`, they must not
/// report an end that is not yet on disk: once they return, the record says so and
/// `result.json` is there.
#[test]
fn follow_returns_only_once_the_end_is_recorded() {
    let d = Daemon::start();
    let mut early = Vec::new();
    for _ in 0..20 {
        let out = d.ctl(&["submit", "--follow", "--", "sh", "-c", "sleep 0.1; echo x"]);
        assert_eq!(code(&out), 0, "{}", shown(&out));
        let id: u64 = text(&out.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("submitted job ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `submitted job N` line: {}", shown(&out)));
        let (rec, result) = (d.job_state(id), d.result(id).is_some());
        if rec != "succeeded" || !result {
            early.push(format!("job {id}: record {rec}, result.json present: {result}"));
        }
    }
    assert!(
        early.is_empty(),
        "submit --follow returned before the job's end was recorded: {early:#?}"
    );
}

// ----- cancel

#[test]
fn cancel_of_a_queued_job_means_it_never_starts() {
    let d = Daemon::start_with(one_slot());
    let blocker = d.submit(&[], &["sleep", "120"]);
    d.wait_state(blocker, "running", LONG);
    let q = d.submit(&[], &["sh", "-c", "echo ran"]);
    let qs = q.to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.job_state(q), "queued", "one slot, taken: the job must wait");

    let after = d.ctl_json(&["cancel", &qs]);
    assert_eq!(after["state"], "cancelled", "{after}");
    let r = d.wait_result(q, LONG);
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["reason"], "cancelled", "{r}");
    assert_eq!(r["cancelled_by"], "root", "{r}");
    assert!(
        r.get("started_at").is_none(),
        "a cancelled queued job never started: {r}"
    );
    assert_eq!(r["attempts"], 0, "{r}");

    // Free the slot: the cancelled job still does not run.
    d.ctl_ok(&["cancel", &blocker.to_string()]);
    assert_eq!(d.wait_result(blocker, LONG)["state"], "cancelled");
    let next = d.submit(&[], &["true"]);
    assert_eq!(d.wait_result(next, LONG)["state"], "succeeded");
    assert!(
        !d.run_dir(q).join("stdout.log").exists(),
        "the cancelled job ran: {:?}",
        file(&d.run_dir(q), "stdout.log")
    );
    let rec = d.record(q);
    assert_eq!(rec["state"], "cancelled", "{rec}");
    assert_eq!(rec["attempts"], 0, "{rec}");

    // Cancelling an ended job is an error, not a no-op that claims success.
    let out = d.ctl(&["cancel", &qs]);
    assert_eq!(code(&out), 1, "{}", shown(&out));
}

#[test]
fn cancel_of_a_running_job_kills_its_whole_process_group() {
    let d = Daemon::start();
    let tmp = tempdir();

    // A job with a child and a grandchild; it writes all their pids.
    let pids = tmp.path().join("pids");
    let script = "sleep 300 & echo $! >> pids; \
                  sh -c 'sleep 300 & echo $! >> pids; wait' & echo $! >> pids; \
                  echo $$ >> pids; wait";
    let id = d.submit(&["--cwd", s(tmp.path())], &["sh", "-c", script]);
    let all = wait_pids(&pids, 4);
    assert_eq!(d.job_state(id), "running");
    let t = Instant::now();
    d.ctl_ok(&["cancel", &id.to_string()]);
    let r = d.wait_result(id, LONG);
    let took = t.elapsed();
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["reason"], "cancelled", "{r}");
    assert_eq!(r["cancelled_by"], "root", "{r}");
    assert!(r.get("started_at").is_some(), "{r}");
    assert_eq!(
        r["signal"], 15,
        "a job that obeys TERM ends by TERM, not KILL: {r}"
    );
    assert!(
        took < Duration::from_secs(5),
        "a job that obeys TERM took {took:?} to stop"
    );
    assert!(
        wait_until(Duration::from_secs(5), || all.iter().all(|p| gone(*p))),
        "processes of the cancelled job survive: {:?}",
        all.iter().filter(|p| !gone(**p)).collect::<Vec<_>>()
    );

    // A job that ignores TERM (and so do its children) is KILLed after kill_grace (2 s).
    let pids = tmp.path().join("pids2");
    let script = "trap '' TERM; sleep 300 & echo $! >> pids2; echo $$ >> pids2; wait";
    let id = d.submit(&["--cwd", s(tmp.path())], &["sh", "-c", script]);
    let all = wait_pids(&pids, 2);
    let t = Instant::now();
    let out = d.ctl_json(&["cancel", &id.to_string()]);
    assert_eq!(out["id"].as_u64(), Some(id), "{out}");
    let r = d.wait_result(id, LONG);
    let took = t.elapsed();
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["signal"], 9, "killed, not terminated: {r}");
    assert!(
        took >= Duration::from_millis(1500),
        "KILLed before the 2 s grace: {took:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "not KILLed 2 s after TERM: {took:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || all.iter().all(|p| gone(*p))),
        "processes of the cancelled job survive: {:?}",
        all.iter().filter(|p| !gone(**p)).collect::<Vec<_>>()
    );
}

// ----- timeout

#[test]
fn a_job_past_its_timeout_ends_timed_out() {
    let d = Daemon::start();
    let t = Instant::now();
    let id = d.submit(&["--timeout", "1s"], &["sleep", "30"]);
    // One that ignores TERM is KILLed kill_grace (2 s) later.
    let stubborn = d.submit(
        &["--timeout", "1s"],
        &["sh", "-c", "trap '' TERM; sleep 30; sleep 30"],
    );
    let waited = d.ctl(&["wait", &id.to_string()]);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "a 1 s timeout ended the job after {took:?}"
    );
    let r = d.wait_result(id, LONG);
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_eq!(r["reason"], "timeout", "{r}");
    let run_ms = r["run_ms"].as_u64().unwrap_or(0);
    assert!((900..8000).contains(&run_ms), "run_ms {run_ms}: {r}");

    let waited_stubborn = d.ctl(&["wait", &stubborn.to_string()]);
    let r = d.wait_result(stubborn, LONG);
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_eq!(r["reason"], "timeout", "{r}");
    assert_eq!(r["signal"], 9, "{r}");
    let run_ms = r["run_ms"].as_u64().unwrap_or(0);
    assert!(
        (2500..9000).contains(&run_ms),
        "timeout 1 s + grace 2 s, but the job ran {run_ms} ms: {r}"
    );

    // `wait` on a timed-out job exits 124, as timeout(1) does, however the job died.
    for out in [&waited, &waited_stubborn] {
        assert_ne!(code(out), 0, "{}", shown(out));
        assert_eq!(code(out), 124, "wait on a timed-out job: {}", shown(out));
    }
}

// ----- authorization

#[test]
fn rpc_callers_are_authorized_by_their_uid() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let d = Daemon::start();
    let as_user = |args: &[&str]| -> Output {
        let mut c = d.ctl_cmd(args);
        // The user's own shell environment, which cybctl passes on; not the daemon's.
        c.uid(uid).gid(gid).current_dir("/").env_clear();
        c.env("PATH", "/usr/bin:/bin")
            .env("CALLER_ONLY", "from-the-caller");
        c.output().expect("run cybctl as the test user")
    };
    let user_submit = |argv: &[&str]| -> u64 {
        let mut a = vec!["--json", "submit", "--cwd", "/tmp", "--"];
        a.extend_from_slice(argv);
        let out = as_user(&a);
        assert_eq!(
            code(&out),
            0,
            "submit as {}: {}",
            cyb_tests::TEST_USER,
            shown(&out)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_u64().unwrap()
    };

    // The test user submits; the job runs as that user, without the daemon's environment.
    let mine = user_submit(&["sh", "-c", "id -un; env"]);
    let out = as_user(&["wait", &mine.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let r = d.wait_result(mine, LONG);
    assert_eq!(r["user"], cyb_tests::TEST_USER, "{r}");
    assert_eq!(r["uid"], uid, "{r}");
    let log = file(&d.run_dir(mine), "stdout.log");
    let mut lines = log.lines();
    assert_eq!(lines.next(), Some(cyb_tests::TEST_USER), "{log}");
    let job_env: Vec<&str> = lines.collect();
    assert!(job_env.contains(&"USER=cybtest"), "{log}");
    assert!(
        job_env.contains(&"CALLER_ONLY=from-the-caller"),
        "the caller's environment: {log}"
    );
    let daemon_env = std::fs::read(format!("/proc/{}/environ", d.pid().unwrap())).unwrap();
    let own = ["HOME", "USER", "LOGNAME", "PATH", "PWD", "SHLVL", "_"];
    // Names the daemon has and a job must not inherit (cargo gives it plenty: CARGO_*...).
    let foreign: Vec<String> = daemon_env
        .split(|b| *b == 0)
        .map(|kv| text(kv).split('=').next().unwrap_or("").to_string())
        .filter(|name| !name.is_empty() && !own.contains(&name.as_str()) && !name.starts_with("CYB_"))
        .collect();
    assert!(
        !foreign.is_empty(),
        "the daemon's environment has nothing to leak"
    );
    let leaked: Vec<&String> = foreign
        .iter()
        .filter(|name| job_env.iter().any(|l| l.split('=').next() == Some(name.as_str())))
        .collect();
    assert!(
        leaked.is_empty(),
        "the daemon's environment leaked into the job: {leaked:?}"
    );

    // The user reads the queue, including other people's jobs.
    let root_job = d.submit(&[], &["sleep", "120"]);
    let out = as_user(&["--json", "ls"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<u64> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect();
    assert!(listed.contains(&mine) && listed.contains(&root_job), "{ls}");
    let out = as_user(&["--json", "show", &root_job.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    // ... and its own logs, not root's.
    let out = as_user(&["logs", &mine.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert!(text(&out.stdout).starts_with("cybtest\n"), "{}", shown(&out));
    d.wait_state(root_job, "running", LONG);
    let out = as_user(&["logs", &root_job.to_string()]);
    assert_eq!(code(&out), 77, "reading root's logs: {}", shown(&out));

    // The user cancels its own job.
    let own_job = user_submit(&["sleep", "120"]);
    d.wait_state(own_job, "running", LONG);
    let out = as_user(&["cancel", &own_job.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let r = d.wait_result(own_job, LONG);
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["cancelled_by"], cyb_tests::TEST_USER, "{r}");

    // ... but not root's, nor change it, nor pause the queue.
    let rs = root_job.to_string();
    for args in [
        vec!["cancel", rs.as_str()],
        vec!["hold", rs.as_str()],
        vec!["priority", rs.as_str(), "9"],
        vec!["pause"],
        vec!["resume"],
    ] {
        let out = as_user(&args);
        assert_eq!(
            code(&out),
            77,
            "cybctl {args:?} as the test user: {}",
            shown(&out)
        );
        assert!(
            text(&out.stderr).to_lowercase().contains("permission denied"),
            "cybctl {args:?}: {}",
            shown(&out)
        );
    }
    let rec = d.record(root_job);
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(rec["priority"], 0, "{rec}");
    assert_eq!(d.ctl_json(&["stats"])["paused"], false);
    d.ctl_ok(&["cancel", &rs]);
    let r = d.wait_result(root_job, LONG);
    assert_eq!(r["cancelled_by"], "root", "{r}");
}

// ----- hostile clients

#[test]
fn garbage_and_half_frames_on_the_socket_do_not_disturb_the_daemon() {
    let d = Daemon::start();
    let sock = d.socket();
    let send = |bytes: &[u8], hang_up: bool| -> UnixStream {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // The daemon may close first; that is fine.
        let _ = c.write_all(bytes);
        if hang_up {
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
        c
    };
    let frame = |body: &[u8]| -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    // Plain garbage, a frame far over the size limit, frames that are not JSON or not a
    // request, and a hang-up in the middle of a frame.
    drop(send(
        b"\x00\x00\x00\x10GET / HTTP/1.1\r\n\r\n garbage \xff\xfe",
        true,
    ));
    drop(send(b"\xff\xff\xff\xffxxxxxxxx", true));
    drop(send(&frame(b"not json at all"), true));
    drop(send(&frame(br#"{"hello": ["world", 1, null]}"#), true));
    drop(send(&frame(&[0xc3, 0x28, 0xff, 0x00]), true));
    let mut partial = 1000u32.to_be_bytes().to_vec();
    partial.extend_from_slice(br#"{"Request":{"id":1,"#);
    drop(send(&partial, false));
    drop(send(&[0x00, 0x00], false));
    // One that stalls mid-frame and stays connected while others are served.
    let stalled = send(&partial, false);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(UnixStream::connect(&sock).unwrap());
    }

    let out = d.ctl(&["ls"]);
    assert_eq!(code(&out), 0, "{}\nlog:\n{}", shown(&out), d.log());
    let out = d.ctl(&["submit", "--wait", "--", "sh", "-c", "exit 6"]);
    assert_eq!(code(&out), 6, "{}\nlog:\n{}", shown(&out), d.log());
    drop(stalled);
    drop(clients);
    let out = d.ctl(&["stats"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert!(!d.log().contains("panicked"), "log:\n{}", d.log());
}

#[test]
fn cybctl_exits_69_when_no_daemon_listens() {
    let tmp = tempdir();
    let missing = tmp.path().join("missing.sock");
    let dead = tmp.path().join("dead.sock");
    // A socket file left behind by a listener that is gone.
    drop(UnixListener::bind(&dead).unwrap());
    for (sock, args) in [
        (&missing, vec!["ls"]),
        (&dead, vec!["ls"]),
        (&dead, vec!["submit", "--", "true"]),
        (&dead, vec!["wait", "1"]),
    ] {
        let out = Command::new(bin("cybctl"))
            .arg("--socket")
            .arg(sock)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            code(&out),
            69,
            "cybctl {args:?} at {}: {}",
            sock.display(),
            shown(&out)
        );
        assert!(
            text(&out.stderr).contains("cannot reach cybd"),
            "cybctl {args:?}: {}",
            shown(&out)
        );
    }
}

// ----- output and artifacts

#[test]
fn output_past_max_log_bytes_is_cut_and_marked() {
    let d = Daemon::start_with(TestConfig::new().max_log_bytes(10 << 10));
    let id = d.submit(
        &[],
        &[
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 1000000; echo small >&2",
        ],
    );
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let r = d.wait_result(id, LONG);
    assert_eq!(r["state"], "succeeded", "{r}");
    let log = std::fs::read(d.run_dir(id).join("stdout.log")).unwrap();
    assert!(
        (10 * 1024..10 * 1024 + 200).contains(&log.len()),
        "stdout.log is {} bytes with max_log_bytes 10 KiB",
        log.len()
    );
    let kept = text(&log[..10 * 1024]);
    assert!(
        kept.split_terminator('\n')
            .all(|l| "0123456789abcdef".starts_with(l)),
        "the kept part is not the job's output"
    );
    let last = text(&log).lines().last().unwrap_or("").to_string();
    assert!(
        last.contains("truncated"),
        "last line does not mark the cut: {last:?}"
    );
    assert!(text(&log).ends_with('\n'));
    assert_eq!(file(&d.run_dir(id), "stderr.log"), "small\n");
}

#[test]
fn artifacts_matching_the_globs_are_collected() {
    let d = Daemon::start();
    let specs = tempdir();
    let script = "mkdir -p out/sub && echo content-a > out/a.txt && echo b > out/b.log \
                  && echo c > out/sub/c.txt";
    let check = |id: u64| {
        let r = d.wait_result(id, LONG);
        assert_eq!(r["state"], "succeeded", "{r}");
        let arts = d.run_dir(id).join("artifacts");
        assert_eq!(file(&arts, "out/a.txt"), "content-a\n", "job {id}");
        for absent in ["out/b.log", "out/sub/c.txt", "out/sub"] {
            assert!(!arts.join(absent).exists(), "job {id}: {absent} was collected");
        }
    };

    // Through cybctl submit -f.
    let cwd1 = tempdir();
    let id = d.submit_file(
        specs.path(),
        "arts.json",
        &json!({"name": "arts", "cwd": cwd1.path(), "shell": script, "artifacts": ["out/*.txt"]}),
    );
    let out = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    check(id);

    // Through the spool.
    let cwd2 = tempdir();
    let body = json!({"name": "arts-spool", "cwd": cwd2.path(), "shell": script, "artifacts": ["out/*.txt"]});
    d.drop_job("arts-spool.json", &body.to_string());
    let mut id = None;
    let found = wait_until(LONG, || {
        id = d
            .records()
            .iter()
            .find(|r| r["spec"]["name"] == "arts-spool")
            .and_then(|r| r["id"].as_u64());
        id.is_some()
    });
    assert!(found, "the spool file was not accepted; log:\n{}", d.log());
    check(id.unwrap());
}

/// The launcher (the process that forks supervisors) killed between jobs: the next job
/// starts a new one and runs; the daemon is not disturbed.
#[test]
fn a_killed_launcher_is_replaced() {
    let d = Daemon::start();
    let first = d.submit(&[], &["true"]);
    assert_eq!(d.wait_result(first, LONG)["state"], "succeeded");
    let daemon = d.pid().unwrap();
    let launchers = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                ppid == Some(daemon) && cmd.ends_with(b"launcher\0") && !gone(*pid)
            })
            .collect()
    };
    let old = launchers();
    assert_eq!(old.len(), 1, "one launcher expected, found {old:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || gone(old[0])));
    let second = d.submit(&[], &["sh", "-c", "echo again"]);
    let r = d.wait_result(second, LONG);
    assert_eq!(r["state"], "succeeded", "{r}\nlog:\n{}", d.log());
    let new = launchers();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new[0], old[0]);
    assert!(d.log().contains("the launcher went away"), "log:\n{}", d.log());
}

/// A second cybd started on the same spool by mistake stops at once, before it reads or
/// adopts anything: the first one's running jobs are left alone.
#[test]
fn a_second_cybd_on_the_same_spool_refuses_to_start_and_touches_nothing() {
    let d = Daemon::start();
    let id = d.submit(&[], &["sh", "-c", "sleep 2; echo done"]);
    d.wait_state(id, "running", Duration::from_secs(20));
    let before = d.record(id);
    let t = Instant::now();
    let out = Command::new(bin("cybd"))
        .arg("--config")
        .arg(&d.config)
        .arg("--log-target")
        .arg("stderr")
        .output()
        .unwrap();
    assert_ne!(code(&out), 0, "a second cybd started: {}", shown(&out));
    let err = text(&out.stderr);
    assert!(err.contains("already runs on the spool"), "{err}");
    assert!(err.contains(&format!("pid {}", d.pid().unwrap())), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(!err.contains("re-adopted"), "the second cybd adopted jobs: {err}");
    assert_eq!(d.record(id), before, "the second cybd changed the record");
    let r = d.wait_result(id, Duration::from_secs(30));
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(
        std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap(),
        "done\n"
    );
}
