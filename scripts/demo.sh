#!/usr/bin/env bash
# Cairn demo: builds a small but real VM disk (GPT + ext4 holding real files), backs it up,
# changes it, backs it up again, backs up a clone of it as a second VM, shows snapshots and
# deduplication, restores, and proves the restore equal with qemu-img compare and e2fsck.
# Everything happens under ./demo-work (removed and rebuilt on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
scripts/install-deps.sh

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building cairn (release)"
swift build -c release --static-swift-stdlib 2>&1 | grep -E "error|warning: unre|Compiling cairn|Build complete" || true
CAIRN="$(swift build -c release --static-swift-stdlib --show-bin-path)/cairn"
[ -x "$CAIRN" ] || { echo "build failed" >&2; exit 1; }

WORK="$ROOT/demo-work"
rm -rf "$WORK"
mkdir -p "$WORK/tree"
cd "$WORK"

step "making a VM disk: 512 MiB raw, GPT, one ext4 partition with real files"
# A guest file system populated from this machine's own files (documentation, programs)
# plus a little random data, without mounting anything (mke2fs -d).
mkdir -p tree/etc tree/usr/share tree/usr/bin tree/var/log tree/home/demo
cp -r /usr/share/doc tree/usr/share/ 2>/dev/null || true
cp /usr/bin/[a-f]* tree/usr/bin/ 2>/dev/null || true
echo "web01" > tree/etc/hostname
head -c 8M /dev/urandom > tree/home/demo/random.bin
seq 1 200000 | sed 's/^/log line /' > tree/var/log/app.log
truncate -s 512M vm1.raw
printf 'label: gpt\nstart=2048, type=L\n' | sfdisk -q vm1.raw
mke2fs -q -t ext4 -L demo-root -d tree -E offset=1048576 vm1.raw 510M
sfdisk -l vm1.raw | sed -n '1p;/^Device/,$p'
echo "file system usage: $(du -sh tree | cut -f1) of files in 512 MiB (the rest is free space)"

export CAIRN_REPO="$WORK/repo" CAIRN_PASSWORD="demo-password"

step "cairn init (encrypted with AES-256-GCM, password from CAIRN_PASSWORD)"
"$CAIRN" init

step "first backup of VM web01"
"$CAIRN" backup --vm web01 --tag demo disk0=vm1.raw

step "the guest changes: a new 4 MiB file, an appended log, a deleted file"
head -c 4M /dev/urandom > new-data.bin
seq 200001 220000 | sed 's/^/log line /' > more.log
cat tree/var/log/app.log more.log > app.log
debugfs -w -f - "vm1.raw?offset=1048576" >/dev/null 2>&1 <<CMDS
write new-data.bin /home/demo/new-data.bin
rm /var/log/app.log
write app.log /var/log/app.log
rm /etc/hostname
CMDS

step "second backup of web01: only changed chunks are stored"
"$CAIRN" backup --vm web01 --tag demo disk0=vm1.raw

step "a clone of the same template as VM web02, converted to qcow2: deduplicated against web01"
qemu-img convert -O qcow2 vm1.raw vm2.qcow2
"$CAIRN" backup --vm web02 disk0=vm2.qcow2

step "cairn snapshots"
"$CAIRN" snapshots

step "cairn stats"
"$CAIRN" stats

step "restore the latest web01 snapshot to a sparse raw file and to qcow2"
"$CAIRN" restore latest --vm web01 --to restored.raw
"$CAIRN" restore latest --vm web01 --to restored.qcow2 --format qcow2

step "proof: qemu-img compare, qemu-img check, e2fsck, a file read back from the restored disk"
qemu-img compare vm1.raw restored.raw
qemu-img compare vm1.raw restored.qcow2
qemu-img check -q restored.qcow2 && echo "qemu-img check: restored.qcow2 has no errors"
e2fsck -fn "restored.raw?offset=1048576" >/dev/null 2>&1 && echo "e2fsck -fn: the restored file system is clean"
debugfs -R "cat /home/demo/new-data.bin" "restored.raw?offset=1048576" 2>/dev/null | cmp - new-data.bin \
  && echo "/home/demo/new-data.bin read from the restored disk equals the original"

step "cairn check --read-data (every chunk decrypted and digest-checked)"
"$CAIRN" check --read-data

echo
echo "demo finished: everything above was done by $CAIRN on files under $WORK"
