//! The tally: jobs per state and queued jobs per class, kept current as records change,
//! so `stats` and the status line cost nothing per job held (a daemon keeps every finished
//! job). Every state change is persisted, so noting each job a flush writes keeps it exact.

use std::collections::HashMap;

use cyb_proto::job::StateName;
use cyb_proto::{Class, JobId, JobRecord};

#[derive(Default)]
pub struct Tally {
    of: HashMap<JobId, (StateName, Class)>,
    pub states: HashMap<StateName, usize>,
    pub queued: HashMap<Class, usize>,
}

impl Tally {
    pub fn note(&mut self, rec: &JobRecord) {
        self.set(rec.id, (rec.state.name(), rec.spec.class()));
    }

    pub fn set(&mut self, id: JobId, now: (StateName, Class)) {
        match self.of.insert(id, now) {
            Some(old) if old == now => return,
            Some(old) => self.count(old, false),
            None => {}
        }
        self.count(now, true);
    }

    /// Job `id` is no longer counted (it was removed by a clean).
    pub fn forget(&mut self, id: JobId) {
        if let Some(old) = self.of.remove(&id) {
            self.count(old, false);
        }
    }

    fn count(&mut self, (state, class): (StateName, Class), add: bool) {
        let bump = |n: &mut usize| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        bump(self.states.entry(state).or_default());
        if state == StateName::Queued {
            bump(self.queued.entry(class).or_default());
        }
    }

    pub fn state(&self, s: StateName) -> usize {
        self.states.get(&s).copied().unwrap_or(0)
    }

    pub fn queued_in(&self, c: Class) -> usize {
        self.queued.get(&c).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_moving_between_states_is_counted_once_in_its_latest_state() {
        let mut t = Tally::default();
        t.set(1, (StateName::Queued, Class::Gpu));
        t.set(2, (StateName::Queued, Class::CpuShort));
        t.set(1, (StateName::Queued, Class::Gpu));
        assert_eq!(t.state(StateName::Queued), 2);
        assert_eq!(t.queued_in(Class::Gpu), 1);
        t.set(1, (StateName::Running, Class::Gpu));
        assert_eq!(t.state(StateName::Queued), 1);
        assert_eq!(t.queued_in(Class::Gpu), 0);
        assert_eq!(t.state(StateName::Running), 1);
        t.set(1, (StateName::Succeeded, Class::Gpu));
        t.set(2, (StateName::Cancelled, Class::CpuShort));
        assert_eq!(t.state(StateName::Running), 0);
        assert_eq!(t.state(StateName::Queued), 0);
        assert_eq!(t.state(StateName::Succeeded), 1);
        assert_eq!(t.state(StateName::Cancelled), 1);
        assert_eq!(t.queued_in(Class::CpuShort), 0);
        t.forget(2);
        t.forget(2);
        assert_eq!(t.state(StateName::Cancelled), 0);
        assert_eq!(t.state(StateName::Succeeded), 1);
    }
}
