#!/usr/bin/env bash
# Builds the cybd .deb and .rpm from this workspace:
#   1. release binaries (cargo build --release -p cybd -p cybctl);
#   2. into target/packaging/: stripped copies of the binaries (for the .rpm), man
#      pages (gzipped) and bash/zsh/fish completions, written by the binaries' hidden
#      `generate-docs` subcommand;
#   3. cargo-deb and cargo-generate-rpm, installed at the pinned versions if missing;
#   4. target/debian/cybd_<version>-1_<arch>.deb and
#      target/generate-rpm/cybd-<version>-1.<arch>.rpm, whose paths it prints last.
# Needs only the Rust toolchain on Debian 12; as root it apt-installs dpkg-dev (for
# dpkg-shlibdeps, which computes the .deb's Depends) when that is missing.
# The package metadata: [package.metadata.deb] and [package.metadata.generate-rpm] in
# daemon/Cargo.toml. See packaging/README.md.
set -euo pipefail

# cargo-deb 2.12.1, the last 2.x: installs units into /lib/systemd/system (where
# Debian 12's debhelper puts them) and leaves sysusers.d to our postinst, which falls
# back to addgroup without systemd-sysusers. cargo-deb 3.x moves units to
# /usr/lib/systemd/system and adds an unconditional `systemd-sysusers` call.
CARGO_DEB_VERSION=2.12.1
CARGO_GENERATE_RPM_VERSION=0.21.1

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# cargo-deb and cargo-generate-rpm map the target/release/ of an asset to cargo's real
# target directory (CARGO_TARGET_DIR), but daemon/Cargo.toml names target/packaging/
# literally: it is always <workspace>/target/packaging.
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=$root/target/packaging

log() { printf '==> %s\n' "$*" >&2; }

# dpkg-shlibdeps (dpkg-dev) gives the .deb its libc6 dependency; without it cargo-deb
# would build a package with no Depends at all.
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing dpkg-dev (dpkg-shlibdeps)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends dpkg-dev
    else
        echo "build.sh: dpkg-shlibdeps not found: install dpkg-dev" >&2
        exit 1
    fi
fi

# The tools, at pinned versions. `cargo install` is a no-op when that version is there.
have_version() { # command, version
    "$1" --version 2>/dev/null | grep -qw -- "$2"
}
if ! have_version cargo-deb "$CARGO_DEB_VERSION"; then
    log "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked --force cargo-deb --version "=$CARGO_DEB_VERSION"
fi
if ! have_version cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"; then
    log "installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
    cargo install --locked --force cargo-generate-rpm --version "=$CARGO_GENERATE_RPM_VERSION"
fi

log "building release binaries"
cargo build --release -p cybd -p cybctl
bin=$target_dir/release

log "generating man pages and completions into $out"
rm -rf "$out"
mkdir -p "$out/bin"
# cargo-deb strips the binaries it packages; cargo-generate-rpm does not, so the .rpm
# takes stripped copies from target/packaging/bin/ (cargo's own binaries in
# target/release/ keep their symbols, for backtraces and profilers).
strip --strip-unneeded -o "$out/bin/cybd" "$bin/cybd"
strip --strip-unneeded -o "$out/bin/cybctl" "$bin/cybctl"
"$bin/cybd" generate-docs --out "$out"
"$bin/cybctl" generate-docs --out "$out"
for f in cybd.8 cybd.bash _cybd cybd.fish cybctl.1 cybctl.bash _cybctl cybctl.fish; do
    if [ ! -s "$out/$f" ]; then
        echo "build.sh: generate-docs did not write $out/$f" >&2
        exit 1
    fi
done
# -n: no name or time stamp in the gzip header, so the packages are reproducible.
gzip -9nf "$out/cybd.8" "$out/cybctl.1"

# The .deb's changelog must describe this version.
pkgid=$(cargo pkgid -p cybd) # path+file:///…/daemon#cybd@0.1.0
version=${pkgid##*[#@]}
if [ -z "$version" ]; then
    echo "build.sh: cannot read the version of the cybd package" >&2
    exit 1
fi
changelog_version=$(sed -n '1s/^cybd (\([^)]*\)).*/\1/p' packaging/deb/changelog)
if [ "$changelog_version" != "$version-1" ]; then
    echo "build.sh: packaging/deb/changelog starts with $changelog_version, the package is $version-1:" >&2
    echo "          add a changelog entry for $version-1" >&2
    exit 1
fi

log "building the .deb"
rm -f "$target_dir"/debian/cybd_*.deb
# cargo-deb warns about every asset under ../target/packaging/ that it is not under
# target/release/ (so it will not try to build it): true, and meant; drop that warning.
cargo deb -p cybd --no-build \
    2> >(grep -v "Only source paths starting with exactly 'target/release/'" >&2) >&2
deb=$(ls "$target_dir"/debian/cybd_"$version"-1_*.deb)

log "building the .rpm"
rm -f "$target_dir"/generate-rpm/cybd-*.rpm
cargo generate-rpm -p daemon >&2
rpm=$(ls "$target_dir"/generate-rpm/cybd-"$version"-1.*.rpm)

echo "$deb"
echo "$rpm"
