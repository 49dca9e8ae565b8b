//! cybd, the job daemon, as a library: [`run`] starts every stage of the data flow
//!
//! ```text
//! incoming/*.json ──► intake ──► scheduler (owns the queue) ──► runner ──► supervisor
//! cybctl ──RPC──► server ──┘          │ ▲                                  └──► <logs>/run_<id>/
//!                                     ▼ └──── exits ◄── pidfd watch
//!                                   store (one durable record per job)
//! ```
//!
//! so tests can start a daemon in-process, while `main.rs` is only argument parsing.

pub mod callback;
pub mod cgroup;
pub mod config;
pub mod fsutil;
pub mod gpu;
pub mod history;
pub mod host;
pub mod intake;
pub mod launcher;
pub mod logging;
pub mod runner;
pub mod scheduler;
pub mod server;
pub mod spawn;
pub mod store;
pub mod supervisor;
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

/// Binds the RPC socket, replacing a stale one left by a daemon that died.
fn bind_socket(cfg: &Config) -> anyhow::Result<UnixListener> {
    let path = &cfg.paths.socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
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

/// Runs the daemon until SIGTERM or SIGINT. Jobs keep running under their supervisors when
/// the daemon stops, and the next daemon adopts them; only when systemd stops the unit for
/// good are they cancelled first.
pub async fn run(cfg: Config, source: ConfigSource) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    // Each RPC connection holds a descriptor; jobs get the starting limit back (launcher).
    match sys::raise_nofile_limit() {
        Ok((old, new)) if new > old => info!("descriptor limit raised from {old} to {new}"),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the descriptor limit: {e}"),
    }
    for d in [&cfg.paths.spool, &cfg.paths.logs, &cfg.paths.runtime] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    intake::Intake::prepare_dirs(&cfg).context("cannot prepare the spool")?;
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || runner::prepare_sup_dir(&c))
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
    let (sched, handle, rx) = scheduler::Scheduler::recover(cfg.clone(), store, found, host.clone()).await;
    let sched_task = tokio::spawn(sched.run(rx));
    let known = handle
        .ask(|reply| scheduler::Msg::SpoolOrigins { reply })
        .await
        .unwrap_or_default();
    let (cfg_tx, live) = tokio::sync::watch::channel(cfg.clone());
    let (listener, bound) =
        match systemd::activated_listener().context("cannot use the socket from systemd")? {
            Some(l) => (
                UnixListener::from_std(l).context("cannot use the socket from systemd")?,
                false,
            ),
            None => (bind_socket(&cfg)?, true),
        };
    tokio::spawn(server::serve(listener, live.clone(), handle.clone(), host));
    tokio::spawn(callback::run(live.clone()));
    tokio::spawn(intake::Intake::new(live, handle.clone(), known).run());
    info!(
        records = n,
        socket = %cfg.paths.socket.display(),
        spool = %cfg.paths.spool.display(),
        "cybd {} ready",
        env!("CARGO_PKG_VERSION")
    );
    systemd::ready(&format!("ready, {n} job records"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                systemd::reloading();
                let src = source.clone();
                match tokio::task::spawn_blocking(move || src.load()).await {
                    Ok(Ok(mut new)) => {
                        let old = cfg_tx.borrow().clone();
                        if new.paths != old.paths {
                            warn!("paths cannot change while cybd runs; keeping the old ones until a restart");
                            new.paths = old.paths.clone();
                        }
                        let new = Arc::new(new);
                        let _ = cfg_tx.send(new.clone());
                        let _ = handle.send(scheduler::Msg::Reload(new));
                    }
                    Ok(Err(e)) => error!("configuration not reloaded, keeping the old one: {e}"),
                    Err(e) => error!("configuration not reloaded: {e}"),
                }
                systemd::ready("configuration reloaded");
            }
        }
    }
    systemd::stopping();
    let stopping_for_good = systemd::under_systemd()
        && tokio::task::spawn_blocking(systemd::unit_is_stopping)
            .await
            .unwrap_or(false);
    if stopping_for_good {
        let grace = cfg_tx.borrow().kill_grace + std::time::Duration::from_secs(15);
        match tokio::time::timeout(grace, handle.ask(scheduler::Msg::Shutdown)).await {
            Ok(_) => info!("stopping: every job has ended"),
            Err(_) => warn!("stopping: jobs still running after {grace:?}"),
        }
    } else {
        info!("stopping; running jobs keep running under their supervisors");
    }
    sched_task.abort();
    if bound {
        let _ = std::fs::remove_file(&cfg.paths.socket);
    }
    Ok(())
}
