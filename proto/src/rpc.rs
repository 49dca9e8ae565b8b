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

/// What `submit` answers: the job's id, where it was placed, and what it asked for that
/// this host will not enforce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: JobId,
    /// The class it runs in (the one it named, or the one cybd chose: docs/job-spec.md).
    pub class: Class,
    /// Its time limit, in seconds (its `timeout`, else its class's default).
    pub time_limit_secs: u64,
    /// Limits it asked for (or its class gives it) that this host will not enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<NotEnforced>,
}

/// Limits a job has that this host will not enforce, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotEnforced {
    /// `memory`, `cpus`, `pids`, `gpus`.
    pub limits: Vec<String>,
    /// For example `user mode` or `no cgroup controllers`.
    pub why: String,
}

impl std::fmt::Display for NotEnforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: not enforced on this host ({})",
            self.limits.join(", "),
            self.why
        )
    }
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
    /// Only the newest this many (all when None). The list is in id order, oldest first.
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

/// Which ended jobs `clean` removes: `ids`, or else every ended job that passes the
/// filters. Only jobs in a final state (succeeded, failed, timed_out, cancelled) are ever
/// removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CleanRequest {
    /// These jobs and no others: each must exist, have ended and be the caller's (or the
    /// caller an admin), or nothing is removed. The filters below are not used with ids.
    #[serde(default)]
    pub ids: Vec<JobId>,
    /// Only jobs in these final states (every final state when empty).
    #[serde(default)]
    pub states: Vec<StateName>,
    /// Only jobs that ended at least this many milliseconds ago.
    #[serde(default)]
    pub older_than_ms: Option<u64>,
    /// Only this user's jobs (another user's: admins only). Without it and without
    /// `all_users`, the caller's own.
    #[serde(default)]
    pub user: Option<String>,
    /// Every user's jobs (admins only).
    #[serde(default)]
    pub all_users: bool,
}

/// What `clean` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CleanReport {
    /// The jobs removed (record and run directory), by id.
    pub removed: Vec<JobId>,
    /// Ended jobs that matched but were kept, and why.
    #[serde(default)]
    pub kept: Vec<KeptJob>,
}

/// An ended job `clean` matched and kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptJob {
    pub id: JobId,
    pub why: String,
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
    /// Why job records cannot be written now (disk full...): submissions are refused and
    /// ended jobs wait for their end to be recorded until this clears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
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
    /// The Docker engine docker jobs run on.
    #[serde(default)]
    pub docker: DockerHealth,
    /// One line per problem a person should act on; empty when all is well.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DockerHealth {
    /// The Engine API socket.
    pub socket: String,
    /// Docker jobs are allowed here (`[docker] allowed_images` is set).
    pub configured: bool,
    /// The last check reached the engine.
    pub reachable: bool,
    /// Why docker jobs cannot run now, if they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(default)]
    pub server_version: String,
    /// The API version cybd and the engine agreed on.
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub cgroup_driver: String,
    #[serde(default)]
    pub cgroup_version: String,
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// The engine can give containers GPUs (it has `[docker] gpu_runtime`).
    #[serde(default)]
    pub gpus: bool,
    /// Why GPU docker jobs are refused, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_problem: Option<String>,
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
    async fn submit(req: SubmitRequest) -> Result<Submitted, RpcError>;
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
    /// Removes ended jobs: their records and run directories. A caller's own jobs only,
    /// unless an admin.
    async fn clean(req: CleanRequest) -> Result<CleanReport, RpcError>;
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

/// The frame codec both sides speak: a 4-byte length prefix, frames of at most
/// `max_frame` bytes. A longer frame is an error as soon as its length is read, before its
/// body is buffered.
pub fn codec(max_frame: usize) -> tarpc::tokio_util::codec::LengthDelimitedCodec {
    tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
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
    let framed = tarpc::tokio_util::codec::Framed::new(io, codec(MAX_REPLY_BYTES));
    tarpc::serde_transport::new(framed, tarpc::tokio_serde::formats::Json::default())
}

/// What the server reads from a connection: a frame's JSON is one of these.
pub type ServerItem = tarpc::ClientMessage<CybRequest>;
/// What the server writes.
pub type ServerSinkItem = tarpc::Response<CybResponse>;

/// The server's side of [`transport`]: the same frames and JSON, but a request whose deadline
/// lies past what an `Instant` can hold is an error of that frame. tarpc reads a deadline
/// as `Instant::now() + duration`, which panics on such a duration (`{"secs":
/// 18446744073709551615}`), and any local user can send one. Frames are at most
/// `max_frame` bytes either way ([`max_request_frame`]).
pub fn server_transport<S>(
    io: S,
    max_frame: usize,
) -> tarpc::serde_transport::Transport<S, ServerItem, ServerSinkItem, ServerJson>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let framed = tarpc::tokio_util::codec::Framed::new(io, codec(max_frame));
    tarpc::serde_transport::new(framed, ServerJson::default())
}

/// The JSON format of [`server_transport`].
#[derive(Debug, Default)]
pub struct ServerJson(tarpc::tokio_serde::formats::Json<ServerItem, ServerSinkItem>);

impl tarpc::tokio_serde::Deserializer<ServerItem> for ServerJson {
    type Error = serde_json::Error;

    fn deserialize(
        mut self: std::pin::Pin<&mut Self>,
        src: &tarpc::tokio_util::bytes::BytesMut,
    ) -> Result<ServerItem, serde_json::Error> {
        check_deadline(src)?;
        std::pin::Pin::new(&mut self.0).deserialize(src)
    }
}

impl tarpc::tokio_serde::Serializer<ServerSinkItem> for ServerJson {
    type Error = serde_json::Error;

    fn serialize(
        mut self: std::pin::Pin<&mut Self>,
        item: &ServerSinkItem,
    ) -> Result<tarpc::tokio_util::bytes::Bytes, serde_json::Error> {
        std::pin::Pin::new(&mut self.0).serialize(item)
    }
}

/// How [`check_deadline`] knows its own error among the others.
const DEADLINE_OUT_OF_RANGE: &str = "the request's deadline is further away than the clock can count";

/// Refuses a request frame whose deadline no `Instant` can hold. The frame is read as
/// tarpc reads it, in the same order, but for the deadline only: the deadline is checked
/// where tarpc would add it to the clock, so wherever the frame goes wrong before or after
/// that point, the check comes first exactly when tarpc's panic would. Any other problem
/// is left to tarpc's own reader to report.
fn check_deadline(src: &[u8]) -> Result<(), serde_json::Error> {
    use serde::de::IgnoredAny;
    use std::time::Duration;

    #[derive(Deserialize)]
    enum Message {
        #[allow(dead_code)]
        Request(Request),
        #[allow(dead_code)]
        Cancel(IgnoredAny),
    }
    #[derive(Deserialize)]
    struct Request {
        #[allow(dead_code)]
        context: Context,
        #[allow(dead_code)]
        id: IgnoredAny,
        #[allow(dead_code)]
        message: IgnoredAny,
    }
    #[derive(Deserialize)]
    struct Context {
        #[allow(dead_code)]
        deadline: Option<Deadline>,
        #[allow(dead_code)]
        trace_context: IgnoredAny,
    }
    struct Deadline;
    impl<'de> Deserialize<'de> for Deadline {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let after = Duration::deserialize(d)?;
            match std::time::Instant::now().checked_add(after) {
                Some(_) => Ok(Deadline),
                None => Err(serde::de::Error::custom(DEADLINE_OUT_OF_RANGE)),
            }
        }
    }
    match serde_json::from_slice::<Message>(src) {
        Err(e) if e.to_string().starts_with(DEADLINE_OUT_OF_RANGE) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use tarpc::tokio_serde::{Deserializer as _, formats::Json};
    use tarpc::tokio_util::bytes::BytesMut;

    use super::*;

    fn frame(deadline: &str) -> BytesMut {
        BytesMut::from(
            format!(
                r#"{{"Request":{{"context":{{"deadline":{deadline},"trace_context":{{"trace_id":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"span_id":0,"sampling_decision":"Unsampled"}}}},"id":1,"message":{{"Stats":{{}}}}}}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn a_deadline_no_instant_holds_is_an_error_not_a_panic() {
        let huge = frame(r#"{"secs":18446744073709551615,"nanos":0}"#);
        // tarpc's own reader panics on it.
        let plain = std::panic::catch_unwind(|| {
            let mut json = Json::<ServerItem, ServerSinkItem>::default();
            let _ = Pin::new(&mut json).deserialize(&huge);
        });
        assert!(plain.is_err(), "tarpc no longer panics: the check may go");
        let mut json = ServerJson::default();
        let e = Pin::new(&mut json).deserialize(&huge).unwrap_err();
        assert!(e.to_string().contains("deadline"), "{e}");
        // Found by the fuzz target: the frame goes wrong after the deadline, where tarpc
        // has already added it to the clock.
        let broken_later = BytesMut::from(
            &br#"{"Request":{"context":{"deadline":{"secs":18446744073709551615,"nanos":999999999},"trace_context":{"trace_id":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"span_id":0,"sampling_decision":"Unsampled"}},"id":5,"message":{"Check":{"req":{"spec_""sn:oj{\"shell\":\"x\"}"}}}}}"#[..],
        );
        let e = Pin::new(&mut json).deserialize(&broken_later).unwrap_err();
        assert!(e.to_string().contains("deadline"), "{e}");
        // The same frame as a sequence, and a cancel, are read as before.
        let seq = BytesMut::from(
            &br#"{"Request":[[[18446744073709551615,0],{"trace_id":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"span_id":0,"sampling_decision":"Unsampled"}],1,{"Stats":{}}]}"#[..],
        );
        assert!(Pin::new(&mut json).deserialize(&seq).is_err());
    }

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

    #[test]
    fn requests_from_a_client_are_read() {
        let msg: ServerItem = tarpc::ClientMessage::Request(tarpc::Request {
            context: tarpc::context::current(),
            id: 7,
            message: CybRequest::Stats {},
        });
        let bytes = BytesMut::from(serde_json::to_vec(&msg).unwrap().as_slice());
        let mut json = ServerJson::default();
        match Pin::new(&mut json).deserialize(&bytes).unwrap() {
            tarpc::ClientMessage::Request(r) => assert_eq!(r.id, 7),
            other => panic!("read as {other:?}"),
        }
        let ok = frame(r#"{"secs":10,"nanos":0}"#);
        assert!(Pin::new(&mut json).deserialize(&ok).is_ok());
        let missing = BytesMut::from(
            &br#"{"Request":{"context":{"trace_context":{"trace_id":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"span_id":0,"sampling_decision":"Unsampled"}},"id":1,"message":{"Stats":{}}}}"#[..],
        );
        assert!(Pin::new(&mut json).deserialize(&missing).is_ok());
    }
}
