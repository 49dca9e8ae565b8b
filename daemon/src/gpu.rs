//! GPUs: which ones this host has, and which job holds which.
//!
//! - [`config`]: the `[gpus]` section and the `[[gpu]]` entries of `cybd.toml`.
//! - [`inventory`]: the GPUs, from NVML (loaded at run time; no driver means an empty
//!   inventory and a health line saying so) or from the config, with their device nodes'
//!   major/minor numbers for the cgroup device allow-list.
//! - [`lock`]: the per-GPU lockfiles `<runtime>/gpu/<index>.lock`, held with `flock` by the
//!   job's supervisor for the job's whole life, and respected when anything else holds them.
//! - Here: [`allocate`] (the lowest free GPUs, all or nothing) and [`report`] (what
//!   `cybctl gpus` shows).
//!
//! Everything here blocks (NVML calls, `stat`, `flock`, `/proc`): call it from
//! `spawn_blocking`.

pub mod config;
pub mod inventory;
pub mod lock;

use cyb_proto::gpu::{GpuInfo, GpuProcess, GpuReport, LockInfo};
use tracing::warn;

pub use config::{DEFAULT_COMMON_DEVICES, GpuConfig, GpuConfigError, GpuSource, GpusSection, StaticGpu};
pub use inventory::{ComputeProcess, DeviceNode, Gpu, Inventory, InventorySource, NVML_LIBRARY};
pub use lock::{GpuError, GpuLease, GpuLocks, Holder, LockStatus};

/// Takes `n` GPUs for `holder`: the lowest indices that are usable, whose lock can be taken
/// and, unless `allow_shared`, on which the inventory saw no compute process (with the lock
/// free, any such process is not a cybd job's). All or nothing: `Ok(None)` when fewer than
/// `n` can be had, with every lock taken on the way released again. A GPU whose lockfile is
/// unusable (a symlink, someone else's file...) is skipped with a warning; an unusable lock
/// directory is an error. The compute processes are those of the inventory's last
/// load/refresh.
pub fn allocate(
    inventory: &Inventory,
    locks: &GpuLocks,
    n: u32,
    holder: &Holder,
    allow_shared: bool,
) -> Result<Option<Vec<GpuLease>>, GpuError> {
    let want = n as usize;
    if want == 0 {
        return Ok(Some(Vec::new()));
    }
    let mut candidates: Vec<&Gpu> = inventory
        .gpus
        .iter()
        .filter(|g| g.usable() && (allow_shared || g.compute_processes.is_empty()))
        .collect();
    if candidates.len() < want {
        return Ok(None);
    }
    candidates.sort_by_key(|g| g.index);
    let mut taken: Vec<GpuLease> = Vec::with_capacity(want);
    for g in candidates {
        match locks.try_acquire(g.index, holder) {
            Ok(Some(lease)) => {
                taken.push(lease);
                if taken.len() == want {
                    return Ok(Some(taken));
                }
            }
            Ok(None) => {}
            Err(e @ (GpuError::CreateDir { .. } | GpuError::OpenDir { .. } | GpuError::UnsafeDir { .. })) => {
                release_all(taken);
                return Err(e);
            }
            Err(e) => warn!(gpu = g.index, "GPU skipped: {e}"),
        }
    }
    release_all(taken);
    Ok(None)
}

fn release_all(leases: Vec<GpuLease>) {
    for lease in leases {
        let index = lease.index();
        // Dropping the descriptor releases the lock even when clearing the text failed.
        if let Err(e) = lease.release() {
            warn!(gpu = index, "cannot release the GPU's lock cleanly: {e}");
        }
    }
}

/// What `cybctl gpus` shows: every GPU of `inventory` with its lock state and the compute
/// processes on it that are not the holding job's (not descendants of the holder's pid).
pub fn report(inventory: &Inventory, locks: &GpuLocks) -> GpuReport {
    let gpus = inventory
        .gpus
        .iter()
        .map(|g| {
            let (lock, holder_pid) = match locks.status(g.index) {
                Ok(LockStatus::Free) => (LockInfo::Free, None),
                Ok(LockStatus::HeldByCyb(h)) => (
                    LockInfo::Job {
                        job_id: h.job_id,
                        user: h.user,
                        pid: h.pid,
                    },
                    Some(h.pid),
                ),
                Ok(LockStatus::HeldOutside) => (LockInfo::Outside, None),
                Err(e) => (LockInfo::Unknown { error: e.to_string() }, None),
            };
            let foreign_processes = g
                .compute_processes
                .iter()
                .filter(|p| holder_pid.is_none_or(|h| !descends_from(p.pid, h)))
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: p.used_memory_bytes,
                })
                .collect();
            GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total_bytes: g.memory_total_bytes,
                memory_used_bytes: g.memory_used_bytes,
                utilization_percent: g.utilization_percent,
                temperature_c: g.temperature_c,
                devices: g.device_paths.iter().map(|p| p.display().to_string()).collect(),
                lock,
                foreign_processes,
                note: g.note(),
            }
        })
        .collect();
    GpuReport {
        source: inventory.source.as_str().to_string(),
        health: inventory.health().to_string(),
        gpus,
    }
}

/// The parent of `pid`, from `/proc/<pid>/stat` (field 4, after the parenthesised name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    // A bound against a /proc that changes under us.
    for _ in 0..256 {
        if p == ancestor {
            return true;
        }
        match parent_of(p) {
            Some(pp) if pp > 0 && pp != p => p = pp,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fake(n: u32) -> Inventory {
        Inventory::from_gpus((0..n).map(Gpu::new).collect())
    }

    fn indices(leases: &[GpuLease]) -> Vec<u32> {
        leases.iter().map(GpuLease::index).collect()
    }

    fn locks(tmp: &Path) -> GpuLocks {
        GpuLocks::for_runtime(tmp)
    }

    #[test]
    fn lowest_free_first() {
        let tmp = tempfile::tempdir().unwrap();
        let (inv, locks) = (fake(4), locks(tmp.path()));
        let h = Holder::new(1, "alice");
        let a = allocate(&inv, &locks, 2, &h, false).unwrap().unwrap();
        assert_eq!(indices(&a), vec![0, 1]);
        let b = allocate(&inv, &locks, 2, &Holder::new(2, "bob"), false)
            .unwrap()
            .unwrap();
        assert_eq!(indices(&b), vec![2, 3]);
        assert!(allocate(&inv, &locks, 1, &h, false).unwrap().is_none());
        drop(a);
        let c = allocate(&inv, &locks, 1, &h, false).unwrap().unwrap();
        assert_eq!(indices(&c), vec![0]);
        assert_eq!(
            allocate(&inv, &locks, 0, &h, false).unwrap().map(|v| v.len()),
            Some(0)
        );
        // More than the host has: nothing is touched.
        assert!(allocate(&inv, &locks, 5, &h, false).unwrap().is_none());
    }

    #[test]
    fn all_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (inv, locks) = (fake(4), locks(tmp.path()));
        let other = Holder::new(7, "carol");
        let l1 = locks.try_acquire(1, &other).unwrap().unwrap();
        let l3 = locks.try_acquire(3, &other).unwrap().unwrap();
        let me = Holder::new(8, "dave");
        assert!(allocate(&inv, &locks, 3, &me, false).unwrap().is_none());
        // GPUs 0 and 2 were taken on the way and given back, their text cleared.
        for i in [0, 2] {
            assert_eq!(locks.status(i).unwrap(), LockStatus::Free);
            assert_eq!(std::fs::read(locks.path(i)).unwrap(), b"");
        }
        assert_eq!(locks.status(1).unwrap(), LockStatus::HeldByCyb(other.clone()));
        let got = allocate(&inv, &locks, 2, &me, false).unwrap().unwrap();
        assert_eq!(indices(&got), vec![0, 2]);
        drop((l1, l3));
    }

    #[test]
    fn busy_or_broken_gpus_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut gpus: Vec<Gpu> = (0..3).map(Gpu::new).collect();
        gpus[0].compute_processes.push(ComputeProcess {
            pid: 4242,
            used_memory_bytes: Some(1 << 30),
        });
        gpus[1]
            .problems
            .push("device node /dev/nvidia1 is missing".into());
        let inv = Inventory::from_gpus(gpus);
        let locks = locks(tmp.path());
        let h = Holder::new(1, "alice");
        let a = allocate(&inv, &locks, 1, &h, false).unwrap().unwrap();
        assert_eq!(indices(&a), vec![2]);
        assert!(allocate(&inv, &locks, 1, &h, false).unwrap().is_none());
        let b = allocate(&inv, &locks, 1, &h, true).unwrap().unwrap();
        assert_eq!(
            indices(&b),
            vec![0],
            "allow_shared takes a GPU with foreign processes"
        );
    }

    #[test]
    fn a_broken_lockfile_skips_its_gpu() {
        let tmp = tempfile::tempdir().unwrap();
        let (inv, locks) = (fake(2), locks(tmp.path()));
        std::fs::create_dir_all(locks.dir()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", locks.path(0)).unwrap();
        let a = allocate(&inv, &locks, 1, &Holder::new(1, "alice"), false)
            .unwrap()
            .unwrap();
        assert_eq!(indices(&a), vec![1]);
        let r = report(&inv, &locks);
        assert!(
            matches!(&r.gpus[0].lock, LockInfo::Unknown { error } if error.contains("symlink")),
            "{:?}",
            r.gpus[0].lock
        );
    }

    #[test]
    fn an_unsafe_lock_directory_is_an_error() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (inv, locks) = (fake(2), locks(tmp.path()));
        std::fs::create_dir_all(locks.dir()).unwrap();
        std::fs::set_permissions(locks.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = allocate(&inv, &locks, 1, &Holder::new(1, "alice"), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "refusing lock directory {}: others may write into it (mode 777)",
                locks.dir().display()
            )
        );
    }

    #[test]
    fn report_shows_holders_and_foreign_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mut gpus: Vec<Gpu> = (0..3).map(Gpu::new).collect();
        // GPU 0: held by us, running a process of ours (this one) and a foreign one (init).
        gpus[0].compute_processes = vec![
            ComputeProcess {
                pid: me,
                used_memory_bytes: Some(5),
            },
            ComputeProcess {
                pid: 1,
                used_memory_bytes: None,
            },
        ];
        gpus[0].uuid = Some("GPU-0".into());
        gpus[0].device_paths = vec!["/dev/nvidia0".into()];
        gpus[2]
            .problems
            .push("device node /dev/nvidia2 is missing".into());
        let inv = Inventory::from_gpus(gpus);
        let locks = locks(tmp.path());
        let lease = locks.try_acquire(0, &Holder::new(5, "erin")).unwrap().unwrap();
        let r = report(&inv, &locks);
        assert_eq!(r.source, "static");
        assert_eq!(
            r.health,
            "static: 3 GPUs from the config, 1 unusable (gpu 2: device node /dev/nvidia2 is missing)"
        );
        assert_eq!(
            r.gpus[0].lock,
            LockInfo::Job {
                job_id: 5,
                user: "erin".into(),
                pid: me
            }
        );
        assert_eq!(
            r.gpus[0].foreign_processes,
            vec![GpuProcess {
                pid: 1,
                used_memory_bytes: None
            }]
        );
        assert_eq!(r.gpus[0].devices, vec!["/dev/nvidia0".to_string()]);
        assert_eq!(r.gpus[1].lock, LockInfo::Free);
        assert_eq!(
            r.gpus[2].note.as_deref(),
            Some("device node /dev/nvidia2 is missing")
        );
        let table = cyb_proto::gpu::render_table(&r);
        assert!(table.contains(&format!("job 5 (erin, pid {me})")), "{table}");
        drop(lease);
        // Another test of this process that forked just now may hold a copy of the closed
        // descriptor until its child execs (close-on-exec); the lock lasts as long as any copy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while report(&inv, &locks).gpus[0].lock != LockInfo::Free && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(report(&inv, &locks).gpus[0].lock, LockInfo::Free);
    }

    #[test]
    fn descendants() {
        let me = std::process::id();
        assert!(descends_from(me, me));
        assert!(descends_from(me, 1));
        assert!(!descends_from(1, me));
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert!(descends_from(child.id(), me));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !descends_from(child.id(), me),
            "a reaped child has no /proc entry"
        );
    }
}
