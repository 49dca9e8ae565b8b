//! The .deb and .rpm: packaging/check.sh runs lintian (no errors, only the warnings listed
//! in packaging/README.md), `rpm -qip`/`rpm -qlp`, and checks that both packages hold the
//! binaries, units, tmpfiles.d/sysusers.d files, the config as a conffile, completions and
//! man pages. CI builds the packages first (packaging/build.sh); otherwise this test builds
//! them in a target directory of its own.

use std::path::PathBuf;
use std::process::Command;

use cyb_tests::{have, is_root, require, run_script};

#[test]
fn packages_pass_lintian_and_hold_every_file() {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // check.sh installs lintian and rpm itself, as root.
    if !require(
        is_root() || (have("lintian") && have("rpm")),
        "root, or lintian and rpm installed",
    ) {
        return;
    }
    let target = std::env::var_os("CYB_PACKAGES_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| top.join("target/packages-test"));
    if std::env::var_os("CYB_PACKAGES_TARGET_DIR").is_none() {
        let out = Command::new("bash")
            .arg(top.join("packaging/build.sh"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run build.sh");
        assert!(
            out.status.success(),
            "build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run_script(
        Command::new("bash")
            .arg(top.join("packaging/check.sh"))
            .env("CARGO_TARGET_DIR", &target),
        "check.sh",
        "check.sh: OK",
    );
}
