//! `cybctl gpus`: every GPU cybd knows, with memory, utilization and temperature where
//! NVML gives them, who holds its lock (a job, or something outside cybd), and foreign
//! processes on it.

use super::Ctx;
use crate::exit;
use crate::output;

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    let report = ctx.connect().await?.gpus().await?;
    if ctx.json {
        output::json(&report)?;
    } else {
        output::print(&cyb_proto::gpu::render_table(&report))?;
    }
    Ok(exit::OK)
}
