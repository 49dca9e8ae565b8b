//! cybd, the job daemon, as a library: [`run`] starts every stage of the data flow
//!
//! ```text
//! incoming/*.json ──► intake ──► scheduler (owns the queue) ──► backend ──► supervisor
//! cybctl ──RPC──► server ──┘          │ ▲                                  └──► <logs>/run_<id>/
//!                                     ▼ └──── typed ends ◄── backend watch
//!                                   store (one durable record per job)    results ──► result.json
//! ```
//!
//! so tests can start a daemon in-process, while `main.rs` is only argument parsing.

pub mod backend;
pub mod callback;
pub mod cgroup;
pub mod cleanup;
pub mod config;
pub mod fsutil;
pub mod gpu;
pub mod history;
pub mod host;
pub mod intake;
pub mod logging;
pub mod results;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod sys;
pub mod systemd;
pub mod users;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::UnixListener;
use tracing::{error, info, warn};

pub use config::Config;

/// "cannot create DIR", saying where a user-mode runtime directory came from.
fn cannot_create(cfg: &Config, dir: &std::path::Path) -> String {
    match &cfg.runtime_source {
        Some(src) if dir.starts_with(&cfg.paths.runtime) => {
            format!(
                "cannot create {} (the runtime directory: {src}; set `paths.runtime` in the config to choose another)",
                dir.display()
            )
        }
        _ => format!("cannot create {}", dir.display()),
    }
}

/// Binds the RPC socket, replacing a stale one left by a daemon that died.
fn bind_socket(cfg: &Config) -> anyhow::Result<UnixListener> {
    let path = &cfg.paths.socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| cannot_create(cfg, parent))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        // A daemon killed a moment ago can leave its socket accepting for a few ms after it
        // is gone; only one that keeps accepting for a second is a live daemon.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::os::unix::net::UnixStream::connect(path).is_ok() {
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("another cybd is already listening on {}", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    // Everyone may connect; what a caller may do is decided by its peer credentials.
    let mode = if cfg.user_mode { 0o600 } else { 0o666 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Takes `<spool>/cybd.lock` (flock) for as long as the daemon runs; fails at once, naming
/// the holder, if another cybd runs on this spool. The kernel drops the lock with the
/// process, however it ends.
fn hold_spool(cfg: &Config) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = cfg.paths.spool.join("cybd.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "another cybd{} already runs on the spool {} (it holds {}); stop it first",
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                },
                cfg.paths.spool.display(),
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    // Who holds it, for the message above (best effort).
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

/// Where the configuration came from, so SIGHUP can read it again.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub user_mode: bool,
}

impl ConfigSource {
    fn load(&self) -> Result<Config, config::ConfigError> {
        Config::load(self.path.as_deref(), self.user_mode, &|k| std::env::var(k).ok())
    }
}

/// What the host of a running daemon asks of it: the signals in `cybd` ([`run`]), a
/// channel of a test in-process ([`run_until`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Read the configuration again (SIGHUP).
    Reload,
    /// Stop (SIGTERM, SIGINT), as when every sender of the channel is gone.
    Stop,
}

/// How the daemon shares its process.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// The daemon is the whole process (the `cybd` binary): it raises the process's
    /// descriptor limit, takes a socket passed by systemd and tells systemd how it is
    /// doing. A daemon embedded in another program (the in-process tests) leaves what
    /// belongs to the whole process alone.
    pub whole_process: bool,
}

/// Runs the daemon until SIGTERM or SIGINT, reading the configuration again on SIGHUP.
/// Jobs keep running under their supervisors when the daemon stops, and the next daemon
/// adopts them; only when systemd stops the unit for good are they cancelled first.
pub async fn run(cfg: Config, source: ConfigSource) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(c).is_err() {
                break;
            }
        }
    });
    run_until(cfg, source, RunOptions { whole_process: true }, rx).await
}

/// Runs the daemon until `control` says [`Control::Stop`] or is closed; [`run`] feeds it
/// from signals, a test that runs the daemon in its own process from a channel. Every task
/// the daemon spawned is ended before this returns (the launcher, seeing its socket
/// close, exits by itself).
pub async fn run_until(
    cfg: Config,
    source: ConfigSource,
    opts: RunOptions,
    mut control: tokio::sync::mpsc::UnboundedReceiver<Control>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    // Each RPC connection holds a descriptor; jobs get the starting limit back (launcher).
    match opts.whole_process.then(sys::raise_nofile_limit) {
        Some(Ok((old, new))) if new > old => info!("descriptor limit raised from {old} to {new}"),
        Some(Ok(_)) | None => {}
        Some(Err(e)) => warn!("cannot raise the descriptor limit: {e}"),
    }
    for d in [&cfg.paths.spool, &cfg.paths.logs, &cfg.paths.runtime] {
        std::fs::create_dir_all(d).with_context(|| cannot_create(&cfg, d))?;
    }
    // One daemon per spool, decided before anything is read or adopted: a second one
    // started by mistake leaves the first one's jobs alone.
    let _one = hold_spool(&cfg)?;
    intake::Intake::prepare_dirs(&cfg).context("cannot prepare the spool")?;
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || backend::native::runner::prepare_sup_dir(&c))
        .await?
        .context("cannot prepare the supervisors' directory")?;
    callback::prepare(&cfg.paths).context("cannot prepare the callback outbox")?;
    if let Some(p) = cfg.callbacks.secret_file.clone()
        && let Ok(Err(e)) = tokio::task::spawn_blocking(move || callback::read_secret(Some(&p))).await
    {
        warn!("callbacks will not be sent until the secret is fixed: {e}");
    }
    let store = store::Store::open(&cfg.paths.jobs())?;
    let found = {
        let (s, c) = (store.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || scheduler::Recovered::read(&s, &c)).await?
    };
    for (path, why) in found.quarantined() {
        warn!(path = %path.display(), "job record moved aside: {why}");
    }
    let n = found.records();
    let host_cfg = cfg.clone();
    let host = Arc::new(
        tokio::task::spawn_blocking(move || host::Host::init(&host_cfg))
            .await
            .context("cannot inspect this host's cgroups and GPUs")?,
    );
    let native = backend::native::Native::new(cfg.clone(), host.clone());
    let docker = backend::docker::Docker::new(native.clone());
    host.set_docker_engine(docker.engine());
    // The first check of the engine before recovery, so docker jobs found running are
    // adopted with the engine's answers at hand (a down engine is simply noted).
    if !cfg.docker.allowed_images.is_empty() {
        let _ = docker.engine().check().await;
    }
    docker.start_monitor(|_| {});
    let backends = backend::Backends::new(vec![Arc::new(native), Arc::new(docker)]);
    let (sched, handle, rx) =
        scheduler::Scheduler::recover(cfg.clone(), store, found, host.clone(), backends).await;
    let sched_task = tokio::spawn(sched.run(rx));
    let known = handle
        .ask(|reply| scheduler::Request::SpoolOrigins { reply })
        .await
        .unwrap_or_default();
    let (cfg_tx, live) = tokio::sync::watch::channel(cfg.clone());
    let activated = match opts.whole_process {
        true => systemd::activated_listener().context("cannot use the socket from systemd")?,
        false => None,
    };
    let (listener, bound) = match activated {
        Some(l) => (
            UnixListener::from_std(l).context("cannot use the socket from systemd")?,
            false,
        ),
        None => (bind_socket(&cfg)?, true),
    };
    let server_task = tokio::spawn(server::serve(listener, live.clone(), handle.clone(), host));
    let callback_task = tokio::spawn(callback::run(live.clone()));
    let intake_task = tokio::spawn(intake::Intake::new(live, handle.clone(), known).run());
    // sd_notify only for the whole process: NOTIFY_SOCKET is the process's, not ours.
    let notify = |f: &dyn Fn()| {
        if opts.whole_process {
            f()
        }
    };
    info!(
        records = n,
        socket = %cfg.paths.socket.display(),
        spool = %cfg.paths.spool.display(),
        "cybd {} ready",
        env!("CARGO_PKG_VERSION")
    );
    notify(&|| systemd::ready(&format!("ready, {n} job records")));
    while let Some(Control::Reload) = control.recv().await {
        notify(&systemd::reloading);
        let src = source.clone();
        match tokio::task::spawn_blocking(move || src.load()).await {
            Ok(Ok(mut new)) => {
                let old = cfg_tx.borrow().clone();
                if new.paths != old.paths {
                    warn!("paths cannot change while cybd runs; keeping the old ones until a restart");
                    new.paths = old.paths.clone();
                }
                // Not a key of the file: whoever started the daemon chose it.
                new.cybd_exe = old.cybd_exe.clone();
                let new = Arc::new(new);
                let _ = cfg_tx.send(new.clone());
                let _ = handle.send(scheduler::Request::Reload(new));
            }
            Ok(Err(e)) => error!("configuration not reloaded, keeping the old one: {e}"),
            Err(e) => error!("configuration not reloaded: {e}"),
        }
        notify(&|| systemd::ready("configuration reloaded"));
    }
    notify(&systemd::stopping);
    let user_manager = cfg.user_mode;
    let stopping_for_good = opts.whole_process
        && systemd::under_systemd()
        && tokio::task::spawn_blocking(move || systemd::unit_is_stopping(user_manager))
            .await
            .unwrap_or(false);
    if stopping_for_good {
        let grace = cfg_tx.borrow().kill_grace + std::time::Duration::from_secs(15);
        match tokio::time::timeout(grace, handle.ask(scheduler::Request::Shutdown)).await {
            Ok(_) => info!("stopping: every job has ended"),
            Err(_) => warn!("stopping: jobs still running after {grace:?}"),
        }
    } else {
        info!("stopping; running jobs keep running under their supervisors");
    }
    server_task.abort();
    intake_task.abort();
    callback_task.abort();
    sched_task.abort();
    if bound {
        let _ = std::fs::remove_file(&cfg.paths.socket);
    }
    Ok(())
}
