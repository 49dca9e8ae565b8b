//! The cgroup driver (`cybd::cgroup`) on the real kernel: memory, pids and CPU limits,
//! killing a job that double-forks and calls setsid, the device rules (v1 devices
//! controller and v2 BPF filter, each on its own), and sweeping stale cgroups.
//!
//! Needs root; each test creates its own subtree `cybd-test-<pid>-<name>` under this
//! process's cgroups and removes it again. The tests run one at a time: the CPU test
//! measures CPU time.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cyb_tests::{alive, is_root, require, wait_until};
use cybd::cgroup::{
    Cgroups, DeviceAllow, DeviceMechanism, DeviceRule, JobCgroup, Limits, Mode, ProbeOutcome, Via,
    join_in_child,
};
use nix::errno::Errno;

static SERIAL: Mutex<()> = Mutex::new(());

/// A driver on a subtree of its own, removed (with every job in it) when dropped.
struct Fixture {
    cg: Cgroups,
    jobs: Vec<JobCgroup>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    fn new(name: &str) -> Option<Fixture> {
        Fixture::with(name, Cgroups::detect)
    }

    /// With a driver from `detect` on the subtree's name.
    fn with(name: &str, detect: impl FnOnce(&str) -> Cgroups) -> Option<Fixture> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if !require(is_root(), "root (to create cgroups)") {
            return None;
        }
        let cg = detect(&format!("cybd-test-{}-{name}", std::process::id()));
        println!("{}", cg.describe());
        if !require(
            cg.mode() != Mode::None,
            &format!("usable cgroups ({})", cg.describe()),
        ) {
            return None;
        }
        Some(Fixture {
            cg,
            jobs: Vec::new(),
            _serial: serial,
        })
    }

    fn create(&mut self, id: u64, limits: &Limits) -> JobCgroup {
        let job = self
            .cg
            .create(id, limits)
            .unwrap_or_else(|e| panic!("create job {id}: {e}"));
        self.jobs.push(job.clone());
        job
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for j in &self.jobs {
            let _ = j.kill();
            let _ = j.remove();
        }
        if let Err(e) = self.cg.remove_base()
            && !std::thread::panicking()
        {
            panic!("cannot remove the test subtree: {e}");
        }
    }
}

/// Starts `sh -c script` inside `job`: the child joins between fork and exec.
fn spawn_in(job: &JobCgroup, script: &str, stderr: Stdio) -> Child {
    let files = job.procs_files().expect("open cgroup.procs");
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(stderr)
        .env("LC_ALL", "C");
    // SAFETY: join_in_child only calls write(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || join_in_child(&fds));
    }
    let child = cmd.spawn().expect("spawn sh");
    drop(files);
    child
}

/// Gone: no such process, or a zombie nobody reaped yet.
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => !alive(pid),
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

#[test]
fn memory_limit_ends_in_oom_kill() {
    let Some(mut f) = Fixture::new("oom") else { return };
    if !require(f.cg.capabilities().memory, "a memory controller") {
        return;
    }
    let job = f.create(
        1,
        &Limits {
            memory_bytes: Some(64 << 20),
            ..Limits::default()
        },
    );
    // dd fills a 200 MiB buffer: far over the limit (swap counts too).
    let mut child = spawn_in(
        &job,
        "dd if=/dev/zero of=/dev/null bs=200M count=1",
        Stdio::null(),
    );
    let status = child.wait().unwrap();
    assert!(
        status.signal() == Some(9) || status.code() == Some(137),
        "dd was not killed: {status:?}"
    );
    let stats = job.stats().unwrap();
    println!("{stats:?}");
    assert!(stats.oom_killed, "{stats:?}");
    if let Some(peak) = stats.peak_memory_bytes {
        assert!(peak <= 64 << 20 && peak > 16 << 20, "peak {peak}");
    }
    job.kill().unwrap();
    job.remove().unwrap();
}

#[test]
fn pids_limit_makes_forks_fail() {
    let Some(mut f) = Fixture::new("pids") else { return };
    if !require(f.cg.capabilities().pids, "a pids controller") {
        return;
    }
    let job = f.create(
        2,
        &Limits {
            pids: Some(5),
            ..Limits::default()
        },
    );
    let mut child = spawn_in(
        &job,
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait",
        Stdio::piped(),
    );
    let dir = job.v1_path("pids").or(job.unified_path()).unwrap().to_path_buf();
    assert!(
        wait_until(Duration::from_secs(5), || keyed(&dir.join("pids.events"), "max ")
            .is_some_and(|n| n > 0)),
        "no fork failed"
    );
    let n = job.pids().unwrap().len();
    assert!((2..=5).contains(&n), "{n} processes under a limit of 5");
    // sh gives up at its first failed fork; the sleeps it started hold the stderr pipe
    // open, so end them before reading it.
    assert!(wait_until(Duration::from_secs(5), || child
        .try_wait()
        .unwrap()
        .is_some()));
    job.kill().unwrap();
    assert!(job.pids().unwrap().is_empty());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("sh: {:?}, {n} processes, stderr {stderr:?}", out.status);
    assert!(!out.status.success());
    assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
}

#[test]
fn cpu_quota_half_a_cpu() {
    let Some(mut f) = Fixture::new("cpu") else { return };
    if !require(
        f.cg.capabilities().cpu,
        "a cpu controller with CFS bandwidth control",
    ) {
        return;
    }
    let job = f.create(
        3,
        &Limits {
            cpus: Some(0.5),
            ..Limits::default()
        },
    );
    let start = Instant::now();
    let mut child = spawn_in(&job, "while :; do :; done", Stdio::null());
    std::thread::sleep(Duration::from_secs(2));
    let used = job.stats().unwrap().cpu_usage_ms.expect("CPU usage");
    let wall = start.elapsed().as_secs_f64();
    job.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    let per_s = used as f64 / 1000.0 / wall;
    println!("{used} ms of CPU in {wall:.2} s: {per_s:.2} CPU");
    assert!(
        (0.35..=0.7).contains(&per_s),
        "{per_s:.2} CPU under a quota of 0.5"
    );
}

/// Runs a job that double-forks into a session of its own, kills it, and checks that no
/// process is left and that remove() leaves no directory.
fn assert_kill_leaves_nothing(job: &JobCgroup) {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pids");
    // The outer sh, a background sleep, and, double-forked into a session of its own and
    // orphaned, a sh that starts a sleep and becomes another.
    let script = format!(
        "F={f}; (setsid sh -c 'sleep 300 & echo $! >> {f}; echo $$ >> {f}; exec sleep 301' &); \
         sleep 302 & echo $! >> $F; echo $$ >> $F; wait",
        f = pidfile.display()
    );
    let mut child = spawn_in(job, &script, Stdio::null());
    let read_pids = || -> Vec<i32> {
        std::fs::read_to_string(&pidfile)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || read_pids().len() == 4),
        "{:?}",
        read_pids()
    );
    let pids = read_pids();
    assert!(pids.contains(&(child.id() as i32)));
    let inside = job.pids().unwrap();
    for p in &pids {
        assert!(!gone(*p), "{p} not running");
        assert!(inside.contains(p), "{p} not in the cgroup: {inside:?}");
    }
    job.kill().unwrap();
    assert!(!job.is_populated().unwrap());
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    for p in &pids {
        assert!(
            wait_until(Duration::from_secs(2), || gone(*p)),
            "process {p} survived kill()"
        );
    }
    job.remove().unwrap();
    for d in job.paths() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Removing twice is fine.
    job.remove().unwrap();
}

#[test]
fn kill_leaves_nothing_of_a_double_forked_setsid_job() {
    let Some(mut f) = Fixture::new("kill") else { return };
    let job = f.create(4, &Limits::default());
    assert_kill_leaves_nothing(&job);
}

/// A directory on a filesystem that allows device nodes.
fn node_dir() -> tempfile::TempDir {
    for parent in [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from("/dev"),
    ] {
        let nodev = nix::sys::statvfs::statvfs(&parent)
            .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV))
            .unwrap_or(true);
        if !nodev && let Ok(d) = tempfile::tempdir_in(&parent) {
            return d;
        }
    }
    panic!("no filesystem without nodev for test device nodes");
}

/// Forks a child that joins `job` and opens `node` read-only: Ok or the errno.
fn open_in(job: &JobCgroup, node: &Path) -> Result<(), Errno> {
    open_in_mode(job, node, libc::O_RDONLY)
}

fn open_in_mode(job: &JobCgroup, node: &Path, mode: libc::c_int) -> Result<(), Errno> {
    let files = job.procs_files().unwrap();
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let path = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: the child only calls write(2), open(2) and _exit(2), all async-signal-safe,
    // on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = if join_in_child(&fds).is_err() {
            255
        } else {
            // SAFETY: path is NUL-terminated and outlives the call.
            let fd = unsafe { libc::open(path.as_ptr(), mode | libc::O_CLOEXEC) };
            if fd >= 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(254)
            }
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, 255) => panic!("the child could not join the cgroup"),
        nix::sys::wait::WaitStatus::Exited(_, e) => Err(Errno::from_raw(e)),
        other => panic!("child: {other:?}"),
    }
}

fn mknod(dir: &Path, major: u32, minor: u32) -> PathBuf {
    use nix::sys::stat::{Mode, SFlag, makedev};
    let p = dir.join(format!("nv{major}_{minor}"));
    nix::sys::stat::mknod(
        &p,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major.into(), minor.into()),
    )
    .unwrap();
    p
}

/// Opening a node of major 195 (NVIDIA's) with no driver behind it gets past the cgroup
/// check and then fails with ENXIO (or ENODEV); a denied one fails with EPERM first.
/// Jobs `id` (allowed `c 195:0 rw`) and `id + 2` (allowed `c 195:0 r`): GPU 0's node opens
/// past the cgroup check, GPU 1's is refused, and the read-only rule refuses writing.
/// Returns the node directory and the first job.
fn assert_gpu_rules(f: &mut Fixture, id: u64) -> (tempfile::TempDir, JobCgroup) {
    let dir = node_dir();
    let (allowed, denied) = (mknod(dir.path(), 195, 0), mknod(dir.path(), 195, 1));
    let rw = Some(DeviceAllow::new(vec!["c 195:0 rw".parse().unwrap()]));
    let job = f.create(
        id,
        &Limits {
            devices: rw,
            ..Limits::default()
        },
    );
    assert!(past_the_cgroup(open_in(&job, &allowed)));
    assert_eq!(open_in(&job, &denied), Err(Errno::EPERM));
    let ro = Some(DeviceAllow::new(vec!["c 195:0 r".parse().unwrap()]));
    let job_ro = f.create(
        id + 2,
        &Limits {
            devices: ro,
            ..Limits::default()
        },
    );
    assert!(past_the_cgroup(open_in(&job_ro, &allowed)));
    assert_eq!(open_in_mode(&job_ro, &allowed, libc::O_WRONLY), Err(Errno::EPERM));
    (dir, job)
}

fn past_the_cgroup(r: Result<(), Errno>) -> bool {
    matches!(r, Err(Errno::ENXIO | Errno::ENODEV))
}

#[test]
fn device_rules_deny_other_nodes() {
    let Some(mut f) = Fixture::new("devices") else {
        return;
    };
    if !require(
        f.cg.capabilities().devices,
        "a device controller (v1 devices or v2 BPF)",
    ) {
        return;
    }
    let gpu0: DeviceRule = "c 195:0 rw".parse().unwrap();
    let dir = node_dir();
    let (allowed, denied) = (mknod(dir.path(), 195, 0), mknod(dir.path(), 195, 1));
    let null = mknod(dir.path(), 1, 3);

    // Not confined: no error from the cgroup.
    let free = f.create(5, &Limits::default());
    assert!(
        past_the_cgroup(open_in(&free, &denied)),
        "{:?}",
        open_in(&free, &denied)
    );

    // A job with every mechanism this host has.
    let job = f.create(
        6,
        &Limits {
            devices: Some(DeviceAllow::new(vec![gpu0])),
            ..Limits::default()
        },
    );
    let (a, d) = (open_in(&job, &allowed), open_in(&job, &denied));
    println!("job: 195:0 {a:?}, 195:1 {d:?}");
    assert!(past_the_cgroup(a), "allowed node: {a:?}");
    assert_eq!(d, Err(Errno::EPERM), "denied node");
    assert_eq!(open_in(&job, &null), Ok(()), "/dev/null is in the default set");

    // A read-only rule: reading gets past the cgroup, writing does not.
    let ro: DeviceRule = "c 195:0 r".parse().unwrap();
    let job_ro = f.create(
        9,
        &Limits {
            devices: Some(DeviceAllow::new(vec![ro])),
            ..Limits::default()
        },
    );
    assert!(past_the_cgroup(open_in(&job_ro, &allowed)));
    assert_eq!(open_in_mode(&job_ro, &allowed, libc::O_WRONLY), Err(Errno::EPERM));
    assert_eq!(open_in_mode(&job_ro, &allowed, libc::O_RDWR), Err(Errno::EPERM));
    assert!(
        past_the_cgroup(open_in_mode(&job, &allowed, libc::O_RDWR)),
        "rw rule"
    );

    // Each mechanism alone, where the host has it.
    let mut tested = Vec::new();
    for mech in [DeviceMechanism::V1, DeviceMechanism::Bpf] {
        let present = match mech {
            // (A job on a hybrid host gets only the BPF filter; the v1 controller is still
            // there to test on its own.)
            DeviceMechanism::V1 => {
                f.cg.base_paths()
                    .iter()
                    .any(|p| p.starts_with("/sys/fs/cgroup/devices"))
            }
            DeviceMechanism::Bpf => job.unified_path().is_some(),
        };
        if !present {
            println!("{mech:?}: not on this host");
            continue;
        }
        let r = f.cg.probe_devices(mech, &[gpu0], &[(195, 0), (195, 1)]).unwrap();
        println!("{mech:?} alone: 195:0 {:?}, 195:1 {:?}", r[0], r[1]);
        assert!(past_the_cgroup(r[0]), "{mech:?}: allowed node gave {:?}", r[0]);
        assert_eq!(r[1], Err(Errno::EPERM), "{mech:?}: denied node");
        tested.push(mech);
    }
    assert!(!tested.is_empty());
    if f.cg.mode() == Mode::Hybrid {
        assert_eq!(tested.len(), 2, "a hybrid host has both mechanisms");
    }

    // The built-in probe agrees.
    let probe = f.cg.probe_device_denial();
    println!("{probe}");
    assert!(probe.enforced());
    for (outcome, mech) in [
        (&probe.v1, DeviceMechanism::V1),
        (&probe.bpf, DeviceMechanism::Bpf),
    ] {
        if tested.contains(&mech) {
            assert_eq!(outcome, &ProbeOutcome::Denies, "{mech:?}");
        } else {
            assert!(
                matches!(outcome, ProbeOutcome::Unavailable(_)),
                "{mech:?}: {outcome:?}"
            );
        }
    }
}

#[test]
fn sweep_adopt_and_recreate() {
    let Some(mut f) = Fixture::new("sweep") else {
        return;
    };
    let stale = f.create(7, &Limits::default());
    let kept = f.create(8, &Limits::default());
    let mut a = spawn_in(&stale, "sleep 300", Stdio::null());
    let mut b = spawn_in(&kept, "sleep 300", Stdio::null());
    assert!(wait_until(Duration::from_secs(2), || kept
        .pids()
        .unwrap()
        .contains(&(b.id() as i32))));

    // add_pid: a process started outside moves in.
    let mut c = Command::new("sleep").arg("300").spawn().unwrap();
    kept.add_pid(c.id() as i32).unwrap();
    assert!(kept.pids().unwrap().contains(&(c.id() as i32)));

    // As after a restart: only job 8 still runs.
    let report = f.cg.sweep_stale(&|id| id == 8);
    assert_eq!(report.removed, [7]);
    assert_eq!(report.kept, [8]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(a.wait().unwrap().signal(), Some(9));
    assert!(f.cg.open_existing(7).is_none());
    let adopted = f.cg.open_existing(8).expect("job 8 cgroup");
    assert_eq!(adopted.paths(), kept.paths());
    assert!(adopted.is_populated().unwrap());

    // Creating a job whose cgroup is left over kills what runs there and starts afresh.
    let again = f.create(8, &Limits::default());
    assert_eq!(b.wait().unwrap().signal(), Some(9));
    assert_eq!(c.wait().unwrap().signal(), Some(9));
    assert!(!again.is_populated().unwrap());
    again.remove().unwrap();
    assert!(f.cg.open_existing(8).is_none());
}

/// The host's mountinfo with only its cgroup v1 mounts (`v2` false) or only its cgroup2
/// mount: the driver as it is on a v1-only host or on a v2 host.
fn mountinfo_only(v2: bool) -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let drop = if v2 { " - cgroup " } else { " - cgroup2 " };
    text.lines()
        .filter(|l| !l.contains(drop))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn driver_with_only(v2: bool) -> impl FnOnce(&str) -> Cgroups {
    move |base| {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        Cgroups::detect_from(base, &mountinfo_only(v2), &own)
    }
}

/// Whether the host mounts any cgroup v1 (`v2` false) or cgroup2 hierarchy. One that
/// does not (a pure v2 or pure v1 host) cannot play the other kind: that test does not
/// apply there, which is not a missing prerequisite.
fn host_has(v2: bool) -> bool {
    let want = if v2 { " - cgroup2 " } else { " - cgroup " };
    let applies = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(want);
    if !applies {
        println!(
            "not applicable: this host mounts no {} hierarchy",
            if v2 { "cgroup2" } else { "cgroup v1" }
        );
    }
    applies
}

#[test]
fn v1_only_driver_freezer_kill_and_devices() {
    if is_root() && !host_has(false) {
        return;
    }
    let Some(mut f) = Fixture::with("v1", driver_with_only(false)) else {
        return;
    };
    assert_eq!(f.cg.mode(), Mode::V1, "{}", f.cg.describe());
    let caps = f.cg.capabilities();
    assert!(
        f.cg.describe().contains("kill via freezer") || !caps.freeze,
        "{}",
        f.cg.describe()
    );
    let job = f.create(11, &Limits::default());
    assert!(job.unified_path().is_none());
    assert_kill_leaves_nothing(&job);

    if caps.devices {
        let (_dir, _job) = assert_gpu_rules(&mut f, 12);
        let probe = f.cg.probe_device_denial();
        println!("{probe}");
        assert_eq!(probe.v1, ProbeOutcome::Denies);
        assert!(matches!(probe.bpf, ProbeOutcome::Unavailable(_)), "{probe}");
    }
    if caps.cpu {
        // cpuacct time of a short busy loop.
        let job = f.create(
            13,
            &Limits {
                cpus: Some(1.0),
                ..Limits::default()
            },
        );
        let mut child = spawn_in(
            &job,
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
            Stdio::null(),
        );
        assert!(child.wait().unwrap().success());
        let used = job.stats().unwrap().cpu_usage_ms;
        assert!(used.is_some_and(|ms| ms > 0), "{used:?}");
    }
}

#[test]
fn v2_only_driver_bpf_devices_and_kill_without_cgroup_kill() {
    if is_root() && !host_has(true) {
        return;
    }
    let Some(mut f) = Fixture::with("v2", driver_with_only(true)) else {
        return;
    };
    assert_eq!(f.cg.mode(), Mode::V2, "{}", f.cg.describe());
    let caps = f.cg.capabilities();
    assert!(caps.kill && caps.devices, "{}", f.cg.describe());
    if !caps.memory {
        // A unified mount without controllers (a hybrid host's): the limit is refused, not dropped.
        let e =
            f.cg.create(
                21,
                &Limits {
                    memory_bytes: Some(1 << 30),
                    ..Limits::default()
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot enforce a memory limit here"),
            "{e}"
        );
        assert!(f.cg.open_existing(21).is_none());
    }

    // BPF device filter alone.
    let (dir, job) = assert_gpu_rules(&mut f, 22);
    assert_eq!(
        open_in(&job, &mknod(dir.path(), 1, 5)),
        Ok(()),
        "/dev/zero is in the default set"
    );

    // Kill by freezing and signalling, as on kernels before cgroup.kill (5.14).
    f.cg.use_cgroup_kill(false);
    assert!(
        f.cg.describe().contains("kill via freezer"),
        "{}",
        f.cg.describe()
    );
    let job = f.create(23, &Limits::default());
    assert_kill_leaves_nothing(&job);
}

/// As a user without a delegated cgroup, detection gives a driver that says why it
/// cannot work; it neither panics nor fails.
#[test]
fn unprivileged_detect_says_why() {
    if std::env::var_os("CYB_CGROUP_UNPRIVILEGED_CHILD").is_some() {
        // The child, as an unprivileged user: must not panic, must say why.
        let cg = Cgroups::detect("cybd-test-unprivileged");
        println!("MODE={:?}", cg.mode());
        println!("DESCRIBE={}", cg.describe());
        return;
    }
    if !require(is_root(), "root (to run a child as another user)") {
        return;
    }
    let (uid, gid) = cyb_tests::test_user();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unprivileged_detect_says_why",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CYB_CGROUP_UNPRIVILEGED_CHILD", "1")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let describe = text
        .lines()
        .find_map(|l| l.strip_prefix("DESCRIBE="))
        .expect("DESCRIBE line");
    if text.contains("MODE=None") {
        assert!(describe.starts_with("cgroups not used: "), "{describe}");
        assert!(
            describe.contains("ermission denied") || describe.contains("Read-only"),
            "{describe}"
        );
    } else {
        // A user with a delegated cgroup of its own (systemd user session).
        println!("the test user has usable cgroups: {describe}");
    }
}

/// An ended job's memory cgroup serves the next job with the same limit: renamed to a
/// spare, then to the next job's name (the same kernfs node, so the same inode), with its
/// peak reset and its earlier OOM kill not counted again. Root's jobs (not reusable) and
/// jobs with another limit get a new one.
#[test]
fn memory_cgroup_of_an_ended_job_serves_the_next_one() {
    let Some(mut f) = Fixture::new("spare") else {
        return;
    };
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        ..Limits::default()
    };
    f.cg.set_spare_capacity(4);
    let first = f.cg.create_for(41, 1, &limits, true).expect("create job 41");
    f.jobs.push(first.clone());
    let Some(mem) = first.v1_path("memory").map(Path::to_path_buf) else {
        require(false, "a v1 memory hierarchy (only those cgroups are reused)");
        return;
    };
    let base = mem.parent().unwrap().to_path_buf();
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let first_ino = ino(&mem);
    // Over its limit: the OOM killer ends it, at a peak near the limit.
    let status = spawn_in(
        &first,
        "dd if=/dev/zero of=/dev/null bs=200M count=1",
        Stdio::null(),
    )
    .wait()
    .unwrap();
    assert!(
        status.signal() == Some(9) || status.code() == Some(137),
        "{status:?}"
    );
    first.kill().unwrap();
    let st = first.stats().unwrap();
    assert!(st.oom_killed, "{st:?}");
    assert!(st.peak_memory_bytes.unwrap() > 16 << 20, "{st:?}");
    let mut first = first;
    let spare = first.park().expect("an empty memory cgroup is kept");
    first.remove().unwrap();
    assert!(!mem.exists(), "job 41's memory cgroup keeps its name");
    assert!(base.join("spare_41_1").is_dir());
    assert_eq!(f.cg.keep_spare(spare), None, "the pool has room");

    // Root's job, and a job with another limit: new cgroups, the spare stays.
    for (id, lim, reusable) in [(42, limits.clone(), false), (43, Limits::default(), true)] {
        let job = f.cg.create_for(id, 1, &lim, reusable).expect("create");
        f.jobs.push(job.clone());
        assert_ne!(ino(job.v1_path("memory").unwrap()), first_ino);
        let mut job = job;
        if !reusable {
            assert_eq!(job.park(), None, "root's job left its memory cgroup for another");
        }
        job.kill().unwrap();
        job.remove().unwrap();
    }
    assert!(base.join("spare_41_1").is_dir());
    assert_eq!(f.cg.spare_count(), 1);

    // The next job with that limit gets it: empty, its peak its own, no OOM kill of its own.
    // (It is taken only once what job 41 left is uncharged, down to the per-CPU charge batch.)
    let cpus = std::fs::read_dir("/sys/devices/system/cpu")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.strip_prefix("cpu").is_some_and(|d| d.parse::<u32>().is_ok()))
        })
        .count() as u64;
    let usage = || keyed_num(&base.join("spare_41_1/memory.usage_in_bytes"));
    assert!(
        wait_until(Duration::from_secs(5), || usage() <= 64 * 4096 * cpus),
        "job 41's memory cgroup still holds {} bytes",
        usage()
    );
    let next = f.cg.create_for(44, 2, &limits, true).expect("create job 44");
    f.jobs.push(next.clone());
    assert_eq!(ino(next.v1_path("memory").unwrap()), first_ino, "not the spare");
    assert!(!base.join("spare_41_1").exists());
    assert_eq!(f.cg.spare_count(), 0);
    let limit =
        std::fs::read_to_string(next.v1_path("memory").unwrap().join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    assert!(spawn_in(&next, "true", Stdio::null()).wait().unwrap().success());
    next.kill().unwrap();
    let st = next.stats().unwrap();
    assert!(!st.oom_killed, "job 41's OOM kill counted for job 44: {st:?}");
    assert!(st.peak_memory_bytes.unwrap() < 4 << 20, "peak not reset: {st:?}");
    let mut next = next;
    let spare = next.park().expect("kept again");
    next.remove().unwrap();
    assert!(base.join("spare_44_2").is_dir());
    assert_eq!(f.cg.keep_spare(spare), None);
    // A new daemon starts without a pool: its sweep removes the spares.
    f.cg.sweep_stale(&|_| false);
    assert!(!base.join("spare_44_2").exists());
}

fn keyed_num(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(u64::MAX)
}

/// On a hybrid host the routing chosen at detection holds for every job: limits in the v1
/// controllers, tracking, kill, freeze and the device filter in the unified cgroup, and a
/// job's cgroup made only where its routing sends something (no v1 freezer, cpuacct or
/// devices directory beside a unified one that does their work).
#[test]
fn hybrid_routing_is_decided_once_and_followed() {
    let Some(mut f) = Fixture::new("routing") else {
        return;
    };
    if f.cg.mode() != Mode::Hybrid {
        cyb_tests::skip(&format!("not a hybrid host ({})", f.cg.describe()));
        return;
    }
    let r = f.cg.routing();
    println!("{r}");
    assert_eq!(r.tracking, Via::V2, "{r}");
    assert_eq!(r.cpu_usage, Via::V2, "{r}");
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        ..Limits::default()
    };
    let job = f.create(31, &limits);
    assert!(job.unified_path().is_some());
    if r.memory == Via::V1 {
        let m = job.v1_path("memory").expect("a v1 memory cgroup");
        let text = std::fs::read_to_string(m.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(text.trim(), (256u64 << 20).to_string());
    }
    for (ctrl, via) in [("freezer", r.freeze), ("devices", r.devices)] {
        if via == Via::V2 {
            assert!(job.v1_path(ctrl).is_none(), "a v1 {ctrl} cgroup made for nothing");
        }
    }
    assert!(job.v1_path("cpuacct").is_none(), "cpu time comes from cpu.stat");
    if r.freeze == Via::V2 {
        let mut child = spawn_in(&job, "sleep 30", Stdio::null());
        job.set_frozen(true).unwrap();
        let events = job.unified_path().unwrap().join("cgroup.events");
        assert_eq!(keyed(&events, "frozen"), Some(1));
        job.set_frozen(false).unwrap();
        job.kill().unwrap();
        assert!(child.wait().unwrap().signal() == Some(9));
    }
    assert_kill_leaves_nothing(&job);
}
