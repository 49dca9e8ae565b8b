#!/usr/bin/env bash
# Lints systemd unit files with `systemd-analyze verify`. That command exits 0 after
# warning about an unknown key, a bad value or a missing ExecStart= binary, so here any
# line it prints is a failure. Works without a running systemd (it loads the units into a
# throw-away manager of its own).
#
# Usage: unit-lint.sh [--user] [--root=DIR] UNIT-FILE...
#   --user      lint as units of a user manager (systemd-analyze --user; it needs an
#               XDG_RUNTIME_DIR, so a temporary one is made when that is unset)
#   --root=DIR  resolve ExecStart= binaries and unit dependencies under DIR (a rootfs);
#               systemd 252 cannot combine it with --user: lint user units where the
#               binaries are installed (the system test does it inside its container)
# Exits 0 when every unit verifies silently; otherwise prints what systemd-analyze said.
set -uo pipefail
args=(verify --man=no)
user=no root=no
while [ $# -gt 0 ]; do
    case "$1" in
        --user) args=(--user "${args[@]}") user=yes ;;
        --root=*) args+=("$1") root=yes ;;
        -*) echo "unit-lint.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
[ $# -gt 0 ] || { echo "usage: unit-lint.sh [--user] [--root=DIR] UNIT-FILE..." >&2; exit 2; }
if [ $user = yes ] && [ $root = yes ]; then
    echo "unit-lint.sh: --user and --root cannot be combined (systemd-analyze refuses it)" >&2
    exit 2
fi
if [ $user = yes ] && [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
    trap 'rm -rf "$XDG_RUNTIME_DIR"' EXIT
fi
out=$(systemd-analyze "${args[@]}" "$@" 2>&1)
rc=$?
if [ $rc -ne 0 ] || [ -n "$out" ]; then
    printf 'unit-lint.sh: systemd-analyze %s %s (exit %d):\n%s\n' "${args[*]}" "$*" "$rc" "$out" >&2
    exit 1
fi
