//! `cybctl logs`: prints a job's `stdout.log` or `stderr.log`, read straight from its run
//! directory, and with `-f` follows it until the job ends. The following loop is shared with
//! `submit --follow`.

use std::io::SeekFrom;
use std::path::Path;
use std::time::Duration;

use cyb_proto::{JobId, JobRecord};
use serde_json::json;
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
pub struct Args {
    /// The job's id
    pub id: JobId,

    /// Keep printing what the job writes until it ends
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// Print stderr.log instead of stdout.log
    #[arg(long)]
    pub stderr: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    if args.follow && ctx.json {
        return Err(
            Failure::usage("`logs -f` streams the log as it is written and has no --json form").into(),
        );
    }
    let conn = ctx.connect().await?;
    let rec = conn.show(args.id).await?;
    let file = if args.stderr { STDERR_LOG } else { STDOUT_LOG };
    if args.follow {
        follow(&conn, rec, vec![Tail::new(file, Sink::Stdout)]).await?;
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
    let path = Path::new(&rec.run_dir).join(file);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::new(
                exit::ERROR,
                format!(
                    "no output yet: {} does not exist (job {} is {})",
                    path.display(),
                    rec.id,
                    rec.state.name()
                ),
            )
            .into());
        }
        Err(e) => return Err(read_error(&path, e)),
    };
    if ctx.json {
        output::json(&json!({
            "id": rec.id,
            "file": file,
            "path": path,
            "text": String::from_utf8_lossy(&bytes),
        }))?;
    } else {
        output::write_bytes(&bytes)?;
    }
    Ok(exit::OK)
}

/// Where a followed log is copied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
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
        self.drain_into(run_dir, |bytes| match sink {
            Sink::Stdout => output::write_bytes(bytes),
            Sink::Stderr => output::write_err_bytes(bytes),
        })
        .await
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
