//! `cybctl schema`: prints the JSON Schema of the job spec (it is JSON with or without
//! `--json`).

use crate::{exit, output};

pub fn run() -> anyhow::Result<i32> {
    output::json(&cyb_proto::spec::schema())?;
    Ok(exit::OK)
}
