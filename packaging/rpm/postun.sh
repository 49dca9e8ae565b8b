# %postun of cybd ($1: 0 = erase, 1 or more = upgrade).
# %systemd_postun_with_restart cybd.service, expanded by hand.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    # Upgrade: restart (not stop+start) the running service onto the new binary. cybd
    # leaves running jobs to their supervisors on a restart and re-adopts them. The
    # socket stays up, so cybctl calls made meanwhile wait instead of failing.
    systemctl try-restart cybd.service >/dev/null 2>&1 || :
fi
# Erase keeps /etc/cyb/cybd.toml if changed (as .rpmsave), the queue /var/spool/cyb and
# /logs: rpm has no purge. Remove /var/spool/cyb and /run/cyb by hand to drop the
# queue; /logs holds the users' run directories.
