# %preun of cybd ($1: 0 = erase, 1 or more = upgrade).
# %systemd_preun cybd.socket cybd.service, expanded by hand.
if [ "$1" -eq 0 ]; then
    # Erase: stop and disable. systemd asks cybd to stop for good, and cybd cancels
    # its running jobs. On upgrade nothing is stopped here.
    systemctl --no-reload disable --now cybd.socket cybd.service >/dev/null 2>&1 || :
fi
