//! The ready queue: per class, queued jobs whose dependencies are met, highest priority
//! first and FIFO (by id) within a priority; and the jobs that wait for a dependency.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use cyb_proto::job::StateName;
use cyb_proto::{Class, JobId};

/// Where a queued job stands with its dependencies.
#[derive(Debug, PartialEq, Eq)]
pub enum Deps {
    /// All succeeded (or it has none).
    Met,
    /// These have not ended yet.
    Waiting(Vec<JobId>),
    /// This one ended without success: the job cannot run.
    Failed(JobId, StateName),
    /// This one does not exist (any more: ended jobs can be cleaned, though never while a
    /// job that has not ended depends on them): the job cannot run.
    Missing(JobId),
}

/// Where `deps` stand, given each job's state (`None`: no such job).
pub fn deps(deps: &[JobId], state_of: impl Fn(JobId) -> Option<StateName>) -> Deps {
    let mut waiting = Vec::new();
    for &d in deps {
        match state_of(d) {
            Some(StateName::Succeeded) => {}
            Some(s) if s.is_terminal() => return Deps::Failed(d, s),
            Some(_) => waiting.push(d),
            None => return Deps::Missing(d),
        }
    }
    if waiting.is_empty() {
        Deps::Met
    } else {
        Deps::Waiting(waiting)
    }
}

#[derive(Default)]
pub struct ReadyQueue {
    ready: BTreeMap<Class, BTreeSet<(Reverse<i32>, JobId)>>,
    /// dependency -> jobs waiting for it
    dependents: HashMap<JobId, Vec<JobId>>,
}

impl ReadyQueue {
    pub fn insert(&mut self, class: Class, priority: i32, id: JobId) {
        self.ready
            .entry(class)
            .or_default()
            .insert((Reverse(priority), id));
    }

    pub fn remove(&mut self, class: Class, priority: i32, id: JobId) -> bool {
        self.ready
            .get_mut(&class)
            .is_some_and(|s| s.remove(&(Reverse(priority), id)))
    }

    /// The job of `class` to start next.
    pub fn head(&self, class: Class) -> Option<JobId> {
        self.ready.get(&class)?.first().map(|&(_, id)| id)
    }

    pub fn pop(&mut self, class: Class) -> Option<JobId> {
        self.ready.get_mut(&class)?.pop_first().map(|(_, id)| id)
    }

    /// Job `id` waits until `dep` ends.
    pub fn wait_for(&mut self, dep: JobId, id: JobId) {
        let v = self.dependents.entry(dep).or_default();
        if !v.contains(&id) {
            v.push(id);
        }
    }

    /// The jobs that waited for `dep`, which has ended.
    pub fn take_dependents(&mut self, dep: JobId) -> Vec<JobId> {
        self.dependents.remove(&dep).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_priority_first_then_fifo_and_classes_apart() {
        let mut q = ReadyQueue::default();
        q.insert(Class::CpuShort, 0, 3);
        q.insert(Class::CpuShort, 0, 1);
        q.insert(Class::CpuShort, 5, 7);
        q.insert(Class::CpuShort, -1, 2);
        q.insert(Class::Gpu, 9, 4);
        assert_eq!(q.head(Class::CpuShort), Some(7));
        let order: Vec<_> = std::iter::from_fn(|| q.pop(Class::CpuShort)).collect();
        assert_eq!(order, [7, 1, 3, 2]);
        assert_eq!(q.pop(Class::Gpu), Some(4));
        assert_eq!(q.pop(Class::CpuLong), None);
    }

    #[test]
    fn a_new_priority_moves_a_job_and_removal_takes_it_out() {
        let mut q = ReadyQueue::default();
        q.insert(Class::CpuShort, 0, 1);
        q.insert(Class::CpuShort, 0, 2);
        assert!(q.remove(Class::CpuShort, 0, 2));
        assert!(!q.remove(Class::CpuShort, 0, 2));
        q.insert(Class::CpuShort, 3, 2);
        assert_eq!(q.head(Class::CpuShort), Some(2));
    }

    #[test]
    fn dependencies_met_waiting_or_failed() {
        let states = |id: JobId| match id {
            1 => Some(StateName::Succeeded),
            2 => Some(StateName::Running),
            3 => Some(StateName::Queued),
            4 => Some(StateName::Failed),
            5 => Some(StateName::Cancelled),
            _ => None,
        };
        assert_eq!(deps(&[], states), Deps::Met);
        assert_eq!(deps(&[1], states), Deps::Met);
        assert_eq!(deps(&[1, 2, 3], states), Deps::Waiting(vec![2, 3]));
        assert_eq!(deps(&[2, 4], states), Deps::Failed(4, StateName::Failed));
        assert_eq!(deps(&[5], states), Deps::Failed(5, StateName::Cancelled));
        assert_eq!(deps(&[99], states), Deps::Missing(99));
        assert_eq!(deps(&[1, 99, 4], states), Deps::Missing(99));
    }

    #[test]
    fn dependents_are_handed_back_once() {
        let mut q = ReadyQueue::default();
        q.wait_for(1, 5);
        q.wait_for(1, 5);
        q.wait_for(1, 6);
        assert_eq!(q.take_dependents(1), [5, 6]);
        assert!(q.take_dependents(1).is_empty());
    }
}
