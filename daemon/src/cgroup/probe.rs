//! Checking for real that device rules deny: a throw-away cgroup confined by one
//! mechanism (the v1 devices controller or the v2 BPF filter), and a forked child that
//! joins it and opens device nodes made for the purpose.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::dirs::{Dirs, PROBE_PREFIX};
use super::fsio::write_file;
use super::routing::Via;
use super::{CgroupError, Cgroups, DeviceRule, Result, join_in_child, v1, v2};

/// Which device-control mechanism [`Cgroups::probe_devices`] tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMechanism {
    /// The cgroup v1 `devices` controller.
    V1,
    /// The BPF_CGROUP_DEVICE program on the unified hierarchy.
    Bpf,
}

/// What one mechanism did in [`Cgroups::probe_device_denial`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The denied node gave EPERM and the allowed one opened.
    Denies,
    /// The denied node opened anyway.
    DoesNotDeny,
    /// Not present on this host.
    Unavailable(String),
    /// The probe itself could not run or gave an unexpected answer.
    Failed(String),
}

/// Which device-control mechanisms really deny on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProbe {
    pub v1: ProbeOutcome,
    pub bpf: ProbeOutcome,
}

impl DeviceProbe {
    /// Whether at least one mechanism denies, so device rules are enforced.
    pub fn enforced(&self) -> bool {
        self.v1 == ProbeOutcome::Denies || self.bpf == ProbeOutcome::Denies
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Denies => write!(f, "denies"),
            ProbeOutcome::DoesNotDeny => write!(f, "does NOT deny"),
            ProbeOutcome::Unavailable(why) => write!(f, "unavailable ({why})"),
            ProbeOutcome::Failed(why) => write!(f, "probe failed ({why})"),
        }
    }
}

impl fmt::Display for DeviceProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v1 devices controller: {}; v2 BPF device filter: {}",
            self.v1, self.bpf
        )
    }
}

impl Cgroups {
    /// Checks for real which mechanisms deny a device: for each, a throw-away cgroup that
    /// allows only `c 1:5` (a clone of /dev/zero), and a child that joins it and opens
    /// a clone of /dev/null (`c 1:3`: must fail with EPERM) and of /dev/zero (must open).
    /// The nodes are made with mknod in a private temporary directory on a filesystem
    /// that allows device nodes. Takes a few milliseconds.
    pub fn probe_device_denial(&self) -> DeviceProbe {
        let rules = [DeviceRule::char(1, Some(5), true, true)];
        let outcome = |mech| match self.probe_devices(mech, &rules, &[(1, 3), (1, 5)]) {
            Err(CgroupError::Unsupported { why, .. }) => ProbeOutcome::Unavailable(why),
            Err(e) => ProbeOutcome::Failed(e.to_string()),
            Ok(r) => match (r[0], r[1]) {
                (Err(Errno::EPERM), Ok(())) => ProbeOutcome::Denies,
                (Ok(()), _) => ProbeOutcome::DoesNotDeny,
                (a, b) => ProbeOutcome::Failed(format!("opening c 1:3 gave {a:?}, c 1:5 gave {b:?}")),
            },
        };
        DeviceProbe {
            v1: outcome(DeviceMechanism::V1),
            bpf: outcome(DeviceMechanism::Bpf),
        }
    }

    /// Makes a throw-away cgroup in which only `mech` confines devices to `allow` (no
    /// default set), mknods character devices `nodes` (major, minor) in a temporary
    /// directory, and for each forks a child that joins the cgroup and opens the node
    /// read-only: `Ok(())` if it opened, else the errno (EPERM: denied by the cgroup).
    /// Removes the nodes and the cgroup again.
    pub fn probe_devices(
        &self,
        mech: DeviceMechanism,
        allow: &[DeviceRule],
        nodes: &[(u32, u32)],
    ) -> Result<Vec<Result<(), Errno>>> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let (dirs, what) = match mech {
            DeviceMechanism::V1 => (
                Dirs {
                    devices: self.base.devices.clone(),
                    ..Dirs::default()
                },
                "the v1 devices controller",
            ),
            DeviceMechanism::Bpf => (
                Dirs {
                    unified: self
                        .base
                        .unified
                        .clone()
                        .filter(|_| self.routing.devices == Via::V2),
                    ..Dirs::default()
                },
                "a BPF device filter",
            ),
        };
        if dirs.is_empty() {
            let why = format!("{what} is not available ({})", self.describe());
            return Err(CgroupError::Unsupported {
                what: "device rules",
                why,
            });
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PROBE_PREFIX}{}_{seq}", std::process::id());
        let probe = self.handle(0, dirs.join(&name));
        if probe.exists() {
            probe.kill()?;
            probe.remove()?;
        }
        let result = (|| -> Result<Vec<Result<(), Errno>>> {
            for d in probe.dirs.all() {
                fs::create_dir(d).map_err(|source| CgroupError::Create {
                    path: d.to_path_buf(),
                    source,
                })?;
            }
            if let Some(dev) = &probe.dirs.devices {
                for (file, value) in v1::devices::v1_writes(allow) {
                    write_file(&dev.join(file), &value)?;
                }
            }
            if let Some(u) = &probe.dirs.unified {
                v2::devices::attach(u, allow)?;
            }
            let scratch = ScratchDir::new()?;
            let procs = probe.procs_files()?;
            let fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
            nodes
                .iter()
                .map(|&(major, minor)| {
                    let node = scratch.mknod_char(major, minor)?;
                    open_in_child(&fds, &node).map_err(|source| CgroupError::Probe { path: node, source })
                })
                .collect()
        })();
        let cleanup = probe.kill().and_then(|()| probe.remove());
        let out = result?;
        cleanup?;
        Ok(out)
    }
}

/// A private directory for probe device nodes, on a filesystem that allows device nodes
/// (not mounted nodev); removed with its contents on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let candidates = [
            std::env::temp_dir(),
            PathBuf::from("/var/tmp"),
            PathBuf::from("/dev"),
        ];
        let parent = candidates
            .iter()
            .find(|c| {
                nix::sys::statvfs::statvfs(c.as_path())
                    .is_ok_and(|s| !s.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV))
            })
            .ok_or_else(|| CgroupError::Probe {
                path: candidates[0].clone(),
                source: io::Error::other("no writable filesystem without nodev for the probe's device nodes"),
            })?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".cybd-devprobe-{}-{seq}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| CgroupError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(ScratchDir { path })
    }

    fn mknod_char(&self, major: u32, minor: u32) -> Result<PathBuf> {
        use nix::sys::stat::{Mode as FileMode, SFlag, makedev, mknod};
        let path = self.path.join(format!("c{major}_{minor}"));
        mknod(
            &path,
            SFlag::S_IFCHR,
            FileMode::from_bits_truncate(0o600),
            makedev(major.into(), minor.into()),
        )
        .map_err(|e| CgroupError::Create {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Exit code of a probe child that could not join the cgroup (errnos are below 200).
const JOIN_FAILED: i32 = 255;

/// Forks a child that joins the cgroups `procs` and opens `path` read-only; returns what
/// the open gave.
fn open_in_child(procs: &[RawFd], path: &Path) -> io::Result<Result<(), Errno>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let child = move || -> i32 {
        if join_in_child(procs).is_err() {
            return JOIN_FAILED;
        }
        match raw_open_readonly(&cpath) {
            Ok(()) => 0,
            Err(errno) => errno,
        }
    };
    // SAFETY: the child closure only calls write(2), open(2) and reads errno, all
    // async-signal-safe, on data prepared before the fork, and allocates nothing.
    let status = unsafe { fork_wait(&child)? };
    match status {
        0 => Ok(Ok(())),
        JOIN_FAILED => Err(io::Error::other("the probe child could not join the cgroup")),
        errno => Ok(Err(Errno::from_raw(errno))),
    }
}

/// open(2) read-only and close-on-exec; the errno on failure. The descriptor is left open:
/// only for a child about to exit. Async-signal-safe.
fn raw_open_readonly(path: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: path is a valid NUL-terminated string; open(2) is async-signal-safe.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if fd >= 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Forks; the child runs `child` and exits with its return value (0..=255) without
/// unwinding or running destructors; the parent waits and returns that exit code.
///
/// # Safety
///
/// The process may have other threads, so `child` must only do async-signal-safe things
/// (no allocation, no locks).
unsafe fn fork_wait(child: &dyn Fn() -> i32) -> io::Result<i32> {
    // SAFETY: the caller guarantees the child side is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child at once, running no atexit handlers or destructors
        // that belong to the parent.
        unsafe { libc::_exit(code) };
    }
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                return Err(io::Error::other(format!("the probe child died of {sig}")));
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
