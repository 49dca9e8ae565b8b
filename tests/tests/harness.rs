//! The test harness itself, where a person running `cargo test` would notice it: a test
//! that skips says so on the terminal, not only in the output libtest captures.

use std::process::Command;

/// Runs this test binary again, as `cargo test` does (output captured), with only
/// [`skip_probe`] and the probe switched on: the skip line must reach the real stderr.
#[test]
fn a_skip_is_printed_past_libtest_capture() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args(["--exact", "skip_probe", "--test-threads", "2"])
        .env("CYB_SKIP_PROBE", "1")
        .env_remove("CYB_TEST_STRICT")
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the probe failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("test skip_probe ... ok"),
        "the probe did not run and pass:\n{stdout}"
    );
    let line = "SKIPPED skip_probe: needs a prerequisite no host has";
    assert!(
        stderr.lines().any(|l| l == line),
        "no line {line:?} on stderr:\n{stderr}"
    );
    // And it was not held back as captured output of the test.
    assert!(
        !stdout.contains("SKIPPED"),
        "the skip went to captured stdout:\n{stdout}"
    );
}

/// Does nothing unless run by [`a_skip_is_printed_past_libtest_capture`].
#[test]
fn skip_probe() {
    if std::env::var_os("CYB_SKIP_PROBE").is_none() {
        return;
    }
    assert!(!cyb_tests::require(false, "a prerequisite no host has"));
}

/// The test user a run creates is gone when the run's last process exits, and one that was
/// there before stays. Run in a mount namespace of its own with private copies of `/etc`,
/// `/home` and `/run`, so this host's real users (and other test runs' lock) are untouched.
#[test]
fn the_test_user_a_run_creates_is_removed_at_exit() {
    if !cyb_tests::require(cyb_tests::is_root(), "root (to add users)")
        || !cyb_tests::require(cyb_tests::have("unshare"), "unshare (util-linux)")
    {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let user = cyb_tests::TEST_USER;
    let script = format!(
        r#"set -eu
etc=$(mktemp -d)
cp -a /etc/. "$etc"
mount --bind "$etc" /etc
mount -t tmpfs tmpfs /home
mount -t tmpfs tmpfs /run
userdel --remove {user} >/dev/null 2>&1 || true
# The probe makes sure the user exists while it runs; it must really have run.
probe() {{
  out=$(CYB_USER_PROBE=1 "$0" --exact test_user_probe --test-threads 1)
  case "$out" in *"1 passed"*) ;; *) echo "FAIL: the probe did not run: $out"; exit 1;; esac
}}
probe
if id {user} >/dev/null 2>&1; then echo "FAIL: {user} left after the run that made it"; exit 1; fi
if [ -e /home/{user} ]; then echo "FAIL: /home/{user} left"; exit 1; fi
if [ -e /run/cyb-tests-user.created ]; then echo "FAIL: marker left"; exit 1; fi
useradd --user-group {user}
probe
id {user} >/dev/null 2>&1 || {{ echo "FAIL: a {user} that was there before was removed"; exit 1; }}
echo "test user: ok"
"#
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(exe)
        .output()
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("test user: ok"), "{text}");
}

/// Does nothing unless run by [`the_test_user_a_run_creates_is_removed_at_exit`].
#[test]
fn test_user_probe() {
    if std::env::var_os("CYB_USER_PROBE").is_none() {
        return;
    }
    let (uid, _) = cyb_tests::test_user();
    assert!(nix::unistd::User::from_uid(uid.into()).ok().flatten().is_some());
}
