//! Issue 15: whatever intake accepts, the store can read back. A property test over the
//! spec's types: every spec that passes the checks is written as the store writes a record
//! (pretty JSON) and read back equal, and written as a job file it parses to the same spec.

use std::time::Duration;

use cyb_proto::job::{JobRecord, JobState, Origin, Owner, Timestamp};
use cyb_proto::spec::{
    Class, DockerSpec, Dur, RawJson, Resources, RetrySpec, Size, SlurmSpec, TaskKind, TaskSpec,
};
use cyb_proto::{JobSpec, parse_job};
use proptest::prelude::*;

/// A number as a person might write one: integers of any length, fractions, exponents.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,30})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
        Just("9.7e+25".to_string()),
        Just("-0.0".to_string()),
        Just("1E400".to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn string_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        Just(r#""caf\u00e9 \/ \ud83d\ude00""#.to_string()),
    ]
}

/// Any JSON text, spaced in any of a few ways.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number_text(),
        string_text(),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let sep = prop_oneof![Just(","), Just(", "), Just(",\n  ")];
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..4), sep.clone())
                .prop_map(|(v, sep)| format!("[{}]", v.join(sep))),
            (
                prop::collection::vec((string_text(), inner), 0..4),
                sep,
                prop_oneof![Just(":"), Just(": ")]
            )
                .prop_map(|(kv, sep, colon)| {
                    let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}{colon}{v}")).collect();
                    format!("{{{}}}", body.join(sep))
                }),
        ]
    })
}

fn duration() -> impl Strategy<Value = Dur> {
    prop_oneof![
        6 => (0..=40_000_000u64, 0..1_000_000_000u32).prop_map(|(s, n)| Dur(Duration::new(s, n))),
        6 => (0..=100_000u64).prop_map(|s| Dur(Duration::from_secs(s))),
        1 => (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Dur(Duration::new(s, n))),
        2 => (31_557_590..31_557_610u64, 0..2u32).prop_map(|(s, n)| Dur(Duration::new(s, n))),
    ]
}

fn small_or_any_i64(lo: i64, hi: i64) -> impl Strategy<Value = i64> {
    prop_oneof![8 => lo..=hi, 1 => any::<i64>()]
}

fn cpus() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 0.0..5000.0f64,
        1 => Just(0.01),
        1 => Just(4096.0),
        1 => any::<f64>(),
    ]
}

fn resources() -> impl Strategy<Value = Resources> {
    (
        proptest::option::of(small_or_any_i64(0, 1100)),
        proptest::option::of(cpus()),
        proptest::option::of(prop_oneof![
            3 => (1..=1u64 << 40).prop_map(Size),
            1 => Just(Size(i64::MAX as u64)),
            1 => any::<u64>().prop_map(Size),
        ]),
        proptest::option::of(small_or_any_i64(1, 5_000_000)),
    )
        .prop_map(|(gpus, cpus, memory, pids)| Resources {
            gpus,
            cpus,
            memory,
            pids,
        })
}

fn retry() -> impl Strategy<Value = RetrySpec> {
    (
        small_or_any_i64(1, 100),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        prop::collection::vec(small_or_any_i64(0, 255), 0..3),
    )
        .prop_map(|(max_attempts, backoff, max_backoff, on_exit_codes)| RetrySpec {
            max_attempts,
            backoff,
            max_backoff,
            on_exit_codes,
        })
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![8 => "[a-zA-Z0-9 ._-]{1,20}", 1 => any::<String>()]
}

/// What the job runs: (command, shell, docker, task).
type Payloads = (
    Option<Vec<String>>,
    Option<String>,
    Option<DockerSpec>,
    Option<TaskSpec>,
);

fn payload() -> impl Strategy<Value = Payloads> {
    prop_oneof![
        prop::collection::vec(label(), 1..4).prop_map(|c| (Some(c), None, None, None)),
        label().prop_map(|s| (None, Some(s), None, None)),
        (
            label(),
            proptest::option::of(prop::collection::vec(label(), 1..3))
        )
            .prop_map(|(image, command)| (
                None,
                None,
                Some(DockerSpec {
                    image,
                    command,
                    entrypoint: None,
                    mounts: vec!["/a:/b:ro".into()],
                    network: Some("none".into()),
                    workdir: Some("/w".into()),
                }),
                None
            )),
        (
            prop_oneof![
                Just(TaskKind::GpuReport),
                Just(TaskKind::ServiceMap),
                Just(TaskKind::LogTriage)
            ],
            proptest::option::of(json_text())
        )
            .prop_map(|(kind, param)| {
                let mut params = serde_json::Map::new();
                if let Some(v) = param.and_then(|p| serde_json::from_str(&p).ok()) {
                    params.insert("p".into(), v);
                }
                (None, None, None, Some(TaskSpec { kind, params }))
            }),
    ]
}

fn class() -> impl Strategy<Value = Class> {
    prop::sample::select(Class::ALL.to_vec())
}

prop_compose! {
    fn spec()(
        version in proptest::option::of(prop_oneof![8 => Just(1u32), 1 => any::<u32>()]),
        name in proptest::option::of(label()),
        class in proptest::option::of(class()),
        priority in proptest::option::of(any::<i32>()),
        tenant in proptest::option::of(label()),
        context in proptest::option::of(json_text()),
        (command, shell, docker, task) in payload(),
        cwd in proptest::option::of("/[a-z/]{0,10}"),
        env in prop::collection::btree_map("[A-Z]{1,4}", label(), 0..3),
        resources in proptest::option::of(resources()),
        timeout in proptest::option::of(duration()),
        retry in proptest::option::of(retry()),
        depends_on in prop::collection::vec(small_or_any_i64(1, 1000), 0..3),
        callback_url in proptest::option::of("https?://[a-z]{1,5}/[a-z]{0,5}"),
        slurm in proptest::option::of(Just(SlurmSpec {
            partition: Some("p".into()),
            account: None,
            options: vec!["--time=10:00".into()],
        })),
    ) -> JobSpec {
        JobSpec {
            version,
            name,
            class,
            priority,
            tenant,
            workflow_id: None,
            // `"context": null` is no context, as for any other field.
            context: context.filter(|c| c != "null").and_then(|c| RawJson::from_text(c).ok()),
            command,
            shell,
            docker,
            task,
            cwd,
            env: env.into_iter().collect(),
            resources,
            timeout,
            retry,
            depends_on,
            artifacts: vec!["out/*.txt".into()],
            callback_url,
            slurm,
        }
    }
}

fn record(spec: JobSpec) -> JobRecord {
    let now = Timestamp::now();
    JobRecord {
        id: 1,
        priority: spec.priority(),
        spec,
        owner: Owner {
            uid: 1000,
            gid: 1000,
            user: "u".into(),
        },
        origin: Origin::Spool {
            file: "f.json".into(),
            dev: 1,
            ino: 2,
            mtime_ns: 3,
        },
        submitted_at: now,
        attempts: 0,
        first_started_at: None,
        run_dir: "/logs/run_1".into(),
        callback: None,
        state: JobState::Queued { since: now },
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        max_global_rejects: 100_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_accepted_spec_reads_back_the_same(spec in spec()) {
        prop_assume!(spec.validate().is_ok());
        // As the store writes and reads a record.
        let rec = record(spec.clone());
        let bytes = serde_json::to_vec_pretty(&rec).unwrap();
        let back: Result<JobRecord, _> = serde_json::from_slice(&bytes);
        prop_assert!(back.is_ok(), "record not read back: {:?}\n{}", back.err(), String::from_utf8_lossy(&bytes));
        prop_assert_eq!(back.unwrap(), rec);
        // As a job file: accepted again, as the same spec.
        let text = serde_json::to_vec(&spec).unwrap();
        let again = parse_job(&text);
        prop_assert_eq!(again, Ok(spec), "{}", String::from_utf8_lossy(&text));
    }

    /// The readers of sizes and durations take back whatever their writers write, even
    /// outside the ranges intake accepts (records of earlier builds).
    #[test]
    fn sizes_and_durations_read_back(size in any::<u64>(), d in duration()) {
        let s: Size = serde_json::from_slice(&serde_json::to_vec(&Size(size)).unwrap()).unwrap();
        prop_assert_eq!(s, Size(size));
        let text = serde_json::to_vec(&d).unwrap();
        let back: Result<Dur, _> = serde_json::from_slice(&text);
        prop_assert_eq!(back.ok(), Some(d), "{}", String::from_utf8_lossy(&text));
    }
}
