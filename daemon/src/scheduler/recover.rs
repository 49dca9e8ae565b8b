//! Recovery: what the store holds, read before the scheduler starts ([`Recovered::read`]),
//! and the scheduler built from it ([`Scheduler::recover`]): running attempts are adopted
//! through their backends, removals of ended jobs a crash interrupted are finished, run
//! directories of ids never recorded are removed, and any `result.json` a crash left
//! missing is written.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{JobState, Timestamp};
use cyb_proto::{JobId, JobRecord};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::msg::{Event, Msg};
use super::{Handle, Pending, Phase, ReadyQueue, Scheduler, Tally};
use crate::backend::{Adoption, AttemptEnd, Backends, Exit};
use crate::config::Config;
use crate::history::History;
use crate::host::Host;
use crate::store::{Loaded, Store};

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
    /// Ended jobs with a `callback_url`: enqueued unless their outbox entry exists (a crash
    /// between result.json and the entry).
    callbacks: Vec<crate::callback::Ended>,
}

impl Recovered {
    /// Finishes the removals of jobs a crash interrupted ([`crate::cleanup`]), reads every
    /// record, keeping ended jobs as summaries only, and removes the run directories of ids
    /// that were never recorded (blocking).
    pub fn read(store: &Store, cfg: &Config) -> Recovered {
        crate::cleanup::finish_interrupted(&cfg.paths);
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
    /// Builds the scheduler from what the store holds, adopting the attempts that were
    /// running through the backends that ran them.
    pub async fn recover(
        cfg: Arc<Config>,
        store: Store,
        found: Recovered,
        host: Arc<Host>,
        backends: Backends,
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
        crate::callback::enqueue_all(&cfg, callbacks);
        let (tx, rx) = mpsc::unbounded_channel();
        let paused = cfg.paths.spool.join("paused").exists();
        let h = host.clone();
        let (usable, gpu_uuids) = tokio::task::spawn_blocking(move || (h.usable_gpus(), h.gpu_uuids()))
            .await
            .unwrap_or_default();
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
            ready: ReadyQueue::default(),
            phases: HashMap::new(),
            running_per_class: HashMap::new(),
            waiters: HashMap::new(),
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
            backends,
            host,
            gpus: super::GpuPool::new(usable),
            gpu_uuids,
            gpu_probing: false,
            cleaning: HashMap::new(),
            retention: (None, false),
            backends_down: Default::default(),
        };
        let mut to_adopt = Vec::new();
        for rec in live {
            let id = rec.id;
            match &rec.state {
                JobState::Running { .. } => to_adopt.push(id),
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
        let recorded: BTreeSet<JobId> = to_adopt.iter().copied().collect();
        let mut alive = BTreeSet::new();
        for id in to_adopt {
            let Some(rec) = s.jobs.get(&id).cloned() else {
                continue;
            };
            let JobState::Running {
                attempt,
                gpus,
                handle,
                ..
            } = &rec.state
            else {
                continue;
            };
            let (attempt, gpus) = (*attempt, gpus.clone());
            let class = rec.spec.class();
            *s.running_per_class.entry(class).or_default() += 1;
            s.gpus.take(id, &gpus);
            s.phases.insert(
                id,
                Phase::Running {
                    gpus,
                    cancel_by: None,
                },
            );
            let adoption = match s.backends.of(handle) {
                Some(b) => b.adopt(&rec).await,
                None => Adoption::Ended(AttemptEnd::of(Exit::Lost {
                    why: format!("this cybd has no {} backend to adopt it", handle.backend()),
                })),
            };
            match adoption {
                Adoption::Running(started) => {
                    alive.insert(id);
                    s.watch(id, attempt, started);
                }
                Adoption::Ended(end) => s.event(Event::Exited { id, attempt, end }),
            }
        }
        // What attempts that are not running any more left behind.
        for b in s.backends.iter() {
            b.sweep(recorded.clone(), alive.clone()).await;
        }
        // A crash between a job's end and its result.json: write the missing ones.
        tokio::task::spawn_blocking(move || {
            for rec in missing_results {
                if !Path::new(&rec.run_dir).join("result.json").exists()
                    && let Err(e) = crate::results::write_result(&rec)
                {
                    warn!(job_id = rec.id, job_user = %rec.owner.user, "cannot write result.json: {e}");
                }
            }
        });
        let handle = Handle { tx };
        (s, handle, rx)
    }
}

/// Removes the run directories that a crash left for ids that were never recorded (see
/// [`crate::results::scan_run_dirs`]) and returns the highest id ever handed out: of
/// records, the quarantine, run directories, and the high-water mark `<spool>/jobs/max_id`,
/// which is made durable before any directory is removed, so a removed directory's id is
/// never given out again.
fn recover_run_dirs(cfg: &Config, loaded: &Loaded, recorded: impl Fn(JobId) -> bool) -> JobId {
    let jobs = cfg.paths.spool.join("jobs");
    let mark = crate::cleanup::read_high_water(&jobs);
    let quarantined: HashSet<JobId> = loaded
        .quarantined
        .iter()
        .filter_map(|(p, _)| {
            let name = p.file_name()?.to_str()?;
            name.split('.').next()?.parse::<JobId>().ok()
        })
        .collect();
    let (max_dir, orphans) =
        crate::results::scan_run_dirs(&cfg.paths.logs, |id| recorded(id) || quarantined.contains(&id));
    let max = loaded.max_id.max(max_dir).max(mark);
    if orphans.is_empty() {
        return max;
    }
    let marked = crate::cleanup::raise_high_water(&jobs, max);
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
