//! cybctl commands that need no daemon: `validate` of the shipped examples, `schema`, and
//! the error when no daemon answers.

use std::process::Command;

fn cybctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cybctl"))
        .arg("--socket")
        .arg("/nonexistent/cybd.sock")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn shipped_examples_are_valid_specs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let out = cybctl(&["validate", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        n += 1;
    }
    assert!(n >= 5, "only {n} examples");
}

#[test]
fn validate_names_the_field_and_exits_65() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json");
    std::fs::write(&f, r#"{"command":["true"],"resources":{"memory":"-1GiB"}}"#).unwrap();
    let out = cybctl(&["--json", "validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["field"], "resources.memory");
    assert!(v["error"].as_str().unwrap().contains("negative"), "{v}");
}

#[test]
fn schema_is_json_schema_of_the_spec() {
    let out = cybctl(&["schema"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["$schema"].as_str().unwrap_or_default().contains("json-schema"),
        "{v}"
    );
    for f in [
        "command",
        "shell",
        "docker",
        "task",
        "resources",
        "retry",
        "depends_on",
    ] {
        assert!(v["properties"].get(f).is_some(), "schema lacks {f}");
    }
}

#[test]
fn unreachable_daemon_says_what_to_do() {
    let out = cybctl(&["ls"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach cybd at /nonexistent/cybd.sock"),
        "{err}"
    );
    assert!(err.contains("is the daemon running?"), "{err}");
}
