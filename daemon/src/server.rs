//! RPC server: tarpc over the Unix socket. Each connection's peer credentials (SO_PEERCRED)
//! decide what it may do; requests are parsed and checked here, then handed to the
//! scheduler as typed messages. A client that sends garbage or hangs up only ends its own
//! connection.

use std::sync::Arc;
use std::time::Duration;

use cyb_proto::job::{Origin, Owner};
use cyb_proto::rpc::{JobSummary, ListFilter, Stats, SubmitRequest};
use cyb_proto::{Cyb, JobId, JobRecord, RpcError};
use futures::StreamExt;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::config::Config;
use crate::host::Host;
use crate::scheduler::{Action, Handle, Msg, Peer};
use crate::users;

/// One connection's view of the service.
#[derive(Clone)]
struct Conn {
    peer: Peer,
    gid: u32,
    cfg: Arc<Config>,
    sched: Handle,
    host: Arc<Host>,
}

impl Conn {
    async fn act(self, id: JobId, action: Action) -> Result<JobRecord, RpcError> {
        let peer = self.peer.clone();
        self.sched
            .ask(|reply| Msg::Act {
                id,
                action,
                peer,
                reply,
            })
            .await?
    }
}

impl Conn {
    /// Parses a submission with the intake's own checks; the job runs as the caller.
    fn parse(&self, req: SubmitRequest) -> Result<(Box<cyb_proto::JobSpec>, Owner), RpcError> {
        if req.spec_json.len() as u64 > self.cfg.max_job_bytes {
            return Err(RpcError::InvalidSpec(cyb_proto::SpecError::general(format!(
                "the job is {} bytes; at most {} (max_job_bytes) are accepted",
                req.spec_json.len(),
                self.cfg.max_job_bytes
            ))));
        }
        let mut spec = cyb_proto::parse_job(req.spec_json.as_bytes()).map_err(RpcError::InvalidSpec)?;
        if spec.cwd.is_none()
            && let Some(cwd) = req.default_cwd.filter(|c| c.starts_with('/'))
        {
            spec.cwd = Some(cwd);
        }
        let owner = Owner {
            uid: self.peer.uid,
            gid: self.gid,
            user: self.peer.name.clone(),
        };
        Ok((Box::new(spec), owner))
    }
}

impl Cyb for Conn {
    async fn submit(self, _: Context, req: SubmitRequest) -> Result<JobId, RpcError> {
        let (spec, owner) = self.parse(req)?;
        let origin = Origin::Rpc { pid: self.peer.pid };
        self.sched
            .ask(|reply| Msg::Submit {
                spec,
                owner,
                origin,
                reply,
            })
            .await?
    }

    async fn check(self, _: Context, req: SubmitRequest) -> Result<(), RpcError> {
        let (spec, owner) = self.parse(req)?;
        self.sched.ask(|reply| Msg::Check { spec, owner, reply }).await?
    }

    async fn list(self, _: Context, filter: ListFilter) -> Vec<JobSummary> {
        self.sched
            .ask(|reply| Msg::List { filter, reply })
            .await
            .unwrap_or_default()
    }

    async fn show(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.sched.ask(|reply| Msg::Show { id, reply }).await?
    }

    async fn wait(self, _: Context, id: JobId, timeout_ms: u64) -> Result<JobRecord, RpcError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sched.send(Msg::Wait { id, reply: tx })?;
        match tokio::time::timeout(Duration::from_millis(timeout_ms.min(300_000)), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RpcError::Unavailable("cybd is shutting down".into())),
            Err(_) => self.sched.ask(|reply| Msg::Show { id, reply }).await?,
        }
    }

    async fn cancel(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.act(id, Action::Cancel).await
    }

    async fn retry(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.act(id, Action::Retry).await
    }

    async fn hold(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.act(id, Action::Hold).await
    }

    async fn release(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        self.act(id, Action::Release).await
    }

    async fn set_priority(self, _: Context, id: JobId, priority: i32) -> Result<JobRecord, RpcError> {
        self.act(id, Action::Priority(priority)).await
    }

    async fn pause(self, _: Context) -> Result<(), RpcError> {
        let peer = self.peer.clone();
        self.sched
            .ask(|reply| Msg::Pause {
                pause: true,
                peer,
                reply,
            })
            .await?
    }

    async fn resume(self, _: Context) -> Result<(), RpcError> {
        let peer = self.peer.clone();
        self.sched
            .ask(|reply| Msg::Pause {
                pause: false,
                peer,
                reply,
            })
            .await?
    }

    async fn stats(self, _: Context) -> Stats {
        match self.sched.ask(|reply| Msg::Stats { reply }).await {
            Ok(s) => s,
            Err(_) => Stats {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                started_at: cyb_proto::Timestamp::now(),
                paused: false,
                counts: Vec::new(),
                classes: Vec::new(),
                total_jobs: 0,
                next_id: 0,
                quarantined: Vec::new(),
                store_error: None,
            },
        }
    }

    async fn health(self, _: Context) -> cyb_proto::rpc::Health {
        let (host, cfg) = (self.host.clone(), self.cfg.clone());
        tokio::task::spawn_blocking(move || host.health(&cfg))
            .await
            .unwrap_or_default()
    }

    async fn gpus(self, _: Context) -> cyb_proto::gpu::GpuReport {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || host.gpu_report())
            .await
            .unwrap_or_else(|e| cyb_proto::gpu::GpuReport {
                source: "unknown".into(),
                health: format!("cannot read the GPU state: {e}"),
                gpus: Vec::new(),
            })
    }
}

/// Accepts connections until the listener fails for good.
pub async fn serve(listener: UnixListener, live: crate::config::Live, sched: Handle, host: Arc<Host>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("accept on {} failed: {e}", live.borrow().paths.socket.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot read peer credentials, dropping connection: {e}");
                continue;
            }
        };
        let cfg: Arc<Config> = live.borrow().clone();
        let sched = sched.clone();
        let host = host.clone();
        tokio::spawn(async move {
            let uid = cred.uid();
            let admin_group = cfg.admin_group.clone();
            let who = tokio::task::spawn_blocking(move || {
                let acct = users::account(uid).ok();
                // The daemon's own user administers it (root for the system daemon; you, for `--user`).
                let admin =
                    uid == nix::unistd::geteuid().as_raw() || users::is_admin(uid, admin_group.as_deref());
                (acct, admin)
            })
            .await;
            let (acct, admin) = who.unwrap_or((None, false));
            let (name, gid) = match &acct {
                Some(a) => (a.name.clone(), a.gid),
                None => (format!("uid {uid}"), cred.gid()),
            };
            debug!(uid, pid = ?cred.pid(), "rpc connection");
            let conn = Conn {
                peer: Peer {
                    uid,
                    pid: cred.pid(),
                    name,
                    admin,
                },
                gid,
                cfg,
                sched,
                host,
            };
            let transport = cyb_proto::rpc::server_transport(stream);
            BaseChannel::with_defaults(transport)
                .execute(conn.serve())
                .for_each_concurrent(64, |f| f)
                .await;
        });
    }
}
