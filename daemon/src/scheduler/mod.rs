//! Scheduler: the one task that owns the queue. Intake, the RPC server and the daemon's main
//! task send it [`Request`]s; its own tasks report back with [`msg::Event`]s. It decides,
//! records every change in the store, and starts jobs through their backends.
//!
//! Order: highest priority first, FIFO (by id) within a priority, per-class slots, jobs
//! whose `depends_on` are not yet met wait aside ([`ready`]). Every change is durable before
//! anyone is told: replies, `wait` answers and `result.json` follow the store's
//! acknowledgement, and a job is handed to its backend only after its `running` record is
//! on disk, so a kill -9 at any instant never runs a job twice.
//!
//! The rooms: [`msg`] (what it hears), [`recover`] (building it from the store at start-up),
//! [`durable`] (the group commit of record writes, and ended jobs kept as summaries),
//! [`submit`], [`act`], [`read`] and [`clean`] (one per kind of request), [`start`] and [`end`] (an
//! attempt's life), and the pure parts: [`ready`], [`gpu_pool`], [`outcome`], [`tally`].

mod act;
mod clean;
mod durable;
mod end;
mod gpu_pool;
mod msg;
mod outcome;
mod read;
mod ready;
mod recover;
mod start;
mod submit;
mod tally;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{JobState, Owner, StateName, Timestamp};
use cyb_proto::{JobId, JobRecord, RpcError};
use tokio::sync::mpsc;
use tracing::{info, warn};

use durable::Pending;
pub use durable::{Durable, NotDurable};
use gpu_pool::GpuPool;
use msg::{Event, Msg};
pub use msg::{Reply, Request};
use ready::ReadyQueue;
pub use recover::Recovered;
use tally::Tally;

use crate::backend::Backends;
use crate::config::Config;
use crate::history::History;
use crate::host::Host;
use crate::store::Store;

/// Who is calling, from the socket's peer credentials.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
    pub name: String,
    pub admin: bool,
}

impl Peer {
    fn may_manage(&self, owner: &Owner) -> bool {
        self.admin || self.uid == owner.uid
    }
}

/// Changes a person can make to one job.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    Cancel,
    Retry,
    Hold,
    Release,
    Priority(i32),
}

/// Handle for sending requests to the scheduler.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Handle {
    pub fn send(&self, r: Request) -> Result<(), RpcError> {
        self.tx
            .send(Msg::Request(r))
            .map_err(|_| RpcError::Unavailable("cybd is shutting down".into()))
    }

    /// Sends a request built around a reply channel and waits for the answer.
    pub async fn ask<T>(&self, f: impl FnOnce(Reply<T>) -> Request) -> Result<T, RpcError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(f(tx))?;
        rx.await
            .map_err(|_| RpcError::Unavailable("cybd is shutting down".into()))
    }
}

/// Where a job is between the states its record shows: what is under way for it.
enum Phase {
    /// The locks of its GPUs are being taken; it has its class slot and GPUs meanwhile.
    Claiming { gpus: Vec<u32> },
    /// Its `running` record is being written while its backend prepares the attempt.
    Starting {
        gpus: Vec<u32>,
        cancel_by: Option<String>,
    },
    /// Committed: its backend runs it and reports its end.
    Running {
        gpus: Vec<u32>,
        cancel_by: Option<String>,
    },
    /// Its end is being recorded: result.json and the backend's clean-up, with the
    /// `wait`s to answer after them. (It may be queued again meanwhile, by a retry: it
    /// starts once this is done.)
    Finishing {
        waiters: Vec<Reply<Result<JobRecord, RpcError>>>,
    },
}

pub struct Scheduler {
    cfg: Arc<Config>,
    store: Store,
    tx: mpsc::UnboundedSender<Msg>,
    /// Jobs that have not ended, and ended ones until their records are settled on disk.
    jobs: HashMap<JobId, JobRecord>,
    /// Ended jobs whose records are settled on disk, each kept as a small summary: see
    /// [`Scheduler::compact`].
    history: History,
    /// Record writes sent to the store and not acknowledged yet, per job.
    in_flight: HashMap<JobId, u32>,
    /// Ended jobs whose records are being read back from the store, with the requests
    /// that wait for them.
    reviving: HashMap<JobId, Vec<Request>>,
    /// Submitted jobs whose first record write is under way: in no queue, list or count
    /// until it is durable, and forgotten without a trace if it fails.
    unrecorded: HashMap<JobId, JobRecord>,
    /// Recorded jobs whose last record write failed, written again after a second.
    rewrite: BTreeSet<JobId>,
    /// Why record writes fail now (`None` while they succeed), for stats and STATUS=.
    store_error: Option<String>,
    ready: ReadyQueue,
    /// What is under way for each job that has anything under way.
    phases: HashMap<JobId, Phase>,
    /// Class slots taken (claiming, starting or running).
    running_per_class: HashMap<cyb_proto::Class, usize>,
    waiters: HashMap<JobId, Vec<Reply<Result<JobRecord, RpcError>>>>,
    /// Answered when no job runs any more (shutdown).
    on_idle: Vec<Reply<()>>,
    /// Record writes and read barriers of this loop iteration, sent to the store at its end.
    pending: Pending,
    tally: Tally,
    next_id: JobId,
    paused: bool,
    started_at: Timestamp,
    quarantined: Vec<String>,
    backends: Backends,
    /// Cgroups, device control, GPUs.
    host: Arc<Host>,
    gpus: GpuPool,
    /// UUIDs of the GPUs, by index, for result.json.
    gpu_uuids: HashMap<u32, String>,
    /// A GPU probe is under way.
    gpu_probing: bool,
    /// Ended jobs being removed by a clean: out of the history, put back if their removal
    /// fails.
    cleaning: HashMap<JobId, crate::history::Past>,
    /// When `[retention]` last ran, and whether its removal is under way.
    retention: (Option<std::time::Instant>, bool),
    /// Backends that could not start jobs at the last scheduling (the Docker engine was
    /// down...), with why: their jobs stay queued, and scheduling looks again every second.
    backends_down: BTreeMap<cyb_proto::spec::Backend, String>,
}

impl Scheduler {
    /// The scheduler loop; returns when every sender is gone. Under systemd it also sends
    /// the watchdog pings, from this loop itself, so a stuck loop gets the daemon restarted,
    /// and keeps the unit's STATUS= line current.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let watchdog = crate::systemd::watchdog_interval();
        let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = String::new();
        let mut gpu_tick = tokio::time::interval(self.cfg.rescan_interval.max(Duration::from_millis(500)));
        gpu_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.schedule();
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.handle(m);
                    // Drain whatever else is waiting before scheduling once.
                    while let Ok(m) = rx.try_recv() {
                        self.handle(m);
                    }
                    self.schedule();
                    self.check_idle();
                    self.flush();
                }
                _ = gpu_tick.tick(), if self.gpus.usable() > 0 && !self.gpu_probing => {
                    self.gpu_probing = true;
                    let host = self.host.clone();
                    let allow_shared = self.cfg.gpus.allow_shared;
                    let tx = self.tx.clone();
                    let probe = tokio::task::spawn_blocking(move || host.gpus_taken_outside(allow_shared));
                    tokio::spawn(async move {
                        // A probe that failed counts as "nothing outside": the next one looks again.
                        let outside = probe.await.unwrap_or_default();
                        let _ = tx.send(Event::GpusOutside(outside).into());
                    });
                }
                _ = ping.tick() => {
                    if watchdog.is_some() {
                        crate::systemd::watchdog();
                    }
                }
                _ = status_tick.tick() => {
                    let line = self.status_line();
                    if line != last_status {
                        crate::systemd::status(&line);
                        last_status = line;
                    }
                    self.retention_due();
                    if !self.backends_down.is_empty() {
                        self.schedule();
                        self.flush();
                    }
                }
            }
        }
    }

    fn event(&self, e: Event) {
        let _ = self.tx.send(e.into());
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Request(r) => self.request(r),
            Msg::Event(e) => self.on_event(e),
        }
    }

    fn request(&mut self, r: Request) {
        if let Some(id) = r.whole_job()
            && (self.history.get(id).is_some() || self.reviving.contains_key(&id))
        {
            return self.revive(id, r);
        }
        match r {
            Request::Submit {
                spec,
                owner,
                origin,
                reply,
            } => self.submit(*spec, owner, origin, reply),
            Request::Check {
                mut spec,
                owner,
                reply,
            } => {
                self.place(&mut spec);
                let _ = reply.send(self.admit(&spec, &owner).map(|_| ()));
            }
            Request::List { filter, reply } => self.reply_synced(reply, self.list(&filter)),
            Request::Show { id, reply } => {
                self.reply_synced(reply, self.jobs.get(&id).cloned().ok_or(RpcError::NotFound(id)))
            }
            Request::Wait { id, reply } => self.wait(id, reply),
            Request::Act {
                id,
                action,
                peer,
                reply,
            } => self.act(id, action, &peer, reply),
            Request::Pause { pause, peer, reply } => self.pause(pause, &peer, reply),
            Request::Stats { reply } => {
                let st = self.stats();
                self.reply_synced(reply, st)
            }
            Request::Clean { req, peer, reply } => self.clean(&req, &peer, reply),
            Request::SpoolOrigins { reply } => {
                let set = self
                    .jobs
                    .values()
                    .filter_map(|r| crate::history::spool_identity(&r.origin))
                    .chain(self.history.iter().filter_map(|(_, p)| p.spool))
                    .collect();
                let _ = reply.send(set);
            }
            Request::Kick => {}
            Request::Reload(cfg) => {
                info!("configuration reloaded");
                self.cfg = cfg;
            }
            Request::Shutdown(reply) => self.shutdown(reply),
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Launched { id, attempt, res } => self.launched(id, attempt, res),
            Event::Exited { id, attempt, end } => self.exited(id, attempt, end),
            Event::Wake { id } => {
                if let Some(r) = self.jobs.get_mut(&id)
                    && let JobState::Waiting { .. } = r.state
                {
                    r.state = JobState::Queued {
                        since: Timestamp::now(),
                    };
                    self.pending.persist_detached(id);
                    self.enqueue(id);
                }
            }
            Event::ResultWritten { id } => self.result_written(id),
            Event::Recorded {
                submitted,
                res,
                reply,
            } => self.recorded(*submitted, res, reply),
            Event::Persist { id, reply } => {
                let _ = reply.send(self.pending.persist(id));
            }
            Event::Settled { ids, failed } => self.settled(ids, failed),
            Event::Revived { id, rec } => self.revived(id, rec),
            Event::Cleaned {
                results,
                kept,
                reply,
                by,
            } => self.cleaned(results, kept, reply, &by),
            Event::Rewrite => {
                for id in std::mem::take(&mut self.rewrite) {
                    self.pending.persist_detached(id);
                }
            }
            Event::GpusClaimed { id, res } => self.gpus_claimed(id, res),
            Event::GpusOutside(outside) => {
                self.gpu_probing = false;
                if self.gpus.set_outside(outside.clone()) {
                    info!("gpus held outside cybd: {outside:?}");
                }
            }
        }
    }

    /// Answers a read once everything written before it is on disk, so nobody is shown a
    /// state that a crash could still take back.
    fn reply_synced<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        let synced = self.pending.barrier();
        tokio::spawn(async move {
            let _ = synced.await;
            let _ = reply.send(value);
        });
    }

    /// The state of job `id`, ended or not.
    fn state_of(&self, id: JobId) -> Option<StateName> {
        match self.jobs.get(&id) {
            Some(r) => Some(r.state.name()),
            None => self.history.get(id).map(|p| p.state),
        }
    }

    /// Attempts starting or running.
    fn running_count(&self) -> usize {
        self.phases
            .values()
            .filter(|p| matches!(p, Phase::Starting { .. } | Phase::Running { .. }))
            .count()
    }

    /// The one-line summary for systemd's STATUS= (`systemctl status cybd`).
    pub fn status_line(&mut self) -> String {
        self.update_tally();
        let t = &self.tally;
        let (queued, held, waiting) = (
            t.state(StateName::Queued),
            t.state(StateName::Held),
            t.state(StateName::Waiting),
        );
        let mut line = format!("{} running, {queued} queued", self.running_count());
        if held > 0 {
            line.push_str(&format!(", {held} held"));
        }
        if waiting > 0 {
            line.push_str(&format!(", {waiting} waiting to retry"));
        }
        if self.paused {
            line.push_str(", paused");
        }
        if let Some(why) = &self.store_error {
            line.push_str(&format!("; cannot write job records: {why}"));
        }
        line
    }

    /// Cancels every running job (the unit is being stopped for good) and answers once they
    /// have all ended.
    fn shutdown(&mut self, reply: Reply<()>) {
        let ids: Vec<JobId> = self
            .phases
            .iter()
            .filter(|(_, p)| matches!(p, Phase::Starting { .. } | Phase::Running { .. }))
            .map(|(id, _)| *id)
            .collect();
        info!("stopping: cancelling {} running job(s)", ids.len());
        for id in ids {
            let peer = Peer {
                uid: 0,
                pid: None,
                name: "cybd (service stopped)".into(),
                admin: true,
            };
            if let Err(e) = self.try_act(id, Action::Cancel, &peer) {
                warn!(job_id = id, "cannot cancel job {id}: {e}");
            }
        }
        self.paused = true;
        self.on_idle.push(reply);
        self.check_idle();
    }

    fn check_idle(&mut self) {
        // Idle: no job claims GPUs, starts or runs, and every ended job's result.json is
        // written.
        if self.phases.is_empty() && !self.on_idle.is_empty() {
            for r in self.on_idle.drain(..) {
                let _ = r.send(());
            }
        }
    }
}
