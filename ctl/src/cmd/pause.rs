//! `cybctl pause`: stops the daemon from starting new jobs; running jobs go on. Admins only.

use serde_json::json;

use super::Ctx;
use crate::{exit, output};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    ctx.connect().await?.pause().await?;
    if ctx.json {
        output::json(&json!({ "paused": true }))?;
    } else {
        output::print("paused cybd: no new jobs start; running jobs go on\n")?;
    }
    Ok(exit::OK)
}
