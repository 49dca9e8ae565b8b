//! The .deb and .rpm: packaging/check.sh runs lintian (no errors, only the warnings listed
//! in packaging/README.md), `rpm -qip`/`rpm -qlp`, and checks that both packages hold the
//! binaries, units, tmpfiles.d/sysusers.d files, the config as a conffile, completions and
//! man pages. CI builds the packages first (packaging/build.sh) and says where
//! (CYB_PACKAGES_TARGET_DIR); otherwise this test runs build.sh on the workspace's own
//! target directory, so its release build is the one `cargo build --release` makes (and
//! reuses), not a second one.

use std::path::PathBuf;
use std::process::Command;

use cyb_tests::{build_packages, have, is_root, require, run_script};

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
    let target = match std::env::var_os("CYB_PACKAGES_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => build_packages().0,
    };
    run_script(
        Command::new("bash")
            .arg(top.join("packaging/check.sh"))
            .env("CARGO_TARGET_DIR", &target),
        "check.sh",
        "check.sh: OK",
    );
}
