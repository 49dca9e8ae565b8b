//! Test harness: starts real `cybd` processes (or the daemon inside the test process,
//! [`Daemon::in_process`]) on temporary directories with a [`TestConfig`], drops real job
//! files, runs the real `cybctl` binary, and can kill -9 and restart the daemon.
//!
//! Prerequisites that a host may lack (root, a cgroup controller, Docker...) go through
//! [`require`]: without them a test prints why it skips, unless `CYB_TEST_STRICT=1`, where
//! the skip is a failure. A skip is printed as `SKIPPED <test>: <why>` on the real stderr,
//! past libtest's capture, so `cargo test` shows it and `.ci/run` counts it.

pub mod config;
pub mod docker;
pub mod inproc;
pub mod powerfs;

pub use config::TestConfig;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether skips are failures (`CYB_TEST_STRICT=1`, as in CI).
pub fn strict() -> bool {
    std::env::var("CYB_TEST_STRICT").is_ok_and(|v| v == "1")
}

/// Returns true when `ok`; otherwise prints why the test skips and returns false, or panics
/// under `CYB_TEST_STRICT=1`.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if strict() {
        panic!("CYB_TEST_STRICT=1 and this test needs {what}");
    }
    skip(&format!("needs {what}"));
    false
}

/// Reports that the calling test does not apply here (`why`), as [`require`] reports a
/// missing prerequisite, but never fails, strict or not: for checks that only mean
/// something on some hosts (a hybrid cgroup layout, say). The caller then returns.
///
/// The line goes to the process's stderr through `std::io::Write`: libtest captures what
/// a passing test prints with `print!`/`eprint!`, so `eprintln!` would show a skip only
/// with `--nocapture`. libtest names each test's thread after the test.
pub fn skip(why: &str) {
    use std::io::Write as _;
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_string)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "a test".into());
    let line = format!("SKIPPED {test}: {why}\n");
    // Nowhere else to report a failed write to stderr.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a test script, prints its output, and asserts it succeeded and said `done_marker`.
pub fn run_script(cmd: &mut Command, what: &str, done_marker: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
    assert!(
        text.contains(done_marker),
        "{what} did not say {done_marker:?}:\n{text}"
    );
}

/// Builds the .deb and .rpm with packaging/build.sh in the workspace's own target
/// directory (the parent of [`bin_dir`], so a `CARGO_TARGET_DIR` is honoured) and returns
/// that directory and the .deb's path. Its release build is the one `cargo build --release`
/// makes: warm, build.sh takes some 20 s (packing and compressing); from nothing it adds
/// one release build (8 min on this project's 2-core VM). It does not wait on the lock of
/// the `cargo test` running it: that one holds `target/debug`, this one `target/release`.
pub fn build_packages() -> (PathBuf, PathBuf) {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| top.join("target"));
    let out = Command::new("bash")
        .arg(top.join("packaging/build.sh"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap_or_else(|e| panic!("cannot run packaging/build.sh: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "packaging/build.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // build.sh prints the .deb's path, then the .rpm's.
    let deb = stdout
        .lines()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("packaging/build.sh printed no .deb path: {stdout}"));
    (target, PathBuf::from(deb))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The directory holding the workspace's built binaries (target/<profile>/).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CYB_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (or cargo test --workspace)",
        p.display()
    );
    p
}

/// A user for tests that run jobs as someone other than root; created when missing.
pub const TEST_USER: &str = "cybtest";

/// For a test that needs root and the unprivileged test user: the user's (uid, gid), or
/// `None` (the skip reported by [`require`]) when not root.
pub fn root_and_test_user() -> Option<(u32, u32)> {
    require(is_root(), "root").then(test_user)
}

/// Held (shared) by every process that uses [`TEST_USER`], so that the last one to exit
/// can tell it is the last.
const TEST_USER_LOCK: &str = "/run/cyb-tests-user.lock";
/// Exists while [`TEST_USER`] is one that a test run created (and so must remove).
const TEST_USER_CREATED: &str = "/run/cyb-tests-user.created";

/// Creates [`TEST_USER`] if needed (root only) and returns its uid and gid.
///
/// A user the tests create is removed again (`userdel --remove`) when the last process
/// using it exits: each such process holds a shared `flock` on [`TEST_USER_LOCK`] for its
/// lifetime, and at exit the one that can turn its lock exclusive removes the user if
/// [`TEST_USER_CREATED`] says a test run made it. A user that was there before is kept.
/// Test binaries run one after another, so a `cargo test` run makes and removes it
/// about once per binary (useradd and userdel take some 50 ms each).
pub fn test_user() -> (u32, u32) {
    static HOLD: std::sync::Once = std::sync::Once::new();
    HOLD.call_once(hold_test_user);
    if nix::unistd::User::from_name(TEST_USER).ok().flatten().is_none() {
        let st = Command::new("useradd")
            .args(["--create-home", "--user-group", "--shell", "/bin/sh", TEST_USER])
            .status()
            .expect("useradd");
        // Another test may have created it at the same moment.
        assert!(
            st.success() || nix::unistd::User::from_name(TEST_USER).ok().flatten().is_some(),
            "useradd {TEST_USER} failed"
        );
        if st.success()
            && let Err(e) = std::fs::write(TEST_USER_CREATED, TEST_USER)
        {
            eprintln!("cannot write {TEST_USER_CREATED} ({e}): user {TEST_USER} will be left behind");
        }
    }
    let u = nix::unistd::User::from_name(TEST_USER).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// The descriptor of [`TEST_USER_LOCK`] this process holds shared, for the exit handler.
static TEST_USER_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Takes the shared lock and registers [`remove_test_user_at_exit`].
fn hold_test_user() {
    use std::os::fd::IntoRawFd as _;
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(TEST_USER_LOCK)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot open {TEST_USER_LOCK} ({e}): user {TEST_USER} will not be removed");
            return;
        }
    };
    let fd = file.into_raw_fd();
    // SAFETY: flock on a descriptor this process owns (kept open until exit on purpose).
    if unsafe { libc::flock(fd, libc::LOCK_SH) } != 0 {
        eprintln!("cannot lock {TEST_USER_LOCK}: user {TEST_USER} will not be removed");
        return;
    }
    TEST_USER_FD.store(fd, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: registers a plain `extern "C" fn()` that takes no arguments.
    unsafe { libc::atexit(remove_test_user_at_exit) };
}

/// At exit: if no other process holds [`TEST_USER_LOCK`] and a test run created
/// [`TEST_USER`], removes the user, its group and its home.
extern "C" fn remove_test_user_at_exit() {
    let fd = TEST_USER_FD.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: flock on the descriptor hold_test_user opened; turning a shared lock
    // exclusive without waiting fails while another process holds it.
    if fd < 0 || unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return;
    }
    if !Path::new(TEST_USER_CREATED).exists() {
        return;
    }
    let removed = Command::new("userdel")
        .args(["--remove", TEST_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if removed || nix::unistd::User::from_name(TEST_USER).ok().flatten().is_none() {
        let _ = std::fs::remove_file(TEST_USER_CREATED);
    } else {
        // Its processes still run (a job a test left): the next run removes it.
        eprintln!("cannot remove the test user {TEST_USER} yet: userdel failed");
    }
}

/// Runs `f` on a thread of its own whose effective ids are `uid:gid` (needs root), so the
/// sockets it connects carry those credentials (SO_PEERCRED) while the rest of the process
/// stays root. The thread switches with the raw system calls: libc's wrappers would switch
/// every thread of the process.
pub fn as_user<T: Send + 'static>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    std::thread::spawn(move || -> std::io::Result<T> {
        let keep = libc::uid_t::MAX; // -1: leave that id as it is
        // SAFETY: setresgid/setresuid of this thread only; the real and saved ids stay 0,
        // so switching back is allowed.
        let set = |nr: libc::c_long, e: u32| unsafe { libc::syscall(nr, keep, e, keep) };
        if set(libc::SYS_setresgid, gid) != 0 || set(libc::SYS_setresuid, uid) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let v = f();
        if set(libc::SYS_setresuid, 0) != 0 || set(libc::SYS_setresgid, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(v)
    })
    .join()
    .map_err(|_| std::io::Error::other("the thread running as another user panicked"))?
}

thread_local! {
    /// `--log-target` for daemons this thread starts (see [`Daemon::logging_to`]).
    static LOG_TARGET: std::cell::Cell<&'static str> = const { std::cell::Cell::new("stderr") };
}

/// A daemon with its own spool, logs and socket under a temporary directory, and its
/// runtime directory on a tmpfs (`/dev/shm`) where there is one, as `/run/cyb` is on a
/// systemd host: a `cybd` process, or (started with [`Daemon::in_process`]) the daemon
/// running inside the test process ([`inproc`]). Either way it is reached through the
/// real `cybctl` and seen through its files.
pub struct Daemon {
    pub root: tempfile::TempDir,
    /// Where `spool/` and `logs/` are: `root`, unless started with [`Daemon::start_on`].
    pub data: PathBuf,
    pub runtime: tempfile::TempDir,
    pub config: PathBuf,
    /// `--log-target` of the daemon: stderr (into daemon.log) unless a test wants journald.
    pub log_target: &'static str,
    /// Whether the daemon runs inside this process rather than as a `cybd` process.
    in_process: bool,
    running: Option<Running>,
    /// File systems mounted under the data directory for this daemon, unmounted on drop.
    mounts: Vec<PathBuf>,
}

enum Running {
    Process(Child),
    InProcess(inproc::InProc),
}

impl Daemon {
    /// Runs `start` with daemons logging to `target` (journald, stderr, auto).
    pub fn logging_to(target: &'static str, start: impl FnOnce() -> Daemon) -> Daemon {
        let old = LOG_TARGET.with(|t| t.replace(target));
        let d = start();
        LOG_TARGET.with(|t| t.set(old));
        d
    }

    /// A `cybd` process with the harness's configuration ([`TestConfig::new`]).
    pub fn start() -> Daemon {
        Self::start_with(TestConfig::new())
    }

    /// A `cybd` process with the configuration `cfg`.
    pub fn start_with(cfg: impl Into<TestConfig>) -> Daemon {
        Self::start_full(cfg.into(), None, |_| {}, false)
    }

    /// The daemon run inside this test process ([`cybd::run_until`], see [`inproc`]) with
    /// the configuration `cfg`: for tests of what the daemon decides (scheduling order,
    /// slots, dependencies, retries, hold and release) rather than of the process.
    /// [`pid`](Self::pid) is `None`; [`kill9`](Self::kill9) drops it mid-flight.
    pub fn in_process(cfg: impl Into<TestConfig>) -> Daemon {
        Self::start_full(cfg.into(), None, |_| {}, true)
    }

    /// Like [`start_with`](Self::start_with), but runs `prepare` on the daemon before it
    /// starts (to mount a small file system on `spool/jobs`, say; see
    /// [`Daemon::mount_tmpfs`]).
    pub fn start_prepared(cfg: impl Into<TestConfig>, prepare: impl FnOnce(&mut Daemon)) -> Daemon {
        Self::start_full(cfg.into(), None, prepare, false)
    }

    /// A daemon whose spool and logs are under `data` (another file system, such as a
    /// [`powerfs`] mount), with its config, socket and log in a temporary directory.
    pub fn start_on(data: &Path, cfg: impl Into<TestConfig>) -> Daemon {
        Self::start_full(cfg.into(), Some(data.to_path_buf()), |_| {}, false)
    }

    fn start_full(
        cfg: TestConfig,
        data: Option<PathBuf>,
        prepare: impl FnOnce(&mut Daemon),
        in_process: bool,
    ) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("cybd-test-")
            .tempdir()
            .expect("tempdir");
        // Others must reach the spool and logs (jobs run as the test user).
        std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let r = root.path();
        let data = data.unwrap_or_else(|| r.to_path_buf());
        let shm = Path::new("/dev/shm");
        let runtime = tempfile::Builder::new()
            .prefix("cybd-test-run-")
            .tempdir_in(if shm.is_dir() { shm } else { r })
            .expect("runtime tempdir");
        let config = r.join("cybd.toml");
        let mut cfg = cfg.paths(
            &data.join("spool"),
            &data.join("logs"),
            &r.join("cybd.sock"),
            runtime.path(),
        );
        // Daemons of concurrent tests must not share (or sweep) each other's job cgroups.
        if !cfg.has_cgroup_name() {
            cfg = cfg.cgroup_name(&cgroup_name_for(r));
        }
        std::fs::write(&config, cfg.to_toml()).unwrap();
        let mut d = Daemon {
            root,
            data,
            runtime,
            config,
            log_target: LOG_TARGET.with(|t| t.get()),
            in_process,
            running: None,
            mounts: Vec::new(),
        };
        prepare(&mut d);
        d.spawn();
        d
    }

    /// Mounts a tmpfs of `size` (mount's syntax: `2m`) on `rel` under the daemon's data
    /// directory (created first), unmounted when the daemon is dropped. Root only.
    pub fn mount_tmpfs(&mut self, rel: &str, size: &str) -> PathBuf {
        let dir = self.data.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "cyb-test"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {} failed", dir.display());
        self.mounts.push(dir.clone());
        dir
    }

    /// The name of this daemon's cgroup subtree (`[cgroups] name`): job N's cgroup is a
    /// directory `job_N` in a directory of this name, in each hierarchy.
    pub fn cgroup_name(&self) -> String {
        cgroup_name_for(self.root.path())
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }
    pub fn socket(&self) -> PathBuf {
        self.path().join("cybd.sock")
    }
    pub fn incoming(&self) -> PathBuf {
        self.data.join("spool/incoming")
    }
    pub fn rejected(&self) -> PathBuf {
        self.data.join("spool/rejected")
    }
    pub fn jobs_dir(&self) -> PathBuf {
        self.data.join("spool/jobs")
    }
    pub fn run_dir(&self, id: u64) -> PathBuf {
        self.data.join(format!("logs/run_{id}"))
    }
    /// `[paths] runtime`.
    pub fn runtime_dir(&self) -> &Path {
        self.runtime.path()
    }
    /// Which supervisor runs job `id` (written by the daemon; JSON with `pid`).
    pub fn supervisor_file(&self, id: u64) -> PathBuf {
        self.runtime_dir().join(format!("supervisors/{id}.json"))
    }
    /// How job `id`'s supervisor ended (written by the supervisor).
    pub fn exit_file(&self, id: u64) -> PathBuf {
        self.runtime_dir().join(format!("supervisors/{id}.exit.json"))
    }
    pub fn log_path(&self) -> PathBuf {
        self.path().join("daemon.log")
    }

    /// The daemon's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The `cybd` process's pid; `None` for a daemon in this process or one not running.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Some(Running::Process(c)) => Some(c.id()),
            _ => None,
        }
    }

    fn spawn(&mut self) {
        if self.in_process {
            let log = self.log_path();
            self.running = Some(Running::InProcess(inproc::InProc::start(
                &self.config,
                &log,
                bin("cybd"),
            )));
        } else {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .unwrap();
            let child = Command::new(bin("cybd"))
                .arg("--config")
                .arg(&self.config)
                .arg("--log-level")
                .arg("debug")
                .arg("--log-target")
                .arg(self.log_target)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn cybd");
            self.running = Some(Running::Process(child));
        }
        let sock = self.socket();
        // Ready means answering a call, not merely accepting: a socket of a daemon killed a
        // moment ago can accept for a few ms.
        let ok = wait_until(Duration::from_secs(20), || {
            if let Some(Running::InProcess(p)) = &self.running
                && p.finished()
            {
                return true;
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && Command::new(bin("cybctl"))
                    .arg("--socket")
                    .arg(&sock)
                    .arg("stats")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        if let Some(Running::InProcess(p)) = &self.running
            && p.finished()
        {
            let Some(Running::InProcess(p)) = self.running.take() else {
                unreachable!()
            };
            panic!(
                "the in-process daemon ended at start-up: {:?}; log:\n{}",
                p.stop(),
                self.log()
            );
        }
        assert!(
            ok,
            "cybd did not answer on {} within 20s; log:\n{}",
            sock.display(),
            self.log()
        );
    }

    /// Starts the daemon again on the same directories.
    pub fn restart(&mut self) {
        if self.running.is_some() {
            self.stop();
        }
        self.spawn();
    }

    /// kill -9 of the daemon (its supervisors and jobs live on); for a daemon in this
    /// process, [`InProc::abort`](inproc::InProc::abort).
    pub fn kill9(&mut self) {
        match self.running.take() {
            Some(Running::Process(mut c)) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(Running::InProcess(p)) => {
                let _ = p.abort();
            }
            None => {}
        }
    }

    /// SIGTERM and wait (for a daemon in this process: the same stop, by channel).
    pub fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Process(mut c)) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let _ = c.wait();
            }
            Some(Running::InProcess(p)) => {
                if let Err(e) = p.stop() {
                    panic!("the in-process daemon failed: {e:#}; log:\n{}", self.log());
                }
            }
            None => {}
        }
    }

    /// Has the daemon read its configuration file again (SIGHUP).
    pub fn reload(&self) {
        match &self.running {
            Some(Running::Process(c)) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
            }
            Some(Running::InProcess(p)) => p.reload(),
            None => {}
        }
    }

    /// Runs cybctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_cmd(args).output().expect("run cybctl")
    }

    /// A cybctl command against this daemon, to adjust (user, stdin...) before running.
    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("cybctl"));
        c.arg("--socket").arg(self.socket()).args(args);
        c
    }

    /// Runs cybctl, asserts success, and returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "cybctl {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `cybctl --json ARGS` and parses its output.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("cybctl {a:?} printed non-JSON ({e}): {out}"))
    }

    /// Submits `-- argv...` (plus options before `--`) and returns the job id.
    /// Writes `spec` as job file `dir/name` and submits it with `cybctl submit -f`;
    /// returns the id.
    pub fn submit_file(&self, dir: &Path, name: &str, spec: &Value) -> u64 {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        let v = self.ctl_json(&["submit", "-f", path.to_str().unwrap()]);
        v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
    }

    pub fn submit(&self, opts: &[&str], argv: &[&str]) -> u64 {
        let mut a = vec!["--json", "submit"];
        a.extend_from_slice(opts);
        a.push("--");
        a.extend_from_slice(argv);
        let out = self.ctl_ok(&a);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad submit output ({e}): {out}"));
        v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
    }

    /// Drops a job file the way a careful writer does: `.name.tmp`, then rename.
    pub fn drop_job(&self, name: &str, body: &str) -> PathBuf {
        let tmp = self.incoming().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        let dest = self.incoming().join(name);
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    /// Like [`drop_job`](Self::drop_job), but the file belongs to `uid:gid`.
    pub fn drop_job_as(&self, name: &str, body: &str, uid: u32, gid: u32) -> PathBuf {
        let tmp = self.incoming().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).unwrap();
        let dest = self.incoming().join(name);
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    /// `result.json` of job `id`, once it exists.
    pub fn result(&self, id: u64) -> Option<Value> {
        let text = std::fs::read_to_string(self.run_dir(id).join("result.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits for `result.json` of job `id`.
    pub fn wait_result(&self, id: u64, timeout: Duration) -> Value {
        let mut found = None;
        wait_until(timeout, || {
            found = self.result(id);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "job {id} has no result.json after {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// The `.error.json` written for a refused file, once it exists.
    pub fn wait_rejected(&self, name: &str, timeout: Duration) -> Value {
        let p = self.rejected().join(format!("{name}.error.json"));
        let ok = wait_until(timeout, || p.exists());
        assert!(
            ok,
            "{name} was not rejected within {timeout:?}; log:\n{}",
            self.log()
        );
        // The file is renamed into place, so it is complete once it exists.
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }

    /// The durable record of job `id` (the store's `jobs/<id>.json`).
    pub fn record(&self, id: u64) -> Value {
        let p = self.jobs_dir().join(format!("{id}.json"));
        let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}: {t}", p.display()))
    }

    /// The state in job `id`'s record, or "" while there is no readable record.
    pub fn job_state(&self, id: u64) -> String {
        let p = self.jobs_dir().join(format!("{id}.json"));
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["state"].as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Waits until job `id`'s record is in state `want`; returns the record.
    pub fn wait_state(&self, id: u64, want: &str, timeout: Duration) -> Value {
        let ok = wait_until(timeout, || self.job_state(id) == want);
        let rec = self.record(id);
        assert!(
            ok,
            "job {id} is not {want} after {timeout:?} but {}; record: {rec}\nlog:\n{}",
            rec["state"],
            self.log()
        );
        rec
    }

    /// Every job record in the store, by id.
    pub fn records(&self) -> Vec<Value> {
        let mut v: Vec<Value> = std::fs::read_dir(self.jobs_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
            .collect();
        v.sort_by_key(|r| r["id"].as_u64());
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        // The daemon's (now empty) cgroup subtree: removed so test runs leave nothing behind.
        remove_cgroup_dirs(&self.cgroup_name());
    }
}

/// Removes every directory named `name` under /sys/fs/cgroup, with the `job_*` directories
/// inside it (empty ones only: rmdir fails on a cgroup that still has processes).
fn remove_cgroup_dirs(name: &str) {
    fn walk(dir: &Path, depth: usize, name: &str) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if e.file_name() == name {
                if let Ok(jobs) = std::fs::read_dir(&p) {
                    for j in jobs.flatten() {
                        if j.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = std::fs::remove_dir(j.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&p);
            } else if depth > 0 {
                walk(&p, depth - 1, name);
            }
        }
    }
    walk(Path::new("/sys/fs/cgroup"), 4, name);
}

/// A character device node `major:minor` at `path` with permission bits `mode` (exactly:
/// the umask does not apply), for GPU-like test nodes.
pub fn mknod_char(path: &Path, major: u64, minor: u64, mode: u32) {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// Bytes as text, for assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit status and both streams of a command's run, for assertion messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs `flock -n -x FILE true`: whether an outside tool could take the lock right now.
pub fn outside_can_lock(path: &Path) -> bool {
    Command::new("flock")
        .args(["-n", "-x"])
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock")
        .success()
}

/// Whether process `pid` is gone (an exited process nobody reaped yet counts as gone).
pub fn gone(pid: i32) -> bool {
    if !alive(pid) {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The pids a job wrote into `path`, one a line, once there are `n` of them (30 s at most).
pub fn wait_pids(path: &Path, n: usize) -> Vec<i32> {
    let read = || -> Vec<i32> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let ok = wait_until(Duration::from_secs(30), || read().len() >= n);
    let pids = read();
    assert!(
        ok,
        "the job wrote {} of {n} pids to {}",
        pids.len(),
        path.display()
    );
    pids
}

/// Seconds since the epoch of an RFC 3339 time in a JSON value (result.json's times).
pub fn epoch(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {v}"))
}

/// A cgroup subtree name unique to the daemon rooted at `root`.
fn cgroup_name_for(root: &Path) -> String {
    let tail = root
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "")
        })
        .unwrap_or_default();
    format!("cyb-test-{tail}")
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the last value.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// A small deterministic PRNG (xorshift64*), seeded from the clock or `CYB_TEST_SEED`
/// (printed, so a failing run can be repeated).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::env::var("CYB_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("random seed: CYB_TEST_SEED={seed}");
        Rng(seed)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// Stops `child` as a terminal's Ctrl-C or `kill` would: SIGTERM, up to 10 s to exit, then
/// SIGKILL; returns what it printed (where piped).
pub fn terminate(mut child: Child) -> Output {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = wait_until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    });
    let _ = child.kill();
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for the stopped process: {e}"))
}
