//! Durability: the group commit of record writes (one per job per loop iteration, its
//! latest state, sent to the store at the iteration's end), writes made again while they
//! fail (a full disk), and ended jobs kept as small summaries once their records are
//! settled on disk ([`Scheduler::compact`]), read back whole when a request needs them
//! ([`Scheduler::revive`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::{JobId, JobRecord, RpcError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};

use super::msg::{Event, Msg, Request};
use super::{Phase, Scheduler};
use crate::store::StoreError;

/// Resolves once a record write is durable (or says why it failed).
pub type Durable = oneshot::Receiver<Result<(), NotDurable>>;

/// Why a record write is not durable: what the store said (shared by everyone who waits
/// for that write).
#[derive(Clone, Debug, thiserror::Error)]
pub enum NotDurable {
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("the store writer stopped")]
    Stopped,
}

/// How long a record whose write failed waits before it is written again.
pub const REWRITE_AFTER: Duration = Duration::from_secs(1);

/// Writes deferred to the end of the scheduler's loop iteration: a job that is accepted and
/// started in the same iteration is written once, in its running state, which is as durable
/// a statement of its acceptance as the queued one would have been.
#[derive(Default)]
pub struct Pending {
    pub dirty: HashMap<JobId, Vec<oneshot::Sender<Result<(), NotDurable>>>>,
    pub barriers: Vec<oneshot::Sender<()>>,
}

impl Pending {
    pub fn persist(&mut self, id: JobId) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.dirty.entry(id).or_default().push(tx);
        rx
    }

    pub fn persist_detached(&mut self, id: JobId) {
        self.dirty.entry(id).or_default();
    }

    /// Resolves once every write marked before it is durable.
    pub fn barrier(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.barriers.push(tx);
        rx
    }
}

impl Scheduler {
    /// Sends this iteration's record writes to the store (one per job, its latest state),
    /// then its read barriers, and passes each write's acknowledgement on to who waits. A
    /// write of a recorded job that fails is reported back ([`Event::Settled`]) and made
    /// again later, so an end recorded while the disk is full reaches it once there is room.
    pub(super) fn flush(&mut self) {
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
                        Ok(Err(e)) => Err(NotDurable::Store(Arc::new(e))),
                        Err(_) => Err(NotDurable::Stopped),
                    };
                    if let Err(e) = &res {
                        failed.push((id, e.clone()));
                    }
                    for w in waiting {
                        let _ = w.send(res.clone());
                    }
                }
                let _ = tx.send(Event::Settled { ids, failed }.into());
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
    pub(super) fn settled(&mut self, ids: Vec<JobId>, failed: Vec<(JobId, NotDurable)>) {
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

    /// Keeps ended job `id` as a summary in [`crate::history::History`] once nothing about
    /// it is left to write or answer: its end and result.json are written and no write of
    /// its record is queued, under way or to be made again. Its record on disk is then its
    /// latest state, which [`Scheduler::revive`] reads back when a request needs it whole.
    pub(super) fn compact(&mut self, id: JobId) {
        let settled = self.jobs.get(&id).is_some_and(|r| r.state.is_terminal())
            && !self.phases.contains_key(&id)
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

    /// Reads ended job `id`'s record back from the store for `r` (which needs it whole), and
    /// handles `r` once it is back among the jobs. Requests for it that come meanwhile wait
    /// with `r`, so there is one read, of the latest version.
    pub(super) fn revive(&mut self, id: JobId, r: Request) {
        if let Some(waiting) = self.reviving.get_mut(&id) {
            waiting.push(r);
            return;
        }
        self.reviving.insert(id, vec![r]);
        let user = self.history.get(id).map(|p| p.user.clone()).unwrap_or_default();
        debug!(job_id = id, job_user = %user, "reading the record of an ended job back");
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let rec = tokio::task::spawn_blocking(move || store.read(id).map(Box::new))
                .await
                .unwrap_or(Err(StoreError::Closed))
                .map_err(Arc::new);
            let _ = tx.send(Event::Revived { id, rec }.into());
        });
    }

    pub(super) fn revived(&mut self, id: JobId, rec: Result<Box<JobRecord>, Arc<StoreError>>) {
        let waiting = self.reviving.remove(&id).unwrap_or_default();
        match rec {
            Ok(rec) if self.history.remove(id).is_some() => {
                self.jobs.insert(id, *rec);
            }
            Ok(_) => {}
            Err(why) => {
                error!(job_id = id, "cannot read the record of ended job {id}: {why}");
                for r in waiting {
                    r.refuse(RpcError::Internal(format!(
                        "cannot read the record of job {id}: {why}"
                    )));
                }
                return;
            }
        }
        for r in waiting {
            self.request(r);
        }
        self.compact(id);
    }

    /// Record writes that failed: the jobs' latest states are written again after
    /// [`REWRITE_AFTER`]. A submission's first write is settled by [`Event::Recorded`] and
    /// an end's by [`until_durable`], so neither is written again here.
    fn not_durable(&mut self, failed: Vec<(JobId, NotDurable)>) {
        let arm = self.rewrite.is_empty();
        for (id, why) in failed {
            if self.store_error.is_none() {
                error!("cannot write job records ({why}); cybd keeps trying");
            }
            self.store_error = Some(why.to_string());
            let finishing = matches!(self.phases.get(&id), Some(Phase::Finishing { .. }));
            if self.jobs.contains_key(&id) && !finishing {
                self.rewrite.insert(id);
            }
        }
        if arm && !self.rewrite.is_empty() {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REWRITE_AFTER).await;
                let _ = tx.send(Event::Rewrite.into());
            });
        }
    }
}

/// Waits until job `id`'s record is durable, asking the scheduler to write it again (its
/// latest state) every [`REWRITE_AFTER`] while writes fail, as they do while the disk is
/// full. False if the scheduler went away first.
pub async fn until_durable(tx: &mpsc::UnboundedSender<Msg>, id: JobId, mut ack: Durable) -> bool {
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
        if tx.send(Event::Persist { id, reply }.into()).is_err() {
            return false;
        }
        match rx.await {
            Ok(next) => ack = next,
            Err(_) => return false,
        }
    }
}
