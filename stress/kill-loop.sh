#!/usr/bin/env bash
# Long form of the kill -9 battery (Tests/CLITests/BatteryKillTests.swift): SIGKILLs of the real
# cairn binary at random moments of backups, prunes and garbage collections, each followed by
# a rerun that must succeed; `check --read-data` every 25 kills and at the end; every surviving
# snapshot restored byte-identical.
#
#   stress/kill-loop.sh [KILLS]        default 1000 (unencrypted repository)
#
# Environment: CAIRN_BATTERY_ENCRYPTED_KILLS (default 150: kills on the encrypted repository),
# CAIRN_SCRATCH_PATH (SwiftPM scratch directory, default .build), CAIRN_TEST_TMP (where the
# test repositories go, default the system temporary directory).
# Output: stress/work/kill-loop-<date>.log (summary lines and failures) and .full.log (all).
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${1:-${CAIRN_BATTERY_KILLS:-1000}}
ENCRYPTED_KILLS=${CAIRN_BATTERY_ENCRYPTED_KILLS:-150}
SCRATCH=${CAIRN_SCRATCH_PATH:-.build}
WORK=stress/work
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$WORK/kill-loop-$STAMP.log"
FULL="$WORK/kill-loop-$STAMP.full.log"
mkdir -p "$WORK"

echo "building (scratch path $SCRATCH)..." >&2
if ! swift build --build-tests --scratch-path "$SCRATCH" >"$WORK/kill-loop-$STAMP.build.log" 2>&1; then
    tail -40 "$WORK/kill-loop-$STAMP.build.log" >&2
    echo "build failed; see $WORK/kill-loop-$STAMP.build.log" >&2
    exit 1
fi
CAIRN_BIN="$(swift build --scratch-path "$SCRATCH" --show-bin-path)/cairn"
export CAIRN_BIN

echo "# kill-loop $STAMP: $KILLS kills (encrypted: $ENCRYPTED_KILLS), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $(nproc) cores" | tee "$LOG"
set +e
CAIRN_BATTERY_KILLS=$KILLS CAIRN_BATTERY_ENCRYPTED_KILLS=$ENCRYPTED_KILLS \
    swift test --skip-build --scratch-path "$SCRATCH" --filter BatteryKillTests 2>&1 | tee "$FULL"
status=${PIPESTATUS[0]}
set -e
# Summary lines, every failure with its detail line, the verdicts.
awk '/^BATTERY /{print; next} /^✘/{print; detail=1; next} detail && /^↳/ && !/^↳ \/\/\//{print; next} {detail=0} /^✔ (Suite|Test run)/{print}' "$FULL" >>"$LOG"
echo "# exit status $status" >>"$LOG"
echo "summary: $LOG" >&2
exit "$status"
