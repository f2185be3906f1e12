#!/bin/busybox sh
# /init of the cbsd Linux test guest (busybox initramfs, Debian cloud kernel).
# Prints every 0.5 s:  tick n=<count> up=<uptime> disk=<value> OK|BAD
#   count - RAM-only counter, restarts at 0 on boot ("cbsd-guest: up" marks a boot)
#   value - the count last written to /dev/vda, read past the page cache (--flushbufs)
#   OK    - the disk holds what RAM says was written last
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
echo "cbsd-guest: up"
echo "cbsd-guest: cpus=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
# A CD-ROM, if attached: its first bytes (the tests put a marker there).
sleep 0.3
if [ -b /dev/sr0 ]; then
    echo "cbsd-guest: cdrom=$(dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 24 | tr -dc 'A-Za-z0-9-')"
fi

# ACPI power button -> clean shutdown (sync, then power off).
for ev in /sys/class/input/event*; do
    if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
        ( dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null
          echo "cbsd-guest: power button, shutting down"; sync; poweroff -f ) &
    fi
done

# Network. cbsd.net=dhcp (kernel command line): ask DHCP (a bridge network) on every network
# card that appears -- at boot and any hot-plugged later (a restored clone's new card) -- and
# print its address and MAC; otherwise QEMU user networking's fixed address. A tiny web server
# for hostfwd tests.
if ip link set eth0 up 2>/dev/null; then
    if grep -q "cbsd.net=dhcp" /proc/cmdline; then
        cat > /bin/dhcp-event <<'EOS'
#!/bin/busybox sh
[ "$1" = bound ] || [ "$1" = renew ] || exit 0
ip addr add "$ip/${mask:-24}" dev "$interface"
[ -n "$router" ] && ip route add default via "${router%% *}"
echo "cbsd-guest: ip=$ip mac=$(cat /sys/class/net/$interface/address)" > /dev/console
exit 0
EOS
        chmod 755 /bin/dhcp-event
        dhcp() {
            ok=""
            for try in 1 2 3; do
                udhcpc -i "$1" -s /bin/dhcp-event -q -n -t 10 -T 3 >/dev/null 2>&1 && ok=1 && break
            done
            [ -n "$ok" ] || echo "cbsd-guest: no DHCP answer"
        }
        ( seen=""
          while true; do
            for d in /sys/class/net/eth*; do
                [ -e "$d/ifindex" ] || continue
                i=$(cat "$d/ifindex")
                case " $seen " in *" $i "*) continue ;; esac
                seen="$seen $i"
                ip link set "${d##*/}" up
                dhcp "${d##*/}" &
            done
            sleep 0.5
          done ) &
    else
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2
    fi
    mkdir -p /www && echo "cbsd-guest-http" > /www/index.html
    httpd -p 80 -h /www
fi
# Commands typed on the serial console (the tests write them to its socket):
#   ping ADDRESS  ->  "cbsd-guest: ping ADDRESS ok|failed"
#   net           ->  "cbsd-guest: net IFACE MAC" per network card, then "cbsd-guest: net end"
#   ifaddr IFACE ADDRESS/PREFIX  ->  "cbsd-guest: ifaddr IFACE ok|failed" (link up, address set)
( while read -r cmd arg arg2; do
    case "$cmd" in
    ping) if ping -c 1 -W 3 "$arg" >/dev/null 2>&1; then r=ok; else r=failed; fi
          echo "cbsd-guest: ping $arg $r" ;;
    net) for d in /sys/class/net/eth*; do
             [ -e "$d/address" ] && echo "cbsd-guest: net ${d##*/} $(cat "$d/address")"
         done
         echo "cbsd-guest: net end" ;;
    ifaddr) ip link set "$arg" up && ip addr add "$arg2" dev "$arg" 2>/dev/null
            if ip addr show dev "$arg" | grep -q "inet $arg2 "; then r=ok; else r=failed; fi
            echo "cbsd-guest: ifaddr $arg $r" ;;
    esac
  done < /dev/ttyS0 ) &

readdisk() {
    blockdev --flushbufs /dev/vda
    v=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -dc '0-9')
    echo "${v:-0}"
}
n=0
if [ -b /dev/vda ]; then
    last=$(readdisk)
    echo "cbsd-guest: disk=$last"
fi
while true; do
    n=$((n + 1))
    up=$(cut -d' ' -f1 /proc/uptime)
    if [ -b /dev/vda ]; then
        d=$(readdisk)
        if [ "$d" = "$last" ]; then ok=OK; else ok=BAD; fi
        echo "tick n=$n up=$up disk=$d $ok"
        printf '%-511s\n' "$n" | dd of=/dev/vda bs=512 count=1 conv=fsync,notrunc 2>/dev/null
        last=$n
    else
        echo "tick n=$n up=$up"
    fi
    sleep 0.5
done
