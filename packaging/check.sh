#!/usr/bin/env bash
# The patterns below look for a literal "$1", "$DPKG_ROOT" and the like in the scripts.
# shellcheck disable=SC2016
# Checks the packages that packaging/build.sh made (run build.sh first):
#   - lintian on the .deb: no error, and no warning other than those listed (with
#     their reasons) in packaging/README.md and in LINTIAN_KEPT_WARNINGS below;
#   - rpm -qip and rpm -qlp on the .rpm;
#   - both packages hold every expected file; /etc/cyb/cybd.toml is a conffile /
#     %config(noreplace); man pages are gzipped; the maintainer scripts do what
#     packaging/README.md says.
# Exits non-zero on the first package that fails, after printing every problem.
# As root it apt-installs lintian, rpm and rpm2cpio when they are missing.
set -euo pipefail

# Warnings kept on purpose; each is explained in packaging/README.md.
LINTIAN_KEPT_WARNINGS=(
    initial-upload-closes-no-bugs
)

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}

need=()
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v rpm >/dev/null 2>&1 || need+=(rpm)
command -v rpm2archive >/dev/null 2>&1 || need+=(rpm2cpio)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "check.sh: missing ${need[*]}: apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

newest() { # glob: the newest matching file
    # shellcheck disable=SC2012,SC2086
    ls -t $1 2>/dev/null | head -n1
}
deb=$(newest "$target_dir/debian/cybd_*.deb")
rpm=$(newest "$target_dir/generate-rpm/cybd-*.rpm")
if [ -z "$deb" ] || [ -z "$rpm" ]; then
    echo "check.sh: no cybd .deb or .rpm under $target_dir: run packaging/build.sh first" >&2
    exit 1
fi

failures=0
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    failures=$((failures + 1))
}
section() { printf '\n=== %s\n' "$*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The files both packages must install. The system units are the one difference: the
# .deb puts them in /lib/systemd/system (Debian 12), the .rpm in /usr/lib/systemd/system;
# both put the user unit in /usr/lib/systemd/user.
common_files=(
    /usr/bin/cybd
    /usr/bin/cybctl
    /etc/cyb/cybd.toml
    /usr/lib/systemd/user/cybd.service
    /usr/lib/tmpfiles.d/cybd.conf
    /usr/lib/sysusers.d/cybd.conf
    /usr/share/bash-completion/completions/cybctl
    /usr/share/bash-completion/completions/cybd
    /usr/share/zsh/vendor-completions/_cybctl
    /usr/share/zsh/vendor-completions/_cybd
    /usr/share/fish/vendor_completions.d/cybctl.fish
    /usr/share/fish/vendor_completions.d/cybd.fish
    /usr/share/man/man1/cybctl.1.gz
    /usr/share/man/man8/cybd.8.gz
    /usr/share/doc/cybd/README.md
    /usr/share/doc/cybd/job-spec.md
    /usr/share/doc/cybd/examples/hello.json
)
deb_files=(
    "${common_files[@]}"
    /lib/systemd/system/cybd.service
    /lib/systemd/system/cybd.socket
    /usr/share/doc/cybd/copyright
    /usr/share/doc/cybd/changelog.Debian.gz
)
rpm_files=(
    "${common_files[@]}"
    /usr/lib/systemd/system/cybd.service
    /usr/lib/systemd/system/cybd.socket
    /usr/lib/systemd/system-preset/80-cybd.preset
    /usr/share/zsh/site-functions/_cybctl
    /usr/share/zsh/site-functions/_cybd
    /usr/share/licenses/cybd/copyright
)

expect_files() { # label, listing file, expected paths...
    local label=$1 listing=$2 f
    shift 2
    for f in "$@"; do
        grep -qxF -- "$f" "$listing" || fail "$label: $f is not in the package"
    done
}
expect_in() { # label, file, fixed string: the file must contain the string
    grep -qF -- "$3" "$2" || fail "$1: does not contain: $3"
}
expect_not_in() { # label, file, extended regexp: no line may match
    if grep -qE -- "$3" "$2"; then fail "$1: must not match: $3"; fi
}

# ---------------------------------------------------------------- .deb
section "lintian $deb"
set +e
lintian --info --display-info --tag-display-limit 0 "$deb" >"$work/lintian.out" 2>&1
lintian_rc=$?
set -e
cat "$work/lintian.out"
if [ ! -s "$work/lintian.out" ]; then
    echo "(lintian reported nothing)"
fi
if grep -q '^E: ' "$work/lintian.out"; then
    fail "lintian reports errors"
elif [ "$lintian_rc" -ne 0 ]; then
    fail "lintian exited with $lintian_rc"
fi
while read -r tag; do
    kept=no
    for allowed in "${LINTIAN_KEPT_WARNINGS[@]}"; do
        [ "$tag" = "$allowed" ] && kept=yes
    done
    [ "$kept" = yes ] || fail "lintian warning $tag is not among the kept warnings (packaging/README.md)"
done < <(sed -n 's/^W: [^:]*: \([^ ]*\).*/\1/p' "$work/lintian.out" | sort -u)

section "dpkg-deb -I $deb"
dpkg-deb -I "$deb"

section "dpkg-deb -c $deb"
dpkg-deb -c "$deb" | tee "$work/deb.contents"
# "./usr/bin/cybd" or "usr/bin/cybd" -> "/usr/bin/cybd".
awk '{print $6}' "$work/deb.contents" | sed 's|^\./||; s|^|/|; s|/$||' >"$work/deb.files"
expect_files .deb "$work/deb.files" "${deb_files[@]}"

mkdir -p "$work/deb/root" "$work/deb/control"
dpkg-deb -x "$deb" "$work/deb/root"
dpkg-deb -e "$deb" "$work/deb/control"
c=$work/deb/control
expect_in ".deb conffiles" "$c/conffiles" /etc/cyb/cybd.toml
expect_in ".deb control" "$c/control" "Depends: libc6"
for s in postinst prerm postrm; do
    if [ ! -x "$c/$s" ]; then
        fail ".deb: no executable $s"
        continue
    fi
    sh -n "$c/$s" || fail ".deb $s: shell syntax error"
    expect_not_in ".deb $s" "$c/$s" '#DEBHELPER#'
done
expect_in ".deb postinst" "$c/postinst" 'systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} cybd.conf'
expect_in ".deb postinst" "$c/postinst" 'addgroup --system cybadm'
expect_in ".deb postinst" "$c/postinst" 'systemd-tmpfiles --create cybd.conf'
expect_in ".deb postinst" "$c/postinst" 'deb-systemd-helper enable cybd.service'
expect_in ".deb postinst" "$c/postinst" 'deb-systemd-helper enable cybd.socket'
expect_in ".deb postinst" "$c/postinst" '_dh_action=restart'
expect_in ".deb postinst" "$c/postinst" 'deb-systemd-invoke $_dh_action cybd.service cybd.socket'
# Each snippet once, in order: set -e, sysusers, tmpfiles, then the units. Comment
# lines do not count: *.code is each script without them.
for s in postinst prerm postrm; do
    grep -vE '^[[:space:]]*#' "$c/$s" >"$c/$s.code" || true
done
line_of() { # file, extended regexp: the number of the first matching line, or 0
    grep -nE -m1 -- "$2" "$1" | cut -d: -f1 | grep . || echo 0
}
expect_once() { # label, file, extended regexp
    local n
    n=$(grep -cE -- "$3" "$2" || true)
    [ "$n" -eq 1 ] || fail "$1: expected once, found $n times: $3"
}
expect_order() { # label, file, extended regexps in the order they must come
    local label=$1 file=$2 prev=0 prev_re="(start)" re n
    shift 2
    for re in "$@"; do
        n=$(line_of "$file" "$re")
        if [ "$n" -eq 0 ] || [ "$n" -le "$prev" ]; then
            fail "$label: '$re' (line $n) must come after '$prev_re' (line $prev)"
        fi
        prev=$n prev_re=$re
    done
}
for re in '^set -e' 'systemd-sysusers \$' 'systemd-tmpfiles --create' \
    'deb-systemd-helper enable cybd.service' 'deb-systemd-invoke \$_dh_action'; do
    expect_once ".deb postinst" "$c/postinst.code" "$re"
done
expect_order ".deb postinst" "$c/postinst.code" '^set -e' 'systemd-sysusers \$' \
    'systemd-tmpfiles --create' 'deb-systemd-helper enable cybd.service' \
    'deb-systemd-invoke \$_dh_action'
for s in prerm postrm; do
    expect_once ".deb $s" "$c/$s.code" '^set -e'
    expect_order ".deb $s" "$c/$s.code" '^set -e' 'deb-systemd-(invoke|helper)'
done
expect_once ".deb prerm" "$c/prerm.code" 'deb-systemd-invoke stop'
expect_once ".deb postrm" "$c/postrm.code" 'deb-systemd-helper purge'
# prerm stops only on remove: an upgrade restarts from the new postinst instead.
expect_in ".deb prerm" "$c/prerm" '[ "$1" = remove ]'
expect_in ".deb prerm" "$c/prerm" 'deb-systemd-invoke stop cybd.service cybd.socket'
expect_in ".deb postrm" "$c/postrm" 'deb-systemd-helper purge cybd.service cybd.socket'
expect_in ".deb postrm" "$c/postrm" 'rm -rf "${DPKG_ROOT:-}/var/spool/cyb" "${DPKG_ROOT:-}/run/cyb"'
expect_not_in ".deb postrm" "$c/postrm" '^[^#]*rm .*/logs'

r=$work/deb/root
for m in usr/share/man/man1/cybctl.1.gz usr/share/man/man8/cybd.8.gz; do
    gzip -t "$r/$m" 2>/dev/null || fail ".deb: $m is not gzip"
done
expect_binaries() { # label, extracted root
    local b
    for b in cybd cybctl; do
        "$2/usr/bin/$b" --help >/dev/null || fail "$1: usr/bin/$b --help fails"
        if readelf -S "$2/usr/bin/$b" | grep -qE '\.symtab|\.debug_'; then
            fail "$1: usr/bin/$b is not stripped"
        fi
    done
}
expect_binaries .deb "$r"
cmp -s "$r/etc/cyb/cybd.toml" "$root/etc/cybd.toml" || fail ".deb: /etc/cyb/cybd.toml differs from etc/cybd.toml"
for u in cybd.service cybd.socket; do
    cmp -s "$r/lib/systemd/system/$u" "$root/systemd/$u" || fail ".deb: $u differs from systemd/$u"
done
cmp -s "$r/usr/lib/systemd/user/cybd.service" "$root/systemd/user/cybd.service" ||
    fail ".deb: the user unit differs from systemd/user/cybd.service"
# The user unit is each user's choice: no maintainer script enables it for anyone.
expect_not_in ".deb postinst" "$c/postinst" '--global|--user'

# ---------------------------------------------------------------- .rpm
section "rpm -qip $rpm"
rpm -qip "$rpm"

section "rpm -qlp $rpm"
rpm -qlp "$rpm" | tee "$work/rpm.files"
expect_files .rpm "$work/rpm.files" "${rpm_files[@]}"

section "rpm -qp --configfiles / --requires / --scripts $rpm"
rpm -qp --configfiles "$rpm" | tee "$work/rpm.config"
expect_in ".rpm config files" "$work/rpm.config" /etc/cyb/cybd.toml
# %config(noreplace): flags c (config) and n (noreplace).
flags=$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm" | awk '$2 == "/etc/cyb/cybd.toml" {print $1}')
case "$flags" in
    *c*n* | *n*c*) ;;
    *) fail ".rpm: /etc/cyb/cybd.toml has flags '$flags', expected %config(noreplace)" ;;
esac
rpm -qp --requires "$rpm"
rpm -qp --scripts "$rpm" | tee "$work/rpm.scripts"
s=$work/rpm.scripts
# cargo-generate-rpm takes a script path that does not exist as the script's text:
# make sure the real scripts are in.
expect_in ".rpm %post" "$s" 'systemd-sysusers cybd.conf'
expect_in ".rpm %post" "$s" 'groupadd -r cybadm'
expect_in ".rpm %post" "$s" 'systemd-tmpfiles --create cybd.conf'
expect_in ".rpm %post" "$s" 'systemctl --no-reload preset cybd.socket cybd.service'
expect_in ".rpm %preun" "$s" 'systemctl --no-reload disable --now cybd.socket cybd.service'
expect_in ".rpm %postun" "$s" 'systemctl try-restart cybd.service'
# No macro may be left outside comments: rpm would run it as it is.
expect_not_in ".rpm scripts" "$s" '^[^#]*%'
expect_not_in ".rpm scripts" "$s" '^[^#]*rm .*/logs'

mkdir -p "$work/rpm/root"
rpm2archive - <"$rpm" | tar -xzf - -C "$work/rpm/root"
r=$work/rpm/root
for m in usr/share/man/man1/cybctl.1.gz usr/share/man/man8/cybd.8.gz; do
    gzip -t "$r/$m" 2>/dev/null || fail ".rpm: $m is not gzip"
done
expect_binaries .rpm "$r"
for u in cybd.service cybd.socket; do
    cmp -s "$r/usr/lib/systemd/system/$u" "$root/systemd/$u" || fail ".rpm: $u differs from systemd/$u"
done
cmp -s "$r/usr/lib/systemd/user/cybd.service" "$root/systemd/user/cybd.service" ||
    fail ".rpm: the user unit differs from systemd/user/cybd.service"
expect_not_in ".rpm scripts" "$s" '--global|--user'

echo
if [ "$failures" -ne 0 ]; then
    echo "check.sh: $failures problem(s) in $deb / $rpm" >&2
    exit 1
fi
echo "check.sh: OK: $deb $rpm"
