//! Setting up the driver's subtree in the unified hierarchy under cgroup v2's
//! no-internal-processes rule (see the module documentation of `cgroup`): enabling the
//! controllers for the jobs' subtree, moving the daemon into its leaf, or falling back to
//! the top of the mount.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::cgroup::DAEMON_LEAF;
use crate::cgroup::dirs::V2Controllers;
use crate::cgroup::fsio::{mkdir_exist_ok, read_or_empty, words};

/// The v2 controllers enabled for jobs, where available.
pub(in crate::cgroup) const V2_WANTED: [&str; 3] = ["memory", "cpu", "pids"];

/// Writes `+c` to `dir/cgroup.subtree_control` for each of `ctrls`; the failures.
pub(in crate::cgroup) fn enable_controllers(dir: &Path, ctrls: &[&str]) -> Vec<(String, io::Error)> {
    let f = dir.join("cgroup.subtree_control");
    ctrls
        .iter()
        .filter_map(|c| {
            let r = OpenOptions::new()
                .write(true)
                .open(&f)
                .and_then(|mut h| h.write_all(format!("+{c}").as_bytes()));
            r.err().map(|e| (c.to_string(), e))
        })
        .collect()
}

/// Whether [`enable_for_children`] got past the no-internal-processes rule.
#[derive(Debug, PartialEq, Eq)]
enum Enabled {
    Done,
    /// `parent` holds processes other than this one.
    OthersPresent,
}

/// Enables those of `wanted` that `parent` has for its children. cgroup v2 refuses that
/// (EBUSY) while `parent` holds processes: if the only one is this process, it moves into
/// the leaf `parent/daemon/` and tries again; if others are there too, it leaves them.
/// Other failures are noted.
fn enable_for_children(parent: &Path, wanted: &[&str], notes: &mut Vec<String>) -> Enabled {
    let available = read_or_empty(parent, "cgroup.controllers");
    let enabled = read_or_empty(parent, "cgroup.subtree_control");
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| words(&available).contains(c) && !words(&enabled).contains(c))
        .collect();
    if missing.is_empty() {
        return Enabled::Done;
    }
    let mut failed = enable_controllers(parent, &missing);
    if failed.iter().any(|(_, e)| e.raw_os_error() == Some(libc::EBUSY)) {
        let me = std::process::id().to_string();
        if words(&read_or_empty(parent, "cgroup.procs")) != [me.as_str()] {
            return Enabled::OthersPresent;
        }
        let leaf = parent.join(DAEMON_LEAF);
        match mkdir_exist_ok(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), &me)) {
            Ok(()) => failed = enable_controllers(parent, &missing),
            Err(e) => notes.push(format!("cannot move cybd into {}: {e}", leaf.display())),
        }
    }
    for (c, e) in failed {
        notes.push(format!(
            "{c}: cannot enable in {}: {e}",
            parent.join("cgroup.subtree_control").display()
        ));
    }
    Enabled::Done
}

/// Sets up the subtree in the unified hierarchy: `<own>/<base>` with `wanted` controllers
/// for its children (see the module documentation), where `<own>` is `own` or, when
/// that is the daemon's leaf, its parent. If `<own>` holds other processes, the subtree
/// goes to the top of the mount (`mount`) instead when controllers can be had there, else
/// it stays, without controllers. Returns the base and the controllers jobs get.
pub(in crate::cgroup) fn setup_unified(
    own: &Path,
    mount: &Path,
    base_name: &str,
    wanted: &[&str],
    notes: &mut Vec<String>,
) -> Option<(PathBuf, V2Controllers)> {
    let mut parent = match own.parent() {
        Some(p) if own.file_name() == Some(OsStr::new(DAEMON_LEAF)) => p,
        _ => own,
    };
    if enable_for_children(parent, wanted, notes) == Enabled::OthersPresent {
        let why = format!(
            "{} holds other processes, so its children can get no controllers",
            parent.display()
        );
        let mut fallback_notes = Vec::new();
        if mount != parent
            && enable_for_children(mount, wanted, &mut fallback_notes) == Enabled::Done
            && mkdir_exist_ok(&mount.join(base_name)).is_ok()
        {
            notes.push(format!(
                "{why}: job cgroups are under {} instead (run cybd as a systemd service with \
                 Delegate=yes to keep them in its own)",
                mount.display()
            ));
            notes.extend(fallback_notes);
            parent = mount;
        } else {
            notes.push(format!("{why}; run cybd as a systemd service with Delegate=yes"));
        }
    }
    let base = parent.join(base_name);
    if let Err(e) = mkdir_exist_ok(&base) {
        notes.push(format!("cannot create {}: {e}", base.display()));
        return None;
    }
    let enabled_parent = read_or_empty(parent, "cgroup.subtree_control");
    let enabled_base = read_or_empty(&base, "cgroup.subtree_control");
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| words(&enabled_parent).contains(c) && !words(&enabled_base).contains(c))
        .collect();
    for (c, e) in enable_controllers(&base, &missing) {
        notes.push(format!(
            "{c}: cannot enable in {}: {e}",
            base.join("cgroup.subtree_control").display()
        ));
    }
    let enabled_base = read_or_empty(&base, "cgroup.subtree_control");
    let on = |c: &str| words(&enabled_base).contains(&c);
    Some((
        base,
        V2Controllers {
            memory: on("memory"),
            cpu: on("cpu"),
            pids: on("pids"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cgroup::fsio::{remove_tree, write_file};
    use crate::cgroup::{join_in_child, parse_mountinfo, parse_proc_cgroup, resolve};

    const V2_ALL: V2Controllers = V2Controllers {
        memory: true,
        cpu: true,
        pids: true,
    };

    #[test]
    fn unified_setup_takes_the_parent_of_the_daemon_leaf() {
        // A service started in its leaf (DelegateSubgroup=daemon) whose subtree is set up
        // already: nothing to write, nobody to move.
        let tmp = tempfile::tempdir().unwrap();
        let svc = tmp.path().join("cybd.service");
        fs::create_dir_all(svc.join(DAEMON_LEAF)).unwrap();
        fs::create_dir_all(svc.join("cybd")).unwrap();
        fs::write(svc.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        fs::write(svc.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        fs::write(svc.join("cybd/cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        let mut notes = Vec::new();
        let got = setup_unified(&svc.join(DAEMON_LEAF), tmp.path(), "cybd", &V2_WANTED, &mut notes);
        assert_eq!(got, Some((svc.join("cybd"), V2_ALL)));
        assert!(notes.is_empty(), "{notes:?}");
        // Called on the service cgroup itself, with only memory available.
        fs::write(svc.join("cgroup.controllers"), "memory\n").unwrap();
        fs::write(svc.join("cgroup.subtree_control"), "memory\n").unwrap();
        fs::write(svc.join("cybd/cgroup.subtree_control"), "memory\n").unwrap();
        let got = setup_unified(&svc, tmp.path(), "cybd", &V2_WANTED, &mut notes);
        let only_memory = V2Controllers {
            memory: true,
            cpu: false,
            pids: false,
        };
        assert_eq!(got, Some((svc.join("cybd"), only_memory)));
        assert!(notes.is_empty(), "{notes:?}");
        // No such directory: nothing created, the reason noted.
        let got = setup_unified(
            &tmp.path().join("gone/x"),
            tmp.path(),
            "cybd",
            &V2_WANTED,
            &mut notes,
        );
        assert_eq!(got, None);
        assert!(
            notes[0].starts_with("cannot create ") && notes[0].contains("gone/x/cybd"),
            "{notes:?}"
        );
    }

    /// Undoes what [`unified_setup_on_the_real_kernel`] changed, also when it fails.
    struct RealSetupCleanup {
        mount: PathBuf,
        dirs: Vec<PathBuf>,
        disable: Option<&'static str>,
        sleeper: Option<std::process::Child>,
    }

    impl Drop for RealSetupCleanup {
        fn drop(&mut self) {
            if let Some(mut c) = self.sleeper.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for d in &self.dirs {
                let _ = remove_tree(d, Instant::now() + Duration::from_secs(2));
            }
            if let Some(c) = self.disable {
                let _ = write_file(&self.mount.join("cgroup.subtree_control"), &format!("-{c}"));
            }
        }
    }

    /// The no-internal-processes handling of [`setup_unified`] on the real kernel, with a
    /// domain controller the unified mount offers (hugetlb on a hybrid host): a daemon alone
    /// in its cgroup moves into the `daemon` leaf; one sharing it with other processes puts
    /// the subtree at the top of the mount. Needs root; skipped without.
    #[test]
    fn unified_setup_on_the_real_kernel() {
        const CHILD: &str = "CYB_CGROUP_UNIFIED_SETUP_CHILD";
        if let Ok(spec) = std::env::var(CHILD) {
            // The child: alone in its cgroup, like a daemon that systemd started there.
            let parts: Vec<&str> = spec.split('|').collect();
            let mut notes = Vec::new();
            let got = setup_unified(
                Path::new(parts[0]),
                Path::new(parts[1]),
                "base",
                &[parts[2]],
                &mut notes,
            );
            let own = fs::read_to_string("/proc/self/cgroup").unwrap();
            println!("BASE={:?}", got.map(|g| g.0));
            println!("NOTES={notes:?}");
            println!(
                "CGROUP={}",
                own.lines().find(|l| l.starts_with("0::")).unwrap_or("")
            );
            return;
        }
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root");
            return;
        }
        let layout = resolve(
            &parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap()),
            &parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap()),
        );
        let Some(mount) = layout.unified_mount else {
            println!("skipped: no cgroup2 mount");
            return;
        };
        let top = read_or_empty(&mount, "cgroup.controllers");
        let Some(ctrl) = ["hugetlb", "pids", "memory"]
            .into_iter()
            .find(|c| words(&top).contains(c))
        else {
            println!("skipped: the cgroup2 mount offers no domain controller");
            return;
        };
        let tag = format!("cybd-unit-{}", std::process::id());
        let (own, alone) = (mount.join(&tag), mount.join(format!("{tag}-alone")));
        let fallback_base = mount.join(format!("{tag}-base"));
        let mut cleanup = RealSetupCleanup {
            mount: mount.clone(),
            dirs: vec![own.clone(), alone.clone(), fallback_base.clone()],
            disable: None,
            sleeper: None,
        };
        if !words(&read_or_empty(&mount, "cgroup.subtree_control")).contains(&ctrl) {
            assert!(enable_controllers(&mount, &[ctrl]).is_empty());
            cleanup.disable = Some(ctrl);
        }
        let spawn_into = |dir: &Path, cmd: &mut std::process::Command| {
            use std::os::unix::process::CommandExt;
            let procs = OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .unwrap();
            let fd = procs.as_raw_fd();
            // SAFETY: join_in_child only calls write(2), which is async-signal-safe.
            unsafe { cmd.pre_exec(move || join_in_child(&[fd])) };
            let child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
            drop(procs);
            child
        };

        // Another process in `own`: the subtree goes to the top of the mount.
        fs::create_dir(&own).unwrap();
        cleanup.sleeper = Some(spawn_into(&own, std::process::Command::new("sleep").arg("30")));
        let mut notes = Vec::new();
        let got = setup_unified(&own, &mount, &format!("{tag}-base"), &[ctrl], &mut notes);
        assert_eq!(got.map(|g| g.0), Some(fallback_base.clone()));
        assert!(
            notes[0].contains("holds other processes") && notes[0].contains("instead"),
            "{notes:?}"
        );
        assert!(words(&read_or_empty(&fallback_base, "cgroup.subtree_control")).contains(&ctrl));
        assert_eq!(
            read_or_empty(&own, "cgroup.subtree_control").trim(),
            "",
            "own left alone"
        );

        // Alone in `alone`: into the leaf, controllers enabled below.
        fs::create_dir(&alone).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "--exact",
            "cgroup::v2::setup::tests::unified_setup_on_the_real_kernel",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{}|{}|{ctrl}", alone.display(), mount.display()));
        let out = spawn_into(&alone, &mut cmd).wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let want_base = alone.join("base");
        assert!(text.contains(&format!("BASE=Some({want_base:?})")), "{text}");
        assert!(text.contains("NOTES=[]"), "{text}");
        let cgroup_line = text.lines().find_map(|l| l.strip_prefix("CGROUP=")).unwrap_or("");
        assert!(
            cgroup_line.ends_with(&format!("/{tag}-alone/{DAEMON_LEAF}")),
            "{text}"
        );
        assert!(words(&read_or_empty(&alone, "cgroup.subtree_control")).contains(&ctrl));
        assert!(words(&read_or_empty(&want_base, "cgroup.subtree_control")).contains(&ctrl));
        drop(cleanup);
        assert!(!own.exists() && !alone.exists() && !fallback_base.exists());
    }
}
