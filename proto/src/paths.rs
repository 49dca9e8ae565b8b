//! Where a user-mode daemon keeps its runtime files (socket, GPU lockfiles): one rule, used
//! by `cybd --user` and by `cybctl` alike, so the two always meet at the same socket.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A user's runtime directory for cyb and how it was found (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRuntime {
    /// `<base>/cyb`: holds `cybd.sock` and `gpu/`.
    pub dir: PathBuf,
    /// Where it came from, e.g. `$XDG_RUNTIME_DIR/cyb`, in words.
    pub source: String,
}

/// The cyb runtime directory of user `uid`:
/// 1. `$XDG_RUNTIME_DIR/cyb` when that variable is set to an absolute path (the XDG spec
///    says a relative one is ignored);
/// 2. else `/run/user/<uid>/cyb` when `/run/user/<uid>` is a directory owned by `uid` (a
///    logind session exists, but the variable was lost, e.g. under `sudo -u`);
/// 3. else `$HOME/.local/state/cyb` (under `su` or `runuser` there is neither).
///
/// `owner_of` gives the owner of a directory (`None` when it is not one).
pub fn user_runtime_dir(
    uid: u32,
    xdg_runtime_dir: Option<&OsStr>,
    home: Option<&OsStr>,
    owner_of: impl Fn(&Path) -> Option<u32>,
) -> Option<UserRuntime> {
    if let Some(x) = xdg_runtime_dir.map(Path::new).filter(|p| p.is_absolute()) {
        return Some(UserRuntime {
            dir: x.join("cyb"),
            source: format!("$XDG_RUNTIME_DIR/cyb (XDG_RUNTIME_DIR={})", x.display()),
        });
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    if owner_of(&run_user) == Some(uid) {
        return Some(UserRuntime {
            dir: run_user.join("cyb"),
            source: format!("{}/cyb (XDG_RUNTIME_DIR is unset)", run_user.display()),
        });
    }
    let home = home.map(Path::new).filter(|p| p.is_absolute())?;
    Some(UserRuntime {
        dir: home.join(".local/state/cyb"),
        source: format!(
            "$HOME/.local/state/cyb (XDG_RUNTIME_DIR is unset and {} is not yours)",
            run_user.display()
        ),
    })
}

/// [`user_runtime_dir`] for user `uid` (the caller's effective uid) with this process's
/// environment.
pub fn user_runtime_dir_from_env(uid: u32) -> Option<UserRuntime> {
    use std::os::unix::fs::MetadataExt as _;
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty());
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty());
    user_runtime_dir(uid, xdg.as_deref(), home.as_deref(), |p| {
        std::fs::metadata(p).ok().filter(|m| m.is_dir()).map(|m| m.uid())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_by(uid: u32) -> impl Fn(&Path) -> Option<u32> {
        move |p| (p == Path::new("/run/user/1001")).then_some(uid)
    }

    #[test]
    fn the_variable_then_run_user_then_home() {
        let home = Some(OsStr::new("/home/al"));
        let r = user_runtime_dir(1001, Some(OsStr::new("/x/rt")), home, owned_by(1001)).unwrap();
        assert_eq!(r.dir, Path::new("/x/rt/cyb"));
        // Relative: ignored.
        let r = user_runtime_dir(1001, Some(OsStr::new("rt")), home, owned_by(1001)).unwrap();
        assert_eq!(r.dir, Path::new("/run/user/1001/cyb"));
        assert!(r.source.contains("XDG_RUNTIME_DIR is unset"), "{}", r.source);
        // /run/user/<uid> of someone else (or absent): the home directory.
        let r = user_runtime_dir(1001, None, home, owned_by(0)).unwrap();
        assert_eq!(r.dir, Path::new("/home/al/.local/state/cyb"));
        assert!(r.source.contains("/run/user/1001 is not yours"), "{}", r.source);
        assert_eq!(user_runtime_dir(1001, None, None, owned_by(0)), None);
    }
}
