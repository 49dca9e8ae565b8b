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
        last: Outcome,
    },
    Running {
        started_at: Timestamp,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supervisor: Option<ProcRef>,
        /// Indices of the GPUs this attempt holds (their lockfiles are held by its
        /// supervisor).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<u32>,
        /// The kernel's boot id when the attempt started: a daemon that finds another one
        /// knows the host restarted and the attempt's supervisor is gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<String>,
    },
    Succeeded {
        outcome: Outcome,
    },
    Failed {
        outcome: Outcome,
    },
    TimedOut {
        outcome: Outcome,
    },
    Cancelled {
        outcome: Outcome,
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
    pub callback: Option<CallbackStatus>,
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
        })
    }
}
