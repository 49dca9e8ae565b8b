//! File helpers for directories that other users may control (run directories, the spool):
//! every open is relative to a directory descriptor and never follows a symlink, and every
//! write is a temp file renamed into place, so a reader never sees half a file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Opens a directory without following a symlink at its last component.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot open directory {}: {e}", path.display()),
        )
    })
}

/// Opens `name` in `dir` for reading, refusing symlinks.
pub fn open_read_at(dir: impl AsFd, name: &str) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    Ok(File::from(fd))
}

/// Reads at most `max` bytes of `name` in `dir`.
pub fn read_at(dir: impl AsFd, name: &str, max: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_read_at(dir, name)?.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Creates `name` in `dir` exclusively (no symlink, no existing file).
pub fn create_excl_at(dir: impl AsFd, name: &str, mode: u32) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(nix_io)?;
    Ok(File::from(fd))
}

/// Options for [`write_at`].
#[derive(Clone, Copy, Debug)]
pub struct WriteOpts {
    pub mode: u32,
    /// Give the file to this user and group.
    pub owner: Option<(u32, u32)>,
    /// fsync the file before the rename (the caller fsyncs the directory).
    pub sync: bool,
}

impl Default for WriteOpts {
    fn default() -> Self {
        WriteOpts {
            mode: 0o644,
            owner: None,
            sync: false,
        }
    }
}

/// A file written under a temporary name, waiting to be renamed over its real name.
pub struct Staged {
    pub file: File,
    tmp: String,
    name: String,
}

impl Staged {
    /// Renames the temp file over its real name.
    pub fn commit(self, dir: &OwnedFd) -> io::Result<()> {
        let r = renameat(dir, self.tmp.as_str(), dir, self.name.as_str()).map_err(nix_io);
        if r.is_err() {
            let _ = unlinkat(dir, self.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        r
    }

    /// Removes the temp file.
    pub fn abandon(self, dir: &OwnedFd) {
        let _ = unlinkat(dir, self.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
}

/// Writes `bytes` to a new temp file in `dir` that [`Staged::commit`] renames to `name`.
pub fn stage_at(dir: &OwnedFd, name: &str, bytes: &[u8], opts: WriteOpts) -> io::Result<Staged> {
    let tmp = format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let result = (|| {
        let mut f = create_excl_at(dir, &tmp, opts.mode)?;
        if let Some((uid, gid)) = opts.owner {
            fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(nix_io)?;
        }
        f.write_all(bytes)?;
        if opts.sync {
            f.sync_data()?;
        }
        Ok(f)
    })();
    match result {
        Ok(file) => Ok(Staged {
            file,
            tmp,
            name: name.to_string(),
        }),
        Err(e) => {
            let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            Err(e)
        }
    }
}

/// Spare files: inodes a directory of records keeps to write the next version of a record
/// into, swapped in with `renameat2(RENAME_EXCHANGE)` instead of renamed over it. A plain
/// rename frees the old version's inode (and block) on every update; on ext4 without a
/// journal every later file creation then scans past each recently freed inode, so a busy
/// queue slowed down the more it had done (measured here: 134 µs a record update by temp
/// file and rename, 30 µs by spare and exchange). The update is as atomic and as durable as
/// before: the new version is written and fsynced under the spare's name, and the swap is
/// one rename. Spares are hidden `.tmp` files: a crash leaves them for the next start-up
/// to delete, like any unfinished temp file.
pub struct Spares {
    names: Vec<String>,
    /// Old versions swapped out since the last [`Spares::settle`]: reusable only once the
    /// directory is fsynced, since until then a crash may swap them back in as the record.
    swapped: Vec<String>,
    cap: usize,
}

impl Spares {
    /// Keeps at most `cap` spare files.
    pub fn new(cap: usize) -> Spares {
        Spares {
            names: Vec::new(),
            swapped: Vec::new(),
            cap,
        }
    }

    /// Writes `bytes` into a spare (or a new temp file when there is none) that
    /// [`Spares::commit`] swaps in as `name`.
    pub fn stage(&mut self, dir: &OwnedFd, name: &str, bytes: &[u8], mode: u32) -> io::Result<Staged> {
        while let Some(spare) = self.names.pop() {
            match rewrite_at(dir, &spare, bytes) {
                Ok(file) => {
                    return Ok(Staged {
                        file,
                        tmp: spare,
                        name: name.to_string(),
                    });
                }
                Err(_) => {
                    let _ = unlinkat(dir, spare.as_str(), UnlinkatFlags::NoRemoveDir);
                }
            }
        }
        stage_at(
            dir,
            name,
            bytes,
            WriteOpts {
                mode,
                owner: None,
                sync: false,
            },
        )
    }

    /// Puts the staged file in place of its name; the version it replaces becomes a spare.
    pub fn commit(&mut self, dir: &OwnedFd, s: Staged) -> io::Result<()> {
        match nix::fcntl::renameat2(
            dir,
            s.tmp.as_str(),
            dir,
            s.name.as_str(),
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        ) {
            Ok(()) => {
                self.swapped.push(s.tmp);
                Ok(())
            }
            // No record of that name yet (ENOENT), or a file system without exchange.
            Err(_) => s.commit(dir),
        }
    }

    /// After the directory fsync that made this round's swaps durable (`durable`), their old
    /// versions become spares; after a failed one they are left alone (hidden `.tmp` files
    /// the next start-up deletes), as the record might still be one of them.
    pub fn settle(&mut self, dir: &OwnedFd, durable: bool) {
        for name in self.swapped.drain(..) {
            if !durable {
                continue;
            }
            if self.names.len() < self.cap {
                self.names.push(name);
            } else {
                let _ = unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }

    /// Gives a staged file that will not be committed back as a spare.
    pub fn abandon(&mut self, dir: &OwnedFd, s: Staged) {
        if self.names.len() < self.cap {
            self.names.push(s.tmp);
        } else {
            s.abandon(dir);
        }
    }
}

/// Overwrites the spare `name` in `dir` with `bytes` (never through a symlink, only a plain
/// file with one link).
fn rewrite_at(dir: &OwnedFd, name: &str, bytes: &[u8]) -> io::Result<File> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    let f = File::from(fd);
    let meta = f.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{name} is not a plain file with one link"
        )));
    }
    // In place, then cut to length: a record's block is kept, not freed and allocated again.
    f.write_all_at(bytes, 0)?;
    f.set_len(bytes.len() as u64)?;
    Ok(f)
}

/// Writes `name` in `dir` atomically: temp file, optional fsync, rename over `name`.
pub fn write_at(dir: &OwnedFd, name: &str, bytes: &[u8], opts: WriteOpts) -> io::Result<()> {
    stage_at(dir, name, bytes, opts)?.commit(dir)
}

/// Writes `name` in `dir` directly, without a temp file and rename, for files nobody reads
/// until their writer has exited (a supervisor's `<id>.json` and `<id>.exit.json`): one directory entry
/// instead of two. A reader that finds one cut short by its writer's death treats it as
/// missing, as it would a missing one. Never writes through a symlink: when `name` exists
/// already (a symlink included) it is replaced atomically instead ([`write_at`]).
pub fn write_new_at(dir: &OwnedFd, name: &str, bytes: &[u8], opts: WriteOpts) -> io::Result<()> {
    let mut f = match create_excl_at(dir, name, opts.mode) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return write_at(dir, name, bytes, opts),
        Err(e) => return Err(e),
    };
    if let Some((uid, gid)) = opts.owner {
        fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(nix_io)?;
    }
    f.write_all(bytes)?;
    if opts.sync {
        f.sync_data()?;
    }
    Ok(())
}

/// fsyncs a directory so the renames in it are durable.
pub fn sync_dir(dir: &OwnedFd) -> io::Result<()> {
    nix::unistd::fsync(dir).map_err(nix_io)
}

/// Makes `dir` itself durable, not only what is in it: fsyncs `dir` and every directory
/// above it, up to `/`. A directory made by mkdir exists after a power cut only once the
/// directory holding it has been fsynced, and that one only once its own parent has, and
/// so on; a record fsynced into a directory whose name never reached the disk is lost with
/// it. The daemon makes its spool and record directories itself, and may have made them
/// just before a crash in an earlier run, so the whole path is synced at every start, before
/// anything in it is acknowledged: a handful of fsyncs of directories with nothing to write
/// once the path is durable.
///
/// `dir`'s own fsync must succeed; a directory above it that cannot be opened or synced
/// (another user's, a read-only mount, a file system that refuses fsync on directories) is
/// skipped: what could be synced was.
pub fn sync_dir_path(dir: &Path) -> io::Result<()> {
    // Symlinks resolved, so that the directories synced are those that hold the entries.
    let real = std::fs::canonicalize(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {}: {e}", dir.display())))?;
    sync_dir(&open_dir(&real)?)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot fsync {}: {e}", real.display())))?;
    for above in real.ancestors().skip(1) {
        if let Ok(fd) = open_dir(above) {
            let _ = sync_dir(&fd);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir` (to check that no temp file was left behind).
    fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    #[test]
    fn write_new_creates_or_replaces_and_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let fd = open_dir(d.path()).unwrap();
        write_new_at(&fd, "exit.json", b"one", WriteOpts::default()).unwrap();
        assert_eq!(std::fs::read(d.path().join("exit.json")).unwrap(), b"one");
        write_new_at(&fd, "exit.json", b"two", WriteOpts::default()).unwrap();
        assert_eq!(std::fs::read(d.path().join("exit.json")).unwrap(), b"two");
        // A symlink in the way is replaced, never written through.
        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join("link")).unwrap();
        write_new_at(&fd, "link", b"x", WriteOpts::default()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(d.path().join("link"))
                .unwrap()
                .is_file()
        );
        let names = entries(d.path());
        assert_eq!(names.len(), 3, "no temp file left behind: {names:?}");
    }

    #[test]
    fn write_replaces_atomically_and_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let fd = open_dir(d.path()).unwrap();
        write_at(&fd, "a.json", b"one", WriteOpts::default()).unwrap();
        write_at(
            &fd,
            "a.json",
            b"two",
            WriteOpts {
                sync: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(std::fs::read(d.path().join("a.json")).unwrap(), b"two");
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        assert!(read_at(&fd, "link", 100).is_err());
        assert!(create_excl_at(&fd, "link", 0o600).is_err());
        // Writing over a symlink replaces the link itself, never its target.
        write_at(&fd, "link", b"x", WriteOpts::default()).unwrap();
        assert!(
            !std::fs::symlink_metadata(d.path().join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let names = entries(d.path());
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
    }

    #[test]
    fn spares_swap_versions_without_creating_files() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let fd = open_dir(d.path()).unwrap();
        let mut spares = Spares::new(4);
        let files = || std::fs::read_dir(d.path()).unwrap().count();
        // First version: no record yet, a plain rename.
        let s = spares
            .stage(&fd, "1.json", b"first version, long", 0o644)
            .unwrap();
        spares.commit(&fd, s).unwrap();
        spares.settle(&fd, true);
        assert_eq!(
            std::fs::read(d.path().join("1.json")).unwrap(),
            b"first version, long"
        );
        assert_eq!(files(), 1);
        // Second: a new temp file, swapped in; the old version becomes the spare.
        let s = spares.stage(&fd, "1.json", b"second", 0o644).unwrap();
        spares.commit(&fd, s).unwrap();
        spares.settle(&fd, true);
        assert_eq!(std::fs::read(d.path().join("1.json")).unwrap(), b"second");
        assert_eq!(files(), 2, "the record and one spare");
        let inodes: std::collections::BTreeSet<u64> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect();
        // From now on versions are written into the spare and swapped: no new files.
        for i in 0..10 {
            let body = format!("version {i}");
            let s = spares.stage(&fd, "1.json", body.as_bytes(), 0o644).unwrap();
            spares.commit(&fd, s).unwrap();
            spares.settle(&fd, true);
            assert_eq!(std::fs::read_to_string(d.path().join("1.json")).unwrap(), body);
            assert_eq!(files(), 2);
        }
        let after: std::collections::BTreeSet<u64> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect();
        assert_eq!(inodes, after, "the same two inodes took turns");
        // A spare feeds a new record too.
        let s = spares.stage(&fd, "2.json", b"two", 0o644).unwrap();
        spares.commit(&fd, s).unwrap();
        spares.settle(&fd, true);
        assert_eq!(std::fs::read(d.path().join("2.json")).unwrap(), b"two");
        assert_eq!(files(), 2);
        // A spare replaced by a symlink is not written through.
        let s = spares.stage(&fd, "2.json", b"2b", 0o644).unwrap();
        spares.commit(&fd, s).unwrap();
        spares.settle(&fd, true);
        let spare = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with('.'))
            .unwrap();
        std::fs::remove_file(d.path().join(&spare)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join(&spare)).unwrap();
        let s = spares.stage(&fd, "2.json", b"2c", 0o644).unwrap();
        spares.commit(&fd, s).unwrap();
        spares.settle(&fd, true);
        assert_eq!(std::fs::read(d.path().join("2.json")).unwrap(), b"2c");
        assert!(!std::fs::read_to_string("/etc/passwd").unwrap().contains("2c"));
    }

    #[test]
    fn sync_dir_path_syncs_through_symlinks_and_refuses_a_missing_dir() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("l")).unwrap();
        sync_dir_path(&d.path().join("a/b")).unwrap();
        sync_dir_path(&d.path().join("l/b")).unwrap();
        assert!(sync_dir_path(&d.path().join("missing")).is_err());
    }

    #[test]
    fn open_dir_refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("l")).unwrap();
        assert!(open_dir(&d.path().join("l")).is_err());
    }
}
