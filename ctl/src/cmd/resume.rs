//! `cybctl resume`: lets the daemon start jobs again after `pause`. Admins only.

use serde_json::json;

use super::Ctx;
use crate::{exit, output};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    ctx.connect().await?.resume().await?;
    if ctx.json {
        output::json(&json!({ "paused": false }))?;
    } else {
        output::print("resumed cybd: jobs start again\n")?;
    }
    Ok(exit::OK)
}
