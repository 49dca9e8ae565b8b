//! `cybctl retry`: queues a job that has ended again, as a fresh attempt.

use super::Ctx;

pub use super::JobArg as Args;

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let before = conn.show(args.id).await?;
    let after = conn.retry(args.id).await?;
    let line = format!(
        "retrying job {} (was {}; now {})",
        after.id,
        before.state.name(),
        after.state.name()
    );
    super::confirm(ctx, &after, &line)
}
