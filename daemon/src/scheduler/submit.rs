//! Submission: the checks every job passes (from the spool or the RPC), its first record
//! write, and its entry into the queue once that write is durable.

use cyb_proto::job::{JobState, Origin, Owner, Timestamp};
use cyb_proto::{Class, JobId, JobRecord, JobSpec, RpcError, SpecError};
use tracing::{error, info};

use super::Scheduler;
use super::durable::NotDurable;
use super::msg::{Event, Reply};

impl Scheduler {
    pub(super) fn admit(&self, spec: &JobSpec, owner: &Owner) -> Result<(), RpcError> {
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
                format!(
                    "{} is longer than the {} allowed for class {}",
                    humantime::format_duration(t.0),
                    humantime::format_duration(class.max_timeout),
                    spec.class()
                ),
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
        Ok(())
    }

    pub(super) fn submit(
        &mut self,
        mut spec: JobSpec,
        owner: Owner,
        origin: Origin,
        reply: Reply<Result<JobId, RpcError>>,
    ) {
        if let Err(e) = self.admit(&spec, &owner) {
            let _ = reply.send(Err(e));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if spec.class.is_none() {
            spec.class = Some(Class::CpuShort);
        }
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
            let _ = tx.send(Event::Recorded { id, res, reply }.into());
        });
    }

    /// A submission's record is durable (the job joins the queue) or could not be written
    /// (the job is forgotten, and the submitter is told why).
    pub(super) fn recorded(
        &mut self,
        id: JobId,
        res: Result<(), NotDurable>,
        reply: Reply<Result<JobId, RpcError>>,
    ) {
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
        let _ = reply.send(Ok(id));
    }
}

fn default_name(spec: &JobSpec, origin: &Origin) -> String {
    if let Origin::Spool { file, .. } = origin {
        return file.strip_suffix(".json").unwrap_or(file).to_string();
    }
    match (&spec.command, &spec.shell) {
        (Some(argv), _) => argv.join(" ").chars().take(64).collect(),
        (_, Some(sh)) => sh.chars().take(64).collect(),
        _ => "job".into(),
    }
}
