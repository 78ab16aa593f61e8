#!/usr/bin/env bash
# The test command: installs what the tests need, builds, runs a short round of every fuzz
# target (CAIRN_FUZZ_SECONDS per target, default 60; 0 skips it), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build
FUZZ_SECONDS=${CAIRN_FUZZ_SECONDS:-60}
if [ "$FUZZ_SECONDS" != 0 ]; then
    fuzz/run.sh --seconds "$FUZZ_SECONDS"
fi
CAIRN_BIN="$(swift build --show-bin-path)/cairn" swift test "$@"
