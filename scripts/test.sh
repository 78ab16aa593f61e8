#!/usr/bin/env bash
# The test command: installs what the tests need, builds, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build
CAIRN_BIN="$(swift build --show-bin-path)/cairn" swift test "$@"
