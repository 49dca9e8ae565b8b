//! The run directory's log files as a supervisor writes them: capped at `max_log_bytes`
//! with the cut marked ([`LogFile`]), fed from a job's pipe ([`LogSink`], native jobs) or
//! from a container's attach frames (docker jobs).

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;

/// One output stream of the job: a pipe copied into a log file.
pub(super) struct LogSink {
    pub(super) pipe: Option<OwnedFd>,
    log: LogFile,
}

/// A log file of the run directory, capped at `max_log_bytes`, the cut marked.
pub(crate) struct LogFile {
    file: File,
    cap: u64,
    written: u64,
    cut: bool,
}

impl LogFile {
    pub(crate) fn new(file: File, cap: u64) -> LogFile {
        LogFile {
            file,
            cap,
            written: 0,
            cut: false,
        }
    }

    /// Appends `data`, up to the cap; past it, drops the rest (once marking the cut).
    pub(crate) fn keep(&mut self, data: &[u8]) {
        if self.cut {
            return; // keep draining so the job never blocks on a full pipe
        }
        let room = self.cap.saturating_sub(self.written);
        let take = (data.len() as u64).min(room) as usize;
        if take > 0 && self.file.write_all(&data[..take]).is_err() {
            self.cut = true;
            return;
        }
        self.written += take as u64;
        if take < data.len() {
            self.cut = true;
            let _ = writeln!(self.file, "\n[cybd: output truncated at {} bytes]", self.cap);
        }
    }
}

impl LogSink {
    pub(super) fn new(pipe: OwnedFd, file: File, cap: u64) -> LogSink {
        // Non-blocking, so a spurious wake-up never stalls the loop.
        let _ = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        LogSink {
            pipe: Some(pipe),
            log: LogFile::new(file, cap),
        }
    }

    /// Copies what the pipe holds now; closes it at end-of-file.
    pub(super) fn pump(&mut self, buf: &mut [u8]) {
        loop {
            let Some(pipe) = &self.pipe else { return };
            match nix::unistd::read(pipe, buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    let n = n.min(buf.len());
                    self.log.keep(&buf[..n]);
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return,
                Err(_) => {
                    self.pipe = None;
                    return;
                }
            }
        }
    }
}
