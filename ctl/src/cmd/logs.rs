//! `cybctl logs`: prints a job's output, read straight from its run directory, and with
//! `-f` follows it until the job ends. The following loop is shared with `submit --follow`.
//!
//! A run directory keeps the two streams apart (`stdout.log`, `stderr.log`), so by default
//! both are printed as `docker logs` and `submit --follow` do: the job's stdout to
//! cybctl's stdout, its stderr to cybctl's stderr. On a terminal a person sees both (a failed
//! `make` shows its errors); a pipe gets stdout alone unless `2>&1` joins them. The files
//! carry no times, so without `-f` the whole of stdout comes first, then stderr; `-f`
//! copies each as it grows, so the two are interleaved as written, to within a poll (0.1 s).
//! `--stdout` or `--stderr` prints that one alone, to stdout.

use std::io::SeekFrom;
use std::path::Path;
use std::time::Duration;

use cyb_proto::{JobId, JobRecord};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::Ctx;
use crate::conn::Conn;
use crate::exit::{self, Failure};
use crate::output;

pub const STDOUT_LOG: &str = "stdout.log";
pub const STDERR_LOG: &str = "stderr.log";
/// How often a followed log and the job's state are looked at.
pub const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
#[command(after_help = "\
By default both streams are printed: the job's stdout to stdout, its stderr to stderr
(as `docker logs` and `submit --follow` do). Without -f all of stdout comes first, then
stderr (the logs carry no times); with -f each is copied as it is written, so the two
are interleaved in order to within 0.1 s. Join them with `2>&1`; pick one with
--stdout or --stderr, which print it to stdout. --json: {\"id\", \"run_dir\", \"stdout\",
\"stderr\"}, with the streams chosen.")]
pub struct Args {
    /// The job's id
    pub id: JobId,

    /// Keep printing what the job writes until it ends
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// Only the job's stdout (stdout.log)
    #[arg(long)]
    pub stdout: bool,

    /// Only the job's stderr (stderr.log), printed to stdout
    #[arg(long)]
    pub stderr: bool,
}

impl Args {
    /// The logs to print and where to: both, each to its own stream, unless one is chosen.
    fn tails(&self) -> Vec<Tail> {
        match (self.stdout, self.stderr) {
            (true, false) => vec![Tail::new(STDOUT_LOG, Sink::Stdout)],
            (false, true) => vec![Tail::new(STDERR_LOG, Sink::Stdout)],
            _ => vec![
                Tail::new(STDOUT_LOG, Sink::Stdout),
                Tail::new(STDERR_LOG, Sink::Stderr),
            ],
        }
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    if args.follow && ctx.json {
        return Err(
            Failure::usage("`logs -f` streams the log as it is written and has no --json form").into(),
        );
    }
    let conn = ctx.connect().await?;
    let rec = conn.show(args.id).await?;
    let tails = args.tails();
    if args.follow {
        follow(&conn, rec, tails).await?;
        return Ok(exit::OK);
    }
    if rec.run_dir.is_empty() {
        return Err(Failure::new(
            exit::ERROR,
            format!(
                "job {} has no run directory yet (it is {})",
                rec.id,
                rec.state.name()
            ),
        )
        .into());
    }
    // Read both before printing either, so that a missing file is reported alone.
    let mut found = Vec::new();
    for t in &tails {
        let path = Path::new(&rec.run_dir).join(t.file);
        match tokio::fs::read(&path).await {
            Ok(b) => found.push((t, Some(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => found.push((t, None)),
            Err(e) => return Err(read_error(&path, e)),
        }
    }
    if found.iter().all(|(_, b)| b.is_none()) {
        let names: Vec<String> = tails
            .iter()
            .map(|t| Path::new(&rec.run_dir).join(t.file).display().to_string())
            .collect();
        let what = if rec.state.is_terminal() {
            "no output: the job ended before it wrote any (`cybctl show` says how it ended)"
        } else {
            "no output yet"
        };
        return Err(Failure::new(
            exit::ERROR,
            format!(
                "{what}: {} {} not exist (job {} is {})",
                names.join(" and "),
                if names.len() == 1 { "does" } else { "do" },
                rec.id,
                rec.state.name()
            ),
        )
        .into());
    }
    if ctx.json {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(rec.id));
        obj.insert("run_dir".into(), json!(rec.run_dir));
        for (t, bytes) in &found {
            let text = String::from_utf8_lossy(bytes.as_deref().unwrap_or_default());
            obj.insert(
                t.file.trim_end_matches(".log").into(),
                Value::String(text.into_owned()),
            );
        }
        output::json(&obj)?;
    } else {
        for (t, bytes) in found {
            if let Some(b) = bytes {
                t.sink.write(&b)?;
            }
        }
    }
    Ok(exit::OK)
}

/// Where a followed log is copied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
}

impl Sink {
    fn write(self, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Stdout => output::write_bytes(bytes),
            Sink::Stderr => output::write_err_bytes(bytes),
        }
    }
}

/// A log file in the run directory and how much of it has been copied.
#[derive(Debug)]
pub struct Tail {
    file: &'static str,
    sink: Sink,
    pos: u64,
}

impl Tail {
    pub fn new(file: &'static str, sink: Sink) -> Self {
        Tail { file, sink, pos: 0 }
    }

    /// Copies what was appended to the file since the last call to the tail's sink.
    async fn drain(&mut self, run_dir: &str) -> anyhow::Result<()> {
        let sink = self.sink;
        self.drain_into(run_dir, |bytes| sink.write(bytes)).await
    }

    /// Passes what was appended to the file since the last call to `out`. A file that does
    /// not exist yet is left for later; one that shrank (a new attempt) is read again from
    /// the start.
    async fn drain_into(
        &mut self,
        run_dir: &str,
        mut out: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if run_dir.is_empty() {
            return Ok(());
        }
        let path = Path::new(run_dir).join(self.file);
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(read_error(&path, e)),
        };
        let len = f.metadata().await.map_err(|e| read_error(&path, e))?.len();
        if len < self.pos {
            self.pos = 0;
        }
        f.seek(SeekFrom::Start(self.pos))
            .await
            .map_err(|e| read_error(&path, e))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).await.map_err(|e| read_error(&path, e))?;
            if n == 0 {
                return Ok(());
            }
            out(&buf[..n])?;
            self.pos += n as u64;
        }
    }
}

/// Copies the tails' files as they grow until the job has ended and everything it wrote has
/// been copied; returns the final record. `first` is the job as last seen.
pub async fn follow(conn: &Conn, first: JobRecord, mut tails: Vec<Tail>) -> anyhow::Result<JobRecord> {
    let id = first.id;
    let mut rec = first;
    loop {
        // The state is read before the files, so that once it is terminal the drain that
        // follows sees all the job ever wrote.
        for t in &mut tails {
            t.drain(&rec.run_dir).await?;
        }
        if rec.state.is_terminal() {
            // `wait` answers once result.json is written too, so a script may read it next.
            return Ok(conn
                .wait(id, std::time::Duration::from_secs(10))
                .await
                .unwrap_or(rec));
        }
        tokio::time::sleep(POLL).await;
        rec = conn.show(id).await?;
    }
}

/// A failed read of `path`; permission denied gets exit code 77 and says whose files these are.
fn read_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return Failure::new(
            exit::NO_PERMISSION,
            format!(
                "cannot read {}: permission denied (a run directory is readable by its job's user)",
                path.display()
            ),
        )
        .into();
    }
    anyhow::Error::new(e).context(format!("cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn into(got: &mut Vec<u8>) -> impl FnMut(&[u8]) -> anyhow::Result<()> + '_ {
        |b| {
            got.extend_from_slice(b);
            Ok(())
        }
    }

    #[tokio::test]
    async fn drain_waits_for_the_file_and_restarts_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().to_str().unwrap();
        let mut t = Tail::new(STDOUT_LOG, Sink::Stdout);
        let mut got = Vec::new();
        t.drain_into(run_dir, into(&mut got)).await.unwrap();
        assert!(got.is_empty());
        let path = dir.path().join(STDOUT_LOG);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"hello\n").unwrap();
        t.drain_into(run_dir, into(&mut got)).await.unwrap();
        f.write_all(b"more\n").unwrap();
        t.drain_into(run_dir, into(&mut got)).await.unwrap();
        assert_eq!(got, b"hello\nmore\n");
        // A new attempt truncated the log: it is read from the start again.
        std::fs::write(&path, b"x\n").unwrap();
        t.drain_into(run_dir, into(&mut got)).await.unwrap();
        assert_eq!(got, b"hello\nmore\nx\n");
    }

    #[test]
    fn permission_denied_exits_77_naming_the_path() {
        let e = read_error(
            Path::new("/logs/run_7/stdout.log"),
            std::io::ErrorKind::PermissionDenied.into(),
        );
        assert_eq!(exit::code_of(&e), exit::NO_PERMISSION);
        assert!(e.to_string().contains("/logs/run_7/stdout.log"), "{e}");
    }

    #[test]
    fn both_streams_unless_one_is_chosen() {
        let tails = |stdout, stderr| {
            Args {
                id: 1,
                follow: false,
                stdout,
                stderr,
            }
            .tails()
            .into_iter()
            .map(|t| (t.file, t.sink))
            .collect::<Vec<_>>()
        };
        let both = vec![(STDOUT_LOG, Sink::Stdout), (STDERR_LOG, Sink::Stderr)];
        assert_eq!(tails(false, false), both);
        assert_eq!(tails(true, true), both);
        assert_eq!(tails(true, false), [(STDOUT_LOG, Sink::Stdout)]);
        assert_eq!(tails(false, true), [(STDERR_LOG, Sink::Stdout)]);
    }

    #[tokio::test]
    async fn follow_stops_once_the_job_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let (_, conn) = crate::testing::connected(dir.path(), 3).await;
        let first = conn.show(1).await.unwrap();
        assert!(!first.state.is_terminal());
        let rec = follow(&conn, first, vec![Tail::new("absent.log", Sink::Stdout)])
            .await
            .unwrap();
        assert!(rec.state.is_terminal());
    }
}
