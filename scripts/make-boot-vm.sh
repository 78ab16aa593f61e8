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
# A third variant, boot-agent.raw, runs the QEMU guest agent (qemu-ga from Debian's
# qemu-guest-agent package, with its shared libraries, in its own initramfs) for the
# guest-agent and live-backup tests. Its disk is 64 MiB as well, with a second partition
# (sectors 122880-129023, 3 MiB, type 83) holding an ext4 file system (label cairn-data,
# one file README) that the guest mounts on /mnt/data, so `guest-fsfreeze-freeze` freezes
# one real file system (ext4 is built into the cloud kernel). Its /init
#   - prints CAIRN-HEARTBEAT, writes CAIRN-GUEST-WROTE-THIS as above (CAIRN-WROTE-DISK),
#   - mounts the ext4 (CAIRN-DATA-MOUNTED),
#   - starts qemu-ga on the virtio-serial port named org.qemu.guest_agent.0 and prints
#     CAIRN-AGENT-UP once qemu-ga has the port open (CAIRN-AGENT-FAILED if it has not),
#   - prints CAIRN-STAYING and then, every second, for n = 1, 2, 3, ... up to 1500:
#       1. writes the 512-byte record "CAIRN-LOG-%08d" (padded with newlines) at byte
#          offset LOG + n*512, fsync;
#       2. writes the 512-byte record "CAIRN-COUNT-%08d" (padded likewise) at byte offset
#          COUNT, fsync;
#       3. writes the old tick CAIRN-TICK-%08d 4 KiB after the first marker, as boot-stay;
#       4. prints "CAIRN-TICK n" on ttyS0.
#     After n = 1500 it keeps printing ticks without writing records.
#   With SIZE the disk size in bytes (64 MiB):
#       first marker  SIZE - 1 MiB               (CAIRN-GUEST-WROTE-THIS, 512 bytes)
#       old tick      SIZE - 1 MiB + 4 KiB       (512 bytes)
#       COUNT         SIZE - 1 MiB + 64 KiB      (512 bytes)
#       LOG           COUNT + 4 KiB = SIZE - 1 MiB + 68 KiB; record n at LOG + n*512
#                     (n <= 1500: the last record ends 818 KiB into the last MiB)
#   A point-in-time copy of the disk has COUNT = k and exactly the records 1..k, perhaps
#   k+1 (a record is written before the count), and none beyond k+1.
#   Host side of the agent channel:
#       -chardev socket,path=SOCK,server=on,wait=off,id=qga0 -device virtio-serial-pci
#       -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
#
#   scripts/make-boot-vm.sh OUTDIR       -> OUTDIR/boot.raw, OUTDIR/boot-stay.raw and
#                                           OUTDIR/boot-agent.raw (kept and reused when
#                                           present; a missing one is made); prints the
#                                           boot.raw path
#
# Needs (scripts/install-deps.sh installs them): syslinux, syslinux-common, busybox-static,
# dosfstools, mtools, fdisk, e2fsprogs; the kernel and qemu-guest-agent come from
# `apt-get download` (a Debian mirror), and so do the libraries qemu-ga links when this
# host lacks them (qemu-system-x86 brings them all). Module load order matters: virtio_ring
# before virtio. Concurrent runs on one OUTDIR take turns (flock) and reuse each other's work.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: make-boot-vm.sh OUTDIR}")
mkdir -p "$OUT"
complete() { [ -f "$OUT/boot.raw" ] && [ -f "$OUT/boot-stay.raw" ] && [ -f "$OUT/boot-agent.raw" ]; }
complete && { echo "$OUT/boot.raw"; exit 0; }
exec 9>"$OUT/.make-boot-vm.lock"
flock 9
complete && { echo "$OUT/boot.raw"; exit 0; }
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

# copy_module DIR MODULE: the module (path under kernel/), decompressed, into DIR.
copy_module() {
    local f
    for f in "$mods/$2" "$mods/$2.xz" "$mods/$2.zst"; do
        [ -f "$f" ] || continue
        case $f in
            *.xz) xz -dc "$f" >"$1/$(basename "$2")" ;;
            *.zst) zstd -qdc "$f" >"$1/$(basename "$2")" ;;
            *) cp "$f" "$1/" ;;
        esac
    done
}

# Initramfs: busybox, the virtio block modules, /init.
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/lib/modules
cp /bin/busybox initrd/bin/busybox
for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_pci_modern_dev.ko \
         drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
         net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/char/virtio_console.ko; do
    copy_module initrd/lib/modules "$m"
done

cat >syslinux.cfg <<'CFG'
SERIAL 0 115200
DEFAULT linux
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 quiet panic=-1
CFG
cp "$vmlinuz" vmlinuz

# fat_disk IMAGE INITRD SIZE [SFDISK-LINE...]: a bootable MBR disk of SIZE whose first
# partition (sectors 2048-122879) is FAT16 with syslinux, the kernel and INITRD as /initrd.img.
fat_disk() {
    local image=$1 initrd=$2 size=$3
    shift 3
    truncate -s "$size" "$image"
    printf '%s\n' 'start=2048, size=120832, type=6, bootable' "$@" | sfdisk -q --label dos "$image"
    mkfs.vfat -F 16 --offset 2048 "$image" 60416 >/dev/null
    syslinux --install --offset 1048576 "$image"
    dd if=/usr/lib/syslinux/mbr/mbr.bin of="$image" bs=440 count=1 conv=notrunc status=none
    cp "$initrd" initrd.img
    MTOOLS_SKIP_CHECK=1 mcopy -o -i "$image@@1M" vmlinuz initrd.img syslinux.cfg ::/
}

if [ ! -f "$OUT/boot.raw" ] || [ ! -f "$OUT/boot-stay.raw" ]; then
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
(cd initrd && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >initrd-base.img
fat_disk disk.raw initrd-base.img 64M
# The staying variant: the same disk with `cairn.stay` on the kernel command line.
cp disk.raw stay.raw
sed 's/panic=-1$/panic=-1 cairn.stay/' syslinux.cfg >stay.cfg
MTOOLS_SKIP_CHECK=1 mcopy -o -i stay.raw@@1M stay.cfg ::/syslinux.cfg
mv stay.raw "$OUT/boot-stay.raw"
mv disk.raw "$OUT/boot.raw"
fi

if [ ! -f "$OUT/boot-agent.raw" ]; then
# qemu-ga and the shared libraries it links, as ldd resolves them on this host. A library
# this host lacks comes from the package qemu-ga (or a library package) depends on,
# downloaded and extracted under deps/, for up to three rounds of dependencies.
apt-get download qemu-guest-agent >/dev/null 2>&1
qga_deb=$(ls qemu-guest-agent_*.deb)
dpkg -x "$qga_deb" qga
qga=qga/usr/sbin/qemu-ga
[ -x "$qga" ] || { echo "$qga_deb has no usr/sbin/qemu-ga" >&2; exit 1; }
deplibs="$W/deps/lib/x86_64-linux-gnu:$W/deps/usr/lib/x86_64-linux-gnu"
qga_ldd() { LD_LIBRARY_PATH=$deplibs ldd "$qga" 2>&1 || true; }
wanted=$(dpkg-deb -f "$qga_deb" Depends)
round=0
while case "$(qga_ldd)" in *"not found"*) true ;; *) false ;; esac; do
    round=$((round + 1))
    if [ $round -gt 3 ]; then
        echo "qemu-ga needs libraries that neither this host nor the downloaded packages have:" >&2
        qga_ldd | grep 'not found' >&2
        exit 1
    fi
    next=""
    for p in $(printf '%s\n' "$wanted" | tr ',' '\n' | sed 's/[(|].*//; s/:.*//; s/[[:space:]]//g'); do
        case $p in ''|libc6) continue ;; esac
        [ -e "deps/.got-$p" ] && continue
        mkdir -p deps dl
        (cd dl && apt-get download "$p" >/dev/null 2>&1) || continue
        deb=$(ls dl/"${p}"_*.deb | head -1)
        dpkg -x "$deb" deps
        touch "deps/.got-$p"
        next="$next,$(dpkg-deb -f "$deb" Depends)"
    done
    wanted=$next
done

mkdir -p initrd-agent
cp -a initrd/. initrd-agent/
copy_module initrd-agent/lib/modules drivers/char/virtio_console.ko
mkdir -p initrd-agent/lib/x86_64-linux-gnu initrd-agent/lib64 initrd-agent/mnt/data initrd-agent/run initrd-agent/tmp
cp "$qga" initrd-agent/bin/qemu-ga
qga_ldd | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
    cp -L "$lib" initrd-agent/lib/x86_64-linux-gnu/
done
interp=$(qga_ldd | awk '$1 ~ /^\/.*ld-linux/ { print $1 }')
[ -n "$interp" ] || { echo "ldd names no dynamic loader for qemu-ga" >&2; exit 1; }
cp -L "$interp" "initrd-agent/lib64/$(basename "$interp")"

cat >initrd-agent/init <<'INIT'
#!/bin/busybox sh
# boot-agent.raw (scripts/make-boot-vm.sh): qemu-ga, an ext4 to freeze, a point-in-time log.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "CAIRN-HEARTBEAT" >/dev/ttyS0
size=0
if [ -b /dev/vda ]; then
    size=$(cat /sys/block/vda/size)
    echo "CAIRN-GUEST-WROTE-THIS" | dd of=/dev/vda bs=512 seek=$((size - 2048)) conv=notrunc,fsync 2>/dev/null
    sync
    echo "CAIRN-WROTE-DISK" >/dev/ttyS0
fi
if [ -b /dev/vda2 ] && mount -t ext4 /dev/vda2 /mnt/data 2>/dev/null; then
    echo "CAIRN-DATA-MOUNTED" >/dev/ttyS0
fi
# No udev: find the /dev/vportNpM whose name is org.qemu.guest_agent.0.
port=""
i=0
while [ -z "$port" ] && [ $i -lt 50 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] && [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] || { sleep 0.1; i=$((i + 1)); }
done
up=""
if [ -n "$port" ]; then
    i=0
    while [ ! -c "$port" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    qemu-ga -m virtio-serial -p "$port" -t /run -l /run/qemu-ga.log </dev/null >/dev/null 2>&1 &
    pid=$!
    i=0
    while [ -z "$up" ] && [ $i -lt 100 ] && [ -d /proc/$pid ]; do
        for fd in /proc/$pid/fd/*; do [ "$(readlink "$fd")" = "$port" ] && up=1; done
        [ -n "$up" ] || { sleep 0.1; i=$((i + 1)); }
    done
fi
if [ -n "$up" ]; then echo "CAIRN-AGENT-UP" >/dev/ttyS0; else echo "CAIRN-AGENT-FAILED port=$port" >/dev/ttyS0; fi
echo "CAIRN-STAYING" >/dev/ttyS0
head -c 512 /dev/zero | tr '\0' '\n' >/run/pad
# record TEXT SECTOR: TEXT padded with newlines to 512 bytes, written at SECTOR, fsync.
record() { { printf '%s' "$1"; cat /run/pad; } | dd of=/dev/vda bs=512 count=1 iflag=fullblock seek=$2 conv=notrunc,fsync 2>/dev/null; }
count=$((size - 2048 + 128))
log=$((count + 8))
n=0
while true; do
    n=$((n + 1))
    if [ "$size" -gt 0 ] && [ $n -le 1500 ]; then
        record "$(printf 'CAIRN-LOG-%08d' $n)" $((log + n))
        record "$(printf 'CAIRN-COUNT-%08d' $n)" $count
        printf 'CAIRN-TICK-%08d\n' $n | dd of=/dev/vda bs=512 seek=$((size - 2048 + 8)) conv=notrunc,fsync 2>/dev/null
    fi
    echo "CAIRN-TICK $n" >/dev/ttyS0
    sleep 1
done
INIT
chmod +x initrd-agent/init
(cd initrd-agent && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >initrd-agent.img

# The ext4 that qemu-ga freezes, on the second partition (sectors 122880-129023).
mkdir -p data
echo "Cairn guest-agent test VM: the file system that guest-fsfreeze-freeze freezes." >data/README
mke2fs -q -F -t ext4 -L cairn-data -d data data.ext4 3M >/dev/null
fat_disk agent.raw initrd-agent.img 64M 'start=122880, size=6144, type=83'
dd if=data.ext4 of=agent.raw bs=1M seek=60 conv=notrunc status=none
mv agent.raw "$OUT/boot-agent.raw"
fi
echo "$OUT/boot.raw"
