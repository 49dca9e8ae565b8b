//! The RPC service between cybctl and cybd (tarpc over a Unix socket, JSON frames).
//!
//! The caller is identified by the socket's peer credentials, never by anything it sends.

use serde::{Deserialize, Serialize};

use crate::error::RpcError;
use crate::job::{JobId, JobRecord, StateName, Timestamp};
use crate::spec::Class;

/// A submission: the raw job JSON, parsed by the daemon with the same code as the spool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub spec_json: String,
    /// Used as `cwd` when the spec has none (cybctl sends its working directory).
    #[serde(default)]
    pub default_cwd: Option<String>,
}

/// Which jobs `list` returns.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only these states (all when empty).
    #[serde(default)]
    pub states: Vec<StateName>,
    /// Only this user's jobs.
    #[serde(default)]
    pub user: Option<String>,
    /// At most this many, newest first (all when None).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A line of `cybctl ls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: JobId,
    pub name: String,
    pub user: String,
    pub class: Class,
    pub priority: i32,
    pub state: StateName,
    pub attempts: u32,
    pub submitted_at: Timestamp,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl JobSummary {
    pub fn of(r: &JobRecord) -> Self {
        let outcome = r.state.outcome();
        let started_at = match &r.state {
            crate::job::JobState::Running { started_at, .. } => Some(*started_at),
            _ => outcome.and_then(|o| o.started_at),
        };
        JobSummary {
            id: r.id,
            name: r.name().to_string(),
            user: r.owner.user.clone(),
            class: r.spec.class(),
            priority: r.priority,
            state: r.state.name(),
            attempts: r.attempts,
            submitted_at: r.submitted_at,
            started_at,
            exit_code: outcome.and_then(|o| o.exit_code),
            reason: outcome.map(|o| o.reason.to_string()),
        }
    }
}

/// Per-class counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassStats {
    pub class: Class,
    pub slots: usize,
    pub running: usize,
    pub queued: usize,
}

/// The daemon's view of itself, for `cybctl stats` and health checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub version: String,
    pub pid: u32,
    pub started_at: Timestamp,
    pub paused: bool,
    pub counts: Vec<(StateName, usize)>,
    pub classes: Vec<ClassStats>,
    pub total_jobs: usize,
    pub next_id: JobId,
    /// Records that could not be read and were moved aside at startup.
    pub quarantined: Vec<String>,
}

/// What this host lets cybd enforce, for `cybctl health`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub user_mode: bool,
    /// Jobs that cannot be confined are refused (`require_limits`).
    pub require_limits: bool,
    pub cgroups: CgroupHealth,
    pub devices: DeviceHealth,
    pub gpus: GpuHealth,
    /// One line per problem a person should act on; empty when all is well.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CgroupHealth {
    /// `v2`, `v1`, `hybrid` or `none`.
    pub mode: String,
    pub description: String,
    /// Limits enforced on every job: of `memory`, `cpu`, `pids`, `devices`, `kill`.
    pub enforced: Vec<String>,
    /// Those that are not.
    pub not_enforced: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// The start-up probe saw an opened device node denied in a throw-away cgroup.
    pub enforced: bool,
    /// The probe's result in words.
    pub probe: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GpuHealth {
    /// GPUs jobs can be given.
    pub count: usize,
    pub source: String,
    pub health: String,
}

#[tarpc::service]
pub trait Cyb {
    /// Queues a job that runs as the caller.
    async fn submit(req: SubmitRequest) -> Result<JobId, RpcError>;
    /// Runs every check `submit` would (as the caller) without queueing anything.
    async fn check(req: SubmitRequest) -> Result<(), RpcError>;
    async fn list(filter: ListFilter) -> Vec<JobSummary>;
    async fn show(id: JobId) -> Result<JobRecord, RpcError>;
    /// Returns the job once it has ended, or as it is after `timeout_ms`.
    async fn wait(id: JobId, timeout_ms: u64) -> Result<JobRecord, RpcError>;
    async fn cancel(id: JobId) -> Result<JobRecord, RpcError>;
    /// Queues a job that has ended again, as a fresh attempt.
    async fn retry(id: JobId) -> Result<JobRecord, RpcError>;
    async fn hold(id: JobId) -> Result<JobRecord, RpcError>;
    async fn release(id: JobId) -> Result<JobRecord, RpcError>;
    async fn set_priority(id: JobId, priority: i32) -> Result<JobRecord, RpcError>;
    /// Stops starting new jobs (running ones go on). Admins only.
    async fn pause() -> Result<(), RpcError>;
    async fn resume() -> Result<(), RpcError>;
    async fn stats() -> Stats;
    /// What is enforced on this host (cgroups, device control, GPUs).
    async fn health() -> Health;
    /// Every GPU with its live figures and lock holder.
    async fn gpus() -> crate::gpu::GpuReport;
}

/// Largest frame a client accepts: the daemon's replies, of which `list` of a large queue is
/// the biggest (about 300 bytes a job). Clients trust the daemon they connect to.
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// Room a request frame needs beside the job itself: the envelope (request id, deadline,
/// trace context) and `default_cwd` (a path of up to 4 KiB, each byte escaped to at most 6).
pub const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// The largest request frame a daemon that accepts jobs of up to `max_job_bytes` needs to
/// read. The job travels as a JSON string, where escaping at most doubles a valid job
/// (every `"`, `\` and line break becomes two bytes; other control characters cannot occur
/// in a valid job). Anything longer cannot be a request the daemon would accept, and the
/// daemon closes the connection instead of buffering it.
pub fn max_request_frame(max_job_bytes: u64) -> usize {
    usize::try_from(max_job_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .saturating_add(REQUEST_OVERHEAD_BYTES)
}

/// Wraps a connected stream in the transport both sides speak (length-delimited JSON
/// frames), as a client: frames of up to [`MAX_REPLY_BYTES`].
pub fn transport<S, Item, SinkItem>(
    io: S,
) -> tarpc::serde_transport::Transport<S, Item, SinkItem, tarpc::tokio_serde::formats::Json<Item, SinkItem>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    transport_with_limit(io, MAX_REPLY_BYTES)
}

/// The same transport with frames of at most `max_frame` bytes either way; a longer frame
/// ends the stream with an error before its body is buffered.
pub fn transport_with_limit<S, Item, SinkItem>(
    io: S,
    max_frame: usize,
) -> tarpc::serde_transport::Transport<S, Item, SinkItem, tarpc::tokio_serde::formats::Json<Item, SinkItem>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    let framed = tarpc::tokio_util::codec::Framed::new(
        io,
        tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(max_frame)
            .new_codec(),
    );
    tarpc::serde_transport::new(framed, tarpc::tokio_serde::formats::Json::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frame_fits_the_largest_job_escaped() {
        let max_job = 1000u64;
        // The worst valid job: nothing but characters JSON escapes with two bytes.
        let spec = "\"\\\n".repeat(max_job as usize / 3);
        let req = SubmitRequest {
            spec_json: spec,
            default_cwd: Some(format!("/{}", "\u{1}".repeat(4095))),
        };
        let json = serde_json::to_vec(&req).unwrap();
        assert!(json.len() <= max_request_frame(max_job), "{}", json.len());
        assert_eq!(max_request_frame(u64::MAX), usize::MAX);
    }
}
