#!/usr/bin/env bash
# Makes a small bootable VM disk for the instant-restore and verification tests (see
# ../shared/TESTBED.md): 64 MiB raw, MBR, one FAT16 partition with syslinux, Debian's cloud
# kernel and a busybox initramfs whose /init
#   - prints CAIRN-HEARTBEAT on the serial console,
#   - writes the line CAIRN-GUEST-WROTE-THIS into the last MiB of the disk (/dev/vda),
#   - flushes and powers off.
# and a variant for live migration whose kernel command line adds `cairn.stay`: after its
# write it prints CAIRN-STAYING and, instead of powering off, stays up writing a tick
# (CAIRN-TICK-00000001, ...; each made durable, then printed as "CAIRN-TICK n") every second
# into the disk 4 KiB after the first marker.
#
#   scripts/make-boot-vm.sh OUTDIR       -> OUTDIR/boot.raw and OUTDIR/boot-stay.raw (kept and
#                                           reused when present); prints the boot.raw path
#
# Needs (scripts/install-deps.sh installs them): syslinux, syslinux-common, busybox-static,
# dosfstools, mtools, fdisk; the kernel comes from `apt-get download` (a Debian mirror).
# Module load order matters: virtio_ring before virtio.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: make-boot-vm.sh OUTDIR}")
mkdir -p "$OUT"
[ -f "$OUT/boot.raw" ] && [ -f "$OUT/boot-stay.raw" ] && { echo "$OUT/boot.raw"; exit 0; }
W=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W"

# Kernel and its virtio modules from Debian's cloud kernel package.
pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1)
[ -n "$pkg" ] || { echo "no linux-image-*-cloud-amd64 package found" >&2; exit 1; }
apt-get download "$pkg" >/dev/null 2>&1
dpkg -x ./*.deb kernel
vmlinuz=$(ls kernel/boot/vmlinuz-*)
kver=${vmlinuz##*/vmlinuz-}
mods=kernel/lib/modules/$kver/kernel

# Initramfs: busybox, the virtio block modules, /init.
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/lib/modules
cp /bin/busybox initrd/bin/busybox
for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_pci_modern_dev.ko \
         drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
         net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/char/virtio_console.ko; do
    for f in "$mods/$m" "$mods/$m.xz" "$mods/$m.zst"; do
        [ -f "$f" ] || continue
        case $f in
            *.xz) xz -dc "$f" >"initrd/lib/modules/$(basename "$m")" ;;
            *.zst) zstd -qdc "$f" >"initrd/lib/modules/$(basename "$m")" ;;
            *) cp "$f" "initrd/lib/modules/" ;;
        esac
    done
done
cat >initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
# Sandbox test switches (Tests/CLITests/SandboxTests.swift).
# cairn.hang: never prints the heartbeat; sleeps forever.
if grep -qw cairn.hang /proc/cmdline; then
    echo "CAIRN-HANGING" >/dev/ttyS0
    while true; do sleep 3600; done
fi
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline; }
# cairn.net=PORT [cairn.hostip=IP]: brings up eth0 by DHCP, tries TCP to the user-net gateway
# 10.0.2.2:PORT and IP:PORT, prints CAIRN-NET-REACHED or CAIRN-NET-BLOCKED for each (or
# CAIRN-NET-NO-NIC), then the heartbeat, then stays up. cairn.listen=PORT: answers every TCP
# connection on PORT with the line CAIRN-GUEST-BANNER and accepts connections on PORT+1
# without sending anything (stays up too).
netport=$(arg cairn.net)
listenport=$(arg cairn.listen)
if [ -n "$netport" ] || [ -n "$listenport" ]; then
    for m in failover net_failover virtio_net; do
        [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
    done
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
    echo "CAIRN-NET-INTERFACES $(ls /sys/class/net | tr '\n' ' ')" >/dev/ttyS0
    if [ -e /sys/class/net/eth0 ]; then
        ip link set lo up
        ip link set eth0 up
        mkdir -p /tmp
        printf '#!/bin/sh\n[ "$1" = bound ] || [ "$1" = renew ] || exit 0\nifconfig "$interface" "$ip" netmask "$subnet"\n[ -n "$router" ] && route add default gw "$router"\nexit 0\n' >/tmp/dhcp.sh
        chmod +x /tmp/dhcp.sh
        udhcpc -i eth0 -n -q -t 10 -T 1 -s /tmp/dhcp.sh >/dev/null 2>&1
        echo "CAIRN-NET-ADDRESS $(ip -4 -o addr show eth0 | awk '{print $4}')" >/dev/ttyS0
        if [ -n "$listenport" ]; then
            printf '#!/bin/sh\necho CAIRN-GUEST-BANNER\n' >/tmp/banner.sh
            printf '#!/bin/sh\nexec sleep 3600\n' >/tmp/silent.sh
            chmod +x /tmp/banner.sh /tmp/silent.sh
            nc -ll -p "$listenport" -e /tmp/banner.sh >/dev/null 2>&1 &
            nc -ll -p "$((listenport + 1))" -e /tmp/silent.sh >/dev/null 2>&1 &
        fi
        if [ -n "$netport" ]; then
            for target in 10.0.2.2 $(arg cairn.hostip); do
                if nc -w 3 "$target" "$netport" -e /bin/true >/dev/null 2>&1; then
                    echo "CAIRN-NET-REACHED $target:$netport" >/dev/ttyS0
                else
                    echo "CAIRN-NET-BLOCKED $target:$netport" >/dev/ttyS0
                fi
            done
        fi
    else
        echo "CAIRN-NET-NO-NIC" >/dev/ttyS0
    fi
fi
# cairn.fakeagent: a minimal stand-in for qemu-ga on the org.qemu.guest_agent.0 port that
# answers guest-sync-delimited and guest-ping (stays up).
if grep -qw cairn.fakeagent /proc/cmdline; then
    insmod /lib/modules/virtio_console.ko 2>/dev/null
    (
        port=
        while [ -z "$port" ]; do
            for p in /sys/class/virtio-ports/*; do
                [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
            done
            [ -n "$port" ] && [ -c "$port" ] || { port=; sleep 0.2; }
        done
        exec 3<>"$port"
        while true; do
            while IFS= read -r line <&3; do
                id=$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
                case $line in
                    *guest-sync-delimited*) printf '\377{"return": %s}\n' "$id" >&3 ;;
                    *guest-sync*) printf '{"return": %s}\n' "$id" >&3 ;;
                    *guest-ping*) printf '{"return": {}}\n' >&3 ;;
                    *'"execute"'*) printf '{"error": {"class": "CommandNotFound", "desc": "fake agent"}}\n' >&3 ;;
                esac
            done
            sleep 0.2
        done
    ) &
    echo "CAIRN-FAKE-AGENT" >/dev/ttyS0
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "CAIRN-HEARTBEAT" >/dev/ttyS0
if [ -b /dev/vda ]; then
    size=$(cat /sys/block/vda/size)
    echo "CAIRN-GUEST-WROTE-THIS" | dd of=/dev/vda bs=512 seek=$((size - 2048)) conv=notrunc,fsync 2>/dev/null
    sync
    echo "CAIRN-WROTE-DISK" >/dev/ttyS0
fi
if grep -qw cairn.stay /proc/cmdline; then
    echo "CAIRN-STAYING" >/dev/ttyS0
    n=0
    while true; do
        n=$((n + 1))
        if [ -b /dev/vda ]; then
            printf 'CAIRN-TICK-%08d\n' $n | dd of=/dev/vda bs=512 seek=$((size - 2048 + 8)) conv=notrunc,fsync 2>/dev/null
        fi
        echo "CAIRN-TICK $n" >/dev/ttyS0
        sleep 1
    done
fi
if [ -n "$netport" ] || [ -n "$listenport" ] || grep -qw cairn.fakeagent /proc/cmdline; then
    echo "CAIRN-STAYING" >/dev/ttyS0
    while true; do sleep 3600; done
fi
poweroff -f
INIT
chmod +x initrd/init
(cd initrd && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >initrd.img

cat >syslinux.cfg <<'CFG'
SERIAL 0 115200
DEFAULT linux
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 quiet panic=-1
CFG
cp "$vmlinuz" vmlinuz
truncate -s 64M disk.raw
echo 'start=2048, size=120832, type=6, bootable' | sfdisk -q --label dos disk.raw
mkfs.vfat -F 16 --offset 2048 disk.raw 60416 >/dev/null
syslinux --install --offset 1048576 disk.raw
dd if=/usr/lib/syslinux/mbr/mbr.bin of=disk.raw bs=440 count=1 conv=notrunc status=none
MTOOLS_SKIP_CHECK=1 mcopy -i disk.raw@@1M vmlinuz initrd.img syslinux.cfg ::/
# The staying variant: the same disk with `cairn.stay` on the kernel command line.
cp disk.raw stay.raw
sed 's/panic=-1$/panic=-1 cairn.stay/' syslinux.cfg >stay.cfg
MTOOLS_SKIP_CHECK=1 mcopy -o -i stay.raw@@1M stay.cfg ::/syslinux.cfg
mv stay.raw "$OUT/boot-stay.raw"
mv disk.raw "$OUT/boot.raw"
echo "$OUT/boot.raw"
