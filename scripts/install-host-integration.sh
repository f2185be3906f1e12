#!/usr/bin/env bash
# Installs the host-integration units (hibernate VMs at host shutdown, resume them at boot:
# contrib/cbsd-guests; the service `cbsd serve`: its REST API on the workdir's Unix socket),
# their systemd units and defaults, then enables the units where systemd runs. DESTDIR=/some/root installs into another root (and enables nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
d=${DESTDIR:-}
install -D -m 0755 contrib/cbsd-guests "$d/usr/local/sbin/cbsd-guests"
install -D -m 0644 contrib/systemd/cbsd-guests.service "$d/etc/systemd/system/cbsd-guests.service"
# The defaults are the admin's once installed: never overwritten.
[ -e "$d/etc/default/cbsd-guests" ] || \
    install -D -m 0644 contrib/systemd/cbsd-guests.default "$d/etc/default/cbsd-guests"
install -D -m 0644 contrib/systemd/cbsd-serve.service "$d/etc/systemd/system/cbsd-serve.service"
[ -e "$d/etc/default/cbsd-serve" ] || \
    install -D -m 0644 contrib/systemd/cbsd-serve.default "$d/etc/default/cbsd-serve"
# The default pool named in /etc/default/cbsd-serve (root-only until the admin opens it).
install -d -m 0700 "$d/var/lib/cbsd/pool"
if [ -z "$d" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable cbsd-guests.service cbsd-serve.service
    echo "cbsd-guests.service enabled: VMs are hibernated at shutdown and resumed at boot"
    echo "cbsd-serve.service enabled (start it now with: systemctl start cbsd-serve)"
else
    echo "installed into ${d:-/}; enable with: systemctl enable cbsd-guests.service cbsd-serve.service"
fi
