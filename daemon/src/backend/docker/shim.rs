//! The docker side of a job's supervisor: in the supervisor process (forked by the
//! launcher, root, outliving any daemon restart), the container cybd created is attached,
//! started, waited for, stopped on cancel or timeout (the engine's stop: TERM, the grace
//! period, KILL), and its end read back from `inspect`, in the manner of conmon for podman.
//!
//! Output is read through attach (`Tty=false`: frames tagged stdout or stderr) from before
//! the container starts, so a container that lives a millisecond still leaves its first
//! line, and written to the run directory's logs under the same cap as a native job's.
//! Because the supervisor, not the daemon, holds the attach stream, a daemon killed and
//! restarted meanwhile loses and doubles nothing.
//!
//! If the engine goes away under a running container, the supervisor keeps asking for it
//! for `[docker] lost_engine_grace`: a container the engine reports ended is recorded as
//! the engine says; one it cannot find out about is `lost`.

use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::{AttachContainerOptions, StopContainerOptions, WaitContainerOptions};
use cyb_proto::Timestamp;
use futures::{Stream, StreamExt};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use serde::{Deserialize, Serialize};

use super::engine;
use crate::backend::native::logfile::LogFile;
use crate::backend::native::supervisor::{ExitRecord, Launch};

/// What a docker job's supervisor needs beside the native launch description.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerLaunch {
    /// The Engine API socket.
    pub socket: String,
    /// The container's name (cybd created it, stopped).
    pub container: String,
    /// Its engine id.
    pub container_id: String,
    pub api_timeout_ms: u64,
    pub lost_engine_grace_ms: u64,
    /// The container's parent cgroup (`usage`), with the cgroupfs driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    /// The engine's cgroup version (`1`, `2`).
    #[serde(default)]
    pub cgroup_version: String,
}

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
type Wait = Pin<
    Box<dyn Stream<Item = Result<bollard::models::ContainerWaitResponse, bollard::errors::Error>> + Send>,
>;

/// Drives the container of launch `l` to its end and fills in `exit`.
pub(crate) fn run(
    l: &Launch,
    d: &DockerLaunch,
    mut logs: [LogFile; 2],
    signals: &SignalFd,
    exit: &mut ExitRecord,
) {
    exit.container_id = Some(d.container_id.clone());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            exit.error = Some(format!("cannot start the supervisor's event loop: {e}"));
            return;
        }
    };
    rt.block_on(drive(l, d, &mut logs, signals, exit));
    drop(rt);
    if let Some(rel) = &d.cgroup_parent {
        if exit.started {
            let u = super::usage::read(rel, &d.cgroup_version);
            exit.peak_memory_bytes = u.peak_memory_bytes;
            exit.cpu_usage_ms = u.cpu_ms;
            exit.oom_killed |= u.oom_killed;
        }
        if let Err(e) = super::usage::remove(rel) {
            exit.cgroup_error = Some(e);
        }
    }
}

/// Why the supervisor ended the container early.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EndedBy {
    Cancel,
    Timeout,
}

async fn drive(
    l: &Launch,
    d: &DockerLaunch,
    logs: &mut [LogFile; 2],
    signals: &SignalFd,
    exit: &mut ExitRecord,
) {
    let socket = std::path::PathBuf::from(&d.socket);
    let api_timeout = Duration::from_millis(d.api_timeout_ms);
    let docker = match engine::connect(&socket, api_timeout).await {
        Ok(c) => c,
        Err(e) => {
            exit.error = Some(e);
            return;
        }
    };
    let name = d.container.as_str();
    // Attached before it starts: nothing it writes is missed.
    let mut output = match attach(&docker, name).await {
        Ok(o) => o,
        Err(e) => {
            exit.error = Some(format!(
                "cannot attach to container {name}: {}",
                engine::engine_error(&socket, &e)
            ));
            return;
        }
    };
    exit.started_at = Some(Timestamp::now());
    if let Err(e) = docker.start_container(name, None).await {
        exit.error = Some(format!(
            "cannot start container {name}: {}",
            engine::engine_error(&socket, &e)
        ));
        return;
    }
    exit.started = true;
    let sigfd = watch_signals(signals);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(l.timeout_ms);
    let grace_secs = i32::try_from(l.grace_ms.div_ceil(1000)).unwrap_or(i32::MAX);
    let mut ended_by: Option<EndedBy> = None;
    let mut stop: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = None;
    let mut wait: Wait = Box::pin(docker.wait_container(name, None::<WaitContainerOptions>));
    let mut out_done = false;
    let mut status: Option<i64> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    // Set while the engine is out of reach: since when.
    let mut lost_since: Option<(Instant, String)> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365 * 30);
    loop {
        if status.is_some() && (out_done || drain_until.is_some_and(|t| tokio::time::Instant::now() >= t)) {
            break;
        }
        if let Some((since, why)) = &lost_since
            && since.elapsed() >= Duration::from_millis(d.lost_engine_grace_ms)
        {
            exit.error = Some(format!(
                "lost the docker engine while container {name} ran, and it did not come back within {}: {why}",
                humantime::format_duration(Duration::from_millis(d.lost_engine_grace_ms))
            ));
            break;
        }
        let reconnect_at = lost_since
            .as_ref()
            .map(|_| tokio::time::Instant::now() + Duration::from_millis(500));
        tokio::select! {
            item = output.next(), if !out_done => match item {
                Some(Ok(LogOutput::StdOut { message })) => logs[0].keep(&message),
                Some(Ok(LogOutput::StdErr { message })) => logs[1].keep(&message),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => out_done = true,
            },
            w = wait.next(), if status.is_none() && lost_since.is_none() => match w {
                Some(Ok(r)) => {
                    status = Some(r.status_code);
                    drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    status = Some(code);
                    drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                Some(Err(e)) => lost_since = Some((Instant::now(), engine::engine_error(&socket, &e))),
                None => lost_since = Some((Instant::now(), "the engine closed the wait".into())),
            },
            _ = tokio::time::sleep_until(reconnect_at.unwrap_or(far)), if reconnect_at.is_some() => {
                // The engine went away: is it back, and what became of the container?
                if let Ok(c) = engine::connect(&socket, api_timeout).await {
                    match c.inspect_container(name, None).await {
                        Ok(i) => {
                            let st = i.state.unwrap_or_default();
                            if st.running == Some(true) {
                                // Still running (a live-restore engine): watch it again. What it
                                // wrote while the engine was away may be missing.
                                if let Ok(o) = attach(&c, name).await {
                                    output = o;
                                    out_done = false;
                                }
                                wait = Box::pin(c.wait_container(name, None::<WaitContainerOptions>));
                            } else {
                                status = Some(st.exit_code.unwrap_or(-1));
                                drain_until = Some(tokio::time::Instant::now());
                            }
                            lost_since = None;
                        }
                        Err(e) if engine::not_found(&e) => {
                            exit.error = Some(format!("container {name} vanished from the docker engine while it ran"));
                            break;
                        }
                        Err(_) => {}
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline), if ended_by.is_none() && status.is_none() => {
                ended_by = Some(EndedBy::Timeout);
                stop = Some(stop_container(&docker, name, grace_secs));
            },
            r = readable(sigfd.as_ref()), if ended_by.is_none() && status.is_none() => {
                if let Some(mut guard) = r {
                    guard.clear_ready();
                }
                while let Ok(Some(sig)) = signals.read_signal() {
                    if sig.ssi_signo != Signal::SIGHUP as u32 && ended_by.is_none() {
                        ended_by = Some(EndedBy::Cancel);
                        stop = Some(stop_container(&docker, name, grace_secs));
                    }
                }
            },
            _ = async { match stop.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if stop.is_some() => {
                stop = None;
            },
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => {},
        }
    }
    match ended_by {
        Some(EndedBy::Cancel) => exit.cancelled = true,
        Some(EndedBy::Timeout) => exit.timed_out = true,
        None => {}
    }
    if status.is_none() {
        return;
    }
    // What the engine recorded of the end: the exit code and whether the kernel's OOM
    // killer ended it (exit 137 alone proves nothing: a cancelled container is killed too).
    let inspected = match engine::connect(&socket, api_timeout).await {
        Ok(c) => c.inspect_container(name, None).await.ok(),
        Err(_) => None,
    };
    let st = inspected.and_then(|i| i.state).unwrap_or_default();
    let code = st.exit_code.or(status).unwrap_or(-1);
    exit.exit_code = Some(i32::try_from(code).unwrap_or(-1));
    exit.oom_killed = st.oom_killed == Some(true);
}

async fn attach(docker: &Docker, name: &str) -> Result<Output, bollard::errors::Error> {
    let opts = AttachContainerOptions {
        stream: true,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    Ok(docker.attach_container(name, Some(opts)).await?.output)
}

/// The engine's stop (TERM, `grace` seconds, KILL); a stop that fails is followed by a kill.
fn stop_container(
    docker: &Docker,
    name: &str,
    grace: i32,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let (docker, name) = (docker.clone(), name.to_string());
    Box::pin(async move {
        let opts = StopContainerOptions {
            t: Some(grace),
            signal: None,
        };
        if docker.stop_container(&name, Some(opts)).await.is_err() {
            let _ = docker
                .kill_container(&name, None::<bollard::query_parameters::KillContainerOptions>)
                .await;
        }
    })
}

/// The signalfd (cancel), registered with the event loop. None if it cannot be: a cancel
/// then waits for the container's own end.
fn watch_signals(signals: &SignalFd) -> Option<tokio::io::unix::AsyncFd<std::os::fd::RawFd>> {
    // SAFETY: the descriptor belongs to `signals`, which the caller keeps open for longer
    // than the returned AsyncFd lives (both live through `drive`, and the AsyncFd is
    // dropped first, deregistering the descriptor before it could be closed).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            signals.as_fd().as_raw_fd(),
            tokio::io::Interest::READABLE,
        )
    }
    .ok()
}

async fn readable(
    fd: Option<&tokio::io::unix::AsyncFd<std::os::fd::RawFd>>,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'_, std::os::fd::RawFd>> {
    match fd {
        Some(fd) => fd.readable().await.ok(),
        None => std::future::pending().await,
    }
}
