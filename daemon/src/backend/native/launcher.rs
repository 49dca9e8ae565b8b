//! Launcher: starts supervisors quickly. The daemon starts one `cybd launcher` process (the
//! same binary, re-executed once) and asks it, over a `SOCK_SEQPACKET` socket pair, to fork
//! a supervisor for each job. The launcher is single-threaded, so a forked child is a whole
//! process that can run the supervisor's code at once; this spares every job the exec and
//! start-up of a fresh `cybd supervise` (about a millisecond of CPU each, which capped the
//! daemon's throughput on small hosts).
//!
//! Each request carries the run directory, the exit record's path and the attempt, plus the read end of the pipe on
//! which the daemon will hand over the launch description (`SCM_RIGHTS`). The reply carries
//! the supervisor's pid and a pidfd for it. Supervisors are not the daemon's children: the
//! daemon watches them through their pidfds, and the launcher reaps them (at least once a
//! second, so a zombie never lingers, and never before its pidfd exists). When the daemon goes away the launcher sees end-of-file and exits;
//! supervisors, in process groups of their own, keep running and are adopted by the next
//! daemon as before.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg,
    socketpair,
};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Largest request or reply; a run directory path is far shorter.
const MAX_MESSAGE: usize = 16 * 1024;

/// Most descriptors one request carries: the stdin pipe and one lockfile per GPU.
const MAX_FDS: usize = 65;

#[derive(Serialize, Deserialize)]
struct Request {
    run_dir: PathBuf,
    /// Where the supervisor writes its exit record.
    exit_file: PathBuf,
    attempt: u32,
    /// Descriptors sent after the stdin pipe that the supervisor keeps open for its whole
    /// life (the job's GPU lockfiles, whose flock locks they hold).
    #[serde(default)]
    held: usize,
}

#[derive(Serialize, Deserialize)]
enum Reply {
    /// `start_ticks` is read before the launcher can reap the child, so it is the
    /// supervisor's even if it exits at once.
    Started {
        pid: i32,
        start_ticks: u64,
    },
    Failed {
        error: String,
    },
}

/// A supervisor the launcher forked: it waits on the pipe it was given.
pub struct Started {
    pub pid: i32,
    pub start_ticks: u64,
    pub pidfd: OwnedFd,
}

/// How long the daemon waits for the launcher's answer (a fork takes milliseconds).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct Conn {
    sock: OwnedFd,
    child: std::process::Child,
}

/// The daemon's handle on its launcher process, started on first use and again if it died.
pub struct Launcher {
    conn: Mutex<Option<Conn>>,
    /// The cybd binary run as `cybd launcher` ([`Config::cybd_exe`](crate::Config)).
    exe: PathBuf,
}

impl Default for Launcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Launcher {
    /// A launcher started from this very binary (`/proc/self/exe`).
    pub fn new() -> Self {
        Self::with_exe(PathBuf::from("/proc/self/exe"))
    }

    /// A launcher started from `exe`, for a daemon embedded in a program that is not cybd.
    pub fn with_exe(exe: PathBuf) -> Self {
        Launcher {
            conn: Mutex::new(None),
            exe,
        }
    }

    fn start_process(exe: &Path) -> io::Result<Conn> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io::Error::other(format!("cannot create the launcher's socket pair: {e}")))?;
        // A launcher that hangs must not hang every job start with it.
        nix::sys::socket::setsockopt(
            &ours,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0),
        )
        .map_err(|e| io::Error::other(format!("cannot set the launcher socket's timeout: {e}")))?;
        let mut cmd = Command::new(exe);
        // `ps` shows "cybd launcher", not "/proc/self/exe launcher".
        cmd.arg0("cybd")
            .arg("launcher")
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group, like the supervisors it starts: a Ctrl-C meant for the
            // daemon in a terminal does not reach it or them.
            .process_group(0);
        // The daemon raised its own descriptor limit for its connections; the launcher, and
        // so every supervisor and job, gets the one the daemon was started with.
        // SAFETY: restore_nofile makes only system calls, which are safe after fork.
        unsafe { cmd.pre_exec(sys::restore_nofile) };
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot start the launcher: {e}")))?;
        Ok(Conn { sock: ours, child })
    }

    /// Forks a supervisor for `run_dir`/`attempt` (exit record at `exit_file`) that reads its launch description from
    /// `stdin` (blocking). Starts the launcher first if it is not running, and again if it
    /// died before taking the request. An error of kind `ConnectionAborted` means the
    /// launcher took the request but gave no answer: a supervisor may exist with `stdin`,
    /// so the caller must not reuse that pipe (closing it makes such a supervisor record
    /// "never launched" and exit).
    pub fn start(
        &self,
        run_dir: &Path,
        exit_file: &Path,
        attempt: u32,
        stdin: &OwnedFd,
        held: &[BorrowedFd<'_>],
    ) -> io::Result<Started> {
        let req = serde_json::to_vec(&Request {
            run_dir: run_dir.to_path_buf(),
            exit_file: exit_file.to_path_buf(),
            attempt,
            held: held.len(),
        })
        .map_err(io::Error::other)?;
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // One retry: a launcher that died (or was killed) since the last job is replaced.
        for round in 0..2 {
            if guard.is_none() {
                *guard = Some(Self::start_process(&self.exe)?);
            }
            let Some(conn) = guard.as_mut() else { continue };
            match exchange(&conn.sock, &req, stdin, held) {
                Ok(started) => return Ok(started),
                Err(Exchange::Refused(e)) => return Err(e),
                Err(Exchange::Undelivered(e)) => {
                    let _ = conn.child.kill();
                    let _ = conn.child.wait();
                    *guard = None;
                    if round == 1 {
                        return Err(io::Error::other(format!("the launcher is not answering: {e}")));
                    }
                    tracing::warn!("the launcher went away ({e}); starting a new one");
                }
                Err(Exchange::Unanswered(e)) => {
                    let _ = conn.child.kill();
                    let _ = conn.child.wait();
                    *guard = None;
                    tracing::warn!("the launcher took a request but did not answer ({e}); replacing it");
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the launcher did not answer: {e}"),
                    ));
                }
            }
        }
        Err(io::Error::other("the launcher is not answering"))
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut conn) = conn {
            // Closing the socket makes it exit; reap it so no zombie is left.
            drop(conn.sock);
            let _ = conn.child.wait();
        }
    }
}

enum Exchange {
    /// The launcher answered that it could not start a supervisor.
    Refused(io::Error),
    /// The request did not reach the launcher (it is gone): nothing was started.
    Undelivered(io::Error),
    /// The request reached it but no valid answer came (it died, hung or answered
    /// nonsense): a supervisor may have been forked.
    Unanswered(io::Error),
}

fn exchange(
    sock: &OwnedFd,
    req: &[u8],
    stdin: &OwnedFd,
    held: &[BorrowedFd<'_>],
) -> Result<Started, Exchange> {
    let mut fds = vec![stdin.as_raw_fd()];
    fds.extend(held.iter().map(|f| f.as_raw_fd()));
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(req)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| Exchange::Undelivered(io::Error::from(e)))?;
    let (reply, mut fds) = receive(sock.as_fd()).map_err(Exchange::Unanswered)?;
    let Some(reply) = reply else {
        return Err(Exchange::Unanswered(io::Error::other(
            "the launcher closed its socket",
        )));
    };
    match serde_json::from_slice::<Reply>(&reply) {
        Ok(Reply::Started { pid, start_ticks }) => match fds.pop() {
            Some(pidfd) => Ok(Started {
                pid,
                start_ticks,
                pidfd,
            }),
            None => Err(Exchange::Unanswered(io::Error::other(
                "the launcher sent no pidfd with its answer",
            ))),
        },
        Ok(Reply::Failed { error }) => Err(Exchange::Refused(io::Error::other(error))),
        Err(e) => Err(Exchange::Unanswered(io::Error::other(format!(
            "bad answer from the launcher: {e}"
        )))),
    }
}

/// Receives one message and the descriptors sent with it; `None` at end-of-file.
fn receive(sock: std::os::fd::BorrowedFd<'_>) -> io::Result<(Option<Vec<u8>>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process for us;
                    // nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let n = msg.bytes;
        if truncated {
            return Err(io::Error::other("message from the other end was truncated"));
        }
        if n == 0 && fds.is_empty() {
            return Ok((None, fds));
        }
        return Ok((Some(buf[..n].to_vec()), fds));
    }
}

fn send_reply(sock: RawFd, reply: &Reply, fd: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock, &[IoSlice::new(&bytes)], &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Entry point of `cybd launcher`: serves requests on stdin (a `SOCK_SEQPACKET` socket)
/// until the daemon closes it. Must be called before any other thread exists.
pub fn main() -> i32 {
    // Exec'd as /proc/self/exe: named for `ps -o comm`/`top`.
    let _ = nix::sys::prctl::set_name(c"cybd-launcher");
    // Supervisors read TERM/INT/HUP (cancel) from a signalfd; blocked here already, they
    // are blocked from the first instruction of every forked supervisor, so a cancel that
    // comes before the supervisor is ready waits for it instead of killing it.
    let mut mask = nix::sys::signal::SigSet::empty();
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        mask.add(sig);
    }
    if let Err(e) = mask.thread_block() {
        eprintln!("cybd launcher: cannot block signals: {e}");
        return 1;
    }
    // The jobs' stack and the signals to reset, once here for every supervisor forked.
    super::spawn::prepare();
    super::supervisor::prepare();
    // SAFETY: fd 0 is the socket the daemon gave us; this function owns it from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    loop {
        reap_exited();
        let mut pfd = [nix::poll::PollFd::new(sock.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(1000u16)) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                eprintln!("cybd launcher: cannot wait for requests: {e}");
                return 1;
            }
        }
        let (msg, mut fds) = match receive(sock.as_fd()) {
            Ok((Some(m), fds)) => (m, fds),
            Ok((None, _)) => {
                // The daemon is gone; supervisors that already exited are reaped now, the
                // others go on without us.
                reap_exited();
                return 0;
            }
            Err(e) => {
                eprintln!("cybd launcher: cannot read a request: {e}");
                return 1;
            }
        };
        let reply = match serde_json::from_slice::<Request>(&msg) {
            Ok(req) if Some(fds.len()) == req.held.checked_add(1) && !fds.is_empty() => {
                let stdin = fds.remove(0);
                fork_supervisor(&req, stdin, fds)
            }
            Ok(req) => Err(ForkError::Descriptors {
                got: fds.len(),
                held: req.held,
            }),
            Err(e) => Err(ForkError::BadRequest(e)),
        };
        let sent = match reply {
            Ok((pid, start_ticks, pidfd)) => send_reply(
                sock.as_raw_fd(),
                &Reply::Started { pid, start_ticks },
                Some(&pidfd),
            ),
            Err(e) => send_reply(sock.as_raw_fd(), &Reply::Failed { error: e.to_string() }, None),
        };
        if let Err(e) = sent {
            eprintln!("cybd launcher: cannot answer the daemon: {e}");
            return 1;
        }
    }
}

/// Reaps every supervisor that has exited (their exit records are written already).
fn reap_exited() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Why the launcher could not start a supervisor.
#[derive(Debug, thiserror::Error)]
enum ForkError {
    #[error("cannot fork a supervisor: {0}")]
    Fork(#[source] nix::Error),
    #[error("cannot open a pidfd for supervisor {pid}: {source}")]
    Pidfd { pid: i32, source: io::Error },
    #[error("cannot read the start time of supervisor {pid}: {source}")]
    StartTime { pid: i32, source: io::Error },
    #[error("request with {got} descriptors, expected 1 more than the {held} held")]
    Descriptors { got: usize, held: usize },
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),
}

fn fork_supervisor(
    req: &Request,
    stdin: OwnedFd,
    held: Vec<OwnedFd>,
) -> Result<(i32, u64, OwnedFd), ForkError> {
    // SAFETY: the launcher has a single thread, so the child inherits no lock held by
    // another thread and may run ordinary code (it never returns into this loop).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let code = supervisor_child(stdin, req, held);
            // Straight out: the supervisor has written all it has to say, and the exit
            // handlers and destructors of the launcher image it was forked from have
            // nothing to do here (running them only faults in their pages).
            // SAFETY: _exit(2) ends this forked child at once; nothing is left to unwind.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(stdin);
            drop(held);
            // The child is not reaped before the next loop iteration, so even one that
            // exited at once is still there (a zombie) for pidfd_open.
            let pid = child.as_raw();
            let pidfd = sys::pidfd_open(pid).map_err(|source| ForkError::Pidfd { pid, source })?;
            let ticks = sys::proc_start_ticks(pid).map_err(|source| ForkError::StartTime { pid, source })?;
            Ok((pid, ticks, pidfd))
        }
        Err(e) => Err(ForkError::Fork(e)),
    }
}

/// The forked child: becomes the supervisor of one job.
fn supervisor_child(stdin: OwnedFd, req: &Request, held: Vec<OwnedFd>) -> i32 {
    // Named for `ps -o comm`/`top` (its command line stays the launcher's).
    let _ = nix::sys::prctl::set_name(c"cybd-supervisor");
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    // The launcher's socket is fd 0: the pipe takes its place as stdin, which also closes
    // the socket in this process.
    if let Err(e) = nix::unistd::dup2_stdin(stdin.as_fd()) {
        eprintln!("cybd supervisor: cannot take the launch pipe as stdin: {e}");
        return 1;
    }
    drop(stdin);
    super::supervisor::main(&req.run_dir, &req.exit_file, req.attempt, held)
}
