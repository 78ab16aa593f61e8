#!/usr/bin/env bash
# Seeds for fuzz/targets/fat.swift: small FAT12, FAT16 (4096-byte sectors) and FAT32 images made
# by mkfs.vfat and filled by mcopy, cut to their non-zero prefix (the target reads the rest of
# the volume as zeros). Needs dosfstools and mtools. Idempotent: existing seeds are kept.
set -euo pipefail
: "${SEEDS:?}" "${WORK:?}"
mkdir -p "$SEEDS" "$WORK/fat"
export MTOOLS_SKIP_CHECK=1 TZ=UTC LANG=C.UTF-8
src=$WORK/fat/src
if [ ! -d "$src" ]; then
    mkdir -p "$src.tmp/dir/sub" "$src.tmp/many"
    printf 'hello\n' >"$src.tmp/hello.txt"
    : >"$src.tmp/empty"
    printf 'x\n' >"$src.tmp/A long file name.text"
    printf 'u\n' >"$src.tmp/Ünïcödé.txt"
    printf 'l\n' >"$src.tmp/lower.txt"
    head -c 20000 /dev/urandom >"$src.tmp/dir/sub/data.bin"
    for i in $(seq 1 40); do printf '%s\n' "$i" >"$src.tmp/many/entry number $i.dat"; done
    mv "$src.tmp" "$src"
fi
mk() {  # mk NAME SIZE_KIB mkfs-options...
    local name=$1 kib=$2; shift 2
    local out=$SEEDS/$name
    [ -f "$out" ] && return 0
    local img=$WORK/fat/$name.img
    rm -f "$img"
    mkfs.vfat -n SEED -i 12345678 "$@" -C "$img" "$kib" >/dev/null
    mcopy -s -m -i "$img" "$src"/* ::/
    mattrib -i "$img" +r ::/hello.txt
    # Keep up to the last non-zero 512-byte block.
    local keep
    keep=$(python3 -c 'import sys
b = open(sys.argv[1], "rb").read()
n = len(b.rstrip(b"\0"))
print((n + 511) // 512 * 512)' "$img")
    head -c "$keep" "$img" >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -f "$img"
}
mk fat12-2k.seed 2000 -F 12 -s 2
mk fat12-4k-sectors.seed 4000 -F 12 -S 4096 -s 1
mk fat16.seed 4200 -F 16 -s 1 -r 64
mk fat32.seed 34000 -F 32 -s 1 -f 1
