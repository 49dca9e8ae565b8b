//! The shipped examples in etc/examples run as documented: native ones succeed through the
//! spool; those for backends this host lacks are refused with a clear error, never lost.

use std::time::Duration;

use cyb_tests::Daemon;

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../etc/examples/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn native_examples_run() {
    let d = Daemon::start();
    let names = [
        "hello.json",
        "shell-with-env.json",
        "retry-and-timeout.json",
        "artifacts.json",
        "limits.json",
    ];
    for n in names {
        d.drop_job(n, &example(n));
    }
    let mut results = Vec::new();
    for id in 1..=names.len() as u64 {
        results.push(d.wait_result(id, Duration::from_secs(60)));
    }
    for r in &results {
        assert_eq!(r["state"], "succeeded", "{r}");
    }
    let by_name = |n: &str| {
        let r = results
            .iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("no job named {n}"));
        r["id"].as_u64().unwrap()
    };
    let out = |id: u64| std::fs::read_to_string(d.run_dir(id).join("stdout.log")).unwrap();
    assert_eq!(out(by_name("hello")), "hello from cybd\n");
    let id = by_name("shell-with-env");
    assert_eq!(out(id), format!("hi from job {id} as root\n"));
    let flaky = results.iter().find(|r| r["name"] == "flaky").unwrap();
    assert_eq!(flaky["attempts"], 2, "{flaky}");
    let id = by_name("artifacts");
    assert_eq!(
        std::fs::read_to_string(d.run_dir(id).join("artifacts/cyb-demo/out.txt")).unwrap(),
        "result\n"
    );
}

#[test]
fn examples_for_absent_backends_are_refused_clearly() {
    let d = Daemon::start();
    for (n, needle) in [
        ("docker.json", "[docker] allowed_images is empty"),
        ("gpu-report.json", "backend not available on this host"),
        ("gpu-train.json", "this host has 0 GPU(s) available"),
    ] {
        d.drop_job(n, &example(n));
        let e = d.wait_rejected(n, Duration::from_secs(20));
        assert!(e["error"].as_str().unwrap().contains(needle), "{n}: {e}");
        assert!(d.rejected().join(n).exists(), "{n} itself is kept in rejected/");
    }
    assert!(d.records().is_empty());
}
