//! The v2 device filter: the BPF program of `devices.rs` for a rule set, loaded and
//! attached to a job's unified cgroup; programs are cached by rule set.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::cgroup::devices::{attach_device_program, load_device_program};
use crate::cgroup::{CgroupError, DeviceRule, Result};

/// At most this many distinct rule sets stay loaded (one per GPU combination in use).
const PROGRAM_CACHE: usize = 256;

/// BPF device programs already loaded, shared by clones of the driver: loading (the
/// verifier) costs far more than attaching, and most jobs share a handful of rule sets.
#[derive(Debug, Clone, Default)]
pub(in crate::cgroup) struct ProgramCache(Arc<Mutex<HashMap<Vec<DeviceRule>, OwnedFd>>>);

impl ProgramCache {
    /// Attaches the device filter for `rules` to `dir`, loading the program only the first
    /// time a rule set is seen.
    pub fn attach(&self, dir: &Path, rules: &[DeviceRule]) -> Result<()> {
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(rules) {
            if cache.len() >= PROGRAM_CACHE {
                cache.clear();
            }
            let prog = load(dir, rules)?;
            cache.insert(rules.to_vec(), prog);
        }
        let prog = cache.get(rules).ok_or_else(|| CgroupError::BpfAttach {
            path: dir.to_path_buf(),
            source: io::Error::other("device program cache lost an entry"),
        })?;
        attach_prog(dir, prog)
    }
}

/// Loads the device program for `rules` and attaches it to the unified cgroup `dir`.
pub(in crate::cgroup) fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<()> {
    let prog = load(dir, rules)?;
    // The cgroup holds the program from now on; our descriptor may close.
    attach_prog(dir, &prog)
}

fn attach_prog(dir: &Path, prog: &OwnedFd) -> Result<()> {
    attach_device_program(dir, prog).map_err(|source| CgroupError::BpfAttach {
        path: dir.to_path_buf(),
        source,
    })
}

/// The program for `rules`, loaded for the cgroup `dir` (named in the error).
fn load(dir: &Path, rules: &[DeviceRule]) -> Result<OwnedFd> {
    load_device_program(rules).map_err(|e| CgroupError::BpfLoad {
        path: dir.to_path_buf(),
        log: if e.log.is_empty() {
            String::new()
        } else {
            format!(" (verifier: {})", e.log)
        },
        source: e.source,
    })
}
