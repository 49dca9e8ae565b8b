#!/usr/bin/env bash
# Brings up a real Docker engine for the tests that drive cybd's Docker backend, on a
# host whose PID 1 is not systemd (so no docker.service): Debian's docker.io started by
# hand, with local test images (no registry is reachable, so nothing is ever pulled).
#
#   docker.sh up      install what is missing, start dockerd (if it is not running yet),
#                     import the test images; prints the status
#   docker.sh down    kill running containers, stop the dockerd this script started and
#                     wait until its containerd and shims are gone
#   docker.sh status  exit 0 if the engine answers /_ping (prints its versions), 3 if not
#
# The engine listens on the default socket, so `docker` and API clients find it unaided.
# It is started with a test double of the NVIDIA container toolkit (this host has no
# GPU): see install_nvidia_double.
#
# Knobs: CYB_DOCKER_STORAGE (overlay2|vfs; default: overlay2, then vfs),
# CYB_DOCKER_NET (bridge|none; default: bridge, then none), CYB_DOCKER_TIMEOUT (seconds
# to wait for the engine to answer; default 60).
set -euo pipefail

STATE=/var/lib/cyb-test/docker
SOCK=/var/run/docker.sock
PIDFILE=/run/cyb-test-dockerd.pid
LOG=$STATE/dockerd.log
LOCK=$STATE/script.lock
DATA_ROOT=/var/lib/docker
# dockerd 20.10 starts its own containerd and writes its pid here.
CONTAINERD_PIDFILE=/var/run/docker/containerd/containerd.pid
CONTAINERD_SOCK=/var/run/docker/containerd/containerd.sock
# The NVIDIA test double lives apart from everything real, in a directory of its own.
NVIDIA_DOUBLE=/var/lib/cyb-test/nvidia-double
TIMEOUT=${CYB_DOCKER_TIMEOUT:-60}

# The test images, all from one busybox-static root file system.
IMAGE=cyb-test:busybox
IMAGE_ROOT_USER=cyb-test:root-user
IMAGE_OTHER=cyb-other/busybox:1

export DEBIAN_FRONTEND=noninteractive

log() { printf 'docker.sh: %s\n' "$*" >&2; }
fail() {
  log "error: $*"
  exit 1
}

dk() { /usr/bin/docker -H "unix://$SOCK" "$@"; }

answers() {
  [ -S "$SOCK" ] || return 1
  [ "$(curl -fsS --max-time 3 --unix-socket "$SOCK" http://localhost/_ping 2>/dev/null)" = OK ]
}

# Whether process $1 runs: exists and is no zombie. PID 1 here is not an init that
# reaps at once, so a killed dockerd can linger as a zombie whose /proc entry remains.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# The pid of the dockerd this script started, if it still runs.
our_dockerd() {
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(tr -cd '0-9' <"$PIDFILE")
  [ -n "$pid" ] && alive "$pid" || return 1
  [ "$(readlink "/proc/$pid/exe")" = /usr/sbin/dockerd ] || return 1
  printf '%s\n' "$pid"
}

# Waits up to $2 seconds for process $1 to end; false if it is still there.
await_exit() {
  local pid=$1 deadline=$((SECONDS + $2))
  while alive "$pid"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

apt_install() {
  log "installing $*"
  if ! apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@" >>"$STATE/apt.log" 2>&1; then
    log "apt-get install failed; updating the package lists and trying again"
    apt-get -o DPkg::Lock::Timeout=300 update -q >>"$STATE/apt.log" 2>&1 ||
      fail "apt-get update failed (see $STATE/apt.log)"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@" >>"$STATE/apt.log" 2>&1 ||
      fail "apt-get install $* failed (see $STATE/apt.log)"
  fi
}

install_missing() {
  local need=()
  [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need+=(docker.io)
  # The images need a static busybox: it runs with nothing else in the root file system.
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
  # docker-init, the init of `docker run --init` (HostConfig.Init), is tini on Debian.
  [ -x /usr/bin/docker-init ] || need+=(tini)
  command -v curl >/dev/null || need+=(curl)
  if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}"; fi
  [ -x /usr/sbin/dockerd ] || fail "no /usr/sbin/dockerd after installing docker.io"
  [ -x /usr/bin/docker-init ] || fail "no /usr/bin/docker-init after installing tini"
}

# A stand-in for nvidia-container-runtime-hook, the NVIDIA toolkit's OCI prestart hook.
# dockerd 20.10 registers its built-in "nvidia" device driver (DeviceRequests, `--gpus`)
# only if an executable of that name is on its PATH when it starts; the driver then puts
# NVIDIA_VISIBLE_DEVICES in the container's environment and adds the hook. The real hook
# would mount the GPUs; this one only logs which devices the container was given.
install_nvidia_double() {
  mkdir -p "$NVIDIA_DOUBLE/bin"
  local hook=$NVIDIA_DOUBLE/bin/nvidia-container-runtime-hook
  cat >"$hook.new" <<EOF
#!/bin/sh
# TEST DOUBLE, installed by cybd's tests/system/docker.sh: NOT the NVIDIA container
# toolkit. runc runs it as a prestart hook with the container's OCI state on stdin; it
# appends the NVIDIA_VISIBLE_DEVICES of the bundle's config.json to
# $NVIDIA_DOUBLE/hook.log and lets the container start.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
state=\$(cat)
bundle=\$(printf '%s' "\$state" | sed -n 's/.*"bundle": *"\\([^"]*\\)".*/\\1/p')
devices=
if [ -n "\$bundle" ] && [ -r "\$bundle/config.json" ]; then
  devices=\$(grep -o 'NVIDIA_VISIBLE_DEVICES=[^"]*' "\$bundle/config.json" | head -n 1)
fi
printf '%s %s %s\n' "\$(date -u +%FT%TZ)" "\${bundle:-no-bundle}" "\${devices:-NVIDIA_VISIBLE_DEVICES=}" >>$NVIDIA_DOUBLE/hook.log
exit 0
EOF
  chmod 755 "$hook.new"
  mv "$hook.new" "$hook"
}

# Starts dockerd with storage driver $1 and network mode $2 (bridge|none); true once it
# answers, false (and it is stopped) if it exits or does not answer in time.
start_dockerd() {
  local storage=$1 net=$2 pid deadline
  local args=(--pidfile "$PIDFILE" -H "unix://$SOCK" --data-root "$DATA_ROOT"
    --storage-driver "$storage" --add-runtime "nvidia=/usr/sbin/runc")
  if [ "$net" = none ]; then args+=(--bridge=none --iptables=false); fi
  printf '\n--- %s: dockerd %s\n' "$(date -u +%FT%TZ)" "${args[*]}" >>"$LOG"
  log "starting dockerd $storage/$net (log $LOG)"
  rm -f "$PIDFILE"
  # A session of its own, so it outlives this script and its caller's terminal or job;
  # the lock's descriptor closed, so the engine does not hold the lock.
  PATH="$NVIDIA_DOUBLE/bin:$PATH" setsid /usr/sbin/dockerd "${args[@]}" \
    </dev/null >>"$LOG" 2>&1 9>&- &
  pid=$!
  deadline=$((SECONDS + TIMEOUT))
  while ! answers; do
    # $pid is setsid's until it execs dockerd, so only whether it still runs counts.
    if ! alive "$pid"; then
      log "dockerd $storage/$net exited while starting; its last errors:"
      grep -E 'level=(error|fatal)|failed' "$LOG" | tail -n 5 | sed 's/^/    /' >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "dockerd $storage/$net did not answer on $SOCK within ${TIMEOUT}s; stopping it"
      kill -TERM "$pid" 2>/dev/null || true
      await_exit "$pid" 20 || kill -KILL "$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.25
  done
  log "dockerd answers (pid $pid, storage $storage, network $net)"
}

# After a dockerd that was killed (kill -9, say), the pidfile of its containerd may name
# a process that is gone or a zombie; dockerd would take it for a running containerd and
# wait for it to answer, in vain. A containerd that still runs is left alone: dockerd
# uses it again.
forget_dead_containerd() {
  local pid
  [ -s "$CONTAINERD_PIDFILE" ] || return 0
  pid=$(tr -cd '0-9' <"$CONTAINERD_PIDFILE")
  if [ -n "$pid" ] && alive "$pid" && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/bin/containerd ]; then
    return 0
  fi
  log "removing the stale $CONTAINERD_PIDFILE (containerd ${pid:-?} is gone)"
  rm -f "$CONTAINERD_PIDFILE" "$CONTAINERD_SOCK"
}

has_nvidia_runtime() {
  # shellcheck disable=SC2016 # a Go template, not shell
  dk info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null | grep -qw nvidia
}

# The root file system of the test images: a static busybox, root and nobody, a /tmp
# anyone can write, and /work, a directory any job owner can write to.
make_rootfs_tar() {
  local root=$STATE/rootfs applet
  rm -rf "$root"
  mkdir -p "$root"/{bin,etc,dev,proc,sys,root,tmp,work}
  chmod 1777 "$root/tmp" "$root/work"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
EOF
  tar -C "$root" --numeric-owner -cf "$STATE/rootfs.tar" .
}

import_images() {
  local have_base=1
  dk image inspect "$IMAGE" >/dev/null 2>&1 || have_base=0
  if [ "$have_base" = 0 ] || ! dk image inspect "$IMAGE_ROOT_USER" >/dev/null 2>&1; then
    make_rootfs_tar
  fi
  if [ "$have_base" = 0 ]; then
    dk import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' "$STATE/rootfs.tar" "$IMAGE" >/dev/null ||
      fail "docker import of $IMAGE failed"
    log "imported $IMAGE"
  fi
  if ! dk image inspect "$IMAGE_ROOT_USER" >/dev/null 2>&1; then
    dk import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' -c 'USER root' "$STATE/rootfs.tar" "$IMAGE_ROOT_USER" >/dev/null ||
      fail "docker import of $IMAGE_ROOT_USER failed"
    log "imported $IMAGE_ROOT_USER"
  fi
  # The same image under another repository name.
  dk tag "$IMAGE" "$IMAGE_OTHER" || fail "docker tag $IMAGE $IMAGE_OTHER failed"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || fail "must run as root"
  mkdir -p "$STATE"
  exec 9>"$LOCK"
  flock 9
  install_missing
  install_nvidia_double
  if our_dockerd >/dev/null && answers; then
    if has_nvidia_runtime; then
      log "dockerd already running (pid $(our_dockerd))"
    else
      log "the running dockerd has no nvidia runtime (started otherwise); restarting it"
      stop_engine
    fi
  elif answers; then
    fail "an engine this script did not start (no live $PIDFILE) answers on $SOCK; stop it first"
  fi
  if ! answers; then
    forget_dead_containerd
    local storages nets s n started=0
    storages=${CYB_DOCKER_STORAGE:-overlay2 vfs}
    nets=${CYB_DOCKER_NET:-bridge none}
    for s in $storages; do
      for n in $nets; do
        if start_dockerd "$s" "$n"; then
          started=1
          break 2
        fi
      done
    done
    [ "$started" = 1 ] || fail "dockerd did not start with storage ($storages) x network ($nets); see $LOG"
  fi
  has_nvidia_runtime || fail "dockerd lists no nvidia runtime"
  import_images
  cmd_status
}

stop_engine() {
  local pid containerd="" shims="" p deadline
  if ! pid=$(our_dockerd); then
    log "no dockerd of ours runs (pidfile $PIDFILE)"
    return 0
  fi
  if [ -s "$CONTAINERD_PIDFILE" ]; then containerd=$(tr -cd '0-9' <"$CONTAINERD_PIDFILE"); fi
  if answers; then
    # dockerd would give each container 10 s to end on SIGTERM; kill them outright.
    local running
    running=$(dk ps -q 2>/dev/null || true)
    if [ -n "$running" ]; then
      log "killing running containers"
      # shellcheck disable=SC2086 # one word per container id
      dk kill $running >/dev/null 2>&1 || true
    fi
  fi
  # The shims serving our containerd, found by its socket on their command line.
  for p in /proc/[0-9]*; do
    case $(readlink "$p/exe" 2>/dev/null) in
      *containerd-shim*)
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$CONTAINERD_SOCK"; then
          shims+=" ${p#/proc/}"
        fi
        ;;
    esac
  done
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! await_exit "$pid" 30; then
    log "dockerd $pid still runs after 30 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    await_exit "$pid" 5 || fail "dockerd $pid does not end"
  fi
  if [ -n "$containerd" ] && [ "$(readlink "/proc/$containerd/exe" 2>/dev/null)" = /usr/bin/containerd ]; then
    if ! await_exit "$containerd" 15; then
      log "containerd $containerd outlived dockerd; stopping it"
      kill -TERM "$containerd" 2>/dev/null || true
      await_exit "$containerd" 10 || kill -KILL "$containerd" 2>/dev/null || true
    fi
  fi
  deadline=$((SECONDS + 15))
  for p in $shims; do
    case $(readlink "/proc/$p/exe" 2>/dev/null) in
      *containerd-shim*) ;;
      *) continue ;;
    esac
    while alive "$p" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if alive "$p"; then
      log "shim $p still runs; stopping it"
      kill -TERM "$p" 2>/dev/null || true
    fi
  done
  # dockerd bind-mounts its data root onto itself (to make it a shared mount) and may
  # leave that behind; the next start makes it again.
  if [ "$(findmnt -n -o FSROOT -M "$DATA_ROOT" 2>/dev/null)" = "$DATA_ROOT" ]; then
    if umount "$DATA_ROOT"; then log "unmounted dockerd's bind mount of $DATA_ROOT"; fi
  fi
  rm -f "$PIDFILE"
  log "stopped"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || fail "must run as root"
  mkdir -p "$STATE"
  exec 9>"$LOCK"
  flock 9
  stop_engine
}

cmd_status() {
  if ! answers; then
    echo "engine: not answering on unix://$SOCK"
    return 3
  fi
  local pid
  pid=$(our_dockerd) || pid="not started by this script"
  echo "engine: answering on unix://$SOCK (dockerd pid $pid)"
  dk version --format 'server {{.Server.Version}}, api {{.Server.APIVersion}}' || true
  # shellcheck disable=SC2016 # a Go template, not shell
  dk info --format 'cgroup driver {{.CgroupDriver}} (cgroup v{{.CgroupVersion}}), storage {{.Driver}}, runtimes:{{range $name, $_ := .Runtimes}} {{$name}}{{end}}' || true
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
