//! Intake: takes job files from `<spool>/incoming/`, found through file-system events plus a
//! periodic rescan (a missed event delays a job, never loses it).
//!
//! Each `*.json` file (names starting with `.` are ignored: writers write `.name.tmp`, then
//! rename) is opened once without following symlinks; it must be a regular file with exactly
//! one link and at most `max_job_bytes`; its owner, read from the open descriptor, becomes
//! the job's user. An accepted file is removed only after its job's record is durable; a
//! refused one is moved to `rejected/` with an `.error.json` beside it that says why.
//! A file whose job was recorded just before a crash is recognised by its identity (inode
//! and mtime) and not taken twice. Its removal is not fsynced, so after a power cut it may
//! be back; the device number is not part of the identity, since a disk need not keep its
//! device number across a reboot (btrfs subvolumes, device-mapper and NVMe numbering), and
//! every file in `incoming/` is on the one file system anyway.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use cyb_proto::job::{Origin, Owner};
use cyb_proto::{JobSpec, RpcError, SpecError};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use notify::Watcher;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::fsutil::{self, WriteOpts};
use crate::scheduler::{Handle, Request};
use crate::users;

/// Files looked at per batch.
const BATCH: usize = 512;

/// What recognises a spool file already taken: its inode number and mtime (ns).
pub type Identity = (u64, i64);

/// A file taken from incoming/ and checked.
enum Taken {
    Job {
        name: String,
        spec: Box<JobSpec>,
        owner: Owner,
        origin: Origin,
    },
    Refused {
        name: String,
        error: SpecError,
        uid: Option<u32>,
    },
    /// Already recorded before a restart: only the file needs removing.
    Known { name: String, ident: Identity },
    /// Gone meanwhile, or not ours to look at now.
    Skip,
}

pub struct Intake {
    cfg: crate::config::Live,
    sched: Handle,
    /// Files whose jobs are recorded but which are still in incoming/. Shared with the
    /// blocking task that takes a batch, never moved into it: whatever happens to that task,
    /// the set stays, and no file is taken twice.
    known: Arc<HashSet<Identity>>,
}

impl Intake {
    pub fn new(cfg: crate::config::Live, sched: Handle, known: HashSet<Identity>) -> Self {
        Intake {
            cfg,
            sched,
            known: Arc::new(known),
        }
    }

    fn cfg(&self) -> Arc<Config> {
        self.cfg.borrow().clone()
    }

    /// Creates incoming/ and rejected/ with their modes.
    pub fn prepare_dirs(cfg: &Config) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let incoming = cfg.paths.incoming();
        let rejected = cfg.paths.rejected();
        for d in [&incoming, &rejected] {
            std::fs::create_dir_all(d)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))?;
        }
        // System mode: anyone may drop files, nobody may remove another's (sticky).
        let (inc_mode, rej_mode) = if cfg.user_mode {
            (0o700, 0o700)
        } else {
            (0o1733, 0o755)
        };
        std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(inc_mode))?;
        std::fs::set_permissions(&rejected, std::fs::Permissions::from_mode(rej_mode))?;
        Ok(())
    }

    /// Runs until the scheduler goes away.
    pub async fn run(mut self) {
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<()>(1);
        let incoming = self.cfg().paths.incoming();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only changes matter: a scan opens incoming/ itself, and reacting to that open
            // (an Access event) would make the intake wake itself forever.
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                let _ = ev_tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&incoming, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(
                    "cannot watch {} ({e}); relying on the rescan every {:?}",
                    incoming.display(),
                    self.cfg().rescan_interval
                );
                None
            }
        };
        let mut tick = tokio::time::interval(self.cfg().rescan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                ev = ev_rx.recv() => if ev.is_none() { break },
            }
            self.scan().await;
            if self.sched.send(Request::Kick).is_err() {
                break;
            }
        }
    }

    /// Lists incoming/ once and takes every job file in it, oldest first, in batches.
    async fn scan(&mut self) {
        let cfg = self.cfg();
        let names = match tokio::task::spawn_blocking(move || list_incoming(&cfg)).await {
            Ok(n) => n,
            Err(e) => {
                error!("cannot list incoming job files: {e}");
                return;
            }
        };
        for chunk in names.chunks(BATCH) {
            self.take_batch(chunk.to_vec()).await;
        }
    }

    /// Takes one batch of files.
    async fn take_batch(&mut self, names: Vec<String>) {
        let cfg = self.cfg();
        let known = Arc::clone(&self.known);
        let res = tokio::task::spawn_blocking(move || {
            let dir = cfg.paths.incoming();
            names
                .into_iter()
                .map(|n| guarded(n, |n| take_file(&cfg, &dir, n, &known)))
                .collect::<Vec<Taken>>()
        })
        .await;
        let taken = match res {
            Ok(r) => r,
            Err(e) => {
                error!("intake batch failed: {e}");
                return;
            }
        };
        let mut pending = FuturesUnordered::new();
        let mut to_remove: Vec<(String, Option<Identity>)> = Vec::new();
        let mut to_reject: Vec<(String, SpecError, Option<u32>)> = Vec::new();
        for t in taken {
            match t {
                Taken::Job {
                    name,
                    spec,
                    owner,
                    origin,
                } => {
                    let ident = match &origin {
                        Origin::Spool { ino, mtime_ns, .. } => Some((*ino, *mtime_ns)),
                        Origin::Rpc { .. } => None,
                    };
                    let uid = owner.uid;
                    let sched = self.sched.clone();
                    pending.push(async move {
                        let r = sched
                            .ask(|reply| Request::Submit {
                                spec,
                                owner,
                                origin,
                                reply,
                            })
                            .await;
                        (name, ident, uid, r.and_then(|x| x))
                    });
                }
                Taken::Refused { name, error, uid } => to_reject.push((name, error, uid)),
                Taken::Known { name, ident } => to_remove.push((name, Some(ident))),
                Taken::Skip => {}
            }
        }
        while let Some((name, ident, uid, r)) = pending.next().await {
            match r {
                Ok(sub) => {
                    debug!(job_id = sub.id, file = %name, "accepted spool file");
                    if let Some(n) = &sub.not_enforced {
                        // A spool file has nobody to tell on stderr: the journal says it.
                        info!(job_id = sub.id, file = %name, "job {}: {n}", sub.id);
                    }
                    if let Some(i) = ident {
                        Arc::make_mut(&mut self.known).insert(i);
                    }
                    to_remove.push((name, ident));
                }
                Err(RpcError::InvalidSpec(e)) => to_reject.push((name, e, Some(uid))),
                Err(RpcError::PermissionDenied(m)) => {
                    to_reject.push((name, SpecError::general(m), Some(uid)))
                }
                Err(e) => {
                    // Not the file's fault (store full, shutting down): it stays for later.
                    warn!(file = %name, "cannot take job file now, will retry: {e}");
                }
            }
        }
        let cfg = self.cfg();
        let removed = tokio::task::spawn_blocking(move || {
            let mut gone = Vec::new();
            for (name, ident) in to_remove {
                remove_if_same(&cfg.paths.incoming().join(&name), ident);
                if let Some(i) = ident {
                    gone.push(i);
                }
            }
            for (name, err, uid) in to_reject {
                reject(&cfg, &name, &err, uid);
            }
            gone
        })
        .await
        .unwrap_or_default();
        if !removed.is_empty() {
            let known = Arc::make_mut(&mut self.known);
            for i in removed {
                known.remove(&i);
            }
        }
    }
}

/// Lists incoming/ and takes up to [`BATCH`] files, oldest first.
fn list_incoming(cfg: &Config) -> Vec<String> {
    let dir = cfg.paths.incoming();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => {
            error!("cannot list {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut names: Vec<(i64, String)> = Vec::new();
    for e in rd.flatten() {
        let raw = e.file_name();
        let bytes = raw.as_encoded_bytes();
        if bytes.starts_with(b".") || !bytes.ends_with(b".json") {
            continue;
        }
        let Some(name) = raw.to_str() else {
            // Nobody could name it in a job or a log line: refuse it under a readable name.
            reject_raw(
                cfg,
                &raw,
                &SpecError::general("the job file's name is not valid UTF-8"),
                None,
            );
            continue;
        };
        if let Ok(m) = e.metadata() {
            names.push((m.mtime() * 1_000_000_000 + m.mtime_nsec(), name.to_string()));
        }
    }
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

/// Takes one file with `take`; should that panic (a bug in cybd), the file is refused with
/// an error that says so, and the rest of its batch goes on.
fn guarded(name: String, take: impl FnOnce(String) -> Taken) -> Taken {
    let kept = name.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take(name))).unwrap_or_else(|panic| {
        let why = cyb_proto::spec::panic_message(&*panic);
        error!(file = %kept, "intake failed on this job file: {why}");
        Taken::Refused {
            name: kept,
            error: SpecError::general(format!(
                "cybd could not take this job file: it failed while reading it ({why}); this is a bug in cybd, please report it with the file"
            )),
            uid: None,
        }
    })
}

fn take_file(cfg: &Config, dir: &Path, name: String, known: &HashSet<Identity>) -> Taken {
    let path = dir.join(&name);
    let refuse = |error: SpecError, uid: Option<u32>| Taken::Refused {
        name: name.clone(),
        error,
        uid,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Taken::Skip,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return refuse(SpecError::general("job files must not be symbolic links"), None);
        }
        Err(e) => return refuse(SpecError::general(format!("cannot open the job file: {e}")), None),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return refuse(SpecError::general(format!("cannot stat the job file: {e}")), None),
    };
    let uid = meta.uid();
    if !meta.is_file() {
        return refuse(SpecError::general("job files must be regular files"), None);
    }
    if meta.nlink() != 1 {
        return refuse(
            SpecError::general(format!(
                "job files must have exactly one link (this one has {})",
                meta.nlink()
            )),
            None,
        );
    }
    let ident: Identity = (meta.ino(), meta.mtime() * 1_000_000_000 + meta.mtime_nsec());
    if known.contains(&ident) {
        return Taken::Known { name, ident };
    }
    if meta.len() > cfg.max_job_bytes {
        return refuse(
            SpecError::general(format!(
                "the job file is {} bytes; at most {} (max_job_bytes) are accepted",
                meta.len(),
                cfg.max_job_bytes
            )),
            Some(uid),
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    if let Err(e) = (&file).take(cfg.max_job_bytes + 1).read_to_end(&mut bytes) {
        return refuse(
            SpecError::general(format!("cannot read the job file: {e}")),
            Some(uid),
        );
    }
    if bytes.len() as u64 > cfg.max_job_bytes {
        return refuse(
            SpecError::general("the job file grew past max_job_bytes while being read"),
            Some(uid),
        );
    }
    let spec = match cyb_proto::parse_job(&bytes) {
        Ok(s) => s,
        Err(e) => return refuse(e, Some(uid)),
    };
    let acct = match users::account_cached(uid) {
        Ok(a) => a,
        Err(e) => return refuse(SpecError::general(format!("the file's owner: {e}")), Some(uid)),
    };
    Taken::Job {
        name: name.clone(),
        spec: Box::new(spec),
        owner: Owner {
            uid,
            gid: acct.gid,
            user: acct.name,
        },
        origin: Origin::Spool {
            file: name,
            dev: meta.dev(),
            ino: ident.0,
            mtime_ns: ident.1,
        },
    }
}

/// Removes an accepted file, unless what is there now is a different file.
fn remove_if_same(path: &Path, ident: Option<Identity>) {
    let same = match (std::fs::symlink_metadata(path), ident) {
        (Ok(m), Some((ino, mtime_ns))) => {
            m.ino() == ino && m.mtime() * 1_000_000_000 + m.mtime_nsec() == mtime_ns
        }
        (Ok(_), None) => true,
        (Err(_), _) => return,
    };
    if same && let Err(e) = std::fs::remove_file(path) {
        error!("cannot remove accepted job file {}: {e}", path.display());
    }
}

/// Moves a refused file to rejected/ and writes `<name>.error.json` beside it, owned by and
/// readable to the submitter.
fn reject(cfg: &Config, name: &str, err: &SpecError, uid: Option<u32>) {
    reject_raw(cfg, std::ffi::OsStr::new(name), err, uid);
}

fn reject_raw(cfg: &Config, raw: &std::ffi::OsStr, err: &SpecError, uid: Option<u32>) {
    let name = &*raw.to_string_lossy();
    let src = cfg.paths.incoming().join(raw);
    let rejected = cfg.paths.rejected();
    let dest = unique_name(&rejected, name);
    if let Err(e) = std::fs::rename(&src, rejected.join(&dest)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            error!(
                "cannot move refused job file {} to {}: {e}",
                src.display(),
                rejected.display()
            );
        }
        return;
    }
    info!(event = "rejected", file = %name, "job file {name} refused: {err}");
    let Ok(dir) = fsutil::open_dir(&rejected) else {
        return;
    };
    let mut body = serde_json::to_vec_pretty(err).unwrap_or_default();
    body.push(b'\n');
    let owner = match uid {
        Some(u) if nix::unistd::geteuid().is_root() => {
            let gid = users::account_cached(u).map(|a| a.gid).unwrap_or(u);
            Some((u, gid))
        }
        _ => None,
    };
    // Without a trustworthy owner the error file stays root's but is world-readable.
    let mode = if owner.is_some() { 0o640 } else { 0o644 };
    let err_name = format!("{dest}.error.json");
    if let Err(e) = fsutil::write_at(
        &dir,
        &err_name,
        &body,
        WriteOpts {
            mode,
            owner,
            sync: false,
        },
    ) {
        error!("cannot write {}: {e}", rejected.join(&err_name).display());
    }
}

fn unique_name(dir: &Path, name: &str) -> String {
    let taken = |n: &str| {
        std::fs::symlink_metadata(dir.join(n)).is_ok()
            || std::fs::symlink_metadata(dir.join(format!("{n}.error.json"))).is_ok()
    };
    if !taken(name) {
        return name.to_string();
    }
    (1..)
        .map(|i| format!("{name}.{i}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_taking_a_file_refuses_that_file_only() {
        let taken: Vec<Taken> = ["a.json", "bad.json", "c.json"]
            .into_iter()
            .map(|n| {
                guarded(n.to_string(), |n| {
                    if n == "bad.json" {
                        panic!("index out of bounds in {n}");
                    }
                    Taken::Skip
                })
            })
            .collect();
        assert!(matches!(taken[0], Taken::Skip));
        assert!(matches!(taken[2], Taken::Skip));
        let Taken::Refused { name, error, uid } = &taken[1] else {
            panic!("the panicking file was not refused");
        };
        assert_eq!(name, "bad.json");
        assert_eq!(*uid, None);
        assert_eq!(error.field, None);
        assert!(
            error.message.starts_with("cybd could not take this job file"),
            "{error}"
        );
        assert!(
            error.message.contains("index out of bounds in bad.json"),
            "{error}"
        );
    }
}
