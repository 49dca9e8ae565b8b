//! Docker jobs against a real Docker engine (brought up by tests/system/docker.sh): what
//! runs and as whom, which images, files and networks a job may use, limits and GPUs,
//! output and ends, restarts of cybd and of the engine, and hostile requests.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cyb_tests::docker::{self, Engine, IMAGE, IMAGE_OTHER_NAME, IMAGE_ROOT_USER};
use cyb_tests::{Daemon, TestConfig, root_and_test_user, shown, text, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// A daemon that allows the test images, with `extra` lines added to its `[docker]`.
fn daemon(extra: &str) -> Daemon {
    daemon_with(TestConfig::new(), extra)
}

fn daemon_with(cfg: TestConfig, extra: &str) -> Daemon {
    Daemon::start_with(cfg.toml(&format!(
        "[docker]\nallowed_images = [\"cyb-test:*\"]\nengine_check_interval = \"300ms\"\nlost_engine_grace = \"30s\"\n{extra}\n"
    )))
}

/// `cybctl ARGS` as the test user (uid, gid), from `/`, with a plain environment.
fn as_user(d: &Daemon, who: (u32, u32), args: &[&str]) -> Output {
    let mut c = d.ctl_cmd(args);
    c.uid(who.0)
        .gid(who.1)
        .current_dir("/")
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    c.output().expect("run cybctl as the test user")
}

/// Submits a docker job (`opts` before `--`, the container's command after) as root.
fn submit(d: &Daemon, opts: &[&str], cmd: &[&str]) -> u64 {
    let mut o = vec!["--image", IMAGE];
    o.extend_from_slice(opts);
    d.submit(&o, cmd)
}

fn stdout(d: &Daemon, id: u64) -> String {
    std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap_or_default()
}

fn stderr(d: &Daemon, id: u64) -> String {
    std::fs::read_to_string(d.run_dir(id).join("stderr.log")).unwrap_or_default()
}

/// The containers of job `id` of daemon `d`, in any state.
fn containers_of(e: &Engine, d: &Daemon, id: u64) -> Vec<String> {
    e.containers_labeled(&format!("cyb.job_id={id}"))
        .into_iter()
        .filter(|c| e.inspect(c)["Config"]["Labels"]["cyb.instance"] == instance(e, d))
        .collect()
}

/// The `cyb.instance` label of daemon `d`'s containers: found on a container it runs.
fn instance(e: &Engine, d: &Daemon) -> Value {
    let id = d.submit(&["--image", IMAGE], &["sleep", "30"]);
    let c = wait_container(e, d, id);
    let v = e.inspect(&c)["Config"]["Labels"]["cyb.instance"].clone();
    d.ctl_ok(&["cancel", &id.to_string()]);
    d.wait_result(id, LONG);
    v
}

/// The id of the running container of job `id` (named in its record), once it runs.
fn wait_container(e: &Engine, d: &Daemon, id: u64) -> String {
    let mut found = String::new();
    let ok = wait_until(LONG, || {
        let Ok(t) = std::fs::read_to_string(d.jobs_dir().join(format!("{id}.json"))) else {
            return false;
        };
        let Ok(rec) = serde_json::from_str::<Value>(&t) else {
            return false;
        };
        let Some(name) = rec["container"].as_str() else {
            return false;
        };
        let i = e.inspect(name);
        match i["Id"].as_str() {
            Some(c) if i["State"]["Running"] == true => {
                found = c.to_string();
                true
            }
            _ => false,
        }
    });
    assert!(ok, "job {id} has no running container; log:\n{}", d.log());
    found
}

fn ended(d: &Daemon, id: u64) -> Value {
    d.wait_result(id, LONG)
}

fn field(r: &Value, k: &str) -> String {
    match &r[k] {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[test]
fn a_docker_job_runs_as_its_owner_confined_and_leaves_its_outputs() {
    let Some(who) = root_and_test_user() else { return };
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let d = daemon("");
    // The image declares USER root: the job still runs as its owner, with no capability.
    let out = as_user(
        &d,
        who,
        &[
            "--json",
            "submit",
            "--wait",
            "--image",
            IMAGE_ROOT_USER,
            "--memory",
            "64M",
            "--",
            "sh",
            "-c",
            "id -u; id -g; grep CapEff /proc/self/status; echo oops >&2; echo made > /cyb/artifacts/out.txt; echo $CYB_JOB_ID",
        ],
    );
    let rec: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", shown(&out)));
    let id = rec["id"].as_u64().unwrap();
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}\n{}", d.log());
    let lines: Vec<String> = stdout(&d, id).lines().map(String::from).collect();
    assert_eq!(lines[0], who.0.to_string(), "uid in the container");
    assert_eq!(lines[1], who.1.to_string(), "gid in the container");
    assert_eq!(
        lines[2].split_whitespace().nth(1),
        Some("0000000000000000"),
        "{lines:?}"
    );
    assert_eq!(lines[3], id.to_string());
    assert_eq!(stderr(&d, id), "oops\n");
    // What the container wrote to /cyb/artifacts is in the run directory, the user's.
    let art = d.run_dir(id).join("artifacts/out.txt");
    assert_eq!(std::fs::read_to_string(&art).unwrap(), "made\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&art).unwrap().uid(), who.0);
    // result.json: the container, the exit code, what it used.
    let cid = field(&r, "container_id");
    assert_eq!(cid.len(), 64, "{r}");
    assert_eq!(r["exit_code"], 0);
    assert!(r["peak_memory_bytes"].as_u64().is_some_and(|b| b > 0), "{r}");
    assert!(r["cpu_usage_ms"].as_u64().is_some(), "{r}");
    assert_eq!(r["backend"], "docker");
    // The container goes once the end is durable.
    assert!(
        wait_until(Duration::from_secs(10), || e.inspect(&cid).is_null()),
        "container {cid} was not removed"
    );
    // cybctl show names it too.
    let show = text(&d.ctl(&["show", &id.to_string()]).stdout);
    assert!(show.contains(&cid), "{show}");
}

#[test]
fn the_container_gets_the_jobs_limits_and_nothing_more() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let d = daemon("");
    let id = submit(
        &d,
        &["--memory", "96M", "--cpus", "0.5", "--pids", "64"],
        &["sleep", "60"],
    );
    let c = wait_container(&e, &d, id);
    let i = e.inspect(&c);
    let hc = &i["HostConfig"];
    assert_eq!(hc["Memory"], 96 << 20, "{hc}");
    assert_eq!(hc["NanoCpus"], 500_000_000, "{hc}");
    assert_eq!(hc["PidsLimit"], 64, "{hc}");
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["Init"], true);
    assert_eq!(hc["NetworkMode"], "none");
    assert_eq!(i["Config"]["User"], "0:0");
    assert_eq!(i["Config"]["Labels"]["cyb.job_id"], id.to_string());
    assert_eq!(i["Config"]["Tty"], false);
    // Health shows the engine.
    let h = d.ctl_json(&["health"]);
    assert_eq!(h["docker"]["reachable"], true, "{h}");
    assert!(
        h["docker"]["api_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{h}"
    );
    assert_eq!(h["docker"]["cgroup_driver"], "cgroupfs", "{h}");
    let text_health = text(&d.ctl(&["health"]).stdout);
    assert!(text_health.contains("docker:    reachable"), "{text_health}");
    d.ctl_ok(&["cancel", &id.to_string()]);
    assert_eq!(ended(&d, id)["state"], "cancelled");
}

#[test]
fn a_spec_file_with_a_docker_block_runs_with_its_entrypoint_workdir_and_env() {
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon("");
    let spec = serde_json::json!({
        "docker": {"image": IMAGE, "entrypoint": ["/bin/sh", "-c"], "command": ["pwd; echo $GREETING"], "workdir": "/tmp"},
        "env": {"GREETING": "hello from the spec"}
    });
    let dir = tempfile::tempdir().unwrap();
    let id = d.submit_file(dir.path(), "job.json", &spec);
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(stdout(&d, id), "/tmp\nhello from the spec\n");
}

#[test]
fn only_allowed_mounts_and_networks_are_given_and_hostile_ones_are_refused() {
    let Some(who) = root_and_test_user() else { return };
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let base = tempfile::tempdir().unwrap();
    let share = base.path().join("share");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(share.join("in.txt"), "inside\n").unwrap();
    std::fs::write(outside.join("secret.txt"), "secret\n").unwrap();
    std::os::unix::fs::symlink(&outside, share.join("escape")).unwrap();
    let private = share.join("private");
    std::fs::create_dir(&private).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [base.path(), share.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let d = daemon(&format!(
        "allowed_mount_prefixes = [\"{}\"]\nallowed_networks = [\"host\"]",
        share.display()
    ));
    // Allowed: read-only under the prefix.
    let m = format!("{}:/data:ro", share.display());
    let out = as_user(
        &d,
        who,
        &[
            "submit",
            "--wait",
            "--image",
            IMAGE,
            "--mount",
            &m,
            "--",
            "cat",
            "/data/in.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // Refused at intake, each naming the mount and why.
    let refused = |args: &[&str], want: &[&str]| {
        let mut a = vec!["submit", "--image", IMAGE];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--", "true"]);
        let out = as_user(&d, who, &a);
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} was accepted");
        for w in want {
            assert!(err.contains(w), "{args:?}: wanted `{w}` in: {err}");
        }
    };
    let dotdot = format!("{}/../outside:/x", share.display());
    refused(&["--mount", &dotdot], &["docker.mounts[0]"]);
    let link = format!("{}/escape:/x", share.display());
    refused(&["--mount", &link], &["docker.mounts[0]"]);
    let elsewhere = format!("{}:/x", outside.display());
    refused(&["--mount", &elsewhere], &["docker.mounts[0]"]);
    refused(
        &["--mount", "/var/run/docker.sock:/var/run/docker.sock"],
        &["docker.mounts[0]"],
    );
    refused(&["--mount", "/var/run:/host-run"], &["docker.mounts[0]"]);
    let theirs = format!("{}:/x:ro", private.display());
    refused(&["--mount", &theirs], &["docker.mounts[0]"]);
    refused(&["--network", "bridge"], &["docker.network", "allowed_networks"]);
    let a = format!("{}:/in:ro", share.display());
    refused(
        &["--mount", &a, "--mount", &a],
        &["docker.mounts[1]", "docker.mounts[0] does already"],
    );
    let p = format!("{}:/proc/x:ro", share.display());
    refused(&["--mount", &p], &["docker.mounts[0]", "/proc/x"]);
    refused(&["--memory", "1K"], &["resources.memory", "6MiB"]);
    refused(&["--cpus", "1000"], &["resources.cpus", "the docker engine has"]);
    // `host` only because it is listed.
    let out = as_user(
        &d,
        who,
        &[
            "submit",
            "--wait",
            "--image",
            IMAGE,
            "--network",
            "host",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // A docker job owned by root is refused unless allow_root_jobs (the harness allows it;
    // this daemon does not).
    let strict = daemon_with(TestConfig::new().allow_root_jobs(false), "");
    let out = strict.ctl(&["submit", "--image", IMAGE, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("allow_root_jobs"), "{}", shown(&out));
}

#[test]
fn images_are_checked_on_what_they_resolve_to() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    // Only cyb-test:busybox (and what is the same image under another name).
    let d = Daemon::start_with(TestConfig::new().toml(
        "[docker]\nallowed_images = [\"docker.io/library/cyb-test:busybox\"]\nengine_check_interval = \"300ms\"\n",
    ));
    let run = |image: &str| -> Value {
        let id = d.submit(&["--image", image], &["true"]);
        ended(&d, id)
    };
    // Refused at intake (on what the engine had at its last check), naming the image.
    let refused = |image: &str, want: &[&str]| {
        let out = d.ctl(&["submit", "--image", image, "--", "true"]);
        assert_ne!(out.status.code(), Some(0), "{image} was accepted");
        let err = text(&out.stderr);
        for w in want {
            assert!(err.contains(w), "{image}: wanted `{w}` in: {err}");
        }
    };
    assert_eq!(run(IMAGE)["state"], "succeeded");
    assert_eq!(run("docker.io/library/cyb-test:busybox")["state"], "succeeded");
    // Another tag: refused, naming the image, the config key and what it allows.
    refused(
        IMAGE_ROOT_USER,
        &[
            IMAGE_ROOT_USER,
            "allowed_images: docker.io/library/cyb-test:busybox",
            "docker.image",
        ],
    );
    // By image id (a digest) of that other image: what it resolves to is not allowed.
    let other_id = field(&e.inspect(IMAGE_ROOT_USER), "Id");
    refused(&other_id, &["allowed_images"]);
    // By the id of the allowed one: it resolves to an allowed name.
    let ok_id = field(&e.inspect(IMAGE), "Id");
    assert_eq!(run(&ok_id)["state"], "succeeded");
    // Another name of the same image resolves to it (same content): allowed.
    assert_eq!(run(IMAGE_OTHER_NAME)["state"], "succeeded");
    // Another registry's image of the same name: not on this engine, never pulled.
    refused(
        "registry.example.org/library/cyb-test:busybox",
        &[
            "registry.example.org/library/cyb-test:busybox",
            "not on this host",
        ],
    );
    assert_eq!(d.records().len(), 4, "a refused job was recorded");
    // An empty allowlist refuses docker jobs at intake, naming the key.
    let none = Daemon::start();
    let out = none.ctl(&["submit", "--image", IMAGE, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("[docker] allowed_images"),
        "{}",
        shown(&out)
    );
}

#[test]
fn output_is_captured_from_the_first_line_and_capped() {
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon_with(TestConfig::new().max_log_bytes(1000), "");
    // A container that lives a moment.
    for _ in 0..5 {
        let id = submit(&d, &[], &["echo", "first and only"]);
        assert_eq!(ended(&d, id)["state"], "succeeded");
        assert_eq!(stdout(&d, id), "first and only\n");
    }
    let id = submit(
        &d,
        &[],
        &["sh", "-c", "yes 0123456789 | head -c 200000; echo done >&2"],
    );
    assert_eq!(ended(&d, id)["state"], "succeeded");
    let out = stdout(&d, id);
    assert!(out.starts_with("0123456789\n"), "{out}");
    assert!(
        out.len() < 1100 && out.contains("[cybd: output truncated at 1000 bytes]"),
        "{out}"
    );
    assert_eq!(stderr(&d, id), "done\n");
}

#[test]
fn oom_comes_from_the_engine_never_from_exit_137_alone() {
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon_with(TestConfig::new().kill_grace(Duration::from_secs(1)), "");
    let oom = submit(
        &d,
        &["--memory", "32M"],
        &["sh", "-c", "head -c 300m /dev/zero | tail > /dev/null"],
    );
    let by_itself = submit(&d, &[], &["sh", "-c", "kill -9 $$"]);
    let stubborn = submit(
        &d,
        &[],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo up; while true; do sleep 0.1; done",
        ],
    );
    let r = ended(&d, oom);
    assert_eq!(
        (r["state"].clone(), r["reason"].clone()),
        ("failed".into(), "oom_killed".into()),
        "{r}"
    );
    let r = ended(&d, by_itself);
    assert_eq!(r["reason"], "exit_code", "{r}");
    assert_eq!(r["exit_code"], 137);
    assert!(wait_until(LONG, || stdout(&d, stubborn) == "up\n"));
    let t = Instant::now();
    d.ctl_ok(&["cancel", &stubborn.to_string()]);
    let r = ended(&d, stubborn);
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["exit_code"], 137, "killed after the grace period: {r}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "stopped before the grace period"
    );
}

#[test]
fn a_timeout_stops_the_container_with_the_grace_period_then_kills_it() {
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon_with(TestConfig::new().kill_grace(Duration::from_secs(1)), "");
    let polite = submit(
        &d,
        &["--timeout", "2s"],
        &[
            "sh",
            "-c",
            "trap 'echo bye; exit 5' TERM; while true; do sleep 0.1; done",
        ],
    );
    let stubborn = submit(
        &d,
        &["--timeout", "2s"],
        &["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
    );
    let r = ended(&d, polite);
    assert_eq!(
        (r["state"].clone(), r["exit_code"].clone()),
        ("timed_out".into(), 5.into()),
        "{r}"
    );
    assert_eq!(stdout(&d, polite), "bye\n");
    let r = ended(&d, stubborn);
    assert_eq!(
        (r["state"].clone(), r["exit_code"].clone()),
        ("timed_out".into(), 137.into()),
        "{r}"
    );
}

#[test]
fn another_user_cannot_cancel_a_docker_job() {
    let Some(who) = root_and_test_user() else { return };
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon("");
    let id = submit(&d, &[], &["sleep", "30"]);
    d.wait_state(id, "running", LONG);
    let out = as_user(&d, who, &["cancel", &id.to_string()]);
    assert_ne!(out.status.code(), Some(0), "{}", shown(&out));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.job_state(id), "running");
    d.ctl_ok(&["cancel", &id.to_string()]);
    assert_eq!(ended(&d, id)["cancelled_by"], "root");
}

#[test]
fn a_restarted_cybd_readopts_its_containers_and_loses_no_line() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let mut d = daemon("");
    let script = "i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); sleep 0.05; done; exit 7";
    let id = submit(&d, &[], &["sh", "-c", script]);
    wait_container(&e, &d, id);
    assert!(wait_until(LONG, || stdout(&d, id).contains("line 5")));
    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    d.restart();
    let r = ended(&d, id);
    assert_eq!(
        (r["state"].clone(), r["exit_code"].clone()),
        ("failed".into(), 7.into()),
        "{r}"
    );
    let want: String = (0..40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout(&d, id), want, "lines lost or doubled");
    assert_eq!(r["attempts"], 1);

    // A container that ends while cybd is down is finalized, not run again.
    let id = submit(&d, &[], &["sh", "-c", "sleep 1; echo ran; exit 3"]);
    wait_container(&e, &d, id);
    d.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    d.restart();
    let r = ended(&d, id);
    assert_eq!(
        (r["exit_code"].clone(), r["attempts"].clone()),
        (3.into(), 1.into()),
        "{r}"
    );
    assert_eq!(stdout(&d, id), "ran\n");
    assert!(wait_until(Duration::from_secs(10), || containers_of(&e, &d, id).is_empty()));
}

#[test]
fn a_container_cybd_created_but_never_recorded_is_removed() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let mut d = daemon("");
    let inst = instance(&e, &d);
    let inst = inst.as_str().unwrap().to_string();
    // What a crash between create and record leaves: a created container of this cybd's
    // for a job that is not running (here, one it does not even know).
    let stray = e.cli_ok([
        "create",
        "--label",
        &format!("cyb.instance={inst}"),
        "--label",
        "cyb.job_id=999999",
        IMAGE,
        "sleep",
        "600",
    ]);
    let stray = stray.trim().to_string();
    // And a running job of this cybd's, which must survive the sweep.
    let keep = submit(&d, &[], &["sh", "-c", "sleep 3; echo kept"]);
    wait_container(&e, &d, keep);
    // Another cybd's container with the same job id is not touched.
    let foreign = e.cli_ok([
        "create",
        "--label",
        "cyb.instance=someone-else",
        "--label",
        "cyb.job_id=999999",
        IMAGE,
        "true",
    ]);
    let foreign = foreign.trim().to_string();
    d.kill9();
    d.restart();
    assert!(
        wait_until(Duration::from_secs(20), || e.inspect(&stray).is_null()),
        "the stray container is still there; log:\n{}",
        d.log()
    );
    assert!(
        !e.inspect(&foreign).is_null(),
        "another cybd's container was removed"
    );
    e.cli_ok(["rm", "-f", &foreign]);
    let r = ended(&d, keep);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(stdout(&d, keep), "kept\n");
}

/// Static GPUs backed by mknod'ed device nodes (this host has none), named in the config.
fn gpu_config(dir: &Path) -> TestConfig {
    let common = dir.join("nvidiactl");
    cyb_tests::mknod_char(&common, 195, 255, 0o666);
    let nodes: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.join(format!("nvidia{i}"));
            cyb_tests::mknod_char(&p, 195, i, 0o666);
            p
        })
        .collect();
    TestConfig::new().static_gpus(&[common], &nodes)
}

#[test]
fn gpu_docker_jobs_get_their_gpus_by_uuid_and_hold_the_locks() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon_with(gpu_config(dir.path()), "");
    let gpus = d.ctl_json(&["gpus"]);
    let id = submit(
        &d,
        &["--gpus", "1"],
        &["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES; sleep 4"],
    );
    let c = wait_container(&e, &d, id);
    let req = &e.inspect(&c)["HostConfig"]["DeviceRequests"][0];
    assert_eq!(req["Driver"], "nvidia", "{req}");
    let uuid = req["DeviceIDs"][0].as_str().unwrap().to_string();
    assert!(gpus.to_string().contains(&uuid), "{uuid} not in {gpus}");
    // The lockfile of that GPU is held while the container runs, across a restart.
    let lock = d.runtime_dir().join("gpu/0.lock");
    assert!(
        !cyb_tests::outside_can_lock(&lock),
        "GPU 0's lock is free while its job runs"
    );
    d.kill9();
    d.restart();
    assert!(
        !cyb_tests::outside_can_lock(&lock),
        "GPU 0's lock was lost with the daemon"
    );
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(stdout(&d, id).trim(), uuid);
    assert!(wait_until(
        Duration::from_secs(5),
        || cyb_tests::outside_can_lock(&lock)
    ));
    assert!(
        e.nvidia_hook_log().contains(&uuid),
        "the engine's GPU hook never saw {uuid}"
    );

    // Without the NVIDIA runtime, refused at intake, and health says why.
    let dir2 = tempfile::tempdir().unwrap();
    let none = daemon_with(gpu_config(dir2.path()), "gpu_runtime = \"cyb-absent-runtime\"");
    let h = none.ctl_json(&["health"]);
    assert_eq!(h["docker"]["gpus"], false, "{h}");
    assert!(
        field(&h["docker"], "gpu_problem").contains("cyb-absent-runtime"),
        "{h}"
    );
    let out = none.ctl(&["submit", "--gpus", "1", "--image", IMAGE, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("resources.gpus") && err.contains("cyb-absent-runtime"),
        "{err}"
    );
}

#[test]
fn with_the_engine_down_docker_jobs_wait_and_run_when_it_returns() {
    let _g = docker::exclusive();
    let Some(e) = docker::engine() else { return };
    let d = daemon("");
    let native = d.submit(&[], &["true"]);
    e.stop_engine();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let id = submit(&d, &[], &["echo", "after the engine came back"]);
        // Native jobs are not held up.
        let native2 = d.submit(&[], &["true"]);
        assert_eq!(d.wait_result(native2, LONG)["state"], "succeeded");
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            d.job_state(id),
            "queued",
            "a docker job did not wait for the engine"
        );
        let h = d.ctl_json(&["health"]);
        assert_eq!(h["docker"]["reachable"], false, "{h}");
        let warned = h["warnings"].to_string();
        assert!(warned.contains("docker jobs wait"), "{h}");
        id
    }));
    e.start_engine();
    let id = stopped.unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert_eq!(d.wait_result(native, LONG)["state"], "succeeded");
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(stdout(&d, id), "after the engine came back\n");
}

#[test]
fn an_engine_restart_under_a_running_container_ends_the_attempt_and_the_retry_runs() {
    let _g = docker::exclusive();
    let Some(e) = docker::engine() else { return };
    let d = daemon("");
    // The first attempt leaves a mark in artifacts/ and runs until the engine stops it;
    // the second finds the mark and succeeds.
    let spec = serde_json::json!({
        "docker": {"image": IMAGE, "command": ["sh", "-c",
            "if [ -e /cyb/artifacts/mark ]; then echo second; exit 0; fi; touch /cyb/artifacts/mark; echo first; sleep 120"]},
        "retry": {"max_attempts": 2, "backoff": "1s"}
    });
    let dir = tempfile::tempdir().unwrap();
    let id = d.submit_file(dir.path(), "job.json", &spec);
    wait_container(&e, &d, id);
    e.stop_engine();
    e.start_engine();
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}\n{}", d.log());
    assert_eq!(r["attempts"], 2, "{r}");
    // Each attempt's output follows the last one's.
    assert_eq!(
        stdout(&d, id),
        format!("first\n[cybd: attempt 2 of job {id}]\nsecond\n")
    );
}

#[test]
fn pull_missing_pulls_only_allowed_images_and_says_when_it_cannot() {
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = Daemon::start_with(TestConfig::new().toml(
        "[docker]\nallowed_images = [\"cyb-test:*\", \"registry.invalid/allowed/*\"]\npull = \"missing\"\nengine_check_interval = \"300ms\"\n",
    ));
    // Present: runs without a pull.
    let id = d.submit(&["--image", IMAGE], &["true"]);
    assert_eq!(ended(&d, id)["state"], "succeeded");
    // Absent and not allowed: refused at intake, without a pull, naming the image.
    let out = d.ctl(&["submit", "--image", "registry.invalid/other/app:1", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("registry.invalid/other/app:1") && err.contains("allowed_images"),
        "{err}"
    );
    // Absent and allowed: pulled, which fails here (no registry is reachable), said so.
    let id = d.submit(&["--image", "registry.invalid/allowed/app:1"], &["true"]);
    let r = ended(&d, id);
    assert_eq!(r["state"], "failed");
    let msg = field(&r, "message");
    assert!(
        msg.contains("cannot pull image registry.invalid/allowed/app:1"),
        "{msg}"
    );
}

#[test]
fn the_shipped_docker_example_runs_from_the_spool_as_its_owner() {
    let Some(who) = root_and_test_user() else { return };
    let _g = docker::shared();
    let Some(_e) = docker::engine() else { return };
    let d = daemon("");
    let body =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/examples/docker.json"))
            .unwrap();
    d.drop_job_as("docker.json", &body, who.0, who.1);
    assert!(
        wait_until(LONG, || d.records().len() == 1),
        "the example was not taken; log:\n{}",
        d.log()
    );
    let id = d.records()[0]["id"].as_u64().unwrap();
    let r = ended(&d, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["uid"], who.0);
    assert_eq!(stdout(&d, id), "hello from a container\n");
}

#[test]
fn a_container_whose_supervisor_died_too_is_finalized_from_the_engine_not_run_again() {
    let _g = docker::shared();
    let Some(e) = docker::engine() else { return };
    let mut d = daemon("");
    let id = submit(&d, &[], &["sh", "-c", "sleep 1; echo ran; exit 3"]);
    wait_container(&e, &d, id);
    let shown = d.ctl_json(&["show", &id.to_string()]);
    let sup = shown["supervisor"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no supervisor in {shown}"));
    // Both gone while the container runs: nobody records its end but the engine.
    d.kill9();
    // SAFETY: kill(2) of the supervisor this test's daemon started.
    assert_eq!(unsafe { libc::kill(sup as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(2500));
    d.restart();
    let r = ended(&d, id);
    assert_eq!(
        (r["state"].clone(), r["exit_code"].clone()),
        ("failed".into(), 3.into()),
        "{r}\n{}",
        d.log()
    );
    assert_eq!(r["attempts"], 1, "run again: {r}");
    assert!(d.log().contains("ended while nobody watched"), "{}", d.log());
    assert!(wait_until(Duration::from_secs(10), || containers_of(&e, &d, id).is_empty()));
}
