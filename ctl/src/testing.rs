//! For unit tests only: a small in-process tarpc server of the `Cyb` service on a real Unix
//! socket, holding one job, so the client's wiring (transport, deadlines, error mapping,
//! waiting and following loops) is exercised without the daemon.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cyb_proto::job::Origin;
use cyb_proto::{
    Cyb, JobId, JobRecord, JobState, JobSummary, ListFilter, Outcome, Owner, Reason, RpcError, Stats,
    SubmitRequest, Timestamp,
};
use futures::StreamExt as _;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel as _};

use crate::conn::{Conn, Origin as SocketOrigin, Socket};

/// What the fake daemon knows and has been sent.
pub struct State {
    /// Its one job (id 1).
    pub job: JobRecord,
    /// After this many more `show` calls the job succeeds.
    pub shows_until_done: u32,
    pub submitted: Vec<SubmitRequest>,
}

#[derive(Clone)]
pub struct Fake(pub Arc<Mutex<State>>);

impl Fake {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn job(&self, id: JobId) -> Result<JobRecord, RpcError> {
        let s = self.state();
        if id == s.job.id {
            Ok(s.job.clone())
        } else {
            Err(RpcError::NotFound(id))
        }
    }
}

/// A running job 1 owned by alice, with `run_dir` as its run directory.
pub fn running_job(run_dir: &Path) -> JobRecord {
    JobRecord {
        id: 1,
        spec: cyb_proto::parse_job(br#"{"name":"t","command":["true"]}"#).unwrap(),
        owner: Owner {
            uid: 1000,
            gid: 1000,
            user: "alice".into(),
        },
        origin: Origin::Rpc { pid: None },
        submitted_at: Timestamp::now(),
        priority: 0,
        attempts: 1,
        first_started_at: Some(Timestamp::now()),
        run_dir: run_dir.to_string_lossy().into_owned(),
        callback: None,
        state: JobState::Running {
            started_at: Timestamp::now(),
            attempt: 1,
            gpus: Vec::new(),
            handle: cyb_proto::job::RunHandle::Native {
                supervisor: None,
                boot_id: None,
            },
        },
    }
}

fn succeed(job: &mut JobRecord) {
    job.state = JobState::Succeeded {
        outcome: Box::new(Outcome {
            exit_code: Some(0),
            ..Outcome::now(Reason::Success, "exited with status 0")
        }),
    };
}

impl Cyb for Fake {
    async fn submit(self, _: Context, req: SubmitRequest) -> Result<cyb_proto::Submitted, RpcError> {
        self.state().submitted.push(req);
        Ok(cyb_proto::Submitted {
            id: 42,
            class: cyb_proto::Class::CpuShort,
            time_limit_secs: 60,
            not_enforced: None,
        })
    }

    async fn check(self, _: Context, _: SubmitRequest) -> Result<(), RpcError> {
        Ok(())
    }

    async fn list(self, _: Context, _: ListFilter) -> Vec<JobSummary> {
        vec![JobSummary::of(&self.state().job)]
    }

    async fn show(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        let rec = self.job(id)?;
        let mut s = self.state();
        if !s.job.state.is_terminal() {
            s.shows_until_done = s.shows_until_done.saturating_sub(1);
            if s.shows_until_done == 0 {
                succeed(&mut s.job);
            }
        }
        Ok(rec)
    }

    async fn wait(self, _: Context, id: JobId, timeout_ms: u64) -> Result<JobRecord, RpcError> {
        let rec = self.job(id)?;
        if !rec.state.is_terminal() {
            tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
        }
        self.job(id)
    }

    async fn cancel(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.job(id)?;
        Err(RpcError::PermissionDenied(format!("job {id} belongs to alice")))
    }

    async fn retry(self, _: Context, _: JobId) -> Result<JobRecord, RpcError> {
        Err(RpcError::InvalidState("not ended".into()))
    }

    async fn hold(self, _: Context, _: JobId) -> Result<JobRecord, RpcError> {
        Err(RpcError::InvalidState("running".into()))
    }

    async fn release(self, _: Context, _: JobId) -> Result<JobRecord, RpcError> {
        Err(RpcError::InvalidState("not held".into()))
    }

    async fn set_priority(self, _: Context, id: JobId, priority: i32) -> Result<JobRecord, RpcError> {
        let mut rec = self.job(id)?;
        rec.priority = priority;
        Ok(rec)
    }

    async fn pause(self, _: Context) -> Result<(), RpcError> {
        Err(RpcError::PermissionDenied("pause is for admins".into()))
    }

    async fn resume(self, _: Context) -> Result<(), RpcError> {
        Ok(())
    }

    async fn health(self, _: Context) -> cyb_proto::rpc::Health {
        cyb_proto::rpc::Health::default()
    }

    async fn gpus(self, _: Context) -> cyb_proto::gpu::GpuReport {
        cyb_proto::gpu::GpuReport {
            source: "none".into(),
            health: "test".into(),
            gpus: Vec::new(),
        }
    }

    async fn clean(
        self,
        _: Context,
        req: cyb_proto::rpc::CleanRequest,
    ) -> Result<cyb_proto::rpc::CleanReport, RpcError> {
        Ok(cyb_proto::rpc::CleanReport {
            removed: req.ids,
            kept: Vec::new(),
        })
    }

    async fn stats(self, _: Context) -> Stats {
        Stats {
            version: "test".into(),
            pid: std::process::id(),
            started_at: Timestamp::now(),
            paused: false,
            counts: Vec::new(),
            classes: Vec::new(),
            total_jobs: 1,
            next_id: 2,
            quarantined: Vec::new(),
            store_error: None,
        }
    }
}

/// Serves `fake` on `dir/cybd.sock`, one connection at a time, until the runtime ends.
pub fn serve(fake: Fake, dir: &Path) -> PathBuf {
    let path = dir.join("cybd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let channel = BaseChannel::with_defaults(cyb_proto::rpc::transport(stream));
            let fake = fake.clone();
            tokio::spawn(async move {
                channel
                    .execute(fake.serve())
                    .for_each(|answer| async move {
                        tokio::spawn(answer);
                    })
                    .await;
            });
        }
    });
    path
}

/// A fake daemon with job 1 running in `dir`, and a connection to it.
pub async fn connected(dir: &Path, shows_until_done: u32) -> (Fake, Conn) {
    let fake = Fake(Arc::new(Mutex::new(State {
        job: running_job(dir),
        shows_until_done,
        submitted: Vec::new(),
    })));
    let path = serve(fake.clone(), dir);
    let conn = Conn::connect(&Socket {
        path,
        origin: SocketOrigin::Flag,
    })
    .await
    .unwrap();
    (fake, conn)
}
