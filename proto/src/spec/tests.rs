use super::*;

fn err(json: &str) -> SpecError {
    parse_job(json.as_bytes()).expect_err("spec should be refused")
}

#[test]
fn minimal_command_job() {
    let s = parse_job(br#"{"command": ["true"]}"#).unwrap();
    assert_eq!(s.class(), Class::CpuShort);
    assert_eq!(s.priority(), 0);
    assert_eq!(s.argv().unwrap(), vec!["true"]);
    assert_eq!(s.backend(), Backend::Native);
}

#[test]
fn full_job_parses() {
    let s = parse_job(
        br#"{"name":"train","class":"gpu","priority":5,"tenant":"ml","shell":"echo hi",
             "cwd":"/tmp","env":{"A":"1"},"resources":{"gpus":1,"cpus":1.5,"memory":"512MiB","pids":64},
             "timeout":"90s","retry":{"max_attempts":3,"backoff":"1s","on_exit_codes":[1]},
             "depends_on":[1],"artifacts":["out/*.txt"],"context":{"k":[1,2]}}"#,
    )
    .unwrap();
    assert_eq!(
        s.resources.as_ref().unwrap().memory,
        Some(Size(512 * 1024 * 1024))
    );
    assert_eq!(s.timeout, Some(Dur(Duration::from_secs(90))));
    assert_eq!(s.gpus(), 1);
    assert_eq!(s.argv().unwrap(), vec!["/bin/sh", "-c", "echo hi"]);
}

#[test]
fn unknown_field_is_named() {
    let e = err(r#"{"command":["true"],"comand":["x"]}"#);
    assert_eq!(e.field.as_deref(), Some("comand"));
    assert!(e.message.contains("unknown field"), "{e}");
    let e = err(r#"{"command":["true"],"resources":{"memroy":"1GiB"}}"#);
    assert_eq!(e.field.as_deref(), Some("resources.memroy"));
}

#[test]
fn exactly_one_payload() {
    let e = err(r#"{"name":"x"}"#);
    assert!(e.message.contains("exactly one of"), "{e}");
    let e = err(r#"{"command":["true"],"shell":"true"}"#);
    assert_eq!(e.field.as_deref(), Some("shell"));
}

#[test]
fn semantic_errors_name_their_field() {
    let cases = [
        (r#"{"command":[]}"#, "command"),
        (r#"{"command":[""]}"#, "command[0]"),
        (r#"{"shell":"  "}"#, "shell"),
        (r#"{"command":["true"],"cwd":"rel/dir"}"#, "cwd"),
        (
            r#"{"command":["true"],"resources":{"pids":-1}}"#,
            "resources.pids",
        ),
        (
            r#"{"command":["true"],"resources":{"memory":-5}}"#,
            "resources.memory",
        ),
        (
            r#"{"command":["true"],"resources":{"memory":"-5MiB"}}"#,
            "resources.memory",
        ),
        (r#"{"command":["true"],"resources":{"cpus":0}}"#, "resources.cpus"),
        (
            r#"{"command":["true"],"class":"cpu_long","resources":{"gpus":1}}"#,
            "resources.gpus",
        ),
        (
            r#"{"command":["true"],"class":"gpu","resources":{"gpus":-1}}"#,
            "resources.gpus",
        ),
        (r#"{"command":["true"],"class":"huge"}"#, "class"),
        (r#"{"command":["true"],"timeout":"soon"}"#, "timeout"),
        (r#"{"command":["true"],"timeout":"0s"}"#, "timeout"),
        (
            r#"{"command":["true"],"retry":{"max_attempts":0}}"#,
            "retry.max_attempts",
        ),
        (r#"{"command":["true"],"depends_on":[0]}"#, "depends_on[0]"),
        (r#"{"command":["true"],"artifacts":["../x"]}"#, "artifacts[0]"),
        (
            r#"{"command":["true"],"artifacts":["/etc/passwd"]}"#,
            "artifacts[0]",
        ),
        (
            r#"{"command":["true"],"env":{"CYB_JOB_ID":"1"}}"#,
            "env.CYB_JOB_ID",
        ),
        (r#"{"command":["true"],"priority":"high"}"#, "priority"),
        (r#"{"command":["true"],"callback_url":"ftp://x"}"#, "callback_url"),
        (r#"{"docker":{"image":""}}"#, "docker.image"),
        (r#"{"task":{"kind":"nope"}}"#, "task.kind"),
        (r#"{"command":["true"],"version":2}"#, "version"),
    ];
    for (json, field) in cases {
        let e = err(json);
        assert_eq!(e.field.as_deref(), Some(field), "{json}: {e}");
    }
}

#[test]
fn malformed_json_says_where() {
    let e = err("{\"command\": [\"true\"");
    assert!(e.message.contains("line 1"), "{e}");
    let e = err("\u{0}\u{ff}");
    assert!(!e.message.is_empty());
}

#[test]
fn backends() {
    assert_eq!(
        parse_job(br#"{"docker":{"image":"x"}}"#).unwrap().backend(),
        Backend::Docker
    );
    assert_eq!(
        parse_job(br#"{"task":{"kind":"gpu_report"}}"#).unwrap().backend(),
        Backend::Builtin
    );
    assert_eq!(
        parse_job(br#"{"class":"gpu_slurm","shell":"nvidia-smi"}"#)
            .unwrap()
            .backend(),
        Backend::Slurm
    );
}

#[test]
fn retry_backoff_doubles_and_caps() {
    let r = RetrySpec {
        max_attempts: 5,
        backoff: Some(Dur(Duration::from_secs(2))),
        max_backoff: Some(Dur(Duration::from_secs(5))),
        on_exit_codes: vec![3],
    };
    assert_eq!(r.delay_before(2), Duration::from_secs(2));
    assert_eq!(r.delay_before(3), Duration::from_secs(4));
    assert_eq!(r.delay_before(4), Duration::from_secs(5));
    assert!(r.retries_exit(Some(3)));
    assert!(!r.retries_exit(Some(1)));
    assert!(!r.retries_exit(None));
}

#[test]
fn schema_names_fields() {
    let s = schema().to_string();
    for f in ["command", "shell", "docker", "task", "resources", "depends_on"] {
        assert!(s.contains(f), "schema lacks {f}");
    }
}

#[test]
fn debug_never_prints_env_values_or_context() {
    let spec = parse_job(
        br#"{"command":["true"],"env":{"API_TOKEN":"hunter2-debug"},"context":{"ticket":"ctx-debug"}}"#,
    )
    .unwrap();
    for text in [format!("{spec:?}"), format!("{spec:#?}")] {
        assert!(!text.contains("hunter2-debug"), "{text}");
        assert!(!text.contains("ctx-debug"), "{text}");
        assert!(text.contains("API_TOKEN"), "the names are still shown: {text}");
    }
    // Serialized, the spec is whole: records and the owner's replies keep the values.
    let json = serde_json::to_string(&spec).unwrap();
    assert!(
        json.contains("hunter2-debug") && json.contains("ctx-debug"),
        "{json}"
    );
}

#[test]
fn others_get_the_env_names_but_neither_values_nor_context() {
    let mut spec =
        parse_job(br#"{"command":["true"],"env":{"A":"1","B":"2"},"context":{"ticket":"x"}}"#).unwrap();
    spec.hide_private();
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["env"], serde_json::json!({"A": HIDDEN, "B": HIDDEN}));
    assert!(json.get("context").is_none(), "{json}");
    assert_eq!(json["command"], serde_json::json!(["true"]));
    let mut spec = parse_job(br#"{"command":["true"],"callback_url":"https://h/x?token=t0k"}"#).unwrap();
    spec.hide_private();
    assert_eq!(spec.callback_url.as_deref(), Some(HIDDEN));
}

#[test]
fn sizes_are_powers_of_1024_as_docker_slurm_and_systemd_read_them() {
    use super::parse_size;
    const G: u64 = 1 << 30;
    for (text, bytes) in [
        ("4G", 4 * G),
        ("4g", 4 * G),
        ("4GiB", 4 * G),
        ("4GB", 4 * G),
        ("4 gib", 4 * G),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("64K", 64 << 10),
        ("64kb", 64 << 10),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
        ("1.5G", 3 * G / 2),
        ("0.5k", 512),
        ("4096", 4096),
        ("4096B", 4096),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for bad in [
        "",
        "lots",
        "4X",
        "4 GiBs",
        "-4G",
        "1.2.3G",
        ".G",
        "99999999999999999999G",
        "16E",
    ] {
        let e = parse_size(bad).unwrap_err();
        assert!(e.contains("K, M, G, T, P or E"), "{bad}: {e}");
    }
}

#[test]
fn a_bad_size_names_the_field_and_the_accepted_forms() {
    let e = err(r#"{"command": ["true"], "resources": {"memory": "4 gigs"}}"#).to_string();
    assert!(e.contains("resources.memory"), "{e}");
    assert!(e.contains("unknown unit `gigs`"), "{e}");
    assert!(e.contains("powers of 1024"), "{e}");
    let spec = parse_job(br#"{"command": ["true"], "resources": {"memory": "4G"}}"#).unwrap();
    assert_eq!(spec.resources.and_then(|r| r.memory), Some(Size(4 << 30)));
}
