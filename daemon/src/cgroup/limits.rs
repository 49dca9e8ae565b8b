//! Checking a job's [`Limits`] and planning the control-file writes that put them on its
//! cgroup, each in the hierarchy the [`Routing`] names.

use std::path::{Path, PathBuf};

use super::dirs::Dirs;
use super::fsio::FileWrite;
use super::routing::{Routing, Via};
use super::{CPU_PERIOD_US, CgroupError, Limits, Result, v1, v2};

/// The quota for `cpus` CPUs per [`CPU_PERIOD_US`], in µs.
pub(super) fn cpu_quota_us(cpus: f64) -> Result<u64> {
    // The kernel's ceiling on a CFS quota is 2^44 - 1 µs.
    const MAX_QUOTA: f64 = ((1u64 << 44) - 1) as f64;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus must be a positive number, not {cpus}"
        )));
    }
    let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0);
    if quota > MAX_QUOTA {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus {cpus} is more than the kernel can express"
        )));
    }
    Ok(quota as u64)
}

/// The file writes that put `limits` on the job cgroup `d`, in order, checking the limits
/// first. Device rules for v1 are included; the BPF device filter is attached separately.
pub(super) fn plan_limits(d: &Dirs, r: &Routing, limits: &Limits) -> Result<Vec<FileWrite>> {
    let unsupported = |what| CgroupError::Unsupported {
        what,
        why: "no such controller in this cgroup setup".to_string(),
    };
    // The directory of the hierarchy `via` for a controller whose v1 directory is `v1`.
    fn dir<'a>(d: &'a Dirs, via: Via, v1: &'a Option<PathBuf>) -> Option<(Via, &'a Path)> {
        let dir = match via {
            Via::V1 => v1.as_deref(),
            Via::V2 => d.unified.as_deref(),
            Via::None => None,
        };
        dir.map(|dir| (via, dir))
    }
    let mut w = Vec::new();
    if let Some(bytes) = limits.memory_bytes {
        if bytes == 0 {
            return Err(CgroupError::InvalidLimit(
                "memory must be more than 0 bytes".to_string(),
            ));
        }
        match dir(d, r.memory, &d.memory) {
            Some((Via::V1, m)) => v1::memory::limit_writes(m, bytes, &mut w),
            Some((_, u)) => v2::memory::limit_writes(u, bytes, &mut w),
            None => return Err(unsupported("a memory limit")),
        }
    }
    if let Some(cpus) = limits.cpus {
        let quota = cpu_quota_us(cpus)?;
        match dir(d, r.cpu, &d.cpu) {
            Some((Via::V1, c)) => v1::cpu::quota_writes(c, quota, &mut w),
            Some((_, u)) => v2::cpu::quota_writes(u, quota, &mut w),
            None => return Err(unsupported("a CPU quota")),
        }
    }
    if let Some(n) = limits.pids {
        if n == 0 {
            return Err(CgroupError::InvalidLimit("pids must be at least 1".to_string()));
        }
        match dir(d, r.pids, &d.pids) {
            Some((Via::V1, p)) => v1::pids::limit_writes(p, n, &mut w),
            Some((_, u)) => v2::pids::limit_writes(u, n, &mut w),
            None => return Err(unsupported("a pids limit")),
        }
    }
    if let Some(allow) = &limits.devices
        && let Some((Via::V1, dev)) = dir(d, r.devices, &d.devices)
    {
        v1::devices::limit_writes(dev, &allow.effective(), &mut w);
    }
    Ok(w)
}

#[cfg(test)]
pub(super) mod tests {
    use std::fs;

    use super::*;
    use crate::cgroup::dirs::V2Controllers;
    use crate::cgroup::fsio::apply_writes;
    use crate::cgroup::routing::Found;
    use crate::cgroup::{DEFAULT_RULES, DeviceAllow};

    /// A temporary directory standing in for cgroup directories: `v1` and `unified` name
    /// the hierarchies, `files` the cgroup files each holds (the kernel's files exist
    /// before anything is written; written files are never created). Routed as detection
    /// would route them, without a BPF filter, `cgroup.kill` or `cgroup.freeze`.
    pub(in crate::cgroup) fn fake(
        v1: &[&str],
        unified: Option<V2Controllers>,
        files: &[&str],
    ) -> (tempfile::TempDir, Dirs, Routing) {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = Dirs::default();
        let mk = |name: &str| {
            let p = tmp.path().join(name).join("job_7");
            fs::create_dir_all(&p).unwrap();
            for f in files {
                fs::write(p.join(f), "").unwrap();
            }
            Some(p)
        };
        for c in v1 {
            let p = mk(c);
            match *c {
                "memory" => d.memory = p,
                "cpu" => d.cpu = p,
                "cpuacct" => d.cpuacct = p,
                "pids" => d.pids = p,
                "devices" => d.devices = p,
                "freezer" => d.freezer = p,
                _ => unreachable!(),
            }
        }
        let mut found = Found::default();
        if let Some(v2) = unified {
            d.unified = mk("unified");
            found.v2 = v2;
        }
        let r = Routing::from_base(&d, found);
        (tmp, d, r)
    }

    fn read(dir: &Option<PathBuf>, file: &str) -> Option<String> {
        fs::read_to_string(dir.as_ref().unwrap().join(file)).ok()
    }

    const V1_FILES: &[&str] = &[
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
        "pids.max",
        "devices.allow",
        "devices.deny",
    ];
    pub(in crate::cgroup) const V2_ALL: V2Controllers = V2Controllers {
        memory: true,
        cpu: true,
        pids: true,
    };

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(5),
            devices: Some(DeviceAllow::new(vec!["c 195:0 rw".parse().unwrap()])),
        }
    }

    #[test]
    fn v1_limit_files() {
        let (_tmp, d, r) = fake(&["memory", "cpu", "pids", "devices"], None, V1_FILES);
        let plan = plan_limits(&d, &r, &limits()).unwrap();
        apply_writes(&plan).unwrap();
        assert_eq!(read(&d.memory, "memory.limit_in_bytes").unwrap(), "67108864");
        assert_eq!(
            read(&d.memory, "memory.memsw.limit_in_bytes").unwrap(),
            "67108864"
        );
        assert_eq!(read(&d.cpu, "cpu.cfs_period_us").unwrap(), "100000");
        assert_eq!(read(&d.cpu, "cpu.cfs_quota_us").unwrap(), "50000");
        assert_eq!(read(&d.pids, "pids.max").unwrap(), "5");
        assert_eq!(read(&d.devices, "devices.deny").unwrap(), "a");
        // One write per rule; the file keeps the last.
        assert_eq!(read(&d.devices, "devices.allow").unwrap(), "c 195:0 rw");
        let allows: Vec<&str> = plan
            .iter()
            .filter(|w| w.path.ends_with("devices.allow"))
            .map(|w| w.value.as_str())
            .collect();
        assert_eq!(allows.len(), DEFAULT_RULES.len() + 1);
        assert_eq!(allows[0], "c 1:3 rwm");
        // Order matters where the kernel checks one file against another.
        let order: Vec<String> = plan
            .iter()
            .map(|w| w.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            order[..5],
            [
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "cpu.cfs_period_us",
                "cpu.cfs_quota_us",
                "pids.max"
            ]
        );
        assert_eq!(order[5], "devices.deny");
    }

    #[test]
    fn v1_without_swap_accounting() {
        let (_tmp, d, r) = fake(&["memory"], None, &["memory.limit_in_bytes"]);
        let l = Limits {
            memory_bytes: Some(1 << 30),
            ..Limits::default()
        };
        apply_writes(&plan_limits(&d, &r, &l).unwrap()).unwrap();
        assert_eq!(read(&d.memory, "memory.limit_in_bytes").unwrap(), "1073741824");
        assert_eq!(
            read(&d.memory, "memory.memsw.limit_in_bytes"),
            None,
            "must not be created"
        );
    }

    #[test]
    fn v2_limit_files() {
        let files = [
            "memory.max",
            "memory.swap.max",
            "memory.oom.group",
            "cpu.max",
            "pids.max",
        ];
        let (_tmp, d, r) = fake(&[], Some(V2_ALL), &files);
        let plan = plan_limits(&d, &r, &limits()).unwrap();
        apply_writes(&plan).unwrap();
        assert_eq!(read(&d.unified, "memory.max").unwrap(), "67108864");
        assert_eq!(read(&d.unified, "memory.swap.max").unwrap(), "0");
        assert_eq!(read(&d.unified, "memory.oom.group").unwrap(), "1");
        assert_eq!(read(&d.unified, "cpu.max").unwrap(), "50000 100000");
        assert_eq!(read(&d.unified, "pids.max").unwrap(), "5");
        // Devices go to the BPF filter, not to files.
        assert!(!plan.iter().any(|w| w.path.to_string_lossy().contains("devices")));
        let two = Limits {
            cpus: Some(2.0),
            ..Limits::default()
        };
        assert_eq!(plan_limits(&d, &r, &two).unwrap()[0].value, "200000 100000");
        let tiny = Limits {
            cpus: Some(0.001),
            ..Limits::default()
        };
        assert_eq!(plan_limits(&d, &r, &tiny).unwrap()[0].value, "1000 100000");
    }

    #[test]
    fn hybrid_takes_limits_from_v1() {
        // The unified cgroup has no controllers; the limits go to v1.
        let (_tmp, d, r) = fake(
            &["memory", "cpu", "pids", "devices"],
            Some(V2Controllers::default()),
            V1_FILES,
        );
        let plan = plan_limits(&d, &r, &limits()).unwrap();
        assert!(
            plan.iter()
                .all(|w| !w.path.starts_with(d.unified.as_ref().unwrap()))
        );
        assert_eq!(plan.len(), 5 + 1 + DEFAULT_RULES.len() + 1);
    }

    #[test]
    fn bad_and_unsupported_limits() {
        let (_tmp, d, r) = fake(
            &[],
            Some(V2Controllers {
                memory: false,
                cpu: true,
                pids: true,
            }),
            &[],
        );
        for cpus in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            let l = Limits {
                cpus: Some(cpus),
                ..Limits::default()
            };
            assert!(
                matches!(plan_limits(&d, &r, &l), Err(CgroupError::InvalidLimit(_))),
                "{cpus}"
            );
        }
        let l = Limits {
            pids: Some(0),
            ..Limits::default()
        };
        assert!(matches!(
            plan_limits(&d, &r, &l),
            Err(CgroupError::InvalidLimit(_))
        ));
        let l = Limits {
            memory_bytes: Some(1),
            ..Limits::default()
        };
        assert!(matches!(
            plan_limits(&d, &r, &l),
            Err(CgroupError::Unsupported { .. })
        ));
        assert!(plan_limits(&d, &r, &Limits::default()).unwrap().is_empty());
    }
}
