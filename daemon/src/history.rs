//! History: the jobs that have ended, kept compact in memory. The scheduler needs of an
//! ended job only what `ls`, dependencies, counts and permission checks read; the full
//! record stays in the store, where `show`, `wait` and `retry` read it back. So a daemon
//! that has run a hundred thousand jobs holds a small summary of each, not its spec.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cyb_proto::job::{Origin, Reason, StateName, Timestamp};
use cyb_proto::rpc::JobSummary;
use cyb_proto::{Class, JobId, JobRecord};

use crate::intake::Identity;

/// What is kept of an ended job.
#[derive(Clone, Debug)]
pub struct Past {
    pub name: Box<str>,
    /// The owner's name, shared by all of that user's jobs.
    pub user: Arc<str>,
    pub uid: u32,
    pub class: Class,
    pub priority: i32,
    pub state: StateName,
    pub attempts: u32,
    pub submitted_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub exit_code: Option<i32>,
    pub reason: Option<Reason>,
    /// When it ended (what `clean --older-than` and `[retention] max_age` go by).
    pub finished_at: Option<Timestamp>,
    /// Spool jobs: the file's identity, so intake never takes that file again.
    pub spool: Option<Identity>,
}

impl Past {
    pub fn summary(&self, id: JobId) -> JobSummary {
        JobSummary {
            id,
            name: self.name.to_string(),
            user: self.user.to_string(),
            class: self.class,
            priority: self.priority,
            state: self.state,
            attempts: self.attempts,
            submitted_at: self.submitted_at,
            started_at: self.started_at,
            exit_code: self.exit_code,
            reason: self.reason.map(|r| r.to_string()),
        }
    }
}

/// The identity of the spool file a record came from, as intake knows files by it.
pub fn spool_identity(origin: &Origin) -> Option<Identity> {
    match origin {
        Origin::Spool { ino, mtime_ns, .. } => Some((*ino, *mtime_ns)),
        Origin::Rpc { .. } => None,
    }
}

/// Ended jobs by id.
#[derive(Default)]
pub struct History {
    jobs: BTreeMap<JobId, Past>,
    users: HashSet<Arc<str>>,
}

impl History {
    /// Keeps the compact form of `rec`, which has ended.
    pub fn insert(&mut self, rec: &JobRecord) {
        let user = match self.users.get(rec.owner.user.as_str()) {
            Some(u) => u.clone(),
            None => {
                let u: Arc<str> = rec.owner.user.as_str().into();
                self.users.insert(u.clone());
                u
            }
        };
        let s = JobSummary::of(rec);
        let past = Past {
            name: rec.name().into(),
            user,
            uid: rec.owner.uid,
            class: s.class,
            priority: rec.priority,
            state: s.state,
            attempts: rec.attempts,
            submitted_at: rec.submitted_at,
            started_at: s.started_at,
            exit_code: s.exit_code,
            reason: rec.state.outcome().map(|o| o.reason),
            finished_at: rec.state.outcome().map(|o| o.finished_at),
            spool: spool_identity(&rec.origin),
        };
        self.jobs.insert(rec.id, past);
    }

    pub fn get(&self, id: JobId) -> Option<&Past> {
        self.jobs.get(&id)
    }

    pub fn remove(&mut self, id: JobId) -> Option<Past> {
        self.jobs.remove(&id)
    }

    /// Puts back a summary [`History::remove`] took (a clean that could not remove the job).
    pub fn put_back(&mut self, id: JobId, past: Past) {
        self.jobs.insert(id, past);
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (JobId, &Past)> {
        self.jobs.iter().map(|(id, p)| (*id, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::job::{JobState, Outcome, Owner};

    fn ended(id: JobId, user: &str) -> JobRecord {
        let now = Timestamp::now();
        JobRecord {
            id,
            spec: cyb_proto::parse_job(br#"{"name":"n","command":["true"]}"#).unwrap(),
            owner: Owner {
                uid: 1000,
                gid: 1000,
                user: user.into(),
            },
            origin: Origin::Rpc { pid: None },
            submitted_at: now,
            priority: 3,
            attempts: 2,
            first_started_at: Some(now),
            run_dir: format!("/logs/run_{id}"),
            callback: None,
            state: JobState::Failed {
                outcome: Box::new(Outcome {
                    reason: Reason::ExitCode,
                    message: "exited with status 4".into(),
                    exit_code: Some(4),
                    signal: None,
                    started_at: Some(now),
                    finished_at: now,
                    peak_memory_bytes: None,
                    cpu_usage_ms: None,
                    gpus: Vec::new(),
                    container_id: None,
                    errors: Vec::new(),
                }),
            },
        }
    }

    #[test]
    fn the_summary_of_a_past_job_is_the_full_records_summary() {
        let mut h = History::default();
        let rec = ended(7, "ann");
        h.insert(&rec);
        h.insert(&ended(8, "ann"));
        let s = h.get(7).unwrap().summary(7);
        let full = JobSummary::of(&rec);
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::to_value(&full).unwrap()
        );
        // One name for all of a user's jobs.
        assert!(Arc::ptr_eq(&h.get(7).unwrap().user, &h.get(8).unwrap().user));
        assert_eq!(h.len(), 2);
    }
}
