#!/usr/bin/env bash
# A Debian 12 container with systemd as its PID 1, for the system tests. Works on hosts
# whose own PID 1 is not systemd (this project's development VMs: hybrid cgroups, no host
# systemd, no machined), so nothing here uses machinectl or the host's systemd.
#
#   nspawn.sh build        make the rootfs with debootstrap, unless it is there (a cache:
#                          kept between runs; about 45 s and 370 MB to make); also installs
#                          into an older rootfs the packages the tests need that it lacks
#   nspawn.sh start        boot the rootfs; returns once systemd says the boot is done
#   nspawn.sh exec CMD...  run CMD inside, in all the container's namespaces, as root
#   nspawn.sh root         print the container's / as the host sees it (/proc/PID/root)
#   nspawn.sh stop         power the container off and remove the cgroups made for it
#
# The container runs on a throw-away overlay of the rootfs (--volatile=overlay): what a
# test installs or changes inside is gone at `stop`, so every boot starts from the same
# rootfs, and a run that was killed leaves nothing in it for the next.
#
# Env: CYB_ROOTFS  the rootfs (default /var/tmp/cyb-rootfs)
#      CYB_MACHINE the container's name and hostname (default cybsys)
#      CYB_MIRROR  the Debian mirror (default: the one this host's apt uses)
# Needs root, systemd-nspawn (systemd-container), debootstrap and nsenter (util-linux).
#
# cgroups: systemd-nspawn without a host systemd mounts the v1 controller hierarchies
# read-only into the container, so the systemd inside could not set a unit's memory or
# pids limit nor let a Delegate=yes service (cybd) make job cgroups. Instead, for every v1
# controller, a cgroup of our own is made on the host and bind-mounted read-write where the
# container sees that controller; the launcher process is moved into those cgroups first,
# so the container's cgroup namespace is rooted there too and the paths agree. The unified
# and name=systemd hierarchies are left to nspawn. `stop` removes those cgroups again.
set -euo pipefail

ROOTFS=${CYB_ROOTFS:-/var/tmp/cyb-rootfs}
MACHINE=${CYB_MACHINE:-cybsys}
STATE=/run/cyb-nspawn/$MACHINE # pid file and console log while it runs
CGROUP=cyb-nspawn-$MACHINE     # the host cgroup (in each hierarchy) the container lives in
# What the tests use inside: jq reads results; libpam-systemd gives user@.service its
# logind session (user units, lingering).
PACKAGES=(systemd systemd-sysv dbus libpam-systemd procps jq)

die() {
    echo "nspawn.sh: $*" >&2
    exit 1
}

mirror() {
    if [ -n "${CYB_MIRROR:-}" ]; then
        echo "$CYB_MIRROR"
        return
    fi
    local m=""
    [ -r /etc/apt/sources.list.d/debian.sources ] &&
        m=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources | head -n1)
    [ -z "$m" ] && [ -r /etc/apt/sources.list ] &&
        m=$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit }' /etc/apt/sources.list)
    echo "${m:-http://deb.debian.org/debian}"
}

# Every cgroup hierarchy mounted under /sys/fs/cgroup, as "type mountpoint".
hierarchies() {
    awk '($3 == "cgroup" || $3 == "cgroup2") && $2 ~ "^/sys/fs/cgroup" { print $3, $2 }' /proc/self/mounts
}

# The container's PID 1 as the host sees it: the child of systemd-nspawn that runs systemd
# (nspawn forks once more before it execs the container's init).
init_pid() {
    local launcher child
    launcher=$(cat "$STATE/nspawn.pid" 2>/dev/null) || return 1
    for child in $(cat /proc/"$launcher"/task/*/children 2>/dev/null); do
        if [ "$(cat /proc/"$child"/comm 2>/dev/null)" = systemd ]; then
            echo "$child"
            return 0
        fi
    done
    return 1
}

running() {
    local p
    p=$(cat "$STATE/nspawn.pid" 2>/dev/null) && kill -0 "$p" 2>/dev/null
}

build() {
    if [ ! -x "$ROOTFS/lib/systemd/systemd" ]; then
        command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
        local m
        m=$(mirror)
        echo "nspawn.sh: debootstrap bookworm into $ROOTFS from $m" >&2
        rm -rf "$ROOTFS.partial"
        debootstrap --variant=minbase --include="$(
            IFS=,
            echo "${PACKAGES[*]}"
        )" bookworm "$ROOTFS.partial" "$m" >&2
        # Renamed into place only when whole, so an interrupted build is not taken as done.
        mv "$ROOTFS.partial" "$ROOTFS"
        return
    fi
    # A rootfs made before a package was added to PACKAGES: add what it lacks.
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        chroot "$ROOTFS" dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        running && die "the container runs: stop it before adding packages to its rootfs"
        echo "nspawn.sh: installing ${missing[*]} into $ROOTFS" >&2
        cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
        chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive sh -c \
            "apt-get update -q && apt-get install -y -q --no-install-recommends ${missing[*]}" >&2
    fi
}

start() {
    [ -x "$ROOTFS/lib/systemd/systemd" ] || die "no rootfs at $ROOTFS: run '$0 build' first"
    running && die "container $MACHINE already runs (pid $(cat "$STATE/nspawn.pid")): '$0 stop' first"
    mkdir -p "$STATE"
    local binds=(--tmpfs=/sys/fs/cgroup:mode=755) type mnt
    while read -r type mnt; do
        mkdir -p "$mnt/$CGROUP"
        [ "$type" = cgroup ] || continue
        [ "$mnt" = /sys/fs/cgroup/systemd ] && continue # name=systemd: nspawn's own
        if [ -e "$mnt/cpuset.cpus" ]; then
            # A v1 cpuset cgroup takes no process until it has CPUs and memory nodes.
            cat "$mnt/cpuset.cpus" >"$mnt/$CGROUP/cpuset.cpus"
            cat "$mnt/cpuset.mems" >"$mnt/$CGROUP/cpuset.mems"
        fi
        binds+=(--bind="$mnt/$CGROUP:$mnt")
    done < <(hierarchies)
    (
        # Into our cgroups first: nspawn and the container follow, and the container's
        # cgroup namespace is rooted there, where the bind mounts point.
        while read -r _ mnt; do echo "$BASHPID" >"$mnt/$CGROUP/cgroup.procs"; done < <(hierarchies)
        exec setsid systemd-nspawn --quiet --directory="$ROOTFS" --machine="$MACHINE" \
            --boot --register=no --keep-unit --console=read-only --volatile=overlay "${binds[@]}"
    ) >"$STATE/console.log" 2>&1 </dev/null &
    echo $! >"$STATE/nspawn.pid"
    local deadline=$((SECONDS + 60)) pid state=""
    while [ $SECONDS -lt $deadline ]; do
        running || {
            cat "$STATE/console.log" >&2
            die "systemd-nspawn exited while booting (its output is above)"
        }
        if pid=$(init_pid); then
            # "offline" until systemd listens; then --wait returns when the boot is done.
            state=$(timeout 30 nsenter -t "$pid" -a systemctl is-system-running --wait 2>/dev/null || true)
            case "$state" in running | degraded) break ;; esac
        fi
        sleep 0.1
    done
    case "$state" in
        running) ;;
        degraded) echo "nspawn.sh: $MACHINE booted degraded: $(nsenter -t "$pid" -a systemctl --failed --no-legend --plain | tr '\n' ' ')" >&2 ;;
        *) die "container $MACHINE did not finish booting within 60 s (state '$state'; console: $STATE/console.log)" ;;
    esac
    echo "nspawn.sh: $MACHINE is up (init is host pid $pid)" >&2
}

stop() {
    local p
    if p=$(cat "$STATE/nspawn.pid" 2>/dev/null) && kill -0 "$p" 2>/dev/null; then
        # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: a clean poweroff.
        kill -TERM "$p"
        local deadline=$((SECONDS + 30))
        while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
            # A zombie has exited; its parent (our caller's shell) may not reap it soon.
            [ "$(awk '/^State:/ { print $2 }' /proc/"$p"/status 2>/dev/null)" = Z ] && break
            sleep 0.1
        done
        if kill -0 "$p" 2>/dev/null && [ "$(awk '/^State:/ { print $2 }' /proc/"$p"/status 2>/dev/null)" != Z ]; then
            echo "nspawn.sh: $MACHINE did not power off within 30 s: killing it" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
    fi
    rm -rf "$STATE"
    rmdir /run/cyb-nspawn 2>/dev/null || true
    local _ mnt left=0
    while read -r _ mnt; do
        [ -d "$mnt/$CGROUP" ] || continue
        # Deepest first; a cgroup whose processes are still exiting needs a moment.
        local i
        for i in 1 2 3 4 5 6 7 8 9 10; do
            find "$mnt/$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "$mnt/$CGROUP" ] || break
            sleep 0.2
        done
        [ -d "$mnt/$CGROUP" ] && { echo "nspawn.sh: cannot remove $mnt/$CGROUP" >&2; left=1; }
    done < <(hierarchies)
    return $left
}

[ "$(id -u)" = 0 ] || die "must run as root"
case "${1:-}" in
    build) build ;;
    start) start ;;
    exec)
        shift
        pid=$(init_pid) || die "container $MACHINE is not running"
        exec nsenter -t "$pid" -a "$@"
        ;;
    root)
        pid=$(init_pid) || die "container $MACHINE is not running"
        echo "/proc/$pid/root"
        ;;
    stop) stop ;;
    *)
        sed -n '2,21s/^# \{0,1\}//p' "$0" >&2
        exit 2
        ;;
esac
