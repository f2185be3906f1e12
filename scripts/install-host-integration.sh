#!/usr/bin/env bash
# Installs the host-integration unit (hibernate VMs at host shutdown, resume them at boot):
# contrib/cbsd-guests, its systemd unit and its defaults, then enables the unit where systemd
# runs. DESTDIR=/some/root installs into another root (and enables nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
d=${DESTDIR:-}
install -D -m 0755 contrib/cbsd-guests "$d/usr/local/sbin/cbsd-guests"
install -D -m 0644 contrib/systemd/cbsd-guests.service "$d/etc/systemd/system/cbsd-guests.service"
# The defaults are the admin's once installed: never overwritten.
[ -e "$d/etc/default/cbsd-guests" ] || \
    install -D -m 0644 contrib/systemd/cbsd-guests.default "$d/etc/default/cbsd-guests"
if [ -z "$d" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable cbsd-guests.service
    echo "cbsd-guests.service enabled: VMs are hibernated at shutdown and resumed at boot"
else
    echo "installed into ${d:-/}; enable with: systemctl enable cbsd-guests.service"
fi
