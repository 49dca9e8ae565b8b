//! Finding the daemon's socket, connecting to it, and calling the RPC service with errors
//! that say what went wrong and which exit code it deserves.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cyb_proto::{CybClient, JobId, JobRecord, JobSummary, ListFilter, RpcError, Stats, SubmitRequest};
use tarpc::client::RpcError as CallError;

use crate::exit::{self, Failure};

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/cyb/cybd.sock";
/// The socket under a user's runtime directory (`cybd --user`).
pub const USER_SOCKET: &str = "cybd.sock";
/// How long an ordinary call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to keep trying while the daemon's queue of connections to accept is full.
const CONNECT_RETRY: Duration = Duration::from_secs(5);

/// Where the socket path came from; it decides the hint given when nothing answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--socket PATH`.
    Flag,
    /// `CYB_SOCKET`.
    Env,
    /// A non-root user's runtime directory: the user-mode daemon.
    User,
    /// Root: the system daemon.
    System,
}

/// The socket to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    pub path: PathBuf,
    pub origin: Origin,
}

impl Socket {
    /// What to suggest when the daemon does not answer at this socket.
    fn hint(&self) -> &'static str {
        match self.origin {
            Origin::System => "is the daemon running? (systemctl status cybd)",
            Origin::User => "is the daemon running? (start it with `cybd --user`)",
            Origin::Flag => "is the daemon running? (socket given with --socket)",
            Origin::Env => "is the daemon running? (socket given by CYB_SOCKET)",
        }
    }
}

/// Picks the socket: `--socket`, else `CYB_SOCKET`, else for a non-root user
/// `<user_dir>/cybd.sock` (the user-mode daemon's runtime directory, found by the rule
/// `cybd --user` uses: [`cyb_proto::paths::user_runtime_dir`]) when that daemon is
/// listening or no system daemon is, else the system socket. Empty values count as unset.
pub fn discover(
    flag: Option<&Path>,
    env_socket: Option<&OsStr>,
    euid: u32,
    user_dir: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Socket {
    if let Some(p) = flag.filter(|p| !p.as_os_str().is_empty()) {
        return Socket {
            path: p.to_path_buf(),
            origin: Origin::Flag,
        };
    }
    if let Some(p) = env_socket.filter(|p| !p.is_empty()) {
        return Socket {
            path: PathBuf::from(p),
            origin: Origin::Env,
        };
    }
    if euid != 0
        && let Some(dir) = user_dir
    {
        let user = dir.join(USER_SOCKET);
        // A user-mode daemon of yours wins; otherwise the system daemon serves you too.
        if exists(&user) || !exists(Path::new(SYSTEM_SOCKET)) {
            return Socket {
                path: user,
                origin: Origin::User,
            };
        }
    }
    Socket {
        path: PathBuf::from(SYSTEM_SOCKET),
        origin: Origin::System,
    }
}

/// [`discover`] with this process's environment and effective uid.
pub fn discover_from_env(flag: Option<&Path>) -> Socket {
    let env_socket = std::env::var_os("CYB_SOCKET");
    let euid = nix::unistd::geteuid().as_raw();
    let user = cyb_proto::paths::user_runtime_dir_from_env(euid);
    discover(
        flag,
        env_socket.as_deref(),
        euid,
        user.as_ref().map(|u| u.dir.as_path()),
        |p| p.exists(),
    )
}

/// A connection to cybd.
pub struct Conn {
    client: CybClient,
    socket: PathBuf,
}

impl Conn {
    /// Connects, or fails with exit code 69 and a hint.
    pub async fn connect(socket: &Socket) -> anyhow::Result<Conn> {
        let path = socket.path.display();
        // A full accept queue (thousands of connections arriving at once) refuses a
        // connect with EAGAIN: the daemon is busy, not gone, so try again for a while.
        let busy_until = Instant::now() + CONNECT_RETRY;
        let connected = loop {
            match tokio::net::UnixStream::connect(&socket.path).await {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < busy_until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => break r,
            }
        };
        let stream = match connected {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(Failure::new(
                    exit::UNREACHABLE,
                    format!("cannot reach cybd at {path}: {}", socket.hint()),
                )
                .into());
            }
            Err(e) => {
                return Err(
                    Failure::new(exit::UNREACHABLE, format!("cannot reach cybd at {path}: {e}")).into(),
                );
            }
        };
        let client = CybClient::new(
            tarpc::client::Config::default(),
            cyb_proto::rpc::transport(stream),
        )
        .spawn();
        Ok(Conn {
            client,
            socket: socket.path.clone(),
        })
    }

    fn context(timeout: Duration) -> tarpc::context::Context {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + timeout;
        ctx
    }

    /// Turns a transport-level failure of call `call` into an error naming the socket.
    fn call_error(&self, call: &str, timeout: Duration, e: CallError) -> anyhow::Error {
        let path = self.socket.display();
        match e {
            CallError::DeadlineExceeded => Failure::new(
                exit::ERROR,
                format!(
                    "cybd at {path} did not answer `{call}` within {}",
                    humantime::format_duration(timeout)
                ),
            )
            .into(),
            CallError::Shutdown => Failure::new(
                exit::UNREACHABLE,
                format!("cybd at {path} closed the connection during `{call}`"),
            )
            .into(),
            // cybd answers this way when it turns a connection away (too many of yours).
            CallError::Server(e) => Failure::new(
                exit::UNREACHABLE,
                format!("cybd at {path} refused `{call}`: {}", e.detail),
            )
            .into(),
            e @ CallError::Channel(_) => anyhow::Error::new(e).context(Failure::new(
                exit::UNREACHABLE,
                format!("lost the connection to cybd at {path} during `{call}`"),
            )),
            e => anyhow::Error::new(e).context(format!("rpc `{call}` to cybd at {path} failed")),
        }
    }

    fn answer<T>(
        &self,
        call: &str,
        timeout: Duration,
        r: Result<Result<T, RpcError>, CallError>,
    ) -> anyhow::Result<T> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(self.call_error(call, timeout, e)),
        }
    }

    pub async fn submit(&self, req: SubmitRequest) -> anyhow::Result<cyb_proto::Submitted> {
        let len = req.spec_json.len();
        let r = self.client.submit(Self::context(CALL_TIMEOUT), req).await;
        self.answer("submit", CALL_TIMEOUT, r)
            .map_err(|e| too_big_hint(e, len))
    }

    pub async fn check(&self, req: SubmitRequest) -> anyhow::Result<()> {
        let len = req.spec_json.len();
        let r = self.client.check(Self::context(CALL_TIMEOUT), req).await;
        self.answer("check", CALL_TIMEOUT, r)
            .map_err(|e| too_big_hint(e, len))
    }

    pub async fn list(&self, filter: ListFilter) -> anyhow::Result<Vec<JobSummary>> {
        let r = self.client.list(Self::context(CALL_TIMEOUT), filter).await;
        self.answer("list", CALL_TIMEOUT, r.map(Ok))
    }

    pub async fn show(&self, id: JobId) -> anyhow::Result<JobRecord> {
        let r = self.client.show(Self::context(CALL_TIMEOUT), id).await;
        self.answer("show", CALL_TIMEOUT, r)
    }

    /// Waits up to `timeout` on the daemon's side for the job to end.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> anyhow::Result<JobRecord> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline = timeout + CALL_TIMEOUT;
        let r = self.client.wait(Self::context(deadline), id, ms).await;
        self.answer("wait", deadline, r)
    }

    pub async fn cancel(&self, id: JobId) -> anyhow::Result<JobRecord> {
        let r = self.client.cancel(Self::context(CALL_TIMEOUT), id).await;
        self.answer("cancel", CALL_TIMEOUT, r)
    }

    pub async fn retry(&self, id: JobId) -> anyhow::Result<JobRecord> {
        let r = self.client.retry(Self::context(CALL_TIMEOUT), id).await;
        self.answer("retry", CALL_TIMEOUT, r)
    }

    pub async fn hold(&self, id: JobId) -> anyhow::Result<JobRecord> {
        let r = self.client.hold(Self::context(CALL_TIMEOUT), id).await;
        self.answer("hold", CALL_TIMEOUT, r)
    }

    pub async fn release(&self, id: JobId) -> anyhow::Result<JobRecord> {
        let r = self.client.release(Self::context(CALL_TIMEOUT), id).await;
        self.answer("release", CALL_TIMEOUT, r)
    }

    pub async fn set_priority(&self, id: JobId, priority: i32) -> anyhow::Result<JobRecord> {
        let r = self
            .client
            .set_priority(Self::context(CALL_TIMEOUT), id, priority)
            .await;
        self.answer("set_priority", CALL_TIMEOUT, r)
    }

    pub async fn pause(&self) -> anyhow::Result<()> {
        let r = self.client.pause(Self::context(CALL_TIMEOUT)).await;
        self.answer("pause", CALL_TIMEOUT, r)
    }

    pub async fn resume(&self) -> anyhow::Result<()> {
        let r = self.client.resume(Self::context(CALL_TIMEOUT)).await;
        self.answer("resume", CALL_TIMEOUT, r)
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        let r = self.client.stats(Self::context(CALL_TIMEOUT)).await;
        self.answer("stats", CALL_TIMEOUT, r.map(Ok))
    }

    pub async fn health(&self) -> anyhow::Result<cyb_proto::rpc::Health> {
        let r = self.client.health(Self::context(CALL_TIMEOUT)).await;
        self.answer("health", CALL_TIMEOUT, r.map(Ok))
    }

    pub async fn clean(
        &self,
        req: cyb_proto::rpc::CleanRequest,
    ) -> anyhow::Result<cyb_proto::rpc::CleanReport> {
        // Removing many jobs' run directories takes longer than other calls.
        const CLEAN_TIMEOUT: Duration = Duration::from_secs(600);
        let r = self.client.clean(Self::context(CLEAN_TIMEOUT), req).await;
        self.answer("clean", CLEAN_TIMEOUT, r)
    }

    pub async fn gpus(&self) -> anyhow::Result<cyb_proto::gpu::GpuReport> {
        let r = self.client.gpus(Self::context(CALL_TIMEOUT)).await;
        self.answer("gpus", CALL_TIMEOUT, r.map(Ok))
    }
}

/// A job this large may be why the daemon closed the connection: it reads no request
/// longer than twice its `max_job_bytes` (1 MiB by default) and 64 KiB.
const LARGE_JOB: usize = 512 * 1024;

/// Adds to a lost connection during a submission of a `len`-byte job what may have caused it.
fn too_big_hint(e: anyhow::Error, len: usize) -> anyhow::Error {
    if len < LARGE_JOB || exit::code_of(&e) != exit::UNREACHABLE || e.to_string().contains("refused") {
        return e;
    }
    e.context(format!(
        "cannot send a job of {len} bytes (cybd reads no request over twice its max_job_bytes)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &Path) -> bool {
        false
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn flag_wins_over_everything() {
        let s = discover(
            Some(Path::new("/tmp/a.sock")),
            Some(os("/tmp/b.sock")),
            1000,
            Some(Path::new("/run/user/1000/cyb")),
            none,
        );
        assert_eq!(
            s,
            Socket {
                path: "/tmp/a.sock".into(),
                origin: Origin::Flag
            }
        );
    }

    #[test]
    fn env_wins_over_defaults() {
        let s = discover(
            None,
            Some(os("/tmp/b.sock")),
            1000,
            Some(Path::new("/run/user/1000/cyb")),
            none,
        );
        assert_eq!(
            s,
            Socket {
                path: "/tmp/b.sock".into(),
                origin: Origin::Env
            }
        );
        let s = discover(None, Some(os("/tmp/b.sock")), 0, None, none);
        assert_eq!(s.origin, Origin::Env);
    }

    #[test]
    fn user_uses_runtime_dir() {
        let s = discover(None, None, 1000, Some(Path::new("/xdg/cyb")), none);
        assert_eq!(
            s,
            Socket {
                path: "/xdg/cyb/cybd.sock".into(),
                origin: Origin::User
            }
        );
    }

    #[test]
    fn user_without_a_runtime_dir_uses_the_system_socket() {
        let s = discover(None, None, 1000, None, none);
        assert_eq!(s.origin, Origin::System);
    }

    #[test]
    fn user_without_own_daemon_uses_the_system_socket() {
        let only_system = |p: &Path| p == Path::new(SYSTEM_SOCKET);
        let s = discover(None, None, 1000, Some(Path::new("/xdg/cyb")), only_system);
        assert_eq!(
            s,
            Socket {
                path: SYSTEM_SOCKET.into(),
                origin: Origin::System
            }
        );
        let both = |_: &Path| true;
        let s = discover(None, None, 1000, Some(Path::new("/xdg/cyb")), both);
        assert_eq!(s.path, PathBuf::from("/xdg/cyb/cybd.sock"));
    }

    #[test]
    fn root_uses_system_socket() {
        let s = discover(None, None, 0, Some(Path::new("/run/user/0/cyb")), none);
        assert_eq!(
            s,
            Socket {
                path: SYSTEM_SOCKET.into(),
                origin: Origin::System
            }
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let s = discover(Some(Path::new("")), Some(os("")), 0, None, none);
        assert_eq!(s.origin, Origin::System);
    }

    #[test]
    fn hints_name_the_right_daemon() {
        assert!(
            discover(None, None, 0, None, none)
                .hint()
                .contains("systemctl status cybd")
        );
        assert!(
            discover(None, None, 1000, Some(Path::new("/xdg/cyb")), none)
                .hint()
                .contains("cybd --user")
        );
    }

    #[tokio::test]
    async fn unreachable_socket_exits_69() {
        let dir = tempfile::tempdir().unwrap();
        let socket = Socket {
            path: dir.path().join("none.sock"),
            origin: Origin::System,
        };
        let Err(e) = Conn::connect(&socket).await else {
            panic!("connected to nothing")
        };
        assert_eq!(exit::code_of(&e), exit::UNREACHABLE);
        let msg = e.to_string();
        assert!(
            msg.contains("none.sock") && msg.contains("systemctl status cybd"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn calls_reach_the_daemon_and_errors_keep_their_codes() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, conn) = crate::testing::connected(dir.path(), u32::MAX).await;
        let req = SubmitRequest {
            spec_json: r#"{"command":["true"]}"#.into(),
            default_cwd: Some("/w".into()),
        };
        assert_eq!(conn.submit(req).await.unwrap().id, 42);
        assert_eq!(fake.state().submitted[0].default_cwd.as_deref(), Some("/w"));
        assert_eq!(conn.show(1).await.unwrap().id, 1);
        assert_eq!(conn.list(ListFilter::default()).await.unwrap().len(), 1);
        assert_eq!(conn.stats().await.unwrap().next_id, 2);
        assert_eq!(conn.set_priority(1, -3).await.unwrap().priority, -3);

        let e = conn.show(9).await.unwrap_err();
        assert_eq!(
            (exit::code_of(&e), e.to_string()),
            (exit::NO_SUCH_JOB, "no job 9".to_string())
        );
        let e = conn.cancel(1).await.unwrap_err();
        assert_eq!(exit::code_of(&e), exit::NO_PERMISSION);
        let e = conn.pause().await.unwrap_err();
        assert_eq!(exit::code_of(&e), exit::NO_PERMISSION);
        let e = conn.hold(1).await.unwrap_err();
        assert_eq!(exit::code_of(&e), exit::ERROR);
    }
}
