//! Submission: the checks every job passes (from the spool or the RPC), its first record
//! write, and its entry into the queue once that write is durable.

use cyb_proto::job::{JobState, Origin, Owner, Timestamp};
use cyb_proto::{Class, JobRecord, JobSpec, RpcError, SpecError, Submitted};
use tracing::{error, info};

use super::Scheduler;
use super::durable::NotDurable;
use super::msg::{Event, Reply};

impl Scheduler {
    /// The class of a job that names none: `gpu` when it asks for GPUs, else the first CPU
    /// class (`cpu_short`, then `cpu_long`) whose `max_timeout` covers the `timeout` it
    /// asks for (`cpu_short` when it asks for none, `cpu_long` when none covers it, which
    /// [`Self::admit`] then refuses, naming the limit).
    pub(super) fn place(&self, spec: &mut JobSpec) {
        if spec.class.is_some() {
            return;
        }
        let class = if spec.gpus() > 0 {
            Class::Gpu
        } else {
            let asked = spec.timeout.map(|t| t.0);
            [Class::CpuShort, Class::CpuLong]
                .into_iter()
                .find(|c| asked.is_none_or(|t| t <= self.cfg.class(*c).max_timeout))
                .unwrap_or(Class::CpuLong)
        };
        spec.class = Some(class);
    }

    /// Every check a submission passes; `Ok` carries what of its limits this host will not
    /// enforce.
    pub(super) fn admit(
        &self,
        spec: &JobSpec,
        owner: &Owner,
    ) -> Result<Option<cyb_proto::NotEnforced>, RpcError> {
        let spec_err = |e: SpecError| RpcError::InvalidSpec(e);
        if owner.uid == 0 && !self.cfg.allow_root_jobs {
            return Err(RpcError::PermissionDenied(
                "jobs owned by root are refused here (allow_root_jobs = false in the config)".into(),
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && owner.uid != me {
            return Err(RpcError::PermissionDenied(format!(
                "this cybd runs unprivileged as uid {me} and can only run that user's jobs (the job belongs to uid {})",
                owner.uid
            )));
        }
        let kind = spec.backend();
        let Some(backend) = self.backends.get(kind) else {
            let field = match kind {
                cyb_proto::spec::Backend::Docker => "docker",
                cyb_proto::spec::Backend::Builtin => "task",
                _ => "class",
            };
            return Err(spec_err(SpecError::field(
                field,
                format!("backend not available on this host: this cybd cannot run {kind} jobs yet"),
            )));
        };
        if spec.gpus() as usize > self.gpus.usable() {
            return Err(spec_err(SpecError::field(
                "resources.gpus",
                format!(
                    "asks for {} GPU(s) but this host has {} GPU(s) available to cybd",
                    spec.gpus(),
                    self.gpus.usable()
                ),
            )));
        }
        backend.admit(spec, owner, &self.cfg).map_err(spec_err)?;
        let class = self.cfg.class(spec.class());
        if let Some(t) = spec.timeout
            && t.0 > class.max_timeout
        {
            return Err(spec_err(SpecError::field(
                "timeout",
                too_long(&self.cfg, spec.class(), t.0),
            )));
        }
        if let Some(u) = &spec.callback_url
            && let Err(why) = crate::callback::check_url(&self.cfg.callbacks, u)
        {
            return Err(spec_err(SpecError::field("callback_url", why)));
        }
        for (i, d) in spec.depends_on.iter().enumerate() {
            let known = u64::try_from(*d).ok().is_some_and(|d| self.state_of(d).is_some());
            if !known {
                return Err(spec_err(SpecError::field(
                    format!("depends_on[{i}]"),
                    format!("job {d} does not exist"),
                )));
            }
        }
        Ok(backend.not_enforced(spec, &self.cfg))
    }

    pub(super) fn submit(
        &mut self,
        mut spec: JobSpec,
        owner: Owner,
        origin: Origin,
        reply: Reply<Result<Submitted, RpcError>>,
    ) {
        self.place(&mut spec);
        let not_enforced = match self.admit(&spec, &owner) {
            Ok(n) => n,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let submitted = Submitted {
            id,
            class: spec.class(),
            time_limit_secs: time_limit(&self.cfg, &spec).as_secs(),
            not_enforced,
        };
        if spec.name.is_none() {
            spec.name = Some(default_name(&spec, &origin));
        }
        let now = Timestamp::now();
        let rec = JobRecord {
            id,
            priority: spec.priority(),
            spec,
            owner,
            origin,
            submitted_at: now,
            attempts: 0,
            first_started_at: None,
            run_dir: self.cfg.paths.run_dir(id).to_string_lossy().into_owned(),
            state: JobState::Queued { since: now },
            callback: None,
        };
        let ack = self.pending.persist(id);
        self.unrecorded.insert(id, rec);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let res = match ack.await {
                Ok(res) => res,
                Err(_) => Err(NotDurable::Stopped),
            };
            let submitted = Box::new(submitted);
            let _ = tx.send(
                Event::Recorded {
                    submitted,
                    res,
                    reply,
                }
                .into(),
            );
        });
    }

    /// A submission's record is durable (the job joins the queue) or could not be written
    /// (the job is forgotten, and the submitter is told why).
    pub(super) fn recorded(
        &mut self,
        submitted: Submitted,
        res: Result<(), NotDurable>,
        reply: Reply<Result<Submitted, RpcError>>,
    ) {
        let id = submitted.id;
        let Some(rec) = self.unrecorded.remove(&id) else {
            return;
        };
        if let Err(why) = res {
            error!(job_id = id, job_user = %rec.owner.user, "cannot record job: {why}");
            self.store_error = Some(why.to_string());
            let _ = reply.send(Err(RpcError::Unavailable(format!(
                "cannot record the job: {why}"
            ))));
            return;
        }
        info!(
            event = "submitted",
            job_id = id,
            job_user = %rec.owner.user,
            class = %rec.spec.class(),
            tenant = rec.spec.tenant.as_deref().unwrap_or(""),
            "job {id} submitted by {}", rec.owner.user
        );
        self.tally.note(&rec);
        self.jobs.insert(id, rec);
        self.enqueue(id);
        let _ = reply.send(Ok(submitted));
    }
}

/// The time limit a job gets: its `timeout`, else its class's default.
pub(super) fn time_limit(cfg: &crate::config::Config, spec: &JobSpec) -> std::time::Duration {
    spec.timeout.map_or(cfg.class(spec.class()).timeout, |t| t.0)
}

/// A job's time limit in words, for a `timed_out` end: how long, where it came from, and
/// the flag and config key that change it.
pub(super) fn time_limit_words(cfg: &crate::config::Config, spec: &JobSpec) -> String {
    let show = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let class = spec.class();
    let c = cfg.class(class);
    let limit = show(time_limit(cfg, spec));
    let mut words = if spec.timeout.is_some() {
        format!(
            "{limit}, the `timeout` it asked for (--timeout); class {class} allows up to {} (`classes.{class}.max_timeout` in the config)",
            show(c.max_timeout)
        )
    } else {
        format!(
            "{limit}, the default of class {class} (`classes.{class}.timeout` in the config); ask for more with --timeout (`timeout` in a job file), up to {} in class {class}",
            show(c.max_timeout)
        )
    };
    if let Some(other) = cpu_sibling(class).filter(|o| cfg.class(*o).max_timeout > c.max_timeout) {
        words.push_str(&format!(
            ", or up to {} in class {other} (--class {other})",
            show(cfg.class(other).max_timeout)
        ));
    }
    words
}

/// The other CPU class of a CPU class, where a job that needs more time may go (a GPU
/// class has no sibling that runs the same way).
fn cpu_sibling(class: Class) -> Option<Class> {
    match class {
        Class::CpuShort => Some(Class::CpuLong),
        Class::CpuLong => Some(Class::CpuShort),
        Class::Gpu | Class::GpuSlurm => None,
    }
}

/// Why `timeout` is refused in `class`: the limit, the class, and what would change it.
fn too_long(cfg: &crate::config::Config, class: Class, asked: std::time::Duration) -> String {
    let show = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let max = cfg.class(class).max_timeout;
    let mut msg = format!(
        "{} is longer than the {} allowed for class {class} (`classes.{class}.max_timeout` in the config)",
        show(asked),
        show(max)
    );
    if let Some(c) = cpu_sibling(class).filter(|c| cfg.class(*c).max_timeout >= asked) {
        msg.push_str(&format!(
            "; class {c} allows up to {}: submit with --class {c} (\"class\": \"{c}\" in a job file)",
            show(cfg.class(c).max_timeout)
        ));
    }
    msg
}

fn default_name(spec: &JobSpec, origin: &Origin) -> String {
    if let Origin::Spool { file, .. } = origin {
        return file.strip_suffix(".json").unwrap_or(file).to_string();
    }
    match (&spec.command, &spec.shell, &spec.docker) {
        (Some(argv), _, _) => argv.join(" ").chars().take(64).collect(),
        (_, Some(sh), _) => sh.chars().take(64).collect(),
        // The container's command, else its image.
        (_, _, Some(d)) => match &d.command {
            Some(argv) => argv.join(" ").chars().take(64).collect(),
            None => d.image.chars().take(64).collect(),
        },
        _ => "job".into(),
    }
}
