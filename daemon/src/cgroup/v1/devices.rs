//! v1 `devices`: `a` written to `devices.deny`, then one `devices.allow` write per rule
//! (the BPF filter that does the same on the unified hierarchy is in `v2/devices.rs`).

use std::path::Path;

use crate::cgroup::DeviceRule;
use crate::cgroup::fsio::{FileWrite, put};

/// The v1 `devices` writes that confine a cgroup to `rules`, in order: `(file, value)`,
/// each value one write(2).
pub(in crate::cgroup) fn v1_writes(rules: &[DeviceRule]) -> Vec<(&'static str, String)> {
    let mut w = vec![("devices.deny", "a".to_string())];
    w.extend(rules.iter().map(|r| ("devices.allow", r.to_string())));
    w
}

/// [`v1_writes`] as writes to the devices cgroup `dir`.
pub(in crate::cgroup) fn limit_writes(dir: &Path, rules: &[DeviceRule], w: &mut Vec<FileWrite>) {
    for (file, value) in v1_writes(rules) {
        w.push(put(dir, file, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::DeviceAllow;

    #[test]
    fn default_set_and_v1_writes() {
        let allow = DeviceAllow::new(vec!["c 195:0 rw".parse().unwrap()]);
        let w = v1_writes(&allow.effective());
        let text: Vec<String> = w.iter().map(|(f, v)| format!("{f}={v}")).collect();
        assert_eq!(
            text,
            [
                "devices.deny=a",
                "devices.allow=c 1:3 rwm",
                "devices.allow=c 1:5 rwm",
                "devices.allow=c 1:7 rwm",
                "devices.allow=c 1:8 rwm",
                "devices.allow=c 1:9 rwm",
                "devices.allow=c 5:0 rwm",
                "devices.allow=c 5:2 rwm",
                "devices.allow=c 136:* rwm",
                "devices.allow=c 195:0 rw",
            ]
        );
    }
}
