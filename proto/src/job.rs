//! A job as the daemon keeps it: the accepted spec, its owner, and its state, where each state
//! carries its own data (a running job always has a start time and a supervisor).

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::spec::JobSpec;

/// Job ids are positive integers, never reused.
pub type JobId = u64;

/// Wall-clock time, written as RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(#[serde(with = "time::serde::rfc3339")] pub OffsetDateTime);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(OffsetDateTime::now_utc())
    }

    /// Milliseconds from `self` to `later` (0 if `later` is earlier).
    pub fn ms_until(self, later: Timestamp) -> u64 {
        let d = later.0 - self.0;
        u64::try_from(d.whole_milliseconds()).unwrap_or(0)
    }

    pub fn unix_ms(self) -> i128 {
        self.0.unix_timestamp_nanos() / 1_000_000
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&time::format_description::well_known::Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}", self.0.unix_timestamp()),
        }
    }
}

/// The user a job runs as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
}

/// Where a job came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Origin {
    /// A file in the spool's `incoming/`; identified so a restart never takes it twice.
    Spool {
        file: String,
        dev: u64,
        ino: u64,
        mtime_ns: i64,
    },
    /// An RPC call from process `pid`.
    Rpc { pid: Option<i32> },
}

/// The running process that supervises an attempt, identified against pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22).
    pub start_ticks: u64,
}

/// The simple name of a state, for filters and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    Queued,
    Held,
    Waiting,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl StateName {
    pub const ALL: [StateName; 8] = [
        StateName::Queued,
        StateName::Held,
        StateName::Waiting,
        StateName::Running,
        StateName::Succeeded,
        StateName::Failed,
        StateName::TimedOut,
        StateName::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StateName::Queued => "queued",
            StateName::Held => "held",
            StateName::Waiting => "waiting",
            StateName::Running => "running",
            StateName::Succeeded => "succeeded",
            StateName::Failed => "failed",
            StateName::TimedOut => "timed_out",
            StateName::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StateName::Succeeded | StateName::Failed | StateName::TimedOut | StateName::Cancelled
        )
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StateName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StateName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown state `{s}` (expected one of {})",
                    StateName::ALL.map(StateName::as_str).join(", ")
                )
            })
    }
}

/// Why a job ended the way it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The process exited with status 0.
    Success,
    /// The process exited with a non-zero status.
    ExitCode,
    /// The process was killed by a signal it did not get from cybd.
    Signal,
    /// The kernel's OOM killer ended the job.
    OomKilled,
    /// A job in `depends_on` did not succeed.
    DependencyFailed,
    /// The wall-clock limit was reached.
    Timeout,
    /// A person cancelled the job.
    Cancelled,
    /// The job's supervisor vanished without recording an exit status.
    Lost,
    /// The job could not be started (no such program, no such cwd, no such user...).
    SpawnFailed,
    /// The daemon has no backend for this job on this host.
    BackendUnavailable,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from));
        f.write_str(s.as_deref().unwrap_or("unknown"))
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub reason: Reason,
    /// The reason in words.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    /// Highest memory use of the job's cgroup, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// CPU time of every process of the job's cgroup, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_ms: Option<u64>,
    /// The GPUs the attempt held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<HeldGpu>,
    /// The container the attempt ran in (docker jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// What went wrong around the job without deciding how it ended: artifacts that could
    /// not be collected, a cgroup that could not be cleaned up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Outcome {
    /// An outcome that finished now, with nothing measured.
    pub fn now(reason: Reason, message: impl Into<String>) -> Outcome {
        Outcome {
            reason,
            message: message.into(),
            exit_code: None,
            signal: None,
            started_at: None,
            finished_at: Timestamp::now(),
            peak_memory_bytes: None,
            cpu_usage_ms: None,
            gpus: Vec::new(),
            container_id: None,
            errors: Vec::new(),
        }
    }
}

/// How a running attempt is found again, by the backend that runs it.
///
/// Flattened into the `running` record, its fields tell the backends apart (`untagged`):
/// a native attempt has `supervisor` and `boot_id`, which is exactly what records written
/// before backends existed hold, so they load as native. Later backends add variants with
/// a required field of their own (a container id, a Slurm job id) ahead of `Native`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunHandle {
    /// A container, driven by a supervisor exactly as a native job is (the supervisor
    /// attaches to it, starts it, stops it and records how it ended).
    Docker {
        /// The container's name (`cyb-<instance>-<job>-<attempt>`), fixed before it is
        /// created, so a record written while it was being created still finds it.
        container: String,
        /// The engine's id of the container, once created.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supervisor: Option<ProcRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<String>,
    },
    Native {
        /// The attempt's supervisor, once it has been handed the job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supervisor: Option<ProcRef>,
        /// The kernel's boot id when the attempt started: a daemon that finds another one
        /// knows the host restarted and the attempt's supervisor is gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<String>,
    },
}

impl RunHandle {
    /// The backend this handle belongs to.
    pub fn backend(&self) -> crate::spec::Backend {
        match self {
            RunHandle::Native { .. } => crate::spec::Backend::Native,
            RunHandle::Docker { .. } => crate::spec::Backend::Docker,
        }
    }

    /// The attempt's supervisor (every backend so far runs one per attempt).
    pub fn supervisor(&self) -> Option<ProcRef> {
        match self {
            RunHandle::Native { supervisor, .. } | RunHandle::Docker { supervisor, .. } => *supervisor,
        }
    }

    /// The boot the attempt started in.
    pub fn boot_id(&self) -> Option<&str> {
        match self {
            RunHandle::Native { boot_id, .. } | RunHandle::Docker { boot_id, .. } => boot_id.as_deref(),
        }
    }
}

/// A GPU an attempt held: its index on this host and, when the inventory knows it, its
/// UUID (indices can change across reboots and driver reloads; UUIDs do not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldGpu {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// The state of a job, with the data that state has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Queued {
        since: Timestamp,
    },
    Held {
        since: Timestamp,
        by: String,
    },
    /// Waiting out the retry backoff before attempt `next_attempt`.
    Waiting {
        until: Timestamp,
        next_attempt: u32,
        last: Box<Outcome>,
    },
    Running {
        started_at: Timestamp,
        attempt: u32,
        /// Indices of the GPUs this attempt holds (their lockfiles stay locked for as long
        /// as it runs).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<u32>,
        /// What the job's backend needs to find the attempt again after a daemon restart.
        #[serde(flatten)]
        handle: RunHandle,
    },
    Succeeded {
        outcome: Box<Outcome>,
    },
    Failed {
        outcome: Box<Outcome>,
    },
    TimedOut {
        outcome: Box<Outcome>,
    },
    Cancelled {
        outcome: Box<Outcome>,
        by: String,
    },
}

impl JobState {
    pub fn name(&self) -> StateName {
        match self {
            JobState::Queued { .. } => StateName::Queued,
            JobState::Held { .. } => StateName::Held,
            JobState::Waiting { .. } => StateName::Waiting,
            JobState::Running { .. } => StateName::Running,
            JobState::Succeeded { .. } => StateName::Succeeded,
            JobState::Failed { .. } => StateName::Failed,
            JobState::TimedOut { .. } => StateName::TimedOut,
            JobState::Cancelled { .. } => StateName::Cancelled,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.name().is_terminal()
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            JobState::Succeeded { outcome }
            | JobState::Failed { outcome }
            | JobState::TimedOut { outcome }
            | JobState::Cancelled { outcome, .. } => Some(outcome),
            JobState::Waiting { last, .. } => Some(last),
            _ => None,
        }
    }
}

/// One job: the durable record the daemon keeps, and what `cybctl show` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    /// The accepted spec (`name` and `class` filled in).
    pub spec: JobSpec,
    pub owner: Owner,
    pub origin: Origin,
    pub submitted_at: Timestamp,
    /// Effective priority (the spec's, unless changed with `cybctl priority`).
    pub priority: i32,
    /// Attempts started so far.
    pub attempts: u32,
    /// When the current or last attempt started running (first attempt: queue wait ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_started_at: Option<Timestamp>,
    pub run_dir: String,
    #[serde(flatten)]
    pub state: JobState,
    /// Where the POST of `result.json` to the spec's `callback_url` stands. Never stored in
    /// the record: the daemon fills it from its callback outbox when it answers `show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Box<CallbackStatus>>,
}

/// The delivery of one job's callback (`callback_url`), as `cybctl show` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallbackStatus {
    pub url: String,
    /// The `webhook-id` header: the same on every try of this delivery, so the receiver
    /// can drop a repeat (delivery is at least once).
    pub webhook_id: String,
    /// POSTs made so far.
    pub attempts: u32,
    #[serde(flatten)]
    pub state: CallbackState,
    /// Why the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CallbackState {
    /// Not delivered yet; the next try is due at `next_try`.
    Retrying { next_try: Timestamp },
    /// A try was answered with a 2xx status.
    Delivered { at: Timestamp, status: u16 },
    /// No more tries: the receiver answered 410 Gone, the retry schedule ran out, or the
    /// host is no longer in `[callbacks] allowed_hosts`.
    GivenUp { at: Timestamp },
}

impl JobRecord {
    /// The record as the user `uid` may read it: whole for the job's owner and for an admin,
    /// without `env` values and `context` for anyone else ([`JobSpec::hide_private`]).
    /// Everything the daemon answers with a record goes through this.
    pub fn seen_by(mut self, uid: u32, admin: bool) -> JobRecord {
        if !admin && uid != self.owner.uid {
            self.spec.hide_private();
            // The delivery state says how it stands, not where it goes: the URL and the
            // receiver's answers (which may quote it) are the owner's.
            if let Some(c) = &mut self.callback {
                c.url = crate::spec::HIDDEN.to_string();
                if c.last_error.is_some() {
                    c.last_error = Some(crate::spec::HIDDEN.to_string());
                }
            }
        }
        self
    }

    pub fn name(&self) -> &str {
        self.spec.name.as_deref().unwrap_or("")
    }

    /// The process exit code `cybctl wait` returns for this job.
    pub fn wait_exit_code(&self) -> i32 {
        match &self.state {
            JobState::Succeeded { .. } => 0,
            JobState::Failed { outcome }
            | JobState::TimedOut { outcome }
            | JobState::Cancelled { outcome, .. } => {
                match (outcome.reason, outcome.exit_code, outcome.signal) {
                    // Like timeout(1), and like a shell whose job was interrupted: the signal
                    // cybd itself sent says nothing about the job.
                    (Reason::Timeout, ..) => 124,
                    (Reason::Cancelled, ..) => 130,
                    (_, Some(c), _) if c != 0 => c,
                    (_, _, Some(s)) => 128 + s,
                    _ => 1,
                }
            }
            _ => 1,
        }
    }
}

/// The contents of `result.json` in a run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub id: JobId,
    pub name: String,
    pub state: StateName,
    pub reason: Reason,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub attempts: u32,
    pub submitted_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub queue_wait_ms: u64,
    pub run_ms: u64,
    pub user: String,
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
    /// Highest memory use of the job's cgroup (page cache included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// CPU time of all the job's processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_ms: Option<u64>,
    /// The backend that ran the job (`native`, `docker`, `slurm`, `builtin`).
    pub backend: crate::spec::Backend,
    /// The container the last attempt ran in (docker jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The GPUs the last attempt held, by index and UUID.
    #[serde(default)]
    pub gpus: Vec<HeldGpu>,
    /// Artifact collection and cleanup failures of the last attempt (empty when none).
    #[serde(default)]
    pub errors: Vec<String>,
}

impl RunResult {
    /// Builds the result of a record in a terminal state.
    pub fn of(rec: &JobRecord) -> Option<RunResult> {
        let outcome = match &rec.state {
            JobState::Succeeded { outcome }
            | JobState::Failed { outcome }
            | JobState::TimedOut { outcome }
            | JobState::Cancelled { outcome, .. } => outcome,
            _ => return None,
        };
        let queue_wait_ms = rec.first_started_at.map_or_else(
            || rec.submitted_at.ms_until(outcome.finished_at),
            |s| rec.submitted_at.ms_until(s),
        );
        let run_ms = outcome.started_at.map_or(0, |s| s.ms_until(outcome.finished_at));
        Some(RunResult {
            id: rec.id,
            name: rec.name().to_string(),
            state: rec.state.name(),
            reason: outcome.reason,
            message: outcome.message.clone(),
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            attempts: rec.attempts,
            submitted_at: rec.submitted_at,
            started_at: outcome.started_at,
            finished_at: outcome.finished_at,
            queue_wait_ms,
            run_ms,
            user: rec.owner.user.clone(),
            uid: rec.owner.uid,
            cancelled_by: match &rec.state {
                JobState::Cancelled { by, .. } => Some(by.clone()),
                _ => None,
            },
            peak_memory_bytes: outcome.peak_memory_bytes,
            cpu_usage_ms: outcome.cpu_usage_ms,
            backend: rec.spec.backend(),
            container_id: outcome.container_id.clone(),
            gpus: outcome.gpus.clone(),
            errors: outcome.errors.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `running` record as the build before backends wrote it (cybd 0.1, commit 4734c81).
    const OLD_RUNNING: &str = r#"{"id":7,"spec":{"command":["sleep","600"],"name":"s","class":"cpu_short"},
        "owner":{"uid":1000,"gid":1000,"user":"alice"},"origin":{"via":"rpc"},
        "submitted_at":"2026-12-06T10:00:00Z","priority":0,"attempts":1,
        "first_started_at":"2026-12-06T10:00:01Z","run_dir":"/logs/run_7","state":"running",
        "started_at":"2026-12-06T10:00:01Z","attempt":1,
        "supervisor":{"pid":4242,"start_ticks":99},"gpus":[0,1],"boot_id":"b-1"}"#;

    #[test]
    fn a_running_record_of_the_build_before_backends_loads_as_native_and_writes_back_the_same() {
        let rec: JobRecord = serde_json::from_str(OLD_RUNNING).unwrap();
        let JobState::Running { gpus, handle, .. } = &rec.state else {
            panic!("not running: {:?}", rec.state)
        };
        assert_eq!(gpus, &[0, 1]);
        assert_eq!(
            handle,
            &RunHandle::Native {
                supervisor: Some(ProcRef {
                    pid: 4242,
                    start_ticks: 99
                }),
                boot_id: Some("b-1".into()),
            }
        );
        let again: serde_json::Value = serde_json::to_value(&rec).unwrap();
        let old: serde_json::Value = serde_json::from_str(OLD_RUNNING).unwrap();
        for key in ["supervisor", "boot_id", "gpus", "attempt", "state"] {
            assert_eq!(again[key], old[key], "{key}");
        }
        // Nothing about the supervisor yet (the attempt was being started).
        let bare = OLD_RUNNING
            .replace(r#""supervisor":{"pid":4242,"start_ticks":99},"#, "")
            .replace(r#","boot_id":"b-1""#, "");
        let rec: JobRecord = serde_json::from_str(&bare).unwrap();
        assert!(matches!(
            rec.state,
            JobState::Running {
                handle: RunHandle::Native {
                    supervisor: None,
                    boot_id: None
                },
                ..
            }
        ));
    }

    #[test]
    fn an_outcome_without_gpus_or_errors_reads_and_one_with_them_round_trips() {
        let o: Outcome = serde_json::from_str(
            r#"{"reason":"success","message":"ok","finished_at":"2026-12-06T10:00:01Z"}"#,
        )
        .unwrap();
        assert!(o.gpus.is_empty() && o.errors.is_empty());
        let mut o2 = o.clone();
        o2.gpus.push(HeldGpu {
            index: 1,
            uuid: Some("GPU-1".into()),
        });
        o2.errors.push("cannot collect artifacts: x".into());
        let back: Outcome = serde_json::from_str(&serde_json::to_string(&o2).unwrap()).unwrap();
        assert_eq!(back, o2);
    }

    #[test]
    fn only_the_owner_and_admins_see_the_whole_record() {
        let spec = crate::parse_job(br#"{"command":["true"],"env":{"TOKEN":"t0k"},"context":[1]}"#).unwrap();
        let rec = JobRecord {
            id: 1,
            spec,
            owner: Owner {
                uid: 1000,
                gid: 1000,
                user: "alice".into(),
            },
            origin: Origin::Rpc { pid: None },
            submitted_at: Timestamp::now(),
            priority: 0,
            attempts: 0,
            first_started_at: None,
            run_dir: String::new(),
            state: JobState::Queued {
                since: Timestamp::now(),
            },
            callback: Some(Box::new(CallbackStatus {
                url: "https://hooks.example/x?token=t0k".into(),
                webhook_id: "msg_1".into(),
                attempts: 1,
                state: CallbackState::Retrying {
                    next_try: Timestamp::now(),
                },
                last_error: Some("error sending request for url (https://hooks.example/x?token=t0k)".into()),
            })),
        };
        assert_eq!(rec.clone().seen_by(1000, false), rec, "owner");
        assert_eq!(rec.clone().seen_by(0, true), rec, "admin");
        let other = rec.clone().seen_by(1001, false);
        assert_eq!(other.spec.env["TOKEN"], crate::spec::HIDDEN);
        assert!(other.spec.context.is_none());
        assert_eq!(other.id, rec.id);
        let c = other.callback.unwrap();
        assert_eq!(
            (c.url.as_str(), c.last_error.as_deref()),
            (crate::spec::HIDDEN, Some(crate::spec::HIDDEN))
        );
        assert_eq!((c.attempts, c.webhook_id.as_str()), (1, "msg_1"));
    }
}
