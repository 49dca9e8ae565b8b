//! Where the cgroup hierarchies are mounted and where this process sits in each of them.
//!
//! Pure parsers of `/proc/self/mountinfo` and `/proc/self/cgroup` (they take the file's
//! text, so they are tested with samples from real hosts), and [`resolve`], which joins the
//! two into this process's own cgroup directory per controller.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The cgroup v1 controllers the driver uses. `cpu` and `cpuacct` are often co-mounted
/// (`/sys/fs/cgroup/cpu,cpuacct`), then they share one directory.
pub const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "devices", "freezer"];

/// One cgroup filesystem mount, from a line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The path inside the hierarchy that is mounted here (field 4, `/` unless a bind
    /// mount or a container shows only part of the hierarchy).
    pub root: String,
    pub mountpoint: PathBuf,
    /// `cgroup2` (the unified hierarchy) rather than `cgroup` (v1).
    pub unified: bool,
    /// v1: the controllers (and `name=...`) of this hierarchy, from the super options;
    /// empty for cgroup2, whose controllers are in `cgroup.controllers`.
    pub controllers: Vec<String>,
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controller,list:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy_id: u32,
    /// Empty for the unified hierarchy (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

/// Which cgroup interface a host offers the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only the unified hierarchy: limits, tracking, kill and device filter all there.
    V2,
    /// Only v1 controller hierarchies (memory, cpu, pids, devices, freezer).
    V1,
    /// v1 controllers for the limits, plus a cgroup2 mount (usually without controllers)
    /// for tracking, `cgroup.kill`, `cgroup.freeze` and the BPF device filter.
    Hybrid,
    /// Nothing usable (no cgroup mounts, not root, read-only...).
    None,
}

/// This process's own cgroup directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// In the unified (cgroup2) hierarchy, when it is mounted.
    pub unified: Option<PathBuf>,
    /// Where that unified hierarchy is mounted (its top as this process sees it).
    pub unified_mount: Option<PathBuf>,
    /// In each v1 hierarchy of [`V1_CONTROLLERS`] that is mounted, by controller name.
    pub v1: BTreeMap<String, PathBuf>,
}

impl Layout {
    /// The mode these mounts allow, before anything is tried (permissions and available
    /// v2 controllers can still reduce what the driver uses).
    pub fn mode(&self) -> Mode {
        match (self.unified.is_some(), !self.v1.is_empty()) {
            (true, true) => Mode::Hybrid,
            (true, false) => Mode::V2,
            (false, true) => Mode::V1,
            (false, false) => Mode::None,
        }
    }
}

/// Undoes the octal escapes of mountinfo (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup and cgroup2 mounts in the text of `/proc/self/mountinfo`, in file order.
/// Lines that are not cgroup mounts, or are malformed, are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        // "36 25 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory":
        // six fixed fields, optional fields, a lone "-", then fstype, source, super options.
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 6 || right.len() < 3 {
            continue;
        }
        let unified = match right[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if unified {
            Vec::new()
        } else {
            right[2]
                .split(',')
                .filter(|o| is_v1_controller(o))
                .map(str::to_string)
                .collect()
        };
        mounts.push(CgroupMount {
            root: unescape(left[3]),
            mountpoint: PathBuf::from(unescape(left[4])),
            unified,
            controllers,
        });
    }
    mounts
}

/// Whether a v1 super option names a controller or a named hierarchy rather than an
/// option such as `rw`, `xattr` or `release_agent=...`.
fn is_v1_controller(opt: &str) -> bool {
    const OPTIONS: [&str; 8] = [
        "rw",
        "ro",
        "xattr",
        "noprefix",
        "clone_children",
        "cpuset_v2_mode",
        "none",
        "all",
    ];
    if opt.starts_with("name=") {
        return true;
    }
    !opt.is_empty() && !opt.contains('=') && !OPTIONS.contains(&opt)
}

/// The lines of `/proc/self/cgroup`. Malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy_id = parts.next()?.parse().ok()?;
            let list = parts.next()?;
            let path = parts.next()?;
            if !path.starts_with('/') {
                return None;
            }
            let controllers = list
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some(Membership {
                hierarchy_id,
                controllers,
                path: path.to_string(),
            })
        })
        .collect()
}

/// The directory of cgroup `own` (a path in the hierarchy) under `mount`, when the mount
/// shows it: the mount's root must be `own` or one of its ancestors. Paths that leave the
/// cgroup namespace (`/../..`) are not reachable.
fn dir_under(mount: &CgroupMount, own: &str) -> Option<PathBuf> {
    if own.split('/').any(|c| c == ".." || c == ".") {
        return None;
    }
    let root = mount.root.trim_end_matches('/');
    let rel = if root.is_empty() {
        own
    } else {
        let rest = own.strip_prefix(root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let rel = rel.trim_matches('/');
    Some(if rel.is_empty() {
        mount.mountpoint.clone()
    } else {
        mount.mountpoint.join(rel)
    })
}

/// This process's own cgroup directory in the unified hierarchy and in each v1 hierarchy of
/// [`V1_CONTROLLERS`], from the parsed mounts and memberships. A hierarchy that is mounted
/// several times is taken from the first mount that shows our cgroup.
pub fn resolve(mounts: &[CgroupMount], members: &[Membership]) -> Layout {
    let mut layout = Layout::default();
    let unified = members
        .iter()
        .find(|m| m.hierarchy_id == 0 && m.controllers.is_empty());
    if let Some(m) = unified
        && let Some((mt, dir)) = mounts
            .iter()
            .filter(|mt| mt.unified)
            .find_map(|mt| Some((mt, dir_under(mt, &m.path)?)))
    {
        layout.unified = Some(dir);
        layout.unified_mount = Some(mt.mountpoint.clone());
    }
    for ctrl in V1_CONTROLLERS {
        let Some(member) = members
            .iter()
            .find(|m| m.hierarchy_id != 0 && m.controllers.iter().any(|c| c == ctrl))
        else {
            continue;
        };
        let dir = mounts
            .iter()
            .filter(|mt| !mt.unified && mt.controllers.iter().any(|c| c == ctrl))
            .find_map(|mt| dir_under(mt, &member.path));
        if let Some(dir) = dir {
            layout.v1.insert(ctrl.to_string(), dir);
        }
    }
    layout
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fedora 39 / Debian 12 / Ubuntu 22.04: pure cgroup v2, the daemon a systemd service.
    const V2_MOUNTINFO: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
26 24 0:24 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:4 - bpf bpf rw,mode=700
";
    const V2_CGROUP: &str = "0::/system.slice/cybd.service\n";

    /// CentOS 7: pure v1, cpu and cpuacct co-mounted, no unified mount.
    const V1_MOUNTINFO: &str = "\
18 61 0:17 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/devices rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,devices
33 25 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,freezer
34 25 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,net_prio,net_cls
35 25 0:31 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpuset
";
    const V1_CGROUP: &str = "\
11:cpuset:/
10:net_prio,net_cls:/
9:freezer:/
8:devices:/system.slice/cybd.service
7:pids:/system.slice/cybd.service
6:memory:/system.slice/cybd.service
5:cpu,cpuacct:/system.slice/cybd.service
1:name=systemd:/system.slice/cybd.service
";

    /// The development host: v1 controllers each mounted alone, name=systemd, and a
    /// cgroup2 mount without controllers at /sys/fs/cgroup/unified.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/47f1669db0dbc65e1410d8b88b2f5ab6
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";

    fn layout(mi: &str, cg: &str) -> Layout {
        resolve(&parse_mountinfo(mi), &parse_proc_cgroup(cg))
    }

    #[test]
    fn pure_v2() {
        let mounts = parse_mountinfo(V2_MOUNTINFO);
        assert_eq!(
            mounts,
            vec![CgroupMount {
                root: "/".into(),
                mountpoint: "/sys/fs/cgroup".into(),
                unified: true,
                controllers: vec![],
            }]
        );
        let l = layout(V2_MOUNTINFO, V2_CGROUP);
        assert_eq!(
            l.unified,
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/cybd.service"))
        );
        assert_eq!(l.unified_mount, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(l.v1.is_empty());
        assert_eq!(l.mode(), Mode::V2);
    }

    #[test]
    fn pure_v1_with_cpu_cpuacct_comounted() {
        let mounts = parse_mountinfo(V1_MOUNTINFO);
        assert_eq!(mounts.len(), 8);
        assert_eq!(mounts[0].controllers, vec!["name=systemd".to_string()]);
        assert_eq!(
            mounts[1].controllers,
            vec!["cpu".to_string(), "cpuacct".to_string()]
        );
        let l = layout(V1_MOUNTINFO, V1_CGROUP);
        assert_eq!(l.unified, None);
        let svc = "/system.slice/cybd.service";
        let want: BTreeMap<String, PathBuf> = [
            ("cpu", format!("/sys/fs/cgroup/cpu,cpuacct{svc}")),
            ("cpuacct", format!("/sys/fs/cgroup/cpu,cpuacct{svc}")),
            ("devices", format!("/sys/fs/cgroup/devices{svc}")),
            ("freezer", "/sys/fs/cgroup/freezer".to_string()),
            ("memory", format!("/sys/fs/cgroup/memory{svc}")),
            ("pids", format!("/sys/fs/cgroup/pids{svc}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect();
        assert_eq!(l.v1, want);
        assert_eq!(l.mode(), Mode::V1);
    }

    #[test]
    fn hybrid_like_this_host() {
        let l = layout(HYBRID_MOUNTINFO, HYBRID_CGROUP);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            l.v1.get("memory"),
            Some(&PathBuf::from(
                "/sys/fs/cgroup/memory/process_api/47f1669db0dbc65e1410d8b88b2f5ab6"
            ))
        );
        assert_eq!(l.v1.get("cpu"), Some(&PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(
            l.v1.get("cpuacct"),
            Some(&PathBuf::from("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(l.v1.len(), 6, "{l:?}");
        assert!(!l.v1.contains_key("cpuset") && !l.v1.contains_key("blkio"));
        assert_eq!(l.mode(), Mode::Hybrid);
    }

    #[test]
    fn ubuntu_20_04_hybrid_under_systemd() {
        let mi = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
38 30 0:34 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,memory
";
        let cg = "\
12:memory:/system.slice/cybd.service
4:cpu,cpuacct:/system.slice/cybd.service
1:name=systemd:/system.slice/cybd.service
0::/system.slice/cybd.service
";
        let l = layout(mi, cg);
        assert_eq!(
            l.unified,
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/cybd.service"))
        );
        assert_eq!(l.v1.keys().collect::<Vec<_>>(), ["cpu", "cpuacct", "memory"]);
        assert_eq!(l.mode(), Mode::Hybrid);
    }

    #[test]
    fn container_mount_roots_and_escapes() {
        // A container whose /sys/fs/cgroup shows only its own part of the host hierarchy,
        // and a mount point with a space in it.
        let mi = "\
100 90 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw
101 90 0:31 /docker/abc /mnt/cg\\040v1 rw - cgroup cgroup rw,memory
";
        let cg = "4:memory:/docker/abc/inner\n0::/docker/abc\n";
        let l = layout(mi, cg);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(l.v1.get("memory"), Some(&PathBuf::from("/mnt/cg v1/inner")));
        // Outside the mounted part (a cgroup namespace boundary): unreachable.
        let l = layout(mi, "4:memory:/docker/abcd\n0::/../other\n");
        assert_eq!(l, Layout::default());
        assert_eq!(l.mode(), Mode::None);
    }

    #[test]
    fn nothing_mounted_or_garbage() {
        assert_eq!(layout("", "").mode(), Mode::None);
        assert_eq!(layout("garbage line\n1 2 3\n", "x:y\n::\n").mode(), Mode::None);
        // A unified membership without a cgroup2 mount (pure v1 kernels print "0::/").
        assert_eq!(layout(V1_MOUNTINFO, "0::/\n5:memory:/\n").unified, None);
    }
}
