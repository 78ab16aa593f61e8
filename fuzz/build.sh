#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/targets/ with AddressSanitizer and coverage:
#
#   fuzz/build.sh [TARGET...]      (default: every fuzz/targets/*.swift)
#
# The parsers under test (CairnCore, DiskFormats, GuestFS) are compiled as modules with
# -sanitize=fuzzer,address (coverage instrumentation, no main); each target file is linked
# with libFuzzer's main. Outputs: fuzz/work/bin/<target> ($FUZZ_WORK/bin when set). Needs only the Swift toolchain and
# the Debian packages libzstd-dev and zlib1g-dev.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FUZZ_WORK:-$ROOT/fuzz/work}   # FUZZ_WORK: a private work directory (parallel builds)
OUT=$WORK/build
BIN=$WORK/bin
mkdir -p "$OUT/CLinuxShims" "$BIN"

# CAIRN_FUZZING turns off checksum enforcement (VHDX CRC-32C) so mutations get past it.
SAN=(-sanitize=fuzzer,address -parse-as-library -O -g -package-name Cairn -swift-version 6 -D CAIRN_FUZZING)
INC=(-I "$OUT" -I "$ROOT/Sources/CZlib" -I "$ROOT/Sources/CZstd" -I "$OUT/CLinuxShims")

# The C shims CairnCore imports, with a module map of our own (SwiftPM makes one when it builds).
cat >"$OUT/CLinuxShims/module.modulemap" <<MAP
module CLinuxShims {
    header "$ROOT/Sources/CLinuxShims/include/CLinuxShims.h"
    export *
}
MAP
clang -c -O1 -fsanitize=address -I "$ROOT/Sources/CLinuxShims/include" \
    "$ROOT/Sources/CLinuxShims/shims.c" -o "$OUT/shims.o"

module() {  # module NAME SOURCES...
    local name=$1; shift
    swiftc "${SAN[@]}" "${INC[@]}" -module-name "$name" -wmo -emit-module \
        -emit-module-path "$OUT/$name.swiftmodule" -c "$@" -o "$OUT/$name.o"
}
module CairnCore "$ROOT"/Sources/CairnCore/*.swift
module DiskFormats "$ROOT"/Sources/DiskFormats/*.swift
# GuestFS: every file under Sources/GuestFS (readers live in subdirectories). While one reader
# is under construction elsewhere, FUZZ_GUESTFS_DIRS="Ext4 FAT" limits it to the shared top-level
# files plus those subdirectories.
guestfs=("$ROOT"/Sources/GuestFS/*.swift)
if [ -n "${FUZZ_GUESTFS_DIRS:-}" ]; then
    # The registry names every reader: replace it with an empty one.
    guestfs=()
    for f in "$ROOT"/Sources/GuestFS/*.swift; do [ "$(basename "$f")" = FileSystemReaders.swift ] || guestfs+=("$f"); done
    printf 'extension FileSystemReader {\n    package static let all: [FileSystemReader] = []\n}\n' >"$OUT/DevReaders.swift"
    guestfs+=("$OUT/DevReaders.swift")
    for d in $(printf '%s\n' LVM $FUZZ_GUESTFS_DIRS | sort -u); do guestfs+=("$ROOT"/Sources/GuestFS/"$d"/*.swift); done   # LVM: used by the shared files
else
    while IFS= read -r f; do guestfs+=("$f"); done < <(find "$ROOT/Sources/GuestFS" -mindepth 2 -name '*.swift' | sort)
fi
module GuestFS "${guestfs[@]}"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in "$ROOT"/fuzz/targets/*.swift; do targets+=("$(basename "$f" .swift)"); done
fi
for t in "${targets[@]}"; do
    rm -f "$BIN/$t"   # a failed build must not leave the previous binary to be run
    swiftc "${SAN[@]}" "${INC[@]}" -module-name "fuzz_$t" "$ROOT/fuzz/targets/$t.swift" "$ROOT"/fuzz/common/*.swift \
        "$OUT/CairnCore.o" "$OUT/DiskFormats.o" "$OUT/GuestFS.o" "$OUT/shims.o" -lz -lzstd -o "$BIN/$t" 2>&1 \
        | grep -v "Cannot export local symbol '__asan" >&2 || true
    [ -x "$BIN/$t" ] || { echo "fuzz target $t did not build" >&2; exit 1; }
    echo "built $BIN/$t"
done
