//! The README cannot rot: every command of its walkthrough ("Five minutes with cybd") is run,
//! in order, in one shell, as an ordinary user (the harness's test user, with a home of its
//! own and no `XDG_RUNTIME_DIR`, as under `su`), against a real user-mode daemon started the
//! way the README says (`cybd --user`). Each command's exit code and the outputs and files
//! the README promises are checked. The walkthrough's commands must be exactly the ones
//! listed here, so a change to one side without the other fails.
//!
//! The one substitution: `$PWD/target/release` (where the README's `cargo build --release`
//! puts the binaries) is replaced by the directory of the binaries under test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cyb_tests::{TEST_USER, bin, bin_dir, root_and_test_user, wait_until};
use serde_json::Value;

const README: &str = include_str!("../../README.md");

/// The walkthrough, command by command (trailing comments left out).
const WALKTHROUGH: &[&str] = &[
    "export PATH=$PWD/target/release:$PATH",
    "SPOOL=~/.local/share/cyb/spool",
    r#"echo '{"name": "hello", "shell": "echo hello from $USER; sleep 2"}' > $SPOOL/incoming/.hello.tmp"#,
    "sync $SPOOL/incoming/.hello.tmp",
    "mv $SPOOL/incoming/.hello.tmp $SPOOL/incoming/hello.json",
    "id=$(cybctl submit --parsable -- sh -c 'for i in 1 2 3; do echo step $i; sleep 1; done')",
    "cybctl submit --name build --priority 5 --timeout 10m --env MODE=fast -- make -j2",
    r#"cybctl submit --wait --shell 'exit 3'; echo "exit code $?""#,
    "cybctl ls",
    "cybctl show $id",
    "cybctl logs -f $id",
    "cat ~/.local/state/cyb/logs/run_$id/result.json",
    "id=$(cybctl submit --parsable -- sh -c 'sleep 1; exit 4')",
    r#"cybctl wait "$id"; echo $?"#,
    r#"echo '{"comand": ["true"]}' > $SPOOL/incoming/broken.json"#,
    "sleep 1; cat $SPOOL/rejected/broken.json.error.json",
    "cybctl validate etc/examples/hello.json",
];

/// The first `sh` block after `heading`, as commands: blank and comment lines dropped,
/// trailing comments (two spaces or more, then `#`) cut.
fn commands_under(heading: &str) -> Vec<String> {
    let section = README
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no `{heading}`"))
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a ```sh block")
        .0;
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_once("  #")
                .map_or(l, |(cmd, _)| cmd)
                .trim_end()
                .to_string()
        })
        .collect()
}

/// What one command printed (stdout and stderr together) and its exit status.
struct Ran {
    out: String,
    rc: i32,
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let cmds = commands_under("## Five minutes with cybd");
    assert_eq!(
        cmds, WALKTHROUGH,
        "the README's walkthrough and this test disagree: change both"
    );
    assert!(
        README.contains("cargo build --release && ./target/release/cybd --user"),
        "the README no longer starts the user-mode daemon as this test does"
    );
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    // The user's home, holding what the walkthrough reads from the checkout.
    let home = tempfile::Builder::new()
        .prefix("cyb-readme-")
        .tempdir_in("/tmp")
        .unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(home.path().join("etc/examples")).unwrap();
    std::fs::copy(
        repo.join("etc/examples/hello.json"),
        home.path().join("etc/examples/hello.json"),
    )
    .unwrap();
    let chown = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}")])
        .arg(home.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let as_user = |prog: &Path| {
        let mut c = Command::new("runuser");
        c.args(["-u", TEST_USER, "--", "env", "-i"])
            .arg(format!("HOME={}", home.path().display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin")
            .arg(prog)
            .current_dir(home.path());
        c
    };

    // "The two commands": the user-mode daemon, in the foreground of its own terminal.
    let daemon = as_user(&bin("cybd"))
        .arg("--user")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = home.path().join(".local/state/cyb/cybd.sock");
    let up = wait_until(Duration::from_secs(30), || socket.exists());

    let bins = bin_dir().display().to_string();
    let mut script = String::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let cmd = cmd.replace("$PWD/target/release", &bins);
        script.push_str(&format!(
            "printf '\\n@@cmd {i}\\n'\n{cmd}\nprintf '\\n@@rc %d\\n' $?\n"
        ));
    }
    let script_path = home.path().join("walkthrough.sh");
    std::fs::write(&script_path, &script).unwrap();
    let out = if up {
        let mut c = as_user(Path::new("/bin/bash"));
        c.arg(&script_path);
        Some(c.output().unwrap())
    } else {
        None
    };
    cyb_tests::terminate(daemon);
    let out = out.expect("the user-mode daemon did not come up");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Split the transcript back into commands.
    let mut ran = Vec::new();
    for i in 0..cmds.len() {
        let start = format!("\n@@cmd {i}\n");
        let body = all
            .split_once(&start)
            .unwrap_or_else(|| panic!("command {i} never ran: {all}"))
            .1;
        let (printed, after) = body.split_once("\n@@rc ").expect("its status");
        let rc = after.lines().next().unwrap_or("").trim().parse().unwrap_or(-1);
        ran.push(Ran {
            out: printed.to_string(),
            rc,
        });
    }
    let say = |i: usize| format!("`{}` printed:\n{}", cmds[i], ran[i].out);
    for (i, r) in ran.iter().enumerate() {
        assert_eq!(r.rc, 0, "exit code {}: {}", r.rc, say(i));
    }
    // 6: an ordinary submission says so.
    assert!(ran[6].out.contains("submitted job"), "{}", say(6));
    // 7: `submit --wait` ends with the job's own exit code.
    assert!(ran[7].out.contains("exit code 3"), "{}", say(7));
    // 8: the queue shows the spool file's job and the named one.
    assert!(
        ran[8].out.contains("hello") && ran[8].out.contains("build"),
        "{}",
        say(8)
    );
    // 9: show names what the job runs.
    assert!(ran[9].out.contains("for i in 1 2 3"), "{}", say(9));
    // 10: logs -f follows the job to its end.
    for step in ["step 1", "step 2", "step 3"] {
        assert!(ran[10].out.contains(step), "{}", say(10));
    }
    // 11: its result.json says it succeeded.
    let result: Value = serde_json::from_str(ran[11].out.trim())
        .unwrap_or_else(|e| panic!("result.json is not JSON ({e}): {}", say(11)));
    assert_eq!(result["state"], "succeeded", "{result}");
    assert_eq!(result["user"], TEST_USER, "{result}");
    // 13: wait exits with the job's code.
    assert_eq!(ran[13].out.trim().lines().last(), Some("4"), "{}", say(13));
    // 15: the broken file's reason names the field.
    assert!(ran[15].out.contains("comand"), "{}", say(15));
    // And the spool file's job ran, as that user (whichever id it got).
    let want = format!("hello from {TEST_USER}\n");
    let ran_hello = wait_until(Duration::from_secs(10), || {
        std::fs::read_dir(home.path().join(".local/state/cyb/logs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path().join("stdout.log")).is_ok_and(|t| t == want))
    });
    assert!(ran_hello, "no run directory has `{want}` in its stdout.log");
}
