//! The daemon run inside the test process ([`cybd::run_until`]) rather than as a `cybd`
//! process: on a thread of its own with its own single-threaded tokio runtime, as `cybd`
//! runs it, stopped through a channel instead of a signal. Tests of the scheduling policy
//! (order, slots, dependencies, retries, hold and release) use it through
//! [`Daemon::in_process`](crate::Daemon::in_process), with the directories, the cybctl
//! calls and the waits of the binary harness.
//!
//! What belongs to the whole process stays the test's: no global log subscriber (the
//! daemon's threads log into `daemon.log` through a default of their own), no signal
//! handlers, no descriptor limit change, no systemd. Supervisors are still forked by a
//! `cybd launcher` process, started from the real `cybd` binary (`Config::cybd_exe`):
//! the test binary cannot be one.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use cybd::Control;
use tokio::sync::{mpsc, oneshot};

thread_local! {
    /// The daemon's log subscriber, the default of each of its runtime's blocking threads.
    static LOG: RefCell<Option<tracing::dispatcher::DefaultGuard>> = const { RefCell::new(None) };
}

/// A daemon running in this process.
pub struct InProc {
    control: mpsc::UnboundedSender<Control>,
    /// Dropping the daemon mid-flight, as a kill -9 would (see [`InProc::abort`]).
    abort: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProc {
    /// Starts a daemon on the configuration file `config` (as `cybd --config`), logging at
    /// debug level into `log`. It is ready once it answers on its socket (the caller waits).
    pub fn start(config: &Path, log: &Path, cybd_exe: PathBuf) -> InProc {
        let source = cybd::ConfigSource {
            path: Some(config.to_path_buf()),
            user_mode: false,
        };
        let mut cfg = cybd::Config::load(Some(config), false, &|k| std::env::var(k).ok())
            .unwrap_or_else(|e| panic!("the in-process daemon's config: {e}"));
        cfg.cybd_exe = cybd_exe;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let dispatch = cybd::logging::file_dispatch("debug", file);
        let (control, rx) = mpsc::unbounded_channel();
        let (abort, aborted) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cybd-inproc".into())
            .spawn(move || -> anyhow::Result<()> {
                let for_blocking = dispatch.clone();
                // One runtime thread, as in `cybd` (main.rs); spawn_blocking threads log too.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(move || {
                        let g = tracing::dispatcher::set_default(&for_blocking);
                        LOG.with(|l| *l.borrow_mut() = Some(g));
                    })
                    .on_thread_stop(|| drop(LOG.with(|l| l.borrow_mut().take())))
                    .build()?;
                let res = tracing::dispatcher::with_default(&dispatch, || {
                    rt.block_on(async {
                        let opts = cybd::RunOptions { whole_process: false };
                        tokio::select! {
                            r = cybd::run_until(cfg, source, opts, rx) => r,
                            _ = aborted => Ok(()),
                        }
                    })
                });
                // Whatever the daemon left running (connections, blocking reads) ends here.
                rt.shutdown_timeout(Duration::from_secs(5));
                res
            })
            .expect("spawn the in-process daemon's thread");
        InProc {
            control,
            abort: Some(abort),
            thread: Some(thread),
        }
    }

    /// Whether the daemon has returned (failed to start, or stopped).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the daemon to read its configuration file again (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.control.send(Control::Reload);
    }

    /// Stops the daemon as SIGTERM does and waits; returns how it ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.control.send(Control::Stop);
        self.join()
    }

    /// Drops the daemon wherever it is, with no step of its stopping (its socket file stays),
    /// as near a kill -9 as a thread gets: a record write already handed to a blocking
    /// thread still completes.
    pub fn abort(mut self) -> anyhow::Result<()> {
        if let Some(a) = self.abort.take() {
            let _ = a.send(());
        }
        self.join()
    }

    fn join(&mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the in-process daemon panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        let _ = self.join();
    }
}
