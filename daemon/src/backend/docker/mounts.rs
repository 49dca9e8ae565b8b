//! Bind mounts for a Docker job: turns a spec's `HOST:CTR[:ro|rw]` into a bind the engine
//! can be given, refusing what the job's user may not have: anything outside
//! `[docker] allowed_mount_prefixes`, the Docker socket or a directory holding it, any unix
//! socket, what the user's mode bits do not let them reach, and container paths cybd
//! reserves.
//!
//! Pure apart from reading file metadata: no engine access, no async (it stats the file
//! system, so call it from a blocking context).
//!
//! The check is made on the canonical host path at the time of the call, and the engine
//! resolves the path again when it creates the container: a user who owns a directory on
//! that path could swap a component for a symlink in between. Prefixes should therefore
//! name trees whose directories the job's users cannot rename into (or the caller should
//! pass the engine the canonical path and create the container at once).

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Where the lead mounts the run directory's artifacts; `/cyb` and everything under it is
/// reserved for cybd.
pub const ARTIFACTS_MOUNT: &str = "/cyb/artifacts";

/// The container directory reserved for cybd's own mounts.
pub const RESERVED_DIR: &str = "/cyb";

/// Who the job runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one may be included or not).
    pub groups: Vec<u32>,
}

impl From<&crate::users::Account> for Creds {
    fn from(a: &crate::users::Account) -> Creds {
        Creds {
            uid: a.uid,
            gid: a.gid,
            groups: a.groups.clone(),
        }
    }
}

/// One checked bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Canonical: absolute, no `..`, no symlinks.
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

impl Bind {
    /// `host:ctr:ro` or `host:ctr:rw`, for the engine's `HostConfig.Binds`.
    pub fn to_docker(&self) -> String {
        format!(
            "{}:{}:{}",
            self.host.display(),
            self.container,
            if self.read_only { "ro" } else { "rw" }
        )
    }
}

/// Why a mount is refused; every message names the mount as written and the reason.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount `{mount}` is not `/host/path:/container/path[:ro|rw]`: {why}")]
    Syntax { mount: String, why: String },
    #[error("mount `{mount}`: container path `{path}` {why}")]
    ContainerPath {
        mount: String,
        path: String,
        why: String,
    },
    #[error("mount `{mount}`: container path `{path}` is reserved for cybd (`{RESERVED_DIR}` and below)")]
    Reserved { mount: String, path: String },
    #[error(
        "mount `{mount}` refused: this host allows no bind mounts ([docker] allowed_mount_prefixes is empty)"
    )]
    NoPrefixes { mount: String },
    #[error("mount `{mount}`: host path {} does not exist", path.display())]
    HostNotFound { mount: String, path: PathBuf },
    #[error("mount `{mount}`: cannot resolve host path {}: {source}", path.display())]
    HostIo {
        mount: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mount `{mount}`: host path {} is not under any of [docker] allowed_mount_prefixes ({prefixes}) once `..` and symlinks are resolved",
        path.display()
    )]
    OutsidePrefixes {
        mount: String,
        path: PathBuf,
        prefixes: String,
    },
    #[error(
        "mount `{mount}`: host path {} is or contains the Docker socket {}, which would give the job root on the host",
        path.display(), socket.display()
    )]
    DockerSocket {
        mount: String,
        path: PathBuf,
        socket: PathBuf,
    },
    #[error("mount `{mount}`: host path {} is a unix socket; sockets cannot be mounted", path.display())]
    Socket { mount: String, path: PathBuf },
    #[error("mount `{mount}`: uid {uid} cannot search directory {} (no x permission)", dir.display())]
    NotSearchable { mount: String, dir: PathBuf, uid: u32 },
    #[error("mount `{mount}`: uid {uid} cannot read {}", path.display())]
    NotReadable { mount: String, path: PathBuf, uid: u32 },
    #[error("mount `{mount}`: uid {uid} cannot write {} (mount it with `:ro`)", path.display())]
    NotWritable { mount: String, path: PathBuf, uid: u32 },
}

/// Checks one spec mount and returns the bind to give the engine.
///
/// - `spec` is `HOST:CTR` or `HOST:CTR:ro|rw`; without a mode the mount is read-write, as
///   in Docker. Host paths containing `:` cannot be expressed.
/// - The host path is canonicalized (`..` and symlinks resolved; it must exist) and must be
///   one of `prefixes` or under one, component-wise (`/data2` is not under `/data`), the
///   prefixes being canonicalized too (one that does not exist allows nothing). No
///   prefixes: every mount is refused. A refusal for being outside the prefixes names the
///   path as written, and a missing path outside them is refused the same way, so that
///   refusals do not tell where a symlink leads or what exists outside the prefixes
///   (inside them, "does not exist" and "cannot search" still differ).
/// - Never a unix socket, never the Docker socket (any of `sockets`, also through a hard
///   link) nor a directory containing it (`/run` holds `/run/docker.sock`).
/// - `creds` must be able to reach it by mode bits alone: x on every directory from `/`
///   down, and r on the target (r and x for a directory), plus w for a read-write mount.
///   Owner bits apply to the owner, group bits to the file's group if it is `gid` or one of
///   `groups`, other bits to everyone else; uid 0 gets no override. POSIX ACLs are not
///   consulted: access an ACL entry grants beyond the mode bits is refused here, and access
///   an ACL entry denies (`user:bob:---` on a file whose other bits allow reading) is
///   allowed here, so do not rely on ACLs to keep users out of the prefixes.
/// - The container path must be absolute and normalized (no empty, `.` or `..`
///   components, no trailing `/`), not `/`, and not `/cyb` or under it
///   ([`ARTIFACTS_MOUNT`]).
pub fn resolve(
    spec: &str,
    prefixes: &[PathBuf],
    sockets: &[PathBuf],
    creds: &Creds,
) -> Result<Bind, MountError> {
    let mount = || spec.to_string();
    let syntax = |why: &str| MountError::Syntax {
        mount: mount(),
        why: why.to_string(),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, m] => return Err(syntax(&format!("mode `{m}` is neither `ro` nor `rw`"))),
        _ => return Err(syntax("expected two or three `:`-separated parts")),
    };
    if host.contains('\0') || container.contains('\0') {
        return Err(syntax("it contains a NUL byte"));
    }
    if !host.starts_with('/') {
        return Err(syntax(&format!("host path `{host}` is not absolute")));
    }
    check_container(spec, container)?;

    if prefixes.is_empty() {
        return Err(MountError::NoPrefixes { mount: mount() });
    }
    let host_path = Path::new(host);
    let canonical_prefixes: Vec<PathBuf> = prefixes
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    // Named as written, never resolved: the refusal of a path outside the prefixes says
    // nothing about whether it exists or where its symlinks lead.
    let outside = || MountError::OutsidePrefixes {
        mount: mount(),
        path: host_path.to_path_buf(),
        prefixes: prefixes
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let canonical = match std::fs::canonicalize(host_path) {
        Ok(c) => c,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            let lexical = normalize(host_path);
            let inside = prefixes
                .iter()
                .map(|p| normalize(p))
                .chain(canonical_prefixes.iter().cloned())
                .any(|p| lexical.starts_with(p));
            return Err(if inside {
                MountError::HostNotFound {
                    mount: mount(),
                    path: host_path.to_path_buf(),
                }
            } else {
                outside()
            });
        }
        Err(source) => {
            return Err(MountError::HostIo {
                mount: mount(),
                path: host_path.to_path_buf(),
                source,
            });
        }
    };
    let io = |path: &Path, source: std::io::Error| MountError::HostIo {
        mount: mount(),
        path: path.to_path_buf(),
        source,
    };
    if !canonical_prefixes.iter().any(|p| canonical.starts_with(p)) {
        return Err(outside());
    }

    let meta = std::fs::metadata(&canonical).map_err(|e| io(&canonical, e))?;
    for socket in sockets {
        let sock_meta = std::fs::metadata(socket).ok();
        // A socket that does not exist (yet) is compared by its path as written.
        let sock_path = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.clone());
        let same_inode = sock_meta
            .as_ref()
            .is_some_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
        if same_inode || sock_path.starts_with(&canonical) {
            return Err(MountError::DockerSocket {
                mount: mount(),
                path: canonical,
                socket: socket.clone(),
            });
        }
    }
    if meta.file_type().is_socket() {
        return Err(MountError::Socket {
            mount: mount(),
            path: canonical,
        });
    }

    // Every directory from `/` down to the target's parent must be searchable.
    let mut dir = PathBuf::from("/");
    let mut ancestors = vec![dir.clone()];
    if let Some(parent) = canonical.parent() {
        for c in parent.components().skip(1) {
            dir.push(c);
            ancestors.push(dir.clone());
        }
    }
    if canonical != Path::new("/") {
        for d in &ancestors {
            let m = std::fs::metadata(d).map_err(|e| io(d, e))?;
            if !permits(&m, creds, X) {
                return Err(MountError::NotSearchable {
                    mount: mount(),
                    dir: d.clone(),
                    uid: creds.uid,
                });
            }
        }
    }
    let read = if meta.is_dir() { R | X } else { R };
    if !permits(&meta, creds, read) {
        return Err(MountError::NotReadable {
            mount: mount(),
            path: canonical,
            uid: creds.uid,
        });
    }
    if !read_only && !permits(&meta, creds, W) {
        return Err(MountError::NotWritable {
            mount: mount(),
            path: canonical,
            uid: creds.uid,
        });
    }
    Ok(Bind {
        host: canonical,
        container: container.to_string(),
        read_only,
    })
}

/// `p` with `.` dropped and `..` applied textually (not above `/`), symlinks untouched.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

/// Whether the mode bits of `m` grant all of `want` (an `rwx` triple) to `creds`: the
/// owner class for the owner, else the group class for a member, else the other class.
fn permits(m: &Metadata, creds: &Creds, want: u32) -> bool {
    let mode = m.mode();
    let class = if m.uid() == creds.uid {
        (mode >> 6) & 7
    } else if m.gid() == creds.gid || creds.groups.contains(&m.gid()) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    class & want == want
}

fn check_container(spec: &str, path: &str) -> Result<(), MountError> {
    let bad = |why: &str| MountError::ContainerPath {
        mount: spec.to_string(),
        path: path.to_string(),
        why: why.to_string(),
    };
    if !path.starts_with('/') {
        return Err(bad("is not absolute"));
    }
    if path == "/" {
        return Err(bad("is the container's root"));
    }
    if path.ends_with('/') {
        return Err(bad("ends with `/`"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("contains a control character"));
    }
    for c in path[1..].split('/') {
        match c {
            "" => return Err(bad("has an empty component (`//`)")),
            "." | ".." => return Err(bad("has a `.` or `..` component")),
            _ => {}
        }
    }
    // The string is normalized now, so the component-wise test is exact.
    let p = Path::new(path);
    debug_assert!(
        p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    );
    if p.starts_with(RESERVED_DIR) {
        return Err(MountError::Reserved {
            mount: spec.to_string(),
            path: path.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    const OTHER: Creds = Creds {
        uid: 4242,
        gid: 4242,
        groups: Vec::new(),
    };

    fn root() -> Creds {
        Creds {
            uid: 0,
            gid: 0,
            groups: vec![0],
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A temp tree: `<t>/data` (the prefix, 0755), `<t>/data/ok.txt` (0644),
    /// `<t>/data2`, `<t>/outside/secret`, `<t>/run/docker.sock` (a real socket).
    struct Tree {
        _tmp: tempfile::TempDir,
        top: PathBuf,
        data: PathBuf,
        sock: PathBuf,
        _listener: UnixListener,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(tmp.path()).unwrap();
        chmod(&top, 0o755);
        let data = top.join("data");
        std::fs::create_dir(&data).unwrap();
        chmod(&data, 0o755);
        std::fs::write(data.join("ok.txt"), "x").unwrap();
        chmod(&data.join("ok.txt"), 0o644);
        std::fs::create_dir(top.join("data2")).unwrap();
        std::fs::create_dir(top.join("outside")).unwrap();
        std::fs::write(top.join("outside/secret"), "s").unwrap();
        std::fs::create_dir(top.join("run")).unwrap();
        let sock = top.join("run/docker.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        Tree {
            _tmp: tmp,
            top,
            data,
            sock,
            _listener: listener,
        }
    }

    impl Tree {
        fn resolve(&self, spec: &str, creds: &Creds) -> Result<Bind, MountError> {
            resolve(
                spec,
                std::slice::from_ref(&self.data),
                std::slice::from_ref(&self.sock),
                creds,
            )
        }
        fn spec(&self, host: &Path, rest: &str) -> String {
            format!("{}:{rest}", host.display())
        }
    }

    /// Whether the test can chown files to other users.
    fn am_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_path_under_the_prefix_is_bound() {
        let t = tree();
        let b = t
            .resolve(&t.spec(&t.data.join("ok.txt"), "/in/ok.txt:ro"), &OTHER)
            .unwrap();
        assert_eq!(b.host, t.data.join("ok.txt"));
        assert_eq!(b.container, "/in/ok.txt");
        assert!(b.read_only);
        assert_eq!(
            b.to_docker(),
            format!("{}:/in/ok.txt:ro", t.data.join("ok.txt").display())
        );
        // The prefix itself, read-write by its owner.
        let me = Creds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: vec![],
        };
        let b = t.resolve(&t.spec(&t.data, "/data"), &me).unwrap();
        assert!(!b.read_only);
        assert_eq!(b.to_docker(), format!("{}:/data:rw", t.data.display()));
        let b = t.resolve(&t.spec(&t.data, "/data:rw"), &me).unwrap();
        assert!(!b.read_only);
        // `..` that stays inside is fine, and the bind names the canonical path.
        let b = t
            .resolve(&format!("{}/../data/ok.txt:/x:ro", t.data.display()), &OTHER)
            .unwrap();
        assert_eq!(b.host, t.data.join("ok.txt"));
    }

    #[test]
    fn escapes_from_the_prefix_are_refused() {
        let t = tree();
        // `..` out of the prefix.
        let e = t
            .resolve(&format!("{}/../outside/secret:/x:ro", t.data.display()), &root())
            .unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
        assert!(e.to_string().contains("allowed_mount_prefixes"), "{e}");
        assert!(e.to_string().contains("/../outside/secret"), "{e}");
        // A symlink inside the prefix pointing outside.
        std::os::unix::fs::symlink(t.top.join("outside"), t.data.join("link")).unwrap();
        let e = t
            .resolve(&t.spec(&t.data.join("link/secret"), "/x:ro"), &root())
            .unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
        // ... without saying where the symlink leads.
        assert!(!e.to_string().contains("outside/secret"), "{e}");
        assert!(e.to_string().contains("link/secret"), "{e}");
        // A sibling that merely starts with the prefix's name.
        let e = t
            .resolve(&t.spec(&t.top.join("data2"), "/x:ro"), &root())
            .unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
        // The prefix's parent.
        let e = t.resolve(&t.spec(&t.top, "/x:ro"), &root()).unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
    }

    #[test]
    fn a_prefix_reached_through_a_symlink_is_canonicalized() {
        let t = tree();
        let alias = t.top.join("alias");
        std::os::unix::fs::symlink(&t.data, &alias).unwrap();
        let b = resolve(
            &t.spec(&t.data.join("ok.txt"), "/x:ro"),
            std::slice::from_ref(&alias),
            &[],
            &OTHER,
        )
        .unwrap();
        assert_eq!(b.host, t.data.join("ok.txt"));
        let b = resolve(
            &t.spec(&alias.join("ok.txt"), "/x:ro"),
            std::slice::from_ref(&t.data),
            &[],
            &OTHER,
        )
        .unwrap();
        assert_eq!(b.host, t.data.join("ok.txt"));
    }

    #[test]
    fn no_prefixes_refuses_every_mount() {
        let t = tree();
        let e = resolve(
            &t.spec(&t.data, "/x:ro"),
            &[],
            std::slice::from_ref(&t.sock),
            &root(),
        )
        .unwrap_err();
        assert!(matches!(e, MountError::NoPrefixes { .. }), "{e}");
        assert!(e.to_string().contains("[docker] allowed_mount_prefixes"), "{e}");
        // A prefix that does not exist allows nothing.
        let e = resolve(&t.spec(&t.data, "/x:ro"), &[t.top.join("nope")], &[], &root()).unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
    }

    #[test]
    fn a_missing_host_path_is_named() {
        let t = tree();
        let missing = t.data.join("missing");
        let e = t.resolve(&t.spec(&missing, "/x:ro"), &root()).unwrap_err();
        assert!(matches!(e, MountError::HostNotFound { .. }), "{e}");
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
        // Outside the prefixes, a missing path is refused like an existing one, so that
        // refusals tell nothing of what exists there.
        for p in [t.top.join("outside/missing"), t.top.join("outside/secret")] {
            let e = t.resolve(&t.spec(&p, "/x:ro"), &root()).unwrap_err();
            assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
        }
        let e = t
            .resolve(&format!("{}/../outside/missing:/x:ro", t.data.display()), &root())
            .unwrap_err();
        assert!(matches!(e, MountError::OutsidePrefixes { .. }), "{e}");
    }

    #[test]
    fn the_docker_socket_and_its_directories_are_refused() {
        let t = tree();
        let prefixes = [t.top.clone()];
        let sockets = [t.sock.clone()];
        for host in [t.sock.clone(), t.top.join("run"), t.top.clone()] {
            let e = resolve(&t.spec(&host, "/x:ro"), &prefixes, &sockets, &root()).unwrap_err();
            assert!(
                matches!(e, MountError::DockerSocket { .. }),
                "{}: {e}",
                host.display()
            );
            assert!(e.to_string().contains(&t.sock.display().to_string()), "{e}");
        }
        // Through a symlink to its directory.
        std::os::unix::fs::symlink(t.top.join("run"), t.top.join("data/run-link")).unwrap();
        let e = resolve(
            &t.spec(&t.top.join("data/run-link"), "/x:ro"),
            &prefixes,
            &sockets,
            &root(),
        )
        .unwrap_err();
        assert!(matches!(e, MountError::DockerSocket { .. }), "{e}");
        // Through a hard link.
        let hard = t.top.join("data/hard.sock");
        std::fs::hard_link(&t.sock, &hard).unwrap();
        let e = resolve(&t.spec(&hard, "/x:ro"), &prefixes, &sockets, &root()).unwrap_err();
        assert!(matches!(e, MountError::DockerSocket { .. }), "{e}");
        // The socket named through a symlink in the configuration.
        let sock_link = t.top.join("outside/docker.sock");
        std::os::unix::fs::symlink(&t.sock, &sock_link).unwrap();
        let e = resolve(
            &t.spec(&t.top.join("run"), "/x:ro"),
            &prefixes,
            &[sock_link],
            &root(),
        )
        .unwrap_err();
        assert!(matches!(e, MountError::DockerSocket { .. }), "{e}");
        // A non-socket path beside it is fine.
        let b = resolve(
            &t.spec(&t.data.join("ok.txt"), "/x:ro"),
            &prefixes,
            &sockets,
            &root(),
        )
        .unwrap();
        assert_eq!(b.host, t.data.join("ok.txt"));
    }

    #[test]
    fn any_unix_socket_is_refused() {
        let t = tree();
        let other = t.data.join("other.sock");
        let _l = UnixListener::bind(&other).unwrap();
        let e = t.resolve(&t.spec(&other, "/x:ro"), &root()).unwrap_err();
        assert!(matches!(e, MountError::Socket { .. }), "{e}");
        // The directory holding a socket that is not Docker's is fine.
        assert!(t.resolve(&t.spec(&t.data, "/x:ro"), &root()).is_ok());
    }

    #[test]
    fn the_users_mode_bits_decide() {
        if !am_root() {
            // chown needs root; under CYB_TEST_STRICT=1 a skip is a failure.
            assert!(
                std::env::var("CYB_TEST_STRICT").map_or(true, |v| v != "1"),
                "CYB_TEST_STRICT=1 and this test needs root"
            );
            println!("skipped: needs root");
            return;
        }
        let t = tree();
        // 0700 directory owned by root: uid 4242 cannot search it.
        let private = t.data.join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("f"), "x").unwrap();
        chmod(&private, 0o700);
        let e = t
            .resolve(&t.spec(&private.join("f"), "/x:ro"), &OTHER)
            .unwrap_err();
        assert!(matches!(e, MountError::NotSearchable { .. }), "{e}");
        assert!(e.to_string().contains("4242"), "{e}");
        assert!(e.to_string().contains(&private.display().to_string()), "{e}");
        let e = t.resolve(&t.spec(&private, "/x:ro"), &OTHER).unwrap_err();
        assert!(matches!(e, MountError::NotReadable { .. }), "{e}");
        // 0700 file owned by root: unreadable.
        let secret = t.data.join("secret");
        std::fs::write(&secret, "s").unwrap();
        chmod(&secret, 0o700);
        let e = t.resolve(&t.spec(&secret, "/x:ro"), &OTHER).unwrap_err();
        assert!(matches!(e, MountError::NotReadable { .. }), "{e}");
        // 0755 directory and 0644 file: readable, not writable.
        for p in [t.data.clone(), t.data.join("ok.txt")] {
            assert!(t.resolve(&t.spec(&p, "/x:ro"), &OTHER).is_ok(), "{}", p.display());
            let e = t.resolve(&t.spec(&p, "/x:rw"), &OTHER).unwrap_err();
            assert!(matches!(e, MountError::NotWritable { .. }), "{e}");
            assert!(e.to_string().contains(":ro"), "{e}");
            // No mode is read-write.
            let e = t.resolve(&t.spec(&p, "/x"), &OTHER).unwrap_err();
            assert!(matches!(e, MountError::NotWritable { .. }), "{e}");
        }
        // Group bits: a 0750 directory of group 4300 is readable by a member only.
        let shared = t.data.join("shared");
        std::fs::create_dir(&shared).unwrap();
        nix::unistd::chown(&shared, None, Some(nix::unistd::Gid::from_raw(4300))).unwrap();
        chmod(&shared, 0o750);
        assert!(matches!(
            t.resolve(&t.spec(&shared, "/x:ro"), &OTHER),
            Err(MountError::NotReadable { .. })
        ));
        let member = Creds {
            groups: vec![4300],
            ..OTHER
        };
        assert!(t.resolve(&t.spec(&shared, "/x:ro"), &member).is_ok());
        assert!(matches!(
            t.resolve(&t.spec(&shared, "/x:rw"), &member),
            Err(MountError::NotWritable { .. })
        ));
        // Owner bits: a 0700 directory owned by 4242 is theirs, read-write.
        let own = t.data.join("own");
        std::fs::create_dir(&own).unwrap();
        nix::unistd::chown(
            &own,
            Some(nix::unistd::Uid::from_raw(4242)),
            Some(nix::unistd::Gid::from_raw(4242)),
        )
        .unwrap();
        chmod(&own, 0o700);
        assert!(t.resolve(&t.spec(&own, "/x:rw"), &OTHER).is_ok());
        // ... and the owner class wins even when it grants less than the others get.
        chmod(&own, 0o077);
        assert!(matches!(
            t.resolve(&t.spec(&own, "/x:ro"), &OTHER),
            Err(MountError::NotReadable { .. })
        ));
        // uid 0 gets no override: mode bits only.
        chmod(&secret, 0o000);
        assert!(matches!(
            t.resolve(&t.spec(&secret, "/x:ro"), &root()),
            Err(MountError::NotReadable { .. })
        ));
    }

    #[test]
    fn container_paths_are_checked() {
        let t = tree();
        let host = t.data.join("ok.txt");
        for (ctr, what) in [
            ("relative/x", "is not absolute"),
            ("/", "root"),
            ("/a/", "ends with"),
            ("/a//b", "empty component"),
            ("/a/./b", "`.` or `..`"),
            ("/a/../b", "`.` or `..`"),
            ("/..", "`.` or `..`"),
        ] {
            let e = t
                .resolve(&t.spec(&host, &format!("{ctr}:ro")), &root())
                .unwrap_err();
            assert!(matches!(e, MountError::ContainerPath { .. }), "{ctr}: {e}");
            assert!(e.to_string().contains(what), "{ctr}: {e}");
            assert!(e.to_string().contains(ctr), "{ctr}: {e}");
        }
        for ctr in ["/cyb", "/cyb/artifacts", ARTIFACTS_MOUNT, "/cyb/x/y"] {
            let e = t
                .resolve(&t.spec(&host, &format!("{ctr}:ro")), &root())
                .unwrap_err();
            assert!(matches!(e, MountError::Reserved { .. }), "{ctr}: {e}");
        }
        // Only `/cyb` itself is reserved, not look-alikes.
        for ctr in ["/cyber", "/data/cyb", "/x"] {
            assert!(
                t.resolve(&t.spec(&host, &format!("{ctr}:ro")), &root()).is_ok(),
                "{ctr}"
            );
        }
    }

    #[test]
    fn bad_syntax_is_refused() {
        let t = tree();
        let host = t.data.join("ok.txt");
        for spec in [
            format!("{}", host.display()),
            format!("{}:/x:rx", host.display()),
            format!("{}:/x:ro:z", host.display()),
            "relative:/x".to_string(),
        ] {
            let e = t.resolve(&spec, &root()).unwrap_err();
            assert!(matches!(e, MountError::Syntax { .. }), "{spec}: {e}");
            assert!(e.to_string().contains(&spec), "{e}");
        }
    }
}
