//! `cyb-bench --abuse`: what one local user can make the daemon hold, and whether another
//! user is still served meanwhile (issue 15, item 5).
//!
//! Each attack runs against a fresh daemon while another user (`nobody`) runs `cybctl ls`
//! every 200 ms; the daemon's RSS is sampled every 50 ms from before the attack until
//! `--abuse-after` seconds after it stopped. The attacks:
//! - `frames`: connections that each send most of a huge frame (a length header, then the
//!   body up to a point) and stall;
//! - `small-frames`: the same with frames just under the daemon's frame limit, from more
//!   connections than one user may hold;
//! - `storm-user`, `storm-root`: storms of idle connections (connect, send nothing, hold,
//!   close), from the unprivileged test user and from root;
//! - `fds`: the daemon's descriptor limit set to 1,024, then the test user opens 1,019
//!   idle connections.
//!
//! The attackers are threads of this process that switch their own effective ids for the
//! connects (the daemon reads the peer's credentials at connect time).

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::*;

/// Daemon RSS the issue allows during an attack and a minute after it, in MiB.
const TARGET_RSS_DURING_MIB: f64 = 100.0;
const TARGET_RSS_AFTER_MIB: f64 = 40.0;
/// The longest another user's `cybctl ls` may take, in ms.
const TARGET_LS_MS: f64 = 1000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// `--abuse-frames` connections each send `--abuse-frame-mib` of a frame whose header
    /// says `--abuse-frame-header-mib`, and stall.
    Frames,
    /// One connection more than `--abuse-cap` each sends all but one byte of a frame of
    /// `--abuse-small-frame-kib`, and stalls.
    SmallFrames,
    /// `--abuse-storms` storms of `--abuse-conns` idle connections from the test user.
    StormUser,
    /// The same from root (whom no per-user cap limits).
    StormRoot,
    /// The daemon's RLIMIT_NOFILE set to 1,024; the test user opens 1,019 idle connections.
    Fds,
}

/// Options of `--abuse` (flattened into [`Opts`]).
#[derive(clap::Args, Debug, Clone)]
pub struct AbuseOpts {
    /// Measure what one user can make the daemon hold instead of the usual parts.
    #[arg(long)]
    pub abuse: bool,
    /// Attacks to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "frames,small-frames,storm-user,storm-root,fds"
    )]
    pub abuse_only: Vec<Attack>,
    /// Connections of the `frames` attack.
    #[arg(long, default_value_t = 10)]
    pub abuse_frames: usize,
    /// The frame length each `frames` connection announces, in MiB.
    #[arg(long, default_value_t = 64)]
    pub abuse_frame_header_mib: u32,
    /// How much of it each sends, in MiB.
    #[arg(long, default_value_t = 60)]
    pub abuse_frame_mib: usize,
    /// The frame length of the `small-frames` attack, in KiB (the daemon's limit with the
    /// default `max_job_bytes` is 2 MiB + 64 KiB).
    #[arg(long, default_value_t = 2048)]
    pub abuse_small_frame_kib: usize,
    /// Connections the daemon lets one user hold (`[rpc] max_connections_per_user`); the
    /// `small-frames` attack opens one more.
    #[arg(long, default_value_t = 32)]
    pub abuse_cap: usize,
    /// Connections per storm.
    #[arg(long, default_value_t = 19_000)]
    pub abuse_conns: usize,
    /// Storms per storm attack.
    #[arg(long, default_value_t = 3)]
    pub abuse_storms: usize,
    /// How long the attackers hold what they opened, in seconds (frame attackers stop
    /// earlier when the daemon has closed all their connections).
    #[arg(long, default_value_t = 15)]
    pub abuse_hold: u64,
    /// How long to go on measuring after an attack stopped, in seconds.
    #[arg(long, default_value_t = 60)]
    pub abuse_after: u64,
}

/// One `cybctl ls` of the other user.
struct LsSample {
    at: Instant,
    ms: f64,
    ok: bool,
}

/// Runs `cybctl ls` as `uid:gid` every 200 ms until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<LsSample>>,
}

impl Prober {
    fn start(sock: PathBuf, uid: u32, gid: u32) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let ok = ls_as(&sock, uid, gid);
                out.push(LsSample {
                    at: t0,
                    ms: ms(t0.elapsed()),
                    ok,
                });
                std::thread::sleep(Duration::from_millis(200));
            }
            out
        });
        Prober { stop, thread }
    }

    fn finish(self) -> Vec<LsSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// One `cybctl ls` as `uid:gid`; false when it failed or took more than 15 s (killed).
fn ls_as(sock: &Path, uid: u32, gid: u32) -> bool {
    use std::os::unix::process::CommandExt as _;
    let child = Command::new(bin("cybctl"))
        .arg("--socket")
        .arg(sock)
        .arg("ls")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Samples the daemon's VmRSS every 50 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, f64)>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(m) = proc_mem_mib(pid, "VmRSS:") {
                    out.push((Instant::now(), m));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            out
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Runs `f` as `uid:gid` (as root when `None`): the sockets it connects carry those
/// credentials.
fn as_user<T: Send + 'static>(
    owner: Option<(u32, u32)>,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    match owner {
        None => Ok(f()),
        Some((uid, gid)) => {
            cyb_tests::as_user(uid, gid, f).with_context(|| format!("cannot act as uid {uid}"))
        }
    }
}

/// Connects `n` sockets to `sock` (stops at the first failure, e.g. EMFILE here).
fn connect_many(sock: &Path, n: usize) -> (Vec<UnixStream>, Option<String>) {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        match UnixStream::connect(sock) {
            Ok(s) => v.push(s),
            Err(e) => return (v, Some(e.to_string())),
        }
    }
    (v, None)
}

/// Whether the peer has closed `s` (read gives end-of-file or an error), without blocking.
fn closed_by_peer(s: &UnixStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 4096];
    let closed = loop {
        match (&mut &*s).read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// What the daemon did with a connection that sent part of a frame.
struct FrameOutcome {
    sent: usize,
    /// Seconds after the connect at which the daemon closed it (None: still open at the end).
    closed_after: Option<f64>,
}

/// `n` connections as `owner`, each announcing `header` bytes and sending `body` of them,
/// then holding on for at most `hold` (less once every one is closed by the daemon).
fn partial_frames(
    sock: &Path,
    owner: Option<(u32, u32)>,
    n: usize,
    header: u32,
    body: usize,
    hold: Duration,
) -> anyhow::Result<Vec<FrameOutcome>> {
    let s = sock.to_path_buf();
    let (conns, err) = as_user(owner, move || connect_many(&s, n))?;
    if let Some(e) = err {
        progress(format!("  {} of {n} connections made: {e}", conns.len()));
    }
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut sent = 0;
                let mut closed_after = None;
                let chunk = vec![b'x'; 1 << 20];
                if c.write_all(&header.to_be_bytes()).is_ok() {
                    while sent < body {
                        let k = chunk.len().min(body - sent);
                        match c.write(&chunk[..k]) {
                            Ok(w) => sent += w,
                            Err(_) => {
                                closed_after = Some(t0.elapsed().as_secs_f64());
                                break;
                            }
                        }
                    }
                } else {
                    closed_after = Some(t0.elapsed().as_secs_f64());
                }
                while closed_after.is_none() && t0.elapsed() < hold {
                    if closed_by_peer(&c) {
                        closed_after = Some(t0.elapsed().as_secs_f64());
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                FrameOutcome { sent, closed_after }
            })
        })
        .collect();
    Ok(threads.into_iter().filter_map(|t| t.join().ok()).collect())
}

/// Figures of one attack.
struct Outcome {
    attack: String,
    rss_before: f64,
    rss_peak: f64,
    rss_after: Option<f64>,
    /// Seconds after the attack stopped until RSS was under the target.
    back_under: Option<f64>,
    ls_max_ms: f64,
    ls_failed: usize,
    ls_total: usize,
    /// Warnings the daemon logged meanwhile.
    log_lines: usize,
    note: String,
}

impl Outcome {
    fn json(&self) -> Value {
        json!({
            "attack": self.attack,
            "rss_before_mib": self.rss_before,
            "rss_peak_mib": self.rss_peak,
            "rss_after_mib": self.rss_after,
            "back_under_40mib_after_s": self.back_under,
            "ls_max_ms": self.ls_max_ms,
            "ls_failed": self.ls_failed,
            "ls_total": self.ls_total,
            "daemon_warnings": self.log_lines,
            "note": self.note,
        })
    }
}

/// Sets the soft descriptor limit of this process to its hard limit (a storm needs
/// thousands).
fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Sets process `pid`'s descriptor limit (soft and hard) to `n`.
fn set_nofile(pid: u32, n: u64) -> anyhow::Result<()> {
    let r = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit reads the new limit from `r` and writes no old limit (null).
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
    ensure!(
        rc == 0,
        "cannot set the descriptor limit of pid {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Runs one attack against a fresh daemon and measures it.
fn one(o: &Opts, attack: Attack, user: (u32, u32), prober: (u32, u32)) -> anyhow::Result<Outcome> {
    let a = &o.abuse;
    let c = Cybd::start(o);
    let pid = c.pid();
    let sock = c.d.socket();
    std::thread::sleep(Duration::from_secs(1));
    let warnings = |d: &Daemon| d.log().lines().filter(|l| l.contains("WARN")).count();
    let log_before = warnings(&c.d);
    let sampler = Sampler::start(pid);
    let probe = Prober::start(sock.clone(), prober.0, prober.1);
    // A quiet second first, for the figure before.
    std::thread::sleep(Duration::from_secs(1));
    let t_start = Instant::now();
    let hold = Duration::from_secs(a.abuse_hold);
    let note = match attack {
        Attack::Frames | Attack::SmallFrames => {
            let (n, header, body) = if attack == Attack::Frames {
                (
                    a.abuse_frames,
                    a.abuse_frame_header_mib.saturating_mul(1 << 20),
                    a.abuse_frame_mib << 20,
                )
            } else {
                let len = a.abuse_small_frame_kib << 10;
                (a.abuse_cap + 1, u32::try_from(len)?, len - 1)
            };
            progress(format!(
                "  {n} connections of uid {} each send {body} bytes of a {header}-byte frame and stall",
                user.0
            ));
            let out = partial_frames(&sock, Some(user), n, header, body, hold)?;
            let closed: Vec<f64> = out.iter().filter_map(|f| f.closed_after).collect();
            let sent: usize = out.iter().map(|f| f.sent).sum();
            format!(
                "{} of {n} closed by the daemon (after {}), {:.1} MiB sent in all",
                closed.len(),
                if closed.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{:.1}-{:.1} s",
                        closed.iter().copied().fold(f64::INFINITY, f64::min),
                        closed.iter().copied().fold(0.0, f64::max)
                    )
                },
                sent as f64 / (1 << 20) as f64
            )
        }
        Attack::StormUser | Attack::StormRoot => {
            let owner = (attack == Attack::StormUser).then_some(user);
            let mut notes = Vec::new();
            for i in 0..a.abuse_storms {
                let s = sock.clone();
                let n = a.abuse_conns;
                let t0 = Instant::now();
                let (conns, err) = as_user(owner, move || connect_many(&s, n))?;
                let made = conns.len();
                let took = t0.elapsed();
                std::thread::sleep(hold.saturating_sub(took).max(Duration::from_secs(2)));
                let open = conns.iter().filter(|c| !closed_by_peer(c)).count();
                progress(format!(
                    "  storm {}: {made} connections in {:.1} s{}, {open} still open after {:.0} s",
                    i + 1,
                    took.as_secs_f64(),
                    err.map(|e| format!(" (then: {e})")).unwrap_or_default(),
                    t0.elapsed().as_secs_f64()
                ));
                notes.push(format!("{made} made, {open} open"));
                drop(conns);
                std::thread::sleep(Duration::from_secs(1));
            }
            format!("per storm: {}", notes.join("; "))
        }
        Attack::Fds => {
            set_nofile(pid, 1024)?;
            let s = sock.clone();
            let (conns, err) = as_user(Some(user), move || connect_many(&s, 1019))?;
            std::thread::sleep(hold);
            let open = conns.iter().filter(|c| !closed_by_peer(c)).count();
            let made = conns.len();
            drop(conns);
            format!(
                "daemon limited to 1024 descriptors; {made} connections made{}, {open} still open after {} s",
                err.map(|e| format!(" (then: {e})")).unwrap_or_default(),
                a.abuse_hold
            )
        }
    };
    let t_stop = Instant::now();
    progress(format!(
        "  stopped after {:.1} s: {note}; measuring for {} s more",
        t_start.elapsed().as_secs_f64(),
        a.abuse_after
    ));
    std::thread::sleep(Duration::from_secs(a.abuse_after));
    let ls = probe.finish();
    let rss = sampler.finish();
    let log_lines = warnings(&c.d).saturating_sub(log_before);
    let before = rss
        .iter()
        .filter(|(t, _)| *t < t_start)
        .map(|x| x.1)
        .fold(0.0, f64::max);
    let peak = rss
        .iter()
        .filter(|(t, _)| *t >= t_start)
        .map(|x| x.1)
        .fold(0.0, f64::max);
    let after_at = t_stop + Duration::from_secs(a.abuse_after);
    let after = rss
        .iter()
        .rev()
        .find(|(t, _)| *t <= after_at)
        .filter(|(t, _)| *t >= t_stop)
        .map(|x| x.1);
    // The first moment after the stop from which RSS stayed under the target.
    let back_under = {
        let tail: Vec<&(Instant, f64)> = rss.iter().filter(|(t, _)| *t >= t_stop).collect();
        let last_over = tail.iter().rposition(|(_, m)| *m >= TARGET_RSS_AFTER_MIB);
        match last_over {
            None => tail.first().map(|_| 0.0),
            Some(i) if i + 1 < tail.len() => Some((tail[i + 1].0 - t_stop).as_secs_f64()),
            Some(_) => None,
        }
    };
    let in_window: Vec<&LsSample> = ls.iter().filter(|s| s.at >= t_start).collect();
    Ok(Outcome {
        attack: format!("{attack:?}"),
        rss_before: before,
        rss_peak: peak,
        rss_after: after,
        back_under,
        ls_max_ms: in_window.iter().map(|s| s.ms).fold(0.0, f64::max),
        ls_failed: in_window.iter().filter(|s| !s.ok).count(),
        ls_total: in_window.len(),
        log_lines,
        note,
    })
}

/// `cyb-bench --abuse`.
pub fn run(o: &Opts) -> anyhow::Result<()> {
    ensure!(is_root(), "--abuse needs root (attackers connect as other users)");
    raise_own_nofile();
    let user = cyb_tests::test_user();
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("--abuse needs the user `nobody` for the other user's `cybctl ls`"))?;
    let prober = (nobody.uid.as_raw(), nobody.gid.as_raw());
    progress(format!(
        "abuse: attacker uid {}, `cybctl ls` as uid {} every 200 ms, daemon from {}",
        user.0,
        prober.0,
        BUILT_IN.get().map_or_else(bin_dir, Clone::clone).display()
    ));
    let mut outcomes = Vec::new();
    for &attack in &o.abuse.abuse_only {
        progress(format!("abuse: {attack:?}"));
        outcomes.push(one(o, attack, user, prober)?);
    }
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|x| {
            vec![
                x.attack.clone(),
                format!("{:.1}", x.rss_before),
                format!("{:.1}", x.rss_peak),
                x.rss_after.map_or("-".into(), |m| format!("{m:.1}")),
                x.back_under.map_or("never".into(), |s| format!("{s:.1}")),
                format!("{:.0}", x.ls_max_ms),
                format!("{}/{}", x.ls_failed, x.ls_total),
                x.log_lines.to_string(),
            ]
        })
        .collect();
    print_table(
        &format!(
            "cybd under abuse (targets: RSS < {TARGET_RSS_DURING_MIB:.0} MiB during, < {TARGET_RSS_AFTER_MIB:.0} MiB within {} s after; another user's ls < {TARGET_LS_MS:.0} ms)",
            o.abuse.abuse_after
        ),
        &[
            "attack",
            "RSS before",
            "RSS peak",
            &format!("RSS {} s after", o.abuse.abuse_after),
            "< 40 MiB after (s)",
            "ls max (ms)",
            "ls failed",
            "warnings logged",
        ],
        &rows,
    );
    for x in &outcomes {
        println!("{}: {}", x.attack, x.note);
    }
    let v = json!({
        "cybd": BUILT_IN.get().map_or_else(bin_dir, Clone::clone).join("cybd").display().to_string(),
        "attacks": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
    });
    if let Some(f) = &o.json_out {
        std::fs::write(f, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
