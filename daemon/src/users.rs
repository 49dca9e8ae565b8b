//! Users and groups: who a uid is (name, home, groups), and whether a peer is an admin.
//! Lookups go through NSS (blocking): call them from blocking contexts only.

use nix::unistd::{Gid, Group, Uid, User};

/// Everything needed to run a process as a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("uid {0} has no user entry")]
    NoSuchUid(u32),
    #[error("cannot look up uid {uid}: {source}")]
    Lookup { uid: u32, source: nix::Error },
}

/// Looks up `uid` with its supplementary groups.
pub fn account(uid: u32) -> Result<Account, UserError> {
    let user = User::from_uid(Uid::from_raw(uid))
        .map_err(|source| UserError::Lookup { uid, source })?
        .ok_or(UserError::NoSuchUid(uid))?;
    let mut groups: Vec<u32> = Vec::new();
    if let Ok(cname) = std::ffi::CString::new(user.name.clone())
        && let Ok(gs) = nix::unistd::getgrouplist(&cname, user.gid)
    {
        groups = gs.into_iter().map(Gid::as_raw).collect();
    }
    if !groups.contains(&user.gid.as_raw()) {
        groups.insert(0, user.gid.as_raw());
    }
    Ok(Account {
        uid,
        gid: user.gid.as_raw(),
        name: user.name,
        home: user.dir.to_string_lossy().into_owned(),
        groups,
    })
}

/// [`account`], remembered for a minute: intake and the scheduler look up the same few
/// users for every job, and each NSS lookup reads /etc/passwd and /etc/group.
pub fn account_cached(uid: u32) -> Result<Account, UserError> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CACHE: Mutex<Option<HashMap<u32, (Instant, Account)>>> = Mutex::new(None);
    const TTL: Duration = Duration::from_secs(60);
    if let Ok(mut guard) = CACHE.lock()
        && let Some((at, acct)) = guard.get_or_insert_with(HashMap::new).get(&uid)
        && at.elapsed() < TTL
    {
        return Ok(acct.clone());
    }
    let acct = account(uid)?;
    if let Ok(mut guard) = CACHE.lock() {
        guard
            .get_or_insert_with(HashMap::new)
            .insert(uid, (Instant::now(), acct.clone()));
    }
    Ok(acct)
}

/// Whether `uid` is root or a member of `admin_group` (primary or supplementary).
pub fn is_admin(uid: u32, admin_group: Option<&str>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(group) = admin_group else { return false };
    let Ok(Some(g)) = Group::from_name(group) else {
        return false;
    };
    match account(uid) {
        Ok(a) => a.groups.contains(&g.gid.as_raw()) || g.mem.contains(&a.name),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_account() {
        let a = account(0).unwrap();
        assert_eq!(a.name, "root");
        assert!(a.groups.contains(&0));
        assert!(is_admin(0, None));
    }

    #[test]
    fn unknown_uid() {
        assert!(matches!(account(4_000_000_000), Err(UserError::NoSuchUid(_))));
        assert!(!is_admin(4_000_000_000, Some("root")));
    }
}
