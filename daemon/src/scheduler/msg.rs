//! What the scheduler hears: [`Request`]s from the RPC server, intake and the daemon's
//! main task, and [`Event`]s from the scheduler's own tasks (store acknowledgements, GPU
//! claims, starts and ends of attempts, timers).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use cyb_proto::job::{Origin, Owner};
use cyb_proto::rpc::{CleanReport, CleanRequest, JobSummary, ListFilter, Stats};
use cyb_proto::{JobId, JobRecord, JobSpec, RpcError, Submitted};
use tokio::sync::oneshot;

use super::durable::NotDurable;
use super::{Action, Durable, Peer};
use crate::backend::{AttemptEnd, StartError, Started};
use crate::config::Config;
use crate::gpu::GpuLease;
use crate::host::HostError;

pub type Reply<T> = oneshot::Sender<T>;

/// A request to the scheduler.
pub enum Request {
    Submit {
        spec: Box<JobSpec>,
        owner: Owner,
        origin: Origin,
        reply: Reply<Result<Submitted, RpcError>>,
    },
    /// The checks of `Submit`, without queueing.
    Check {
        spec: Box<JobSpec>,
        owner: Owner,
        reply: Reply<Result<(), RpcError>>,
    },
    List {
        filter: ListFilter,
        reply: Reply<Vec<JobSummary>>,
    },
    Show {
        id: JobId,
        reply: Reply<Result<JobRecord, RpcError>>,
    },
    /// Answered when the job has ended (and its end is on disk).
    Wait {
        id: JobId,
        reply: Reply<Result<JobRecord, RpcError>>,
    },
    Act {
        id: JobId,
        action: Action,
        peer: Peer,
        reply: Reply<Result<JobRecord, RpcError>>,
    },
    Pause {
        pause: bool,
        peer: Peer,
        reply: Reply<Result<(), RpcError>>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    /// Remove ended jobs (`cybctl clean`); see `clean.rs`.
    Clean {
        req: CleanRequest,
        peer: Peer,
        reply: Reply<Result<CleanReport, RpcError>>,
    },
    /// Identities of spool files already accepted (for intake after a restart).
    SpoolOrigins {
        reply: Reply<HashSet<crate::intake::Identity>>,
    },
    /// Look at the queue again (intake found nothing new, but something may have changed).
    Kick,
    /// A new configuration (SIGHUP); paths keep their old values.
    Reload(Arc<Config>),
    /// Cancel every running job, stop starting new ones, answer when none runs.
    Shutdown(Reply<()>),
}

impl Request {
    /// The job a request reads or changes as a whole record, which an ended job keeps
    /// only in the store.
    pub(super) fn whole_job(&self) -> Option<JobId> {
        match self {
            Request::Show { id, .. } | Request::Wait { id, .. } | Request::Act { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Answers a request of [`Request::whole_job`] with `e`.
    pub(super) fn refuse(self, e: RpcError) {
        match self {
            Request::Show { reply, .. } | Request::Wait { reply, .. } | Request::Act { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            _ => {}
        }
    }
}

/// What the scheduler's own tasks report back.
pub enum Event {
    /// An attempt was committed by its backend, or could not be.
    Launched {
        id: JobId,
        attempt: u32,
        res: Result<Started, StartError>,
    },
    /// Usable GPUs that something outside cybd holds now (periodic probe).
    GpusOutside(BTreeSet<u32>),
    /// The locks of the GPUs chosen for a queued job are taken (or one was held outside).
    GpusClaimed {
        id: JobId,
        res: Result<Vec<GpuLease>, HostError>,
    },
    /// An attempt ended.
    Exited {
        id: JobId,
        attempt: u32,
        end: AttemptEnd,
    },
    /// A retry's backoff is over.
    Wake { id: JobId },
    /// result.json of an ended job is written and its backend has cleaned up.
    ResultWritten { id: JobId },
    /// The first write of a submitted job's record ended: the job joins the queue (and
    /// the submitter gets its id) only if it is durable.
    Recorded {
        submitted: Box<Submitted>,
        res: Result<(), NotDurable>,
        reply: Reply<Result<Submitted, RpcError>>,
    },
    /// Writes the job's record again (its last write failed); answers with the new ack.
    Persist { id: JobId, reply: Reply<Durable> },
    /// The record writes of one flush are done: `ids` all of them, `failed` those that
    /// failed (disk full...), which are written again later.
    Settled {
        ids: Vec<JobId>,
        failed: Vec<(JobId, NotDurable)>,
    },
    /// Time to write again the records whose writes failed.
    Rewrite,
    /// The file-system work of a clean is done: per job, gone or kept (and why). `reply`
    /// is the caller's (none for `[retention]`).
    Cleaned {
        results: Vec<(JobId, Result<(), String>)>,
        kept: Vec<cyb_proto::rpc::KeptJob>,
        reply: Option<Reply<Result<CleanReport, RpcError>>>,
        by: String,
    },
    /// The record of an ended job, read back from the store for the requests about it
    /// that came meanwhile (see `Scheduler::revive`).
    Revived {
        id: JobId,
        rec: Result<Box<JobRecord>, Arc<crate::store::StoreError>>,
    },
}

/// Everything the scheduler's loop receives.
pub enum Msg {
    Request(Request),
    Event(Event),
}

impl From<Request> for Msg {
    fn from(r: Request) -> Msg {
        Msg::Request(r)
    }
}

impl From<Event> for Msg {
    fn from(e: Event) -> Msg {
        Msg::Event(e)
    }
}
