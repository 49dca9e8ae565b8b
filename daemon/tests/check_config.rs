//! `cybd --check-config`: a good file passes, a bad one fails naming the key.

use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cybd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cybd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn shipped_config_passes() {
    let (ok, out) = check(include_str!("../../etc/cybd.toml"));
    assert!(ok, "{out}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn bad_keys_are_named() {
    for (text, key) in [
        ("kill_grce = \"3s\"", "kill_grce"),
        ("[classes.cpu_long]\nslots = -2", "classes.cpu_long.slots"),
        ("[paths]\nlogs = \"logs\"", "paths.logs"),
        ("max_log_bytes = \"lots\"", "max_log_bytes"),
        ("allow_root_jobs = \"yes\"", "allow_root_jobs"),
    ] {
        let (ok, out) = check(text);
        assert!(!ok, "{text:?} passed");
        assert!(out.contains(key), "{text:?}: message does not name {key}: {out}");
    }
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_cybd"))
        .args(["--check-config", "--config", "/nonexistent/cybd.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cybd.toml"));
}
