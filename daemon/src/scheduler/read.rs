//! Reading the queue: `ls` (live jobs and the history's summaries), `wait`, and `stats`
//! from the tally.

use cyb_proto::job::StateName;
use cyb_proto::rpc::{ClassStats, JobSummary, ListFilter, Stats};
use cyb_proto::{Class, JobId, JobRecord, RpcError};

use super::msg::Reply;
use super::{Phase, Scheduler};

impl Scheduler {
    /// Answers `wait` once the job has ended and its result.json is written.
    pub(super) fn wait(&mut self, id: JobId, reply: Reply<Result<JobRecord, RpcError>>) {
        match self.jobs.get(&id) {
            None => {
                let _ = reply.send(Err(RpcError::NotFound(id)));
            }
            Some(_) if matches!(self.phases.get(&id), Some(Phase::Finishing { .. })) => {
                if let Some(Phase::Finishing { waiters }) = self.phases.get_mut(&id) {
                    waiters.push(reply);
                }
            }
            Some(r) if r.state.is_terminal() => self.reply_synced(reply, Ok(r.clone())),
            Some(_) => {
                let w = self.waiters.entry(id).or_default();
                w.retain(|s| !s.is_closed());
                w.push(reply);
            }
        }
    }

    pub(super) fn list(&self, f: &ListFilter) -> Vec<JobSummary> {
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
    pub(super) fn update_tally(&mut self) {
        for id in self.pending.dirty.keys() {
            if let Some(r) = self.jobs.get(id) {
                self.tally.note(r);
            }
        }
    }

    pub(super) fn stats(&mut self) -> Stats {
        self.update_tally();
        let counts = &self.tally.states;
        #[cfg(debug_assertions)]
        {
            // Debug builds (every end-to-end test) check the tally against a full count.
            let mut full: std::collections::HashMap<StateName, usize> = Default::default();
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
                    queued: self.tally.queued_in(*c),
                })
                .collect(),
            total_jobs: self.jobs.len() + self.history.len(),
            next_id: self.next_id,
            quarantined: self.quarantined.clone(),
            store_error: self.store_error.clone(),
        }
    }
}
