//! Cleaning: which ended jobs `cybctl clean` and `[retention]` remove, and their removal.
//!
//! Only jobs in a final state whose records are settled (summaries in the history) are
//! removed, never one that a job which has not ended (queued, held, waiting, running, or
//! being submitted) depends on: that job's dependencies are checked again whenever it is
//! queued (a release, a retry's wake, a restart), and must still be found. A chosen job
//! leaves the history at once, so nothing reads, revives or waits for it meanwhile; the
//! file-system work ([`crate::cleanup`]) runs on a blocking thread, and a job it could
//! not remove is put back as it was. Explicit ids are all or nothing: each must exist
//! (else "no job", exit 3), be the caller's or the caller an admin (else permission
//! denied), and be removable; filters take the caller's own jobs (`--user`/`--all-users`
//! for others: admins only) and skip, with the reason, those that must stay.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use cyb_proto::job::{StateName, Timestamp};
use cyb_proto::rpc::{CleanReport, CleanRequest, KeptJob};
use cyb_proto::{JobId, RpcError};
use tracing::{info, warn};

use super::msg::{Event, Reply};
use super::{Peer, Scheduler};
use crate::history::Past;

/// Most jobs one `[retention]` round removes; a longer backlog goes on at the next second.
const RETENTION_BATCH: usize = 5000;

/// Whose jobs a filter takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Owners {
    Uid(u32),
    Name(String),
    All,
}

/// What a filtered clean takes from the history.
#[derive(Clone, Debug)]
pub struct Criteria {
    /// Final states (all of them when empty).
    pub states: Vec<StateName>,
    /// Ended at least this long ago.
    pub older_than_ms: Option<u64>,
    pub owners: Owners,
}

impl Criteria {
    pub fn matches(&self, p: &Past, now: Timestamp) -> bool {
        let state = p.state.is_terminal() && (self.states.is_empty() || self.states.contains(&p.state));
        let age = self
            .older_than_ms
            .is_none_or(|ms| p.finished_at.is_some_and(|f| f.ms_until(now) >= ms));
        let owner = match &self.owners {
            Owners::Uid(u) => p.uid == *u,
            Owners::Name(n) => &*p.user == n.as_str(),
            Owners::All => true,
        };
        state && age && owner
    }
}

/// The ended jobs beyond the newest `max_jobs` of the `count` in `ended` (ascending ids):
/// the oldest.
pub fn over_limit(ended: impl Iterator<Item = JobId>, count: usize, max_jobs: usize) -> Vec<JobId> {
    ended.take(count.saturating_sub(max_jobs)).collect()
}

/// Splits `candidates` into those that may go and those kept because a job that has not
/// ended depends on them (`needed`: dependency → one such job).
pub fn split_needed(candidates: Vec<JobId>, needed: &HashMap<JobId, JobId>) -> (Vec<JobId>, Vec<KeptJob>) {
    let mut go = Vec::with_capacity(candidates.len());
    let mut kept = Vec::new();
    for id in candidates {
        match needed.get(&id) {
            Some(dep) => kept.push(KeptJob {
                id,
                why: needed_why(id, *dep),
            }),
            None => go.push(id),
        }
    }
    (go, kept)
}

fn needed_why(id: JobId, by: JobId) -> String {
    format!("job {by}, which has not ended, depends on job {id}")
}

impl Scheduler {
    /// `cybctl clean`: chooses, then removes.
    pub(super) fn clean(
        &mut self,
        req: &CleanRequest,
        peer: &Peer,
        reply: Reply<Result<CleanReport, RpcError>>,
    ) {
        match self.choose(req, peer) {
            Ok((ids, kept)) => self.remove_ended(ids, kept, Some(reply), &peer.name),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The jobs that have not ended depend on these: dependency → one such job.
    fn needed(&self) -> HashMap<JobId, JobId> {
        let mut needed = HashMap::new();
        for r in self.jobs.values().chain(self.unrecorded.values()) {
            if r.state.is_terminal() {
                continue;
            }
            for d in &r.spec.depends_on {
                if let Ok(d) = JobId::try_from(*d) {
                    needed.insert(d, r.id);
                }
            }
        }
        needed
    }

    /// The jobs `req` removes, and those it matched and keeps.
    fn choose(&self, req: &CleanRequest, peer: &Peer) -> Result<(Vec<JobId>, Vec<KeptJob>), RpcError> {
        let needed = self.needed();
        if !req.ids.is_empty() {
            let ids: BTreeSet<JobId> = req.ids.iter().copied().collect();
            for &id in &ids {
                let (uid, user, state) = match (self.jobs.get(&id), self.history.get(id)) {
                    (Some(r), _) => (r.owner.uid, r.owner.user.clone(), r.state.name()),
                    (None, Some(p)) => (p.uid, p.user.to_string(), p.state),
                    (None, None) => return Err(RpcError::NotFound(id)),
                };
                if !(peer.admin || peer.uid == uid) {
                    return Err(RpcError::PermissionDenied(format!(
                        "job {id} belongs to {user}; only its owner or an admin may clean it"
                    )));
                }
                if !state.is_terminal() {
                    return Err(RpcError::InvalidState(format!(
                        "job {id} is {state}; only ended jobs (succeeded, failed, timed_out, cancelled) can be cleaned"
                    )));
                }
                if self.jobs.contains_key(&id) || self.reviving.contains_key(&id) {
                    return Err(RpcError::InvalidState(format!(
                        "job {id} has just ended or is being read; try again in a moment"
                    )));
                }
                if let Some(by) = needed.get(&id) {
                    return Err(RpcError::InvalidState(format!(
                        "job {id} cannot be cleaned: {}",
                        needed_why(id, *by)
                    )));
                }
            }
            return Ok((ids.into_iter().collect(), Vec::new()));
        }
        if let Some(s) = req.states.iter().find(|s| !s.is_terminal()) {
            return Err(RpcError::InvalidState(format!(
                "state {s}: only ended jobs (succeeded, failed, timed_out, cancelled) can be cleaned"
            )));
        }
        let owners = match (&req.user, req.all_users) {
            (_, true) if !peer.admin => {
                return Err(RpcError::PermissionDenied(
                    "only root or members of the admin group may clean every user's jobs".into(),
                ));
            }
            (_, true) => Owners::All,
            (Some(u), _) if *u == peer.name => Owners::Uid(peer.uid),
            (Some(u), _) if !peer.admin => {
                return Err(RpcError::PermissionDenied(format!(
                    "only root or members of the admin group may clean the jobs of {u}"
                )));
            }
            (Some(u), _) => Owners::Name(u.clone()),
            (None, false) => Owners::Uid(peer.uid),
        };
        let c = Criteria {
            states: req.states.clone(),
            older_than_ms: req.older_than_ms,
            owners,
        };
        let now = Timestamp::now();
        let candidates = self
            .history
            .iter()
            .filter(|(id, p)| c.matches(p, now) && !self.reviving.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        Ok(split_needed(candidates, &needed))
    }

    /// Once a second: applies `[retention]` when its interval has passed (and no earlier
    /// round is still removing).
    pub(super) fn retention_due(&mut self) {
        let r = self.cfg.retention.clone();
        let (last, busy) = self.retention;
        if !r.enabled() || busy || last.is_some_and(|t| t.elapsed() < r.interval) {
            return;
        }
        self.retention.0 = Some(std::time::Instant::now());
        let now = Timestamp::now();
        let mut ids = BTreeSet::new();
        if let Some(age) = r.max_age {
            let c = Criteria {
                states: Vec::new(),
                older_than_ms: Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                owners: Owners::All,
            };
            ids.extend(
                self.history
                    .iter()
                    .filter(|(_, p)| c.matches(p, now))
                    .map(|(id, _)| id),
            );
        }
        if let Some(n) = r.max_jobs {
            ids.extend(over_limit(
                self.history.iter().map(|(id, _)| id),
                self.history.len(),
                n,
            ));
        }
        let needed = self.needed();
        let mut ids: Vec<JobId> = ids
            .into_iter()
            .filter(|id| !needed.contains_key(id) && !self.reviving.contains_key(id))
            .collect();
        if ids.len() > RETENTION_BATCH {
            ids.truncate(RETENTION_BATCH);
            // The rest at the next tick.
            self.retention.0 = None;
        }
        if ids.is_empty() {
            return;
        }
        self.retention.1 = true;
        self.remove_ended(ids, Vec::new(), None, "retention");
    }

    /// Takes `ids` (settled ended jobs) out of the history and removes them on a blocking
    /// thread; [`Event::Cleaned`] reports back.
    fn remove_ended(
        &mut self,
        ids: Vec<JobId>,
        kept: Vec<KeptJob>,
        reply: Option<Reply<Result<CleanReport, RpcError>>>,
        by: &str,
    ) {
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.history.remove(id) {
                self.tally.forget(id);
                self.cleaning.insert(id, p);
                taken.push(id);
            }
        }
        let by = by.to_string();
        if taken.is_empty() {
            return self.cleaned(Vec::new(), kept, reply, &by);
        }
        let (store, paths, tx) = (self.store.clone(), self.cfg.paths.clone(), self.tx.clone());
        let high_water = self.next_id.saturating_sub(1);
        tokio::spawn(async move {
            let ids = taken.clone();
            let work = tokio::task::spawn_blocking(move || {
                let mut results = Vec::new();
                let mut doomed = Vec::with_capacity(taken.len());
                for id in taken {
                    // A delivery still being tried reads result.json.
                    if crate::callback::outbox::pending_for(&paths, id) {
                        results.push((id, Err("its callback is still being delivered".to_string())));
                        continue;
                    }
                    let run_dir = store
                        .read(id)
                        .map(|r| PathBuf::from(r.run_dir))
                        .unwrap_or_else(|_| paths.run_dir(id));
                    doomed.push(crate::cleanup::Doomed { id, run_dir });
                }
                results.extend(crate::cleanup::remove(&paths, doomed, high_water));
                results
            });
            let results = work.await.unwrap_or_else(|e| {
                ids.into_iter()
                    .map(|id| (id, Err(format!("the removal stopped: {e}"))))
                    .collect()
            });
            let _ = tx.send(
                Event::Cleaned {
                    results,
                    kept,
                    reply,
                    by,
                }
                .into(),
            );
        });
    }

    /// The removal is done: jobs it could not remove are put back as they were.
    pub(super) fn cleaned(
        &mut self,
        results: Vec<(JobId, Result<(), String>)>,
        mut kept: Vec<KeptJob>,
        reply: Option<Reply<Result<CleanReport, RpcError>>>,
        by: &str,
    ) {
        let mut removed = Vec::with_capacity(results.len());
        for (id, res) in results {
            let Some(past) = self.cleaning.remove(&id) else {
                continue;
            };
            match res {
                Ok(()) => removed.push(id),
                Err(why) => {
                    warn!(job_id = id, job_user = %past.user, "job {id} was not cleaned: {why}");
                    self.tally.set(id, (past.state, past.class));
                    self.history.put_back(id, past);
                    kept.push(KeptJob { id, why });
                }
            }
        }
        removed.sort_unstable();
        kept.sort_by_key(|k| k.id);
        if !removed.is_empty() {
            info!(
                event = "cleaned",
                by = %by,
                "removed {} ended job(s) ({}); by {by}",
                removed.len(),
                id_ranges(&removed)
            );
        }
        match reply {
            Some(r) => {
                let _ = r.send(Ok(CleanReport { removed, kept }));
            }
            None => self.retention.1 = false,
        }
    }
}

/// `1-3, 7` for ids 1, 2, 3, 7 (sorted), for the log.
pub fn id_ranges(ids: &[JobId]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::Class;
    use std::sync::Arc;

    fn past(uid: u32, user: &str, state: StateName, ended_ms_ago: i64) -> Past {
        let now = Timestamp::now();
        Past {
            name: "n".into(),
            user: Arc::from(user),
            uid,
            class: Class::CpuShort,
            priority: 0,
            state,
            attempts: 1,
            submitted_at: now,
            started_at: None,
            exit_code: None,
            reason: None,
            finished_at: Some(Timestamp(now.0 - time::Duration::milliseconds(ended_ms_ago))),
            spool: None,
        }
    }

    #[test]
    fn criteria_take_final_states_age_and_owner() {
        let now = Timestamp::now();
        let mine_old = past(1000, "ann", StateName::Failed, 10_000);
        let mine_new = past(1000, "ann", StateName::Succeeded, 0);
        let theirs = past(1001, "bob", StateName::Succeeded, 10_000);
        let c = Criteria {
            states: Vec::new(),
            older_than_ms: None,
            owners: Owners::Uid(1000),
        };
        assert!(c.matches(&mine_old, now) && c.matches(&mine_new, now) && !c.matches(&theirs, now));
        let older = Criteria {
            older_than_ms: Some(5_000),
            ..c.clone()
        };
        assert!(older.matches(&mine_old, now) && !older.matches(&mine_new, now));
        let failed = Criteria {
            states: vec![StateName::Failed],
            ..c.clone()
        };
        assert!(failed.matches(&mine_old, now) && !failed.matches(&mine_new, now));
        let bob = Criteria {
            owners: Owners::Name("bob".into()),
            ..c.clone()
        };
        assert!(bob.matches(&theirs, now) && !bob.matches(&mine_old, now));
        // Never a job that has not ended, whatever the filter says.
        let all = Criteria {
            states: vec![StateName::Running],
            owners: Owners::All,
            ..c
        };
        assert!(!all.matches(&past(1000, "ann", StateName::Running, 10_000), now));
    }

    #[test]
    fn over_the_limit_the_oldest_go_and_needed_jobs_stay() {
        assert_eq!(over_limit([1, 2, 5, 9].into_iter(), 4, 3), [1]);
        assert!(over_limit([1, 2].into_iter(), 2, 3).is_empty());
        assert_eq!(over_limit([1, 2].into_iter(), 2, 0), [1, 2]);
        let needed = HashMap::from([(2, 7)]);
        let (go, kept) = split_needed(vec![1, 2, 3], &needed);
        assert_eq!(go, [1, 3]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id, 2);
        assert!(kept[0].why.contains("job 7"), "{}", kept[0].why);
    }

    #[test]
    fn ids_in_the_log_are_ranges() {
        assert_eq!(id_ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(id_ranges(&[]), "");
    }
}
