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

/// Writes `name` in `dir` atomically: temp file, optional fsync, rename over `name`.
pub fn write_at(dir: &OwnedFd, name: &str, bytes: &[u8], opts: WriteOpts) -> io::Result<()> {
    stage_at(dir, name, bytes, opts)?.commit(dir)
}

/// fsyncs a directory so the renames in it are durable.
pub fn sync_dir(dir: &OwnedFd) -> io::Result<()> {
    nix::unistd::fsync(dir).map_err(nix_io)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
    }

    #[test]
    fn open_dir_refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("l")).unwrap();
        assert!(open_dir(&d.path().join("l")).is_err());
    }
}
