//! The GPU pool: which GPUs jobs can be given, which a cybd job holds (or is claiming),
//! and which something outside cybd holds now (the periodic probe).

use std::collections::{BTreeSet, HashMap};

use cyb_proto::JobId;

#[derive(Default)]
pub struct GpuPool {
    usable: BTreeSet<u32>,
    busy: HashMap<u32, JobId>,
    outside: BTreeSet<u32>,
}

impl GpuPool {
    pub fn new(usable: BTreeSet<u32>) -> GpuPool {
        GpuPool {
            usable,
            ..Default::default()
        }
    }

    pub fn usable(&self) -> usize {
        self.usable.len()
    }

    /// `need` free GPUs (lowest indices first), or `None` while fewer are free.
    pub fn free(&self, need: usize) -> Option<Vec<u32>> {
        let free: Vec<u32> = self
            .usable
            .iter()
            .filter(|g| !self.busy.contains_key(g) && !self.outside.contains(g))
            .copied()
            .take(need)
            .collect();
        (free.len() == need).then_some(free)
    }

    /// `gpus` are job `id`'s now.
    pub fn take(&mut self, id: JobId, gpus: &[u32]) {
        for g in gpus {
            self.busy.insert(*g, id);
        }
    }

    /// Job `id` gives back those of `gpus` it holds.
    pub fn give_back(&mut self, id: JobId, gpus: &[u32]) {
        for g in gpus {
            if self.busy.get(g) == Some(&id) {
                self.busy.remove(g);
            }
        }
    }

    /// Job `id` gives back every GPU it holds.
    pub fn give_back_all(&mut self, id: JobId) {
        self.busy.retain(|_, j| *j != id);
    }

    /// What the probe found held outside cybd; true if that changed.
    pub fn set_outside(&mut self, outside: BTreeSet<u32>) -> bool {
        let changed = outside != self.outside;
        self.outside = outside;
        changed
    }

    /// A claim found `gpu` held outside cybd since the last probe.
    pub fn held_outside(&mut self, gpu: u32) {
        self.outside.insert(gpu);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_handed_out_lowest_first_and_only_whole() {
        let mut p = GpuPool::new(BTreeSet::from([0, 1, 2, 3]));
        assert_eq!(p.free(2), Some(vec![0, 1]));
        p.take(7, &[0, 1]);
        assert_eq!(p.free(2), Some(vec![2, 3]));
        assert_eq!(p.free(3), None);
        p.take(8, &[2]);
        assert_eq!(p.free(1), Some(vec![3]));
        // Only the holder gives a GPU back.
        p.give_back(8, &[0, 2]);
        assert_eq!(p.free(3), None);
        assert_eq!(p.free(2), Some(vec![2, 3]));
        p.give_back_all(7);
        assert_eq!(p.free(4), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn gpus_held_outside_are_not_handed_out_until_a_probe_finds_them_free() {
        let mut p = GpuPool::new(BTreeSet::from([0, 1]));
        p.held_outside(0);
        assert_eq!(p.free(1), Some(vec![1]));
        assert_eq!(p.free(2), None);
        assert!(p.set_outside(BTreeSet::from([1])));
        assert_eq!(p.free(1), Some(vec![0]));
        assert!(!p.set_outside(BTreeSet::from([1])));
        assert!(p.set_outside(BTreeSet::new()));
        assert_eq!(p.free(2), Some(vec![0, 1]));
        assert_eq!(p.usable(), 2);
    }
}
