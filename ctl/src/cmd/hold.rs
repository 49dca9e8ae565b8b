//! `cybctl hold`: keeps a queued job from starting until it is released.

use cyb_proto::JobId;

use super::Ctx;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job's id
    pub id: JobId,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let before = conn.show(args.id).await?;
    let after = conn.hold(args.id).await?;
    let line = format!("held job {} (was {})", after.id, before.state.name());
    super::confirm(ctx, &after, &line)
}
