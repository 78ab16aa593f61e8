#!/usr/bin/env bash
# Live-backup (CBT) benchmark (issue 3), in one run, as ratios:
#
#   1. A qcow2 disk of 4 GiB with BENCH_USED (default 2G) of incompressible data, held by
#      qemu-storage-daemon (as a VM would hold it). Full live backup with Cairn, full backup of
#      the image file with restic. Then 1 % of the used blocks rewritten in place (64 KiB writes
#      at random offsets through the daemon's writable NBD export, like a guest), and the
#      incremental: `cairn backup --qmp` (dirty bitmap: reads only the changed blocks) vs
#      `restic backup` of the image file (re-reads the whole file). Target: Cairn <= 1/20 of
#      restic's wall time.
#   2. The same data and the same change on a 32 GiB disk: the CBT incremental's time must grow
#      with the changed bytes, not with the disk size (ratio 32 GiB / 4 GiB close to 1).
#
#   bench/cbt.sh [WORKDIR]        (default bench/work/cbt; needs root for drop_caches)
#
# Environment: BENCH_RUNS (default 3: incrementals repeated with fresh changes; medians),
# BENCH_USED (default 2G), BENCH_CHUNKS (Cairn repository chunk sizes, default "512K 64K":
# scattered 64 KiB writes cost a whole chunk each, so the chunk size sets the read volume). Page cache dropped before every timed step. Release build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORKDIR=$(realpath -m "${1:-$BENCH_DIR/work/cbt}")
RUNS=${BENCH_RUNS:-3}
USED=${BENCH_USED:-2G}
USED_BYTES=$(numfmt --from=iec "$USED")
CHUNKS=${BENCH_CHUNKS:-"512K 64K"}
[[ $EUID -eq 0 ]] || die "run as root (page-cache dropping)"
need qemu-storage-daemon qemu-system-common
need qemu-io qemu-utils
need restic restic
mkdir -p "$WORKDIR"
cd "$REPO_ROOT"
log "building cairn (release)"
swift build -c release --static-swift-stdlib >/dev/null
CAIRN="$(swift build -c release --static-swift-stdlib --show-bin-path)/cairn"
export CAIRN_PASSWORD=cairn-bench RESTIC_PASSWORD=cairn-bench
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
QSD_PID=
cleanup() { [[ -n $QSD_PID ]] && kill "$QSD_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# The data: USED bytes of AES-CTR keystream (incompressible, no duplicates), made once.
DATA=$WORKDIR/data.raw
if [[ ! -f $DATA ]] || [[ $(stat -c %s "$DATA") != "$USED_BYTES" ]]; then
    log "making $USED of data"
    prng_bytes cbt-bench "$USED_BYTES" >"$DATA"
fi

start_qsd() { # DISK TAG
    local disk=$1 tag=$2
    rm -f "$WORKDIR/$tag-qmp.sock" "$WORKDIR/$tag-nbd.sock"
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$disk,node-name=file0" \
        --blockdev "driver=qcow2,file=file0,node-name=disk0" \
        --nbd-server "addr.type=unix,addr.path=$WORKDIR/$tag-nbd.sock" \
        --export "type=nbd,id=w,node-name=disk0,name=w,writable=on" \
        --chardev "socket,path=$WORKDIR/$tag-qmp.sock,server=on,wait=off,id=m" --monitor chardev=m &
    QSD_PID=$!
    for _ in $(seq 100); do [[ -S $WORKDIR/$tag-nbd.sock ]] && break; sleep 0.1; done
}
stop_qsd() { # SIGTERM: the daemon quits cleanly (persistent bitmaps saved)
    kill "$QSD_PID" 2>/dev/null
    wait "$QSD_PID" 2>/dev/null || true
    QSD_PID=
}
# change TAG SEED: rewrite 1 % of the used bytes in 64 KiB writes at random offsets.
change() {
    local tag=$1 seed=$2 writes
    writes=$((USED_BYTES / 100 / 65536))
    python3 - "$seed" "$writes" "$USED_BYTES" >"$WORKDIR/writes.qemu-io" <<'PY'
import random, sys
seed, n, used = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
slots = r.sample(range(used // 65536), n)
for i, s in enumerate(slots):
    print(f"write -P {(seed * 7 + i) % 251 + 1} {s * 65536} 64k")
PY
    local args=()
    while read -r c; do args+=(-c "$c"); done <"$WORKDIR/writes.qemu-io"
    qemu-io -f raw "${args[@]}" "nbd+unix:///w?socket=$WORKDIR/$tag-nbd.sock" >/dev/null
}
cairn_live() { # TAG REPO -> prints wall seconds; JSON summary to $WORKDIR/last.json
    local tag=$1 repo=$2 t0 t1
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    "$CAIRN" backup --repo "$repo" --vm bench --qmp "$WORKDIR/$tag-qmp.sock" --node disk0 --nbd-socket "$WORKDIR/$tag-nbd.sock" \
        --scratch-dir "$WORKDIR" --json --quiet >"$WORKDIR/last.json"
    t1=$(now)
    calc "$t1 - $t0"
}
restic_file() { # REPO FILE -> wall seconds
    local t0 t1
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    restic -r "$1" backup --quiet "$2" >/dev/null
    t1=$(now)
    calc "$t1 - $t0"
}
field() { python3 -c "import json; d=json.loads(open('$WORKDIR/last.json').read().splitlines()[-1]); print(d['disks'][0]['$1'])"; }

declare -A INC READ
RINC=
for chunk in $CHUNKS; do
for size in 4G 32G; do
    key=$chunk-$size
    disk=$WORKDIR/disk-$size.qcow2
    log "disk $size, Cairn chunk size $chunk: $USED of data"
    rm -f "$disk"
    qemu-img convert -f raw -O qcow2 "$DATA" "$disk"
    qemu-img resize -q "$disk" "$size"
    crepo=$WORKDIR/cairn-$key rrepo=$WORKDIR/restic-$size
    rm -rf "$crepo"
    "$CAIRN" init --repo "$crepo" --chunk-size "$chunk" >/dev/null
    # restic runs once (with the first chunk size's pass), on the 4 GiB disk.
    [[ $chunk == "${CHUNKS%% *}" && $size == 4G ]] && restic_pass=1 || restic_pass=0
    (( restic_pass )) && rm -rf "$rrepo"
    start_qsd "$disk" "$size"
    full=$(cairn_live "$size" "$crepo")
    log "  cairn full live backup: ${full}s ($(field read_mode), read $(field nbd_bytes_requested) bytes)"
    if (( restic_pass )); then
        restic init -r "$rrepo" >/dev/null
        rfull=$(restic_file "$rrepo" "$disk")
        log "  restic full backup of the image file: ${rfull}s"
    fi
    for run in $(seq "$RUNS"); do
        change "$size" "$run"
        inc=$(cairn_live "$size" "$crepo")
        INC[$key]+="$inc "
        READ[$key]=$(field nbd_bytes_requested)
        log "  run $run: cairn ($chunk chunks) CBT incremental ${inc}s ($(field read_mode), dirty $(field dirty_bytes), read ${READ[$key]})"
        if (( restic_pass )); then
            rinc=$(restic_file "$rrepo" "$disk")
            RINC+="$rinc "
            log "  run $run: restic incremental (re-reads the image) ${rinc}s"
        fi
    done
    stop_qsd
done
done

med() { tr ' ' '\n' <<<"$1" | grep . | median; }
r4=$(med "$RINC")
floor=$( { sync; echo 3 >/proc/sys/vm/drop_caches; t0=$(now); cat "$WORKDIR/disk-4G.qcow2" >/dev/null; t1=$(now); calc "$t1 - $t0"; } )
{
    echo "| measure ($(date +%F), medians of $RUNS, $USED used, 1 % rewritten in 64 KiB writes at random offsets) | seconds | ratio | target |"
    echo "|---|--:|--:|--:|"
    printf '| restic incremental, 4 GiB image file | %.2f | 1 | |\n' "$r4"
    for chunk in $CHUNKS; do
        c4=$(med "${INC[$chunk-4G]}") c32=$(med "${INC[$chunk-32G]}")
        printf '| cairn CBT incremental, 4 GiB disk, %s chunks | %.2f | %.3f of restic | <= 0.05 |\n' "$chunk" "$c4" "$(calc "$c4 / $r4")"
        printf '| cairn CBT incremental, 32 GiB disk, %s chunks | %.2f | %.2f of 4 GiB | ~1 |\n' "$chunk" "$c32" "$(calc "$c32 / $c4")"
    done
    printf '| floor: cat of the 4 GiB qcow2 file (cold) | %.2f | %.3f of restic | |\n' "$floor" "$(calc "$floor / $r4")"
    echo
    for chunk in $CHUNKS; do
        echo "Bytes read over NBD by the last incremental, $chunk chunks: 4 GiB disk ${READ[$chunk-4G]}, 32 GiB disk ${READ[$chunk-32G]}."
        echo "Runs (s), $chunk chunks: 4 GiB ${INC[$chunk-4G]}; 32 GiB ${INC[$chunk-32G]}"
    done
    echo "Runs (s), restic: $RINC"
} | tee "$WORKDIR/results.md"
