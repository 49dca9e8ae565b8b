//! Issue 15: no number in a job spec can panic the parser, every number is range-checked
//! with an error naming its field, and a job is a JSON object.

use cyb_proto::{SpecError, parse_job};

fn err(json: &str) -> SpecError {
    parse_job(json.as_bytes()).expect_err(json)
}

/// `json` is refused, blaming `field`, with `words` in the message.
fn refused(json: &str, field: &str, words: &str) {
    let e = err(json);
    assert_eq!(e.field.as_deref(), Some(field), "{json}: {e}");
    assert!(e.message.contains(words), "{json}: `{words}` not in: {e}");
}

#[test]
fn durations_no_duration_can_hold_are_refused_not_a_panic() {
    for (json, field) in [
        (r#"{"command":["true"],"timeout":1e20}"#, "timeout"),
        (
            r#"{"command":["true"],"timeout":18446744073709551616}"#,
            "timeout",
        ),
        (
            r#"{"command":["true"],"timeout":1.8446744073709552e19}"#,
            "timeout",
        ),
        (
            r#"{"command":["true"],"retry":{"max_attempts":2,"backoff":1e20}}"#,
            "retry.backoff",
        ),
        (
            r#"{"command":["true"],"retry":{"max_attempts":2,"max_backoff":1e300}}"#,
            "retry.max_backoff",
        ),
    ] {
        refused(json, field, "out of range (at most 1year)");
    }
    let e = err(r#"{"command":["true"],"timeout":1e20}"#);
    assert!(
        e.to_string()
            .starts_with("field `timeout`: 1e20s is out of range (at most 1year)"),
        "{e}"
    );
    refused(r#"{"command":["true"],"timeout":-0.5}"#, "timeout", "negative");
    refused(
        r#"{"command":["true"],"timeout":"99999999999999999999s"}"#,
        "timeout",
        "too large",
    );
}

#[test]
fn durations_are_at_most_a_year() {
    assert!(parse_job(br#"{"command":["true"],"timeout":31557600}"#).is_ok());
    assert!(parse_job(br#"{"command":["true"],"timeout":"1y"}"#).is_ok());
    assert!(parse_job(br#"{"command":["true"],"timeout":0.5}"#).is_ok());
    assert!(parse_job(br#"{"command":["true"],"retry":{"max_attempts":2,"backoff":0}}"#).is_ok());
    refused(
        r#"{"command":["true"],"timeout":31557601}"#,
        "timeout",
        "out of range",
    );
    refused(
        r#"{"command":["true"],"timeout":"2y"}"#,
        "timeout",
        "2years is out of range",
    );
    refused(
        r#"{"command":["true"],"retry":{"max_attempts":2,"backoff":"400days"}}"#,
        "retry.backoff",
        "out of range",
    );
    refused(
        r#"{"command":["true"],"retry":{"max_attempts":2,"max_backoff":18446744073709551615}}"#,
        "retry.max_backoff",
        "out of range",
    );
}

#[test]
fn memory_must_fit_a_signed_64_bit_number() {
    refused(
        r#"{"command":["true"],"resources":{"memory":"10EiB"}}"#,
        "resources.memory",
        "out of range",
    );
    refused(
        r#"{"command":["true"],"resources":{"memory":10000000000000000000}}"#,
        "resources.memory",
        "out of range",
    );
    refused(
        r#"{"command":["true"],"resources":{"memory":1.5}}"#,
        "resources.memory",
        "whole number of bytes",
    );
    let s = parse_job(br#"{"command":["true"],"resources":{"memory":9223372036854775807}}"#).unwrap();
    assert_eq!(s.resources.unwrap().memory.unwrap().0, i64::MAX as u64);
    assert!(parse_job(br#"{"command":["true"],"resources":{"memory":"7EiB"}}"#).is_ok());
}

#[test]
fn cpus_pids_and_gpus_have_ranges() {
    let r = |res: &str| format!(r#"{{"command":["true"],"class":"gpu","resources":{res}}}"#);
    for ok in [
        r#"{"cpus":0.01}"#,
        r#"{"cpus":4096}"#,
        r#"{"pids":1}"#,
        r#"{"pids":4194304}"#,
        r#"{"gpus":0}"#,
        r#"{"gpus":1024}"#,
    ] {
        parse_job(r(ok).as_bytes()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for (bad, field) in [
        (r#"{"cpus":0.001}"#, "resources.cpus"),
        (r#"{"cpus":4096.5}"#, "resources.cpus"),
        (r#"{"cpus":1e300}"#, "resources.cpus"),
        (r#"{"pids":4194305}"#, "resources.pids"),
        (r#"{"pids":9223372036854775807}"#, "resources.pids"),
        (r#"{"gpus":1025}"#, "resources.gpus"),
    ] {
        refused(&r(bad), field, "out of range");
    }
    // Too big for the field's type: still an error naming it, not a panic.
    for (bad, field) in [
        (r#"{"pids":1e20}"#, "resources.pids"),
        (r#"{"gpus":18446744073709551616}"#, "resources.gpus"),
    ] {
        let e = err(&r(bad));
        assert_eq!(e.field.as_deref(), Some(field), "{bad}: {e}");
    }
}

#[test]
fn other_numbers_name_their_field() {
    for (json, field) in [
        (r#"{"command":["true"],"priority":2147483648}"#, "priority"),
        (r#"{"command":["true"],"priority":1e20}"#, "priority"),
        (r#"{"command":["true"],"version":1e20}"#, "version"),
        (
            r#"{"command":["true"],"retry":{"max_attempts":101}}"#,
            "retry.max_attempts",
        ),
        (
            r#"{"command":["true"],"retry":{"max_attempts":1e20}}"#,
            "retry.max_attempts",
        ),
        (
            r#"{"command":["true"],"retry":{"max_attempts":2,"on_exit_codes":[0,256]}}"#,
            "retry.on_exit_codes[1]",
        ),
        (
            r#"{"command":["true"],"depends_on":[18446744073709551615]}"#,
            "depends_on[0]",
        ),
    ] {
        let e = err(json);
        assert_eq!(e.field.as_deref(), Some(field), "{json}: {e}");
    }
    assert_eq!(
        parse_job(br#"{"command":["true"],"priority":-2147483648}"#)
            .unwrap()
            .priority(),
        i32::MIN
    );
}

#[test]
fn a_job_is_a_json_object_not_an_array() {
    let e = err(r#"[null,"arr",null,null,null,null,null,["true"]]"#);
    assert_eq!(e.field, None, "{e}");
    assert!(e.message.contains("expected a JSON object"), "{e}");
    for (json, field) in [
        (r#"{"command":["true"],"resources":[1,2.0]}"#, "resources"),
        (r#"{"command":["true"],"retry":[3]}"#, "retry"),
        (r#"{"docker":["alpine"]}"#, "docker"),
        (r#"{"task":["gpu_report"]}"#, "task"),
        (r#"{"class":"gpu_slurm","shell":"x","slurm":["p"]}"#, "slurm"),
    ] {
        refused(json, field, "expected a JSON object");
    }
    // null stays "not given".
    let s = parse_job(br#"{"command":["true"],"resources":null,"retry":null}"#).unwrap();
    assert!(s.resources.is_none() && s.retry.is_none());
}
