//! Actions people take: on one job (cancel, retry, hold, release, priority), by its owner
//! or an admin, and on the whole queue (pause, resume), by admins.

use cyb_proto::job::{JobState, Outcome, Reason, StateName, Timestamp};
use cyb_proto::{JobId, JobRecord, RpcError};
use tracing::{info, warn};

use super::msg::Reply;
use super::{Action, Durable, Peer, Phase, Scheduler};

impl Scheduler {
    pub(super) fn act(
        &mut self,
        id: JobId,
        action: Action,
        peer: &Peer,
        reply: Reply<Result<JobRecord, RpcError>>,
    ) {
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
    pub(super) fn try_act(
        &mut self,
        id: JobId,
        action: Action,
        peer: &Peer,
    ) -> Result<Option<Durable>, RpcError> {
        let rec = self.jobs.get(&id).ok_or(RpcError::NotFound(id))?;
        if !peer.may_manage(&rec.owner) {
            return Err(RpcError::PermissionDenied(format!(
                "job {id} belongs to {}; only its owner or an admin may change it",
                rec.owner.user
            )));
        }
        let state = rec.state.name();
        match action {
            Action::Cancel => match state {
                StateName::Running => {
                    self.cancel_running(id, &peer.name)?;
                    Ok(None)
                }
                s if s.is_terminal() => Err(RpcError::InvalidState(format!(
                    "job {id} has already ended ({s})"
                ))),
                _ => {
                    let outcome = Outcome::now(
                        Reason::Cancelled,
                        format!("cancelled by {} before it ran", peer.name),
                    );
                    self.finish(
                        id,
                        JobState::Cancelled {
                            outcome: Box::new(outcome),
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
                rec.state = JobState::Queued {
                    since: Timestamp::now(),
                };
                let ack = self.pending.persist(id);
                info!(event = "retried", job_id = id, job_user = %rec.owner.user, by = %peer.name, "job {id} queued again by {}", peer.name);
                self.enqueue(id);
                Ok(Some(ack))
            }
            Action::Hold => match state {
                StateName::Queued | StateName::Waiting => {
                    self.dequeue(id);
                    let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                    rec.state = JobState::Held {
                        since: Timestamp::now(),
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
                    rec.state = JobState::Queued {
                        since: Timestamp::now(),
                    };
                    let ack = self.pending.persist(id);
                    self.enqueue(id);
                    Ok(Some(ack))
                }
                s => Err(RpcError::InvalidState(format!("job {id} is {s}, not held"))),
            },
            Action::Priority(p) => {
                let (class, old) = (rec.spec.class(), rec.priority);
                let was_ready = self.ready.remove(class, old, id);
                let rec = self.jobs.get_mut(&id).ok_or(RpcError::NotFound(id))?;
                rec.priority = p;
                let ack = self.pending.persist(id);
                if was_ready {
                    self.ready.insert(class, p, id);
                }
                Ok(Some(ack))
            }
        }
    }

    /// Cancels a running attempt: through its backend once it is committed, or as soon as
    /// it is (while it is being started).
    fn cancel_running(&mut self, id: JobId, by: &str) -> Result<(), RpcError> {
        match self.phases.get_mut(&id) {
            Some(Phase::Starting { cancel_by, .. }) => {
                *cancel_by = Some(by.to_string());
                Ok(())
            }
            Some(Phase::Running { cancel_by, .. }) => {
                *cancel_by = Some(by.to_string());
                self.cancel_attempt(id);
                Ok(())
            }
            _ => Err(RpcError::Internal(format!(
                "running job {id} has no attempt under way"
            ))),
        }
    }

    /// Asks the backend of job `id`'s committed attempt to cancel it.
    pub(super) fn cancel_attempt(&self, id: JobId) {
        let Some(JobState::Running { handle, .. }) = self.jobs.get(&id).map(|r| &r.state) else {
            return;
        };
        let Some(backend) = self.backends.of(handle) else {
            return;
        };
        let cancel = backend.cancel(id, handle, self.cfg.kill_grace);
        let user = self
            .jobs
            .get(&id)
            .map(|r| r.owner.user.clone())
            .unwrap_or_default();
        tokio::spawn(async move {
            if let Err(e) = cancel.await {
                warn!(job_id = id, job_user = %user, "{e}");
            }
        });
    }

    pub(super) fn pause(&mut self, pause: bool, peer: &Peer, reply: Reply<Result<(), RpcError>>) {
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
}
