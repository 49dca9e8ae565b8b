//! What a container used, read back after it ended. With the `cgroupfs` driver cybd makes
//! each container's cgroup under a parent of its own (`/<cgroups.name>.docker/<instance>/
//! job_<id>_<attempt>`, the create request's `CgroupParent`): the engine removes the
//! container's cgroup when it ends, but the parent's hierarchical counters (peak memory,
//! CPU time, on cgroup v2 the OOM kills) still hold what it used. The supervisor reads them,
//! then removes the parent in every hierarchy. (With the `systemd` driver the parent would
//! have to be a systemd slice; there cybd sets none and reports no usage.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The parent cgroup of attempt `attempt` of job `id` (relative to each hierarchy's root).
pub fn parent(cgroup_name: &str, instance: &str, id: u64, attempt: u32) -> String {
    format!("/{cgroup_name}.docker/{instance}/job_{id}_{attempt}")
}

/// What the parent's counters say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Used {
    pub peak_memory_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub oom_killed: bool,
}

/// Cgroup mounts: (mount point, fstype, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let opts = post.nth(1).unwrap_or("");
            matches!(fstype, "cgroup" | "cgroup2").then(|| {
                (
                    PathBuf::from(mnt.replace("\\040", " ")),
                    fstype.to_string(),
                    opts.to_string(),
                )
            })
        })
        .collect()
}

fn v1_dir(mounts: &[(PathBuf, String, String)], controller: &str, rel: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == controller))
        .map(|(m, _, _)| m.join(rel.trim_start_matches('/')))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn keyed(p: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(p)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Reads what the containers under parent `rel` used (`version`: the engine's cgroup
/// version, `1` or `2`).
pub fn read(rel: &str, version: &str) -> Used {
    let mounts = cgroup_mounts();
    let mut u = Used::default();
    if version == "2" {
        let Some((m, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") else {
            return u;
        };
        let d = m.join(rel.trim_start_matches('/'));
        u.peak_memory_bytes = read_u64(&d.join("memory.peak"));
        u.cpu_ms = keyed(&d.join("cpu.stat"), "usage_usec ").map(|us| us / 1000);
        u.oom_killed = keyed(&d.join("memory.events"), "oom_kill ").is_some_and(|n| n > 0);
    } else {
        if let Some(d) = v1_dir(&mounts, "memory", rel) {
            u.peak_memory_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
        }
        if let Some(d) = v1_dir(&mounts, "cpuacct", rel) {
            u.cpu_ms = read_u64(&d.join("cpuacct.usage")).map(|ns| ns / 1_000_000);
        }
    }
    u
}

/// Removes parent `rel` (and any container cgroup the engine has not removed yet, once
/// empty) from every hierarchy; waits up to 2 s for the engine to let go.
pub fn remove(rel: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut problems = Vec::new();
    for (m, _, _) in cgroup_mounts() {
        let d = m.join(rel.trim_start_matches('/'));
        if !d.exists() {
            continue;
        }
        loop {
            let children: Vec<PathBuf> = std::fs::read_dir(&d)
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            for c in &children {
                let _ = std::fs::remove_dir(c);
            }
            match std::fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    problems.push(format!("cannot remove {}: {e}", d.display()));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    // `<name>.docker/<instance>` stays, empty, as cybd's own `<name>` does: removing it
    // here could pull it away from under another job's container being made.
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_has_a_parent_of_its_own() {
        assert_eq!(parent("cyb", "ab12", 7, 2), "/cyb.docker/ab12/job_7_2");
    }
}
