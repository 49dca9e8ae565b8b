//! RPC server: tarpc over the Unix socket. Each connection's peer credentials (SO_PEERCRED)
//! decide what it may do and what it may read (a record is answered without its `env` values
//! and `context` to anyone but the job's owner and admins, [`Conn::visible`]); requests
//! are parsed and checked here, then handed to the scheduler as typed messages. A client
//! that sends garbage or hangs up only ends its own connection, and what one client can make
//! the daemon hold is bounded ([`limits`]): a user's connections are counted and capped
//! (`[rpc] max_connections_per_user`; root and the daemon's own user exempt), request frames
//! are limited by `max_job_bytes`, a frame begun or a reply unread for `header_timeout` and
//! a connection idle for `idle_timeout` are closed, and the log says so at most once a
//! minute per user and kind.

mod limits;

use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cyb_proto::job::{Origin, Owner};
use cyb_proto::rpc::{CybRequest, CybResponse, JobSummary, ListFilter, Stats, SubmitRequest};
use cyb_proto::{Cyb, JobId, JobRecord, RpcError, Submitted};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tarpc::ServerError;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel, Serve};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::config::Config;
use crate::host::Host;
use crate::scheduler::{Action, Handle, Peer, Request};
use crate::users;
use limits::{Activity, Expired, LogLimiter, Misbehaviour, Paced, Registry, Slot, User, Watched};

/// Requests of one connection handled at once; the next is read when one of them ends.
const REQUESTS_PER_CONNECTION: usize = 64;
/// Requests of one capped user handled at once, on all its connections together: its
/// `list`s of a large queue cannot keep the scheduler from others for long, nor their
/// replies take much memory.
const REQUESTS_PER_USER: usize = 64;
/// Refused connections answered with an error at once; beyond that they are only closed.
const REFUSALS_AT_ONCE: usize = 8;
/// How long a refused connection has to send its request and read the refusal.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// The largest request a refused connection's refusal reads.
const REFUSAL_FRAME: usize = 64 * 1024;
/// How long after connections ended the allocator is asked to give memory back.
const TRIM_DELAY: Duration = Duration::from_secs(5);

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
        let r = self
            .sched
            .ask(|reply| Request::Act {
                id,
                action,
                peer,
                reply,
            })
            .await?;
        self.visible(r)
    }

    /// A record answered to this caller: without `env` values and `context` unless the
    /// caller owns the job or is an admin ([`JobRecord::seen_by`]).
    fn visible(&self, r: Result<JobRecord, RpcError>) -> Result<JobRecord, RpcError> {
        r.map(|rec| rec.seen_by(self.peer.uid, self.peer.admin))
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
        // (A container's working directory is `docker.workdir`, in the container.)
        if spec.cwd.is_none()
            && spec.docker.is_none()
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
    async fn submit(self, _: Context, req: SubmitRequest) -> Result<Submitted, RpcError> {
        let (spec, owner) = self.parse(req)?;
        let origin = Origin::Rpc { pid: self.peer.pid };
        self.sched
            .ask(|reply| Request::Submit {
                spec,
                owner,
                origin,
                reply,
            })
            .await?
    }

    async fn check(self, _: Context, req: SubmitRequest) -> Result<(), RpcError> {
        let (spec, owner) = self.parse(req)?;
        self.sched
            .ask(|reply| Request::Check { spec, owner, reply })
            .await?
    }

    /// A summary carries neither `env` nor `context`: anyone may list every job.
    async fn list(self, _: Context, filter: ListFilter) -> Vec<JobSummary> {
        self.sched
            .ask(|reply| Request::List { filter, reply })
            .await
            .unwrap_or_default()
    }

    async fn show(self, _: Context, id: JobId) -> Result<JobRecord, RpcError> {
        let mut rec = self.sched.ask(|reply| Request::Show { id, reply }).await??;
        // Callback delivery state, from the outbox (never part of the stored record).
        rec.callback = crate::callback::status(&self.cfg.paths, id).await.map(Box::new);
        self.visible(Ok(rec))
    }

    async fn wait(self, _: Context, id: JobId, timeout_ms: u64) -> Result<JobRecord, RpcError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sched.send(Request::Wait { id, reply: tx })?;
        let r = match tokio::time::timeout(Duration::from_millis(timeout_ms.min(300_000)), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RpcError::Unavailable("cybd is shutting down".into())),
            Err(_) => self.sched.ask(|reply| Request::Show { id, reply }).await?,
        };
        self.visible(r)
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
            .ask(|reply| Request::Pause {
                pause: true,
                peer,
                reply,
            })
            .await?
    }

    async fn resume(self, _: Context) -> Result<(), RpcError> {
        let peer = self.peer.clone();
        self.sched
            .ask(|reply| Request::Pause {
                pause: false,
                peer,
                reply,
            })
            .await?
    }

    async fn stats(self, _: Context) -> Stats {
        match self.sched.ask(|reply| Request::Stats { reply }).await {
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

    async fn clean(
        self,
        _: Context,
        req: cyb_proto::rpc::CleanRequest,
    ) -> Result<cyb_proto::rpc::CleanReport, RpcError> {
        let peer = self.peer.clone();
        self.sched
            .ask(|reply| Request::Clean { req, peer, reply })
            .await?
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

/// What every connection shares.
struct Shared {
    registry: Arc<Registry>,
    log: LogLimiter,
    refusals: Arc<tokio::sync::Semaphore>,
    trim_pending: AtomicBool,
    /// The daemon's own uid, which like root has no connection cap.
    own_uid: u32,
}

impl Shared {
    /// Logs `message` about `uid` unless a line of this kind about it was logged less than
    /// a minute ago.
    fn warn(&self, uid: u32, kind: Misbehaviour, message: std::fmt::Arguments<'_>) {
        if let Some(left_out) = self.log.allow(uid, kind) {
            if left_out > 0 {
                warn!(
                    uid,
                    "{message} ({left_out} more like it since the last such line)"
                );
            } else {
                warn!(uid, "{message}");
            }
        }
    }

    /// A connection ended: a few seconds later, once a burst of them is over, the allocator
    /// is asked to give back what they freed.
    fn closed(self: &Arc<Self>) {
        if self.trim_pending.swap(true, Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TRIM_DELAY).await;
            me.trim_pending.store(false, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(crate::sys::release_free_memory).await;
        });
    }
}

/// Accepts connections until the listener fails for good.
pub async fn serve(listener: UnixListener, live: crate::config::Live, sched: Handle, host: Arc<Host>) {
    let shared = Arc::new(Shared {
        registry: Arc::new(Registry::default()),
        log: LogLimiter::default(),
        refusals: Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE)),
        trim_pending: AtomicBool::new(false),
        own_uid: nix::unistd::geteuid().as_raw(),
    });
    // Accept failures logged: when the last line was, and how many were not logged since.
    let mut accept_failures: (Option<Instant>, u64) = (None, 0);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) the connection stays queued and accept
                // fails again at once: wait a little instead of spinning, and say so once a
                // minute. Connections that end free descriptors; capped users cannot hold
                // more than their share.
                let (last, left_out) = &mut accept_failures;
                if last.is_none_or(|t| t.elapsed() >= limits::LOG_EVERY) {
                    warn!(
                        "accept on {} failed: {e} ({} open connections; {left_out} more failures since the last such line)",
                        live.borrow().paths.socket.display(),
                        shared.registry.total()
                    );
                    *last = Some(Instant::now());
                    *left_out = 0;
                } else {
                    *left_out += 1;
                }
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
        let uid = cred.uid();
        let exempt = uid == 0 || uid == shared.own_uid;
        let cap = (!exempt).then_some(cfg.rpc.max_connections_per_user);
        match shared
            .registry
            .admit(uid, cap, (!exempt).then_some(REQUESTS_PER_USER))
        {
            Ok(slot) => {
                tokio::spawn(connection(
                    stream,
                    cred,
                    slot,
                    cfg,
                    sched.clone(),
                    host.clone(),
                    shared.clone(),
                ));
            }
            Err(held) => refuse(stream, uid, held, &cfg, &shared),
        }
    }
}

/// Turns away a connection of `uid`, which holds `held` already: with an error as the
/// answer to its first request while few others are being turned away, else by closing it.
fn refuse(stream: UnixStream, uid: u32, held: usize, cfg: &Config, shared: &Arc<Shared>) {
    let max = cfg.rpc.max_connections_per_user;
    shared.warn(
        uid,
        Misbehaviour::OverCap,
        format_args!(
            "refused a connection of uid {uid}: it holds {held}, the most rpc.max_connections_per_user ({max}) allows"
        ),
    );
    let Ok(permit) = shared.refusals.clone().try_acquire_owned() else {
        return;
    };
    let message = format!(
        "too many connections: uid {uid} has {held} open, at most {max} are allowed (rpc.max_connections_per_user)"
    );
    tokio::spawn(async move {
        let _permit = permit;
        let transport = cyb_proto::rpc::server_transport(stream, REFUSAL_FRAME);
        let refusal = tarpc::server::serve(move |_, _: CybRequest| {
            let e = ServerError::new(io::ErrorKind::ConnectionRefused, message.clone());
            async move { Err::<CybResponse, _>(e) }
        });
        let answer = async {
            let mut requests = pin!(BaseChannel::with_defaults(transport).requests());
            // Each answer goes out on the next poll; the client hangs up once it has it.
            while let Some(Ok(req)) = requests.next().await {
                req.execute(refusal.clone()).await;
            }
        };
        let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
    });
}

/// One admitted connection, from accept to close.
async fn connection(
    stream: UnixStream,
    cred: tokio::net::unix::UCred,
    slot: Slot,
    cfg: Arc<Config>,
    sched: Handle,
    host: Arc<Host>,
    shared: Arc<Shared>,
) {
    let uid = cred.uid();
    // Until the client sends something its connection has no buffers, no tarpc state and
    // no user looked up: an idle connection costs this small task and its socket.
    match tokio::time::timeout(cfg.rpc.idle_timeout, first_byte(&stream)).await {
        Ok(Ok(true)) => Box::pin(session(stream, cred, slot.user(), cfg, sched, host, &shared)).await,
        Ok(Ok(false)) => debug!(uid, "rpc client hung up without a request"),
        Ok(Err(e)) => debug!(uid, "rpc connection failed: {e}"),
        Err(_) => debug!(uid, "closed an rpc connection that sent nothing"),
    }
    drop(slot);
    shared.closed();
}

/// Resolves once `stream` has a byte to read (true) or its client has hung up (false).
/// (`readable` alone also resolves on a fresh socket with nothing in it.)
async fn first_byte(stream: &UnixStream) -> io::Result<bool> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    loop {
        stream.readable().await?;
        let peek = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut b = [0u8; 1];
            recv(
                stream.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        match peek {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Serves a connection's requests until it closes, errs, or times out.
async fn session(
    stream: UnixStream,
    cred: tokio::net::unix::UCred,
    user: Arc<User>,
    cfg: Arc<Config>,
    sched: Handle,
    host: Arc<Host>,
    shared: &Shared,
) {
    let uid = cred.uid();
    let admin_group = cfg.admin_group.clone();
    let who = tokio::task::spawn_blocking(move || {
        let acct = users::account(uid).ok();
        // The daemon's own user administers it (root for the system daemon; you, for `--user`).
        let admin = uid == nix::unistd::geteuid().as_raw() || users::is_admin(uid, admin_group.as_deref());
        (acct, admin)
    })
    .await;
    let (acct, admin) = who.unwrap_or((None, false));
    let (name, gid) = match &acct {
        Some(a) => (a.name.clone(), a.gid),
        None => (format!("uid {uid}"), cred.gid()),
    };
    debug!(uid, pid = ?cred.pid(), "rpc connection");
    let rpc = cfg.rpc.clone();
    let max_frame = cfg.max_request_frame();
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
    let activity = Activity::new(Some(user));
    let io = Watched::new(stream, activity.clone(), max_frame);
    let transport = Paced::new(
        cyb_proto::rpc::server_transport(io, max_frame),
        activity.clone(),
        REQUESTS_PER_CONNECTION,
    );
    let serve = Counted {
        inner: conn.serve(),
        activity: activity.clone(),
    };
    let mut requests = pin!(BaseChannel::with_defaults(transport).requests());
    let mut watchdog = pin!(activity.expired(rpc.idle_timeout, rpc.header_timeout));
    // Handlers are polled here, in the connection's task, while the request stream keeps
    // being polled: that is also what writes their replies.
    let mut handlers = FuturesUnordered::new();
    let end = loop {
        tokio::select! {
            why = &mut watchdog => break Ok(Some(why)),
            r = requests.next() => match r {
                Some(Ok(req)) => handlers.push(req.execute(serve.clone())),
                Some(Err(e)) => break Err(e),
                None => break Ok(None),
            },
            Some(()) = handlers.next(), if !handlers.is_empty() => {}
        }
    };
    match end {
        Ok(None) => debug!(uid, "rpc connection closed"),
        Ok(Some(Expired::HungUp)) => debug!(uid, "rpc client hung up"),
        Ok(Some(Expired::Idle)) => debug!(uid, "closed an idle rpc connection"),
        Ok(Some(Expired::Frame)) => shared.warn(
            uid,
            Misbehaviour::SlowFrame,
            format_args!(
                "closed a connection of uid {uid} that began a request and did not finish it within {} (rpc.header_timeout)",
                humantime::format_duration(rpc.header_timeout)
            ),
        ),
        Ok(Some(Expired::Reply)) => shared.warn(
            uid,
            Misbehaviour::SlowReader,
            format_args!(
                "closed a connection of uid {uid} that did not read its replies for {} (rpc.header_timeout)",
                humantime::format_duration(rpc.header_timeout)
            ),
        ),
        Err(e) => match activity.oversize() {
            Some(len) => shared.warn(
                uid,
                Misbehaviour::Oversize,
                format_args!(
                    "closed a connection of uid {uid} that sent a frame of {len} bytes; at most {max_frame} are read (twice max_job_bytes and 64 KiB)"
                ),
            ),
            None => debug!(uid, "rpc connection ended: {}", error_chain(&e)),
        },
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A service whose running handlers are counted in the connection's [`Activity`]: a
/// connection with a request in flight is never idle, and reading pauses while too many are.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: Serve> Serve for Counted<S> {
    type Req = S::Req;
    type Resp = S::Resp;

    async fn serve(self, ctx: Context, req: S::Req) -> Result<S::Resp, ServerError> {
        let _busy = self.activity.busy();
        self.inner.serve(ctx, req).await
    }
}
