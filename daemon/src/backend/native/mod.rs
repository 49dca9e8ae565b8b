//! The native backend: a job runs on this host under a per-job supervisor process, in a
//! cgroup of its own, as its owner.
//!
//! - [`runner`]: the supervisors' files, starting a supervisor through the launcher,
//!   handing it the job, watching it through a pidfd, adopting it after a restart.
//! - [`launcher`]: the single-threaded process (`cybd launcher`) that forks supervisors.
//! - [`supervisor`]: the per-job process between daemon and job; [`spawn`] starts the job
//!   from it.
//!
//! [`Native`] puts these behind the [`Backend`] seam. Its prepare starts a supervisor that
//! waits for its job (run directory, `job.json`, cgroup and GPU locks ready); commit hands
//! the supervisor the job. What the supervisor writes when it is done ([`ExitRecord`]) is
//! turned into a typed [`AttemptEnd`] here and nowhere else.

pub mod launcher;
pub mod logfile;
pub mod runner;
pub mod spawn;
pub mod supervisor;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{ProcRef, RunHandle};
use cyb_proto::spec::Backend as Kind;
use cyb_proto::{JobId, JobRecord, JobSpec, Owner, SpecError};
use tracing::{info, warn};

use super::{
    Adoption, Attempt, AttemptEnd, Backend, BackendError, BoxFuture, Exit, NotStarted,
    Prepared as AnyPrepared, Started, Usage,
};
use crate::config::Config;
use crate::host::Host;
use crate::users;
use launcher::Launcher;
use runner::{Adopted, Ended, Running, SupFiles};
use supervisor::{ExitRecord, Launch};

/// Native jobs, run under supervisors forked by one launcher.
#[derive(Clone)]
pub struct Native {
    /// Paths only (they do not change while cybd runs).
    pub(crate) cfg: Arc<Config>,
    pub(crate) host: Arc<Host>,
    pub(crate) launcher: Arc<Launcher>,
    /// This boot's id, recorded with every attempt it starts.
    pub(crate) boot_id: Option<String>,
}

/// A supervisor that waits for its job.
pub struct Prepared {
    pub(crate) spawned: runner::Spawned,
    pub(crate) launch: Launch,
}

/// Makes the handle recorded for a supervised attempt, given its supervisor.
pub(crate) type HandleOf = Arc<dyn Fn(Option<ProcRef>) -> RunHandle + Send + Sync>;

impl Native {
    pub fn new(cfg: Arc<Config>, host: Arc<Host>) -> Native {
        let boot_id = match crate::sys::boot_id() {
            Ok(b) => Some(b),
            Err(e) => {
                warn!("cannot read the kernel's boot id: {e}");
                None
            }
        };
        let launcher = Arc::new(Launcher::with_exe(cfg.cybd_exe.clone()));
        Native {
            cfg,
            host,
            launcher,
            boot_id,
        }
    }

    fn handle(&self, sup: Option<ProcRef>) -> RunHandle {
        RunHandle::Native {
            supervisor: sup,
            boot_id: self.boot_id.clone(),
        }
    }

    /// The end of an attempt, once its supervisor is gone; an attempt lost with its
    /// supervisor first has whatever it left in its cgroup killed and the cgroup removed.
    pub(crate) fn watch(&self, id: JobId, run: Running) -> BoxFuture<AttemptEnd> {
        let host = self.host.clone();
        Box::pin(async move {
            match runner::wait(&run).await {
                Ended::Exit(e) => end_of(&host, *e),
                Ended::Lost(why) => lost(host, id, why).await,
            }
        })
    }
}

/// A lost attempt: nobody watches what it left running, so that is killed first.
pub(crate) async fn lost(host: Arc<Host>, id: JobId, why: String) -> AttemptEnd {
    let _ = tokio::task::spawn_blocking(move || host.remove_job_cgroup(id)).await;
    AttemptEnd::of(Exit::Lost { why })
}

/// Turns a supervisor's exit record into the typed end; the memory cgroup it left for the
/// next job goes back to the pool.
pub(crate) fn end_of(host: &Host, mut e: ExitRecord) -> AttemptEnd {
    if let Some(spare) = e.spare.take() {
        host.keep_spare(spare);
    }
    attempt_end(e)
}

/// How the attempt an exit record describes ended (pure).
pub fn attempt_end(e: ExitRecord) -> AttemptEnd {
    let exit = if e.not_launched {
        Exit::NotStarted(NotStarted::Interrupted)
    } else if e.cancelled {
        Exit::Cancelled {
            by: None,
            code: e.exit_code,
            signal: e.signal,
        }
    } else if e.timed_out {
        Exit::TimedOut {
            code: e.exit_code,
            signal: e.signal,
        }
    } else if !e.started {
        let why = e
            .error
            .clone()
            .unwrap_or_else(|| "the job could not be started".into());
        Exit::NotStarted(NotStarted::Failed(why))
    } else if let Some(why) = e
        .error
        .clone()
        .filter(|_| e.exit_code.is_none() && e.signal.is_none())
    {
        Exit::Lost { why }
    } else if e.oom_killed && e.exit_code != Some(0) {
        Exit::OomKilled {
            code: e.exit_code,
            signal: e.signal,
        }
    } else if let Some(code) = e.exit_code {
        Exit::Exited { code }
    } else if let Some(signal) = e.signal {
        Exit::Signaled { signal }
    } else {
        Exit::Lost {
            why: "the job ended without an exit status".into(),
        }
    };
    let mut errors = Vec::new();
    if let Some(a) = e.artifacts_error {
        errors.push(format!("not every artifact was collected: {a}"));
    }
    if let Some(c) = e.cgroup_error {
        errors.push(format!("cgroup not cleaned up: {c}"));
    }
    AttemptEnd {
        exit,
        usage: Usage {
            started_at: e.started_at,
            finished_at: e.finished_at,
            peak_memory_bytes: e.peak_memory_bytes,
            cpu_ms: e.cpu_usage_ms,
            container_id: e.container_id,
        },
        errors,
    }
}

pub(crate) fn task_failed(id: JobId, e: tokio::task::JoinError) -> BackendError {
    BackendError::Task {
        id,
        why: e.to_string(),
    }
}

impl Backend for Native {
    fn kind(&self) -> Kind {
        Kind::Native
    }

    fn admit(&self, spec: &JobSpec, _owner: &Owner, cfg: &Config) -> Result<(), SpecError> {
        if spec.gpus() > 0
            && let Err(why) = self.host.gpu_fencing()
        {
            return Err(SpecError::field(
                "resources.gpus",
                format!("this host cannot keep a job to its own GPUs: {why}"),
            ));
        }
        if cfg.require_limits
            && let Err(e) = self.host.check_enforceable(cfg, spec)
        {
            let field = match &e {
                crate::host::HostError::NotEnforceable { field, .. } => field,
                _ => "resources",
            };
            return Err(SpecError::field(field, e.to_string()));
        }
        Ok(())
    }

    fn not_enforced(&self, spec: &JobSpec, cfg: &Config) -> Option<cyb_proto::NotEnforced> {
        self.host.not_enforced(cfg, spec)
    }

    fn handle_before_start(&self, _id: JobId, _attempt: u32) -> RunHandle {
        self.handle(None)
    }

    fn prepare(&self, a: Attempt) -> BoxFuture<Result<AnyPrepared, BackendError>> {
        let (host, launcher) = (self.host.clone(), self.launcher.clone());
        let id = a.rec.id;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                prepare_supervised(&host, &launcher, a, runner::launch_for, true).map(AnyPrepared::Native)
            })
            .await
            .map_err(|e| task_failed(id, e))?
        })
    }

    fn commit(&self, p: AnyPrepared) -> BoxFuture<Result<Started, BackendError>> {
        let AnyPrepared::Native(p) = p else {
            return Box::pin(async {
                Err(BackendError::Task {
                    id: 0,
                    why: "not a native attempt".into(),
                })
            });
        };
        let this = self.clone();
        self.commit_as(p, Arc::new(move |sup| this.handle(sup)))
    }

    fn abort(&self, p: AnyPrepared) -> BoxFuture<()> {
        let AnyPrepared::Native(p) = p else {
            return Box::pin(async {});
        };
        Self::abort_prepared(p)
    }

    /// The supervisor keeps the grace period it was started with (`kill_grace` then).
    fn cancel(&self, id: JobId, handle: &RunHandle, _grace: Duration) -> BoxFuture<Result<(), BackendError>> {
        Self::cancel_supervised(id, handle)
    }

    fn adopt(&self, rec: &JobRecord) -> BoxFuture<Adoption> {
        let this = self.clone();
        self.adopt_as(rec, Arc::new(move |sup| this.handle(sup)))
    }

    fn finished(&self, id: JobId) -> BoxFuture<()> {
        let files = SupFiles::new(&self.cfg, id);
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || files.remove()).await;
        })
    }

    fn sweep(&self, recorded: BTreeSet<JobId>, alive: BTreeSet<JobId>) -> BoxFuture<()> {
        let (host, cfg) = (self.host.clone(), self.cfg.clone());
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || {
                // Cgroups of jobs that are not running any more (their supervisor is gone,
                // or cybd was killed between creating a cgroup and starting the job).
                host.sweep(&alive);
                // Files of jobs whose end was recorded just before the last daemon died.
                runner::sweep_sup_dir(&cfg, &recorded);
            })
            .await;
        })
    }
}

/// Builds an attempt's launch description: (config, record, account, attempt, GPUs, GPU
/// environment).
pub(crate) type LaunchOf = fn(
    &Config,
    &JobRecord,
    &users::Account,
    u32,
    &[u32],
    Vec<(String, String)>,
) -> Result<Launch, BackendError>;

/// Prepares a supervised attempt (blocking): the job's cgroup with its limits and device
/// rules, its GPU locks handed to a supervisor that waits for the launch `launch_of` makes.
/// `confine`: the job gets a cgroup of cybd's (a native job); a container gets its cgroup
/// from the engine, so a docker job only takes its GPU locks here.
pub(crate) fn prepare_supervised(
    host: &Host,
    launcher: &Launcher,
    a: Attempt,
    launch_of: LaunchOf,
    confine: bool,
) -> Result<Prepared, BackendError> {
    let Attempt {
        rec,
        attempt,
        gpus,
        leases,
        cfg,
    } = a;
    let id = rec.id;
    let acct = users::account_cached(rec.owner.uid).map_err(|e| BackendError::Account {
        id,
        uid: rec.owner.uid,
        why: e.to_string(),
    })?;
    let mut launch = launch_of(&cfg, &rec, &acct, attempt, &gpus, host.gpu_env(&gpus))?;
    let conf = if confine {
        host.prepare(&cfg, &rec, &gpus, leases, attempt)
            .map_err(|source| BackendError::Host { id, source })?
    } else {
        crate::host::Confinement {
            cgroup: None,
            gpus: leases,
        }
    };
    launch.cgroup = conf.cgroup;
    let held: Vec<_> = conf.gpus.iter().map(|l| l.as_fd()).collect();
    let files = SupFiles::new(&cfg, id);
    match runner::spawn_supervisor(launcher, files, &rec, &launch, &held) {
        Ok(spawned) => {
            drop(held);
            crate::host::hand_gpus_to(conf.gpus, spawned.pid());
            Ok(Prepared { spawned, launch })
        }
        Err(e) => {
            drop(held);
            if let Some(cg) = &launch.cgroup {
                let _ = cg.remove();
            }
            Err(e)
        }
    }
}

/// What every supervised backend shares: handing over, abandoning, cancelling and adopting
/// an attempt run by a supervisor; only the handle recorded differs.
impl Native {
    pub(crate) fn commit_as(
        &self,
        p: Prepared,
        handle_of: HandleOf,
    ) -> BoxFuture<Result<Started, BackendError>> {
        let id = p.launch.job_id;
        let this = self.clone();
        Box::pin(async move {
            let run = tokio::task::spawn_blocking(move || runner::hand_over(p.spawned, &p.launch))
                .await
                .map_err(|e| task_failed(id, e))?;
            Ok(Started {
                handle: handle_of(Some(run.proc_ref())),
                end: this.watch(id, run),
            })
        })
    }

    pub(crate) fn abort_prepared(p: Prepared) -> BoxFuture<()> {
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || {
                runner::abandon(p.spawned);
                if let Some(cg) = &p.launch.cgroup {
                    let _ = cg.remove();
                }
            })
            .await;
        })
    }

    /// Asks the attempt's supervisor to cancel its job; it keeps the grace period it was
    /// started with (`kill_grace` then).
    pub(crate) fn cancel_supervised(id: JobId, handle: &RunHandle) -> BoxFuture<Result<(), BackendError>> {
        let Some(sup) = handle.supervisor() else {
            // Not handed over yet: the scheduler cancels it once it is.
            return Box::pin(async { Ok(()) });
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || runner::cancel(sup))
                .await
                .map_err(|e| task_failed(id, e))?
                .map_err(|source| BackendError::Signal {
                    id,
                    pid: sup.pid,
                    source,
                })
        })
    }

    /// Finds the supervisor of the attempt `rec` (running) describes.
    pub(crate) fn adopt_as(&self, rec: &JobRecord, handle_of: HandleOf) -> BoxFuture<Adoption> {
        let id = rec.id;
        let (attempt, rebooted) = match &rec.state {
            cyb_proto::JobState::Running { attempt, handle, .. } => (
                *attempt,
                handle.boot_id().is_some() && handle.boot_id() != self.boot_id.as_deref(),
            ),
            _ => {
                return Box::pin(async move {
                    Adoption::Ended(AttemptEnd::of(Exit::Lost {
                        why: format!("job {id} is not running"),
                    }))
                });
            }
        };
        let files = SupFiles::new(&self.cfg, id);
        let run_dir = PathBuf::from(&rec.run_dir);
        let this = self.clone();
        Box::pin(async move {
            let found =
                tokio::task::spawn_blocking(move || runner::adopt(files, &run_dir, attempt, rebooted))
                    .await
                    .unwrap_or_else(|e| Adopted::Lost(format!("adoption failed: {e}")));
            match found {
                Adopted::Alive(run) => {
                    info!(job_id = id, pid = run.sup.pid, "re-adopted running job");
                    Adoption::Running(Started {
                        handle: handle_of(Some(run.proc_ref())),
                        end: this.watch(id, run),
                    })
                }
                Adopted::Ended(e) => Adoption::Ended(end_of(&this.host, e)),
                Adopted::Lost(why) => Adoption::Ended(lost(this.host.clone(), id, why).await),
                Adopted::NeverLaunched => {
                    info!(
                        job_id = id,
                        "job was being started when cybd stopped; queueing it again"
                    );
                    Adoption::Ended(AttemptEnd::of(Exit::NotStarted(NotStarted::Interrupted)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(f: impl FnOnce(&mut ExitRecord)) -> ExitRecord {
        let mut e = ExitRecord {
            attempt: 1,
            pid: 10,
            started: true,
            ..Default::default()
        };
        f(&mut e);
        e
    }

    #[test]
    fn a_supervisors_exit_record_becomes_a_typed_end() {
        let cases: Vec<(ExitRecord, Exit)> = vec![
            (
                rec(|e| {
                    e.not_launched = true;
                    e.started = false
                }),
                Exit::NotStarted(NotStarted::Interrupted),
            ),
            (
                rec(|e| {
                    e.started = false;
                    e.error = Some("no such file: ./x".into())
                }),
                Exit::NotStarted(NotStarted::Failed("no such file: ./x".into())),
            ),
            (rec(|e| e.exit_code = Some(0)), Exit::Exited { code: 0 }),
            (rec(|e| e.exit_code = Some(3)), Exit::Exited { code: 3 }),
            (rec(|e| e.signal = Some(11)), Exit::Signaled { signal: 11 }),
            (
                rec(|e| {
                    e.timed_out = true;
                    e.signal = Some(9)
                }),
                Exit::TimedOut {
                    code: None,
                    signal: Some(9),
                },
            ),
            (
                rec(|e| {
                    e.cancelled = true;
                    e.signal = Some(15)
                }),
                Exit::Cancelled {
                    by: None,
                    code: None,
                    signal: Some(15),
                },
            ),
            (
                rec(|e| {
                    e.oom_killed = true;
                    e.signal = Some(9)
                }),
                Exit::OomKilled {
                    code: None,
                    signal: Some(9),
                },
            ),
            // The OOM killer took a helper process; the job itself still succeeded.
            (
                rec(|e| {
                    e.oom_killed = true;
                    e.exit_code = Some(0)
                }),
                Exit::Exited { code: 0 },
            ),
            (
                rec(|e| e.error = Some("cannot wait for the job".into())),
                Exit::Lost {
                    why: "cannot wait for the job".into(),
                },
            ),
            (
                rec(|_| {}),
                Exit::Lost {
                    why: "the job ended without an exit status".into(),
                },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(attempt_end(e.clone()).exit, want, "{e:?}");
        }
    }

    #[test]
    fn usage_and_every_error_around_the_job_are_kept() {
        let end = attempt_end(rec(|e| {
            e.exit_code = Some(0);
            e.peak_memory_bytes = Some(4096);
            e.cpu_usage_ms = Some(12);
            e.artifacts_error = Some("out/a.txt: is a directory".into());
            e.cgroup_error = Some("cannot remove job_4: busy".into());
        }));
        assert_eq!(
            (end.usage.peak_memory_bytes, end.usage.cpu_ms),
            (Some(4096), Some(12))
        );
        assert_eq!(
            end.errors,
            [
                "not every artifact was collected: out/a.txt: is a directory",
                "cgroup not cleaned up: cannot remove job_4: busy"
            ]
        );
    }
}
