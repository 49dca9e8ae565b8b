//! `cybctl hold`: keeps a queued job from starting until it is released.

use super::Ctx;

pub use super::JobArg as Args;

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let before = conn.show(args.id).await?;
    let after = conn.hold(args.id).await?;
    let line = format!("held job {} (was {})", after.id, before.state.name());
    super::confirm(ctx, &after, &line)
}
