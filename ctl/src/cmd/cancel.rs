//! `cybctl cancel`: cancels a job; a running one is stopped (its whole cgroup is killed).

use super::Ctx;

pub use super::JobArg as Args;

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let conn = ctx.connect().await?;
    let before = conn.show(args.id).await?;
    let after = conn.cancel(args.id).await?;
    let was = before.state.name();
    let line = if after.state.is_terminal() {
        format!("cancelled job {} (was {was})", after.id)
    } else {
        format!("cancelling job {} (was {was}; it is being stopped)", after.id)
    };
    super::confirm(ctx, &after, &line)
}
