//! The docker backend: a job runs in a container on this host's Docker engine, through
//! the Engine API ([`bollard`]), with the guarantees a native job has.
//!
//! The design is the native one with a container in the job's place: the job's
//! supervisor (forked by the same launcher, outliving daemon restarts, holding the job's
//! GPU locks) drives the container as conmon does for podman ([`shim`]). So adoption after
//! `kill -9`, cancel, timeouts, capped logs and exit records are the native machinery's,
//! and only what is particular to a container lives here:
//!
//! - [`config`]: `[docker]`; [`engine`]: the client and the engine's health, checked in
//!   the background so intake, the scheduler and `cybctl health` never wait on it.
//! - [`image`]: references normalized and checked, on what they resolve to, against
//!   `allowed_images`; [`mounts`]: bind mounts resolved and checked as the job's owner;
//!   [`request`]: the create request (user, capabilities, limits, GPUs, labels).
//! - [`usage`]: what the container used, from the parent cgroup cybd gives it.
//!
//! Prepare (while the `running` record is made durable) resolves the image, checks the
//! mounts, starts the supervisor and creates the container (stopped); commit hands the
//! supervisor the job, and it attaches and starts the container. A container is removed
//! once its job's end is durable ([`Docker::finished`]); one that cybd created but never
//! recorded (a crash between the two) is removed by the sweep after a restart.

pub mod config;
pub mod engine;
pub mod image;
pub mod mounts;
pub mod request;
pub mod shim;
pub mod usage;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions,
};
use cyb_proto::job::{ProcRef, RunHandle};
use cyb_proto::spec::Backend as Kind;
use cyb_proto::{JobId, JobRecord, JobSpec, Owner, SpecError};
use futures::StreamExt;
use tracing::{info, warn};

use super::native::{self, Native};
use super::{
    Adoption, Attempt, AttemptEnd, Backend, BackendError, BoxFuture, Exit, Prepared as AnyPrepared, Started,
    Usage,
};
use crate::config::Config;
use engine::Engine;
use request::{LABEL_INSTANCE, LABEL_JOB};

/// Docker jobs, on one engine.
#[derive(Clone)]
pub struct Docker {
    native: Native,
    engine: Arc<Engine>,
    /// Tells this cybd's containers from those of another cybd on the same engine.
    instance: String,
}

/// A created (not started) container and the supervisor waiting to drive it.
pub struct Prepared {
    inner: native::Prepared,
    container: String,
    container_id: String,
}

impl Docker {
    pub fn new(native: Native) -> Docker {
        let cfg = native.cfg.clone();
        let engine = Engine::new(&cfg.docker.socket, cfg.docker.api_timeout);
        Docker {
            instance: instance_of(&cfg.paths.spool),
            native,
            engine,
        }
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Starts checking the engine (when docker jobs are allowed at all); `changed` is
    /// called when it comes or goes.
    pub fn start_monitor(&self, changed: impl Fn(bool) + Send + 'static) {
        let cfg = &self.native.cfg;
        if configured(cfg).is_ok() {
            self.engine
                .spawn_monitor(cfg.docker.engine_check_interval, changed);
        }
    }

    fn container_name(&self, id: JobId, attempt: u32) -> String {
        format!("cyb-{}-{id}-{attempt}", self.instance)
    }

    /// Containers of this cybd (of job `job`, or all), any state: (id, job).
    async fn ours(&self, job: Option<JobId>) -> Result<Vec<(String, Option<JobId>)>, String> {
        let c = self.engine.client().await?;
        let mut labels = vec![format!("{LABEL_INSTANCE}={}", self.instance)];
        if let Some(j) = job {
            labels.push(format!("{LABEL_JOB}={j}"));
        }
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), labels)])),
            ..Default::default()
        };
        let list = c
            .list_containers(Some(opts))
            .await
            .map_err(|e| engine::engine_error(self.engine.socket(), &e))?;
        Ok(list
            .into_iter()
            .filter_map(|s| {
                let job = s
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_JOB))
                    .and_then(|j| j.parse().ok());
                Some((s.id?, job))
            })
            .collect())
    }

    async fn remove(&self, container: &str) -> Result<(), String> {
        let c = self.engine.client().await?;
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match c.remove_container(container, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if engine::not_found(&e) => Ok(()),
            Err(e) => Err(engine::engine_error(self.engine.socket(), &e)),
        }
    }
}

/// A short, stable name for the cybd whose spool is `spool` (FNV-1a of the path).
fn instance_of(spool: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in spool.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Whether docker jobs are allowed here at all.
fn configured(cfg: &Config) -> Result<(), String> {
    if cfg.docker.allowed_images.is_empty() {
        return Err("docker jobs are not allowed on this host: [docker] allowed_images is empty".into());
    }
    Ok(())
}

fn failed(id: JobId, why: impl Into<String>) -> BackendError {
    BackendError::Docker { id, why: why.into() }
}

/// The mounts of `spec`, resolved and checked for `creds` (blocking: reads the file
/// system). Errors name the mount's field.
fn resolve_mounts(
    cfg: &Config,
    spec: &cyb_proto::spec::DockerSpec,
    creds: &mounts::Creds,
) -> Result<Vec<mounts::Bind>, SpecError> {
    // The engine's socket wherever it is configured, and where engines usually put theirs.
    let sockets = [
        cfg.docker.socket.clone(),
        PathBuf::from("/var/run/docker.sock"),
        PathBuf::from("/run/docker.sock"),
        PathBuf::from("/run/containerd/containerd.sock"),
    ];
    let mut binds: Vec<mounts::Bind> = Vec::new();
    for (i, m) in spec.mounts.iter().enumerate() {
        let field = format!("docker.mounts[{i}]");
        let b = mounts::resolve(m, &cfg.docker.allowed_mount_prefixes, &sockets, creds)
            .map_err(|e| SpecError::field(field.clone(), e.to_string()))?;
        if let Some(j) = binds.iter().position(|o| o.container == b.container) {
            return Err(SpecError::field(
                field,
                format!(
                    "`{m}` mounts on {}, as docker.mounts[{j}] does already",
                    b.container
                ),
            ));
        }
        if ["/proc", "/sys", "/dev"]
            .iter()
            .any(|k| b.container == *k || b.container.starts_with(&format!("{k}/")))
        {
            return Err(SpecError::field(
                field,
                format!(
                    "`{m}`: the container's {} is the kernel's, not a place to mount into",
                    b.container
                ),
            ));
        }
        binds.push(b);
    }
    Ok(binds)
}

fn creds_of(acct: &crate::users::Account) -> mounts::Creds {
    mounts::Creds::from(acct)
}

/// Intake's answer on `requested` from the images of the engine's last check: refused if
/// it resolves to an image `allowed_images` does not allow, or to none (and nothing would be
/// pulled).
fn check_image(
    cfg: &Config,
    reference: &str,
    requested: &image::Requested,
    info: &engine::EngineInfo,
) -> Result<(), String> {
    let allow = image::Allowlist::new(&cfg.docker.allowed_images)
        .map_err(|e| format!("[docker] allowed_images: {e}"))?;
    let allowed = || {
        format!(
            "[docker] allowed_images: {}",
            cfg.docker.allowed_images.join(", ")
        )
    };
    match (info.find(requested), requested) {
        (Some(found), _) if allow.allows(&found.names).is_some() => Ok(()),
        (Some(found), _) => Err(format!(
            "image {reference} (resolves to {}: {}) is not allowed here ({})",
            found.id,
            if found.names.is_empty() {
                "no name".to_string()
            } else {
                found.names.join(", ")
            },
            allowed()
        )),
        (None, image::Requested::Named(r)) if cfg.docker.pull == config::Pull::Missing => {
            match allow.allows(&[r.canonical()]) {
                Some(_) => Ok(()),
                None => Err(format!(
                    "image {reference} ({}) is not allowed here ({})",
                    r.canonical(),
                    allowed()
                )),
            }
        }
        (None, _) => Err(format!(
            "image {reference} is not on this host's docker engine (and [docker] pull is \"never\"); ask the admin to load it"
        )),
    }
}

/// Limits the engine would refuse, refused at intake in words that name the field.
fn check_limits(spec: &JobSpec, _cfg: &Config, info: &engine::EngineInfo) -> Result<(), SpecError> {
    let r = spec.resources.as_ref();
    if let Some(m) = r.and_then(|r| r.memory)
        && m.0 < MIN_MEMORY
    {
        return Err(SpecError::field(
            "resources.memory",
            format!("a container needs at least 6MiB (got {} bytes)", m.0),
        ));
    }
    if let (Some(c), Some(n)) = (r.and_then(|r| r.cpus), info.ncpu)
        && c > n as f64
    {
        return Err(SpecError::field(
            "resources.cpus",
            format!("{c} CPUs asked for, but the docker engine has {n}"),
        ));
    }
    Ok(())
}

/// The smallest memory limit the engine accepts.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// The network a job gets: `none` unless it names one the config allows.
fn network(cfg: &Config, spec: &cyb_proto::spec::DockerSpec) -> Result<String, SpecError> {
    match spec.network.as_deref() {
        None | Some("none") => Ok("none".into()),
        Some(n) if cfg.docker.allowed_networks.iter().any(|a| a == n) => Ok(n.to_string()),
        Some(n) => Err(SpecError::field(
            "docker.network",
            format!(
                "network `{n}` is not allowed here ([docker] allowed_networks: {})",
                if cfg.docker.allowed_networks.is_empty() {
                    "none listed".to_string()
                } else {
                    cfg.docker.allowed_networks.join(", ")
                }
            ),
        )),
    }
}

/// Finds the image `reference` names on the engine (pulling it if `pull = "missing"`) and
/// checks what it resolves to against `allowed_images`; returns its id.
async fn resolve_image(
    c: &bollard::Docker,
    socket: &Path,
    cfg: &config::DockerConfig,
    reference: &str,
) -> Result<String, String> {
    let requested = image::parse_requested(reference).map_err(|e| format!("docker.image: {e}"))?;
    let allow =
        image::Allowlist::new(&cfg.allowed_images).map_err(|e| format!("[docker] allowed_images: {e}"))?;
    let mut found = c.inspect_image(reference).await;
    if let Err(e) = &found
        && engine::not_found(e)
    {
        match (&requested, cfg.pull) {
            (image::Requested::Named(r), config::Pull::Missing) => {
                // Only what the allowlist allows is ever pulled.
                if allow.allows(&[r.canonical()]).is_none() {
                    return Err(format!(
                        "image {reference} ({}) is not allowed by [docker] allowed_images",
                        r.canonical()
                    ));
                }
                let opts = CreateImageOptions {
                    from_image: Some(r.name()),
                    tag: r.digest.clone().or_else(|| r.tag.clone()),
                    ..Default::default()
                };
                let mut pull = c.create_image(Some(opts), None, None);
                while let Some(step) = pull.next().await {
                    if let Err(e) = step {
                        return Err(format!(
                            "cannot pull image {reference}: {}",
                            engine::engine_error(socket, &e)
                        ));
                    }
                }
                found = c.inspect_image(reference).await;
            }
            _ => {
                return Err(format!(
                    "image {reference} is not on this host's docker engine (and [docker] pull is \"never\")"
                ));
            }
        }
    }
    let img = found.map_err(|e| match engine::not_found(&e) {
        true => format!("image {reference} is not on this host's docker engine"),
        false => format!(
            "cannot inspect image {reference}: {}",
            engine::engine_error(socket, &e)
        ),
    })?;
    let id = img
        .id
        .clone()
        .ok_or_else(|| format!("the engine gave no id for image {reference}"))?;
    let names: Vec<String> = img
        .repo_tags
        .iter()
        .flatten()
        .chain(img.repo_digests.iter().flatten())
        .filter_map(|n| image::parse(n).ok().map(|r| r.canonical()))
        .collect();
    if allow.allows(&names).is_none() {
        let what = if names.is_empty() {
            "an image with no name".to_string()
        } else {
            names.join(", ")
        };
        return Err(format!(
            "image {reference} (resolves to {id}: {what}) is not allowed by [docker] allowed_images"
        ));
    }
    Ok(id)
}

impl Backend for Docker {
    fn kind(&self) -> Kind {
        Kind::Docker
    }

    fn admit(&self, spec: &JobSpec, owner: &Owner, cfg: &Config) -> Result<(), SpecError> {
        let Some(d) = &spec.docker else {
            return Err(SpecError::field("docker", "not a docker job"));
        };
        configured(cfg).map_err(|why| SpecError::field("docker.image", why))?;
        let requested =
            image::parse_requested(&d.image).map_err(|e| SpecError::field("docker.image", e.to_string()))?;
        network(cfg, d)?;
        let engine = self.engine.status().ok();
        // What the engine had at its last check answers early (the start checks again).
        if let Some(info) = &engine {
            check_image(cfg, &d.image, &requested, info)
                .map_err(|why| SpecError::field("docker.image", why))?;
            check_limits(spec, cfg, info)?;
        }
        if !d.mounts.is_empty() {
            let acct = crate::users::account_cached(owner.uid).map_err(|e| {
                SpecError::field(
                    "docker.mounts",
                    format!("cannot check them for uid {}: {e}", owner.uid),
                )
            })?;
            resolve_mounts(cfg, d, &creds_of(&acct))?;
        }
        if spec.gpus() > 0
            && let Some(info) = &engine
            && !info.runtimes.contains(&cfg.docker.gpu_runtime)
        {
            return Err(SpecError::field(
                "resources.gpus",
                engine::no_gpu_runtime(&cfg.docker.gpu_runtime, &info.runtimes),
            ));
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        self.engine.status().map(|_| ())
    }

    fn handle_before_start(&self, id: JobId, attempt: u32) -> RunHandle {
        RunHandle::Docker {
            container: self.container_name(id, attempt),
            container_id: None,
            supervisor: None,
            boot_id: self.native.boot_id.clone(),
        }
    }

    fn prepare(&self, a: Attempt) -> BoxFuture<Result<AnyPrepared, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let (id, attempt) = (a.rec.id, a.attempt);
            let cfg = a.cfg.clone();
            let Some(spec) = a.rec.spec.docker.clone() else {
                crate::host::release_gpus(a.leases);
                return Err(BackendError::WrongBackend {
                    id,
                    backend: Kind::Docker,
                });
            };
            let socket = cfg.docker.socket.clone();
            let checked = async {
                let c = this.engine.client().await?;
                let info = this.engine.check().await?;
                if !a.gpus.is_empty() && !info.runtimes.contains(&cfg.docker.gpu_runtime) {
                    return Err(engine::no_gpu_runtime(&cfg.docker.gpu_runtime, &info.runtimes));
                }
                let image = resolve_image(&c, &socket, &cfg.docker, &spec.image).await?;
                let net = network(&cfg, &spec).map_err(|e| e.to_string())?;
                Ok((c, info, image, net))
            }
            .await;
            let (c, info, image, net) = match checked {
                Ok(v) => v,
                Err(why) => {
                    crate::host::release_gpus(a.leases);
                    return Err(failed(id, why));
                }
            };
            // The owner's account, its mounts, and the supervisor (blocking).
            let (host, launcher) = (this.native.host.clone(), this.native.launcher.clone());
            let limits = host.limits_for(&cfg, &a.rec, &a.gpus);
            let run_dir = PathBuf::from(&a.rec.run_dir);
            let (rec, cfg2, spec2) = (a.rec.clone(), cfg.clone(), spec.clone());
            let gpu_ids: Vec<String> = host
                .gpu_env(&a.gpus)
                .into_iter()
                .find(|(k, _)| k == "NVIDIA_VISIBLE_DEVICES")
                .map(|(_, v)| v.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let staged = tokio::task::spawn_blocking(move || {
                let binds = match crate::users::account_cached(rec.owner.uid) {
                    Ok(acct) => {
                        resolve_mounts(&cfg2, &spec2, &creds_of(&acct)).map_err(|e| failed(id, e.to_string()))
                    }
                    Err(e) => Err(BackendError::Account {
                        id,
                        uid: rec.owner.uid,
                        why: e.to_string(),
                    }),
                };
                let binds = match binds {
                    Ok(b) => b,
                    Err(e) => {
                        crate::host::release_gpus(a.leases);
                        return Err(e);
                    }
                };
                native::prepare_supervised(&host, &launcher, a, native::runner::launch_for, false)
                    .map(|p| (p, binds))
            })
            .await
            .map_err(|e| native::task_failed(id, e))?;
            let (mut inner, binds) = staged?;
            let name = this.container_name(id, attempt);
            let cgroup_parent = (info.cgroup_driver == "cgroupfs")
                .then(|| usage::parent(&cfg.cgroup_name, &this.instance, id, attempt));
            let mut all_binds: Vec<String> = binds.iter().map(mounts::Bind::to_docker).collect();
            all_binds.push(format!(
                "{}:{}:rw",
                run_dir.join(native::supervisor::ARTIFACTS_DIR).display(),
                request::ARTIFACTS_MOUNT
            ));
            let l = &inner.launch;
            let req = request::Request {
                job_id: id,
                attempt,
                instance: this.instance.clone(),
                image,
                command: spec.command.clone(),
                entrypoint: spec.entrypoint.clone(),
                workdir: spec.workdir.clone(),
                env: l.env.clone(),
                uid: l.uid,
                gid: l.gid,
                groups: l.groups.clone(),
                binds: all_binds,
                network: net,
                memory: limits.memory_bytes,
                cpus: limits.cpus,
                pids: limits.pids,
                cgroup_parent: cgroup_parent.clone(),
                gpus: gpu_ids,
            };
            let body = req.body();
            let mut tries = 0;
            let created = loop {
                tries += 1;
                let opts = CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                };
                match c.create_container(Some(opts), body.clone()).await {
                    Ok(r) => break Ok(r.id),
                    // Left by an attempt of the same number that never ran (a crash
                    // between create and record): it is ours, and goes.
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. })
                        if tries < 2 =>
                    {
                        let _ = this.remove(&name).await;
                    }
                    Err(e) => {
                        break Err(format!(
                            "cannot create container {name}: {}",
                            engine::engine_error(&socket, &e)
                        ));
                    }
                }
            };
            let container_id = match created {
                Ok(cid) => cid,
                Err(why) => {
                    Native::abort_prepared(inner).await;
                    return Err(failed(id, why));
                }
            };
            inner.launch.docker = Some(shim::DockerLaunch {
                socket: socket.display().to_string(),
                container: name.clone(),
                container_id: container_id.clone(),
                api_timeout_ms: u64::try_from(cfg.docker.api_timeout.as_millis()).unwrap_or(u64::MAX),
                lost_engine_grace_ms: u64::try_from(cfg.docker.lost_engine_grace.as_millis())
                    .unwrap_or(u64::MAX),
                cgroup_parent,
                cgroup_version: info.cgroup_version.clone(),
            });
            Ok(AnyPrepared::Docker(Prepared {
                inner,
                container: name,
                container_id,
            }))
        })
    }

    fn commit(&self, p: AnyPrepared) -> BoxFuture<Result<Started, BackendError>> {
        let AnyPrepared::Docker(p) = p else {
            return Box::pin(async {
                Err(BackendError::Task {
                    id: 0,
                    why: "not a docker attempt".into(),
                })
            });
        };
        let boot_id = self.native.boot_id.clone();
        let (container, container_id) = (p.container, p.container_id);
        self.native.commit_as(
            p.inner,
            Arc::new(move |sup| RunHandle::Docker {
                container: container.clone(),
                container_id: Some(container_id.clone()),
                supervisor: sup,
                boot_id: boot_id.clone(),
            }),
        )
    }

    fn abort(&self, p: AnyPrepared) -> BoxFuture<()> {
        let AnyPrepared::Docker(p) = p else {
            return Box::pin(async {});
        };
        let this = self.clone();
        Box::pin(async move {
            Native::abort_prepared(p.inner).await;
            if let Err(e) = this.remove(&p.container).await {
                warn!(
                    "cannot remove container {} of an attempt that never started: {e}",
                    p.container
                );
            }
        })
    }

    /// The supervisor stops the container with the grace period it was started with.
    fn cancel(&self, id: JobId, handle: &RunHandle, _grace: Duration) -> BoxFuture<Result<(), BackendError>> {
        Native::cancel_supervised(id, handle)
    }

    fn adopt(&self, rec: &JobRecord) -> BoxFuture<Adoption> {
        let (container, container_id, boot_id) = match &rec.state {
            cyb_proto::JobState::Running {
                handle:
                    RunHandle::Docker {
                        container,
                        container_id,
                        boot_id,
                        ..
                    },
                ..
            } => (container.clone(), container_id.clone(), boot_id.clone()),
            _ => {
                let id = rec.id;
                return Box::pin(async move {
                    Adoption::Ended(AttemptEnd::of(Exit::Lost {
                        why: format!("job {id} is not a running docker job"),
                    }))
                });
            }
        };
        let (c2, cid2) = (container.clone(), container_id.clone());
        let found = self.native.adopt_as(
            rec,
            Arc::new(move |sup: Option<ProcRef>| RunHandle::Docker {
                container: c2.clone(),
                container_id: cid2.clone(),
                supervisor: sup,
                boot_id: boot_id.clone(),
            }),
        );
        let this = self.clone();
        let id = rec.id;
        Box::pin(async move {
            match found.await {
                // The supervisor is gone without a word: the engine may still know how the
                // container ended.
                Adoption::Ended(AttemptEnd {
                    exit: Exit::Lost { why },
                    ..
                }) => Adoption::Ended(this.end_from_inspect(id, &container, why).await),
                other => other,
            }
        })
    }

    fn finished(&self, id: JobId) -> BoxFuture<()> {
        let (native_done, this) = (Backend::finished(&self.native, id), self.clone());
        Box::pin(async move {
            native_done.await;
            match this.ours(Some(id)).await {
                Ok(list) => {
                    for (cid, _) in list {
                        if let Err(e) = this.remove(&cid).await {
                            warn!(job_id = id, "cannot remove container {cid}: {e}");
                        }
                    }
                }
                Err(e) => warn!(job_id = id, "cannot remove the containers of job {id}: {e}"),
            }
        })
    }

    fn sweep(&self, _recorded: BTreeSet<JobId>, alive: BTreeSet<JobId>) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            if configured(&this.native.cfg).is_err() {
                return;
            }
            let list = match this.ours(None).await {
                Ok(l) => l,
                Err(e) => {
                    info!("cannot look for containers left behind: {e}");
                    return;
                }
            };
            for (cid, job) in list {
                if job.is_some_and(|j| alive.contains(&j)) {
                    continue;
                }
                match this.remove(&cid).await {
                    Ok(()) => info!(
                        job_id = job.unwrap_or_default(),
                        "removed container {cid}, which no running job of this cybd owns"
                    ),
                    Err(e) => warn!("cannot remove container {cid}: {e}"),
                }
            }
        })
    }
}

impl Docker {
    /// How the container of an attempt whose supervisor vanished ended, if the engine
    /// knows; one still running is stopped (nothing watches it) and the attempt is lost.
    async fn end_from_inspect(&self, id: JobId, container: &str, why: String) -> AttemptEnd {
        let Ok(c) = self.engine.client().await else {
            return AttemptEnd::of(Exit::Lost { why });
        };
        let Ok(i) = c
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        else {
            return AttemptEnd::of(Exit::Lost { why });
        };
        let st = i.state.unwrap_or_default();
        if st.running == Some(true) {
            let _ = self.remove(container).await;
            return AttemptEnd::of(Exit::Lost {
                why: format!(
                    "{why}; its container {container} was still running, unwatched, and was removed"
                ),
            });
        }
        let code = st.exit_code.and_then(|c| i32::try_from(c).ok());
        let exit = match (st.oom_killed, code) {
            (Some(true), c) if c != Some(0) => Exit::OomKilled {
                code: c,
                signal: None,
            },
            (_, Some(code)) if st.started_at.as_deref().is_some_and(|s| !s.starts_with("0001")) => {
                Exit::Exited { code }
            }
            _ => Exit::Lost { why },
        };
        info!(
            job_id = id,
            "finalized job {id} from its container {container}, which ended while nobody watched"
        );
        AttemptEnd {
            exit,
            usage: Usage {
                container_id: i.id,
                ..Default::default()
            },
            errors: Vec::new(),
        }
    }
}
