//! End-to-end tests of intake: job files dropped into `<spool>/incoming/` are taken, checked,
//! and either become jobs or are moved to `rejected/` with an `.error.json` that says what is
//! wrong and where; `cybctl validate` gives the same errors; files run as their owner.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cyb_tests::{Daemon, TEST_USER, TestConfig, alive, bin, root_and_test_user, wait_until};
use serde_json::Value;

/// Generous timeout for anything a healthy daemon does in well under a second.
const T: Duration = Duration::from_secs(30);

const VALID: &str = r#"{"command":["true"]}"#;
const BACKEND_UNAVAILABLE: &str = "backend not available on this host";

/// The record of the job taken from spool file `file`, if there is one.
fn record_for(d: &Daemon, file: &str) -> Option<Value> {
    d.records().into_iter().find(|r| r["origin"]["file"] == file)
}

/// Waits for the record of the job taken from `file` and returns its id.
fn wait_record(d: &Daemon, file: &str) -> u64 {
    let mut found = None;
    wait_until(T, || {
        found = record_for(d, file);
        found.is_some()
    });
    let rec = found.unwrap_or_else(|| panic!("{file} was not accepted within {T:?}; log:\n{}", d.log()));
    rec["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("record without id: {rec}"))
}

/// Waits for the job taken from `file` to end; returns its id and `result.json`.
fn wait_job(d: &Daemon, file: &str) -> (u64, Value) {
    let id = wait_record(d, file);
    (id, d.wait_result(id, T))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Waits for `name` to be refused and checks the refusal: the file is gone from incoming/,
/// is in rejected/ under its own name, and `<name>.error.json` is `{"error", "field"}` with a
/// non-empty message and the expected field (or none). Returns the error object.
fn assert_rejected(d: &Daemon, name: &str, field: Option<&str>) -> Value {
    let err = d.wait_rejected(name, T);
    let obj = err
        .as_object()
        .unwrap_or_else(|| panic!("{name}.error.json is not an object: {err}"));
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    let allowed: BTreeSet<&str> = ["error", "field"].into();
    assert!(
        keys.is_subset(&allowed),
        "{name}.error.json has unexpected keys: {err}"
    );
    let msg = err["error"].as_str().unwrap_or_default();
    assert!(!msg.trim().is_empty(), "{name}.error.json has no message: {err}");
    assert_eq!(err["field"].as_str(), field, "{name}: wrong field in {err}");
    assert!(
        std::fs::symlink_metadata(d.incoming().join(name)).is_err(),
        "{name} is still in incoming/"
    );
    assert!(
        std::fs::symlink_metadata(d.rejected().join(name)).is_ok(),
        "{name} was not moved to rejected/ (there: {:?})",
        names_in(&d.rejected())
    );
    err
}

fn message(err: &Value) -> &str {
    err["error"].as_str().unwrap_or_default()
}

/// After refusals: the daemon is still up, has recorded nothing, and still takes a valid
/// file (which then is the only job in the store).
fn assert_still_accepting(d: &Daemon) {
    assert!(
        d.records().is_empty(),
        "refused files left records: {:?}",
        d.records()
    );
    let pid = d.pid().expect("daemon pid") as i32;
    assert!(alive(pid), "cybd died; log:\n{}", d.log());
    d.drop_job("after.json", VALID);
    let (_, res) = wait_job(d, "after.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    let recs = d.records();
    assert_eq!(
        recs.len(),
        1,
        "only the valid file should have a record: {recs:?}"
    );
    assert_eq!(recs[0]["origin"]["file"], "after.json");
}

#[test]
fn valid_file_runs_and_is_named_after_the_file() {
    let d = Daemon::start();
    let body = r#"{"shell":"echo hello from cybd; echo to stderr >&2"}"#;
    let path = d.drop_job("hello-world.json", body);
    let (id, res) = wait_job(&d, "hello-world.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    assert_eq!(res["id"], id);
    assert_eq!(
        res["name"], "hello-world",
        "name defaults to the file name without .json"
    );
    assert_eq!(res["exit_code"], 0);
    assert!(!path.exists(), "the accepted file is still in incoming/");
    assert!(names_in(&d.incoming()).is_empty(), "incoming/ not empty");
    assert!(names_in(&d.rejected()).is_empty(), "something was rejected");

    let run = d.run_dir(id);
    let job: Value = serde_json::from_str(&read(&run.join("job.json"))).unwrap();
    assert_eq!(job["id"], id);
    assert_eq!(
        job["spec"]["shell"], "echo hello from cybd; echo to stderr >&2",
        "{job}"
    );
    assert_eq!(job["spec"]["name"], "hello-world", "{job}");
    assert_eq!(read(&run.join("stdout.log")), "hello from cybd\n");
    assert_eq!(read(&run.join("stderr.log")), "to stderr\n");

    let rec = record_for(&d, "hello-world.json").unwrap();
    assert_eq!(rec["spec"]["name"], "hello-world");
    assert_eq!(rec["state"], "succeeded");

    // An explicit name is kept; an argv runs without a shell.
    d.drop_job("second.json", r#"{"name":"explicit","command":["echo","a  b"]}"#);
    let (id2, res2) = wait_job(&d, "second.json");
    assert_ne!(id2, id);
    assert_eq!(res2["state"], "succeeded", "{res2}");
    assert_eq!(res2["name"], "explicit");
    assert_eq!(read(&d.run_dir(id2).join("stdout.log")), "a  b\n");
}

/// Bad specs that `cybctl validate` also sees: (file name, body, field to blame, words the
/// message must contain).
const BAD_SPECS: &[(&str, &str, Option<&str>, &str)] = &[
    ("malformed.json", r#"{"command": ["true""#, None, "not valid JSON"),
    (
        "unknown-field.json",
        r#"{"command":["true"],"comand":["x"]}"#,
        Some("comand"),
        "unknown field",
    ),
    (
        "relative-cwd.json",
        r#"{"command":["true"],"cwd":"relative"}"#,
        Some("cwd"),
        "absolute",
    ),
    (
        "negative-pids.json",
        r#"{"command":["true"],"resources":{"pids":-1}}"#,
        Some("resources.pids"),
        "at least 1",
    ),
    ("nothing.json", r#"{"name":"x"}"#, None, "nothing to run"),
    (
        "cyb-env.json",
        r#"{"command":["true"],"env":{"CYB_JOB_ID":"1"}}"#,
        Some("env.CYB_JOB_ID"),
        "CYB_",
    ),
    // Issue 15: numbers no Duration holds panicked the parser (cybctl validate exited 101).
    (
        "huge-timeout.json",
        r#"{"command":["true"],"timeout":1e20}"#,
        Some("timeout"),
        "1e20s is out of range (at most 1year)",
    ),
    (
        "huge-backoff.json",
        r#"{"command":["true"],"retry":{"max_attempts":2,"backoff":1e20}}"#,
        Some("retry.backoff"),
        "out of range",
    ),
    (
        "huge-max-backoff.json",
        r#"{"command":["true"],"retry":{"max_attempts":2,"max_backoff":18446744073709551616}}"#,
        Some("retry.max_backoff"),
        "out of range",
    ),
    // Accepted once, then unreadable in the store after a restart.
    (
        "huge-memory.json",
        r#"{"command":["true"],"resources":{"memory":"10EiB"}}"#,
        Some("resources.memory"),
        "out of range",
    ),
    // A job is an object, not an array of its fields in order.
    (
        "array.json",
        r#"[null,"arr",null,null,null,null,null,["true"]]"#,
        None,
        "expected a JSON object",
    ),
    (
        "array-resources.json",
        r#"{"command":["true"],"resources":[1,2.0]}"#,
        Some("resources"),
        "expected a JSON object",
    ),
];

#[test]
fn invalid_specs_are_rejected_with_reason_and_field() {
    let d = Daemon::start();
    for (name, body, _, _) in BAD_SPECS {
        d.drop_job(name, body);
    }
    for (name, _, field, words) in BAD_SPECS {
        let err = assert_rejected(&d, name, *field);
        assert!(message(&err).contains(words), "{name}: {err}");
    }
    // The refused files are kept as written.
    for (name, body, _, _) in BAD_SPECS {
        assert_eq!(
            read(&d.rejected().join(name)),
            *body,
            "{name} changed on its way to rejected/"
        );
    }
    assert_still_accepting(&d);
}

/// Issue 15: a `"timeout": 1e20` file panicked intake's whole batch on every rescan, so
/// the good files behind it waited forever, and the set of files already taken was lost
/// with the batch, so after a restart they were taken (and run) again.
#[test]
fn an_out_of_range_file_is_refused_and_the_files_behind_it_run_once() {
    let mut d = Daemon::start();
    d.drop_job("a-huge.json", r#"{"command":["true"],"timeout":1e20}"#);
    // Its mtime is later, so it comes behind the bad one in the same batch.
    std::thread::sleep(Duration::from_millis(20));
    let marker = d.path().join("runs");
    d.drop_job(
        "b-good.json",
        &format!(r#"{{"shell":"echo run >> {}"}}"#, marker.display()),
    );
    let err = assert_rejected(&d, "a-huge.json", Some("timeout"));
    assert!(
        message(&err).starts_with("1e20s is out of range (at most 1year)"),
        "{err}"
    );
    let (id, res) = wait_job(&d, "b-good.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    // A kill -9 and a restart later, nothing is taken or run again.
    d.kill9();
    d.restart();
    std::thread::sleep(Duration::from_millis(2500));
    let recs = d.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["id"], id);
    assert_eq!(read(&marker), "run\n", "the good job ran more than once");
    assert!(alive(d.pid().expect("daemon pid") as i32), "log:\n{}", d.log());
}

/// Issue 15: `context` is kept byte for byte: numbers, spacing and escapes as written (it
/// was parsed and written back, so 9.7e+25 became 9.699999999999999e+25).
#[test]
fn context_is_kept_byte_for_byte_in_the_record_and_job_json() {
    const CONTEXT: &str = r#"{"n": 9.7e+25, "big": 123456789012345678901234567890,
  "s": "caf\u00e9 \/", "a": [1, 2.50, -0.0]}"#;
    let d = Daemon::start();
    d.drop_job(
        "ctx.json",
        &format!(r#"{{"command":["true"],"context":{CONTEXT}}}"#),
    );
    let (id, res) = wait_job(&d, "ctx.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    let record = read(&d.jobs_dir().join(format!("{id}.json")));
    assert!(record.contains(CONTEXT), "the record changed context:\n{record}");
    let job = read(&d.run_dir(id).join("job.json"));
    assert!(job.contains(CONTEXT), "job.json changed context:\n{job}");
    // What cybctl shows comes through the RPC unchanged too.
    let shown = d.ctl_ok(&["--json", "show", &id.to_string()]);
    assert!(shown.contains(CONTEXT), "cybctl show changed context:\n{shown}");
    // And so does a job submitted with cybctl.
    let f = d.path().join("ctx-submit.json");
    std::fs::write(&f, format!(r#"{{"command":["true"],"context":{CONTEXT}}}"#)).unwrap();
    let out = d.ctl_ok(&["--json", "submit", "-f", f.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let id2 = v["id"].as_u64().unwrap_or_else(|| panic!("no id in {out}"));
    let record = read(&d.jobs_dir().join(format!("{id2}.json")));
    assert!(record.contains(CONTEXT), "the record changed context:\n{record}");
}

#[test]
fn a_second_refused_file_of_the_same_name_keeps_the_first() {
    let d = Daemon::start();
    d.drop_job("same.json", r#"{"comand":["true"]}"#);
    assert_rejected(&d, "same.json", Some("comand"));
    d.drop_job("same.json", r#"{"command":["true"],"cwd":"rel"}"#);
    let second = d.wait_rejected("same.json.1", T);
    assert_eq!(second["field"], "cwd", "{second}");
    let first: Value = serde_json::from_str(&read(&d.rejected().join("same.json.error.json"))).unwrap();
    assert_eq!(
        first["field"], "comand",
        "the first refusal was overwritten: {first}"
    );
    assert_eq!(read(&d.rejected().join("same.json")), r#"{"comand":["true"]}"#);
    assert_eq!(
        read(&d.rejected().join("same.json.1")),
        r#"{"command":["true"],"cwd":"rel"}"#
    );
    assert_still_accepting(&d);
}

#[test]
fn oversized_file_is_rejected() {
    let d = Daemon::start_with(TestConfig::new().max_job_bytes(1024));
    // Valid JSON, just too big.
    let body = format!(r#"{{"command":["true"],"env":{{"PAD":"{}"}}}}"#, "x".repeat(2000));
    assert!(body.len() > 1024);
    d.drop_job("big.json", &body);
    let err = assert_rejected(&d, "big.json", None);
    assert!(message(&err).contains("max_job_bytes"), "{err}");
    assert!(message(&err).contains(&body.len().to_string()), "{err}");
    // Small files still go through.
    assert_still_accepting(&d);
}

#[test]
fn symlinks_hard_links_fifos_and_directories_are_rejected() {
    let d = Daemon::start();
    // A valid job outside the spool that would leave a mark if it ran.
    let marker = d.path().join("ran-through-symlink");
    let target = d.path().join("target.json");
    let target_body = format!(r#"{{"shell":"touch {}"}}"#, marker.display());
    std::fs::write(&target, &target_body).unwrap();
    let target_mtime = std::fs::metadata(&target).unwrap().mtime_nsec();
    std::os::unix::fs::symlink(&target, d.incoming().join("symlink.json")).unwrap();

    let marker2 = d.path().join("ran-through-hard-link");
    let orig = d.path().join("orig.json");
    let orig_body = format!(r#"{{"shell":"touch {}"}}"#, marker2.display());
    std::fs::write(&orig, &orig_body).unwrap();
    std::fs::hard_link(&orig, d.incoming().join("hardlink.json")).unwrap();

    nix::unistd::mkfifo(
        &d.incoming().join("fifo.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let dir = d.path().join("dir.json");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("inner.json"), VALID).unwrap();
    std::fs::rename(&dir, d.incoming().join("dir.json")).unwrap();

    let err = assert_rejected(&d, "symlink.json", None);
    assert!(message(&err).contains("symbolic link"), "{err}");
    let moved = d.rejected().join("symlink.json");
    assert!(
        std::fs::symlink_metadata(&moved)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink itself should be in rejected/"
    );
    assert_eq!(std::fs::read_link(&moved).unwrap(), target);

    let err = assert_rejected(&d, "hardlink.json", None);
    assert!(message(&err).contains("exactly one link"), "{err}");

    let err = assert_rejected(&d, "fifo.json", None);
    assert!(message(&err).contains("regular file"), "{err}");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(d.rejected().join("fifo.json"))
            .unwrap()
            .file_type()
    ));

    let err = assert_rejected(&d, "dir.json", None);
    assert!(message(&err).contains("regular file"), "{err}");
    assert_eq!(read(&d.rejected().join("dir.json/inner.json")), VALID);

    assert_still_accepting(&d);

    // The targets were neither touched nor run.
    assert_eq!(read(&target), target_body);
    assert_eq!(std::fs::metadata(&target).unwrap().mtime_nsec(), target_mtime);
    assert_eq!(read(&orig), orig_body);
    assert!(!marker.exists(), "the symlink's target was run");
    assert!(!marker2.exists(), "the hard-linked file was run");
}

#[test]
fn unavailable_backends_are_refused() {
    let d = Daemon::start();
    let cases = [
        // Docker jobs are refused until `[docker] allowed_images` lists something.
        (
            "docker.json",
            r#"{"docker":{"image":"alpine:3"}}"#,
            "docker.image",
            "[docker] allowed_images is empty",
        ),
        (
            "task.json",
            r#"{"task":{"kind":"gpu_report"}}"#,
            "task",
            BACKEND_UNAVAILABLE,
        ),
        (
            "slurm.json",
            r#"{"class":"gpu_slurm","shell":"nvidia-smi"}"#,
            "class",
            BACKEND_UNAVAILABLE,
        ),
    ];
    for (name, body, _, _) in cases {
        d.drop_job(name, body);
    }
    for (name, body, field, why) in cases {
        let err = assert_rejected(&d, name, Some(field));
        assert!(message(&err).contains(why), "{name}: {err}");
        // The same job through cybctl is refused too (exit 65), not queued.
        let f = d.path().join(name);
        std::fs::write(&f, body).unwrap();
        let out = d.ctl(&["submit", "-f", f.to_str().unwrap()]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(65), "submit -f {name}: {text}");
        assert!(text.contains(why), "submit -f {name}: {text}");
    }
    assert_still_accepting(&d);
}

#[test]
fn dependency_on_unknown_job_is_rejected() {
    let d = Daemon::start();
    d.drop_job("orphan.json", r#"{"command":["true"],"depends_on":[4242]}"#);
    let err = assert_rejected(&d, "orphan.json", Some("depends_on[0]"));
    assert!(message(&err).contains("4242"), "{err}");
    assert_still_accepting(&d);
}

/// Runs `cybctl [--json] validate FILE`; returns (exit code, stdout).
fn validate(json: bool, file: &Path) -> (Option<i32>, String) {
    let mut c = Command::new(bin("cybctl"));
    if json {
        c.arg("--json");
    }
    let out = c.arg("validate").arg(file).output().expect("run cybctl validate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn cybctl_validate_gives_the_daemons_errors() {
    let d = Daemon::start();
    let copies = d.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let not_utf8: &[u8] = b"{\"command\":[\"\xff\"]}";
    // Written aside, then renamed in, like drop_job (which only takes text).
    let tmp = d.incoming().join(".not-utf8.json.tmp");
    std::fs::write(&tmp, not_utf8).unwrap();
    std::fs::rename(&tmp, d.incoming().join("not-utf8.json")).unwrap();
    std::fs::write(copies.join("not-utf8.json"), not_utf8).unwrap();
    for (name, body, _, _) in BAD_SPECS {
        std::fs::write(copies.join(name), body).unwrap();
        d.drop_job(name, body);
    }
    let names = BAD_SPECS.iter().map(|c| c.0).chain(["not-utf8.json"]);
    for name in names {
        let daemon_err = d.wait_rejected(name, T);
        let copy = copies.join(name);

        let (code, out) = validate(true, &copy);
        assert_eq!(code, Some(65), "validate --json {name}: {out}");
        let ctl_err: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("validate --json {name} printed non-JSON ({e}): {out}"));
        assert_eq!(ctl_err, daemon_err, "{name}: cybctl and cybd disagree");

        let (code, out) = validate(false, &copy);
        assert_eq!(code, Some(65), "validate {name}: {out}");
        let msg = message(&daemon_err);
        let expected = match daemon_err["field"].as_str() {
            Some(f) => format!("{}: field `{f}`: {msg}\n", copy.display()),
            None => format!("{}: {msg}\n", copy.display()),
        };
        assert_eq!(out, expected, "validate {name}");
    }

    let good = copies.join("good.json");
    std::fs::write(
        &good,
        r#"{"shell":"echo hi","resources":{"pids":16},"cwd":"/tmp"}"#,
    )
    .unwrap();
    let (code, out) = validate(false, &good);
    assert_eq!(code, Some(0), "validate good.json: {out}");
    assert!(out.starts_with(&format!("{}: ok", good.display())), "{out}");
    let (code, out) = validate(true, &good);
    assert_eq!(code, Some(0), "validate --json good.json: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn dotfiles_and_other_names_are_ignored() {
    let d = Daemon::start();
    let ignored = [".hidden.json", "notes.txt", "job.json.tmp", "job.json~", "README"];
    for name in ignored {
        std::fs::write(d.incoming().join(name), VALID).unwrap();
    }
    // Give notify and at least two rescans (every 1 s) a chance.
    std::thread::sleep(Duration::from_millis(2500));
    let expected: BTreeSet<String> = ignored.iter().map(|s| s.to_string()).collect();
    assert_eq!(names_in(&d.incoming()), expected);
    assert!(
        names_in(&d.rejected()).is_empty(),
        "{:?}",
        names_in(&d.rejected())
    );
    assert!(d.records().is_empty(), "{:?}", d.records());
    // A scan that takes a real file still leaves them alone.
    assert_still_accepting(&d);
    assert_eq!(names_in(&d.incoming()), expected);
    for name in ignored {
        assert_eq!(read(&d.incoming().join(name)), VALID);
    }
}

#[test]
fn a_file_name_that_is_not_utf8_is_refused_not_ignored() {
    use std::os::unix::ffi::OsStrExt;
    let d = Daemon::start();
    let raw = std::ffi::OsStr::from_bytes(b"bad\xff.json");
    std::fs::write(d.incoming().join(raw), VALID).unwrap();
    // It lands in rejected/ under a readable name, with the reason beside it.
    let err = d.wait_rejected("bad\u{fffd}.json", Duration::from_secs(20));
    assert!(message(&err).contains("not valid UTF-8"), "{err}");
    assert!(d.rejected().join("bad\u{fffd}.json").exists());
    assert!(
        names_in(&d.incoming()).is_empty(),
        "{:?}",
        names_in(&d.incoming())
    );
    assert!(d.records().is_empty());
}

/// `KEY=value` lines of `env` output (values without newlines).
fn env_of(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The job's process as the kernel sees it: its owner's credentials only, a session of its
/// own, and no signal blocked or ignored (the supervisor blocks TERM/INT/HUP for its
/// signalfd and ignores SIGPIPE; none of that may reach the job). The daemon here is
/// started with SIGUSR2 ignored, as `nohup` leaves SIGHUP: an ignored signal the daemon
/// inherited does not reach the job either.
#[test]
fn the_job_starts_as_its_owner_in_its_own_session_with_default_signals() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    // SAFETY: SIG_IGN installs no handler; nothing in this test process uses SIGUSR2, and
    // the daemons other tests start meanwhile inherit it as harmlessly.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGUSR2,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .expect("ignore SIGUSR2");
    let d = Daemon::start();
    let body =
        r#"{"command":["grep","-E","^(Pid|NSsid|Uid|Gid|Groups|SigBlk|SigIgn):","/proc/self/status"]}"#;
    d.drop_job_as("status.json", body, uid, gid);
    let (id, res) = wait_job(&d, "status.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    let out = read(&d.run_dir(id).join("stdout.log"));
    let field = |k: &str| -> Vec<String> {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("no {k} in:\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(field("Uid"), vec![uid.to_string(); 4], "{out}");
    assert_eq!(field("Gid"), vec![gid.to_string(); 4], "{out}");
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(
        &std::ffi::CString::new(TEST_USER).unwrap(),
        nix::unistd::Gid::from_raw(gid),
    )
    .unwrap()
    .into_iter()
    .map(|g| g.as_raw())
    .collect();
    groups.sort_unstable();
    groups.dedup();
    let mut seen: Vec<u32> = field("Groups").iter().map(|g| g.parse().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, groups, "{out}");
    assert_eq!(
        field("NSsid"),
        field("Pid"),
        "the job leads its own session:\n{out}"
    );
    assert_eq!(field("SigBlk"), ["0000000000000000"], "{out}");
    assert_eq!(field("SigIgn"), ["0000000000000000"], "{out}");
}

#[test]
fn file_owner_runs_the_job_in_a_clean_environment() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let home = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap()
        .dir;
    let d = Daemon::start();
    let body =
        r#"{"shell":"id -un; id -u; echo $HOME $USER $LOGNAME; echo ---; env","env":{"MY_VAR":"from spec"}}"#;
    d.drop_job_as("whoami.json", body, uid, gid);
    let (id, res) = wait_job(&d, "whoami.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    assert_eq!(res["user"], TEST_USER, "{res}");
    assert_eq!(res["uid"], uid, "{res}");

    let run = d.run_dir(id);
    let out = read(&run.join("stdout.log"));
    let (head, env_out) = out
        .split_once("---\n")
        .unwrap_or_else(|| panic!("odd output: {out}"));
    let head: Vec<&str> = head.lines().collect();
    assert_eq!(
        head,
        [
            TEST_USER.to_string(),
            uid.to_string(),
            format!("{} {TEST_USER} {TEST_USER}", home.display())
        ],
        "{out}"
    );

    let env = env_of(env_out);
    let run_str = run.to_str().unwrap();
    let expected: BTreeMap<&str, String> = [
        ("HOME", home.display().to_string()),
        ("USER", TEST_USER.to_string()),
        ("LOGNAME", TEST_USER.to_string()),
        ("CYB_JOB_ID", id.to_string()),
        ("CYB_RUN_DIR", run_str.to_string()),
        ("CYB_ARTIFACTS_DIR", format!("{run_str}/artifacts")),
        ("CYB_ATTEMPT", "1".to_string()),
        ("MY_VAR", "from spec".to_string()),
    ]
    .into();
    for (k, v) in &expected {
        assert_eq!(env.get(*k), Some(v), "{k} in the job's environment:\n{env_out}");
    }
    assert!(env.contains_key("PATH"), "no PATH:\n{env_out}");
    // Nothing of the daemon's (= this test's) environment: only what cybd sets, the spec's
    // env, and what the shell adds itself.
    let shell_adds = ["PATH", "PWD", "OLDPWD", "SHLVL", "_"];
    let extra: Vec<&String> = env
        .keys()
        .filter(|k| !expected.contains_key(k.as_str()) && !shell_adds.contains(&k.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "the job sees variables it should not: {extra:?}\n{env_out}"
    );

    // The run directory: root's, the user's group, 0750.
    let m = std::fs::metadata(&run).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750, "run dir mode {:o}", m.mode() & 0o7777);
    assert_eq!(m.uid(), 0, "run dir owner");
    assert_eq!(m.gid(), gid, "run dir group");
    // The user can read it, others cannot.
    let as_user = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "cat"])
        .arg(run.join("stdout.log"))
        .output()
        .unwrap();
    assert!(
        as_user.status.success(),
        "{TEST_USER} cannot read its own run: {}",
        String::from_utf8_lossy(&as_user.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&as_user.stdout), out);
    if nix::unistd::User::from_name("nobody").ok().flatten().is_some() {
        let ls_as_nobody = |p: &Path| {
            Command::new("runuser")
                .args(["-u", "nobody", "--", "ls"])
                .arg(p)
                .output()
                .unwrap()
                .status
                .success()
        };
        // nobody reaches logs/ itself, so what stops it is the run directory's mode.
        assert!(ls_as_nobody(run.parent().unwrap()), "nobody cannot list logs/");
        assert!(!ls_as_nobody(&run), "nobody can list {}", run.display());
    }
}

#[test]
fn rejected_files_error_belongs_to_the_files_owner() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let d = Daemon::start();
    d.drop_job_as("typo.json", r#"{"comand":["true"]}"#, uid, gid);
    let err = assert_rejected(&d, "typo.json", Some("comand"));
    assert!(message(&err).contains("unknown field"), "{err}");
    let m = std::fs::metadata(d.rejected().join("typo.json.error.json")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid), "owner of typo.json.error.json");
    // The owner can read it.
    let st = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "cat"])
        .arg(d.rejected().join("typo.json.error.json"))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let m = std::fs::metadata(d.rejected().join("typo.json")).unwrap();
    assert_eq!(m.uid(), uid, "the refused file changed owner");

    // A file whose owner has no account is refused, not run as someone else.
    let ghost = (60_000..65_000)
        .find(|u| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*u))
                .ok()
                .flatten()
                .is_none()
        })
        .expect("a free uid");
    d.drop_job_as("ghost.json", VALID, ghost, ghost);
    let err = assert_rejected(&d, "ghost.json", None);
    assert!(message(&err).contains("owner"), "{err}");
    assert!(d.records().is_empty(), "{:?}", d.records());
}

#[test]
fn root_files_are_refused_unless_allowed() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let d = Daemon::start_with(TestConfig::new().allow_root_jobs(false));
    d.drop_job("rootjob.json", VALID);
    let err = assert_rejected(&d, "rootjob.json", None);
    let msg = message(&err);
    assert!(msg.contains("root") && msg.contains("refused"), "{err}");
    assert!(d.records().is_empty(), "{:?}", d.records());
    // The same daemon runs an ordinary user's job.
    d.drop_job_as("userjob.json", VALID, uid, gid);
    let (_, res) = wait_job(&d, "userjob.json");
    assert_eq!(res["state"], "succeeded", "{res}");
    assert_eq!(res["user"], TEST_USER);
    assert_eq!(d.records().len(), 1);
}

/// Record files in the store (`<id>.json`, not temp files).
fn record_count(d: &Daemon) -> usize {
    std::fs::read_dir(d.jobs_dir())
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    !n.starts_with('.') && n.ends_with(".json")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn burst_of_10000_files_is_taken_in_full() {
    const N: usize = 10_000;
    let d = Daemon::start();
    // Only queue: nothing runs, so this measures intake alone.
    d.ctl_ok(&["pause"]);
    let start = Instant::now();
    let names: Vec<String> = (0..N).map(|i| format!("burst-{i:05}.json")).collect();
    let incoming: PathBuf = d.incoming();
    for name in &names {
        let tmp = incoming.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, VALID).unwrap();
        std::fs::rename(&tmp, incoming.join(name)).unwrap();
    }
    let written = start.elapsed();
    // Generous: the host may be busy with other builds and tests.
    let ok = wait_until(Duration::from_secs(180), || {
        record_count(&d) >= N && names_in(&incoming).is_empty()
    });
    let took = start.elapsed();
    assert!(
        ok,
        "after {took:?}: {} records, {} files left in incoming/, {} rejected",
        record_count(&d),
        names_in(&incoming).len(),
        names_in(&d.rejected()).len()
    );
    eprintln!(
        "intake of {N} files: written in {written:?}, all recorded after {took:?} ({:.0} files/s)",
        N as f64 / took.as_secs_f64()
    );
    assert!(
        names_in(&d.rejected()).is_empty(),
        "{:?}",
        names_in(&d.rejected())
    );
    let recs = d.records();
    assert_eq!(recs.len(), N);
    let ids: BTreeSet<u64> = recs.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), N, "ids are not distinct");
    let files: BTreeSet<&str> = recs
        .iter()
        .map(|r| r["origin"]["file"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(files, expected, "records do not match the files dropped");
    assert!(
        recs.iter().all(|r| r["state"] == "queued"),
        "paused, yet some job left the queue"
    );
}

/// CPU ticks (user + system) used so far by process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_daemon_stays_idle() {
    let d = Daemon::start();
    // Let start-up and a first scan pass, then watch it do nothing for three seconds.
    assert_still_accepting(&d);
    let pid = d.pid().unwrap();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    // 300 ticks would be a whole core; rescans every second cost a few at most.
    assert!(used < 30, "idle cybd used {used} CPU ticks in 3 s");
}
