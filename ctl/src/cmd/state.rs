//! `cybctl state`: one word for where a job stands, for scripts and the status hooks of
//! workflow tools. `--format snakemake` gives the three words Snakemake's generic cluster
//! executor reads from `--cluster-generic-status-cmd`.

use cyb_proto::{JobId, StateName};
use serde_json::json;

use super::Ctx;
use crate::exit;
use crate::output;

/// Which words to print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// cybd's own: queued, held, waiting, running, succeeded, failed, timed_out, cancelled
    #[default]
    Cybd,
    /// Snakemake's: running (not ended yet), success (succeeded), failed (failed, timed_out,
    /// cancelled)
    Snakemake,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prints one word and a newline. Words (cybd): queued, held, waiting (for a retry),
running, succeeded, failed, timed_out, cancelled; the last four are final.
--format snakemake: running, success or failed, for
`snakemake --cluster-generic-status-cmd \"cybctl state --format snakemake\"`.
Exit code 0 whenever a state is printed, whatever it is; 3 no such job; 69 no daemon.")]
pub struct Args {
    /// The job's id
    pub id: JobId,

    /// Which words to print
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let rec = ctx.connect().await?.show(args.id).await?;
    let word = word(rec.state.name(), args.format);
    if ctx.json {
        output::json(&json!({ "id": rec.id, "state": word }))?;
    } else {
        output::print(&format!("{word}\n"))?;
    }
    Ok(exit::OK)
}

/// The word for `state` in `format`.
pub fn word(state: StateName, format: Format) -> &'static str {
    match format {
        Format::Cybd => state.as_str(),
        Format::Snakemake => match state {
            StateName::Succeeded => "success",
            StateName::Failed | StateName::TimedOut | StateName::Cancelled => "failed",
            StateName::Queued | StateName::Held | StateName::Waiting | StateName::Running => "running",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snakemake_words() {
        let words: Vec<&str> = StateName::ALL
            .iter()
            .map(|s| word(*s, Format::Snakemake))
            .collect();
        assert_eq!(
            words,
            [
                "running", "running", "running", "running", "success", "failed", "failed", "failed"
            ]
        );
        assert_eq!(word(StateName::TimedOut, Format::Cybd), "timed_out");
    }
}
