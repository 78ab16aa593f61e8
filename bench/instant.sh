#!/usr/bin/env bash
# Instant-restore benchmark (issue 4), in one run, as ratios:
#
#   1. boot to heartbeat: the small test VM (scripts/make-boot-vm.sh) booted by
#      `cairn instant-restore` from a snapshot (NBD export + copy-on-write overlay) vs the same
#      VM booted by qemu from its raw image. Both under TCG, page cache dropped before each.
#      Target: ratio <= 1.3.
#   2. sequential read: nbdcopy of a disk exported by `cairn serve` vs by `qemu-nbd` serving
#      the raw image, page cache dropped before each. Target: ratio >= 0.8 (Cairn / qemu-nbd).
#
#   bench/instant.sh [WORKDIR]      (default bench/work/instant; needs root for drop_caches)
#
# Environment: BENCH_RUNS (default 3; medians are reported), BENCH_READ_SIZE (default 1G: the
# disk read in part 2, half random and half compressible text-like data, with zero runs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORKDIR=$(realpath -m "${1:-$BENCH_DIR/work/instant}")
RUNS=${BENCH_RUNS:-3}
READ_SIZE=${BENCH_READ_SIZE:-1G}
[[ $EUID -eq 0 ]] || die "run as root (page-cache dropping)"
need qemu-system-x86_64 qemu-system-x86
need qemu-nbd qemu-utils
need nbdcopy libnbd-bin
mkdir -p "$WORKDIR"
cd "$REPO_ROOT"
log "building cairn (release)"
swift build -c release --static-swift-stdlib >/dev/null
CAIRN="$(swift build -c release --static-swift-stdlib --show-bin-path)/cairn"
export CAIRN_PASSWORD=cairn-bench
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
now() { date +%s.%N; }

VM=$(scripts/make-boot-vm.sh "$WORKDIR/vm")
REPO=$WORKDIR/repo
rm -rf "$REPO"
"$CAIRN" init --repo "$REPO" >/dev/null
"$CAIRN" backup --repo "$REPO" --vm tiny --quiet vda="$VM" >/dev/null
SNAP=$("$CAIRN" snapshots --repo "$REPO" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

# wait_for FILE PATTERN: seconds until PATTERN appears in FILE (polling every 10 ms).
wait_heartbeat() {
    local log=$1 start=$2
    while ! grep -q CAIRN-HEARTBEAT "$log" 2>/dev/null; do sleep 0.01; done
    echo "$(now) - $start" | bc -l
}

raw_boot=() cairn_boot=()
for run in $(seq 1 "$RUNS"); do
    cp --sparse=always "$VM" "$WORKDIR/run.raw"
    rm -f "$WORKDIR/raw.serial"
    drop
    t0=$(now)
    qemu-system-x86_64 -accel tcg -machine q35 -m 256 -nodefaults -display none -no-reboot -nic none \
        -serial "file:$WORKDIR/raw.serial" -drive "file=$WORKDIR/run.raw,format=raw,if=virtio" &
    qpid=$!
    raw_boot+=("$(wait_heartbeat "$WORKDIR/raw.serial" "$t0")")
    wait $qpid
    rm -rf "$WORKDIR/overlays"
    drop
    t0=$(now)
    "$CAIRN" instant-restore --repo "$REPO" "$SNAP" --accel tcg --memory 256 --no-network \
        --overlay-dir "$WORKDIR/overlays" --discard-overlay 2>/dev/null &
    cpid=$!
    while [ ! -f "$WORKDIR/overlays/${SNAP:0:8}.serial.log" ]; do sleep 0.01; done
    cairn_boot+=("$(wait_heartbeat "$WORKDIR/overlays/${SNAP:0:8}.serial.log" "$t0")")
    wait $cpid
    log "boot run $run: raw ${raw_boot[-1]} s, cairn ${cairn_boot[-1]} s"
done

# Part 2: a disk worth reading.
DISK=$WORKDIR/read.raw
if [ ! -f "$DISK" ] || [ "$(stat -c %s "$DISK")" != "$(numfmt --from=iec "$READ_SIZE")" ]; then
    log "making the $READ_SIZE read disk"
    bytes=$(numfmt --from=iec "$READ_SIZE")
    { prng_bytes read-bench $((bytes / 2)); yes "log line with some repeated text and a counter" | head -c $((bytes / 2)) || true; } >"$DISK"   # yes ends by SIGPIPE
    truncate -s "$bytes" "$DISK"
fi
"$CAIRN" backup --repo "$REPO" --vm big --quiet --no-skip-free sda="$DISK" >/dev/null
BIG=$("$CAIRN" snapshots --repo "$REPO" --vm big --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
SOCK=$WORKDIR/cairn.sock QSOCK=$WORKDIR/qemu-nbd.sock
"$CAIRN" serve --repo "$REPO" "$BIG" --socket "$SOCK" >/dev/null 2>&1 &
spid=$!
qemu-nbd --socket="$QSOCK" --persistent --shared=4 -r -f raw "$DISK" &
qnpid=$!
trap 'kill $spid $qnpid 2>/dev/null || true' EXIT
while [ ! -S "$SOCK" ] || [ ! -S "$QSOCK" ]; do sleep 0.05; done
cairn_read=() qemu_read=()
for run in $(seq 1 "$RUNS"); do
    drop; t0=$(now); nbdcopy "nbd+unix:///${BIG:0:8}-sda?socket=$SOCK" null:; cairn_read+=("$(echo "$(now) - $t0" | bc -l)")
    drop; t0=$(now); nbdcopy "nbd+unix:///?socket=$QSOCK" null:; qemu_read+=("$(echo "$(now) - $t0" | bc -l)")
    log "read run $run: cairn ${cairn_read[-1]} s, qemu-nbd ${qemu_read[-1]} s"
done
kill $spid $qnpid 2>/dev/null || true

rb=$(printf '%s\n' "${raw_boot[@]}" | median); cb=$(printf '%s\n' "${cairn_boot[@]}" | median)
cr=$(printf '%s\n' "${cairn_read[@]}" | median); qr=$(printf '%s\n' "${qemu_read[@]}" | median)
bytes=$(stat -c %s "$DISK")
{
    echo "# Instant restore benchmark ($(date -u +%Y-%m-%d), $RUNS runs, medians, page cache dropped before each step)"
    echo
    echo "| measure | Cairn | reference | ratio | target |"
    echo "|---|--:|--:|--:|--:|"
    printf '| boot to heartbeat (TCG): instant-restore vs raw image | %.2f s | %.2f s | %.2f | <= 1.3 |\n' "$cb" "$rb" "$(echo "$cb / $rb" | bc -l)"
    printf '| sequential read %s: cairn serve vs qemu-nbd (nbdcopy) | %.0f MiB/s | %.0f MiB/s | %.2f | >= 0.8 |\n' "$READ_SIZE" \
        "$(echo "$bytes / 1048576 / $cr" | bc -l)" "$(echo "$bytes / 1048576 / $qr" | bc -l)" "$(echo "$qr / $cr" | bc -l)"
} | tee "$WORKDIR/results.md"
