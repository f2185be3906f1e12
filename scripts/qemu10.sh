#!/usr/bin/env bash
# Prints the folder of a private QEMU 10 (bin/qemu-system-x86_64, bin/qemu-img), extracting it
# first if needed. On Debian 12 it comes from bookworm-backports through a private apt
# configuration (own sources list, lists and cache) and `dpkg -x`: the system's QEMU 7.2 is
# never replaced. On a system whose QEMU is already 10 or newer, the wrappers run that one.
# Idempotent; cached in ${CBSD_QEMU10_DIR:-~/.cache/cbsd-qemu10}.
set -euo pipefail
dest=${CBSD_QEMU10_DIR:-$HOME/.cache/cbsd-qemu10}
if [ -x "$dest/bin/qemu-system-x86_64" ] && "$dest/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
    echo "$dest"
    exit 0
fi
mkdir -p "$dest/bin"
system_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
if [ "${system_major:-0}" -ge 10 ]; then
    for b in qemu-system-x86_64 qemu-img; do
        printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$b")" > "$dest/bin/$b"
        chmod 755 "$dest/bin/$b"
    done
    echo "$dest"
    exit 0
fi
work="$dest/apt"
root="$dest/root"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-$(awk '/^deb .*debian/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
echo "deb ${mirror:?no Debian mirror configured} bookworm-backports main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
      -o "APT::Sandbox::User=root" -qq)
apt-get "${opts[@]}" update
# Every package that ships QEMU modules, so that QEMU 10 finds each of its modules in its own
# folder and never falls back to (and aborts on) the system's 7.2 modules.
(cd "$work/debs" && apt-get "${opts[@]}" download qemu-system-x86 qemu-system-common \
    qemu-system-data qemu-utils qemu-block-extra qemu-system-gui qemu-system-modules-opengl \
    qemu-system-modules-spice)
rm -rf "$root"
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$root"; done
for b in qemu-system-x86_64 qemu-img; do
    extra=""
    [ "$b" = qemu-system-x86_64 ] && extra="-L $root/usr/share/qemu -L $root/usr/share/seabios -L /usr/lib/ipxe/qemu"
    cat > "$dest/bin/$b" <<WRAP
#!/bin/sh
# Debian's QEMU 10 from bookworm-backports, extracted privately by cbsd's scripts/qemu10.sh.
QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu exec $root/usr/bin/$b $extra "\$@"
WRAP
    chmod 755 "$dest/bin/$b"
done
"$dest/bin/qemu-system-x86_64" --version >/dev/null
echo "$dest"
