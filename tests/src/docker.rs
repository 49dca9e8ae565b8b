//! A real Docker engine for the tests of cybd's Docker backend: [`engine`] brings it up
//! once per test process with `tests/system/docker.sh up` (Debian's dockerd on the default
//! socket, the local test images [`IMAGE`], [`IMAGE_ROOT_USER`], [`IMAGE_OTHER_NAME`], and
//! a test double of the NVIDIA container toolkit whose log is [`NVIDIA_HOOK_LOG`]), and
//! [`Engine`] runs the `docker` CLI against it to check what cybd did.
//!
//! Tests that stop the engine (engine trouble) share a test binary with tests that use it:
//! the first hold [`exclusive`], the others [`shared`], so they never overlap.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde_json::Value;

/// The busybox test image; declares no USER, so it runs as root by default.
pub const IMAGE: &str = "cyb-test:busybox";
/// The same root file system with `USER root` declared explicitly.
pub const IMAGE_ROOT_USER: &str = "cyb-test:root-user";
/// [`IMAGE`] under another repository name (same image id), for allowlist spellings.
pub const IMAGE_OTHER_NAME: &str = "cyb-other/busybox:1";
/// The engine's API socket (dockerd's default).
pub const SOCKET: &str = "/var/run/docker.sock";
/// Held (flock) while the script runs, since several test processes may start it at once.
pub const LOCK: &str = "/run/cyb-test-docker.lock";
/// One line per container started with a GPU device request: time, OCI bundle, and the
/// `NVIDIA_VISIBLE_DEVICES=...` dockerd's nvidia driver gave it (the hook test double's log).
pub const NVIDIA_HOOK_LOG: &str = "/var/lib/cyb-test/nvidia-double/hook.log";
/// The OCI runtime name the engine registers for GPU containers (`--add-runtime`).
pub const NVIDIA_RUNTIME: &str = "nvidia";

/// A Docker engine that answered when [`engine`] returned it.
#[derive(Clone, Debug)]
pub struct Engine {
    socket: PathBuf,
}

static UP: OnceLock<Result<(), String>> = OnceLock::new();
static USE: RwLock<()> = RwLock::new(());

/// The engine, brought up by `tests/system/docker.sh up` on the first call in this process
/// (and again if it no longer answers, say after a test that stopped it failed). None when
/// it cannot be: the reason went through [`crate::require`], so the caller just returns
/// (and fails under `CYB_TEST_STRICT=1`).
pub fn engine() -> Option<Engine> {
    let first = UP.get_or_init(|| script("up"));
    let result = match first {
        Err(e) => Err(e.clone()),
        Ok(()) if ping(Path::new(SOCKET)) => Ok(()),
        Ok(()) => script("up"),
    };
    match result {
        Ok(()) => Some(Engine {
            socket: PathBuf::from(SOCKET),
        }),
        Err(why) => {
            crate::require(false, &format!("a Docker engine ({why})"));
            None
        }
    }
}

/// Held by a test that uses the engine, so no test stops it meanwhile.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    USE.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held by a test that stops (or otherwise disturbs) the engine.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    USE.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `tests/system/docker.sh`.
pub fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("system/docker.sh")
}

/// Runs `docker.sh <action>` under [`LOCK`]; Err says why it could not.
fn script(action: &str) -> Result<(), String> {
    if !crate::is_root() {
        return Err("root, to start dockerd".into());
    }
    if !crate::have("flock") {
        return Err("flock(1), from util-linux".into());
    }
    // -o: the lock's descriptor is not passed on, so the dockerd that the script leaves
    // running does not keep holding it.
    let out = Command::new("flock")
        .arg("-o")
        .arg(LOCK)
        .arg("bash")
        .arg(script_path())
        .arg(action)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script_path().display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tests/system/docker.sh {action} failed ({}): {}",
            out.status,
            crate::shown(&out).trim()
        ))
    }
}

/// Whether an engine answers `GET /_ping` on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(5));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    stream.read_to_string(&mut reply).is_ok()
        && reply.starts_with("HTTP/1.")
        && reply.contains(" 200 ")
        && reply.ends_with("\r\n\r\nOK")
}

impl Engine {
    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// Runs `docker -H unix://SOCKET args...` (Debian's client when present: it matches
    /// the engine) and returns what it did; the caller checks the status.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let docker = if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker"
        } else {
            "docker"
        };
        Command::new(docker)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {docker}: {e}"))
    }

    /// Like [`Engine::cli`], but panics unless it succeeds; returns its stdout.
    pub fn cli_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            crate::shown(&out)
        );
        crate::text(&out.stdout)
    }

    /// The full ids of the containers, in any state, with label `label_kv` (`key=value`,
    /// or just `key`).
    pub fn containers_labeled(&self, label_kv: &str) -> Vec<String> {
        self.cli_ok([
            "ps",
            "--all",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("label={label_kv}"),
        ])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
    }

    /// `docker inspect id` (a container, image, network...): the object, or
    /// `Value::Null` if the engine has no such object.
    pub fn inspect(&self, id: &str) -> Value {
        let out = self.cli(["inspect", id]);
        if !out.status.success() {
            let err = crate::text(&out.stderr);
            assert!(
                err.contains("No such object") || err.contains("No such"),
                "docker inspect {id} failed: {}",
                crate::shown(&out)
            );
            return Value::Null;
        }
        let all: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("docker inspect {id} printed no JSON ({e})"));
        all.get(0).cloned().unwrap_or(Value::Null)
    }

    /// Whether the engine answers `/_ping` now.
    pub fn answers(&self) -> bool {
        ping(&self.socket)
    }

    /// Stops the engine (`docker.sh down`: kills its containers first). Hold
    /// [`exclusive`], and call [`Engine::start_engine`] before letting it go.
    pub fn stop_engine(&self) {
        if let Err(e) = script("down") {
            panic!("{e}");
        }
    }

    /// Starts the engine again (`docker.sh up`).
    pub fn start_engine(&self) {
        if let Err(e) = script("up") {
            panic!("{e}");
        }
    }

    /// What the NVIDIA hook test double logged so far (see [`NVIDIA_HOOK_LOG`]).
    pub fn nvidia_hook_log(&self) -> String {
        std::fs::read_to_string(NVIDIA_HOOK_LOG).unwrap_or_default()
    }
}
