//! `cybctl validate`: checks a job file with the daemon's own parser (`cyb_proto::parse_job`)
//! without submitting it. Also reads `-f FILE` for `submit`, with the same size limit.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cyb_proto::SpecError;
use serde_json::json;

use super::Ctx;
use crate::exit::{self, Failure};
use crate::output;

/// The largest job file cybctl reads.
pub const MAX_JOB_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job file (JSON); `-` reads stdin
    pub file: PathBuf,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let name = display_name(&args.file);
    let bytes = read_limited(&args.file)?;
    let checked = bytes.clone().and_then(|b| cyb_proto::parse_job(&b));
    // A spec that parses is also put to the daemon, when one answers, for what only it
    // knows (backends on this host, existing job ids, root jobs): the same checks as intake.
    let (checked, daemon) = match (checked, bytes) {
        (Ok(spec), Ok(b)) => match daemon_check(ctx, b).await {
            DaemonCheck::Passed => (Ok(spec), true),
            DaemonCheck::Unreachable => (Ok(spec), false),
            DaemonCheck::Refused(e) => (Err(e), true),
        },
        (Err(e), _) | (_, Err(e)) => (Err(e), false),
    };
    match checked {
        Ok(spec) => {
            if ctx.json {
                output::json(&json!({
                    "ok": true,
                    "class": spec.class(),
                    "backend": spec.backend(),
                    "checked_by_daemon": daemon,
                }))?;
            } else {
                let note = if daemon {
                    ""
                } else {
                    "; cybd not reachable, host checks skipped"
                };
                output::print(&format!(
                    "{name}: ok (class {}, backend {}{note})\n",
                    spec.class(),
                    spec.backend()
                ))?;
            }
            Ok(exit::OK)
        }
        Err(e) => {
            if ctx.json {
                output::json(&e)?;
            } else {
                output::print(&format!("{name}: {e}\n"))?;
            }
            Ok(exit::INVALID_SPEC)
        }
    }
}

enum DaemonCheck {
    Passed,
    Unreachable,
    Refused(SpecError),
}

async fn daemon_check(ctx: &Ctx, bytes: Vec<u8>) -> DaemonCheck {
    let Ok(conn) = ctx.connect().await else {
        return DaemonCheck::Unreachable;
    };
    let req = cyb_proto::SubmitRequest {
        spec_json: String::from_utf8_lossy(&bytes).into_owned(),
        default_cwd: None,
    };
    match conn.check(req).await {
        Ok(()) => DaemonCheck::Passed,
        Err(e) => match e.downcast::<cyb_proto::RpcError>() {
            Ok(cyb_proto::RpcError::InvalidSpec(s)) => DaemonCheck::Refused(s),
            Ok(cyb_proto::RpcError::PermissionDenied(m)) => DaemonCheck::Refused(SpecError::general(m)),
            _ => DaemonCheck::Unreachable,
        },
    }
}

/// Reads a job file for `submit -f`; a file over the limit is an invalid spec (exit 65).
pub fn read_job_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    read_limited(path)?
        .map_err(|e| Failure::new(exit::INVALID_SPEC, format!("{}: {e}", display_name(path))).into())
}

/// The file's bytes, or a spec error if it is larger than [`MAX_JOB_FILE_BYTES`]; `-` is stdin.
fn read_limited(path: &Path) -> anyhow::Result<Result<Vec<u8>, SpecError>> {
    let name = display_name(path);
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_JOB_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {name}"))?
            .len();
        if len > MAX_JOB_FILE_BYTES {
            return Ok(Err(too_big(len)));
        }
        file.take(MAX_JOB_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {name}"))?;
    }
    if bytes.len() as u64 > MAX_JOB_FILE_BYTES {
        return Ok(Err(too_big(bytes.len() as u64)));
    }
    Ok(Ok(bytes))
}

fn too_big(len: u64) -> SpecError {
    let shown = if len > MAX_JOB_FILE_BYTES + 1 {
        format!("{len} bytes")
    } else {
        "more than 1 MiB".to_string()
    };
    SpecError::general(format!(
        "the job file is {shown}; a job file may be at most 1 MiB"
    ))
}

fn display_name(path: &Path) -> String {
    if path.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("ok.json");
        std::fs::write(&small, br#"{"command":["true"]}"#).unwrap();
        assert!(matches!(read_limited(&small), Ok(Ok(_))));
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 1024 * 1024 + 10]).unwrap();
        let Ok(Err(e)) = read_limited(&big) else {
            panic!("a 1 MiB + 10 B file was read")
        };
        assert!(e.message.contains("1048586 bytes"), "{e}");
        let e = read_job_file(&big).unwrap_err();
        assert_eq!(exit::code_of(&e), exit::INVALID_SPEC);
        assert!(e.to_string().contains("big.json"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = read_limited(Path::new("/nonexistent/job.json")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/job.json"), "{e:#}");
        assert_eq!(exit::code_of(&e), exit::ERROR);
    }
}
