#!/usr/bin/env bash
# Builds the benchmark corpus: realistic VM disk images made from a Debian bookworm minbase tree.
#
#   bench/make-corpus.sh [WORKDIR]        (WORKDIR defaults to bench/work, which is gitignored)
#
# Outputs, in WORKDIR/corpus-$BENCH_SIZE/:
#   base.raw    sparse raw disk (GPT, one ext4 partition at 1 MiB filling the disk) holding the
#               debootstrap tree; built with `mke2fs -d`, never mounted.
#   clone.raw   a second VM from the same template: a copy of base.raw plus ~200 MB of new files
#               (random "binaries", generated logs and CSV data, a tar of part of /usr/share)
#               added through a loop mount, so most blocks stay identical to base.
#   day2.raw    base.raw one day later: ~2 % of the file data rewritten in place (dd conv=notrunc
#               through a loop mount, blocks keep their place), log lines appended to /var/log/*,
#               ~50 MB of new files.
#   base.qcow2, day2.qcow2   qemu-img convert copies (for the Cairn qcow2 runs).
#   corpus.info shell-sourceable facts about the corpus (sizes, used bytes) for run.sh.
#
# Environment: BENCH_SIZE=4G (default) | 512M (smoke); new-file volumes scale with the disk size.
# BENCH_MIRROR overrides the Debian mirror otherwise parsed from the apt sources.
#
# Idempotent: a step is skipped when its output exists and is newer than its inputs. All random
# content comes from fixed seeds, so reruns produce the same data. Interrupted steps leave only
# *.tmp files, which the next run discards. Needs root (debootstrap, losetup, mount).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORKDIR=$(realpath -m "${1:-$BENCH_DIR/work}")
CACHE=$WORKDIR/cache
CORPUS=$WORKDIR/corpus-$BENCH_SIZE
ROOT=$CACHE/rootfs                      # extracted debootstrap tree (the VM template)
TARBALL=$CACHE/rootfs-bookworm-minbase.tar.gz
MNT=$CORPUS/mnt
TIMINGS=$CORPUS/corpus-timings.txt      # corpus build times: informational, not benchmark results

# Fixed identifiers so every rebuild lays the filesystem out the same way.
FS_UUID=6a1f3c2e-0b7d-4c39-9d6e-5f2b8a41c0de
DISK_GUID=2f0f5c8e-4d1a-4b7e-8c3a-1e9d6b5a7c42
PART_GUID=9b8e7d6c-5a4f-4e3d-8c2b-1a0f9e8d7c6b
FIXED_MTIME=@1715000000                 # 2024-05-06, mtime of generated files

[[ $EUID -eq 0 ]] || die "run as root (debootstrap, losetup and mount need it)"
(( BENCH_SIZE_BYTES >= 512 * 1024 * 1024 )) || die "BENCH_SIZE must be at least 512M"
mkdir -p "$CACHE" "$CORPUS" "$MNT"
: >"$TIMINGS"

need debootstrap debootstrap
need sfdisk fdisk
need mke2fs e2fsprogs
need qemu-img qemu-utils
need openssl openssl
need perl perl

# Megabytes of new data for this disk size: volumes are given for 4 GiB and scale linearly.
scaled_mb() { echo $(( $1 * BENCH_SIZE_BYTES / (4 * 1024 * 1024 * 1024) )); }
MB=$((1024 * 1024))

# --- Debian mirror ----------------------------------------------------------------------------

# Prints the first apt source URI serving suite bookworm: deb822 *.sources files ('URIs:' line of
# a stanza whose 'Suites:' lists bookworm), then one-line sources.list entries.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e $f ]] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
                 uri = ""; suite = 0; deb = 0; enabled = 1
                 for (i = 1; i <= NF; i++) {
                     line = $i
                     if (line ~ /^URIs:/)    { sub(/^URIs:[ \t]*/, "", line); split(line, u, /[ \t]+/); uri = u[1] }
                     if (line ~ /^Suites:/   && (line " ") ~ /[ \t]bookworm[ \t]/) suite = 1
                     if (line ~ /^Types:/    && (line " ") ~ /[ \t]deb[ \t]/)      deb = 1
                     if (line ~ /^Enabled:[ \t]*no/) enabled = 0
                 }
                 if (uri != "" && suite && deb && enabled) { print uri; exit }
             }' "$f"
    done
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                           if ($(i + 1) == "bookworm") { print $i; exit } }'
}

# --- loop mounts ------------------------------------------------------------------------------

LOOPDEV=""
cleanup() {
    if mountpoint -q "$MNT"; then umount "$MNT" || true; fi
    if [[ -n $LOOPDEV ]]; then losetup -d "$LOOPDEV" || true; fi
}
trap cleanup EXIT

# part_bytes IMG: size in bytes of the image's first partition (from its GPT).
part_bytes() {
    local sectors
    sectors=$(sfdisk -d "$1" | sed -n 's/^[^:]*1 *:.*size= *\([0-9]*\).*/\1/p')
    [[ -n $sectors ]] || die "no partition found in $1"
    echo $(( sectors * 512 ))
}

# mount_image IMG: attaches the ext4 partition of IMG to a loop device and mounts it on $MNT.
# noinit_itable keeps the kernel from zeroing inode tables in the background (which would
# allocate blocks base.raw never had); noatime keeps reads from writing.
mount_image() {
    LOOPDEV=$(losetup -f --show -o "$PART_OFFSET" --sizelimit "$(part_bytes "$1")" "$1")
    mount -t ext4 -o noatime,noinit_itable "$LOOPDEV" "$MNT"
}

# unmount_image: unmounts, checks the filesystem read-only, detaches the loop device.
unmount_image() {
    umount "$MNT"
    e2fsck -fn "$LOOPDEV" >"$CORPUS/e2fsck.log" 2>&1 || { cat "$CORPUS/e2fsck.log" >&2; die "e2fsck found errors"; }
    losetup -d "$LOOPDEV"
    LOOPDEV=""
}

# fs_used BLOCKDEV_OR_FILE: bytes in use in the ext4 filesystem (block count - free blocks).
fs_used() {
    dumpe2fs -h "$1" 2>/dev/null | awk -F: '
        /^Block count:/ { n = $2 } /^Free blocks:/ { f = $2 } /^Block size:/ { b = $2 }
        END { printf "%d\n", (n - f) * b }'
}

# allocated FILE: bytes actually allocated on the host for a (sparse) file.
allocated() { echo $(( $(stat -c '%b * %B' "$1") )); }

human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }

# --- content generators (all seeded) -----------------------------------------------------------

# gen_text SEED BYTES KIND: deterministic text of about BYTES bytes. KIND: log (syslog/access-log
# lines) or csv (records). Compresses roughly like real logs and exports.
gen_text() {
    perl -e '
        use strict; use warnings;
        my ($seed, $bytes, $kind) = @ARGV;
        srand($seed);
        my @w = qw(alpha bravo cache client commit config daemon delta disk error event fetch
                   handler index kernel latency lookup manager memory network node object
                   pending queue request response retry session socket storage sync thread
                   timeout update upstream user volume worker write zone backup restore);
        my @paths = qw(/api/v1/items /api/v1/users /api/v2/orders /static/app.js /login
                       /health /metrics /api/v1/search /img/logo.png /api/v2/cart);
        my @st = (200, 200, 200, 200, 201, 204, 301, 304, 400, 404, 500);
        my @lv = qw(INFO INFO INFO DEBUG WARN ERROR);
        my $t = 1715000000; my $out = 0; my $id = 0;
        while ($out < $bytes) {
            $t += int(rand(3)); $id++;
            my @tm = gmtime($t);
            my $ts = sprintf("%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", $tm[5] + 1900, $tm[4] + 1,
                             $tm[3], $tm[2], $tm[1], $tm[0], int(rand(1000)));
            my $line;
            if ($kind eq "csv") {
                $line = sprintf("%d,%s,user%05d,%s,%.2f,%s,\"%s %s %s\"\n", $id, $ts,
                                int(rand(50000)), $w[rand @w], rand(10000), $st[rand @st],
                                $w[rand @w], $w[rand @w], $w[rand @w]);
            } elsif (rand() < 0.6) {
                $line = sprintf("%s web%02d nginx[%d]: 10.%d.%d.%d \"GET %s/%d HTTP/1.1\" %d %d %.3f\n",
                                $ts, int(rand(8)), 1000 + int(rand(50)), int(rand(256)),
                                int(rand(256)), int(rand(256)), $paths[rand @paths],
                                int(rand(100000)), $st[rand @st], int(rand(60000)), rand(2));
            } else {
                $line = sprintf("%s app%02d worker[%d]: %s %s %s %s id=%08x took=%dms\n",
                                $ts, int(rand(8)), 2000 + int(rand(50)), $lv[rand @lv],
                                $w[rand @w], $w[rand @w], $w[rand @w], int(rand(2**32)),
                                int(rand(5000)));
            }
            if ($out + length($line) >= $bytes) { print substr($line, 0, $bytes - $out); last }
            print $line; $out += length $line;
        }' "$1" "$2" "$3"
}

# write_random SEED BYTES FILE / write_text SEED BYTES KIND FILE: create one generated file.
write_random() { prng_bytes "$1" "$2" >"$3"; touch -d "$FIXED_MTIME" "$3"; }
write_text() { gen_text "$1" "$2" "$3" >"$4"; touch -d "$FIXED_MTIME" "$4"; }

# split_files KIND SEED TOTAL_MB COUNT DIR PREFIX EXT: COUNT files of uneven sizes totalling
# about TOTAL_MB. KIND is random, log or csv.
split_files() {
    local kind=$1 seed=$2 total=$(( $3 * MB )) count=$4 dir=$5 prefix=$6 ext=$7 i size
    mkdir -p "$dir"
    for (( i = 1; i <= count; i++ )); do
        # Sizes 0.5x..1.5x of the mean, deterministic from i.
        size=$(( total / count * (50 + (i * 37) % 101) / 100 ))
        (( size > 0 )) || size=4096
        if [[ $kind == random ]]; then
            write_random "$seed-$i" "$size" "$dir/$prefix$i$ext"
        else
            write_text "$seed$i" "$size" "$kind" "$dir/$prefix$i$ext"
        fi
    done
}

# --- step 1: debootstrap tree -----------------------------------------------------------------

step_start() { STEP_T0=$SECONDS; log "$1"; }
step_done() { printf '%-28s %5d s\n' "$1" $(( SECONDS - STEP_T0 )) >>"$TIMINGS"; log "done: $1 ($(( SECONDS - STEP_T0 )) s)"; }

if [[ ! -s $TARBALL ]]; then
    MIRROR=${BENCH_MIRROR:-$(find_mirror | head -n 1 || true)}
    [[ -n $MIRROR ]] || die "no bookworm mirror found in /etc/apt/sources.list{,.d}; set BENCH_MIRROR"
    step_start "debootstrap --variant=minbase bookworm from $MIRROR"
    rm -rf "$CACHE/debootstrap.tmp"
    debootstrap --variant=minbase bookworm "$CACHE/debootstrap.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    tar --numeric-owner --xattrs -C "$CACHE/debootstrap.tmp" -czf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$CACHE/debootstrap.tmp"
    step_done "debootstrap + tarball"
fi

if needs_build "$CACHE/rootfs.stamp" "$TARBALL"; then
    step_start "extracting the template tree"
    rm -rf "$ROOT"; mkdir -p "$ROOT"
    tar --numeric-owner --xattrs -C "$ROOT" -xzf "$TARBALL"
    touch "$CACHE/rootfs.stamp"
    step_done "extract tarball"
fi

# --- step 2: base.raw -------------------------------------------------------------------------

if needs_build "$CORPUS/base.raw" "$CACHE/rootfs.stamp"; then
    step_start "base.raw ($BENCH_SIZE, GPT + ext4 made by mke2fs -d)"
    tmp=$CORPUS/base.raw.tmp part=$CORPUS/part.img.tmp
    rm -f "$tmp" "$part"
    truncate -s "$BENCH_SIZE_BYTES" "$tmp"
    sfdisk -q --no-reread "$tmp" <<EOF
label: gpt
label-id: $DISK_GUID
start=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$PART_GUID, name=root
EOF
    pbytes=$(part_bytes "$tmp")
    # The filesystem is made in a separate file (so e2fsck can check it without an offset),
    # then copied into the partition sparsely.
    mke2fs -q -F -t ext4 -b 4096 -L root -U "$FS_UUID" -E "hash_seed=$FS_UUID" \
        -d "$ROOT" "$part" "$(( pbytes / 1024 ))k"
    e2fsck -fn "$part" >"$CORPUS/e2fsck.log" 2>&1 || { cat "$CORPUS/e2fsck.log" >&2; die "e2fsck part.img failed"; }
    dd if="$part" of="$tmp" bs=64K oflag=seek_bytes seek="$PART_OFFSET" conv=sparse,notrunc status=none
    rm -f "$part"
    fallocate --dig-holes "$tmp"     # all-zero blocks become holes, as in a fresh sparse image
    mv "$tmp" "$CORPUS/base.raw"
    step_done "base.raw"
fi

# --- step 3: clone.raw ------------------------------------------------------------------------

if needs_build "$CORPUS/clone.raw" "$CORPUS/base.raw"; then
    step_start "clone.raw (base + ~$(scaled_mb 200) MB of new files)"
    tmp=$CORPUS/clone.raw.tmp
    rm -f "$tmp"
    cp --sparse=always "$CORPUS/base.raw" "$tmp"
    mount_image "$tmp"
    # What a second VM from the template accumulates: application binaries (incompressible),
    # its logs, a data export, and a tarball of documentation (same bytes as files in the
    # template, but at unaligned offsets inside the tar stream).
    split_files random clone-bin "$(scaled_mb 80)" 8 "$MNT/opt/app/releases" "app-1.0." ".tar.zst"
    split_files log 1001 "$(scaled_mb 50)" 5 "$MNT/var/log/app" "access.log." ""
    split_files csv 2001 "$(scaled_mb 40)" 4 "$MNT/srv/data" "export-" ".csv"
    mkdir -p "$MNT/home/user"
    tar --sort=name --mtime="${FIXED_MTIME}" --owner=0 --group=0 --numeric-owner \
        -C "$ROOT" -cf "$MNT/home/user/share-backup.tar" usr/share/doc usr/share/perl5 usr/share/zoneinfo
    unmount_image
    fallocate --dig-holes "$tmp"
    mv "$tmp" "$CORPUS/clone.raw"
    step_done "clone.raw"
fi

# --- step 4: day2.raw -------------------------------------------------------------------------

if needs_build "$CORPUS/day2.raw" "$CORPUS/base.raw"; then
    step_start "day2.raw (base with 2 % rewritten in place, appended logs, ~$(scaled_mb 50) MB new)"
    tmp=$CORPUS/day2.raw.tmp
    rm -f "$tmp"
    cp --sparse=always "$CORPUS/base.raw" "$tmp"
    mount_image "$tmp"
    # Pick files in a seeded random order until 2 % of the file data is covered. Small files
    # (<= 256 KiB) are rewritten whole, larger ones get one random range of 64 KiB..1 MiB.
    # /var/log is left out: its files get appended to below.
    (cd "$MNT" && find . -xdev -type f -size +0 ! -path './var/log/*' -printf '%s %P\n') |
        LC_ALL=C sort -k2 |
        perl -e '
            my ($seed, $percent) = @ARGV; srand($seed);
            my @f = map { chomp; [split / /, $_, 2] } <STDIN>;
            my $target = 0; $target += $_->[0] for @f; $target *= $percent / 100;
            for (my $i = $#f; $i > 0; $i--) { my $j = int(rand($i + 1)); @f[$i, $j] = @f[$j, $i]; }
            my $total = 0;
            for my $e (@f) {
                last if $total >= $target;
                my ($size, $path) = @$e;
                my ($off, $len) = (0, $size);
                if ($size > 262144) {
                    $len = 65536 + int(rand(1048576 - 65536));
                    $len = $size if $len > $size;
                    $off = int(rand($size - $len + 1));
                }
                print "$off $len $path\n"; $total += $len;
            }' 20240507 2 >"$CORPUS/day2-rewrites.txt"
    n=0 rewritten=0
    while read -r off len path; do
        n=$((n + 1)); rewritten=$((rewritten + len))
        prng_bytes "day2-rewrite-$n" "$len" |
            dd of="$MNT/$path" bs=64K iflag=fullblock oflag=seek_bytes seek="$off" conv=notrunc status=none
    done <"$CORPUS/day2-rewrites.txt"
    log "rewrote $(human "$rewritten") in place in $n files"
    # A day of logging: lines appended to every existing log file.
    find "$MNT/var/log" -type f -name '*.log' -print | LC_ALL=C sort >"$CORPUS/day2-logs.txt"
    i=0
    while read -r f; do
        i=$((i + 1))
        gen_text "$((3000 + i))" $(( $(scaled_mb 2) * MB / 2 + 65536 )) log >>"$f"
    done <"$CORPUS/day2-logs.txt"
    # New files: downloaded packages (incompressible), a new log, a data export.
    split_files random day2-deb "$(scaled_mb 30)" 6 "$MNT/var/cache/apt/archives" "update-" "_amd64.deb"
    split_files log 4001 "$(scaled_mb 10)" 2 "$MNT/var/log/app" "day2-" ".log"
    split_files csv 5001 "$(scaled_mb 10)" 1 "$MNT/srv/data" "day2-export-" ".csv"
    unmount_image
    fallocate --dig-holes "$tmp"
    mv "$tmp" "$CORPUS/day2.raw"
    echo "$rewritten" >"$CORPUS/day2-rewritten-bytes"
    step_done "day2.raw"
fi

# --- step 5: qcow2 copies ---------------------------------------------------------------------

for name in base day2; do
    if needs_build "$CORPUS/$name.qcow2" "$CORPUS/$name.raw"; then
        step_start "$name.qcow2"
        rm -f "$CORPUS/$name.qcow2.tmp"
        qemu-img convert -f raw -O qcow2 "$CORPUS/$name.raw" "$CORPUS/$name.qcow2.tmp"
        mv "$CORPUS/$name.qcow2.tmp" "$CORPUS/$name.qcow2"
        step_done "$name.qcow2"
    fi
done

# --- summary ----------------------------------------------------------------------------------

# Filesystem usage read from each image's partition via a read-only loop device.
fs_used_image() {
    local dev used
    dev=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$(part_bytes "$1")" "$1")
    used=$(fs_used "$dev")
    losetup -d "$dev"
    echo "$used"
}

if needs_build "$CORPUS/corpus.info" "$CORPUS/base.raw" "$CORPUS/clone.raw" "$CORPUS/day2.raw"; then
    {
        echo "CORPUS_SIZE=$BENCH_SIZE"
        echo "CORPUS_SIZE_BYTES=$BENCH_SIZE_BYTES"
        echo "CORPUS_PART_BYTES=$(part_bytes "$CORPUS/base.raw")"
        for name in base clone day2; do
            echo "CORPUS_${name^^}_FS_USED=$(fs_used_image "$CORPUS/$name.raw")"
            echo "CORPUS_${name^^}_ALLOCATED=$(allocated "$CORPUS/$name.raw")"
        done
        echo "CORPUS_DAY2_REWRITTEN=$(cat "$CORPUS/day2-rewritten-bytes")"
        echo "CORPUS_ROOTFS_BYTES=$(du -sb "$ROOT" | cut -f1)"
    } >"$CORPUS/corpus.info.tmp"
    mv "$CORPUS/corpus.info.tmp" "$CORPUS/corpus.info"
fi

# shellcheck source=/dev/null
source "$CORPUS/corpus.info"
log "corpus ready in $CORPUS:"
for name in base clone day2; do
    u=CORPUS_${name^^}_FS_USED a=CORPUS_${name^^}_ALLOCATED
    log "  $name.raw: $(human "$CORPUS_SIZE_BYTES") virtual, $(human "${!u}") used in ext4, $(human "${!a}") allocated"
done
log "  day2 rewritten in place: $(human "$CORPUS_DAY2_REWRITTEN")"
if [[ -s $TIMINGS ]]; then log "corpus build times (not benchmark results):"; cat "$TIMINGS" >&2; fi
exit 0
