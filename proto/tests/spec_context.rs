//! Issue 15: a job's `context` is kept byte for byte, within its size cap, and records
//! written by earlier builds still load.

use cyb_proto::job::{JobRecord, JobState, Origin, Owner, Timestamp};
use cyb_proto::{SpecError, parse_job};

fn refused(json: &str, field: &str, words: &str) {
    let e: SpecError = parse_job(json.as_bytes()).expect_err(json);
    assert_eq!(e.field.as_deref(), Some(field), "{json}: {e}");
    assert!(e.message.contains(words), "{json}: `{words}` not in: {e}");
}

const CONTEXT: &str = r#"{"n": 9.7e+25, "big": 123456789012345678901234567890,
  "s": "caf\u00e9 \/", "a": [1, 2.50, -0.0, 1E400]}"#;

fn record(spec: cyb_proto::JobSpec) -> JobRecord {
    let now = Timestamp::now();
    JobRecord {
        id: 7,
        spec,
        owner: Owner {
            uid: 1000,
            gid: 1000,
            user: "u".into(),
        },
        origin: Origin::Rpc { pid: Some(1) },
        submitted_at: now,
        priority: 0,
        attempts: 0,
        first_started_at: None,
        run_dir: "/logs/run_7".into(),
        callback: None,
        state: JobState::Queued { since: now },
    }
}

#[test]
fn context_is_kept_byte_for_byte() {
    // 1E400 is not even an f64: a parsed Value could not hold it at all.
    let job = format!(r#"{{"command":["true"],"context":{CONTEXT}}}"#);
    let spec = parse_job(job.as_bytes()).unwrap();
    assert_eq!(serde_json::to_string(&spec.context).unwrap(), CONTEXT);
    // Through a record as the store writes it (pretty) and reads it.
    let rec = record(spec);
    let written = serde_json::to_vec_pretty(&rec).unwrap();
    assert!(
        String::from_utf8_lossy(&written).contains(CONTEXT),
        "{}",
        String::from_utf8_lossy(&written)
    );
    let back: JobRecord = serde_json::from_slice(&written).unwrap();
    assert_eq!(serde_json::to_string(&back.spec.context).unwrap(), CONTEXT);
    assert_eq!(back, rec);
    // And through the RPC's reader, which reads from a byte stream.
    let wire = serde_json::to_vec(&rec).unwrap();
    let back: JobRecord = serde_json::from_reader(&wire[..]).unwrap();
    assert_eq!(serde_json::to_string(&back.spec.context).unwrap(), CONTEXT);
}

#[test]
fn the_context_size_cap_still_applies() {
    let pad = "x".repeat(64 * 1024);
    refused(
        &format!(r#"{{"command":["true"],"context":"{pad}"}}"#),
        "context",
        "at most 65536",
    );
    let pad = "x".repeat(64 * 1024 - 2);
    assert!(parse_job(format!(r#"{{"command":["true"],"context":"{pad}"}}"#).as_bytes()).is_ok());
}

/// A record as earlier builds wrote it: `context` parsed into a Value and pretty-printed.
const OLD_RECORD: &str = r#"{
  "id": 3,
  "spec": {
    "name": "old",
    "class": "cpu_short",
    "context": {
      "k": [
        1,
        2
      ],
      "n": 9.699999999999999e25
    },
    "command": [
      "true"
    ],
    "resources": {
      "memory": 536870912
    },
    "timeout": "1m 30s"
  },
  "owner": {
    "uid": 1000,
    "gid": 1000,
    "user": "u"
  },
  "origin": {
    "via": "spool",
    "file": "old.json",
    "dev": 2049,
    "ino": 1234,
    "mtime_ns": 1700000000000000000
  },
  "submitted_at": "2025-01-01T00:00:00Z",
  "priority": 0,
  "attempts": 0,
  "run_dir": "/logs/run_3",
  "state": "queued",
  "since": "2025-01-01T00:00:00Z"
}
"#;

#[test]
fn records_written_by_earlier_builds_still_load() {
    let rec: JobRecord = serde_json::from_str(OLD_RECORD).unwrap();
    let ctx: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&rec.spec.context).unwrap()).unwrap();
    assert_eq!(ctx, serde_json::json!({"k": [1, 2], "n": 9.699999999999999e25}));
    // Written again and read again, it stays the same record.
    let again: JobRecord = serde_json::from_slice(&serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
    assert_eq!(again, rec);
    // A memory limit no earlier reader could take back (the record was quarantined) loads.
    let huge = OLD_RECORD.replace("536870912", "11529215046068469760");
    let rec: JobRecord = serde_json::from_str(&huge).unwrap();
    assert_eq!(
        rec.spec.resources.unwrap().memory.unwrap().0,
        11529215046068469760
    );
}
