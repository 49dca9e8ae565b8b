//! Exit codes, the error that carries one, and the mapping from any error to its code.

use std::fmt;

use cyb_proto::RpcError;

/// Success.
pub const OK: i32 = 0;
/// Any other error.
pub const ERROR: i32 = 1;
/// Bad usage (clap uses this code for its own errors too).
pub const USAGE: i32 = 2;
/// The job does not exist.
pub const NO_SUCH_JOB: i32 = 3;
/// The job spec is invalid (EX_DATAERR).
pub const INVALID_SPEC: i32 = 65;
/// The daemon cannot be reached (EX_UNAVAILABLE).
pub const UNREACHABLE: i32 = 69;
/// Permission denied (EX_NOPERM).
pub const NO_PERMISSION: i32 = 77;
/// `wait --timeout` ran out before the job ended.
pub const WAIT_TIMED_OUT: i32 = 124;
/// Standard output was closed by the reader (as a shell reports death by SIGPIPE).
pub const BROKEN_PIPE: i32 = 141;

/// An error with the exit code it should end cybctl with.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A usage error found after clap parsed the command line.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code for `err`: that of the outermost error in its chain that has one.
pub fn code_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if let Some(e) = cause.downcast_ref::<RpcError>() {
            return match e {
                RpcError::NotFound(_) => NO_SUCH_JOB,
                RpcError::PermissionDenied(_) => NO_PERMISSION,
                RpcError::InvalidSpec(_) => INVALID_SPEC,
                RpcError::InvalidState(_) | RpcError::Unavailable(_) | RpcError::Internal(_) => ERROR,
            };
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            match e.kind() {
                std::io::ErrorKind::PermissionDenied => return NO_PERMISSION,
                std::io::ErrorKind::BrokenPipe => return BROKEN_PIPE,
                _ => {}
            }
        }
    }
    ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_follow_the_chain() {
        let e = anyhow::Error::new(RpcError::NotFound(7)).context("cancel");
        assert_eq!(code_of(&e), NO_SUCH_JOB);
        let e = anyhow::Error::new(RpcError::PermissionDenied("not yours".into()));
        assert_eq!(code_of(&e), NO_PERMISSION);
        let e = anyhow::Error::new(Failure::new(WAIT_TIMED_OUT, "still running"));
        assert_eq!(code_of(&e), WAIT_TIMED_OUT);
        let e: anyhow::Error = Err::<(), _>(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            .context("x")
            .unwrap_err();
        assert_eq!(code_of(&e), NO_PERMISSION);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), ERROR);
    }
}
