//! The end of an attempt: its typed end and the retry policy decide the job's next state
//! ([`super::outcome`]); an end is recorded durably first, then the results stage writes
//! result.json and the backend cleans up, then `wait`s are answered and dependents move.

use std::sync::Arc;
use std::time::Duration;

use cyb_proto::JobId;
use cyb_proto::job::{HeldGpu, JobState, StateName, Timestamp};
use tracing::info;

use super::durable::until_durable;
use super::msg::Event;
use super::outcome::{self, Next};
use super::{Phase, Scheduler};
use crate::backend::AttemptEnd;

impl Scheduler {
    /// Gives back the class slot job `id` holds.
    pub(super) fn release_class_slot(&mut self, id: JobId) {
        if let Some(rec) = self.jobs.get(&id)
            && let Some(n) = self.running_per_class.get_mut(&rec.spec.class())
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Ends job `id`'s attempt in the scheduler's books: its slot and GPUs are free again.
    /// Returns who cancelled it, if anyone did.
    pub(super) fn release_slot(&mut self, id: JobId) -> Option<String> {
        match self.phases.remove(&id) {
            Some(Phase::Starting { gpus, cancel_by } | Phase::Running { gpus, cancel_by }) => {
                self.gpus.give_back(id, &gpus);
                self.release_class_slot(id);
                cancel_by
            }
            Some(other) => {
                self.phases.insert(id, other);
                None
            }
            None => None,
        }
    }

    pub(super) fn exited(&mut self, id: JobId, attempt: u32, end: AttemptEnd) {
        let Some(rec) = self.jobs.get(&id) else { return };
        let JobState::Running {
            started_at,
            attempt: a,
            gpus,
            ..
        } = &rec.state
        else {
            return;
        };
        if *a != attempt {
            return;
        }
        let (started_at, gpus) = (*started_at, gpus.clone());
        let cancel_by = self.release_slot(id);
        let Some(rec) = self.jobs.get(&id) else { return };
        let next = outcome::next(
            end,
            outcome::Attempt {
                attempts: rec.attempts,
                retry: rec.spec.retry.as_ref(),
                started_at,
                cancel_by,
                gpus: gpus
                    .iter()
                    .map(|&index| HeldGpu {
                        index,
                        uuid: self.gpu_uuids.get(&index).cloned(),
                    })
                    .collect(),
                time_limit: super::submit::time_limit_words(&self.cfg, &rec.spec),
                now: Timestamp::now(),
            },
        );
        match next {
            Next::Requeue => {
                if let Some(rec) = self.jobs.get_mut(&id) {
                    rec.attempts = rec.attempts.saturating_sub(1);
                    rec.state = JobState::Queued {
                        since: Timestamp::now(),
                    };
                    self.pending.persist_detached(id);
                }
                self.enqueue(id);
            }
            Next::Retry {
                state,
                delay,
                attempt,
            } => {
                if let Some(rec) = self.jobs.get_mut(&id) {
                    if let Some(last) = state.outcome() {
                        info!(
                            event = "retried",
                            job_id = id,
                            job_user = %rec.owner.user,
                            attempt,
                            "job {id} failed ({}); attempt {attempt} in {}",
                            last.message,
                            humantime::format_duration(delay)
                        );
                    }
                    rec.state = state;
                    self.pending.persist_detached(id);
                }
                self.wake_after(id, delay);
            }
            Next::Finish(state) => self.finish(id, state),
        }
    }

    /// Moves a job to a terminal state: durable first, then the results stage, waiters and
    /// dependents.
    pub(super) fn finish(&mut self, id: JobId, state: JobState) {
        self.dequeue(id);
        // Cancelled while its GPUs' locks were being taken: its slot is given back now, the
        // locks when the claim is done (`gpus_claimed`).
        if matches!(self.phases.get(&id), Some(Phase::Claiming { .. })) {
            self.release_class_slot(id);
        }
        let Some(rec) = self.jobs.get_mut(&id) else { return };
        let name = state.name();
        let event = match name {
            StateName::Succeeded => "finished",
            StateName::TimedOut => "timed_out",
            StateName::Cancelled => "cancelled",
            _ => "failed",
        };
        if let Some(o) = state.outcome() {
            let gpus: Vec<u32> = o.gpus.iter().map(|g| g.index).collect();
            info!(event, job_id = id, job_user = %rec.owner.user, reason = %o.reason, backend = %rec.spec.backend(), gpus = ?gpus, "job {id} {name}: {}", o.message);
        }
        rec.state = state;
        let ack = self.pending.persist(id);
        let rec = Arc::new(rec.clone());
        // `wait` answers only once result.json is there too.
        let waiters = self.waiters.remove(&id).unwrap_or_default();
        match self.phases.get_mut(&id) {
            Some(Phase::Finishing { waiters: w }) => w.extend(waiters),
            _ => {
                self.phases.insert(id, Phase::Finishing { waiters });
            }
        }
        let tx = self.tx.clone();
        let (backend, cfg) = (self.backends.get(rec.spec.backend()), self.cfg.clone());
        tokio::spawn(async move {
            // The results follow the durable end; until then a restarted daemon still
            // needs what the backend keeps to adopt the job.
            if !until_durable(&tx, id, ack).await {
                return;
            }
            crate::results::record_end(rec, backend, cfg).await;
            let _ = tx.send(Event::ResultWritten { id }.into());
        });
        // Jobs waiting for this one.
        for d in self.ready.take_dependents(id) {
            if matches!(self.jobs.get(&d).map(|r| &r.state), Some(JobState::Queued { .. })) {
                self.enqueue(d);
            }
        }
    }

    /// result.json of ended job `id` is written: `wait`s are answered.
    pub(super) fn result_written(&mut self, id: JobId) {
        let rec = self.jobs.get(&id).cloned();
        if let Some(Phase::Finishing { waiters }) = self.phases.remove(&id) {
            for w in waiters {
                let _ = w.send(rec.clone().ok_or(cyb_proto::RpcError::NotFound(id)));
            }
        }
        // Retried meanwhile: held back until now (see `schedule`).
        if matches!(rec.map(|r| r.state), Some(JobState::Queued { .. })) {
            self.enqueue(id);
        }
        self.compact(id);
    }

    pub(super) fn wake_after(&self, id: JobId, delay: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Wake { id }.into());
        });
    }
}
