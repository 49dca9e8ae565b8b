#!/usr/bin/env bash
# System test under real systemd: boots systemd as PID 1 in a container
# (tests/system/nspawn.sh), installs the cybd .deb, and checks what a sysadmin relies on:
# start returns after READY, a user's job file runs as that user, the journal has the job's
# events, restart and upgrade keep running jobs, a broken config on reload is refused, the
# watchdog restarts a stuck daemon, stop ends jobs, a user's own `systemctl --user enable
# --now cybd` runs their jobs, remove and purge clean up. The container is stopped on exit;
# its rootfs stays as a cache, unchanged by the test (nspawn.sh boots an overlay of it).
#
# Usage: tests/system/systemd-deb.sh            (root; builds the .deb unless CYB_DEB is set)
# Env:   CYB_DEB=path.deb  CYB_ROOTFS=/var/tmp/cyb-rootfs
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
export CYB_ROOTFS=${CYB_ROOTFS:-/var/tmp/cyb-rootfs} CYB_MACHINE=cybsys
ROOTFS=$CYB_ROOTFS
CT="bash $TOP/tests/system/nspawn.sh"
LINT="bash $TOP/tests/system/unit-lint.sh"

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; in_ct journalctl -u cybd --no-pager -n 60 2>/dev/null || true; exit 1; }
in_ct() { $CT exec "$@"; }
sh_ct() { $CT exec sh -c "$1"; }
# wait_for SECONDS CMD...: poll every 0.1 s
wait_for() { local t=$1 i; shift; for ((i = 0; i < t * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
result_field() { sh_ct "jq -r .$2 /logs/run_$1/result.json"; }
# cybctl as the ordinary user alice (root jobs are refused by default); prints its stdout.
as_alice() { sh_ct "runuser -u alice -- $1"; }
submit() { as_alice "cybctl --json submit -- $1" | jq .id; }

[ "$(id -u)" = 0 ] || { echo "must run as root"; exit 2; }
# A container left by a run that was killed: stop it before its rootfs is touched.
$CT stop >/dev/null 2>&1 || true
# The rootfs, with what the tests use inside (jq, libpam-systemd): made once, then kept.
$CT build >/dev/null
if [ -z "${CYB_DEB:-}" ]; then
  # build.sh prints the .deb's path first, then the .rpm's (under CARGO_TARGET_DIR if set).
  CYB_DEB=$(bash "$TOP/packaging/build.sh" | grep '\.deb$' | head -1)
fi
cp "$CYB_DEB" "$ROOTFS/var/tmp/cybd.deb"
cp "$TOP/tests/system/unit-lint.sh" "$ROOTFS/var/tmp/unit-lint.sh"
# Whatever happens, the container is stopped (and its cgroups removed) on the way out.
trap '$CT stop >/dev/null 2>&1 || true; rm -f "$ROOTFS/var/tmp/cybd.deb" "$ROOTFS/var/tmp/unit-lint.sh"' EXIT
trap 'exit 130' INT TERM
$CT start

step "install the .deb: the service is enabled and started by the package"
in_ct dpkg -i /var/tmp/cybd.deb
sh_ct 'systemctl is-enabled cybd.service && systemctl is-enabled cybd.socket' || fail "not enabled"
wait_for 20 in_ct systemctl is-active cybd.service || fail "cybd not active after install"

sh_ct 'id alice >/dev/null 2>&1 || useradd -m alice'

step "every unit file passes systemd-analyze verify with no output"
# On the host against the container's root, and inside it (the user unit as alice, by her
# own user manager's rules: systemd-analyze cannot take --user with --root).
out=$($LINT --root="$($CT root)" cybd.service cybd.socket 2>&1) || fail "$out"
out=$(in_ct bash /var/tmp/unit-lint.sh /lib/systemd/system/cybd.service /lib/systemd/system/cybd.socket 2>&1) || fail "$out"
out=$(sh_ct 'cd / && runuser -u alice -- bash /var/tmp/unit-lint.sh --user /usr/lib/systemd/user/cybd.service' 2>&1) || fail "$out"

step "systemctl start returns only after READY (the socket answers at once)"
in_ct systemctl stop cybd.service
in_ct systemctl start cybd.service
[ "$(in_ct systemctl show -p ActiveState --value cybd.service)" = active ] || fail "not active right after start"
sh_ct 'cybctl stats >/dev/null' || fail "cybctl stats failed right after start"
status=$(in_ct systemctl show -p StatusText --value cybd.service)
case "$status" in *running*queued*|ready*) ;; *) fail "no STATUS= line: '$status'";; esac
echo "STATUS: $status"

step "a job file dropped by an ordinary user runs as that user"
sh_ct 'id alice >/dev/null 2>&1 || useradd -m alice'
sh_ct "runuser -u alice -- sh -c 'echo \"{\\\"shell\\\": \\\"id -un; echo hi\\\"}\" > /var/spool/cyb/incoming/.a.tmp && mv /var/spool/cyb/incoming/.a.tmp /var/spool/cyb/incoming/a.json'"
wait_for 20 sh_ct 'test -e /logs/run_1/result.json' || fail "no result for the spool job"
[ "$(result_field 1 user)" = alice ] || fail "job ran as $(result_field 1 user)"
[ "$(result_field 1 state)" = succeeded ] || fail "job 1 $(result_field 1 state)"
[ "$(sh_ct 'head -1 /logs/run_1/stdout.log')" = alice ] || fail "stdout: $(sh_ct 'cat /logs/run_1/stdout.log')"
sh_ct 'runuser -u alice -- cat /logs/run_1/stdout.log >/dev/null' || fail "alice cannot read her run directory"

step "journalctl -u cybd JOB_ID=1 shows the job's life"
wait_for 10 sh_ct 'journalctl --no-pager -o cat -u cybd JOB_ID=1 | grep -q "job 1 succeeded"' || fail "journal lacks job 1"
events=$(sh_ct 'journalctl --no-pager -o json -u cybd JOB_ID=1 | jq -r "select(.EVENT) | .EVENT"' | tr '\n' ' ')
[ "$events" = "submitted started finished " ] || fail "events of job 1: $events"
sh_ct 'journalctl --no-pager -o json -u cybd JOB_ID=1 | jq -s -e "map(select(.JOB_USER == \"alice\" and .CLASS == \"cpu_short\")) | length > 0"' >/dev/null \
  || fail "no JOB_USER/CLASS fields: $(sh_ct 'journalctl --no-pager -o json -u cybd JOB_ID=1')"

step "systemctl restart while a job runs: the job keeps running and its result is recorded"
id=$(submit "sh -c 'sleep 4; exit 7'")
wait_for 10 sh_ct "cybctl --json show $id | jq -e '.state == \"running\"'" || fail "job $id not running"
job_pid=$(sh_ct "jq .pid /run/cyb/supervisors/$id.json")
in_ct systemctl restart cybd.service
sh_ct "kill -0 $job_pid" || fail "restart killed the job's supervisor"
wait_for 20 sh_ct "test -e /logs/run_$id/result.json" || fail "no result after restart"
[ "$(result_field "$id" exit_code)" = 7 ] || fail "exit code after restart: $(result_field "$id" exit_code)"

step "reload with a broken config keeps the service on the old one"
sh_ct 'cp /etc/cyb/cybd.toml /tmp/good.toml && echo "this is = = not toml" >> /etc/cyb/cybd.toml'
in_ct systemctl reload cybd.service || true
sleep 1
[ "$(in_ct systemctl is-active cybd.service)" = active ] || fail "service died on a bad reload"
sh_ct 'journalctl --no-pager -u cybd -o cat | grep -q "configuration not reloaded"' || fail "no reload error logged"
as_alice 'cybctl submit --wait -- true' >/dev/null || fail "daemon does not work after a bad reload"
sh_ct 'cp /tmp/good.toml /etc/cyb/cybd.toml'
in_ct systemctl reload cybd.service
sleep 1
sh_ct 'journalctl --no-pager -u cybd -o cat | grep -q "configuration reloaded"' || fail "good reload not logged"

step "a package upgrade keeps the config, the queue and running jobs"
sh_ct 'echo "# local edit" >> /etc/cyb/cybd.toml'
id=$(submit "sh -c 'sleep 4; exit 5'")
wait_for 10 sh_ct "cybctl --json show $id | jq -e '.state == \"running\"'" || fail "job $id not running"
before=$(sh_ct 'ls /var/spool/cyb/jobs | wc -l')
sh_ct 'dpkg -i /var/tmp/cybd.deb >/dev/null' || fail "upgrade failed"
sh_ct 'tail -1 /etc/cyb/cybd.toml | grep -q "local edit"' || fail "upgrade replaced the config"
[ "$(sh_ct 'ls /var/spool/cyb/jobs | wc -l')" -ge "$before" ] || fail "upgrade lost job records"
wait_for 20 sh_ct "test -e /logs/run_$id/result.json" || fail "no result after upgrade"
[ "$(result_field "$id" exit_code)" = 5 ] || fail "exit code after upgrade: $(result_field "$id" exit_code)"

step "the watchdog restarts a daemon whose loop is stopped"
sh_ct 'mkdir -p /etc/systemd/system/cybd.service.d && printf "[Service]\nWatchdogSec=3s\n" > /etc/systemd/system/cybd.service.d/wd.conf'
in_ct systemctl daemon-reload
in_ct systemctl restart cybd.service
pid=$(in_ct systemctl show -p MainPID --value cybd.service)
restarts=$(in_ct systemctl show -p NRestarts --value cybd.service)
in_ct kill -STOP "$pid"
wait_for 30 sh_ct "p=\$(systemctl show -p MainPID --value cybd.service); [ \"\$p\" != $pid ] && [ \"\$p\" != 0 ] && systemctl is-active cybd.service" \
  || fail "watchdog did not restart the stopped daemon"
[ "$(in_ct systemctl show -p NRestarts --value cybd.service)" -gt "$restarts" ] || fail "NRestarts did not grow"
sh_ct 'journalctl --no-pager -u cybd -o cat | grep -qi watchdog' || echo "(note: journal does not mention the watchdog)"
sh_ct 'rm -r /etc/systemd/system/cybd.service.d' && in_ct systemctl daemon-reload && in_ct systemctl restart cybd.service

step "systemctl stop ends running jobs and stops cleanly"
id=$(submit "sleep 300")
wait_for 10 sh_ct "cybctl --json show $id | jq -e '.state == \"running\"'" || fail "job $id not running"
in_ct systemctl stop cybd.service
[ "$(in_ct systemctl show -p Result --value cybd.service)" = success ] || fail "stop result: $(in_ct systemctl show -p Result --value cybd.service)"
[ "$(result_field "$id" state)" = cancelled ] || fail "job after stop: $(result_field "$id" state)"
! sh_ct 'pgrep -x "sleep"' >/dev/null || fail "a job process survived stop"

step "user mode as a service: alice's own systemctl --user enable --now cybd"
# Lingering gives alice a user manager (user@UID.service) with no login session.
sh_ct 'loginctl enable-linger alice'
uid=$(in_ct id -u alice)
# As alice, in her home, talking to her user manager and her user-mode daemon.
as_user() { sh_ct "cd /home/alice && runuser -u alice -- env XDG_RUNTIME_DIR=/run/user/$uid $1"; }
wait_for 20 as_user 'systemctl --user is-system-running --wait' || fail "no user manager for alice: $(as_user 'systemctl --user is-system-running' 2>&1)"
as_user 'systemctl --user enable --now cybd' || fail "systemctl --user enable --now cybd failed"
# Type=notify: enable --now returns after READY, so the daemon answers at once.
[ "$(as_user 'systemctl --user is-active cybd')" = active ] || fail "user cybd not active right after enable --now"
[ "$(as_user 'systemctl --user is-enabled cybd')" = enabled ] || fail "user cybd not enabled"
case "$(as_user 'systemctl --user show -p StatusText --value cybd')" in *running*queued*|ready*) ;; *) fail "user cybd has no STATUS= line";; esac
as_user 'test -S /run/user/'"$uid"'/cyb/cybd.sock' || fail "no user-mode socket in alice's XDG_RUNTIME_DIR"
ulogs=/home/alice/.local/state/cyb/logs
id=$(as_user "cybctl --json submit -- sh -c 'echo from the user daemon; id -un'" | jq .id)
wait_for 20 sh_ct "test -e $ulogs/run_$id/result.json" || fail "no result of alice's job in $ulogs: $(as_user 'journalctl --user -u cybd --no-pager -n 30' 2>&1)"
[ "$(sh_ct "jq -r .state $ulogs/run_$id/result.json")" = succeeded ] || fail "user-mode job: $(sh_ct "cat $ulogs/run_$id/result.json")"
[ "$(sh_ct "cat $ulogs/run_$id/stdout.log")" = "from the user daemon
alice" ] || fail "user-mode job's stdout: $(sh_ct "cat $ulogs/run_$id/stdout.log")"
[ "$(sh_ct "stat -c %U $ulogs/run_$id/result.json")" = alice ] || fail "user-mode run directory not alice's"
# systemctl --user restart leaves a running job running; the new daemon records its end.
id=$(as_user "cybctl --json submit -- sh -c 'sleep 3; exit 6'" | jq .id)
wait_for 10 as_user "cybctl --json show $id | jq -e '.state == \"running\"'" || fail "user job $id not running"
as_user 'systemctl --user restart cybd'
wait_for 20 sh_ct "test -e $ulogs/run_$id/result.json" || fail "no result after systemctl --user restart"
[ "$(sh_ct "jq .exit_code $ulogs/run_$id/result.json")" = 6 ] || fail "exit code after a user restart: $(sh_ct "cat $ulogs/run_$id/result.json")"
# systemctl --user stop ends the running jobs (cancelled), as the system unit does.
id=$(as_user "cybctl --json submit -- sleep 300" | jq .id)
wait_for 10 as_user "cybctl --json show $id | jq -e '.state == \"running\"'" || fail "user job $id not running"
as_user 'systemctl --user stop cybd'
[ "$(sh_ct "jq -r .state $ulogs/run_$id/result.json")" = cancelled ] || fail "user job after stop: $(sh_ct "cat $ulogs/run_$id/result.json" 2>&1)"
! sh_ct 'pgrep -u alice -x sleep' >/dev/null || fail "a user job's process survived systemctl --user stop"
as_user 'systemctl --user disable cybd' >/dev/null 2>&1
sh_ct 'loginctl disable-linger alice'

step "remove stops the service; purge removes the queue"
in_ct systemctl start cybd.service
sh_ct 'dpkg -r cybd >/dev/null'
! in_ct systemctl is-active cybd.service >/dev/null 2>&1 || fail "service still active after remove"
sh_ct 'test -e /etc/cyb/cybd.toml' || fail "remove deleted the config (only purge may)"
sh_ct 'dpkg -P cybd >/dev/null'
! sh_ct 'test -e /var/spool/cyb' || fail "purge left /var/spool/cyb"

printf '\nsystemd system test: all checks passed\n'
