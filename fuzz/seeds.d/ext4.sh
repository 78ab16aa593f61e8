#!/usr/bin/env bash
# Seeds for fuzz/targets/ext4.swift: small mke2fs images (ext2, ext3, ext4 with and without
# metadata_csum, inline data, 64bit, meta_bg; 1 KiB and 4 KiB blocks) holding a few files,
# directories and symlinks, cut after their last non-zero byte (the target reads the rest of
# its 64 MiB volume as zeros; the ext3 seed, over 1 MiB with its journal, is cut to 1 MiB by
# libFuzzer, which keeps all its metadata). Needs e2fsprogs and python3. Quick and idempotent: existing seeds are kept.
set -euo pipefail
: "${SEEDS:?}" "${WORK:?}"
mkdir -p "$SEEDS" "$WORK/ext4"
src=$WORK/ext4/src
if [ ! -d "$src" ]; then
    mkdir -p "$src/dir/sub" "$src/many"
    printf 'hello ext\n' >"$src/dir/sub/file"
    printf 'x' >"$src/tiny"
    : >"$src/empty"
    head -c 20000 /dev/urandom >"$src/medium"
    ln -s dir/sub/file "$src/short-link"
    ln -s "$(printf 'a%.0s' $(seq 1 120))" "$src/long-link"
    ln "$src/medium" "$src/dir/hard"
    for i in $(seq 1 40); do printf '%s' "$i" >"$src/many/entry-$i-with-a-longer-name"; done
fi
mk() {  # mk NAME mke2fs-options...
    local n=$1; shift
    local out=$SEEDS/$n
    [ -f "$out" ] && return 0
    local img=$WORK/ext4/$n.img
    rm -f "$img"
    mke2fs -q -F "$@" -d "$src" "$img" 4M >/dev/null 2>&1 || { echo "ext4 seed $n: mke2fs failed" >&2; return 0; }
    # Cut after the last non-zero 1 KiB block.
    local last
    last=$(python3 -c '
import sys
b = open(sys.argv[1], "rb").read()
end = len(b.rstrip(b"\0"))
print((end + 1023) // 1024)' "$img")
    head -c $((last * 1024)) "$img" >"$out.tmp" && mv "$out.tmp" "$out"
}
mk ext2-1k.img -t ext2 -b 1024 -I 128 -N 64
mk ext3-1k.img -t ext3 -b 1024 -N 64 -J size=1
mk ext4-1k.img -t ext4 -b 1024 -N 64 -O ^has_journal
mk ext4-1k-nocsum.img -t ext4 -b 1024 -N 64 -O ^metadata_csum,^has_journal
mk ext4-1k-inline.img -t ext4 -b 1024 -N 64 -O inline_data,^has_journal
mk ext4-4k.img -t ext4 -b 4096 -N 64 -O ^has_journal
mk ext4-1k-metabg.img -t ext4 -b 1024 -N 64 -O meta_bg,^resize_inode,^has_journal
mk ext4-1k-blockmap.img -t ext4 -b 1024 -N 64 -O ^extent,^64bit,^metadata_csum,^has_journal
