//! systemd integration: the socket passed by socket activation, sd_notify messages (READY,
//! STATUS, RELOADING, STOPPING, WATCHDOG), and telling `systemctl stop` from
//! `systemctl restart`. Everything here is a no-op when cybd is not run by systemd.

use std::os::fd::FromRawFd;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Whether systemd started us (it sets NOTIFY_SOCKET for Type=notify units).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The listening socket passed by systemd (cybd.socket), if any.
pub fn activated_listener() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let fds: Vec<_> = match sd_notify::listen_fds() {
        Ok(fds) => fds.collect(),
        Err(_) => return Ok(None),
    };
    let Some(&fd) = fds.first() else { return Ok(None) };
    if fds.len() > 1 {
        warn!("systemd passed {} sockets; using the first", fds.len());
    }
    // SAFETY: systemd passed this descriptor to us (LISTEN_FDS, checked against LISTEN_PID
    // by listen_fds), it is open, and nothing else in the process owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn send(states: &[NotifyState<'_>]) {
    if !under_systemd() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog (a third of WatchdogSec), if it is on.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 3))
    } else {
        None
    }
}

/// Our unit's name, from our cgroup path (`.../cybd.service`).
pub fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_from_cgroup(&text)
}

fn unit_from_cgroup(text: &str) -> Option<String> {
    // Prefer the unified (0::) or systemd-named line; both end in the unit's cgroup.
    let line = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .filter(|l| l.contains(".service"))
        .or_else(|| text.lines().find(|l| l.contains(":name=systemd:")))?;
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/')
        .rev()
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}

/// Whether systemd is stopping our unit for good (`systemctl stop`, package removal,
/// shutdown) rather than restarting it. Only then should running jobs be ended.
///
/// systemd signals the daemon the same way in both cases; the pending job of the unit
/// (`systemctl list-jobs`) tells them apart: `stop` versus `restart` / `try-restart`.
/// `user_manager`: the unit is the user-mode one, run by the user's own systemd
/// (`systemctl --user`), whose jobs the system manager does not list.
pub fn unit_is_stopping(user_manager: bool) -> bool {
    let Some(unit) = own_unit() else { return false };
    let mut cmd = std::process::Command::new("systemctl");
    if user_manager {
        cmd.arg("--user");
    }
    let out = cmd
        .args(["list-jobs", "--no-legend", "--plain", "--no-pager"])
        .output();
    match out {
        Ok(o) => job_type_is_stop(&String::from_utf8_lossy(&o.stdout), &unit),
        Err(e) => {
            warn!("cannot ask systemd whether {unit} is stopping or restarting ({e}); leaving jobs running");
            false
        }
    }
}

fn job_type_is_stop(list: &str, unit: &str) -> bool {
    list.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 3 && cols[1] == unit && cols[2] == "stop"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_name_from_cgroup_files() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/cybd.service\n").as_deref(),
            Some("cybd.service")
        );
        let hybrid = "12:pids:/system.slice/cybd.service\n1:name=systemd:/system.slice/cybd.service\n0::/\n";
        assert_eq!(unit_from_cgroup(hybrid).as_deref(), Some("cybd.service"));
        assert_eq!(unit_from_cgroup("0::/user.slice/session-1.scope\n"), None);
    }

    #[test]
    fn stop_versus_restart() {
        let stop = "123 cybd.service stop running\n124 other.service start waiting\n";
        let restart = "125 cybd.service restart running\n";
        assert!(job_type_is_stop(stop, "cybd.service"));
        assert!(!job_type_is_stop(restart, "cybd.service"));
        assert!(!job_type_is_stop("", "cybd.service"));
    }
}
