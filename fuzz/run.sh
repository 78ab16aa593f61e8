#!/usr/bin/env bash
# Runs every fuzz target for a while and reports executions and crashes.
#
#   fuzz/run.sh [--seconds N] [TARGET...]     (default: 60 s per target, every target)
#
# Seeds are made fresh with qemu-img (fuzz/seeds.sh); the corpus grows in fuzz/work/corpus/<t>.
# libFuzzer's random seed is FUZZ_SEED (default 1), so a run can be repeated.
# A crash leaves fuzz/work/crashes/<t>/crash-*; the script then exits 1. Copy every crash into
# fuzz/regressions/<t>/ (Tests/DiskFormatsTests/FuzzRegressionTests replays them) and fix it;
# the regressions also seed every later run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=60
if [ "${1:-}" = "--seconds" ]; then SECONDS_PER=$2; shift 2; fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in fuzz/targets/*.swift; do targets+=("$(basename "$f" .swift)"); done
fi
WORK=${FUZZ_WORK:-fuzz/work}   # FUZZ_WORK: a private work directory (parallel runs)
fuzz/build.sh "${targets[@]}"
fuzz/seeds.sh "${targets[@]}"
status=0
total=0
for t in "${targets[@]}"; do
    corpus=$WORK/corpus/$t
    crashes=$WORK/crashes/$t
    mkdir -p "$corpus" "$crashes"
    log=$WORK/$t.log
    # -rss_limit_mb bounds a parser that allocates from a header field; -timeout catches hangs.
    mkdir -p "fuzz/regressions/$t"
    if ASAN_OPTIONS=detect_leaks=0 "$WORK/bin/$t" "$corpus" "$WORK/seeds/$t" "fuzz/regressions/$t" \
        -max_total_time="$SECONDS_PER" -max_len=1048576 -timeout=10 -rss_limit_mb=2048 -seed="${FUZZ_SEED:-1}" \
        -artifact_prefix="$crashes/" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
        echo "fuzz $t: ${runs:-?} executions in ${SECONDS_PER}s, no crash"
        total=$((total + ${runs:-0}))
    else
        echo "fuzz $t: FAILED (see $log and $crashes)" >&2
        grep -E "ERROR|SUMMARY|Fatal|panic" "$log" | head -5 >&2 || true
        status=1
    fi
done
echo "fuzz: $total executions in total"
exit $status
