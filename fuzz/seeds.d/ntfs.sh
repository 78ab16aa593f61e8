#!/usr/bin/env bash
# Seeds for fuzz/targets/ntfs.swift: small real NTFS volumes made by mkntfs (+ ntfscp, and an
# ntfs-3g mount when FUSE works), written in the page-list encoding of NTFSFuzzInput (u32 LE
# volume size, then u16 LE page number + 4096 bytes for every page that is not all zero or
# all 0xFF).
# Needs SEEDS (output directory) and WORK (scratch); idempotent.
set -euo pipefail
: "${SEEDS:?}" "${WORK:?}"
command -v mkntfs >/dev/null || { echo "ntfs seeds: mkntfs missing, skipped" >&2; exit 0; }
W=$WORK/ntfs
mkdir -p "$W" "$SEEDS"

encode() {  # encode IMAGE OUT
    python3 - "$1" "$2" <<'PY'
import struct, sys
data = open(sys.argv[1], 'rb').read()
out = [struct.pack('<I', len(data))]
def upcase(page):
    # $UpCase (128 KiB the reader never reads): u16 values that mostly count up by one.
    v = struct.unpack('<2048H', page)
    return sum(1 for j in range(2047) if v[j + 1] == v[j] + 1) > 1500
for i in range(0, len(data), 4096):
    page = data[i:i + 4096]
    # All-zero pages are left out, and so are pages the reader never looks at: all-0xFF ones
    # ($LogFile's empty pages) and the $UpCase table; this keeps seeds small and fast.
    if page.strip(b'\0') and page.strip(b'\xff') and (len(page) < 4096 or not upcase(page)):
        out.append(struct.pack('<H', i // 4096) + page)
open(sys.argv[2], 'wb').write(b''.join(out))
PY
}

make_plain() {  # make_plain NAME SIZE CLUSTER
    local name=$1 size=$2 cluster=$3 img=$W/$1.img
    [ -f "$SEEDS/$name.pages" ] && return 0
    rm -f "$img"
    truncate -s "$size" "$img"
    mkntfs -F -f -q -s 512 -c "$cluster" -L seed "$img" >/dev/null 2>&1
    printf 'resident\n' >"$W/small.txt"
    head -c 20000 /dev/urandom >"$W/data.bin"
    ntfscp -f "$img" "$W/small.txt" small.txt >/dev/null 2>&1
    ntfscp -f "$img" "$W/data.bin" data.bin >/dev/null 2>&1
    encode "$img" "$SEEDS/$name.pages"
}

make_plain plain-4k 2M 4096
make_plain plain-512 2M 512

# A richer volume through ntfs-3g: a directory with an index allocation, a compressed file, a
# sparse file, a symlink and hard links.
if [ ! -f "$SEEDS/rich.pages" ] && command -v ntfs-3g >/dev/null && [ -e /dev/fuse ]; then
    img=$W/rich.img mnt=$W/mnt.$$
    rm -f "$img"; truncate -s 3M "$img"
    mkntfs -F -f -q -s 512 -c 1024 -L rich "$img" >/dev/null 2>&1
    mkdir -p "$mnt"
    if ntfs-3g -o compression "$img" "$mnt" 2>/dev/null; then
        (
            set +e
            mkdir "$mnt/dir" "$mnt/comp"
            for i in $(seq 1 60); do echo "$i" >"$mnt/dir/file-with-a-long-name-$i"; done
            python3 -c "import os; os.setxattr('$mnt/comp', 'system.ntfs_attrib_be', bytes.fromhex('00000800'))"
            yes 'compressible line' | head -c 70000 >"$mnt/comp/text"
            dd if=/dev/urandom of="$mnt/sparse" bs=1024 count=1 seek=300 status=none
            ln -s dir/file-with-a-long-name-1 "$mnt/link"
            ln "$mnt/dir/file-with-a-long-name-2" "$mnt/hard"
        )
        fusermount -u "$mnt"
        sleep 1
        encode "$img" "$SEEDS/rich.pages"
    fi
    rmdir "$mnt" 2>/dev/null || true
fi
exit 0
