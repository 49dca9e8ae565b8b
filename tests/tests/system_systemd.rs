//! System test under real systemd (tests/system/systemd-deb.sh): boots systemd as PID 1 in a
//! container (tests/system/nspawn.sh), installs the .deb and checks start/READY, a user's
//! job file, the journal, restart and upgrade with a running job, a broken reload, the
//! watchdog, stop, a user's own `systemctl --user enable --now cybd` (lingering), remove
//! and purge. Needs root, systemd-nspawn, debootstrap and nsenter; CI installs them and
//! builds the .deb first (CYB_DEB); otherwise this test builds it with packaging/build.sh
//! in the workspace's target directory, reusing its release build.

use std::path::PathBuf;
use std::process::Command;

use cyb_tests::{build_packages, have, is_root, require, run_script};

#[test]
fn deb_under_real_systemd() {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if !require(is_root(), "root (to boot a container)")
        || !require(
            have("systemd-nspawn") && have("debootstrap") && have("nsenter"),
            "systemd-nspawn, debootstrap and nsenter (apt-get install systemd-container debootstrap util-linux)",
        )
    {
        return;
    }
    let deb = match std::env::var_os("CYB_DEB") {
        Some(d) => PathBuf::from(d),
        None => build_packages().1,
    };
    run_script(
        Command::new("bash")
            .arg(top.join("tests/system/systemd-deb.sh"))
            .env("CYB_DEB", deb),
        "the systemd system test",
        "all checks passed",
    );
}
