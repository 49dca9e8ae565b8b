//! `cybctl wait`: waits for a job to end and exits with the job's exit code. The waiting loop
//! is shared with `submit --wait`.

use std::time::{Duration, Instant};

use cyb_proto::{JobId, JobRecord};

use super::Ctx;
use crate::conn::Conn;
use crate::exit::{self, Failure};
use crate::output;

/// How long one `wait` call asks the daemon to hold on.
const SLICE: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job's id
    pub id: JobId,

    /// Give up after this long (exit code 124), e.g. 90s, 10m
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let rec = until_end(&conn, args.id, args.timeout).await?;
    if ctx.json {
        output::json(&rec)?;
    }
    if !rec.state.is_terminal() {
        let waited = args
            .timeout
            .map(|t| humantime::format_duration(t).to_string())
            .unwrap_or_default();
        return Err(Failure::new(
            exit::WAIT_TIMED_OUT,
            format!(
                "timed out: job {} is still {} after {waited}",
                rec.id,
                rec.state.name()
            ),
        )
        .into());
    }
    if !ctx.json {
        output::print(&format!("{}\n", output::end_line(&rec)))?;
    }
    Ok(rec.wait_exit_code())
}

/// Waits until job `id` has ended, or `limit` has passed; returns the job as last seen
/// (not terminal only when `limit` ran out).
pub async fn until_end(conn: &Conn, id: JobId, limit: Option<Duration>) -> anyhow::Result<JobRecord> {
    let start = Instant::now();
    loop {
        let slice = limit.map_or(SLICE, |l| l.saturating_sub(start.elapsed()).min(SLICE));
        let asked = Instant::now();
        let rec = conn.wait(id, slice).await?;
        if rec.state.is_terminal() || limit.is_some_and(|l| start.elapsed() >= l) {
            return Ok(rec);
        }
        // The daemon answers early only when the job ended; never spin if it does not.
        if asked.elapsed() < slice {
            tokio::time::sleep(super::logs::POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gives_up_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (_, conn) = crate::testing::connected(dir.path(), u32::MAX).await;
        let start = Instant::now();
        let rec = until_end(&conn, 1, Some(Duration::from_millis(300)))
            .await
            .unwrap();
        assert!(!rec.state.is_terminal());
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn returns_the_ended_job() {
        let dir = tempfile::tempdir().unwrap();
        // The first `show` ends the job.
        let (_, conn) = crate::testing::connected(dir.path(), 1).await;
        conn.show(1).await.unwrap();
        let rec = until_end(&conn, 1, None).await.unwrap();
        assert!(rec.state.is_terminal());
        assert_eq!(rec.wait_exit_code(), 0);
        let e = until_end(&conn, 5, None).await.unwrap_err();
        assert_eq!(exit::code_of(&e), exit::NO_SUCH_JOB);
    }
}
