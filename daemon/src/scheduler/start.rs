//! Starting attempts: the ready queue's head of each class with a free slot (and free
//! GPUs, whose locks are taken first) gets a `running` record, which its backend prepares
//! the attempt under; the backend commits it once the record is durable.

use std::time::Duration;

use cyb_proto::job::{JobState, Outcome, Reason, Timestamp};
use cyb_proto::{Class, JobId};
use tracing::{error, info};

use super::msg::Event;
use super::ready::Deps;
use super::{Phase, Scheduler};
use crate::backend::{Attempt, AttemptEnd, Exit, NotStarted, StartError, Started};
use crate::gpu::GpuLease;
use crate::host::HostError;

impl Scheduler {
    /// Puts a queued job where it belongs: ready, waiting for dependencies, or failed
    /// because a dependency failed.
    pub(super) fn enqueue(&mut self, id: JobId) {
        let Some(rec) = self.jobs.get(&id) else { return };
        let deps: Vec<JobId> = rec.spec.depends_on.iter().map(|d| *d as JobId).collect();
        let failed = match super::ready::deps(&deps, |d| self.state_of(d)) {
            Deps::Met => {
                let (class, priority) = (rec.spec.class(), rec.priority);
                self.ready.insert(class, priority, id);
                None
            }
            Deps::Waiting(pending) => {
                for d in pending {
                    self.ready.wait_for(d, id);
                }
                None
            }
            Deps::Failed(d, s) => Some(format!("dependency job {d} ended {s}")),
            Deps::Missing(d) => Some(format!("dependency job {d} no longer exists (it was cleaned)")),
        };
        if let Some(why) = failed {
            let outcome = Outcome::now(Reason::DependencyFailed, why);
            self.finish(
                id,
                JobState::Failed {
                    outcome: Box::new(outcome),
                },
            );
        }
    }

    pub(super) fn dequeue(&mut self, id: JobId) {
        if let Some(rec) = self.jobs.get(&id) {
            self.ready.remove(rec.spec.class(), rec.priority, id);
        }
    }

    pub(super) fn schedule(&mut self) {
        if self.paused {
            return;
        }
        let was_down = std::mem::take(&mut self.backends_down);
        for class in Class::ALL {
            let slots = self.cfg.class(class).slots;
            // Heads whose backend cannot start jobs now: they keep their place, and the
            // jobs behind them of other backends go ahead.
            let mut deferred = Vec::new();
            loop {
                let busy = self.running_per_class.get(&class).copied().unwrap_or(0);
                if busy >= slots {
                    break;
                }
                let Some(id) = self.ready.head(class) else { break };
                // A job with something under way (a GPU claim, or its last end being
                // recorded) was put back in the queue meanwhile (hold/release,
                // cancel/retry): it starts once that is done.
                if self.phases.contains_key(&id) {
                    self.ready.pop(class);
                    continue;
                }
                if let Some(kind) = self.jobs.get(&id).map(|r| r.spec.backend())
                    && let Some(b) = self.backends.get(kind)
                    && let Err(why) = b.ready()
                {
                    self.ready.pop(class);
                    deferred.push(id);
                    self.backends_down.insert(kind, why);
                    continue;
                }
                // GPUs: the head of the class waits until enough are free; jobs of other
                // classes are never held back by it. (No backfill within the class.)
                let need = self.jobs.get(&id).map_or(0, |r| r.spec.gpus() as usize);
                let queued = matches!(
                    self.jobs.get(&id).map(|r| &r.state),
                    Some(JobState::Queued { .. })
                );
                let gpus = if need > 0 && queued {
                    match self.gpus.free(need) {
                        Some(g) => g,
                        None => break,
                    }
                } else {
                    Vec::new()
                };
                self.ready.pop(class);
                if gpus.is_empty() {
                    self.start(id, Vec::new(), Vec::new());
                } else {
                    self.claim_gpus(id, class, gpus);
                }
            }
            for id in deferred {
                if let Some(r) = self.jobs.get(&id) {
                    self.ready.insert(class, r.priority, id);
                }
            }
        }
        for (kind, why) in &self.backends_down {
            if !was_down.contains_key(kind) {
                info!("{kind} jobs wait in the queue: {why}");
            }
        }
        for (kind, why) in was_down {
            if self.backends_down.contains_key(&kind) {
                continue;
            }
            if self.backends.get(kind).is_some_and(|b| b.ready().is_ok()) {
                info!("{kind} jobs can start again");
            } else {
                // None of its jobs came up this time (their classes were full).
                self.backends_down.insert(kind, why);
            }
        }
    }

    /// Takes the locks of `gpus` for queued job `id` (off the runtime); the job keeps its
    /// class slot and the GPUs meanwhile, and starts once it holds them all.
    fn claim_gpus(&mut self, id: JobId, class: Class, gpus: Vec<u32>) {
        let Some(rec) = self.jobs.get(&id) else { return };
        *self.running_per_class.entry(class).or_default() += 1;
        self.gpus.take(id, &gpus);
        let (host, user, tx) = (self.host.clone(), rec.owner.user.clone(), self.tx.clone());
        let wanted = gpus.clone();
        self.phases.insert(id, Phase::Claiming { gpus });
        tokio::task::spawn_blocking(move || {
            let res = host.acquire_gpus(id, &user, &wanted);
            let _ = tx.send(Event::GpusClaimed { id, res }.into());
        });
    }

    pub(super) fn gpus_claimed(&mut self, id: JobId, res: Result<Vec<GpuLease>, HostError>) {
        let Some(Phase::Claiming { gpus }) = self.phases.remove(&id) else {
            // Cancelled meanwhile (its slot was given back then): only the locks are left.
            if let Some(p) = self.phases.get(&id) {
                debug_assert!(matches!(p, Phase::Finishing { .. }));
            }
            if let Ok(leases) = res {
                crate::host::release_gpus(leases);
            }
            self.gpus.give_back_all(id);
            return;
        };
        self.release_class_slot(id);
        self.gpus.give_back(id, &gpus);
        let queued = matches!(
            self.jobs.get(&id).map(|r| &r.state),
            Some(JobState::Queued { .. })
        );
        match res {
            Ok(leases) if queued && !self.paused => self.start(id, gpus, leases),
            Ok(leases) => {
                // Held meanwhile, or the queue was paused (or the daemon is stopping): the
                // job does not start now.
                crate::host::release_gpus(leases);
                if queued {
                    self.enqueue(id);
                }
            }
            Err(e) => {
                // Taken outside cybd since the last probe: nothing ran; the GPU counts as
                // taken until a probe finds it free, and the job waits for GPUs again.
                info!(job_id = id, "{e}; job {id} waits for a free one");
                if let HostError::GpuHeldOutside { gpu } = e {
                    self.gpus.held_outside(gpu);
                }
                if queued {
                    self.enqueue(id);
                }
            }
        }
    }

    fn start(&mut self, id: JobId, gpus: Vec<u32>, leases: Vec<GpuLease>) {
        let Some(rec) = self.jobs.get(&id) else { return };
        if !matches!(rec.state, JobState::Queued { .. }) {
            return;
        }
        let Some(backend) = self.backends.get(rec.spec.backend()) else {
            crate::host::release_gpus(leases);
            let why = format!("this cybd has no {} backend", rec.spec.backend());
            let outcome = Outcome::now(Reason::BackendUnavailable, why);
            self.finish(
                id,
                JobState::Failed {
                    outcome: Box::new(outcome),
                },
            );
            return;
        };
        let Some(rec) = self.jobs.get_mut(&id) else { return };
        let attempt = rec.attempts + 1;
        let now = Timestamp::now();
        rec.attempts = attempt;
        rec.first_started_at.get_or_insert(now);
        rec.state = JobState::Running {
            started_at: now,
            attempt,
            gpus: gpus.clone(),
            handle: backend.handle_before_start(id, attempt),
        };
        let class = rec.spec.class();
        let rec = rec.clone();
        *self.running_per_class.entry(class).or_default() += 1;
        self.gpus.take(id, &gpus);
        self.phases.insert(
            id,
            Phase::Starting {
                gpus: gpus.clone(),
                cancel_by: None,
            },
        );
        let ack = self.pending.persist(id);
        // The backend prepares the attempt while its running record is made durable; it
        // is committed only once that record is on disk.
        // (Spawned, so it starts now rather than when the durable record is awaited.)
        let prepared = tokio::spawn(backend.prepare(Attempt {
            rec,
            attempt,
            gpus,
            leases,
            cfg: self.cfg.clone(),
        }));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let durable = match ack.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(StartError::NotDurable { id, why }),
                Err(_) => Err(StartError::NotDurable {
                    id,
                    why: super::NotDurable::Stopped,
                }),
            };
            let prepared = prepared.await.unwrap_or_else(|e| {
                Err(crate::backend::BackendError::Task {
                    id,
                    why: e.to_string(),
                })
            });
            let res = match (durable, prepared) {
                (Ok(()), Ok(p)) => backend.commit(p).await.map_err(StartError::from),
                (Ok(()), Err(e)) => Err(e.into()),
                (Err(e), prepared) => {
                    if let Ok(p) = prepared {
                        backend.abort(p).await;
                    }
                    Err(e)
                }
            };
            let _ = tx.send(Event::Launched { id, attempt, res }.into());
        });
    }

    pub(super) fn launched(&mut self, id: JobId, attempt: u32, res: Result<Started, StartError>) {
        match res {
            Ok(started) => {
                if let Some(rec) = self.jobs.get(&id) {
                    info!(event = "started", job_id = id, attempt, job_user = %rec.owner.user, "job {id} started");
                }
                self.watch(id, attempt, started);
            }
            Err(StartError::NotDurable { why, .. }) => {
                // Not recorded as running, so nothing ran: put it back and try again later.
                error!(job_id = id, "cannot record job start ({why}); retrying in 5s");
                self.release_slot(id);
                if let Some(rec) = self.jobs.get_mut(&id) {
                    rec.attempts = rec.attempts.saturating_sub(1);
                    rec.state = JobState::Waiting {
                        until: Timestamp::now(),
                        next_attempt: attempt,
                        last: Box::new(Outcome::now(
                            Reason::SpawnFailed,
                            format!("cannot record the start: {why}"),
                        )),
                    };
                }
                self.wake_after(id, Duration::from_secs(5));
            }
            Err(StartError::Failed(e)) => {
                let end = AttemptEnd::of(Exit::NotStarted(NotStarted::Failed(e.to_string())));
                self.exited(id, attempt, end);
            }
        }
    }

    /// Keeps the handle of a committed (or adopted) attempt in its record and waits for its
    /// end; an attempt cancelled while it was being started is cancelled now.
    pub(super) fn watch(&mut self, id: JobId, attempt: u32, started: Started) {
        let Started { handle, end } = started;
        if let Some(rec) = self.jobs.get_mut(&id)
            && let JobState::Running { handle: h, .. } = &mut rec.state
        {
            *h = handle;
        }
        let cancel = match self.phases.remove(&id) {
            Some(Phase::Starting { gpus, cancel_by } | Phase::Running { gpus, cancel_by }) => {
                let cancel = cancel_by.is_some();
                self.phases.insert(id, Phase::Running { gpus, cancel_by });
                cancel
            }
            Some(other) => {
                self.phases.insert(id, other);
                false
            }
            None => false,
        };
        if cancel {
            self.cancel_attempt(id);
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let end = end.await;
            let _ = tx.send(Event::Exited { id, attempt, end }.into());
        });
    }
}
