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

