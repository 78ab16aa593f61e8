#!/usr/bin/env bash
# Installs the Debian packages Cairn's build, demo and tests need (idempotent, quick when
# everything is present). Runs apt-get as root, or through sudo when available.
set -euo pipefail

packages=(
  libzstd-dev zlib1g-dev pkg-config   # build: zstd and zlib (qcow2 deflate clusters)
  qemu-utils                          # qemu-img / qemu-io: the referee for disk formats
  e2fsprogs fdisk                     # mke2fs -d, e2fsck, debugfs, sfdisk: guest fixtures
  dosfstools mtools                   # mkfs.vfat, fsck.fat, mcopy/mdir: FAT fixtures and referee
  xfsprogs                            # mkfs.xfs, xfs_db, xfs_repair: XFS fixtures and referee
  ntfs-3g                             # mkntfs, ntfscp, ntfsls, ntfs-3g (FUSE): NTFS fixtures and referee
  lvm2                                # pvcreate/vgcreate/lvcreate (metadata only, no device-mapper): LVM fixtures
  util-linux                          # mkswap, losetup, blkid
  attr python3 perl                   # setfattr (NTFS attributes via ntfs-3g), fuzz seed cutting
  qemu-system-x86 libnbd-bin          # instant restore: the VM, and nbdinfo/nbdcopy as NBD clients in tests
  syslinux syslinux-common busybox-static   # the small bootable test VM (scripts/make-boot-vm.sh)
  strace                              # the write-order test watches the syscalls of a backup
  nbdkit qemu-system-common           # live backups: nbdkit and qemu-storage-daemon as NBD/QMP peers in tests
  fuse3                               # fusermount3: cairn verify maps NBD exports to files with nbdfuse
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
