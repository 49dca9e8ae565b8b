//! System test under real systemd (tests/system/systemd-deb.sh): boots systemd as PID 1 in a
//! container, installs the .deb and checks start/READY, a user's job file, the journal,
//! restart and upgrade with a running job, a broken reload, the watchdog, stop, remove and
//! purge. Needs root, systemd-nspawn and debootstrap; CI installs them and builds the .deb
//! first (CYB_DEB); otherwise the script builds it in a target directory of its own.

use std::path::PathBuf;
use std::process::Command;

use cyb_tests::{have, is_root, require, run_script};

#[test]
fn deb_under_real_systemd() {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if !require(is_root(), "root (to boot a container)")
        || !require(
            have("systemd-nspawn") && have("debootstrap"),
            "systemd-nspawn and debootstrap (apt-get install systemd-container debootstrap)",
        )
        || !require(
            top.join("../shared/scripts/nspawn-boot.sh").exists(),
            "../shared/scripts/nspawn-boot.sh",
        )
    {
        return;
    }
    let mut cmd = Command::new("bash");
    cmd.arg(top.join("tests/system/systemd-deb.sh"));
    if std::env::var_os("CYB_DEB").is_none() {
        // A nested cargo build must not wait on the lock of the build running this test.
        cmd.env("CARGO_TARGET_DIR", top.join("target/system-test"));
    }
    run_script(&mut cmd, "the systemd system test", "all checks passed");
}
