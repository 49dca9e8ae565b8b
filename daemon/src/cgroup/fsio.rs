//! File I/O on cgroupfs shared by every controller: single-write control files, small
//! reads, flat-keyed files, `cgroup.procs` trees, and removing a cgroup directory.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CgroupError, Result};

/// One write to a cgroup file; `if_present` ones are skipped where the kernel lacks the
/// file (swap accounting, `memory.oom.group`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileWrite {
    pub path: PathBuf,
    pub value: String,
    pub if_present: bool,
}

pub(super) fn put(path: &Path, file: &str, value: impl Into<String>) -> FileWrite {
    FileWrite {
        path: path.join(file),
        value: value.into(),
        if_present: false,
    }
}

pub(super) fn put_if_present(path: &Path, file: &str, value: impl Into<String>) -> FileWrite {
    FileWrite {
        path: path.join(file),
        value: value.into(),
        if_present: true,
    }
}

pub(super) fn apply_writes(writes: &[FileWrite]) -> Result<()> {
    for w in writes {
        if w.if_present && !w.path.exists() {
            continue;
        }
        write_file(&w.path, &w.value)?;
    }
    Ok(())
}

/// Writes `value` to a cgroup file with one write(2), as cgroupfs wants.
pub(super) fn write_file(path: &Path, value: &str) -> Result<()> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// Reads a cgroup file; `None` when it does not exist.
///
/// Into a page-sized buffer, read by read: cgroup files are small, have no size to ask for
/// (`fs::read_to_string` would `statx` each and then read in 32-byte probes), and a
/// supervisor reads half a dozen of them as every job ends.
pub(super) fn read_opt(path: &Path) -> Result<Option<String>> {
    let err = |source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match io::Read::read(&mut f, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")))
}

/// `dir/file`, or "" when it cannot be read.
pub(super) fn read_or_empty(dir: &Path, file: &str) -> String {
    read_opt(&dir.join(file)).ok().flatten().unwrap_or_default()
}

pub(super) fn parse_err(path: &Path, what: impl Into<String>) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A file holding one number; `None` when it does not exist.
pub(super) fn read_u64(path: &Path) -> Result<Option<u64>> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    let t = text.trim();
    t.parse()
        .map(Some)
        .map_err(|_| parse_err(path, format!("not a number: {t:?}")))
}

/// The value of `key` in a flat-keyed file (`key value` lines); `None` when the file or
/// the key is absent.
pub(super) fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(' ')
            && k == key
        {
            return v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| parse_err(path, format!("bad {key} value {v:?}")));
        }
    }
    Ok(None)
}

/// The pids in `dir/cgroup.procs` and in those of its descendants; none when `dir` is gone.
pub(super) fn read_pids_recursive(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let Some(text) = read_opt(&procs)? else {
        return Ok(());
    };
    for l in text.lines() {
        let pid: i32 = l
            .trim()
            .parse()
            .map_err(|_| parse_err(&procs, format!("bad pid {l:?}")))?;
        // A process outside our pid namespace shows as 0; never signal 0 or less.
        if pid > 0 {
            out.push(pid);
        }
    }
    for child in child_cgroups(dir)? {
        read_pids_recursive(&child, out)?;
    }
    Ok(())
}

/// The sub-cgroups (subdirectories) of `dir`; none when `dir` is gone.
pub(super) fn child_cgroups(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Creates a directory; one that already exists is fine.
pub(super) fn mkdir_exist_ok(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes a cgroup directory and its descendants (rmdir only: cgroupfs removes the files
/// with the directory), retrying while exiting processes keep it busy.
pub(super) fn remove_tree(dir: &Path, deadline: Instant) -> Result<()> {
    // Usually a job made no cgroups of its own: one rmdir, no listing of the directory.
    match fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for child in child_cgroups(dir)? {
        remove_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

pub(super) fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_of_plain_dirs_and_pids_of_missing_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job_1");
        fs::create_dir_all(job.join("sub/subsub")).unwrap();
        remove_tree(&job, Instant::now()).unwrap();
        assert!(!job.exists());
        remove_tree(&job, Instant::now()).unwrap();
        let mut pids = Vec::new();
        read_pids_recursive(&job, &mut pids).unwrap();
        assert!(pids.is_empty());
        fs::create_dir(&job).unwrap();
        fs::write(job.join("cgroup.procs"), "12\n0\n13\n").unwrap();
        read_pids_recursive(&job, &mut pids).unwrap();
        assert_eq!(
            pids,
            [12, 13],
            "0 (a process outside our pid namespace) is never listed"
        );
    }
}
