# %post of cybd ($1: 1 = first install, 2 or more = upgrade).
# cargo-generate-rpm does not expand rpm macros, so %sysusers_create, %tmpfiles_create
# and %systemd_post are written out here by hand.

# sysusers.d before tmpfiles.d: /var/spool/cyb/jobs belongs to root:cybadm.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers cybd.conf >/dev/null 2>&1 || :
elif ! getent group cybadm >/dev/null 2>&1; then
    groupadd -r cybadm >/dev/null 2>&1 || :
fi

# %tmpfiles_create cybd.conf: /var/spool/cyb, /run/cyb, /logs.
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create cybd.conf >/dev/null 2>&1 || :
fi

if [ "$1" -eq 1 ]; then
    # %systemd_post cybd.socket cybd.service: enable as the preset policy says. The
    # package's own preset (80-cybd.preset) enables both; a preset of the admin's in
    # /etc/systemd/system-preset/ can say disable instead.
    systemctl --no-reload preset cybd.socket cybd.service >/dev/null 2>&1 || :
    # Like the .deb, start what is enabled right away (when systemd is running).
    if [ -d /run/systemd/system ] && systemctl --quiet is-enabled cybd.socket 2>/dev/null; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        systemctl start cybd.socket cybd.service >/dev/null 2>&1 || :
    fi
fi
# On upgrade the old package's %postun try-restarts the service (see postun.sh).
