#!/usr/bin/env bash
# Long form of the concurrency battery (Tests/CLITests/BatteryConcurrencyTests.swift): four
# backups of four VMs in a loop beside a loop of `prune --keep-last 3` and `gc`, every command
# waiting for locks with --retry-lock; at the end `check --read-data` and a byte-exact restore of
# every surviving snapshot.
#
#   stress/concurrency.sh [SECONDS]    default 600
#
# Environment: CAIRN_SCRATCH_PATH (SwiftPM scratch directory, default .build), CAIRN_TEST_TMP
# (where the test repository goes, default the system temporary directory).
# Output: stress/work/concurrency-<date>.log (summary lines and failures) and .full.log (all).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_OF_LOAD=${1:-${CAIRN_BATTERY_SECONDS:-600}}
SCRATCH=${CAIRN_SCRATCH_PATH:-.build}
WORK=stress/work
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$WORK/concurrency-$STAMP.log"
FULL="$WORK/concurrency-$STAMP.full.log"
mkdir -p "$WORK"

echo "building (scratch path $SCRATCH)..." >&2
if ! swift build --build-tests --scratch-path "$SCRATCH" >"$WORK/concurrency-$STAMP.build.log" 2>&1; then
    tail -40 "$WORK/concurrency-$STAMP.build.log" >&2
    echo "build failed; see $WORK/concurrency-$STAMP.build.log" >&2
    exit 1
fi
CAIRN_BIN="$(swift build --scratch-path "$SCRATCH" --show-bin-path)/cairn"
export CAIRN_BIN

echo "# concurrency $STAMP: $SECONDS_OF_LOAD s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $(nproc) cores" | tee "$LOG"
set +e
CAIRN_BATTERY_SECONDS=$SECONDS_OF_LOAD \
    swift test --skip-build --scratch-path "$SCRATCH" --filter BatteryConcurrencyTests 2>&1 | tee "$FULL"
status=${PIPESTATUS[0]}
set -e
awk '/^BATTERY /{print; next} /^✘/{print; detail=1; next} detail && /^↳/ && !/^↳ \/\/\//{print; next} {detail=0} /^✔ (Suite|Test run)/{print}' "$FULL" >>"$LOG"
echo "# exit status $status" >>"$LOG"
echo "summary: $LOG" >&2
exit "$status"
