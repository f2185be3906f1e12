#!/usr/bin/env bash
# Installs everything cbsd, its demo and its tests need on Debian 12/13 (run as root), then
# cbsd itself into .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU and the test guests' tools: nasm (boot sector), busybox-static (initramfs guest),
# debootstrap + e2fsprogs (the Debian guest), openssh-client and iproute2 (tests reach guests
# over SSH inside network namespaces), ovmf + dosfstools + mtools + systemd-boot-efi (UEFI),
# openssl (cloud-init password hashes), dnsmasq-base + nftables (the managed network cbsd0),
# xfsprogs (the tests' loop-mounted XFS with reflink, where VMs keep RAM in a file),
# novnc (the web UI's VNC display: its ES modules are served as they are), chromium (the
# browser the web UI's tests drive through Playwright, which cannot download its own here).
PACKAGES=(qemu-system-x86 qemu-utils nasm busybox-static python3 python3-venv ca-certificates
          debootstrap e2fsprogs openssh-client iproute2 ovmf dosfstools mtools systemd-boot-efi
          openssl dnsmasq-base nftables xfsprogs novnc chromium)
# npm fetches the web UI's xterm.js (pinned in src/cbsd/service/web/package-lock.json); a node
# that brings its own npm (NodeSource's) conflicts with Debian's npm package, so only without one.
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)
export DEBIAN_FRONTEND=noninteractive
# CBSD_SETUP=packages: only the Debian packages (scripts/trixie.sh builds its cached base system
# with this, so the packages it tests with are the ones this list names).
mode=${CBSD_SETUP:-all}
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Packages whose own service must not start (policy-rc.d says so while they install) nor come
# up at boot: sshd for the many-host tests, which start their own inside network namespaces;
# etcd (etcd-server, and etcdctl from etcd-client) for the cluster (docs/cluster.md), whose
# member `cbsd bcluster mode=init|join` starts and configures itself, with TLS, in its workdir
# (bookworm has 3.4, trixie 3.5: both serve the JSON gateway cbsd's client speaks).
quiet_install() {  # PACKAGE UNITS...
    local pkg=$1; shift
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && return 0
    echo "setup: installing $pkg (its service stays off)" >&2
    apt-cache show "$pkg" >/dev/null 2>&1 || apt-get update -qq
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null || {
        [ $own_policy = 1 ] && rm -f "$policy"; exit 1; }
    [ $own_policy = 1 ] && rm -f "$policy"
    if [ -d /run/systemd/system ] && [ $# -gt 0 ]; then
        systemctl disable --now "$@" >/dev/null 2>&1 || true
    fi
}
quiet_install openssh-server ssh.service ssh.socket
quiet_install etcd-server etcd.service
quiet_install etcd-client
# The Linux test guest's kernel is fetched with 'apt-get download': the package lists must exist.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi
[ "$mode" = packages ] && exit 0

# A dependency without a wheel for this Python is built from source: fastcdc has none for
# Python 3.13 (Debian 13), and without a compiler its build silently falls back to pure Python,
# ~100x slower. So where pip finds no wheel for every requirement, the build needs come first.
build_needs() {
    local reqs
    reqs=$(/usr/bin/python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))')
    # shellcheck disable=SC2086 # one requirement a line, none with spaces
    .venv/bin/pip install -q --disable-pip-version-check --dry-run --only-binary=:all: \
        $reqs >/dev/null 2>&1 && return 0
    local need=()
    for p in gcc python3-dev; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup: a requirement has no wheel for $(/usr/bin/python3 -V): installing ${need[*]} to build it" >&2
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
}
# The chunk store's fast path: fastcdc's C accelerator (cbsd.storage.chunkstore.native_chunker).
fast_chunker() {
    .venv/bin/python -c 'import sys; from cbsd.storage.chunkstore import native_chunker
sys.exit(0 if native_chunker() else 1)' 2>/dev/null
}
# The requirements .venv was last installed from: a change to pyproject.toml (a new or newer
# pinned dependency) installs again.
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import cbsd, pytest, hypothesis, fastcdc' 2>/dev/null \
        || [ "$(cat .venv/.cbsd-requirements 2>/dev/null)" != "$wanted" ] || ! fast_chunker; then
    echo "setup: creating .venv" >&2
    /usr/bin/python3 -m venv .venv
    build_needs
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    echo "$wanted" > .venv/.cbsd-requirements
    if ! fast_chunker; then
        # A wheel pip built earlier without a compiler (its cache keeps it) is the slow one:
        # build it again, now that the build needs are here.
        fastcdc_req=$(grep -o '"fastcdc[^"]*"' pyproject.toml | tr -d '"')
        .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir --force-reinstall \
            --no-deps "$fastcdc_req"
    fi
    if ! fast_chunker; then
        echo "setup: fastcdc runs in pure Python (~100x slower chunk store): its C accelerator" \
             "did not build for $(/usr/bin/python3 -V); install gcc and python3-dev, then run" \
             "this again" >&2
        exit 1
    fi
fi
# The web UI's browser modules, exactly as the lock file pins them (plain ES modules: no build
# step); again whenever the lock file changes.
web=src/cbsd/service/web
web_wanted=$(sha256sum "$web/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$web/node_modules/.cbsd-lock" 2>/dev/null)" != "$web_wanted" ]; then
    echo "setup: installing the web UI's modules (npm ci)" >&2
    npm ci --prefix "$web" --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
    echo "$web_wanted" > "$web/node_modules/.cbsd-lock"
fi
# Cached bytecode for every module: a command then starts ~35 ms sooner, also where
# PYTHONDONTWRITEBYTECODE keeps Python from writing it itself (compileall writes regardless).
.venv/bin/python -m compileall -q src >/dev/null
# The `cbsd` command, in place of the script pip generates: that one runs Python with site
# processing (.pth files, ~5 ms) and imports `re` (~4 ms) before cbsd starts -- half of what
# a pause costs in all. This one starts Python isolated (-I -S) with the import paths site
# would have added (cbsd/cli/launcher.py). Rewritten on every run, so a reinstall by pip
# cannot leave the slow one.
.venv/bin/python -m cbsd.cli.launcher .venv/bin/cbsd "$PWD/src"
# On the PATH, with its man page and bash completion (as root: what an admin expects).
if [ "$(id -u)" = 0 ]; then
    ln -sfn "$PWD/.venv/bin/cbsd" /usr/local/bin/cbsd
    mkdir -p /usr/local/share/man/man8 /usr/share/bash-completion/completions
    .venv/bin/python -m cbsd.cli.manpage > /usr/local/share/man/man8/cbsd.8.tmp
    mv /usr/local/share/man/man8/cbsd.8.tmp /usr/local/share/man/man8/cbsd.8
    install -m 0644 contrib/bash-completion/cbsd /usr/share/bash-completion/completions/cbsd
fi
