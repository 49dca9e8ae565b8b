//! `cybctl release`: lets a held job start again.

use super::Ctx;

pub use super::JobArg as Args;

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let after = conn.release(args.id).await?;
    let line = format!("released job {} (now {})", after.id, after.state.name());
    super::confirm(ctx, &after, &line)
}
