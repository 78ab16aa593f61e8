#!/usr/bin/env bash
# Seeds for fuzz/targets/xfs.swift: small mkfs.xfs images filled from a protofile (no mount
# needed), cut into the target's encoding: every non-zero 512-byte sector except the log past its
# first 64 sectors (where a fresh log ends with its unmount record), as
# a 4-byte big-endian sector number and the sector. Needs xfsprogs and perl; idempotent.
set -euo pipefail
: "${SEEDS:?}" "${WORK:?}"
mkdir -p "$SEEDS" "$WORK/xfs"
W=$WORK/xfs
# mkfs.xfs refuses file systems under 300 MB unless it believes it runs under xfstests.
export TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1

src=$W/src
if [ ! -d "$src" ]; then
    mkdir -p "$src.tmp"
    printf 'hello xfs\n' >"$src.tmp/small.txt"
    head -c 20000 /dev/zero | tr '\0' 'x' >"$src.tmp/medium.txt"
    mv "$src.tmp" "$src"
fi
long=$(printf 'long-target-%.0s' $(seq 1 20))   # inline: mkfs 6.1 writes v5 remote symlinks without their header
proto() {  # proto ENTRIES: a protofile with ENTRIES files in one directory
    printf '/dev/null\n0 0\nd--755 0 0\n'
    printf 'small.txt ---644 1000 1000 %s\n' "$src/small.txt"
    printf 'medium.txt ---600 0 0 %s\n' "$src/medium.txt"
    printf 'empty ---644 0 0 /dev/null\n'
    printf 'link l--777 0 0 small.txt\n'
    printf 'longlink l--777 0 0 %s\n' "$long"
    printf 'setuid -u-755 0 0 %s\n' "$src/small.txt"
    printf 'null c--666 0 0 1 3\n'
    printf 'loop b--660 0 6 7 0\n'
    printf 'pipe p--644 0 0\n'
    printf 'sub d--755 0 0\n inner ---644 0 0 %s\n $\n' "$src/small.txt"
    printf 'dir d--700 0 0\n'
    for i in $(seq 1 "$1"); do printf ' entry-with-a-long-name-%04d ---644 0 0 /dev/null\n' "$i"; done
    printf ' $\n$\n'
}
cut() {  # cut IMAGE OUT
    perl -e '
        my ($img, $out, $logstart, $logend) = @ARGV;
        open(my $in, "<:raw", $img) or die; open(my $o, ">:raw", "$out.tmp") or die;
        my ($buf, $n) = ("", 0);
        while (read($in, $buf, 512) == 512) {
            print $o pack("N", $n), $buf if $buf =~ /[^\0]/ && !($n >= $logstart + 64 && $n < $logend);
            $n++;
        }
        close($o); rename("$out.tmp", $out) or die;
    ' "$1" "$2" "$3" "$4"
}
make() {  # make NAME ENTRIES MKFS-ARGS...
    local name=$1 entries=$2; shift 2
    [ -f "$SEEDS/$name" ] && return 0
    local img=$W/$name.img
    rm -f "$img"
    truncate -s 16M "$img"
    proto "$entries" >"$W/$name.proto"
    mkfs.xfs -q -f -p "$W/$name.proto" "$@" "$img"
    local info bs logstart logblocks agblocks
    info=$(xfs_db -r -c "sb 0" -c "p blocksize logstart logblocks agblocks agblklog" "$img")
    bs=$(awk '$1=="blocksize"{print $3}' <<<"$info")
    logstart=$(awk '$1=="logstart"{print $3}' <<<"$info")
    logblocks=$(awk '$1=="logblocks"{print $3}' <<<"$info")
    agblocks=$(awk '$1=="agblocks"{print $3}' <<<"$info")
    local agblklog agno agbno
    agblklog=$(awk '$1=="agblklog"{print $3}' <<<"$info")
    agno=$((logstart >> agblklog)); agbno=$((logstart & ((1 << agblklog) - 1)))
    local first=$(((agno * agblocks + agbno) * bs / 512))
    cut "$img" "$SEEDS/$name" "$first" $((first + logblocks * bs / 512))
}
make v5-4k 20                                   # short-form and block directories
make v5-1k-node 400 -b size=1024                # leaf/node directory with 1 KiB blocks
make v5-dirblk 150 -b size=1024 -n size=4096    # directory blocks of four file system blocks
make v5-nrext64 30 -i nrext64=1 -m bigtime=0    # 64-bit extent counters, classic timestamps
make v4-dirv2 60 -m crc=0                        # v4: no checksums, short headers
ls "$SEEDS" >/dev/null
