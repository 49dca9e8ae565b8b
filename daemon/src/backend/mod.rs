//! Backends: the one seam between the scheduler, which owns the queue, and the mechanics
//! of one kind of run (native supervisors now; Docker containers and Slurm jobs plug in
//! here too).
//!
//! The seam keeps the durability contract of the `running` record:
//!
//! ```text
//!  scheduler: record "running" ──────────── durable? ──┬─ yes ─► commit(prepared) ─► Started
//!  backend:   prepare(attempt) ─► Prepared ────────────┘   no ─► abort(prepared)
//! ```
//!
//! [`Backend::prepare`] does everything that can be undone while the record is written
//! (run directory, cgroup, a supervisor waiting for its job, a created container, a held
//! Slurm job); [`Backend::commit`] hands the job over only once the record is on disk, so a
//! daemon killed at any instant never runs a job twice. A committed attempt is a
//! [`RunHandle`] (kept in the record, so a restarted daemon knows what to look for: see
//! [`Backend::adopt`]) and a future that resolves to how the attempt ended, typed
//! ([`AttemptEnd`]): the scheduler turns that into the job's next state without knowing
//! which backend ran it (`scheduler::outcome`).

pub mod docker;
pub mod native;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{RunHandle, Timestamp};
use cyb_proto::spec::Backend as Kind;
use cyb_proto::{JobId, JobRecord, JobSpec, Owner, SpecError};

use crate::config::Config;
use crate::gpu::GpuLease;

/// A future a backend hands the scheduler; it runs on the runtime and never blocks it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How an attempt ended, whatever ran it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The job's process never started.
    NotStarted(NotStarted),
    /// It exited by itself with this status.
    Exited { code: i32 },
    /// A signal cybd did not send killed it.
    Signaled { signal: i32 },
    /// The kernel's OOM killer ended a process of the job at its memory limit (on cgroup v1
    /// perhaps not the main one, which then exited or was killed as given here).
    OomKilled { code: Option<i32>, signal: Option<i32> },
    /// It ran past its time limit and was stopped (how its process ended then, if known).
    TimedOut { code: Option<i32>, signal: Option<i32> },
    /// Someone cancelled it; `by` when the backend knows who (the scheduler usually does).
    Cancelled {
        by: Option<String>,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Whatever ran it is gone without saying how the job ended.
    Lost { why: String },
}

/// Why an attempt never started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotStarted {
    /// It was never handed over (the daemon stopped first): nothing ran, and the job is
    /// queued again without the attempt counting.
    Interrupted,
    /// It could not start as asked (no such program, cwd, user...).
    Failed(String),
}

/// What an attempt used, when the backend could measure it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
}

/// The end of one attempt: how, what it used, and what went wrong around it without
/// deciding how it ended (artifacts not collected, a cgroup not cleaned up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptEnd {
    pub exit: Exit,
    pub usage: Usage,
    pub errors: Vec<String>,
}

impl AttemptEnd {
    pub fn of(exit: Exit) -> AttemptEnd {
        AttemptEnd {
            exit,
            usage: Usage::default(),
            errors: Vec::new(),
        }
    }
}

/// One attempt to prepare.
pub struct Attempt {
    /// The job's record, in its `running` state for this attempt.
    pub rec: JobRecord,
    pub attempt: u32,
    /// GPUs the attempt was given, and the locks of their lockfiles.
    pub gpus: Vec<u32>,
    pub leases: Vec<GpuLease>,
    pub cfg: Arc<Config>,
}

/// A prepared attempt: what [`Backend::commit`] starts or [`Backend::abort`] undoes. Only
/// the backend that made it looks inside.
pub enum Prepared {
    Native(native::Prepared),
}

/// A committed attempt.
pub struct Started {
    /// What the record keeps to find the attempt again.
    pub handle: RunHandle,
    /// Resolves when the attempt has ended.
    pub end: BoxFuture<AttemptEnd>,
}

/// What a restarted daemon found of an attempt its record says is running.
pub enum Adoption {
    Running(Started),
    Ended(AttemptEnd),
}

/// Why an attempt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its running record could not be made durable: nothing ran, try again later.
    #[error("cannot record the start of job {id}: {why}")]
    NotDurable {
        id: JobId,
        why: crate::scheduler::NotDurable,
    },
    /// It cannot start as asked.
    #[error(transparent)]
    Failed(#[from] BackendError),
}

/// What a backend reports going wrong, naming the job, path or field involved.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("job {id} is not a {backend} job")]
    WrongBackend { id: JobId, backend: Kind },
    #[error("cannot find the account of uid {uid}, who owns job {id}: {why}")]
    Account { id: JobId, uid: u32, why: String },
    #[error("cannot prepare job {id}: {source}")]
    Host {
        id: JobId,
        #[source]
        source: crate::host::HostError,
    },
    #[error("cannot set up {path} for job {id}: {source}")]
    Io {
        id: JobId,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the supervisor of job {id}: {why}")]
    Supervisor { id: JobId, why: String },
    #[error("cannot signal the supervisor (pid {pid}) of job {id}: {source}")]
    Signal {
        id: JobId,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("the start of job {id} failed: {why}")]
    Task { id: JobId, why: String },
}

/// One kind of run. Every method returns at once; the work happens in the futures (and the
/// blocking threads they use), so the scheduler's loop never waits on a backend.
pub trait Backend: Send + Sync {
    /// Which jobs this backend runs.
    fn kind(&self) -> Kind;
    /// Refuses, at intake, what this host cannot run for `owner`.
    fn admit(&self, spec: &JobSpec, owner: &Owner, cfg: &Config) -> Result<(), SpecError>;
    /// What of `spec`'s limits this backend will not enforce here (told to the submitter).
    fn not_enforced(&self, _spec: &JobSpec, _cfg: &Config) -> Option<cyb_proto::NotEnforced> {
        None
    }
    /// The handle recorded in the `running` record while the attempt is being prepared.
    fn handle_before_start(&self) -> RunHandle;
    /// Makes everything ready for the attempt without starting the job.
    fn prepare(&self, a: Attempt) -> BoxFuture<Result<Prepared, BackendError>>;
    /// Starts the prepared job: called only once its `running` record is durable.
    fn commit(&self, p: Prepared) -> BoxFuture<Result<Started, BackendError>>;
    /// Undoes a prepare whose record could not be made durable (nothing ran).
    fn abort(&self, p: Prepared) -> BoxFuture<()>;
    /// Cancels a committed attempt: TERM, `grace`, KILL of everything it started.
    fn cancel(&self, id: JobId, handle: &RunHandle, grace: Duration) -> BoxFuture<Result<(), BackendError>>;
    /// After a daemon restart: finds the attempt `rec` (running) describes.
    fn adopt(&self, rec: &JobRecord) -> BoxFuture<Adoption>;
    /// The job's end is durable: drops what was kept to adopt it.
    fn finished(&self, id: JobId) -> BoxFuture<()>;
    /// After adoption: removes what attempts that are not running any more left behind.
    /// `recorded` are the jobs recorded as running, `alive` those adopted alive.
    fn sweep(&self, recorded: BTreeSet<JobId>, alive: BTreeSet<JobId>) -> BoxFuture<()>;
}

impl fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {}", self.kind())
    }
}

/// The backends this daemon has, by the kind of job each runs.
#[derive(Clone, Default)]
pub struct Backends {
    all: Vec<Arc<dyn Backend>>,
}

impl Backends {
    pub fn new(all: Vec<Arc<dyn Backend>>) -> Backends {
        Backends { all }
    }

    /// The backend for jobs of `kind`, if this host has it.
    pub fn get(&self, kind: Kind) -> Option<Arc<dyn Backend>> {
        self.all.iter().find(|b| b.kind() == kind).cloned()
    }

    /// The backend a running attempt belongs to.
    pub fn of(&self, handle: &RunHandle) -> Option<Arc<dyn Backend>> {
        self.get(handle.backend())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.all.iter()
    }
}
