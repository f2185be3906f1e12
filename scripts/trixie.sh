#!/usr/bin/env bash
# Pass 4 of scripts/test.sh (on a Debian 12 host): the README's promise for Debian 13, checked.
# A Debian 13 (trixie) system is made with debootstrap, the repository is copied into root's
# home inside it (/root/cbsd, the home 0700, where a new user clones), and there, through
# chroot, run the README's two commands: scripts/demo.sh, then scripts/test.sh on a selection
# (CBSD_TEST_SELECTION=trixie: see test.sh). Inside are trixie's QEMU, Python and packages; the
# kernel is the host's.
#
# The base system (debootstrap, then scripts/setup.sh run on a throw-away copy: every Debian
# package it installs on trixie) is cached in ~/.cache/cbsd-trixie/base-KEY, KEY being the ISO
# week, the mirror, setup.sh and pyproject.toml: refreshed weekly and whenever what setup
# installs changes. Each run works on an overlay above it that is thrown away; every mount is
# undone on any exit, and a folder is removed only once nothing is mounted below it. The test
# guests' cache inside and pip's cache are kept across runs (~/.cache/cbsd-trixie/).
#
# Usage: bash scripts/trixie.sh [PYTEST ARGS...]   (CBSD_TRIXIE_BASE_ONLY=1: only the base;
#        CBSD_TRIXIE_RUN='COMMAND': run COMMAND in the repository inside instead of the demo
#        and the tests, e.g. 'bash scripts/setup.sh && .venv/bin/python -m pytest tests/x.py')
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
SUITE=trixie
cache=${XDG_CACHE_HOME:-$HOME/.cache}/cbsd-trixie
mirror=$(python3 -c 'import sys; sys.path.insert(0, "."); from tests.guests.debian import _mirror; print(_mirror())')
key=$( (echo "$SUITE $mirror"; date -u +%G-W%V; cat scripts/setup.sh pyproject.toml) \
       | sha256sum | cut -c1-16)
base=$cache/base-$key
PATH_INSIDE=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p "$cache/guests" "$cache/pip"
# A signal ends the script through its EXIT trap, which undoes the mounts.
trap 'exit 130' INT TERM HUP

# Every mount at or below $1 (deepest first: a path sorts after its parent); returns 0 only if
# none is left, the one case where removing $1 cannot reach into a bound /dev or /proc.
mounts_under() {
    awk -v p="$1" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
# Processes still running in a system below $1 (a VM a killed test left) hold its mounts: they
# were started by this script, inside; they end first.
kill_inside() {
    local p r
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        case $r in "$1" | "$1"/*) kill -9 "${p#/proc/}" 2>/dev/null || true ;; esac
    done
}
unmount_all() {
    local m
    kill_inside "$1"
    for m in $(mounts_under "$1"); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    [ -z "$(mounts_under "$1")" ]
}
remove_safely() {
    if unmount_all "$1"; then
        rm -rf "$1"
    else
        echo "trixie: still mounted below $1, not removed: $(mounts_under "$1" | tr '\n' ' ')" >&2
    fi
}

# The kernel's file systems, as a system booted on this kernel has them. /dev is the host's
# (loop devices for pass 3's XFS, /dev/kvm, /dev/net/tun, /dev/pts).
mount_system() {
    mount -t proc proc "$1/proc"
    mount -t sysfs sysfs "$1/sys"
    mount --rbind /dev "$1/dev"
    mount --make-rslave "$1/dev"
}

# The system inside trusts the certificate authorities the host adds to Debian's (a proxy's, a
# company's: without them pip cannot reach its index through it).
host_cas() {
    mkdir -p "$1/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/" 2>/dev/null || true
    cp /etc/resolv.conf "$1/etc/resolv.conf"
}

# The repository as a clone has it: its tracked and unignored files (outside git: all but the
# venv and what Python and pytest leave).
copy_repo() {
    mkdir -p "$1"
    if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$repo" ls-files -z --cached --others --exclude-standard \
            | tar -C "$repo" --null -T - -cf - | tar -xf - -C "$1"
    else
        tar -C "$repo" --exclude=./.venv --exclude=__pycache__ --exclude=.pytest_cache -cf - . \
            | tar -xf - -C "$1"
    fi
}

# Kept across runs: the test guests built inside, and pip's cache (its wheel of fastcdc, built
# from source on trixie).
bind_caches() {
    mkdir -p "$1/root/.cache/cbsd-test-guests" "$1/root/.cache/pip"
    mount --bind "$cache/guests" "$1/root/.cache/cbsd-test-guests"
    mount --bind "$cache/pip" "$1/root/.cache/pip"
}

# inside ROOT COMMAND: run COMMAND in /root/cbsd (or /) of ROOT, in a clean environment (the
# host's TERM kept: a test reads what a terminal gets, and TERM=dumb would change it).
inside() {
    local r=$1
    shift
    chroot "$r" env -i PATH=$PATH_INSIDE HOME=/root LANG=C.UTF-8 ${TERM:+TERM=$TERM} ${CI:+CI=$CI} \
        bash -c "cd /root/cbsd 2>/dev/null || cd /; $*"
}

build_base() {
    building=$cache/.tmp-base-$$
    echo "trixie: building the Debian 13 base system ($base)" >&2
    trap 'remove_safely "$building"' EXIT
    mkdir -p "$building"
    debootstrap --variant=minbase "$SUITE" "$building/root" "$mirror" \
        >"$building/debootstrap.log" 2>&1 || {
        tail -20 "$building/debootstrap.log" >&2; echo "trixie: debootstrap failed" >&2; exit 1; }
    mount_system "$building/root"
    host_cas "$building/root"
    copy_repo "$building/root/root/cbsd"
    bind_caches "$building/root"
    inside "$building/root" "bash scripts/setup.sh" >&2
    umount "$building/root/root/.cache/pip" "$building/root/root/.cache/cbsd-test-guests"
    rm -rf "$building/root/root/cbsd" "$building/root/root/.cache" \
        "$building/root/usr/local/bin/cbsd"
    inside "$building/root" "apt-get clean"
    unmount_all "$building/root"
    mv "$building/root" "$base"
    trap - EXIT
    remove_safely "$building"
    # Older bases (another week, another package list) are no longer used.
    for old in "$cache"/base-*; do
        [ "$old" = "$base" ] || remove_safely "$old"
    done
}

[ -d "$base" ] || build_base
[ "${CBSD_TRIXIE_BASE_ONLY:-}" = 1 ] && exit 0

work=$(mktemp -d /var/tmp/cbsd-trixie.XXXXXX)
trap 'remove_safely "$work"' EXIT
root=$work/root
mkdir -p "$work/upper" "$work/ovl" "$root"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/ovl" "$root"
mount_system "$root"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
bind_caches "$root"
host_cas "$root"
inside "$root" "update-ca-certificates >/dev/null"
chmod 0700 "$root/root"
copy_repo "$root/root/cbsd"

echo "== trixie: $(inside "$root" '. /etc/os-release; echo "$PRETTY_NAME"'), $(inside "$root" "qemu-system-x86_64 --version | head -1"), $(inside "$root" "python3 -V"), kernel $(uname -r)"
if [ -n "${CBSD_TRIXIE_RUN:-}" ]; then
    inside "$root" "$CBSD_TRIXIE_RUN"
    exit
fi
status=0
start=$SECONDS
inside "$root" "bash scripts/demo.sh" || status=1
echo "== trixie: the demo took $((SECONDS - start)) s"
start=$SECONDS
args=""
[ $# -eq 0 ] || args=$(printf " %q" "$@")
inside "$root" "CBSD_TEST_SELECTION=trixie bash scripts/test.sh$args" || status=1
echo "== trixie: the tests took $((SECONDS - start)) s"
exit $status
