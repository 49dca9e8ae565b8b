//! What `cybctl gpus` shows: the daemon's GPU inventory with each GPU's live figures, who
//! holds its lockfile, and the compute processes on it that no cybd job started. The daemon
//! builds a [`GpuReport`] (`cybd::gpu::report`); `cybctl gpus --json` prints it as it is and
//! `cybctl gpus` prints [`render_table`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::job::JobId;

/// Every GPU the daemon knows, and how it found them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// Where the inventory came from: `nvml`, `static` or `none`.
    pub source: String,
    /// One line on the inventory's health, e.g. `nvml: 2 GPUs` or why NVML is missing.
    pub health: String,
    /// By index.
    pub gpus: Vec<GpuInfo>,
}

/// One GPU. The live figures are absent where NVML does not give them (a static GPU has none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The NVML index (or the configured one), also the name of its lockfile `<index>.lock`.
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    /// The device nodes that belong to this GPU, e.g. `/dev/nvidia0`.
    pub devices: Vec<String>,
    /// Who holds the GPU's lockfile.
    pub lock: LockInfo,
    /// Compute processes on the GPU that are not part of the cybd job holding it.
    pub foreign_processes: Vec<GpuProcess>,
    /// Why cybd does not hand this GPU out (a missing device node...), or other news.
    pub note: Option<String>,
}

/// The state of a GPU's lockfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LockInfo {
    /// Nobody holds it.
    Free,
    /// A cybd job holds it, through the process `pid` (its supervisor).
    Job { job_id: JobId, user: String, pid: u32 },
    /// Something other than cybd holds it (e.g. `flock /run/cyb/gpu/0.lock CMD`).
    Outside,
    /// The lockfile could not be examined.
    Unknown { error: String },
}

/// A compute process on a GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory it uses, where the driver tells.
    pub used_memory_bytes: Option<u64>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / GIB)
}

fn memory_cell(g: &GpuInfo) -> String {
    match (g.memory_used_bytes, g.memory_total_bytes) {
        (Some(u), Some(t)) => format!("{} / {} GiB", gib(u), gib(t)),
        (None, Some(t)) => format!("? / {} GiB", gib(t)),
        (Some(u), None) => format!("{} GiB used", gib(u)),
        (None, None) => "-".to_string(),
    }
}

fn lock_cell(l: &LockInfo) -> String {
    match l {
        LockInfo::Free => "free".to_string(),
        LockInfo::Job { job_id, user, pid } => format!("job {job_id} ({user}, pid {pid})"),
        LockInfo::Outside => "held outside cybd".to_string(),
        LockInfo::Unknown { .. } => "unknown".to_string(),
    }
}

fn foreign_cell(procs: &[GpuProcess]) -> String {
    if procs.is_empty() {
        return "-".to_string();
    }
    procs
        .iter()
        .map(|p| match p.used_memory_bytes {
            Some(b) => format!("{} ({} GiB)", p.pid, gib(b)),
            None => p.pid.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of the GPU table.
pub const TABLE_HEADER: [&str; 7] = ["GPU", "NAME", "MEMORY", "UTIL", "TEMP", "LOCK", "OTHER PROCESSES"];

/// The first line of the GPU table: where the inventory came from and its health.
pub fn table_title(report: &GpuReport) -> String {
    format!("source: {}; {}", report.source, report.health)
}

/// One row of the GPU table per GPU, in [`TABLE_HEADER`]'s columns.
pub fn table_rows(report: &GpuReport) -> Vec<[String; 7]> {
    report
        .gpus
        .iter()
        .map(|g| {
            [
                g.index.to_string(),
                g.name.clone().unwrap_or_else(|| "-".to_string()),
                memory_cell(g),
                g.utilization_percent
                    .map_or_else(|| "-".to_string(), |u| format!("{u}%")),
                g.temperature_c
                    .map_or_else(|| "-".to_string(), |t| format!("{t}C")),
                lock_cell(&g.lock),
                foreign_cell(&g.foreign_processes),
            ]
        })
        .collect()
}

/// The lines after the GPU table: one per GPU with a note or an unreadable lockfile.
pub fn table_notes(report: &GpuReport) -> Vec<String> {
    let mut out = Vec::new();
    for g in &report.gpus {
        if let LockInfo::Unknown { error } = &g.lock {
            out.push(format!("gpu {}: lock state unknown: {error}", g.index));
        }
        if let Some(note) = &g.note {
            out.push(format!("gpu {}: {note}", g.index));
        }
    }
    out
}

/// The human table of `cybctl gpus` (cybctl fits it to a terminal; this is the plain form):
/// a line with the source and health, one row per GPU, then one line per GPU that has a
/// note or an unreadable lockfile. Ends with a newline.
pub fn render_table(report: &GpuReport) -> String {
    let mut out = table_title(report);
    out.push('\n');
    if report.gpus.is_empty() {
        out.push_str("no GPUs\n");
        return out;
    }
    let rows = table_rows(report);
    let mut widths = TABLE_HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&TABLE_HEADER);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    for n in table_notes(report) {
        out.push_str(&n);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: Some(format!("GPU-{index}")),
            name: Some("NVIDIA A100-SXM4-40GB".into()),
            memory_total_bytes: Some(40 << 30),
            memory_used_bytes: Some(3 << 29),
            utilization_percent: Some(7),
            temperature_c: Some(41),
            devices: vec![format!("/dev/nvidia{index}")],
            lock: LockInfo::Free,
            foreign_processes: vec![],
            note: None,
        }
    }

    #[test]
    fn json_shape() {
        let mut g = gpu(0);
        g.lock = LockInfo::Job {
            job_id: 42,
            user: "alice".into(),
            pid: 123,
        };
        g.foreign_processes = vec![GpuProcess {
            pid: 9,
            used_memory_bytes: None,
        }];
        let r = GpuReport {
            source: "nvml".into(),
            health: "nvml: 1 GPU".into(),
            gpus: vec![g],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["gpus"][0]["lock"]["state"], "job");
        assert_eq!(v["gpus"][0]["lock"]["job_id"], 42);
        assert_eq!(v["gpus"][0]["foreign_processes"][0]["pid"], 9);
        assert_eq!(v["gpus"][0]["memory_total_bytes"], 40u64 << 30);
        let back: GpuReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let free = serde_json::to_value(LockInfo::Free).unwrap();
        assert_eq!(free, serde_json::json!({"state": "free"}));
        let outside = serde_json::to_value(LockInfo::Outside).unwrap();
        assert_eq!(outside, serde_json::json!({"state": "outside"}));
    }

    #[test]
    fn table() {
        let mut a = gpu(0);
        a.lock = LockInfo::Job {
            job_id: 42,
            user: "alice".into(),
            pid: 123,
        };
        let mut b = gpu(1);
        b.name = None;
        b.memory_total_bytes = None;
        b.memory_used_bytes = None;
        b.utilization_percent = None;
        b.temperature_c = None;
        b.lock = LockInfo::Outside;
        b.foreign_processes = vec![GpuProcess {
            pid: 77,
            used_memory_bytes: Some(1 << 30),
        }];
        b.note = Some("device node /dev/nvidia1 is missing".into());
        let r = GpuReport {
            source: "static".into(),
            health: "static: 2 GPUs from the config".into(),
            gpus: vec![a, b],
        };
        let t = render_table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "source: static; static: 2 GPUs from the config");
        assert!(lines[1].starts_with("GPU  NAME"), "{t}");
        assert!(lines[2].contains("1.5 / 40.0 GiB"), "{t}");
        assert!(lines[2].contains("7%") && lines[2].contains("41C"), "{t}");
        assert!(lines[2].contains("job 42 (alice, pid 123)"), "{t}");
        assert!(lines[3].contains("held outside cybd"), "{t}");
        assert!(lines[3].ends_with("77 (1.0 GiB)"), "{t}");
        assert_eq!(lines[4], "gpu 1: device node /dev/nvidia1 is missing");
        // Columns line up: LOCK starts at the same offset in every row.
        let col = lines[1].find("LOCK").unwrap();
        assert_eq!(lines[2].find("job 42"), Some(col));
        assert_eq!(lines[3].find("held outside"), Some(col));
    }

    #[test]
    fn empty_table() {
        let r = GpuReport {
            source: "nvml".into(),
            health: "nvml: libnvidia-ml.so.1 not found (no NVIDIA driver); 0 GPUs".into(),
            gpus: vec![],
        };
        assert_eq!(
            render_table(&r),
            "source: nvml; nvml: libnvidia-ml.so.1 not found (no NVIDIA driver); 0 GPUs\nno GPUs\n"
        );
    }
}
