//! `cybctl priority`: changes the priority of a job that has not started.

use cyb_proto::JobId;

use super::Ctx;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job's id
    pub id: JobId,

    /// The new priority; higher runs first
    #[arg(allow_negative_numbers = true)]
    pub priority: i32,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let before = conn.show(args.id).await?;
    let after = conn.set_priority(args.id, args.priority).await?;
    let line = format!(
        "set priority of job {} to {} (was {})",
        after.id, after.priority, before.priority
    );
    super::confirm(ctx, &after, &line)
}
