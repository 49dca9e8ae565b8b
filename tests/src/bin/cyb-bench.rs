//! `cyb-bench`: measures a real `cybd` on this machine and, when they are installed, its
//! peers task-spooler (`tsp`) and pueue side by side, and prints the figures next to the
//! targets. It is not a test: it prints numbers, and fails only when a measurement cannot be
//! made.
//!
//! ```text
//! cargo build --release --workspace
//! CYB_BIN_DIR=target/release target/release/cyb-bench [--jobs 2000] [--slots 8] [--repeat 3]
//!     [--only spool,rpc,ctl,admission,submit,history,peers,docker] [--tmpdir DIR] [--json]
//! ```
//!
//! Run it as root (the harness's daemons run root-owned jobs, and `pause` is admin-only).
//! `cybd` and `cybctl` are copied to a private directory first, so a rebuild during the run
//! changes nothing. Every daemon (cybd, the tsp server, pueued) and temporary directory it
//! creates is removed at the end, on error, and on Ctrl-C.
//!
//! The machine is rarely ours alone: before each part it waits (`--wait-quiet`) for the CPUs
//! to be idle, and it reports how much CPU other processes used during each part, and how
//! much the hypervisor gave to other virtual machines (steal), so a disturbed figure can be
//! recognised. The file system under `--tmpdir` matters as much as
//! the CPU (cybd writes about ten small files per job and fsyncs every state change), so the
//! report starts with what creating a file costs there, with how many processes a bare
//! spawn loop starts per second, and with the floor of a supervisor process per job
//! ([`pair_floor`]): the ceilings of every job runner here, which drift with the neighbours.

use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use cyb_proto::rpc::{ListFilter, SubmitRequest};
use cyb_proto::{Class, CybClient, StateName};
use cyb_tests::{Daemon, TestConfig, bin, bin_dir, is_root};
use futures::StreamExt as _;
use serde_json::{Value, json};

#[path = "cyb-bench/abuse.rs"]
mod abuse;
#[path = "cyb-bench/docker.rs"]
mod docker;

// ---------------------------------------------------------------------------------------
// Targets

const TARGET_JOBS_PER_S: f64 = 800.0;
const TARGET_ADMISSION_P50_MS: f64 = 5.0;
const TARGET_SUBMIT_P99_RATIO: f64 = 1.2;
const TARGET_RSS_IDLE_MIB: f64 = 15.0;
const TARGET_RSS_QUEUED_MIB: f64 = 40.0;
const TARGET_RECOVERY_S: f64 = 2.0;
const TARGET_RSS_HISTORY_MIB: f64 = 64.0;

const TRIVIAL_JOB: &str = r#"{"command":["true"]}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// End-to-end throughput through the spool directory.
    Spool,
    /// End-to-end throughput through RPC submits on one connection.
    Rpc,
    /// End-to-end throughput with one `cybctl submit` process per job (like the peers' CLIs).
    Ctl,
    /// Admission latency: file renamed into incoming/ until the job process starts.
    Admission,
    /// Submit latency over RPC with an empty and a 10,000-job queue, and daemon RSS.
    Submit,
    /// task-spooler and pueue, same jobs and slots.
    Peers,
    /// Restart on many finished records: time to READY and RSS after recovery.
    History,
    /// Docker jobs against `docker run --rm` on the same engine: start latency and
    /// throughput (skipped, saying why, when no engine answers).
    Docker,
}

#[derive(Parser, Debug)]
#[command(
    name = "cyb-bench",
    about = "Benchmark of cybd (throughput, admission and submit latency, memory) against task-spooler and pueue"
)]
struct Opts {
    /// Trivial jobs (`true`) per throughput run.
    #[arg(long = "jobs", default_value_t = 2000)]
    jobs: usize,
    /// Parallel slots: cybd's `classes.cpu_short.slots`, `tsp -S`, `pueue parallel`.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Admission latency samples (one job at a time).
    #[arg(long, default_value_t = 200)]
    admission_samples: usize,
    /// Submit latency samples (one submit at a time), per queue size; the two sizes'
    /// samples alternate.
    #[arg(long, default_value_t = 3000)]
    submit_samples: usize,
    /// Finished job records on disk for the recovery (history) figures.
    #[arg(long, default_value_t = 100_000)]
    history: usize,
    /// Jobs queued (paused queue) for the loaded submit latency and RSS figures.
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// RPC submits in flight at once on the one connection (throughput and bulk queueing).
    #[arg(long, default_value_t = 256)]
    rpc_concurrency: usize,
    /// Docker start latency samples per `--repeat` (one `echo ready` container at a
    /// time), for cybd and for `docker run --rm` each.
    #[arg(long, default_value_t = 30)]
    docker_samples: usize,
    /// Trivial (`true`) containers per docker throughput run.
    #[arg(long, default_value_t = 200)]
    docker_jobs: usize,
    /// Runs of each throughput measurement (cybd and peers); the median is reported, with
    /// every run's figure beside it.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Parts to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spool,rpc,ctl,admission,submit,history,peers,docker"
    )]
    only: Vec<Part>,
    /// Run cybd's jobs without cgroups (`[cgroups] enabled = false`): what confinement
    /// costs, and the figure of the daemon alone.
    #[arg(long)]
    no_cgroups: bool,
    /// Print the figures as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the figures as JSON to FILE (with the table on stdout).
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Before each part, wait up to this many seconds for the machine to be quiet (less than
    /// 15% of the CPUs busy), then measure anyway.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    wait_quiet: u64,
    /// Directory for the daemons' temporary roots (default: $TMPDIR or /tmp). The file
    /// system matters: every job state change is fsynced.
    #[arg(long, value_name = "DIR")]
    tmpdir: Option<PathBuf>,
    /// Whose jobs the spool and RPC throughput runs submit: `user` (run as root: the
    /// harness's unprivileged test user, as on a shared host where root's daemon runs other
    /// people's jobs), or `self` (whoever runs the benchmark; root's jobs never get a reused
    /// memory cgroup).
    #[arg(long, value_enum, default_value = "user")]
    spool_owner: SpoolOwner,
    /// (uid, gid) the spool jobs' files are given, from `--spool-owner`.
    #[arg(skip)]
    job_owner: Option<(u32, u32)>,
    #[command(flatten)]
    abuse: abuse::AbuseOpts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SpoolOwner {
    User,
    #[value(name = "self")]
    Myself,
}

impl Opts {
    fn runs(&self, p: Part) -> bool {
        self.only.contains(&p)
    }
}

// ---------------------------------------------------------------------------------------
// Cleanup on Ctrl-C / SIGTERM: what the normal path undoes in Drop impls is also listed
// here, so a signal handler thread can undo it before exiting.

enum Undo {
    Kill(i32),
    RemoveDir(PathBuf),
    Run(Vec<String>, Vec<(String, String)>),
}

static UNDO: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
static UNDO_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where the measured binaries were built (they run from a private copy).
static BUILT_IN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// An entry of [`UNDO`], removed when dropped (the owner's Drop does the normal cleanup).
struct OnSignal(u64);

fn on_signal(u: Undo) -> OnSignal {
    let id = UNDO_SEQ.fetch_add(1, Ordering::Relaxed);
    UNDO.lock().unwrap_or_else(|e| e.into_inner()).push((id, u));
    OnSignal(id)
}

impl Drop for OnSignal {
    fn drop(&mut self) {
        UNDO.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != self.0);
    }
}

fn install_signal_cleanup() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut sigs = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(sig) = sigs.forever().next() {
            eprintln!("\ncyb-bench: signal {sig}: stopping daemons and removing temporary directories");
            let undo = std::mem::take(&mut *UNDO.lock().unwrap_or_else(|e| e.into_inner()));
            // Newest first: processes are registered after the directories they live in.
            for (_, u) in undo.into_iter().rev() {
                match u {
                    Undo::Kill(pid) => {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    Undo::RemoveDir(d) => {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    Undo::Run(argv, env) => {
                        let _ = Command::new(&argv[0])
                            .args(&argv[1..])
                            .envs(env)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
            empty_trash();
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn realtime_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn parse_rfc3339_ns(v: &Value) -> anyhow::Result<i128> {
    let s = v.as_str().ok_or_else(|| anyhow!("not a timestamp: {v}"))?;
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("bad timestamp {s}"))?;
    Ok(t.unix_timestamp_nanos())
}

/// Nearest-rank percentile of `v` (sorted here), in the unit of the values.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// VmRSS or VmHWM (`field`) of `pid`, in MiB.
fn proc_mem_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad line {line}"))?
        .parse()?;
    Ok(kib / 1024.0)
}

/// CPU time (user + system) of daemon `pid` itself, and of its descendants (the launcher
/// it started, the supervisors the launcher forked and reaped, their jobs), in ms.
fn proc_cpu_ms(pid: u32) -> anyhow::Result<(f64, f64)> {
    let (own, mut children) = proc_times_ms(pid)?;
    // Children still running (the launcher) have not been waited for yet: count them here.
    // (Any of the daemon's threads may have started it.)
    let mut list = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        list += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        list.push(' ');
    }
    for child in list.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        if let Ok((a, b)) = proc_times_ms(child) {
            children += a + b;
        }
    }
    Ok((own, children))
}

/// CPU time (user + system) of `pid` itself and of its waited-for descendants, in ms.
fn proc_times_ms(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 14, "short /proc/{pid}/stat");
    // utime, stime, cutime, cstime: fields 14-17 of the line, 11-14 after the name.
    let field = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ms = |t: f64| t * 1000.0 / hz;
    Ok((ms(field(11) + field(12)), ms(field(13) + field(14))))
}

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// `tool --version`'s first line, for the report.
fn version_of(prog: &Path, arg: &str) -> String {
    Command::new(prog)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            let text = String::from_utf8_lossy(&text);
            // "Task Spooler v1.0.1 - a task queue system..." -> "Task Spooler v1.0.1"
            let first = text.lines().next().unwrap_or("");
            first.split(" - ").next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// When `path` was last modified (UTC, to the minute): when a binary was built.
fn built_at(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or_else(|| "unknown".into(), |s| format!("{}Z", &s[..16.min(s.len())]))
}

/// `git describe --always --dirty` of the workspace this benchmark was built from, now (the
/// binaries measured may be older: see [`built_at`]).
fn source_revision() -> String {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("git")
        .arg("-C")
        .arg(&ws)
        .args(["describe", "--always", "--dirty"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
}

/// File system type and source of the file system holding `dir` (from /proc/self/mounts).
fn fs_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some((_, fstype, source)) = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string(), f[0].to_string()))
        })
        .max_by_key(|(n, _, _)| *n)
    else {
        return "unknown".into();
    };
    // ext4 without a journal checks every candidate inode for a recent deletion when it
    // allocates one, which makes file creation slow after many deletes: worth saying.
    let journal = (fstype == "ext4")
        .then(|| {
            let dev = source.rsplit('/').next().unwrap_or("");
            std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")).ok()
        })
        .flatten()
        .map_or("", |t| {
            if t.trim() == "<none>" {
                ", no journal"
            } else {
                ", journaled"
            }
        });
    format!("{fstype}{journal} on {source}")
}

/// What creating a small file costs in the temp root right now, in µs per file: write a
/// temp file, rename it to a new name (as cybd's run-directory files are written), and the
/// same with an fdatasync before the rename. cybd creates about ten files
/// per job, so on a file system where this is slow, so is cybd.
fn fs_calibration(n: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::Builder::new().prefix("cyb-bench-fs-").tempdir()?;
    let _undo = on_signal(Undo::RemoveDir(dir.path().to_path_buf()));
    let body = [b'x'; 700];
    let mut per_op = [0.0; 2];
    for (k, sync) in [false, true].into_iter().enumerate() {
        let t = Instant::now();
        for i in 0..n {
            let tmp = dir.path().join(format!(".{k}-{i}.tmp"));
            let mut f = std::fs::File::create_new(&tmp)?;
            f.write_all(&body)?;
            if sync {
                f.sync_data()?;
            }
            drop(f);
            std::fs::rename(&tmp, dir.path().join(format!("{k}-{i}.json")))?;
        }
        per_op[k] = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    }
    // Nothing freed here: freeing inodes would slow the next file creations on the file
    // system the runs are about to measure (see `Drop for Cybd`).
    to_trash(&dir.keep());
    Ok((per_op[0], per_op[1]))
}

/// How fast this machine creates processes right now: a bare loop that starts `true` and
/// waits for it, one at a time, in processes per second (the issue's reference machine ran
/// about 3,000/s). Every trivial job costs at least one such process, so this bounds what
/// any job runner reaches here, and it drifts with the machine's neighbours.
fn spawn_calibration(n: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    for _ in 0..n {
        let st = Command::new("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run `true`")?;
        ensure!(st.success(), "`true` failed: {st}");
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The ceiling, on this machine right now, of any job runner that gives every job a
/// supervisor process of its own, in jobs per second: a parent forks a child per job (as
/// cybd's launcher forks a supervisor), the child starts `true` with `posix_spawn` and
/// waits for it (as the supervisor does), `slots` of them at once. It has no records, no
/// files, no cgroups and no daemon: what is left of a job runner once all of that is free.
fn pair_floor(n: usize, slots: usize) -> anyhow::Result<f64> {
    let argv: [*mut libc::c_char; 2] = [c"true".as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp: [*mut libc::c_char; 1] = [std::ptr::null_mut()];
    let mut running = std::collections::HashSet::new();
    let (mut started, mut done) = (0, 0);
    let t = Instant::now();
    while done < n {
        while running.len() < slots.max(1) && started < n {
            // SAFETY: the child only calls posix_spawnp, waitpid and _exit (no allocation,
            // no locks) on memory prepared before the fork, then ends.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let mut child: libc::pid_t = 0;
                // SAFETY: argv and envp are null-terminated arrays of C strings that outlive
                // the call; null file actions and attributes are allowed.
                let rc = unsafe {
                    libc::posix_spawnp(
                        &mut child,
                        c"true".as_ptr(),
                        std::ptr::null(),
                        std::ptr::null(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )
                };
                let mut st = 0;
                // SAFETY: waits for the process just spawned; `st` is a valid out pointer.
                let ok = rc == 0 && unsafe { libc::waitpid(child, &mut st, 0) } == child && st == 0;
                // SAFETY: ends the forked child at once, running nothing of the parent's.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            ensure!(pid > 0, "cannot fork: {}", std::io::Error::last_os_error());
            running.insert(pid);
            started += 1;
        }
        let mut st = 0;
        // SAFETY: `st` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut st, 0) };
        ensure!(pid > 0, "cannot wait: {}", std::io::Error::last_os_error());
        if running.remove(&pid) {
            ensure!(st == 0, "a supervisor-like child failed (wait status {st})");
            done += 1;
        }
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The bare spawn loop's rate on the machine the issue's targets were set on.
const REFERENCE_SPAWN_PER_S: f64 = 3000.0;

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Jiffies of all CPUs from /proc/stat: busy (steal included), total, and steal (time
/// the hypervisor gave this machine's virtual CPUs to other guests).
#[derive(Clone, Copy)]
struct Jiffies {
    busy: u64,
    total: u64,
    steal: u64,
}

fn cpu_jiffies() -> Jiffies {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Jiffies {
        busy: total.saturating_sub(idle),
        total,
        steal: v.get(7).copied().unwrap_or(0),
    }
}

/// CPU time (user + system) of this process and of the children it has waited for (the
/// daemons it started and stopped, CLI processes), in ms.
fn own_cpu_ms() -> f64 {
    let ms = |who| {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    ms(libc::RUSAGE_SELF) + ms(libc::RUSAGE_CHILDREN)
}

/// Measures how busy the machine was with other work during a part: all CPU time used on
/// the machine, minus this process's and its waited-for children's (the daemon under test,
/// its supervisors and jobs, the CLIs).
struct Window {
    jiffies: Jiffies,
    own_ms: f64,
}

impl Window {
    fn start() -> Window {
        Window {
            jiffies: cpu_jiffies(),
            own_ms: own_cpu_ms(),
        }
    }

    /// Share (0 to 1) of all CPUs used by other work since `start`. Call it after the part's
    /// daemons have been stopped and waited for.
    fn other_share(&self) -> f64 {
        let (b1, t1) = {
            let j = cpu_jiffies();
            (j.busy, j.total)
        };
        let (b0, t0) = (self.jiffies.busy, self.jiffies.total);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy_ms = (b1 - b0) as f64 * 1e3 / hz;
        let all_ms = (t1 - t0).max(1) as f64 * 1e3 / hz;
        ((busy_ms - (own_cpu_ms() - self.own_ms)) / all_ms).clamp(0.0, 1.0)
    }

    /// Share (0 to 1) of all CPU time since `start` that the hypervisor gave to other
    /// guests (steal): time in which no process here ran, though it wanted to.
    fn steal_share(&self) -> f64 {
        let j = cpu_jiffies();
        let steal = j.steal.saturating_sub(self.jiffies.steal) as f64;
        (steal / j.total.saturating_sub(self.jiffies.total).max(1) as f64).clamp(0.0, 1.0)
    }
}

/// Waits (up to `--wait-quiet`) until the CPUs are less than 15% busy over a second, and
/// returns the last busy fraction seen: other work on the machine distorts every figure.
async fn wait_quiet(o: &Opts) -> f64 {
    let end = Instant::now() + Duration::from_secs(o.wait_quiet);
    loop {
        let Jiffies {
            busy: b0, total: t0, ..
        } = cpu_jiffies();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Jiffies {
            busy: b1, total: t1, ..
        } = cpu_jiffies();
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy < 0.15 {
            return busy;
        }
        if Instant::now() >= end {
            progress(format!(
                "warning: the machine is {:.0}% busy with other work; measuring anyway",
                busy * 100.0
            ));
            return busy;
        }
        progress(format!(
            "waiting for the machine to be quiet ({:.0}% busy)...",
            busy * 100.0
        ));
    }
}

/// "other work 12%, steal 5%" (either may be unknown).
fn load_text(other: Option<f64>, steal: Option<f64>) -> String {
    let pct = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{:.0}%", v * 100.0));
    format!("other work {}, steal {}", pct(other), pct(steal))
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("cyb-bench: {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// cybd

/// A harness daemon, also registered for cleanup on a signal.
struct Cybd {
    d: Daemon,
    _undo: [OnSignal; 3],
}

impl Cybd {
    fn start(o: &Opts) -> Cybd {
        Cybd::start_with(o, "")
    }

    /// Like [`Cybd::start`], with `extra` TOML laid over the configuration.
    fn start_with(o: &Opts, extra: &str) -> Cybd {
        let mut cfg = TestConfig::new().class_slots(Class::CpuShort, o.slots);
        if o.no_cgroups {
            cfg = cfg.cgroups(false);
        }
        if !extra.is_empty() {
            cfg = cfg.toml(extra);
        }
        let d = Daemon::start_with(cfg);
        let dir = on_signal(Undo::RemoveDir(d.path().to_path_buf()));
        let run = on_signal(Undo::RemoveDir(d.runtime_dir().to_path_buf()));
        let pid = on_signal(Undo::Kill(d.pid().expect("cybd pid") as i32));
        Cybd {
            d,
            _undo: [dir, run, pid],
        }
    }

    fn pid(&self) -> u32 {
        self.d.pid().expect("cybd pid")
    }
}

impl Drop for Cybd {
    /// Stops the daemon with SIGTERM and waits for it, so its launcher, supervisors and jobs
    /// are reaped up the tree and their CPU time counts as the daemon's, not as other load.
    /// Its temporary root is moved to the trash, emptied when the benchmark ends: deleting
    /// thousands of run directories between runs would slow the next run's file creations
    /// on file systems that scan recently freed inodes (ext4 without a journal), which
    /// would measure this benchmark's clean-up rather than the daemon.
    fn drop(&mut self) {
        self.d.stop();
        to_trash(self.d.path());
    }
}

/// Moves `path` into the trash, emptied when the benchmark ends.
fn to_trash(path: &Path) {
    let trash = TRASH.get_or_init(|| {
        let t = std::env::temp_dir().join(format!("cyb-bench-trash-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&t);
        t
    });
    let n = UNDO_SEQ.fetch_add(1, Ordering::Relaxed);
    if std::fs::rename(path, trash.join(n.to_string())).is_err() {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Where finished daemons' temporary roots wait to be deleted (see `Drop for Cybd`).
static TRASH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Deletes the trash.
fn empty_trash() {
    if let Some(t) = TRASH.get() {
        let _ = std::fs::remove_dir_all(t);
    }
}

impl Cybd {
    fn log_tail(&self) -> String {
        let log = self.d.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

async fn connect(sock: &Path) -> anyhow::Result<CybClient> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .with_context(|| format!("cannot connect to {}", sock.display()))?;
    Ok(CybClient::new(
        tarpc::client::Config::default(),
        cyb_proto::rpc::transport(stream),
    )
    .spawn())
}

/// Like [`connect`], but as `owner` (uid, gid) when given: the daemon takes the peer
/// credentials of the thread that connects, so a thread of our own connects with those
/// effective ids ([`cyb_tests::as_user`]).
async fn connect_as(sock: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<CybClient> {
    let Some((uid, gid)) = owner else {
        return connect(sock).await;
    };
    let path = sock.to_path_buf();
    let std_stream = cyb_tests::as_user(uid, gid, move || std::os::unix::net::UnixStream::connect(&path))
        .with_context(|| format!("cannot switch to uid {uid}"))?
        .with_context(|| format!("cannot connect to {} as uid {uid}", sock.display()))?;
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream)?;
    Ok(CybClient::new(
        tarpc::client::Config::default(),
        cyb_proto::rpc::transport(stream),
    )
    .spawn())
}

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + timeout;
    c
}

fn trivial_request() -> SubmitRequest {
    SubmitRequest {
        spec_json: TRIVIAL_JOB.into(),
        default_cwd: None,
    }
}

/// Waits until jobs 1..=n of a fresh daemon have all ended (the daemon's own counts, asked
/// over RPC every 10 ms) and each has its result.json; returns when the last result.json
/// was seen. Fails if any job did not succeed.
async fn wait_all_done(c: &Cybd, client: &CybClient, n: usize) -> anyhow::Result<Instant> {
    let timeout = Duration::from_secs(60) + Duration::from_millis(50 * n as u64);
    let end = Instant::now() + timeout;
    loop {
        let st = client.stats(ctx(Duration::from_secs(30))).await?;
        let count = |s: StateName| st.counts.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n);
        let ended: usize = StateName::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| count(*s))
            .sum();
        if ended >= n {
            ensure!(
                count(StateName::Succeeded) >= n,
                "not every job succeeded: {:?}\n{}",
                st.counts,
                c.log_tail()
            );
            break;
        }
        ensure!(
            Instant::now() < end,
            "only {ended} of {n} jobs ended within {timeout:?} (counts {:?}; rejected files: {}); log tail:\n{}",
            st.counts,
            std::fs::read_dir(c.d.rejected()).map_or(0, |r| r.count()),
            c.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut missing: Vec<u64> = (1..=n as u64).collect();
    loop {
        missing.retain(|id| !c.d.run_dir(*id).join("result.json").exists());
        if missing.is_empty() {
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < end,
            "{} jobs have no result.json (first: {})",
            missing.len(),
            missing[0]
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One end-to-end throughput run.
#[derive(Clone, Debug)]
struct Throughput {
    n: usize,
    /// First submission to last submission accepted (files renamed, RPC acknowledged,
    /// CLI returned).
    enqueue: Duration,
    /// First submission to the last job's end (result.json / the tool's own wait).
    total: Duration,
    /// Peak RSS of the daemon during the run, when known.
    peak_rss_mib: Option<f64>,
    /// CPU time of the daemon itself and of its reaped descendants (supervisors, jobs), ms.
    cpu_ms: Option<(f64, f64)>,
    /// Share of all CPUs used by other work on the machine during the run, when known.
    other_load: Option<f64>,
    /// Share of all CPU time the hypervisor gave to other guests during the run (steal).
    steal: Option<f64>,
    /// jobs/s of every run of this measurement, in order (see `--repeat`).
    runs: Vec<f64>,
}

impl Throughput {
    fn jobs_per_s(&self) -> f64 {
        self.n as f64 / self.total.as_secs_f64()
    }
    fn enqueue_per_s(&self) -> f64 {
        self.n as f64 / self.enqueue.as_secs_f64()
    }
    fn json(&self) -> Value {
        json!({
            "jobs": self.n,
            "enqueue_s": self.enqueue.as_secs_f64(),
            "enqueue_per_s": self.enqueue_per_s(),
            "total_s": self.total.as_secs_f64(),
            "jobs_per_s": self.jobs_per_s(),
            "peak_rss_mib": self.peak_rss_mib,
            "other_load": self.other_load,
            "steal": self.steal,
            "runs_jobs_per_s": self.runs,
            "cpu_ms_per_job": self.cpu_ms.map(|(own, children)| json!({
                "daemon": own / self.n as f64,
                "children": children / self.n as f64,
                "total": (own + children) / self.n as f64,
            })),
        })
    }
}

/// (1a) N job files written (temp file, rename) into incoming/ as fast as possible.
async fn cybd_spool(o: &Opts) -> anyhow::Result<Throughput> {
    let c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    let inc = c.d.incoming();
    let mut t0 = None;
    for i in 0..o.jobs {
        let tmp = inc.join(format!(".bench{i}.tmp"));
        std::fs::write(&tmp, TRIVIAL_JOB)?;
        if let Some((uid, gid)) = o.job_owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        if t0.is_none() {
            t0 = Some(Instant::now());
        }
        std::fs::rename(&tmp, inc.join(format!("bench{i:06}.json")))?;
    }
    let t0 = t0.ok_or_else(|| anyhow!("--jobs must be at least 1"))?;
    let enqueue = t0.elapsed();
    let done = wait_all_done(&c, &client, o.jobs).await?;
    Ok(Throughput::of_cybd(&c, o.jobs, enqueue, done - t0))
}

impl Throughput {
    /// One run of cybd `c`: its figures plus the daemon's peak RSS and CPU time.
    fn of_cybd(c: &Cybd, n: usize, enqueue: Duration, total: Duration) -> Throughput {
        // The launcher reaps exited supervisors at least once a second; only reaped ones
        // count in its children's CPU time.
        std::thread::sleep(Duration::from_millis(1100));
        Throughput {
            n,
            enqueue,
            total,
            peak_rss_mib: proc_mem_mib(c.pid(), "VmHWM:").ok(),
            cpu_ms: proc_cpu_ms(c.pid()).ok(),
            other_load: None,
            steal: None,
            runs: Vec::new(),
        }
    }
}

/// (1b) N submits over one tarpc connection, `rpc_concurrency` in flight.
async fn cybd_rpc(o: &Opts) -> anyhow::Result<Throughput> {
    let c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    let submitter = connect_as(&c.d.socket(), o.job_owner).await?;
    let t0 = Instant::now();
    submit_many(&submitter, o.jobs, o.rpc_concurrency).await?;
    let enqueue = t0.elapsed();
    let done = wait_all_done(&c, &client, o.jobs).await?;
    Ok(Throughput::of_cybd(&c, o.jobs, enqueue, done - t0))
}

async fn submit_many(client: &CybClient, n: usize, concurrency: usize) -> anyhow::Result<()> {
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            async move {
                client
                    .submit(ctx(Duration::from_secs(600)), trivial_request())
                    .await
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for r in results {
        r.context("submit call failed")?
            .map_err(|e| anyhow!("submit refused: {e}"))?;
    }
    Ok(())
}

/// One `cybctl submit -- true` process per job, one after the other (what the peers' CLIs
/// are measured with).
async fn cybd_ctl(o: &Opts) -> anyhow::Result<Throughput> {
    let c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    let sock = c.d.socket();
    let ctl = bin("cybctl");
    let t0 = Instant::now();
    for _ in 0..o.jobs {
        run_ok(
            Command::new(&ctl)
                .arg("--socket")
                .arg(&sock)
                .args(["submit", "--", "true"])
                .stdout(Stdio::null()),
            "cybctl submit",
        )?;
    }
    let enqueue = t0.elapsed();
    let done = wait_all_done(&c, &client, o.jobs).await?;
    Ok(Throughput::of_cybd(&c, o.jobs, enqueue, done - t0))
}

/// Runs a throughput measurement `--repeat` times (each after waiting for a quiet machine)
/// and returns the median run, with every run's figure in `runs`. `known_load` says whether
/// the other-load figure means something (it cannot for a peer whose processes this
/// benchmark does not reap).
async fn median_of<F, Fut>(o: &Opts, known_load: bool, mut f: F) -> anyhow::Result<Throughput>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Throughput>>,
{
    let mut all = Vec::new();
    for i in 0..o.repeat.max(1) {
        wait_quiet(o).await;
        let w = Window::start();
        let mut t = f().await?;
        t.other_load = known_load.then(|| w.other_share());
        t.steal = Some(w.steal_share());
        if o.repeat > 1 {
            progress(format!(
                "   run {}: {:.0} jobs/s ({})",
                i + 1,
                t.jobs_per_s(),
                load_text(t.other_load, t.steal)
            ));
        }
        all.push(t);
    }
    Ok(median(all))
}

/// The median run (the lower one of an even count), with every run's jobs/s in `runs`.
fn median(mut all: Vec<Throughput>) -> Throughput {
    let runs: Vec<f64> = all.iter().map(Throughput::jobs_per_s).collect();
    all.sort_by(|a, b| a.jobs_per_s().total_cmp(&b.jobs_per_s()));
    let mut m = all.swap_remove((all.len() - 1) / 2);
    m.runs = runs;
    m
}

// ----- admission latency

/// inotify on one directory (IN_CREATE), to see the moment a job creates its file.
struct Inotify(OwnedFd);

impl Inotify {
    fn watch(dir: &Path) -> anyhow::Result<Inotify> {
        // SAFETY: plain system calls; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        ensure!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: c is a valid NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_CREATE) };
        ensure!(wd >= 0, "inotify_add_watch: {}", std::io::Error::last_os_error());
        Ok(Inotify(fd))
    }

    /// Blocks until `name` is created in the directory; returns CLOCK_REALTIME (ns) at the
    /// moment the event was read, or None after `timeout`.
    fn wait_created(&self, name: &str, timeout: Duration) -> anyhow::Result<Option<i128>> {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("poll: {e}");
            }
            if r == 0 {
                continue;
            }
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let now = realtime_ns();
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                bail!("read inotify: {e}");
            }
            let mut off = 0usize;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name_bytes = &buf[off + hdr..off + hdr + ev.len as usize];
                let ev_name = name_bytes.split(|b| *b == 0).next().unwrap_or(&[]);
                if ev_name == name.as_bytes() {
                    return Ok(Some(now));
                }
                off += hdr + ev.len as usize;
            }
        }
    }
}

#[derive(Default)]
struct Admission {
    /// rename → the supervisor's timestamp just before it spawns the job (result.json
    /// `started_at`).
    to_spawn: Vec<f64>,
    /// rename → the job's own first effect (touch creating its file, seen by inotify).
    to_effect: Vec<f64>,
    /// rename → accepted by the scheduler (result.json `submitted_at`).
    to_accept: Vec<f64>,
    /// accepted → spawn.
    accept_to_spawn: Vec<f64>,
}

/// (2) One job at a time: `touch FILE` dropped into incoming/.
async fn cybd_admission(o: &Opts) -> anyhow::Result<Admission> {
    let c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    let touch = ["/usr/bin/touch", "/bin/touch"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no touch program"))?;
    let dir = c.d.path().join("touched");
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let ino = Inotify::watch(&dir)?;
    let inc = c.d.incoming();
    let mut a = Admission::default();
    // Let the daemon settle after its start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..o.admission_samples {
        let name = format!("t{i}");
        let body = json!({ "command": [touch, dir.join(&name)] }).to_string();
        let tmp = inc.join(format!(".adm{i}.tmp"));
        std::fs::write(&tmp, body)?;
        let renamed = realtime_ns();
        std::fs::rename(&tmp, inc.join(format!("adm{i:05}.json")))?;
        let seen = ino
            .wait_created(&name, Duration::from_secs(30))?
            .ok_or_else(|| anyhow!("job {} did not start within 30s; log:\n{}", i + 1, c.log_tail()))?;
        let id = i as u64 + 1;
        let rec = client
            .wait(ctx(Duration::from_secs(60)), id, 30_000)
            .await?
            .map_err(|e| anyhow!("wait {id}: {e}"))?;
        ensure!(
            rec.state.name() == StateName::Succeeded,
            "admission job {id} ended {}",
            rec.state.name()
        );
        let result: Value =
            serde_json::from_str(&std::fs::read_to_string(c.d.run_dir(id).join("result.json"))?)?;
        let started = parse_rfc3339_ns(&result["started_at"])?;
        let submitted = parse_rfc3339_ns(&result["submitted_at"])?;
        let to_ms = |a: i128, b: i128| (b - a) as f64 / 1e6;
        a.to_spawn.push(to_ms(renamed, started));
        a.to_effect.push(to_ms(renamed, seen));
        a.to_accept.push(to_ms(renamed, submitted));
        a.accept_to_spawn.push(to_ms(submitted, started));
        // Let the daemon finish its bookkeeping of this job before the next one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(a)
}

// ----- submit latency and RSS

struct SubmitLatency {
    rss_idle_mib: f64,
    empty: Vec<f64>,
    loaded: Vec<f64>,
    queued: usize,
    bulk: Duration,
    rss_queued_mib: f64,
    rss_after_mib: f64,
}

async fn submit_one(client: &CybClient) -> anyhow::Result<f64> {
    let t = Instant::now();
    client
        .submit(ctx(Duration::from_secs(30)), trivial_request())
        .await?
        .map_err(|e| anyhow!("submit refused: {e}"))?;
    Ok(ms(t.elapsed()))
}

/// Writes back everything dirty on the file system holding `dir` and lets it settle, so a
/// latency measurement does not pay for the writeback of what came before it.
async fn settle_fs(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        // SAFETY: syncfs on a valid descriptor.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn pause(client: &CybClient) -> anyhow::Result<()> {
    client
        .pause(ctx(Duration::from_secs(10)))
        .await?
        .map_err(|e| anyhow!("pause refused (the benchmark must run as root): {e}"))
}

/// (3) + (4): submit latency one at a time with an empty queue (daemon A) and with
/// `queued` jobs queued (daemon B), both paused so the jobs stay queued; RSS idle and
/// queued. Both daemons run at once and the samples alternate between them, one to A, one
/// to B, so whatever else slows the machine (writeback, other processes, the hypervisor)
/// falls on both figures alike and the ratio shows what the queue's size costs.
async fn cybd_submit(o: &Opts) -> anyhow::Result<SubmitLatency> {
    let a = Cybd::start(o);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle_mib = proc_mem_mib(a.pid(), "VmRSS:")?;
    let ca = connect(&a.d.socket()).await?;
    pause(&ca).await?;
    let c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    pause(&client).await?;
    let t = Instant::now();
    submit_many(&client, o.queued, o.rpc_concurrency).await?;
    let bulk = t.elapsed();
    // A few calls to warm both connections up, then let the bulk's writeback finish.
    for _ in 0..5 {
        submit_one(&ca).await?;
        submit_one(&client).await?;
    }
    settle_fs(c.d.path()).await;
    let rss_queued_mib = proc_mem_mib(c.pid(), "VmRSS:")?;
    let mut empty = Vec::with_capacity(o.submit_samples);
    let mut loaded = Vec::with_capacity(o.submit_samples);
    for _ in 0..o.submit_samples {
        empty.push(submit_one(&ca).await?);
        loaded.push(submit_one(&client).await?);
    }
    let st = client.stats(ctx(Duration::from_secs(30))).await?;
    let queued = st
        .counts
        .iter()
        .find(|(s, _)| *s == StateName::Queued)
        .map_or(0, |(_, n)| *n);
    ensure!(
        queued == o.queued + o.submit_samples + 5,
        "expected {} queued jobs, the daemon has {queued}",
        o.queued + o.submit_samples + 5
    );
    Ok(SubmitLatency {
        rss_idle_mib,
        empty,
        loaded,
        queued: o.queued,
        bulk,
        rss_queued_mib,
        rss_after_mib: proc_mem_mib(c.pid(), "VmRSS:")?,
    })
}

// ---------------------------------------------------------------------------------------
// Peers

enum Peer {
    Measured {
        version: String,
        run: Throughput,
        note: String,
    },
    Skipped(String),
}

/// Measures a peer `--repeat` times and returns the median run.
async fn peer_median(o: &Opts, name: &str, known_load: bool, f: fn(&Opts) -> anyhow::Result<Peer>) -> Peer {
    let mut runs = Vec::new();
    let mut about = None;
    for i in 0..o.repeat.max(1) {
        wait_quiet(o).await;
        progress(format!("5: {name}, {} jobs, {} slots...", o.jobs, o.slots));
        let w = Window::start();
        match f(o) {
            Ok(Peer::Measured {
                version,
                mut run,
                note,
            }) => {
                run.other_load = known_load.then(|| w.other_share());
                run.steal = Some(w.steal_share());
                if o.repeat > 1 {
                    progress(format!(
                        "   run {}: {:.0} jobs/s ({})",
                        i + 1,
                        run.jobs_per_s(),
                        load_text(run.other_load, run.steal)
                    ));
                }
                runs.push(run);
                about = Some((version, note));
            }
            Ok(skipped) => return skipped,
            Err(e) => {
                progress(format!("{name} failed: {e:#}"));
                return Peer::Skipped(format!("measurement failed: {e:#}"));
            }
        }
    }
    match about {
        Some((version, note)) => Peer::Measured {
            version,
            run: median(runs),
            note,
        },
        None => Peer::Skipped("not run".into()),
    }
}

/// A private task-spooler server; `tsp -K` on drop.
struct Tsp {
    prog: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    _undo: [OnSignal; 2],
}

impl Tsp {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.prog);
        c.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for Tsp {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .arg("-K")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // `tsp -K` returns before the server is gone; give it a moment to leave its dir.
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tsp_bench(o: &Opts) -> anyhow::Result<Peer> {
    let Some(prog) = find_program("tsp") else {
        return Ok(Peer::Skipped(
            "task-spooler is not installed (Debian/Ubuntu: apt-get install task-spooler)".into(),
        ));
    };
    let dir = tempfile::Builder::new().prefix("cyb-bench-tsp-").tempdir()?;
    let d = dir.path().to_path_buf();
    let cap = (o.jobs + 100).to_string();
    let env = vec![
        ("TS_SOCKET".to_string(), d.join("ts.sock").display().to_string()),
        ("TMPDIR".to_string(), d.display().to_string()),
        ("TS_MAXFINISHED".to_string(), cap.clone()),
        ("TS_MAXCONN".to_string(), cap),
        ("TS_SLOTS".to_string(), o.slots.to_string()),
    ];
    let u_dir = on_signal(Undo::RemoveDir(d.clone()));
    let u_kill = on_signal(Undo::Run(
        vec![prog.display().to_string(), "-K".into()],
        env.clone(),
    ));
    let t = Tsp {
        prog: prog.clone(),
        env,
        _dir: dir,
        _undo: [u_dir, u_kill],
    };
    // Starts the server with the slots; then one `tsp true` per job, as from a shell loop.
    run_ok(t.cmd().args(["-S", &o.slots.to_string()]), "tsp -S")?;
    let t0 = Instant::now();
    let mut last = String::new();
    for _ in 0..o.jobs {
        last = run_ok(t.cmd().arg("true"), "tsp true")?.trim().to_string();
    }
    let enqueue = t0.elapsed();
    ensure!(
        last.parse::<u64>().is_ok(),
        "tsp printed `{last}` instead of a job id"
    );
    run_ok(t.cmd().args(["-w", &last]), "tsp -w")?;
    // -w waits for the last job; with several slots an earlier one may still be running.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let list = run_ok(t.cmd().arg("-l"), "tsp -l")?;
        let finished = list
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("finished"))
            .count();
        if finished >= o.jobs {
            break;
        }
        ensure!(
            Instant::now() < end,
            "tsp: only {finished} of {} jobs finished",
            o.jobs
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = t0.elapsed();
    Ok(Peer::Measured {
        version: version_of(&prog, "-V"),
        run: Throughput {
            n: o.jobs,
            enqueue,
            total,
            peak_rss_mib: None,
            cpu_ms: None,
            other_load: None,
            steal: None,
            runs: Vec::new(),
        },
        note: format!(
            "one `tsp true` per job; each queued job is a waiting tsp client process; TS_MAXCONN={}",
            o.jobs + 100
        ),
    })
}

/// A private pueued (foreground child); killed on drop.
struct Pueued {
    child: Child,
    _dir: tempfile::TempDir,
    _undo: [OnSignal; 2],
}

impl Drop for Pueued {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pueue_bench(o: &Opts) -> anyhow::Result<Peer> {
    let (Some(pueued), Some(pueue)) = (find_program("pueued"), find_program("pueue")) else {
        return Ok(Peer::Skipped(
            "pueue is not installed (cargo install pueue --locked, or your distribution's pueue package)"
                .into(),
        ));
    };
    let dir = tempfile::Builder::new().prefix("cyb-bench-pueue-").tempdir()?;
    let d = dir.path().to_path_buf();
    let config = d.join("pueue.yml");
    std::fs::create_dir_all(d.join("data"))?;
    std::fs::create_dir_all(d.join("run"))?;
    std::fs::write(
        &config,
        format!(
            "shared:\n  pueue_directory: {data}\n  runtime_directory: {run}\n  use_unix_socket: true\n  unix_socket_path: {run}/pueue.sock\n\
             client: {{}}\ndaemon:\n  callback: null\n",
            data = d.join("data").display(),
            run = d.join("run").display(),
        ),
    )?;
    let log = std::fs::File::create(d.join("pueued.log"))?;
    let u_dir = on_signal(Undo::RemoveDir(d.clone()));
    let child = Command::new(&pueued)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start pueued")?;
    let u_kill = on_signal(Undo::Kill(child.id() as i32));
    let p = Pueued {
        child,
        _dir: dir,
        _undo: [u_dir, u_kill],
    };
    let cli = || {
        let mut c = Command::new(&pueue);
        c.arg("-c").arg(&config);
        c
    };
    let up = Instant::now() + Duration::from_secs(20);
    let mut p = p;
    while run_ok(cli().arg("status"), "pueue status").is_err() {
        ensure!(
            p.child.try_wait()?.is_none(),
            "pueued exited: {}",
            std::fs::read_to_string(d.join("pueued.log")).unwrap_or_default()
        );
        ensure!(
            Instant::now() < up,
            "pueued did not answer within 20s: {}",
            std::fs::read_to_string(d.join("pueued.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ok(cli().args(["parallel", &o.slots.to_string()]), "pueue parallel")?;
    let t0 = Instant::now();
    for _ in 0..o.jobs {
        run_ok(
            cli().args(["add", "--", "true"]).stdout(Stdio::null()),
            "pueue add",
        )?;
    }
    let enqueue = t0.elapsed();
    let peak_during = proc_mem_mib(p.child.id(), "VmRSS:").ok();
    run_ok(cli().arg("wait").stdout(Stdio::null()), "pueue wait")?;
    let total = t0.elapsed();
    let peak = proc_mem_mib(p.child.id(), "VmHWM:").ok().or(peak_during);
    let cpu_ms = proc_cpu_ms(p.child.id()).ok();
    let status: Value =
        serde_json::from_str(&run_ok(cli().args(["status", "--json"]), "pueue status --json")?)?;
    let tasks = status["tasks"].as_object().map_or(0, |m| m.len());
    let ok = status["tasks"].as_object().map_or(0, |m| {
        m.values()
            .filter(|t| t.to_string().contains("\"Success\""))
            .count()
    });
    ensure!(
        tasks == o.jobs && ok == o.jobs,
        "pueue: {ok} of {tasks} tasks succeeded, expected {}",
        o.jobs
    );
    drop(p);
    Ok(Peer::Measured {
        version: version_of(&pueue, "--version"),
        run: Throughput {
            n: o.jobs,
            enqueue,
            total,
            peak_rss_mib: peak,
            cpu_ms,
            other_load: None,
            steal: None,
            runs: Vec::new(),
        },
        note: "one `pueue add -- true` per job; pueue runs each through `sh -c`".into(),
    })
}

// ---------------------------------------------------------------------------------------
// Report

struct Row {
    metric: String,
    value: String,
    target: String,
    pass: Option<bool>,
}

fn row(
    metric: impl Into<String>,
    value: impl Into<String>,
    target: impl Into<String>,
    pass: Option<bool>,
) -> Row {
    Row {
        metric: metric.into(),
        value: value.into(),
        target: target.into(),
        pass,
    }
}

fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_string()
    };
    println!("\n{title}");
    let head = line(header.iter().map(|h| h.to_string()).collect());
    println!("{head}");
    println!("{}", "-".repeat(head.chars().count()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn runs_text(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_text(p: Option<bool>) -> String {
    match p {
        Some(true) => "PASS".into(),
        Some(false) => "MISS".into(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------

fn snapshot_binaries() -> anyhow::Result<tempfile::TempDir> {
    let from = bin_dir();
    let _ = BUILT_IN.set(from.clone());
    let dir = tempfile::Builder::new().prefix("cyb-bench-bin-").tempdir()?;
    for name in ["cybd", "cybctl"] {
        let src = from.join(name);
        ensure!(
            src.exists(),
            "{} not built: run `cargo build --release --workspace`",
            src.display()
        );
        std::fs::copy(&src, dir.path().join(name))
            .with_context(|| format!("cannot copy {}", src.display()))?;
    }
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(dir)
}

struct History {
    ready: Duration,
    rss_mib: f64,
    ls: Duration,
    /// What a running daemon's RSS grows by per job it finishes, in bytes, measured over
    /// the jobs after the first [`HISTORY_WARMUP`].
    grows_per_job: f64,
    /// Jobs that measure ran.
    grown_over: usize,
}

/// Jobs a daemon runs before its growth per finished job is measured: its buffers, caches
/// and the allocator's arenas are grown by then.
const HISTORY_WARMUP: usize = 1000;
/// Jobs over which the growth is measured.
const HISTORY_GROWTH_JOBS: usize = 8000;
/// The jobs are submitted in rounds of this many, each waited for before the next, so the
/// queue's peak is the same in the warm-up and the measurement and what grows is history.
const HISTORY_ROUND: usize = 500;

/// Fills a stopped daemon's store with `--history` finished records (copies of one real
/// record with their own ids; they share that job's run directory, which has its
/// result.json), restarts it, and measures the restart until it answers, then its RSS.
async fn cybd_history(o: &Opts) -> anyhow::Result<History> {
    let mut c = Cybd::start(o);
    let client = connect(&c.d.socket()).await?;
    // First: what each finished job costs a daemon that keeps running.
    let mut done = 0;
    let mut rounds = |n: usize| {
        let (c, client) = (&c, &client);
        let start = done;
        done += n;
        async move {
            let mut ran = start;
            while ran < start + n {
                let k = HISTORY_ROUND.min(start + n - ran);
                submit_many(client, k, o.rpc_concurrency).await?;
                ran += k;
                wait_all_done(c, client, ran).await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            proc_mem_mib(c.pid(), "VmRSS:")
        }
    };
    let before = rounds(HISTORY_WARMUP).await?;
    let after = rounds(HISTORY_GROWTH_JOBS).await?;
    let grows_per_job = (after - before) * 1024.0 * 1024.0 / HISTORY_GROWTH_JOBS as f64;
    let id = client
        .submit(ctx(Duration::from_secs(10)), trivial_request())
        .await??
        .id;
    let rec = client.wait(ctx(Duration::from_secs(60)), id, 30_000).await??;
    ensure!(rec.state.is_terminal(), "the template job did not end");
    drop(client);
    c.d.stop();
    let jobs = c.d.jobs_dir();
    let template: Value = serde_json::from_slice(&std::fs::read(jobs.join(format!("{id}.json")))?)?;
    let mut rec = template;
    for n in 1..=o.history as u64 {
        let new_id = id + n;
        rec["id"] = json!(new_id);
        rec["spec"]["name"] = json!(format!("job-{new_id}"));
        let mut bytes = serde_json::to_vec_pretty(&rec)?;
        bytes.push(b'\n');
        std::fs::write(jobs.join(format!("{new_id}.json")), bytes)?;
    }
    settle_fs(&jobs).await;
    // Cold-ish: what the page cache holds is the records just written, as after a daemon
    // restart (not a reboot).
    let t = Instant::now();
    c.d.restart();
    let ready = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_mib = proc_mem_mib(c.pid(), "VmRSS")?;
    let client = connect(&c.d.socket()).await?;
    let t = Instant::now();
    let filter = ListFilter {
        limit: Some(20),
        ..Default::default()
    };
    let listed = client.list(ctx(Duration::from_secs(30)), filter).await?;
    let ls = t.elapsed();
    ensure!(listed.len() == 20, "ls returned {} jobs", listed.len());
    Ok(History {
        ready,
        rss_mib,
        ls,
        grows_per_job,
        grown_over: HISTORY_GROWTH_JOBS,
    })
}

fn main() -> std::process::ExitCode {
    let mut o = Opts::parse();
    if o.spool_owner == SpoolOwner::User && cyb_tests::is_root() {
        o.job_owner = Some(cyb_tests::test_user());
    }
    if let Some(d) = &o.tmpdir {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("TMPDIR", d) };
    }
    // A private copy of the binaries, so a rebuild of the workspace during the run does not
    // change what is measured half-way.
    let snapshot = match snapshot_binaries() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cyb-bench: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CYB_BIN_DIR", snapshot.path()) };
    let _undo_snapshot = on_signal(Undo::RemoveDir(snapshot.path().to_path_buf()));
    if o.abuse.abuse {
        let res = install_signal_cleanup().and_then(|()| abuse::run(&o));
        empty_trash();
        return match res {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cyb-bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cyb-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(run(o));
    empty_trash();
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cyb-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(o: Opts) -> anyhow::Result<()> {
    ensure!(
        o.jobs >= 1 && o.slots >= 1,
        "--jobs and --slots must be at least 1"
    );
    install_signal_cleanup()?;
    if !is_root() {
        progress("warning: not running as root; the harness's daemons expect root (root-owned jobs, pause)");
    }
    let cybd = bin("cybd");
    let tmp = std::env::temp_dir();
    let host = json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "tmpdir": tmp.display().to_string(),
        "tmpdir_fs": fs_of(&tmp),
        "cybd": BUILT_IN.get().map_or_else(bin_dir, Clone::clone).join("cybd").display().to_string(),
        "cybd_version": version_of(&cybd, "--version"),
        "workspace_revision_now": source_revision(),
        "cybd_built": built_at(&BUILT_IN.get().map_or_else(bin_dir, Clone::clone).join("cybd")),
        "jobs": o.jobs,
        "slots": o.slots,
        "job_cgroups": !o.no_cgroups,
        "spool_jobs_uid": o.job_owner.map(|(uid, _)| uid),
    });
    progress(format!(
        "cybd from {}; temporary roots under {} ({}); {} jobs, {} slots{}",
        BUILT_IN.get().map_or_else(bin_dir, Clone::clone).display(),
        tmp.display(),
        host["tmpdir_fs"].as_str().unwrap_or(""),
        o.jobs,
        o.slots,
        if o.no_cgroups {
            ", jobs without cgroups"
        } else {
            ""
        }
    ));
    let (create_us, create_sync_us) = fs_calibration(300)?;
    progress(format!(
        "file create+rename in the temp root: {create_us:.0} us, with fdatasync {create_sync_us:.0} us"
    ));
    let spawn_per_s = spawn_calibration(1000)?;
    progress(format!(
        "bare spawn loop (`true`, one at a time): {spawn_per_s:.0} processes/s"
    ));
    let floor_per_s = pair_floor(o.jobs, o.slots)?;
    progress(format!(
        "supervisor-and-job floor (fork a child that spawns `true` and waits, {} at once): {floor_per_s:.0} jobs/s",
        o.slots
    ));
    let mut host = host;
    host["spawn_loop_per_s"] = json!(spawn_per_s);
    host["pair_floor_per_s"] = json!(floor_per_s);
    host["file_create_rename_us"] = json!(create_us);
    host["file_create_fdatasync_rename_us"] = json!(create_sync_us);
    let mut out = json!({ "host": host, "cybd": {}, "peers": {}, "targets": [] });
    let mut rows: Vec<Row> = Vec::new();
    let mut cybd_runs: Vec<(&str, Throughput)> = Vec::new();
    // Other work on the machine during each part.
    let mut other_load: Vec<(String, Option<f64>, Option<f64>)> = Vec::new();

    let tput_rows = |label: &str, t: &Throughput, rows: &mut Vec<Row>| {
        rows.push(row(
            format!("throughput, {label} (jobs/s, {} x true)", t.n),
            format!("{:.0}", t.jobs_per_s()),
            format!(">= {TARGET_JOBS_PER_S:.0}"),
            Some(t.jobs_per_s() >= TARGET_JOBS_PER_S),
        ));
        if t.runs.len() > 1 {
            rows.push(row(
                format!("  runs, {label} (jobs/s)"),
                runs_text(&t.runs),
                "",
                None,
            ));
        }
        rows.push(row(
            format!("  enqueue rate, {label} (jobs/s)"),
            format!("{:.0}", t.enqueue_per_s()),
            "",
            None,
        ));
        rows.push(row(
            format!("  total time, {label} (s)"),
            format!("{:.2}", t.total.as_secs_f64()),
            "",
            None,
        ));
        if let Some((own, children)) = t.cpu_ms {
            rows.push(row(
                format!("  CPU per job, {label}: daemon + supervisors & jobs (ms)"),
                format!("{:.2} + {:.2}", own / t.n as f64, children / t.n as f64),
                "",
                None,
            ));
        }
    };

    if o.runs(Part::Spool) {
        progress(format!("1a: {} job files through the spool...", o.jobs));
        let t = median_of(&o, true, || cybd_spool(&o)).await?;
        tput_rows("spool", &t, &mut rows);
        out["cybd"]["spool"] = t.json();
        cybd_runs.push(("cybd spool", t));
    }
    if o.runs(Part::Rpc) {
        progress(format!(
            "1b: {} RPC submits on one connection ({} in flight)...",
            o.jobs, o.rpc_concurrency
        ));
        let t = median_of(&o, true, || cybd_rpc(&o)).await?;
        tput_rows("RPC", &t, &mut rows);
        out["cybd"]["rpc"] = t.json();
        cybd_runs.push(("cybd RPC", t));
    }
    if o.runs(Part::Ctl) {
        progress(format!(
            "1c: {} `cybctl submit` processes, one after the other...",
            o.jobs
        ));
        let t = median_of(&o, true, || cybd_ctl(&o)).await?;
        rows.push(row(
            format!("throughput, cybctl per job (jobs/s, {} x true)", t.n),
            format!("{:.0}", t.jobs_per_s()),
            "(like the peers' CLIs)",
            None,
        ));
        if t.runs.len() > 1 {
            rows.push(row("  runs, cybctl (jobs/s)", runs_text(&t.runs), "", None));
        }
        rows.push(row(
            "  enqueue rate, cybctl (jobs/s)",
            format!("{:.0}", t.enqueue_per_s()),
            "",
            None,
        ));
        out["cybd"]["cybctl"] = t.json();
        cybd_runs.push(("cybd cybctl", t));
    }
    if o.runs(Part::Admission) {
        wait_quiet(&o).await;
        progress(format!(
            "2: admission latency, {} jobs one at a time...",
            o.admission_samples
        ));
        let w = Window::start();
        let a = cybd_admission(&o).await?;
        other_load.push(("admission".into(), Some(w.other_share()), Some(w.steal_share())));
        let p50 = pct(&a.to_spawn, 50.0);
        rows.push(row(
            "admission p50, rename -> job spawn (ms)",
            format!("{p50:.2}"),
            format!("<= {TARGET_ADMISSION_P50_MS:.0}"),
            Some(p50 <= TARGET_ADMISSION_P50_MS),
        ));
        rows.push(row(
            "admission p99, rename -> job spawn (ms)",
            format!("{:.2}", pct(&a.to_spawn, 99.0)),
            "",
            None,
        ));
        rows.push(row(
            "  rename -> job's first effect, p50 / p99 (ms)",
            format!("{:.2} / {:.2}", pct(&a.to_effect, 50.0), pct(&a.to_effect, 99.0)),
            "",
            None,
        ));
        rows.push(row(
            "  rename -> accepted (submitted_at), p50 / p99 (ms)",
            format!("{:.2} / {:.2}", pct(&a.to_accept, 50.0), pct(&a.to_accept, 99.0)),
            "",
            None,
        ));
        rows.push(row(
            "  accepted -> job spawn, p50 / p99 (ms)",
            format!(
                "{:.2} / {:.2}",
                pct(&a.accept_to_spawn, 50.0),
                pct(&a.accept_to_spawn, 99.0)
            ),
            "",
            None,
        ));
        let stats = |v: &[f64]| json!({ "p50_ms": pct(v, 50.0), "p99_ms": pct(v, 99.0), "min_ms": pct(v, 0.0), "max_ms": pct(v, 100.0) });
        out["cybd"]["admission"] = json!({
            "samples": a.to_spawn.len(),
            "job": "[\"/usr/bin/touch\", FILE] dropped as a spool file",
            "rename_to_spawn": stats(&a.to_spawn),
            "rename_to_spawn_measured_by": "result.json started_at (supervisor clock just before spawning the job) minus CLOCK_REALTIME just before rename(2)",
            "rename_to_first_effect": stats(&a.to_effect),
            "rename_to_first_effect_measured_by": "CLOCK_REALTIME when inotify reported FILE created by touch, minus CLOCK_REALTIME just before rename(2)",
            "rename_to_accepted": stats(&a.to_accept),
            "accepted_to_spawn": stats(&a.accept_to_spawn),
        });
    }
    if o.runs(Part::Submit) {
        wait_quiet(&o).await;
        let w = Window::start();
        progress(format!(
            "3/4: submit latency ({} one at a time, queue paused, alternating between an empty queue and {} queued); RSS...",
            o.submit_samples, o.queued
        ));
        let s = cybd_submit(&o).await?;
        other_load.push(("submit".into(), Some(w.other_share()), Some(w.steal_share())));
        let (e50, e99) = (pct(&s.empty, 50.0), pct(&s.empty, 99.0));
        let (l50, l99) = (pct(&s.loaded, 50.0), pct(&s.loaded, 99.0));
        let ratio = l99 / e99;
        rows.push(row(
            "submit latency, empty queue, p50 / p99 (ms)",
            format!("{e50:.2} / {e99:.2}"),
            "",
            None,
        ));
        rows.push(row(
            format!("submit latency, {} queued, p50 / p99 (ms)", s.queued),
            format!("{l50:.2} / {l99:.2}"),
            "",
            None,
        ));
        rows.push(row(
            format!("submit p99 {} queued / empty", s.queued),
            format!("{ratio:.2}x"),
            format!("<= {TARGET_SUBMIT_P99_RATIO}x"),
            Some(ratio <= TARGET_SUBMIT_P99_RATIO),
        ));
        rows.push(row(
            format!(
                "  bulk submit of {} ({} in flight) (jobs/s)",
                s.queued, o.rpc_concurrency
            ),
            format!("{:.0}", s.queued as f64 / s.bulk.as_secs_f64()),
            "",
            None,
        ));
        rows.push(row(
            "RSS idle after start (MiB)",
            format!("{:.1}", s.rss_idle_mib),
            format!("<= {TARGET_RSS_IDLE_MIB:.0}"),
            Some(s.rss_idle_mib <= TARGET_RSS_IDLE_MIB),
        ));
        rows.push(row(
            format!("RSS with {} queued (MiB)", s.queued),
            format!("{:.1}", s.rss_queued_mib),
            format!("<= {TARGET_RSS_QUEUED_MIB:.0}"),
            Some(s.rss_queued_mib <= TARGET_RSS_QUEUED_MIB),
        ));
        rows.push(row(
            format!("  RSS with {} queued (MiB)", s.queued + o.submit_samples + 5),
            format!("{:.1}", s.rss_after_mib),
            "",
            None,
        ));
        let stats =
            |v: &[f64]| json!({ "p50_ms": pct(v, 50.0), "p99_ms": pct(v, 99.0), "max_ms": pct(v, 100.0) });
        out["cybd"]["submit"] = json!({
            "samples": s.empty.len(),
            "empty": stats(&s.empty),
            "queued": s.queued,
            "with_queued": stats(&s.loaded),
            "p99_ratio": ratio,
            "bulk_submit_per_s": s.queued as f64 / s.bulk.as_secs_f64(),
        });
        out["cybd"]["rss"] = json!({
            "idle_mib": s.rss_idle_mib,
            "queued_mib": s.rss_queued_mib,
            "queued": s.queued,
            "after_samples_mib": s.rss_after_mib,
        });
    }
    if o.runs(Part::History) {
        wait_quiet(&o).await;
        progress(format!(
            "5: restart on {} finished records: time to READY, RSS...",
            o.history
        ));
        let h = cybd_history(&o).await?;
        rows.push(row(
            format!("recovery on {} finished records, restart -> READY (s)", o.history),
            format!("{:.2}", h.ready.as_secs_f64()),
            format!("<= {TARGET_RECOVERY_S:.0}"),
            Some(h.ready.as_secs_f64() <= TARGET_RECOVERY_S),
        ));
        rows.push(row(
            format!("RSS after recovery on {} finished records (MiB)", o.history),
            format!("{:.1}", h.rss_mib),
            format!("<= {TARGET_RSS_HISTORY_MIB:.0}"),
            Some(h.rss_mib <= TARGET_RSS_HISTORY_MIB),
        ));
        rows.push(row(
            "  `cybctl ls --limit 20` on them (ms)",
            format!("{:.1}", ms(h.ls)),
            "",
            None,
        ));
        rows.push(row(
            format!("RSS growth per finished job, over {} jobs (bytes)", h.grown_over),
            format!("{:.0}", h.grows_per_job),
            "",
            None,
        ));
        out["cybd"]["history"] = json!({
            "records": o.history,
            "ready_s": h.ready.as_secs_f64(),
            "rss_mib": h.rss_mib,
            "ls_ms": ms(h.ls),
            "grows_per_job_bytes": h.grows_per_job,
        });
    }
    for r in &rows {
        if r.pass.is_some() {
            out["targets"].as_array_mut().expect("array").push(json!({
                "metric": r.metric, "value": r.value, "target": r.target, "pass": r.pass,
            }));
        }
    }

    let mut peers: Vec<(&str, Peer)> = Vec::new();
    if o.runs(Part::Peers) {
        // tsp runs its jobs under detached client processes this benchmark cannot account
        // for, so the other-load figure would count tsp itself.
        peers.push((
            "task-spooler (tsp)",
            peer_median(&o, "task-spooler", false, tsp_bench).await,
        ));
        peers.push(("pueue", peer_median(&o, "pueue", true, pueue_bench).await));
    }
    for (name, p) in &peers {
        out["peers"][*name] = match p {
            Peer::Measured { version, run, note } => {
                let mut v = run.json();
                v["version"] = json!(version);
                v["note"] = json!(note);
                for (label, t) in &cybd_runs {
                    let x = t.jobs_per_s();
                    v[format!("ratio_{}", label.replace(' ', "_"))] = json!(x / run.jobs_per_s());
                }
                v
            }
            Peer::Skipped(why) => json!({ "skipped": why }),
        };
    }

    let tput_load: Vec<(String, Option<f64>, Option<f64>)> = cybd_runs
        .iter()
        .map(|(l, t)| (l.to_string(), t.other_load, t.steal))
        .collect();
    other_load.splice(0..0, tput_load);
    for (name, p) in &peers {
        if let Peer::Measured { run, .. } = p {
            other_load.push((name.to_string(), run.other_load, run.steal));
        }
    }
    let mut docker_figures = None;
    if o.runs(Part::Docker) {
        match docker::engine_ready() {
            Ok(version) => {
                let f = docker::run(&o, version).await?;
                out["docker"] = f.json(o.slots);
                for (part, t) in [
                    ("docker cybd", &f.cybd),
                    ("docker run sequential", &f.cli_seq),
                    ("docker run parallel", &f.cli_par),
                ] {
                    other_load.push((part.into(), None, t.steal));
                }
                docker_figures = Some(f);
            }
            Err(why) => {
                progress(format!("6: docker part skipped: {why}"));
                out["docker"] = json!({ "skipped": why });
            }
        }
    }
    for (part, l, st) in &other_load {
        out["other_load"][part.as_str()] = json!(l);
        out["steal"][part.as_str()] = json!(st);
    }
    let (end_us, end_sync_us) = fs_calibration(300)?;
    out["host"]["spawn_loop_per_s_at_end"] = json!(spawn_calibration(1000)?);
    out["host"]["pair_floor_per_s_at_end"] = json!(pair_floor(o.jobs, o.slots)?);
    out["host"]["file_create_rename_us_at_end"] = json!(end_us);
    out["host"]["file_create_fdatasync_rename_us_at_end"] = json!(end_sync_us);
    if let Some(f) = &o.json_out {
        std::fs::write(f, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let h = &out["host"];
    println!(
        "\ncyb-bench: {} built {} (workspace now at {}) | {} CPUs, kernel {} | temp roots {} ({}) | {} jobs, {} slots{}",
        h["cybd_version"].as_str().unwrap_or("cybd"),
        h["cybd_built"].as_str().unwrap_or(""),
        h["workspace_revision_now"].as_str().unwrap_or(""),
        h["cpus"],
        h["kernel"].as_str().unwrap_or(""),
        h["tmpdir"].as_str().unwrap_or(""),
        h["tmpdir_fs"].as_str().unwrap_or(""),
        o.jobs,
        o.slots,
        if o.no_cgroups {
            " | jobs without cgroups"
        } else {
            ""
        }
    );
    let us = |k: &str| h[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "file system: creating a small file (temp + rename) costs {:.0} us here ({:.0} us with fdatasync) \
         before the runs, {:.0} us ({:.0} us) after them",
        us("file_create_rename_us"),
        us("file_create_fdatasync_rename_us"),
        us("file_create_rename_us_at_end"),
        us("file_create_fdatasync_rename_us_at_end"),
    );
    println!(
        "processes: a bare spawn loop starts {:.0} `true`/s here before the runs, {:.0}/s after them \
         (the targets were set where it starts about {REFERENCE_SPAWN_PER_S:.0}/s)",
        us("spawn_loop_per_s"),
        us("spawn_loop_per_s_at_end"),
    );
    println!(
        "floor: forking a supervisor-like child per job that spawns `true` and waits for it, {} at \
         once, with nothing else (no records, files, cgroups or daemon), runs {:.0} jobs/s here \
         before the runs and {:.0}/s after them: no runner with a supervisor process per job \
         gets past it on this machine",
        o.slots,
        us("pair_floor_per_s"),
        us("pair_floor_per_s_at_end"),
    );
    if !rows.is_empty() {
        print_table(
            "cybd",
            &["metric", "cybd", "target", "status"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.metric.clone(),
                        r.value.clone(),
                        r.target.clone(),
                        status_text(r.pass),
                    ]
                })
                .collect::<Vec<_>>(),
        );
        if o.runs(Part::Admission) {
            println!(
                "admission: job [\"/usr/bin/touch\", FILE] dropped as a spool file, one at a time; \"job spawn\" = \
                 result.json started_at (the supervisor's clock just before it spawns the job) minus CLOCK_REALTIME \
                 just before rename(2); \"first effect\" = when inotify reports FILE created."
            );
        }
        if o.runs(Part::Spool) || o.runs(Part::Rpc) {
            println!(
                "throughput: first rename / submit to the last result.json on disk (all jobs succeeded)."
            );
        }
    }
    if !peers.is_empty() {
        let mut header = vec![
            "tool",
            "version",
            "enqueue jobs/s",
            "end-to-end jobs/s",
            "CPU ms/job",
            "peak RSS MiB",
        ];
        let labels: Vec<String> = cybd_runs.iter().map(|(l, _)| format!("{l} / peer")).collect();
        header.extend(labels.iter().map(String::as_str));
        let cells = |run: &Throughput| {
            vec![
                format!("{:.0}", run.enqueue_per_s()),
                format!("{:.0}", run.jobs_per_s()),
                run.cpu_ms
                    .map_or_else(|| "n/a".into(), |(a, b)| format!("{:.2}", (a + b) / run.n as f64)),
                run.peak_rss_mib
                    .map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
            ]
        };
        let mut table = Vec::new();
        for (label, t) in &cybd_runs {
            let mut r = vec![(*label).to_string(), String::new()];
            r.extend(cells(t));
            r.extend(cybd_runs.iter().map(|_| String::new()));
            table.push(r);
        }
        let mut notes = Vec::new();
        for (name, p) in &peers {
            match p {
                Peer::Measured { version, run, note } => {
                    let mut r = vec![(*name).to_string(), version.clone()];
                    r.extend(cells(run));
                    r.extend(
                        cybd_runs
                            .iter()
                            .map(|(_, t)| format!("{:.2}x", t.jobs_per_s() / run.jobs_per_s())),
                    );
                    table.push(r);
                    if run.runs.len() > 1 {
                        notes.push(format!("{name}: {note}; runs {} jobs/s", runs_text(&run.runs)));
                    } else {
                        notes.push(format!("{name}: {note}"));
                    }
                }
                Peer::Skipped(why) => {
                    let mut r = vec![(*name).to_string(), "SKIPPED".into()];
                    r.extend((2..header.len()).map(|_| String::new()));
                    table.push(r);
                    notes.push(format!("{name}: skipped: {why}"));
                }
            }
        }
        notes.push(
            "CPU ms/job: user + system time of the daemon and the processes it reaped (supervisors, jobs); \
             n/a for tsp, whose jobs run under detached client processes"
                .into(),
        );
        print_table(
            &format!("peers ({} x true, {} slots, same machine)", o.jobs, o.slots),
            &header,
            &table,
        );
        for n in notes {
            println!("{n}");
        }
    }
    println!(
        "\nother work on the machine during each part (share of all CPUs used by processes other than \
         the benchmark, the daemon under test and their children; steal: the share of all CPU \
         time the hypervisor gave to other virtual machines): {}",
        other_load
            .iter()
            .map(|(p, l, st)| format!("{p} {}", load_text(*l, *st)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(f) = &docker_figures {
        f.print(o.slots);
    } else if let Some(why) = out["docker"]["skipped"].as_str() {
        println!("\ndocker: skipped: {why}");
    }
    if o.repeat > 1 {
        println!(
            "throughput figures are the median of {} runs each; every run's figure is listed (\"runs\").",
            o.repeat
        );
    }
    let misses = out["targets"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["pass"] == json!(false)).count());
    println!(
        "\ntargets: {} checked, {} missed",
        out["targets"].as_array().map_or(0, Vec::len),
        misses
    );
    std::io::stdout().flush()?;
    Ok(())
}
