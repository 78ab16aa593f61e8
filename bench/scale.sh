#!/usr/bin/env bash
# Check and gc must stay linear in the number of chunks (issue 8): times `cairn check`,
# `cairn check --read-data` and `cairn gc` on synthetic repositories of 10^5 and 10^6 chunks
# (bench/synth_repo.py writes them from docs/FORMAT.md), and reports the ratio of the two.
#
#   sudo bench/scale.sh                 # 100000 and 1000000 chunks
#   sudo SCALE_SIZES="10000 100000" bench/scale.sh
#
# The repositories live on a tmpfs (root needed to mount it), so the figures measure Cairn's
# own work (listing, decoding, sets, unlinking) and not this VM's disk; half of each
# repository's chunks are unreferenced, so gc deletes N/2 files. Results:
# bench/work/scale-results.md. Release build in .build-bench, like bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=${SCALE_SIZES:-"100000 1000000"}
WORK=$ROOT/bench/work/scale
mkdir -p "$WORK"
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
swift build -c release --static-swift-stdlib --scratch-path .build-bench --product cairn >/dev/null
BIN=$ROOT/.build-bench/release/cairn
mountpoint -q "$WORK" || mount -t tmpfs -o size=12g tmpfs "$WORK"
trap 'umount -l "$WORK" 2>/dev/null || true' EXIT

results=$ROOT/bench/work/scale-results.md
{
    echo "| chunks | step | wall s | CPU s | peak RSS MiB |"
    echo "|--:|---|--:|--:|--:|"
} >"$results"
declare -A wall
for n in $SIZES; do
    repo=$WORK/repo-$n
    rm -rf "$repo"
    python3 bench/synth_repo.py "$repo" "$n" 10
    for step in "check" "check --read-data" "gc"; do
        sync
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        # shellcheck disable=SC2086
        out=$( { /usr/bin/time -f '%e %U %S %M' env CAIRN_REPO="$repo" "$BIN" $step --quiet >/dev/null; } 2>&1 | tail -1)
        read -r w u s m <<<"$out"
        cpu=$(echo "$u + $s" | bc)
        wall["$n $step"]=$w
        printf '| %s | %s | %s | %s | %s |\n' "$n" "$step" "$w" "$cpu" "$((m / 1024))" | tee -a "$results"
    done
    rm -rf "$repo"
done
set -- $SIZES
if [ $# -ge 2 ]; then
    {
        echo
        echo "Ratio of wall times, $2 vs $1 chunks ($(( $2 / $1 ))x the chunks):"
        for step in "check" "check --read-data" "gc"; do
            echo "- $step: $(echo "scale=1; ${wall["$2 $step"]} / ${wall["$1 $step"]}" | bc)x"
        done
    } | tee -a "$results"
fi
