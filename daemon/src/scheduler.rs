//! Scheduler: the one task that owns the queue. Intake, the RPC server and the job monitors
//! send it typed messages ([`Msg`]); it decides, records every change in the store, and
//! starts jobs through the runner.
//!
//! Order: highest priority first, FIFO (by id) within a priority, per-class slots, jobs
//! whose `depends_on` are not yet met wait aside. Every change is durable before anyone is
//! told: replies, `wait` answers and `result.json` follow the store's acknowledgement, and a
//! job is started only after its `running` record is on disk, so a kill -9 at any instant
//! never runs a job twice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{JobState, Origin, Outcome, Owner, Reason, StateName, Timestamp};
use cyb_proto::rpc::{ClassStats, JobSummary, ListFilter, Stats};
use cyb_proto::spec::Backend;
use cyb_proto::{Class, JobId, JobRecord, JobSpec, RpcError, SpecError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::gpu::GpuLease;
use crate::history::History;
use crate::host::Host;
use crate::launcher::Launcher;
use crate::runner::{self, Adopted, Ended, Running};
use crate::store::{Loaded, Store};
use crate::supervisor::ExitRecord;
use crate::users;

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

type Reply<T> = oneshot::Sender<T>;

/// Messages to the scheduler.
pub enum Msg {
    Submit {
        spec: Box<JobSpec>,
        owner: Owner,
        origin: Origin,
        reply: Reply<Result<JobId, RpcError>>,
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
    /// Identities of spool files already accepted (for intake after a restart).
    SpoolOrigins {
        reply: Reply<HashSet<crate::intake::Identity>>,
    },
    // Internal.
    Launched {
        id: JobId,
        attempt: u32,
        res: Result<Running, StartError>,
    },
    /// Usable GPUs that something outside cybd holds now (periodic probe).
    GpusOutside(BTreeSet<u32>),
    /// The cgroup of a job whose supervisor vanished is gone.
    Cleaned {
        id: JobId,
    },
    /// The locks of the GPUs chosen for a queued job are taken (or one was held outside).
    GpusClaimed {
        id: JobId,
        res: Result<Vec<GpuLease>, u32>,
    },
    Exited {
        id: JobId,
        attempt: u32,
        ended: Ended,
    },
    Wake {
        id: JobId,
    },
    /// result.json of an ended job is written.
    ResultWritten {
        id: JobId,
    },
    /// The first write of a submitted job's record ended: the job joins the queue (and
    /// the submitter gets its id) only if it is durable.
    Recorded {
        id: JobId,
        res: Result<(), String>,
        reply: Reply<Result<JobId, RpcError>>,
    },
    /// Writes the job's record again (its last write failed); answers with the new ack.
    Persist {
        id: JobId,
        reply: Reply<Durable>,
    },
    /// The record writes of one flush are done: `ids` all of them, `failed` those that
    /// failed (disk full...), which are written again later.
    Settled {
        ids: Vec<JobId>,
        failed: Vec<(JobId, String)>,
    },
    /// Time to write again the records whose writes failed.
    Rewrite,
    /// The record of an ended job, read back from the store for the messages about it
    /// that came meanwhile (see [`Scheduler::revive`]).
    Revived {
        id: JobId,
        rec: Result<Box<JobRecord>, String>,
    },
    Kick,
    /// A new configuration (SIGHUP); paths keep their old values.
    Reload(Arc<Config>),
    /// Cancel every running job, stop starting new ones, answer when none runs.
    Shutdown(Reply<()>),
}

impl Msg {
    /// The job a request reads or changes as a whole record, which an ended job keeps
    /// only in the store.
    fn whole_job(&self) -> Option<JobId> {
        match self {
            Msg::Show { id, .. } | Msg::Wait { id, .. } | Msg::Act { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Answers a request of [`Msg::whole_job`] with `e`.
    fn refuse(self, e: RpcError) {
        match self {
            Msg::Show { reply, .. } | Msg::Wait { reply, .. } | Msg::Act { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            _ => {}
        }
    }
}

/// Handle for sending messages to the scheduler.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Handle {
    pub fn send(&self, m: Msg) -> Result<(), RpcError> {
        self.tx
            .send(m)
            .map_err(|_| RpcError::Unavailable("cybd is shutting down".into()))
    }

    /// Sends a message built around a reply channel and waits for the answer.
    pub async fn ask<T>(&self, f: impl FnOnce(Reply<T>) -> Msg) -> Result<T, RpcError> {
        let (tx, rx) = oneshot::channel();
        self.send(f(tx))?;
        rx.await
            .map_err(|_| RpcError::Unavailable("cybd is shutting down".into()))
    }
}

/// Resolves once a record write is durable (or says why it failed).
pub type Durable = oneshot::Receiver<Result<(), String>>;

/// How long a record whose write failed waits before it is written again.
const REWRITE_AFTER: Duration = Duration::from_secs(1);

/// Writes deferred to the end of the scheduler's loop iteration: a job that is accepted and
/// started in the same iteration is written once, in its running state, which is as durable
/// a statement of its acceptance as the queued one would have been.
#[derive(Default)]
struct Pending {
    dirty: HashMap<JobId, Vec<oneshot::Sender<Result<(), String>>>>,
    barriers: Vec<oneshot::Sender<()>>,
}

impl Pending {
    fn persist(&mut self, id: JobId) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.dirty.entry(id).or_default().push(tx);
        rx
    }

    fn persist_detached(&mut self, id: JobId) {
        self.dirty.entry(id).or_default();
    }

    /// Resolves once every write marked before it is durable.
    fn barrier(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.barriers.push(tx);
        rx
    }
}

/// Jobs per state, and queued jobs per class, kept current as records change, so `stats`
/// and the status line cost nothing per job held (a daemon keeps every finished job).
/// Every state change is persisted, so noting each job `flush` writes keeps it exact.
#[derive(Default)]
struct Tally {
    of: HashMap<JobId, (StateName, Class)>,
    states: HashMap<StateName, usize>,
    queued: HashMap<Class, usize>,
}

impl Tally {
    fn note(&mut self, rec: &JobRecord) {
        self.set(rec.id, (rec.state.name(), rec.spec.class()));
    }

    fn set(&mut self, id: JobId, now: (StateName, Class)) {
        match self.of.insert(id, now) {
            Some(old) if old == now => return,
            Some(old) => self.count(old, false),
            None => {}
        }
        self.count(now, true);
    }

    fn count(&mut self, (state, class): (StateName, Class), add: bool) {
        let bump = |n: &mut usize| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        bump(self.states.entry(state).or_default());
        if state == StateName::Queued {
            bump(self.queued.entry(class).or_default());
        }
    }

    fn state(&self, s: StateName) -> usize {
        self.states.get(&s).copied().unwrap_or(0)
    }
}

struct Slot {
    pidfd: Option<Arc<OwnedFd>>,
    cancel_by: Option<String>,
    /// GPUs the attempt holds.
    gpus: Vec<u32>,
}

/// Why a job could not be started.
pub enum StartError {
    /// Its running record could not be made durable: nothing ran, try again later.
    Store(String),
    /// It cannot start as asked.
    Failed(String),
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
    reviving: HashMap<JobId, Vec<Msg>>,
    /// Submitted jobs whose first record write is under way: in no queue, list or count
    /// until it is durable, and forgotten without a trace if it fails.
    unrecorded: HashMap<JobId, JobRecord>,
    /// Recorded jobs whose last record write failed, written again after [`REWRITE_AFTER`].
    rewrite: BTreeSet<JobId>,
    /// Why record writes fail now (`None` while they succeed), for stats and STATUS=.
    store_error: Option<String>,
    ready: BTreeMap<Class, BTreeSet<(Reverse<i32>, JobId)>>,
    running: HashMap<JobId, Slot>,
    running_per_class: HashMap<Class, usize>,
    /// dependency -> jobs waiting for it
    dependents: HashMap<JobId, Vec<JobId>>,
    waiters: HashMap<JobId, Vec<Reply<Result<JobRecord, RpcError>>>>,
    /// Ended jobs whose result.json is being written, with the `wait`s to answer after it.
    writing_results: HashMap<JobId, Vec<Reply<Result<JobRecord, RpcError>>>>,
    /// Answered when no job runs any more (shutdown).
    on_idle: Vec<Reply<()>>,
    /// Record writes and read barriers of this loop iteration, sent to the store at its end.
    pending: Pending,
    tally: Tally,
    next_id: JobId,
    paused: bool,
    started_at: Timestamp,
    quarantined: Vec<String>,
    /// Forks the supervisors.
    launcher: Arc<Launcher>,
    /// Cgroups, device control, GPUs.
    host: Arc<Host>,
    /// GPUs jobs can be given, those cybd jobs hold, and those held outside cybd.
    gpu_usable: BTreeSet<u32>,
    gpu_busy: HashMap<u32, JobId>,
    gpu_outside: BTreeSet<u32>,
    /// A GPU probe is under way.
    gpu_probing: bool,
    /// Queued GPU jobs whose GPUs' locks are being taken, before they start: a job is
    /// recorded as running only once it holds its GPUs.
    claiming: HashMap<JobId, Vec<u32>>,
    /// Jobs whose supervisor vanished and whose cgroup is being killed and removed: they
    /// start again (retry) only once that is done.
    cleaning: HashSet<JobId>,
    /// This boot's id, recorded with every attempt it starts.
    boot_id: Option<String>,
}

/// What the store holds, read before the scheduler starts ([`Recovered::read`]).
pub struct Recovered {
    loaded: Loaded,
    /// Jobs that have not ended, by id.
    live: Vec<JobRecord>,
    history: History,
    tally: Tally,
    /// Ended jobs whose result.json is missing: cybd stopped between their end and it.
    missing_results: Vec<JobRecord>,
    /// The highest id ever handed out.
    max_id: JobId,
    /// callback: ended jobs with a `callback_url`, whose outbox entry a crash may have lost.
    callbacks: Vec<crate::callback::Ended>,
}

impl Recovered {
    /// Reads every record, keeping ended jobs as summaries only, and removes the run
    /// directories of ids that were never recorded (blocking).
    pub fn read(store: &Store, cfg: &Config) -> Recovered {
        let mut live = Vec::new();
        let mut history = History::default();
        let mut tally = Tally::default();
        let mut missing_results = Vec::new();
        let mut callbacks = Vec::new();
        let loaded = store.load(|rec| {
            tally.note(&rec);
            callbacks.extend(crate::callback::Ended::of(&rec));
            if rec.state.is_terminal() {
                if !Path::new(&rec.run_dir).join("result.json").exists() {
                    missing_results.push(rec.clone());
                }
                history.insert(&rec);
            } else {
                live.push(rec);
            }
        });
        live.sort_by_key(|r| r.id);
        let recorded =
            |id: JobId| history.get(id).is_some() || live.binary_search_by_key(&id, |r| r.id).is_ok();
        let max_id = recover_run_dirs(cfg, &loaded, recorded);
        Recovered {
            loaded,
            live,
            history,
            tally,
            missing_results,
            max_id,
            callbacks,
        }
    }

    /// Records read.
    pub fn records(&self) -> usize {
        self.loaded.records
    }

    /// Records moved aside as unreadable: where to, and why.
    pub fn quarantined(&self) -> &[(std::path::PathBuf, String)] {
        &self.loaded.quarantined
    }
}

impl Scheduler {
    /// Builds the scheduler from what the store holds, adopting jobs that were running.
    pub async fn recover(
        cfg: Arc<Config>,
        store: Store,
        found: Recovered,
        host: Arc<Host>,
    ) -> (Scheduler, Handle, mpsc::UnboundedReceiver<Msg>) {
        let Recovered {
            loaded,
            live,
            history,
            tally,
            missing_results,
            max_id,
            callbacks,
        } = found;
        crate::callback::enqueue_all(&cfg, callbacks); // callback
        let (tx, rx) = mpsc::unbounded_channel();
        let paused = cfg.paths.spool.join("paused").exists();
        let mut s = Scheduler {
            cfg,
            store,
            tx: tx.clone(),
            jobs: HashMap::new(),
            history,
            in_flight: HashMap::new(),
            reviving: HashMap::new(),
            unrecorded: HashMap::new(),
            rewrite: BTreeSet::new(),
            store_error: None,
            ready: BTreeMap::new(),
            running: HashMap::new(),
            running_per_class: HashMap::new(),
            dependents: HashMap::new(),
            waiters: HashMap::new(),
            writing_results: HashMap::new(),
            on_idle: Vec::new(),
            pending: Pending::default(),
            tally,
            next_id: max_id + 1,
            paused,
            started_at: Timestamp::now(),
            quarantined: loaded
                .quarantined
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect(),
            launcher: Arc::new(Launcher::new()),
            gpu_usable: host.usable_gpus(),
            host,
            gpu_busy: HashMap::new(),
            gpu_outside: BTreeSet::new(),
            gpu_probing: false,
            claiming: HashMap::new(),
            cleaning: HashSet::new(),
            boot_id: match crate::sys::boot_id() {
                Ok(b) => Some(b),
                Err(e) => {
                    warn!("cannot read the kernel's boot id: {e}");
                    None
                }
            },
        };
        let mut to_adopt = Vec::new();
        for rec in live {
            let id = rec.id;
            match &rec.state {
                JobState::Running {
                    attempt,
                    gpus,
                    boot_id,
                    ..
                } => {
                    // Started under another boot: its supervisor cannot have survived.
                    let rebooted = boot_id.is_some() && *boot_id != s.boot_id;
                    to_adopt.push((id, *attempt, gpus.clone(), rebooted, rec.run_dir.clone()))
                }
                JobState::Waiting { until, .. } => {
                    let wait = Duration::from_millis(Timestamp::now().ms_until(*until));
                    s.wake_after(id, wait);
                }
                _ => {}
            }
            s.jobs.insert(id, rec);
        }
        // Queued jobs enter the ready sets (after all records are known, for dependencies).
        let queued: Vec<JobId> = s
            .jobs
            .values()
            .filter(|r| matches!(r.state, JobState::Queued { .. }))
            .map(|r| r.id)
            .collect();
        for id in queued {
            s.enqueue(id);
        }
        let mut alive = BTreeSet::new();
        for (id, attempt, gpus, rebooted, run_dir) in to_adopt {
            let class = s.jobs[&id].spec.class();
            *s.running_per_class.entry(class).or_default() += 1;
            for g in &gpus {
                s.gpu_busy.insert(*g, id);
            }
            s.running.insert(
                id,
                Slot {
                    pidfd: None,
                    cancel_by: None,
                    gpus,
                },
            );
            let files = runner::SupFiles::new(&s.cfg, id);
            let found = tokio::task::spawn_blocking(move || {
                runner::adopt(files, Path::new(&run_dir), attempt, rebooted)
            })
            .await
            .unwrap_or_else(|e| Adopted::Lost(format!("adoption failed: {e}")));
            match found {
                Adopted::Alive(run) => {
                    alive.insert(id);
                    info!(job_id = id, pid = run.sup.pid, "re-adopted running job");
                    s.watch(id, attempt, run);
                }
                Adopted::Ended(exit) => {
                    let _ = tx.send(Msg::Exited {
                        id,
                        attempt,
                        ended: Ended::Exit(exit),
                    });
                }
                Adopted::Lost(why) => {
                    let _ = tx.send(Msg::Exited {
                        id,
                        attempt,
                        ended: Ended::Lost(why),
                    });
                }
                Adopted::NeverLaunched => {
                    info!(
                        job_id = id,
                        "job was being started when cybd stopped; queueing it again"
                    );
                    let _ = tx.send(Msg::Exited {
                        id,
                        attempt,
                        ended: Ended::Exit(ExitRecord {
                            attempt,
                            not_launched: true,
                            ..Default::default()
                        }),
                    });
                }
            }
        }
        // Cgroups of jobs that are not running any more (their supervisor is gone, or cybd
        // was killed between creating a cgroup and starting the job): killed and removed.
        let host = s.host.clone();
        let running: BTreeSet<JobId> = s.running.keys().copied().collect();
        let cfg = s.cfg.clone();
        let _ = tokio::task::spawn_blocking(move || {
            host.sweep(&alive);
            // Files of jobs whose end was recorded just before the last daemon died.
            runner::sweep_sup_dir(&cfg, &running);
        })
        .await;
        // A crash between a job's end and its result.json: write the missing ones.
        tokio::task::spawn_blocking(move || {
            for rec in missing_results {
                if !std::path::Path::new(&rec.run_dir).join("result.json").exists()
                    && let Err(e) = runner::write_result(&rec)
                {
                    warn!(job_id = rec.id, "cannot write result.json: {e}");
                }
            }
        });
        let handle = Handle { tx };
        (s, handle, rx)
    }

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
                _ = gpu_tick.tick(), if !self.gpu_usable.is_empty() && !self.gpu_probing => {
                    self.gpu_probing = true;
                    let host = self.host.clone();
                    let allow_shared = self.cfg.gpus.allow_shared;
                    let tx = self.tx.clone();
                    let probe = tokio::task::spawn_blocking(move || host.gpus_taken_outside(allow_shared));
                    tokio::spawn(async move {
                        // A probe that failed counts as "nothing outside": the next one looks again.
                        let outside = probe.await.unwrap_or_default();
                        let _ = tx.send(Msg::GpusOutside(outside));
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
                }
            }
        }
    }

    /// Sends this iteration's record writes to the store (one per job, its latest state),
    /// then its read barriers, and passes each write's acknowledgement on to who waits. A
    /// write of a recorded job that fails is reported back ([`Msg::Settled`]) and made
    /// again later, so an end recorded while the disk is full reaches it once there is room.
    fn flush(&mut self) {
        let mut acks = Vec::with_capacity(self.pending.dirty.len());
        for (id, waiting) in self.pending.dirty.drain() {
            let rec = match self.jobs.get(&id) {
                Some(rec) => {
                    self.tally.note(rec);
                    rec
                }
                None => match self.unrecorded.get(&id) {
                    Some(rec) => rec,
                    None => continue,
                },
            };
            acks.push((id, self.store.put(rec), waiting));
            *self.in_flight.entry(id).or_default() += 1;
        }
        if !acks.is_empty() {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let ids = acks.iter().map(|(id, _, _)| *id).collect();
                for (id, ack, waiting) in acks {
                    let res = match ack.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("the store writer stopped".to_string()),
                    };
                    if let Err(e) = &res {
                        failed.push((id, e.clone()));
                    }
                    for w in waiting {
                        let _ = w.send(res.clone());
                    }
                }
                let _ = tx.send(Msg::Settled { ids, failed });
            });
        }
        if !self.pending.barriers.is_empty() {
            let barriers = std::mem::take(&mut self.pending.barriers);
            let ack = self.store.barrier();
            tokio::spawn(async move {
                let _ = ack.await;
                for b in barriers {
                    let _ = b.send(());
                }
            });
        }
    }

    /// The writes of one flush are done. Ended jobs with no write left to make are
    /// compacted; writes that failed are made again.
    fn settled(&mut self, ids: Vec<JobId>, failed: Vec<(JobId, String)>) {
        if failed.is_empty() {
            if self.store_error.take().is_some() {
                info!("job records are written again");
            }
        } else {
            self.not_durable(failed);
        }
        for id in ids {
            if let Some(n) = self.in_flight.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&id);
                    self.compact(id);
                }
            }
        }
    }

    /// Keeps ended job `id` as a summary in [`History`] once nothing about it is left to
    /// write or answer: its end and result.json are written and no write of its record is
    /// queued, under way or to be made again. Its record on disk is then its latest state,
    /// which [`Scheduler::revive`] reads back when a request needs it whole.
    fn compact(&mut self, id: JobId) {
        let settled = self.jobs.get(&id).is_some_and(|r| r.state.is_terminal())
            && !self.writing_results.contains_key(&id)
            && !self.pending.dirty.contains_key(&id)
            && !self.in_flight.contains_key(&id)
            && !self.rewrite.contains(&id)
            && !self.waiters.contains_key(&id)
            && !self.reviving.contains_key(&id);
        if settled && let Some(rec) = self.jobs.remove(&id) {
            debug!(job_id = id, job_user = %rec.owner.user, "ended job kept as a summary");
            self.history.insert(&rec);
        }
    }

    /// Reads ended job `id`'s record back from the store for `m` (which needs it whole), and
    /// handles `m` once it is back among the jobs. Requests for it that come meanwhile wait
    /// with `m`, so there is one read, of the latest version.
    fn revive(&mut self, id: JobId, m: Msg) {
        if let Some(waiting) = self.reviving.get_mut(&id) {
            waiting.push(m);
            return;
        }
        self.reviving.insert(id, vec![m]);
        let user = self.history.get(id).map(|p| p.user.clone()).unwrap_or_default();
        debug!(job_id = id, job_user = %user, "reading the record of an ended job back");
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let rec = tokio::task::spawn_blocking(move || store.read(id).map(Box::new))
                .await
                .unwrap_or_else(|e| Err(format!("reading it failed: {e}")));
            let _ = tx.send(Msg::Revived { id, rec });
        });
    }

    fn revived(&mut self, id: JobId, rec: Result<Box<JobRecord>, String>) {
        let waiting = self.reviving.remove(&id).unwrap_or_default();
        match rec {
            Ok(rec) if self.history.remove(id).is_some() => {
                self.jobs.insert(id, *rec);
            }
            Ok(_) => {}
            Err(why) => {
                error!(job_id = id, "cannot read the record of ended job {id}: {why}");
                for m in waiting {
                    m.refuse(RpcError::Internal(format!(
                        "cannot read the record of job {id}: {why}"
                    )));
                }
                return;
            }
        }
        for m in waiting {
            self.handle(m);
        }
        self.compact(id);
    }

    /// Record writes that failed: the jobs' latest states are written again after
    /// [`REWRITE_AFTER`]. A submission's first write is settled by [`Msg::Recorded`] and an
    /// end's by [`until_durable`], so neither is written again here.
    fn not_durable(&mut self, failed: Vec<(JobId, String)>) {
        let arm = self.rewrite.is_empty();
        for (id, why) in failed {
            if self.store_error.is_none() {
                error!("cannot write job records ({why}); cybd keeps trying");
            }
            self.store_error = Some(why);
            if self.jobs.contains_key(&id) && !self.writing_results.contains_key(&id) {
                self.rewrite.insert(id);
            }
        }
        if arm && !self.rewrite.is_empty() {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REWRITE_AFTER).await;
                let _ = tx.send(Msg::Rewrite);
            });
        }
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
        let mut line = format!("{} running, {queued} queued", self.running.len());
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
        let ids: Vec<JobId> = self.running.keys().copied().collect();
        info!("stopping: cancelling {} running job(s)", ids.len());
        for id in ids {
            let peer = Peer {
                uid: 0,
                pid: None,
                name: "cybd (service stopped)".into(),
                admin: true,
            };
            let _ = self.try_act(id, Action::Cancel, &peer);
        }
        self.paused = true;
        self.on_idle.push(reply);
        self.check_idle();
    }

    fn check_idle(&mut self) {
        // Idle: no job runs and every ended job's result.json is written.
        if self.running.is_empty()
            && self.writing_results.is_empty()
            && self.claiming.is_empty()
            && !self.on_idle.is_empty()
        {
            for r in self.on_idle.drain(..) {
                let _ = r.send(());
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        if let Some(id) = m.whole_job()
            && (self.history.get(id).is_some() || self.reviving.contains_key(&id))
        {
            return self.revive(id, m);
        }
        match m {
            Msg::Submit {
                spec,
                owner,
                origin,
                reply,
            } => self.submit(*spec, owner, origin, reply),
            Msg::Check { spec, owner, reply } => {
                let _ = reply.send(self.admit(&spec, &owner));
            }
            Msg::List { filter, reply } => self.reply_synced(reply, self.list(&filter)),
            Msg::Show { id, reply } => {
                self.reply_synced(reply, self.jobs.get(&id).cloned().ok_or(RpcError::NotFound(id)))
            }
            Msg::Wait { id, reply } => match self.jobs.get(&id) {
                None => {
                    let _ = reply.send(Err(RpcError::NotFound(id)));
                }
                Some(_) if self.writing_results.contains_key(&id) => {
                    self.writing_results.entry(id).or_default().push(reply);
                }
                Some(r) if r.state.is_terminal() => self.reply_synced(reply, Ok(r.clone())),
                Some(_) => {
                    let w = self.waiters.entry(id).or_default();
                    w.retain(|s| !s.is_closed());
                    w.push(reply);
                }
            },
            Msg::Act {
                id,
                action,
                peer,
                reply,
            } => self.act(id, action, &peer, reply),
            Msg::Pause { pause, peer, reply } => {
                if !peer.admin {
                    let _ = reply.send(Err(RpcError::PermissionDenied(format!(
                        "only root or members of the admin group may {} the queue",
                        if pause { "pause" } else { "resume" }
                    ))));
                    return;
                }
                self.paused = pause;
                let marker = self.cfg.paths.spool.join("paused");
                let res = if pause {
                    std::fs::write(&marker, format!("paused by {}\n", peer.name))
                } else {
                    std::fs::remove_file(&marker).or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                };
                if let Err(e) = res {
                    warn!("cannot record pause state in {}: {e}", marker.display());
                }
                info!(event = if pause { "paused" } else { "resumed" }, by = %peer.name, "queue {}", if pause { "paused" } else { "resumed" });
                let _ = reply.send(Ok(()));
            }
            Msg::Stats { reply } => {
                let st = self.stats();
                self.reply_synced(reply, st)
            }
            Msg::SpoolOrigins { reply } => {
                let set = self
                    .jobs
                    .values()
                    .filter_map(|r| crate::history::spool_identity(&r.origin))
                    .chain(self.history.iter().filter_map(|(_, p)| p.spool))
                    .collect();
                let _ = reply.send(set);
            }
            Msg::Launched { id, attempt, res } => self.launched(id, attempt, res),
            Msg::Exited { id, attempt, ended } => self.exited(id, attempt, ended),
            Msg::Wake { id } => {
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
            Msg::ResultWritten { id } => {
                let rec = self.jobs.get(&id).cloned();
                // callback: the end is durable and result.json written; POST it (outbox).
                if let Some(e) = rec.as_ref().and_then(crate::callback::Ended::of) {
                    crate::callback::enqueue(&self.cfg, e);
                }
                for w in self.writing_results.remove(&id).unwrap_or_default() {
                    let _ = w.send(rec.clone().ok_or(RpcError::NotFound(id)));
                }
                // Retried meanwhile: held back until now (see `schedule`).
                if matches!(rec.map(|r| r.state), Some(JobState::Queued { .. })) {
                    self.enqueue(id);
                }
                self.compact(id);
            }
            Msg::Kick => {}
            Msg::Recorded { id, res, reply } => self.recorded(id, res, reply),
            Msg::Persist { id, reply } => {
                let _ = reply.send(self.pending.persist(id));
            }
            Msg::Settled { ids, failed } => self.settled(ids, failed),
            Msg::Revived { id, rec } => self.revived(id, rec),
            Msg::Rewrite => {
                for id in std::mem::take(&mut self.rewrite) {
                    self.pending.persist_detached(id);
                }
            }
            Msg::GpusClaimed { id, res } => self.gpus_claimed(id, res),
            Msg::Cleaned { id } => {
                self.cleaning.remove(&id);
                if matches!(
                    self.jobs.get(&id).map(|r| &r.state),
                    Some(JobState::Queued { .. })
                ) {
                    self.enqueue(id);
                }
            }
            Msg::GpusOutside(outside) => {
                self.gpu_probing = false;
                if outside != self.gpu_outside {
                    info!("gpus held outside cybd: {outside:?}");
                }
                self.gpu_outside = outside;
            }
            Msg::Reload(cfg) => {
                info!("configuration reloaded");
                self.cfg = cfg;
            }
            Msg::Shutdown(reply) => self.shutdown(reply),
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

    // ----- submission

    fn admit(&self, spec: &JobSpec, owner: &Owner) -> Result<(), RpcError> {
        let spec_err = |e: SpecError| RpcError::InvalidSpec(e);
        if owner.uid == 0 && !self.cfg.allow_root_jobs {
            return Err(RpcError::PermissionDenied(
                "jobs owned by root are refused here (allow_root_jobs = false in the config)".into(),
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && owner.uid != me {
            return Err(RpcError::PermissionDenied(format!(
                "this cybd runs unprivileged as uid {me} and can only run that user's jobs (the job belongs to uid {})",
                owner.uid
            )));
        }
        match spec.backend() {
            Backend::Native => {}
            b => {
                let field = match b {
                    Backend::Docker => "docker",
                    Backend::Builtin => "task",
                    _ => "class",
                };
                return Err(spec_err(SpecError::field(
                    field,
                    format!("backend not available on this host: this cybd cannot run {b} jobs yet"),
                )));
            }
        }
        if spec.gpus() as usize > self.gpu_usable.len() {
            return Err(spec_err(SpecError::field(
                "resources.gpus",
                format!(
                    "asks for {} GPU(s) but this host has {} GPU(s) available to cybd",
                    spec.gpus(),
                    self.gpu_usable.len()
                ),
            )));
        }
        if spec.gpus() > 0
            && let Err(why) = self.host.gpu_fencing()
        {
            return Err(spec_err(SpecError::field(
                "resources.gpus",
                format!("this host cannot keep a job to its own GPUs: {why}"),
            )));
        }
        if self.cfg.require_limits
            && let Err((field, why)) = self.host.check_enforceable(&self.cfg, spec)
        {
            return Err(spec_err(SpecError::field(field, why)));
        }
        let class = self.cfg.class(spec.class());
        if let Some(t) = spec.timeout
            && t.0 > class.max_timeout
        {
            return Err(spec_err(SpecError::field(
                "timeout",
                format!(
                    "{} is longer than the {} allowed for class {}",
                    humantime::format_duration(t.0),
                    humantime::format_duration(class.max_timeout),
                    spec.class()
                ),
            )));
        }
        if let Some(u) = &spec.callback_url
            && let Err(why) = crate::callback::check_url(&self.cfg.callbacks, u)
        {
            return Err(spec_err(SpecError::field("callback_url", why)));
        }
        for (i, d) in spec.depends_on.iter().enumerate() {
            let known = u64::try_from(*d).ok().is_some_and(|d| self.state_of(d).is_some());
            if !known {
                return Err(spec_err(SpecError::field(
                    format!("depends_on[{i}]"),
                    format!("job {d} does not exist"),
                )));
            }
        }
        Ok(())
    }

    fn submit(
        &mut self,
        mut spec: JobSpec,
        owner: Owner,
        origin: Origin,
        reply: Reply<Result<JobId, RpcError>>,
    ) {
        if let Err(e) = self.admit(&spec, &owner) {
            let _ = reply.send(Err(e));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if spec.class.is_none() {
            spec.class = Some(Class::CpuShort);
        }
        if spec.name.is_none() {
            spec.name = Some(default_name(&spec, &origin));
        }
        let now = Timestamp::now();
        let rec = JobRecord {
            id,
            priority: spec.priority(),
            spec,
            owner,
            origin,
            submitted_at: now,
            attempts: 0,
            first_started_at: None,
            run_dir: self.cfg.paths.run_dir(id).to_string_lossy().into_owned(),
            callback: None,
            state: JobState::Queued { since: now },
        };
        let ack = self.pending.persist(id);
        self.unrecorded.insert(id, rec);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let res = match ack.await {
                Ok(res) => res,
                Err(_) => Err("the store writer stopped".into()),
            };
            let _ = tx.send(Msg::Recorded { id, res, reply });
        });
    }

    /// A submission's record is durable (the job joins the queue) or could not be written
    /// (the job is forgotten, and the submitter is told why).
    fn recorded(&mut self, id: JobId, res: Result<(), String>, reply: Reply<Result<JobId, RpcError>>) {
        let Some(rec) = self.unrecorded.remove(&id) else {
            return;
        };
        if let Err(why) = res {
            error!(job_id = id, "cannot record job: {why}");
            self.store_error = Some(why.clone());
            let _ = reply.send(Err(RpcError::Unavailable(format!(
                "cannot record the job: {why}"
            ))));
            return;
        }
        info!(
            event = "submitted",
            job_id = id,
            job_user = %rec.owner.user,
            class = %rec.spec.class(),
            tenant = rec.spec.tenant.as_deref().unwrap_or(""),
            "job {id} submitted by {}", rec.owner.user
        );
        self.tally.note(&rec);
        self.jobs.insert(id, rec);
        self.enqueue(id);
        let _ = reply.send(Ok(id));
    }

    /// Puts a queued job where it belongs: ready, waiting for dependencies, or failed
    /// because a dependency failed.
    fn enqueue(&mut self, id: JobId) {
        let Some(rec) = self.jobs.get(&id) else { return };
        let mut pending = Vec::new();
        let mut failed_dep = None;
        for d in &rec.spec.depends_on {
            let d = *d as JobId;
            match self.state_of(d) {
                Some(StateName::Succeeded) => {}
                Some(s) if s.is_terminal() => failed_dep = Some((d, s)),
                Some(_) => pending.push(d),
                None => failed_dep = Some((d, StateName::Failed)),
            }
        }
        if let Some((d, s)) = failed_dep {
            let outcome = Outcome {
                reason: Reason::DependencyFailed,
                message: format!("dependency job {d} ended {s}"),
                exit_code: None,
                signal: None,
                started_at: None,
                finished_at: Timestamp::now(),
                peak_memory_bytes: None,
                cpu_usage_ms: None,
            };
            self.finish(id, JobState::Failed { outcome });
            return;
        }
        if !pending.is_empty() {
            for d in pending {
                let v = self.dependents.entry(d).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
            }
            return;
        }
        self.ready
            .entry(rec.spec.class())
            .or_default()
            .insert((Reverse(rec.priority), id));
    }

    /// The state of job `id`, ended or not.
    fn state_of(&self, id: JobId) -> Option<StateName> {
        match self.jobs.get(&id) {
            Some(r) => Some(r.state.name()),
            None => self.history.get(id).map(|p| p.state),
        }
    }

    fn dequeue(&mut self, id: JobId) {
        if let Some(rec) = self.jobs.get(&id)
            && let Some(set) = self.ready.get_mut(&rec.spec.class())
        {
            set.remove(&(Reverse(rec.priority), id));
        }
    }

    // ----- starting and ending

    fn schedule(&mut self) {
        if self.paused {
            return;
        }
        for class in Class::ALL {
            let slots = self.cfg.class(class).slots;
            loop {
                let busy = self.running_per_class.get(&class).copied().unwrap_or(0);
                if busy >= slots {
                    break;
                }
                let Some(set) = self.ready.get_mut(&class) else {
                    break;
                };
                let Some(&(_, id)) = set.first() else { break };
                // A job whose GPU claim, lost-job clean-up or end (result.json, supervisor
                // files) is under way was put back in the queue meanwhile (hold/release,
                // cancel/retry): it starts once that is done.
                if self.claiming.contains_key(&id)
                    || self.cleaning.contains(&id)
                    || self.writing_results.contains_key(&id)
                {
                    set.pop_first();
                    continue;
                }
                // GPUs: the head of the class waits until enough are free; jobs of other
                // classes are never held back by it. (No backfill within the class.)
                let need = self.jobs.get(&id).map_or(0, |r| r.spec.gpus() as usize);
                let queued = matches!(
                    self.jobs.get(&id).map(|r| &r.state),
                    Some(JobState::Queued { .. })
                );
                let gpus: Vec<u32> = if need > 0 && queued {
                    let free: Vec<u32> = self
                        .gpu_usable
                        .iter()
                        .filter(|g| !self.gpu_busy.contains_key(g) && !self.gpu_outside.contains(g))
                        .copied()
                        .take(need)
                        .collect();
                    if free.len() < need {
                        break;
                    }
                    free
                } else {
                    Vec::new()
                };
                if let Some(set) = self.ready.get_mut(&class) {
                    set.pop_first();
                }
                if gpus.is_empty() {
                    self.start(id, Vec::new(), Vec::new());
                } else {
                    self.claim_gpus(id, class, gpus);
                }
            }
        }
    }

    /// Takes the locks of `gpus` for queued job `id` (off the runtime); the job keeps its
    /// class slot and the GPUs meanwhile, and starts once it holds them all.
    fn claim_gpus(&mut self, id: JobId, class: Class, gpus: Vec<u32>) {
        let Some(rec) = self.jobs.get(&id) else { return };
        *self.running_per_class.entry(class).or_default() += 1;
        for g in &gpus {
            self.gpu_busy.insert(*g, id);
        }
        self.claiming.insert(id, gpus.clone());
        let (host, user, tx) = (self.host.clone(), rec.owner.user.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let res = host.acquire_gpus(id, &user, &gpus);
            let _ = tx.send(Msg::GpusClaimed { id, res });
        });
    }

    fn gpus_claimed(&mut self, id: JobId, res: Result<Vec<GpuLease>, u32>) {
        let Some(gpus) = self.claiming.remove(&id) else {
            return;
        };
        let class = self.jobs.get(&id).map(|r| r.spec.class());
        if let Some(n) = class.and_then(|c| self.running_per_class.get_mut(&c)) {
            *n = n.saturating_sub(1);
        }
        for g in &gpus {
            if self.gpu_busy.get(g) == Some(&id) {
                self.gpu_busy.remove(g);
            }
        }
        let queued = matches!(
            self.jobs.get(&id).map(|r| &r.state),
            Some(JobState::Queued { .. })
        );
        match res {
            Ok(leases) if queued && !self.paused => self.start(id, gpus, leases),
            Ok(leases) => {
                // Cancelled or held meanwhile, or the queue was paused (or the daemon is
                // stopping): the job does not start now.
                crate::host::release_gpus(leases);
                if queued {
                    self.enqueue(id);
                }
            }
            Err(g) => {
                // Taken outside cybd since the last probe: nothing ran; the GPU counts as
                // taken until a probe finds it free, and the job waits for GPUs again.
                info!(
                    job_id = id,
                    "gpu {g} is held outside cybd; job {id} waits for a free one"
                );
                self.gpu_outside.insert(g);
                if queued {
                    self.enqueue(id);
                }
            }
        }
    }

    fn start(&mut self, id: JobId, gpus: Vec<u32>, leases: Vec<GpuLease>) {
        let Some(rec) = self.jobs.get_mut(&id) else { return };
        if !matches!(rec.state, JobState::Queued { .. }) {
            return;
        }
        let attempt = rec.attempts + 1;
        let now = Timestamp::now();
        rec.attempts = attempt;
        rec.first_started_at.get_or_insert(now);
        rec.state = JobState::Running {
            started_at: now,
            attempt,
            supervisor: None,
            gpus: gpus.clone(),
            boot_id: self.boot_id.clone(),
        };
        *self.running_per_class.entry(rec.spec.class()).or_default() += 1;
        for g in &gpus {
            self.gpu_busy.insert(*g, id);
        }
        self.running.insert(
            id,
            Slot {
                pidfd: None,
                cancel_by: None,
                gpus: gpus.clone(),
            },
        );
        let ack = self.pending.persist(id);
        let rec = rec.clone();
        let cfg = self.cfg.clone();
        let tx = self.tx.clone();
        let launcher = self.launcher.clone();
        let host = self.host.clone();
        // The supervisor starts while the running record is made durable; it is handed the
        // job only once that record is on disk.
        let spawned = tokio::task::spawn_blocking(move || {
            let acct = users::account_cached(rec.owner.uid).map_err(|e| StartError::Failed(e.to_string()))?;
            let mut launch = runner::launch_for(&cfg, &rec, &acct, attempt, &gpus, host.gpu_env(&gpus))
                .map_err(StartError::Failed)?;
            let conf = host
                .prepare(&cfg, &rec, &gpus, leases, attempt)
                .map_err(StartError::Failed)?;
            launch.cgroup = conf.cgroup;
            let held: Vec<_> = conf.gpus.iter().map(|l| l.as_fd()).collect();
            let files = runner::SupFiles::new(&cfg, rec.id);
            match runner::spawn_supervisor(&launcher, files, &rec, &launch, &held) {
                Ok(s) => {
                    drop(held);
                    crate::host::hand_gpus_to(conf.gpus, s.pid());
                    Ok((s, launch))
                }
                Err(e) => {
                    drop(held);
                    if let Some(cg) = &launch.cgroup {
                        let _ = cg.remove();
                    }
                    Err(StartError::Failed(e))
                }
            }
        });
        tokio::spawn(async move {
            let durable = match ack.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StartError::Store(format!("store: {e}"))),
                Err(_) => Err(StartError::Store("store: writer stopped".to_string())),
            };
            let spawned = spawned
                .await
                .unwrap_or_else(|e| Err(StartError::Failed(format!("start task failed: {e}"))));
            let res = match (durable, spawned) {
                (Ok(()), Ok((s, launch))) => {
                    tokio::task::spawn_blocking(move || runner::hand_over(s, &launch))
                        .await
                        .map_err(|e| StartError::Failed(format!("start task failed: {e}")))
                }
                (Ok(()), Err(e)) => Err(e),
                (Err(e), spawned) => {
                    if let Ok((s, launch)) = spawned {
                        let _ = tokio::task::spawn_blocking(move || {
                            runner::abandon(s);
                            if let Some(cg) = &launch.cgroup {
                                let _ = cg.remove();
                            }
                        })
                        .await;
                    }
                    Err(e)
                }
            };
            let _ = tx.send(Msg::Launched { id, attempt, res });
        });
    }

    fn launched(&mut self, id: JobId, attempt: u32, res: Result<Running, StartError>) {
        match res {
            Ok(run) => {
                if let Some(rec) = self.jobs.get_mut(&id)
                    && let JobState::Running { supervisor, .. } = &mut rec.state
                {
                    *supervisor = Some(run.proc_ref());
                    info!(event = "started", job_id = id, pid = run.sup.pid, attempt, job_user = %rec.owner.user, "job {id} started");
                }
                self.watch(id, attempt, run);
            }
            Err(StartError::Store(why)) => {
                // Not recorded as running, so nothing ran: put it back and try again later.
                error!(job_id = id, "cannot record job start ({why}); retrying in 5s");
                self.release_slot(id);
                if let Some(rec) = self.jobs.get_mut(&id) {
                    rec.attempts = rec.attempts.saturating_sub(1);
                    rec.state = JobState::Waiting {
                        until: Timestamp::now(),
                        next_attempt: attempt,
                        last: Outcome {
                            reason: Reason::SpawnFailed,
                            message: why,
                            exit_code: None,
                            signal: None,
                            started_at: None,
                            finished_at: Timestamp::now(),
                            peak_memory_bytes: None,
                            cpu_usage_ms: None,
                        },
                    };
                }
                self.wake_after(id, Duration::from_secs(5));
            }
            Err(StartError::Failed(why)) => {
                let exit = ExitRecord {
                    attempt,
                    started: false,
                    error: Some(why),
                    ..Default::default()
                };
                self.exited(id, attempt, Ended::Exit(exit));
            }
        }
    }

    /// Watches a supervisor until it exits.
    fn watch(&mut self, id: JobId, attempt: u32, run: Running) {
        if let Some(slot) = self.running.get_mut(&id) {
            slot.pidfd = Some(run.pidfd.clone());
            if slot.cancel_by.is_some()
                && let Err(e) = runner::cancel(&run.pidfd)
            {
                warn!(job_id = id, "cannot signal supervisor: {e}");
            }
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ended = runner::wait(&run).await;
            let _ = tx.send(Msg::Exited { id, attempt, ended });
        });
    }

    fn release_slot(&mut self, id: JobId) -> Option<Slot> {
        let slot = self.running.remove(&id)?;
        for g in &slot.gpus {
            if self.gpu_busy.get(g) == Some(&id) {
                self.gpu_busy.remove(g);
            }
        }
        if let Some(rec) = self.jobs.get(&id)
            && let Some(n) = self.running_per_class.get_mut(&rec.spec.class())
        {
            *n = n.saturating_sub(1);
        }
        Some(slot)
    }

    fn exited(&mut self, id: JobId, attempt: u32, mut ended: Ended) {
        // The memory cgroup the supervisor left for the next job, whatever becomes of this one.
        if let Ended::Exit(e) = &mut ended
            && let Some(spare) = e.spare.take()
        {
            self.host.keep_spare(spare);
        }
        let Some(rec) = self.jobs.get(&id) else { return };
        if !matches!(rec.state, JobState::Running { attempt: a, .. } if a == attempt) {
            return;
        }
        let started_at = match rec.state {
            JobState::Running { started_at, .. } => started_at,
            _ => Timestamp::now(),
        };
        let slot = self.release_slot(id);
        let cancel_by = slot.and_then(|s| s.cancel_by);
        let exit = match ended {
            Ended::Exit(e) => e,
            Ended::Lost(why) => {
                // Its supervisor did not clean up: whatever the job left runs on in its
                // cgroup, with nobody watching. Kill it and remove the cgroup.
                let (host, tx) = (self.host.clone(), self.tx.clone());
                self.cleaning.insert(id);
                tokio::task::spawn_blocking(move || {
                    host.remove_job_cgroup(id);
                    let _ = tx.send(Msg::Cleaned { id });
                });
                ExitRecord {
                    attempt,
                    started: true,
                    error: Some(why),
                    ..Default::default()
                }
            }
        };
        if exit.not_launched {
            if let Some(rec) = self.jobs.get_mut(&id) {
                rec.attempts = rec.attempts.saturating_sub(1);
                rec.state = JobState::Queued {
                    since: Timestamp::now(),
                };
                self.pending.persist_detached(id);
            }
            self.enqueue(id);
            return;
        }
        let outcome = |reason, message: String| Outcome {
            reason,
            message,
            exit_code: exit.exit_code,
            signal: exit.signal,
            started_at: exit.started_at.or(Some(started_at)),
            finished_at: exit.finished_at.unwrap_or_else(Timestamp::now),
            peak_memory_bytes: exit.peak_memory_bytes,
            cpu_usage_ms: exit.cpu_usage_ms,
        };
        let state = if exit.cancelled || (cancel_by.is_some() && !exit.started) {
            let by = cancel_by.unwrap_or_else(|| "unknown (cancelled while cybd restarted)".into());
            JobState::Cancelled {
                outcome: outcome(Reason::Cancelled, format!("cancelled by {by}")),
                by,
            }
        } else if exit.timed_out {
            JobState::TimedOut {
                outcome: outcome(Reason::Timeout, "the job ran past its time limit".into()),
            }
        } else if !exit.started {
            let why = exit
                .error
                .clone()
                .unwrap_or_else(|| "the job could not be started".into());
            JobState::Failed {
                outcome: outcome(Reason::SpawnFailed, why),
            }
        } else if let Some(why) = exit
            .error
            .clone()
            .filter(|_| exit.exit_code.is_none() && exit.signal.is_none())
        {
            JobState::Failed {
                outcome: outcome(Reason::Lost, why),
            }
        } else if exit.oom_killed && exit.exit_code != Some(0) {
            // The kernel's OOM killer ended a process of the job's cgroup (on v1 perhaps not
            // the main one, which then failed for it).
            let how = match (exit.signal, exit.exit_code) {
                (Some(s), _) => format!("killed by signal {s}"),
                (None, Some(c)) => format!("exited with status {c}"),
                (None, None) => "ended".to_string(),
            };
            JobState::Failed {
                outcome: outcome(
                    Reason::OomKilled,
                    format!(
                        "the kernel's OOM killer ended a process of the job at its memory limit; the job {how}"
                    ),
                ),
            }
        } else if exit.exit_code == Some(0) {
            JobState::Succeeded {
                outcome: outcome(Reason::Success, "exited with status 0".into()),
            }
        } else if let Some(c) = exit.exit_code {
            JobState::Failed {
                outcome: outcome(Reason::ExitCode, format!("exited with status {c}")),
            }
        } else if let Some(s) = exit.signal {
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("unknown signal");
            JobState::Failed {
                outcome: outcome(Reason::Signal, format!("killed by signal {s} ({name})")),
            }
        } else {
            JobState::Failed {
                outcome: outcome(Reason::Lost, "the job ended without an exit status".into()),
            }
        };
        // Retry policy.
        if matches!(state, JobState::Failed { .. } | JobState::TimedOut { .. })
            && let Some(rec) = self.jobs.get(&id)
            && let Some(policy) = rec.spec.retry.clone()
            && i64::from(rec.attempts) < policy.max_attempts
            && (matches!(state, JobState::TimedOut { .. }) || policy.retries_exit(exit.exit_code))
        {
            let next_attempt = rec.attempts + 1;
            let delay = policy.delay_before(next_attempt);
            let last = state
                .outcome()
                .cloned()
                .unwrap_or_else(|| outcome(Reason::Lost, String::new()));
            info!(
                event = "retried",
                job_id = id,
                attempt = next_attempt,
                "job {id} failed ({}); attempt {next_attempt} in {}",
                last.message,
                humantime::format_duration(delay)
            );
            let until = Timestamp(Timestamp::now().0 + delay);
            if let Some(rec) = self.jobs.get_mut(&id) {
                rec.state = JobState::Waiting {
                    until,
                    next_attempt,
                    last,
                };
                self.pending.persist_detached(id);
            }
            self.wake_after(id, delay);
            return;
        }
        self.finish(id, state);
    }

    /// Moves a job to a terminal state: durable first, then result.json, waiters and
    /// dependents.
    fn finish(&mut self, id: JobId, state: JobState) {
        self.dequeue(id);
        let Some(rec) = self.jobs.get_mut(&id) else { return };
        let name = state.name();
        let event = match name {
            StateName::Succeeded => "finished",
            StateName::TimedOut => "timed_out",
            StateName::Cancelled => "cancelled",
            _ => "failed",
        };
        if let Some(o) = state.outcome() {
            info!(event, job_id = id, job_user = %rec.owner.user, reason = %o.reason, "job {id} {name}: {}", o.message);
        }
        rec.state = state;
        let ack = self.pending.persist(id);
        let rec = rec.clone();
        // `wait` answers only once result.json is there too.
        let waiters = self.waiters.remove(&id).unwrap_or_default();
        self.writing_results.entry(id).or_default().extend(waiters);
        let tx = self.tx.clone();
        let files = runner::SupFiles::new(&self.cfg, id);
        tokio::spawn(async move {
            // result.json follows the durable end; until then a restarted daemon still
            // needs the supervisor's files.
            if !until_durable(&tx, id, ack).await {
                return;
            }
            let rec = Arc::new(rec);
            let mut told = false;
            loop {
                let r = rec.clone();
                let res = tokio::task::spawn_blocking(move || runner::write_result(&r))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match res {
                    Ok(()) => break,
                    // No room for it now: it is written once there is.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                        if !told {
                            warn!(
                                job_id = id,
                                "cannot write result.json in {} ({e}); retrying until it is", rec.run_dir
                            );
                            told = true;
                        }
                        tokio::time::sleep(REWRITE_AFTER).await;
                    }
                    Err(e) => {
                        warn!(job_id = id, "cannot write result.json in {}: {e}", rec.run_dir);
                        break;
                    }
                }
            }
            let _ = tokio::task::spawn_blocking(move || files.remove()).await;
            let _ = tx.send(Msg::ResultWritten { id });
        });
        // Jobs waiting for this one.
        if let Some(deps) = self.dependents.remove(&id) {
            for d in deps {
                if matches!(self.jobs.get(&d).map(|r| &r.state), Some(JobState::Queued { .. })) {
                    self.enqueue(d);
                }
            }
        }
    }

    fn wake_after(&self, id: JobId, delay: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Msg::Wake { id });
        });
    }

    // ----- actions by people

    fn act(&mut self, id: JobId, action: Action, peer: &Peer, reply: Reply<Result<JobRecord, RpcError>>) {
        let res = self.try_act(id, action, peer);
        match res {
            Ok(Some(ack)) => {
                let rec = self.jobs.get(&id).cloned();
                tokio::spawn(async move {
                    let r = match (ack.await, rec) {
                        (Ok(Ok(())), Some(rec)) => Ok(rec),
                        (Ok(Err(e)), _) => {
                            Err(RpcError::Unavailable(format!("cannot record the change: {e}")))
                        }
                        _ => Err(RpcError::Unavailable("cybd is shutting down".into())),
                    };
                    let _ = reply.send(r);
                });
            }
            Ok(None) => self.reply_synced(reply, self.jobs.get(&id).cloned().ok_or(RpcError::NotFound(id))),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Applies an action; returns the store ack when a record was written.
    fn try_act(&mut self, id: JobId, action: Action, peer: &Peer) -> Result<Option<Durable>, RpcError> {
        let rec = self.jobs.get(&id).ok_or(RpcError::NotFound(id))?;
        if !peer.may_manage(&rec.owner) {
            return Err(RpcError::PermissionDenied(format!(
                "job {id} belongs to {}; only its owner or an admin may change it",
                rec.owner.user
            )));
        }
        let state = rec.state.name();
        let now = Timestamp::now();
        match action {
            Action::Cancel => match state {
                StateName::Running => {
                    let slot = self
                        .running
                        .get_mut(&id)
                        .ok_or(RpcError::Internal("running job has no slot".into()))?;
                    slot.cancel_by = Some(peer.name.clone());
                    if let Some(fd) = &slot.pidfd
                        && let Err(e) = runner::cancel(fd)
                    {
                        warn!(job_id = id, "cannot signal supervisor: {e}");
                    }
                    Ok(None)
                }
                s if s.is_terminal() => Err(RpcError::InvalidState(format!(
                    "job {id} has already ended ({s})"
                ))),
                _ => {
                    let outcome = Outcome {
                        reason: Reason::Cancelled,
                        message: format!("cancelled by {} before it ran", peer.name),
                        exit_code: None,
                        signal: None,
                        started_at: None,
                        finished_at: now,
                        peak_memory_bytes: None,
                        cpu_usage_ms: None,
                    };
                    self.finish(
                        id,
                        JobState::Cancelled {
                            outcome,
                            by: peer.name.clone(),
                        },
                    );
                    // finish() marked the record for writing; this waits for that same write.
                    Ok(Some(self.pending.persist(id)))
                }
            },
            Action::Retry => {
                if !state.is_terminal() {
                    return Err(RpcError::InvalidState(format!(
                        "job {id} is {state}; only ended jobs can be retried"
                    )));
                }
                let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                rec.state = JobState::Queued { since: now };
                let ack = self.pending.persist(id);
                info!(event = "retried", job_id = id, by = %peer.name, "job {id} queued again by {}", peer.name);
                self.enqueue(id);
                Ok(Some(ack))
            }
            Action::Hold => match state {
                StateName::Queued | StateName::Waiting => {
                    self.dequeue(id);
                    let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                    rec.state = JobState::Held {
                        since: now,
                        by: peer.name.clone(),
                    };
                    Ok(Some(self.pending.persist(id)))
                }
                StateName::Held => Ok(None),
                s => Err(RpcError::InvalidState(format!(
                    "job {id} is {s}; only queued or waiting jobs can be held"
                ))),
            },
            Action::Release => match state {
                StateName::Held => {
                    let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                    rec.state = JobState::Queued { since: now };
                    let ack = self.pending.persist(id);
                    self.enqueue(id);
                    Ok(Some(ack))
                }
                s => Err(RpcError::InvalidState(format!("job {id} is {s}, not held"))),
            },
            Action::Priority(p) => {
                let was_ready = self
                    .ready
                    .get(&rec.spec.class())
                    .is_some_and(|s| s.contains(&(Reverse(rec.priority), id)));
                self.dequeue(id);
                let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                rec.priority = p;
                let ack = self.pending.persist(id);
                if was_ready {
                    let class = rec.spec.class();
                    self.ready.entry(class).or_default().insert((Reverse(p), id));
                }
                Ok(Some(ack))
            }
        }
    }

    // ----- reading

    fn list(&self, f: &ListFilter) -> Vec<JobSummary> {
        let wanted = |state: StateName, user: &str| {
            (f.states.is_empty() || f.states.contains(&state)) && f.user.as_deref().is_none_or(|u| u == user)
        };
        enum Found<'a> {
            Live(&'a JobRecord),
            Past(JobId, &'a crate::history::Past),
        }
        let mut found: Vec<(JobId, Found)> = self
            .jobs
            .values()
            .filter(|r| wanted(r.state.name(), &r.owner.user))
            .map(|r| (r.id, Found::Live(r)))
            .chain(
                self.history
                    .iter()
                    .filter(|(_, p)| wanted(p.state, &p.user))
                    .map(|(id, p)| (id, Found::Past(id, p))),
            )
            .collect();
        found.sort_by_key(|(id, _)| *id);
        if let Some(n) = f.limit
            && found.len() > n
        {
            found.drain(..found.len() - n);
        }
        found
            .into_iter()
            .map(|(_, j)| match j {
                Found::Live(r) => JobSummary::of(r),
                Found::Past(id, p) => p.summary(id),
            })
            .collect()
    }

    /// Notes the changes of this iteration not yet flushed.
    fn update_tally(&mut self) {
        for id in self.pending.dirty.keys() {
            if let Some(r) = self.jobs.get(id) {
                self.tally.note(r);
            }
        }
    }

    fn stats(&mut self) -> Stats {
        self.update_tally();
        let counts = &self.tally.states;
        let queued_per_class = &self.tally.queued;
        #[cfg(debug_assertions)]
        {
            // Debug builds (every end-to-end test) check the tally against a full count.
            let mut full: HashMap<StateName, usize> = HashMap::new();
            for r in self.jobs.values() {
                *full.entry(r.state.name()).or_default() += 1;
            }
            for (_, p) in self.history.iter() {
                *full.entry(p.state).or_default() += 1;
            }
            for s in StateName::ALL {
                assert_eq!(
                    full.get(&s).copied().unwrap_or(0),
                    counts.get(&s).copied().unwrap_or(0),
                    "job tally out of step for state {s:?}"
                );
            }
        }
        Stats {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at: self.started_at,
            paused: self.paused,
            counts: StateName::ALL
                .iter()
                .map(|s| (*s, counts.get(s).copied().unwrap_or(0)))
                .collect(),
            classes: Class::ALL
                .iter()
                .map(|c| ClassStats {
                    class: *c,
                    slots: self.cfg.class(*c).slots,
                    running: self.running_per_class.get(c).copied().unwrap_or(0),
                    queued: queued_per_class.get(c).copied().unwrap_or(0),
                })
                .collect(),
            total_jobs: self.jobs.len() + self.history.len(),
            next_id: self.next_id,
            quarantined: self.quarantined.clone(),
            store_error: self.store_error.clone(),
        }
    }
}

/// Waits until job `id`'s record is durable, asking the scheduler to write it again (its
/// latest state) every [`REWRITE_AFTER`] while writes fail, as they do while the disk is
/// full. False if the scheduler went away first.
async fn until_durable(tx: &mpsc::UnboundedSender<Msg>, id: JobId, mut ack: Durable) -> bool {
    let mut told = false;
    loop {
        match ack.await {
            Ok(Ok(())) => {
                if told {
                    info!(job_id = id, "the end of job {id} is recorded");
                }
                return true;
            }
            Ok(Err(why)) => {
                if !told {
                    error!(
                        job_id = id,
                        "cannot record the end of job {id} ({why}); retrying until it is"
                    );
                    told = true;
                }
            }
            Err(_) => return false,
        }
        tokio::time::sleep(REWRITE_AFTER).await;
        let (reply, rx) = oneshot::channel();
        if tx.send(Msg::Persist { id, reply }).is_err() {
            return false;
        }
        match rx.await {
            Ok(next) => ack = next,
            Err(_) => return false,
        }
    }
}

fn default_name(spec: &JobSpec, origin: &Origin) -> String {
    if let Origin::Spool { file, .. } = origin {
        return file.strip_suffix(".json").unwrap_or(file).to_string();
    }
    match (&spec.command, &spec.shell) {
        (Some(argv), _) => argv.join(" ").chars().take(64).collect(),
        (_, Some(sh)) => sh.chars().take(64).collect(),
        _ => "job".into(),
    }
}

/// Removes the run directories that a crash left for ids that were never recorded (see
/// [`runner::scan_run_dirs`]) and returns the highest id ever handed out: of records, the
/// quarantine, run directories, and the high-water mark `<spool>/jobs/max_id`, which is
/// made durable before any directory is removed, so a removed directory's id is never given
/// out again.
fn recover_run_dirs(cfg: &Config, loaded: &Loaded, recorded: impl Fn(JobId) -> bool) -> JobId {
    let jobs = cfg.paths.spool.join("jobs");
    let mark: JobId = std::fs::read_to_string(jobs.join("max_id"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let quarantined: HashSet<JobId> = loaded
        .quarantined
        .iter()
        .filter_map(|(p, _)| {
            let name = p.file_name()?.to_str()?;
            name.split('.').next()?.parse::<JobId>().ok()
        })
        .collect();
    let (max_dir, orphans) =
        runner::scan_run_dirs(&cfg.paths.logs, |id| recorded(id) || quarantined.contains(&id));
    let max = loaded.max_id.max(max_dir).max(mark);
    if orphans.is_empty() {
        return max;
    }
    let marked = crate::fsutil::open_dir(&jobs).and_then(|dir| {
        crate::fsutil::write_at(
            &dir,
            "max_id",
            format!("{max}\n").as_bytes(),
            crate::fsutil::WriteOpts {
                sync: true,
                ..Default::default()
            },
        )?;
        crate::fsutil::sync_dir(&dir)
    });
    if let Err(e) = marked {
        warn!(
            "cannot record the highest job id in {}/max_id ({e}); leaving run directories of unrecorded jobs",
            jobs.display()
        );
        return max;
    }
    for dir in orphans {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => info!("removed {}: its job was never recorded", dir.display()),
            Err(e) => warn!(
                "cannot remove {} (its job was never recorded): {e}",
                dir.display()
            ),
        }
    }
    max
}
