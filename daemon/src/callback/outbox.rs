//! The callback outbox: one durable file per delivery, `<spool>/callbacks/pending/<id>.json`
//! while it is tried and `<spool>/callbacks/done/<id>.json` once delivered or given up (kept,
//! so `cybctl show` can say which), and the task that delivers the pending ones. An entry
//! is on disk before anything is sent, and keeps its `webhook-id` through every try and
//! every daemon restart: delivery is at least once. Nothing here can stop the daemon: a
//! missing secret, a full disk, a receiver that fails are logged and the entry kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cyb_proto::{CallbackState, CallbackStatus, JobId, JobRecord, Timestamp};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{check_url, next_wait, read_secret, sign};
use crate::config::{Config, Live, Paths};
use crate::fsutil::{self, WriteOpts};

/// Deliveries under way at once.
const MAX_IN_FLIGHT: usize = 16;
/// The largest `result.json` sent.
const MAX_BODY: u64 = 4 << 20;
/// How long to wait before trying again when the secret cannot be read (not counted as a
/// try: nothing was sent).
const NO_SECRET_WAIT: Duration = Duration::from_secs(10);

/// A job whose end calls for a callback.
#[derive(Clone, Debug)]
pub struct Ended {
    pub job_id: JobId,
    pub user: String,
    pub url: String,
    pub run_dir: String,
    /// The job's attempts when it ended: a job retried and ended again gets a new callback.
    pub attempts: u32,
}

impl Ended {
    /// The callback an ended job's record asks for, if any.
    pub fn of(rec: &JobRecord) -> Option<Ended> {
        let url = rec
            .spec
            .callback_url
            .clone()
            .filter(|_| rec.state.is_terminal())?;
        Some(Ended {
            job_id: rec.id,
            user: rec.owner.user.clone(),
            url,
            run_dir: rec.run_dir.clone(),
            attempts: rec.attempts,
        })
    }
}

/// One outbox file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    job_id: JobId,
    user: String,
    run_dir: String,
    job_attempts: u32,
    #[serde(flatten)]
    status: CallbackStatus,
}

fn pending_dir(p: &Paths) -> PathBuf {
    p.spool.join("callbacks/pending")
}

fn done_dir(p: &Paths) -> PathBuf {
    p.spool.join("callbacks/done")
}

fn file_name(id: JobId) -> String {
    format!("{id}.json")
}

const OPTS: WriteOpts = WriteOpts {
    mode: 0o600,
    owner: None,
    sync: true,
};

/// Creates the outbox directories, durably (blocking; at start-up).
pub fn prepare(p: &Paths) -> std::io::Result<()> {
    for d in [pending_dir(p), done_dir(p)] {
        std::fs::create_dir_all(&d)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))?;
        fsutil::sync_dir_path(&d)?;
    }
    Ok(())
}

fn read_entry(dir: &Path, id: JobId) -> Option<Entry> {
    let d = fsutil::open_dir(dir).ok()?;
    let bytes = fsutil::read_at(&d, &file_name(id), 1 << 20).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_entry(dir: &Path, e: &Entry) -> std::io::Result<()> {
    let d = fsutil::open_dir(dir)?;
    let bytes = serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?;
    fsutil::write_at(&d, &file_name(e.job_id), &bytes, OPTS)?;
    fsutil::sync_dir(&d)
}

fn remove_entry(dir: &Path, id: JobId) -> std::io::Result<()> {
    let d = fsutil::open_dir(dir)?;
    match nix::unistd::unlinkat(
        &d,
        file_name(id).as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    fsutil::sync_dir(&d)
}

/// Whether job `id` has a delivery still being tried (blocking): such a job is not removed
/// by a clean, since the delivery reads its `result.json`.
pub fn pending_for(p: &Paths, id: JobId) -> bool {
    pending_dir(p).join(file_name(id)).exists()
}

/// Forgets the finished delivery of job `id`, which has been removed (blocking; logged).
pub fn forget(p: &Paths, id: JobId) {
    if !done_dir(p).join(file_name(id)).exists() {
        return;
    }
    if let Err(e) = remove_entry(&done_dir(p), id)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(
            job_id = id,
            "cannot remove the callback entry of removed job {id}: {e}"
        );
    }
}

/// Records a new delivery for `e` unless one for this end of the job exists (blocking).
fn record_new(p: &Paths, e: &Ended) -> std::io::Result<()> {
    let existing = read_entry(&done_dir(p), e.job_id).or_else(|| read_entry(&pending_dir(p), e.job_id));
    if existing.is_some_and(|x| x.job_attempts >= e.attempts) {
        return Ok(());
    }
    let now = Timestamp::now();
    let entry = Entry {
        job_id: e.job_id,
        user: e.user.clone(),
        run_dir: e.run_dir.clone(),
        job_attempts: e.attempts,
        status: CallbackStatus {
            url: e.url.clone(),
            webhook_id: format!("msg_cyb_{}_{}_{}", e.job_id, e.attempts, now.unix_ms()),
            attempts: 0,
            state: CallbackState::Retrying { next_try: now },
            last_error: None,
        },
    };
    write_entry(&pending_dir(p), &entry)?;
    // The delivery of an earlier end of a retried job.
    remove_entry(&done_dir(p), e.job_id)
}

/// Records the callback of `e` durably, in the background, trying again every second
/// while the disk refuses; the delivery task then sends it.
pub fn enqueue(cfg: &Config, e: Ended) {
    enqueue_all(cfg, vec![e]);
}

/// [`enqueue`] for several, skipping those already recorded (at start-up: the ends whose
/// entries a crash may have kept from being written).
pub fn enqueue_all(cfg: &Config, ends: Vec<Ended>) {
    if ends.is_empty() {
        return;
    }
    let paths = cfg.paths.clone();
    tokio::spawn(async move {
        for e in ends {
            let mut told = false;
            loop {
                let (p, x) = (paths.clone(), e.clone());
                let res = tokio::task::spawn_blocking(move || record_new(&p, &x))
                    .await
                    .unwrap_or_else(|j| Err(std::io::Error::other(j.to_string())));
                match res {
                    Ok(()) => break,
                    Err(err) => {
                        if !told {
                            warn!(job_id = e.job_id, job_user = %e.user, "cannot record the callback to {} in {}: {err}; retrying", e.url, pending_dir(&paths).display());
                            told = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
}

/// Where job `id`'s callback stands, for `cybctl show`.
pub async fn status(p: &Paths, id: JobId) -> Option<CallbackStatus> {
    let p = p.clone();
    tokio::task::spawn_blocking(move || {
        read_entry(&done_dir(&p), id)
            .or_else(|| read_entry(&pending_dir(&p), id))
            .map(|e| e.status)
    })
    .await
    .ok()
    .flatten()
}

/// The pending entries due now (blocking). Clears what a crash left half moved to `done/`.
fn due(p: &Paths, told: &mut HashSet<String>) -> Vec<Entry> {
    let dir = pending_dir(p);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let now = Timestamp::now();
    let mut out = Vec::new();
    for de in rd.flatten() {
        let name = de.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json").and_then(|s| s.parse::<JobId>().ok()) else {
            continue;
        };
        match read_entry(&dir, id) {
            Some(e) if read_entry(&done_dir(p), id).is_some_and(|d| d.job_attempts >= e.job_attempts) => {
                let _ = remove_entry(&dir, id);
            }
            Some(e) => {
                if let CallbackState::Retrying { next_try } = e.status.state
                    && next_try.0 <= now.0
                {
                    out.push(e);
                }
            }
            None => {
                if told.insert(name.clone()) {
                    warn!(
                        "cannot read callback entry {}; leaving it alone",
                        dir.join(&name).display()
                    );
                }
            }
        }
    }
    out
}

/// Delivers the pending callbacks, forever: every second it looks for entries that are
/// due, and tries each (at most [`MAX_IN_FLIGHT`] at once).
pub async fn run(live: Live) {
    // Made when the first callback is due: it loads the system's root certificates, which a
    // daemon whose jobs never call back has no use for.
    let mut client: Option<reqwest::Client> = None;
    let mut told_client = false;
    let busy: Arc<Mutex<HashSet<JobId>>> = Arc::default();
    let mut told = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let paths = live.borrow().paths.clone();
        let (entries, t) = tokio::task::spawn_blocking(move || {
            let found = due(&paths, &mut told);
            (found, told)
        })
        .await
        .unwrap_or_default();
        told = t;
        if entries.is_empty() {
            continue;
        }
        let client = match &client {
            Some(c) => c.clone(),
            None => match reqwest::Client::builder()
                // A redirect could lead anywhere; only the URL checked against allowed_hosts
                // is used.
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .user_agent(concat!("cybd/", env!("CARGO_PKG_VERSION")))
                .build()
            {
                Ok(c) => client.insert(c).clone(),
                Err(e) => {
                    if !std::mem::replace(&mut told_client, true) {
                        warn!("callbacks wait: cannot set up the HTTP client: {e}");
                    }
                    continue;
                }
            },
        };
        for e in entries {
            {
                let Ok(mut b) = busy.lock() else { return };
                if b.len() >= MAX_IN_FLIGHT || !b.insert(e.job_id) {
                    continue;
                }
            }
            let (client, cfg, busy) = (client.clone(), live.borrow().clone(), busy.clone());
            tokio::spawn(async move {
                let id = e.job_id;
                let after = try_once(&client, &cfg, e).await;
                save(&cfg.paths, after).await;
                if let Ok(mut b) = busy.lock() {
                    b.remove(&id);
                }
            });
        }
    }
}

/// Writes an entry after a try: to `done/` once delivered or given up. Tries again every
/// second while the disk refuses, so the try is not repeated while its outcome is known.
async fn save(p: &Paths, e: Entry) {
    let mut told = false;
    loop {
        let (p2, e2) = (p.clone(), e.clone());
        let res = tokio::task::spawn_blocking(move || match e2.status.state {
            CallbackState::Retrying { .. } => write_entry(&pending_dir(&p2), &e2),
            _ => write_entry(&done_dir(&p2), &e2).and_then(|()| remove_entry(&pending_dir(&p2), e2.job_id)),
        })
        .await
        .unwrap_or_else(|j| Err(std::io::Error::other(j.to_string())));
        match res {
            Ok(()) => return,
            Err(err) => {
                if !told {
                    warn!(job_id = e.job_id, job_user = %e.user, "cannot record the callback's state: {err}; retrying");
                    told = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn read_body(run_dir: &str) -> Result<Vec<u8>, String> {
    let d = fsutil::open_dir(Path::new(run_dir)).map_err(|e| e.to_string())?;
    fsutil::read_at(&d, "result.json", MAX_BODY)
        .map_err(|e| format!("cannot read {run_dir}/result.json: {e}"))
}

/// The error and its causes in one line (reqwest's own message is only the outer one).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// One try of `e`'s delivery; returns the entry as it stands after it.
async fn try_once(client: &reqwest::Client, cfg: &Config, mut e: Entry) -> Entry {
    let cb = &cfg.callbacks;
    let (id, user, url) = (e.job_id, e.user.clone(), e.status.url.clone());
    let now = Timestamp::now();
    if let Err(why) = check_url(cb, &url) {
        warn!(job_id = id, job_user = %user, "callback to {url} given up: {why}");
        e.status.last_error = Some(why);
        e.status.state = CallbackState::GivenUp { at: now };
        return e;
    }
    let secret_file = cb.secret_file.clone();
    let run_dir = e.run_dir.clone();
    let read = tokio::task::spawn_blocking(move || {
        let key = read_secret(secret_file.as_deref()).map_err(|w| (false, w))?;
        let body = read_body(&run_dir).map_err(|w| (true, w))?;
        Ok::<_, (bool, String)>((key, body))
    })
    .await
    .unwrap_or_else(|j| Err((false, j.to_string())));
    let (key, body) = match read {
        Ok(kb) => kb,
        // Nothing sent: the admin can fix the secret and deliveries go on.
        Err((false, why)) => {
            warn!(job_id = id, job_user = %user, "callback to {url} not sent: {why}");
            e.status.last_error = Some(why);
            e.status.state = CallbackState::Retrying {
                next_try: Timestamp(now.0 + NO_SECRET_WAIT),
            };
            return e;
        }
        Err((true, why)) => {
            e.status.attempts += 1;
            return failed(cb, e, why);
        }
    };
    let ts = now.0.unix_timestamp();
    let res = client
        .post(url.as_str())
        .timeout(cb.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", e.status.webhook_id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign(&key, &e.status.webhook_id, ts, &body))
        .body(body)
        .send()
        .await;
    e.status.attempts += 1;
    match res {
        Ok(r) if r.status().is_success() => {
            info!(job_id = id, job_user = %user, "callback to {url} delivered ({})", r.status());
            e.status.last_error = None;
            e.status.state = CallbackState::Delivered {
                at: Timestamp::now(),
                status: r.status().as_u16(),
            };
            e
        }
        Ok(r) if r.status() == reqwest::StatusCode::GONE => {
            warn!(job_id = id, job_user = %user, "callback to {url} given up: the receiver answered {}", r.status());
            e.status.last_error = Some(format!("answered {}", r.status()));
            e.status.state = CallbackState::GivenUp { at: Timestamp::now() };
            e
        }
        Ok(r) => failed(cb, e, format!("answered {}", r.status())),
        Err(err) => failed(cb, e, chain(&err)),
    }
}

/// A failed try: the next one per the schedule, or given up when it has run out.
fn failed(cb: &super::CallbacksConfig, mut e: Entry, why: String) -> Entry {
    let now = Timestamp::now();
    let (id, n) = (e.job_id, e.status.attempts.max(1));
    match next_wait(cb, n) {
        Some(wait) => {
            warn!(job_id = id, job_user = %e.user, "callback to {} failed (try {n}): {why}; next try in {}", e.status.url, humantime::format_duration(wait));
            e.status.state = CallbackState::Retrying {
                next_try: Timestamp(now.0 + wait),
            };
        }
        None => {
            warn!(job_id = id, job_user = %e.user, "callback to {} given up after {n} tries: {why}", e.status.url);
            e.status.state = CallbackState::GivenUp { at: now };
        }
    }
    e.status.last_error = Some(why);
    e
}
