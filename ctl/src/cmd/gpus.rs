//! `cybctl gpus`: every GPU cybd knows, with memory, utilization and temperature where
//! NVML gives them, who holds its lock (a job, or something outside cybd), and foreign
//! processes on it.

use cyb_proto::gpu::{self, GpuReport};

use super::Ctx;
use crate::exit;
use crate::output::{self, Cell, Table};
use crate::term::{self, Term};

pub async fn run(ctx: &Ctx) -> anyhow::Result<i32> {
    let report = ctx.connect().await?.gpus().await?;
    if ctx.json {
        output::json(&report)?;
    } else {
        output::print(&render(&report, &ctx.term))?;
    }
    Ok(exit::OK)
}

/// The table of [`gpu::render_table`], fitted to the terminal (NAME, LOCK and OTHER
/// PROCESSES are cut first) and coloured there: a free GPU green, one held outside cybd
/// yellow.
fn render(report: &GpuReport, term: &Term) -> String {
    let mut out = gpu::table_title(report);
    out.push('\n');
    if report.gpus.is_empty() {
        out.push_str("no GPUs\n");
        return out;
    }
    let columns = gpu::TABLE_HEADER.map(|h| (h, false));
    let mut t = Table::new(&columns).elastic(&["NAME", "LOCK", "OTHER PROCESSES"]);
    for (g, row) in report.gpus.iter().zip(gpu::table_rows(report)) {
        let lock_style = match g.lock {
            gpu::LockInfo::Free => term::GOOD,
            gpu::LockInfo::Outside | gpu::LockInfo::Unknown { .. } => term::WARN,
            gpu::LockInfo::Job { .. } => anstyle::Style::new(),
        };
        t.row(
            row.into_iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == 5 {
                        Cell::styled(cell, lock_style)
                    } else {
                        cell.into()
                    }
                })
                .collect(),
        );
    }
    out.push_str(&t.render(term));
    for n in gpu::table_notes(report) {
        out.push_str(&n);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyb_proto::gpu::{GpuInfo, LockInfo};

    fn report() -> GpuReport {
        let g = |index, lock| GpuInfo {
            index,
            uuid: None,
            name: Some("NVIDIA A100-SXM4-40GB with a long marketing name".into()),
            memory_total_bytes: Some(40 << 30),
            memory_used_bytes: Some(1 << 30),
            utilization_percent: Some(3),
            temperature_c: Some(40),
            devices: vec![],
            lock,
            foreign_processes: vec![],
            note: None,
        };
        GpuReport {
            source: "static".into(),
            health: "static: 2 GPUs".into(),
            gpus: vec![
                g(0, LockInfo::Free),
                g(
                    1,
                    LockInfo::Job {
                        job_id: 42,
                        user: "a-user-with-a-long-login-name".into(),
                        pid: 1234,
                    },
                ),
            ],
        }
    }

    #[test]
    fn plain_when_not_a_terminal_and_fitted_on_one() {
        let r = report();
        assert_eq!(render(&r, &Term::default()), gpu::render_table(&r));
        let text = render(
            &r,
            &Term {
                width: Some(72),
                color: false,
            },
        );
        assert!(text.lines().skip(1).all(|l| l.chars().count() <= 72), "{text}");
        assert!(text.contains('…'), "{text}");
        let coloured = render(
            &r,
            &Term {
                width: None,
                color: true,
            },
        );
        assert!(coloured.contains("\x1b[32mfree"), "{coloured:?}");
    }
}
