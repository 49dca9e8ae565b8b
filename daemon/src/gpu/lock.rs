//! Per-GPU lockfiles `<runtime>/gpu/<index>.lock`, held with an exclusive `flock` (std's
//! `File::try_lock`) for the whole life of the job that uses the GPU.
//!
//! - The lock belongs to the open file description, not to a process: the daemon takes it,
//!   hands the descriptor ([`GpuLease::into_file`]) to the job's supervisor, which inherits
//!   it and keeps it until it exits, so the lock survives a restart of the daemon, and the
//!   kernel drops it when the last descriptor closes, even after a `kill -9`.
//! - The file's content names the holder: `{"job_id":..,"user":"..","pid":..,"since":".."}`.
//!   It is information, never the lock: a GPU is held if and only if `flock` says so.
//! - Anything else on the host can take the same lock (`flock /run/cyb/gpu/0.lock CMD`) and
//!   cybd respects it. The files are `0644`, owned by the daemon's user, so anyone can open
//!   them to lock them and only the daemon can write them.
//!
//! # Who holds a lock
//!
//! [`GpuLocks::status`] tries the lock on a fresh descriptor (and drops it at once). When it
//! is held, the content alone cannot tell cybd's holder from an outsider: a job that ended
//! leaves its holder text behind, and `flock FILE CMD` writes nothing. So a lock counts as
//! held by cybd only when the content is a valid holder *and* the process `pid` it names
//! has a descriptor of this very file (same device and inode) whose `/proc/<pid>/fdinfo`
//! shows an exclusive `FLOCK` on it (the kernel lists, under an fd's `lock:` lines, the
//! locks owned by that fd's open file description). Everything else held is "outside". If
//! `/proc/<pid>` cannot be read, cybd cannot prove its holder and says "outside": this only
//! affects what is shown, since whether a GPU can be taken is always decided by `flock`.
//! The process that finally keeps the lock (the supervisor) must therefore record its own
//! pid with [`GpuLease::set_pid`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cyb_proto::{JobId, Timestamp};
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

/// Holder texts longer than this are not cybd's.
const MAX_HOLDER_BYTES: u64 = 4096;

/// What can go wrong with a lockfile or its directory.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("cannot create lock directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open lock directory {}: {source}", path.display())]
    OpenDir { path: PathBuf, source: io::Error },
    #[error("refusing lock directory {}: {reason}", path.display())]
    UnsafeDir { path: PathBuf, reason: String },
    #[error("cannot open lockfile {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("refusing lockfile {}: {reason}", path.display())]
    UnsafeFile { path: PathBuf, reason: String },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot read lockfile {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the holder into {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("the descriptor given for {} is another file", path.display())]
    OtherFile { path: PathBuf },
    #[error("the descriptor given for {} does not hold its lock: another process does", path.display())]
    NotHeld { path: PathBuf },
    #[error("lockfile {} does not name a cybd holder", path.display())]
    NoHolder { path: PathBuf },
}

/// Who holds a GPU: the content of its lockfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub job_id: JobId,
    /// The job's user.
    pub user: String,
    /// The process that keeps the lock: the daemon right after it took it, then the job's
    /// supervisor ([`GpuLease::set_pid`]).
    pub pid: u32,
    /// When the job took the GPU.
    pub since: Timestamp,
}

impl Holder {
    /// A holder for `job_id` taking the lock now, in this process.
    pub fn new(job_id: JobId, user: impl Into<String>) -> Holder {
        Holder {
            job_id,
            user: user.into(),
            pid: std::process::id(),
            since: Timestamp::now(),
        }
    }

    /// Reads a lockfile's content; `None` unless it is a complete cybd holder.
    pub fn parse(bytes: &[u8]) -> Option<Holder> {
        if bytes.len() as u64 > MAX_HOLDER_BYTES {
            return None;
        }
        let h: Holder = serde_json::from_slice(bytes).ok()?;
        (h.pid > 0 && !h.user.is_empty()).then_some(h)
    }

    /// The holder as one line of JSON, newline included.
    pub fn to_line(&self) -> String {
        // A struct of integers, strings and a timestamp always serialises.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// The state of one GPU's lockfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockStatus {
    /// Nobody holds it (whatever text an earlier holder left in it).
    Free,
    /// A cybd job holds it; the process `pid` of the holder has it locked.
    HeldByCyb(Holder),
    /// Held by something cybd does not know (or cannot prove is its own).
    HeldOutside,
}

/// A held GPU lock: an open descriptor of `<index>.lock` carrying an exclusive `flock`.
///
/// Dropping the lease closes this descriptor; the lock ends when the last descriptor of the
/// same open file description closes, so a copy inherited by a child keeps it. The holder
/// text stays in the file (see [`release`](Self::release) to clear it).
#[derive(Debug)]
pub struct GpuLease {
    index: u32,
    path: PathBuf,
    file: File,
    holder: Holder,
}

impl GpuLease {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Records `pid` as the process that keeps the lock, rewriting the holder text through
    /// the locked descriptor. The supervisor calls it with its own pid.
    pub fn set_pid(&mut self, pid: u32) -> Result<(), GpuError> {
        let mut h = self.holder.clone();
        h.pid = pid;
        write_holder(&self.file, &h, &self.path)?;
        self.holder = h;
        Ok(())
    }

    /// The locked descriptor, to hand to the process that keeps the lock. It is close-on-exec
    /// like every descriptor std opens: the spawner clears `FD_CLOEXEC` on it in the child
    /// (`fcntl(fd, F_SETFD, 0)` in `pre_exec`, keeping its number) or `dup2`s it to a number
    /// that std's own spawn pipe cannot be using. Once the child has it, the daemon may
    /// close its copy: the lock stays with the child until the child's copy closes.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Clears the holder text and drops the lock now, for a lease nobody else shares (a
    /// half-done allocation). With a copy of the descriptor in another process this would
    /// release that process's lock too.
    pub fn release(self) -> Result<(), GpuError> {
        self.file.set_len(0).map_err(|source| GpuError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.file.unlock().map_err(|source| GpuError::Lock {
            path: self.path.clone(),
            source,
        })
    }
}

impl AsFd for GpuLease {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The lockfiles in one directory (`<runtime>/gpu` for the daemon).
#[derive(Clone, Debug)]
pub struct GpuLocks {
    dir: PathBuf,
}

impl GpuLocks {
    /// Lockfiles in `dir`, created (mode 0755) on first use.
    pub fn new(dir: impl Into<PathBuf>) -> GpuLocks {
        GpuLocks { dir: dir.into() }
    }

    /// The daemon's lockfiles: `<runtime>/gpu/<index>.lock`.
    pub fn for_runtime(runtime: &Path) -> GpuLocks {
        GpuLocks::new(runtime.join("gpu"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lockfile of GPU `index`.
    pub fn path(&self, index: u32) -> PathBuf {
        self.dir.join(lock_name(index))
    }

    /// Creates the directory and the lockfiles of `indices` (empty, not locked), so that
    /// tools outside cybd can lock GPUs with no write access to the directory.
    pub fn prepare(&self, indices: impl IntoIterator<Item = u32>) -> Result<(), GpuError> {
        let dir = self.open_dir(true)?;
        for index in indices {
            self.open_lock(&dir, index, true)?;
        }
        Ok(())
    }

    /// Takes GPU `index` for `holder` if nobody holds it: `Ok(None)` when it is held (by
    /// cybd or by anyone else). On success the file holds `holder` as JSON.
    pub fn try_acquire(&self, index: u32, holder: &Holder) -> Result<Option<GpuLease>, GpuError> {
        let dir = self.open_dir(true)?;
        let path = self.path(index);
        let file = self.open_lock(&dir, index, true)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(source)) => return Err(GpuError::Lock { path, source }),
        }
        // On failure the file is closed here, which drops the lock again.
        write_holder(&file, holder, &path)?;
        Ok(Some(GpuLease {
            index,
            path,
            file,
            holder: holder.clone(),
        }))
    }

    /// Who holds GPU `index`; see the module documentation for the rule. Taking the lock for
    /// a moment to test it, this can make a concurrent non-blocking attempt fail once.
    pub fn status(&self, index: u32) -> Result<LockStatus, GpuError> {
        match std::fs::symlink_metadata(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LockStatus::Free),
            _ => {}
        }
        let dir = self.open_dir(false)?;
        let path = self.path(index);
        let file = match openat(
            dir.as_fd(),
            lock_name(index).as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(nix::Error::ENOENT) => return Ok(LockStatus::Free),
            Err(e) => return Err(open_error(&path, e)),
        };
        let md = check_file(&file, &path)?;
        match file.try_lock() {
            // Closing the descriptor below releases it at once.
            Ok(()) => return Ok(LockStatus::Free),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => return Err(GpuError::Lock { path, source }),
        }
        let text = read_holder_bytes(&file, &path)?;
        Ok(match Holder::parse(&text) {
            Some(h) if pid_holds_lock(h.pid, md.dev(), md.ino()) => LockStatus::HeldByCyb(h),
            _ => LockStatus::HeldOutside,
        })
    }

    /// Takes over an inherited locked descriptor of GPU `index` (in the supervisor), to
    /// [`set_pid`](GpuLease::set_pid) or [`release`](GpuLease::release) it. Fails unless `fd`
    /// is this GPU's lockfile, holds (or can take) its lock and names a cybd holder.
    pub fn adopt(&self, index: u32, fd: OwnedFd) -> Result<GpuLease, GpuError> {
        let path = self.path(index);
        let file = File::from(fd);
        let md = check_file(&file, &path)?;
        let on_disk = std::fs::symlink_metadata(&path).map_err(|source| GpuError::Open {
            path: path.clone(),
            source,
        })?;
        if (on_disk.dev(), on_disk.ino()) != (md.dev(), md.ino()) {
            return Err(GpuError::OtherFile { path });
        }
        // flock on a descriptor whose open file description holds the lock already succeeds.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(GpuError::NotHeld { path }),
            Err(std::fs::TryLockError::Error(source)) => return Err(GpuError::Lock { path, source }),
        }
        let text = read_holder_bytes(&file, &path)?;
        let Some(holder) = Holder::parse(&text) else {
            return Err(GpuError::NoHolder { path });
        };
        Ok(GpuLease {
            index,
            path,
            file,
            holder,
        })
    }

    /// Opens (creating if asked) the lock directory, refusing a symlink, a directory owned
    /// by someone else or one that others may write into.
    fn open_dir(&self, create: bool) -> Result<File, GpuError> {
        if create {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&self.dir)
                .map_err(|source| GpuError::CreateDir {
                    path: self.dir.clone(),
                    source,
                })?;
        }
        let fd = open(
            &self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| GpuError::OpenDir {
            path: self.dir.clone(),
            source: io::Error::from(e),
        })?;
        let dir = File::from(fd);
        let md = dir.metadata().map_err(|source| GpuError::OpenDir {
            path: self.dir.clone(),
            source,
        })?;
        let me = nix::unistd::geteuid().as_raw();
        if md.uid() != me {
            return Err(GpuError::UnsafeDir {
                path: self.dir.clone(),
                reason: format!("it is owned by uid {}, not by uid {me}", md.uid()),
            });
        }
        if md.mode() & 0o022 != 0 {
            return Err(GpuError::UnsafeDir {
                path: self.dir.clone(),
                reason: format!("others may write into it (mode {:o})", md.mode() & 0o7777),
            });
        }
        Ok(dir)
    }

    /// Opens `<index>.lock` read-write (creating it 0644 if asked) without following a
    /// symlink, and checks that it is a plain file of ours.
    fn open_lock(&self, dir: &File, index: u32, create: bool) -> Result<File, GpuError> {
        let path = self.path(index);
        let mut flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        if create {
            flags |= OFlag::O_CREAT;
        }
        let fd = openat(
            dir.as_fd(),
            lock_name(index).as_str(),
            flags,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| open_error(&path, e))?;
        let file = File::from(fd);
        let md = check_file(&file, &path)?;
        // The umask may have taken read access from others, who need it to lock the file.
        if md.mode() & 0o7777 != 0o644 {
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|source| GpuError::Open {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(file)
    }
}

fn lock_name(index: u32) -> String {
    format!("{index}.lock")
}

fn open_error(path: &Path, e: nix::Error) -> GpuError {
    let reason = match e {
        nix::Error::ELOOP => "it is a symlink",
        nix::Error::EISDIR => "it is a directory, not a regular file",
        _ => "",
    };
    if !reason.is_empty() {
        return GpuError::UnsafeFile {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
    }
    GpuError::Open {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// Checks an open lockfile: a regular file, owned by us, with one name.
fn check_file(file: &File, path: &Path) -> Result<std::fs::Metadata, GpuError> {
    let md = file.metadata().map_err(|source| GpuError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let unsafe_file = |reason: String| GpuError::UnsafeFile {
        path: path.to_path_buf(),
        reason,
    };
    let ft = md.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a fifo"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(unsafe_file(format!("it is {kind}, not a regular file")));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(unsafe_file(format!(
            "it is owned by uid {}, not by uid {me}",
            md.uid()
        )));
    }
    if md.nlink() != 1 {
        return Err(unsafe_file(format!("it has {} hard links", md.nlink())));
    }
    Ok(md)
}

/// Writes `holder` at the start of the file. A shorter text than the old one is padded with
/// spaces (still valid JSON), so a reader never sees a mix of old and new.
fn write_holder(file: &File, holder: &Holder, path: &Path) -> Result<(), GpuError> {
    let werr = |source| GpuError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = holder.to_line().into_bytes();
    let old = file.metadata().map_err(werr)?.len();
    if old > MAX_HOLDER_BYTES {
        file.set_len(0).map_err(werr)?;
    } else if (bytes.len() as u64) < old {
        bytes.resize(old as usize, b' ');
    }
    file.write_all_at(&bytes, 0).map_err(werr)?;
    file.set_len(bytes.len() as u64).map_err(werr)
}

/// Reads the holder text with positioned reads: an inherited descriptor's offset is shared.
fn read_holder_bytes(file: &File, path: &Path) -> Result<Vec<u8>, GpuError> {
    // One more byte than a holder may have, so an oversized text is seen as such.
    let mut buf = vec![0u8; MAX_HOLDER_BYTES as usize + 1];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(GpuError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Whether process `pid` has a descriptor of the file `(dev, ino)` whose open file
/// description holds an exclusive flock on it (a `lock:` line in its fdinfo).
pub(crate) fn pid_holds_lock(pid: u32, dev: u64, ino: u64) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    for entry in entries.flatten() {
        // stat follows the magic link to the open file itself.
        let Ok(md) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if (md.dev(), md.ino()) != (dev, ino) {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = std::fs::read_to_string(fdinfo) else {
            continue;
        };
        if info
            .lines()
            .any(|l| l.starts_with("lock:") && l.contains(" FLOCK ") && l.contains(" WRITE "))
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Asserts that lock `i` is free, or becomes so within 2 s: when a descriptor is closed,
    /// another test of this process that forked meanwhile may hold a copy until its child
    /// execs (close-on-exec), and the lock lasts as long as any copy.
    fn assert_becomes_free(locks: &GpuLocks, i: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while locks.status(i).unwrap() != LockStatus::Free && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(locks.status(i).unwrap(), LockStatus::Free);
    }

    fn holder(job_id: JobId) -> Holder {
        Holder::new(job_id, "alice")
    }

    /// The pid of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn holder_text() {
        let h = holder(42);
        assert_eq!(h.pid, std::process::id());
        let line = h.to_line();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["job_id"], 42);
        assert_eq!(v["user"], "alice");
        assert_eq!(v["pid"], std::process::id());
        assert!(v["since"].as_str().unwrap().contains('T'), "rfc3339: {v}");
        assert_eq!(Holder::parse(line.as_bytes()), Some(h.clone()));
        // Padding after the JSON (a shorter rewrite) and unknown fields are fine.
        assert_eq!(Holder::parse(format!("{line}      ").as_bytes()), Some(h));
        let extra = r#"{"job_id":1,"user":"u","pid":3,"since":"2026-01-02T03:04:05Z","gpu":0}"#;
        assert_eq!(Holder::parse(extra.as_bytes()).map(|h| h.pid), Some(3));
    }

    #[test]
    fn holder_text_rejected() {
        for bad in [
            "",
            "\n",
            "not json",
            "12345\n",
            r#"{"job_id":1,"user":"u","since":"2026-01-02T03:04:05Z"}"#,
            r#"{"job_id":1,"user":"u","pid":0,"since":"2026-01-02T03:04:05Z"}"#,
            r#"{"job_id":1,"user":"","pid":3,"since":"2026-01-02T03:04:05Z"}"#,
            r#"{"job_id":1,"user":"u","pid":3,"since":"yesterday"}"#,
            r#"{"job_id":-1,"user":"u","pid":3,"since":"2026-01-02T03:04:05Z"}"#,
            r#"{"job_id":1,"user":"u","pid":3,"since":"2026-01-02T03:04:05Z"} trailing"#,
        ] {
            assert_eq!(Holder::parse(bad.as_bytes()), None, "{bad:?}");
        }
        let mut big = holder(1).to_line();
        big.push_str(&" ".repeat(MAX_HOLDER_BYTES as usize));
        assert_eq!(Holder::parse(big.as_bytes()), None, "oversized");
    }

    #[test]
    fn acquire_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        assert_eq!(locks.status(0).unwrap(), LockStatus::Free, "no directory yet");
        let h = holder(1);
        let lease = locks.try_acquire(0, &h).unwrap().unwrap();
        assert_eq!(lease.index(), 0);
        assert_eq!(lease.path(), tmp.path().join("gpu/0.lock"));
        assert!(locks.try_acquire(0, &holder(2)).unwrap().is_none());
        let md = std::fs::metadata(lease.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o644);
        assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(std::fs::read_to_string(lease.path()).unwrap(), h.to_line());
        assert_eq!(locks.status(0).unwrap(), LockStatus::HeldByCyb(h));
        assert_eq!(locks.status(1).unwrap(), LockStatus::Free, "no file yet");
        drop(lease);
        assert_becomes_free(&locks, 0);
        assert!(locks.try_acquire(0, &holder(2)).unwrap().is_some());
    }

    #[test]
    fn prepare_makes_lockable_files() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::new(tmp.path().join("a/b/gpu"));
        locks.prepare([0, 1]).unwrap();
        for i in [0, 1] {
            let md = std::fs::metadata(locks.path(i)).unwrap();
            assert!(md.is_file() && md.len() == 0);
            assert_eq!(md.permissions().mode() & 0o7777, 0o644);
            assert_eq!(locks.status(i).unwrap(), LockStatus::Free);
        }
        let dmd = std::fs::metadata(locks.dir()).unwrap();
        assert_eq!(dmd.permissions().mode() & 0o022, 0);
    }

    #[test]
    fn stale_text_is_free_and_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        locks.prepare([0]).unwrap();
        // A long stale holder naming a live process (this one) that does not hold the lock.
        let mut old = holder(123456789);
        old.user = "a-user-with-a-long-name".into();
        std::fs::write(locks.path(0), old.to_line()).unwrap();
        assert_eq!(locks.status(0).unwrap(), LockStatus::Free);
        let new = Holder::new(2, "bo");
        let lease = locks.try_acquire(0, &new).unwrap().unwrap();
        let text = std::fs::read(lease.path()).unwrap();
        assert_eq!(Holder::parse(&text), Some(new));
        assert_eq!(text.len(), old.to_line().len(), "padded over the longer old text");
    }

    #[test]
    fn held_with_a_holder_that_does_not_hold_it_is_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        locks.prepare([0]).unwrap();
        // Our holder text names a dead process; the lock is held by a descriptor of ours.
        let mut h = holder(3);
        h.pid = dead_pid();
        std::fs::write(locks.path(0), h.to_line()).unwrap();
        let f = File::open(locks.path(0)).unwrap();
        f.try_lock().unwrap();
        assert_eq!(locks.status(0).unwrap(), LockStatus::HeldOutside);
        // Naming this process, which has the lock: cybd's.
        h.pid = std::process::id();
        std::fs::write(locks.path(0), h.to_line()).unwrap();
        assert_eq!(locks.status(0).unwrap(), LockStatus::HeldByCyb(h));
        // Empty text: outside.
        std::fs::write(locks.path(0), "").unwrap();
        assert_eq!(locks.status(0).unwrap(), LockStatus::HeldOutside);
        drop(f);
        assert_becomes_free(&locks, 0);
    }

    #[test]
    fn set_pid_adopt_release() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        let mut lease = locks.try_acquire(2, &holder(9)).unwrap().unwrap();
        lease.set_pid(1).unwrap();
        assert_eq!(lease.holder().pid, 1);
        let text = std::fs::read(lease.path()).unwrap();
        assert_eq!(Holder::parse(&text).unwrap().pid, 1);
        // pid 1 does not hold it, so it is not shown as cybd's.
        assert_eq!(locks.status(2).unwrap(), LockStatus::HeldOutside);
        // A copy of the descriptor (as a supervisor inherits it) can be adopted.
        let fd = lease.as_fd().try_clone_to_owned().unwrap();
        let mut adopted = locks.adopt(2, fd).unwrap();
        assert_eq!(adopted.holder().job_id, 9);
        adopted.set_pid(std::process::id()).unwrap();
        assert!(matches!(locks.status(2).unwrap(), LockStatus::HeldByCyb(h) if h.pid == std::process::id()));
        drop(lease);
        assert!(
            locks.try_acquire(2, &holder(10)).unwrap().is_none(),
            "the copy keeps it"
        );
        adopted.release().unwrap();
        assert_eq!(std::fs::read(locks.path(2)).unwrap(), b"");
        assert_becomes_free(&locks, 2);
    }

    #[test]
    fn adopt_refuses_other_files_and_unheld_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        let l0 = locks.try_acquire(0, &holder(1)).unwrap().unwrap();
        let fd = l0.as_fd().try_clone_to_owned().unwrap();
        let e = locks.adopt(1, fd).unwrap_err();
        assert!(matches!(e, GpuError::Open { .. }), "{e}");
        locks.prepare([1]).unwrap();
        let fd = l0.as_fd().try_clone_to_owned().unwrap();
        let e = locks.adopt(1, fd).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the descriptor given for {} is another file",
                locks.path(1).display()
            )
        );
        // A fresh descriptor of GPU 0's file while l0 holds the lock.
        let fresh = File::open(locks.path(0)).unwrap();
        let e = locks.adopt(0, fresh.into()).unwrap_err();
        assert!(matches!(e, GpuError::NotHeld { .. }), "{e}");
        // A lockfile with no holder text.
        let fresh = File::open(locks.path(1)).unwrap();
        let e = locks.adopt(1, fresh.into()).unwrap_err();
        assert!(matches!(e, GpuError::NoHolder { .. }), "{e}");
    }

    #[test]
    fn refuses_what_is_not_a_plain_lockfile() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        locks.prepare([]).unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, locks.path(0)).unwrap();
        let e = locks.try_acquire(0, &holder(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("refusing lockfile {}: it is a symlink", locks.path(0).display())
        );
        assert!(locks.status(0).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        std::fs::create_dir(locks.path(1)).unwrap();
        let e = locks.try_acquire(1, &holder(1)).unwrap_err();
        assert!(e.to_string().contains("it is a directory"), "{e}");
        std::fs::hard_link(&target, locks.path(2)).unwrap();
        let e = locks.try_acquire(2, &holder(1)).unwrap_err();
        assert!(e.to_string().ends_with("it has 2 hard links"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        nix::unistd::mkfifo(&locks.path(3), Mode::from_bits_truncate(0o644)).unwrap();
        let e = locks.try_acquire(3, &holder(1)).unwrap_err();
        assert!(e.to_string().contains("it is a fifo"), "{e}");
        // The lock directory itself as a symlink.
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let e = GpuLocks::new(tmp.path().join("link"))
            .try_acquire(0, &holder(1))
            .unwrap_err();
        assert!(matches!(e, GpuError::OpenDir { .. }), "{e}");
    }

    #[test]
    fn umask_does_not_hide_the_file_from_others() {
        let tmp = tempfile::tempdir().unwrap();
        let locks = GpuLocks::for_runtime(tmp.path());
        locks.prepare([]).unwrap();
        // As if created under umask 077 by an earlier run.
        std::fs::write(locks.path(0), "").unwrap();
        std::fs::set_permissions(locks.path(0), std::fs::Permissions::from_mode(0o600)).unwrap();
        let lease = locks.try_acquire(0, &holder(1)).unwrap().unwrap();
        let mode = std::fs::metadata(lease.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
    }
}
