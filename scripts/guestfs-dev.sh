#!/usr/bin/env bash
# Makes a small SwiftPM package for developing one GuestFS reader in isolation:
#
#   scripts/guestfs-dev.sh NAME       (-> /work/dev/NAME)
#
# It links CairnCore, Storage, CairnTestSupport and the shared GuestFS files (top level of
# Sources/GuestFS, with LVM which they use) from this checkout, plus only Sources/GuestFS/NAME/ and
# Tests/GuestFSTests/NAME/, so a reader builds and tests without swift-crypto and without the
# other readers under construction. `swift test` there runs only that reader's tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=$1
DEV=${DEV_ROOT:-/work/dev}/$NAME
mkdir -p "$DEV/Sources/GuestFS" "$DEV/Tests/GuestFSTests" "$ROOT/Sources/GuestFS/$NAME" "$ROOT/Tests/GuestFSTests/$NAME"
for t in CLinuxShims CairnCore Storage CairnTestSupport; do ln -sfn "$ROOT/Sources/$t" "$DEV/Sources/$t"; done
find "$DEV/Sources/GuestFS" -maxdepth 1 -type l -delete
for f in "$ROOT"/Sources/GuestFS/*.swift; do
    # The registry names every reader; the dev package has only one, so it gets an empty one.
    [ "$(basename "$f")" = FileSystemReaders.swift ] && continue
    ln -sfn "$f" "$DEV/Sources/GuestFS/$(basename "$f")"
done
rm -f "$DEV/Sources/GuestFS/FileSystemReaders.swift"
printf 'extension FileSystemReader {\n    package static let all: [FileSystemReader] = []\n}\n' >"$DEV/Sources/GuestFS/DevReaders.swift"
ln -sfn "$ROOT/Sources/GuestFS/$NAME" "$DEV/Sources/GuestFS/$NAME"
# LVM is part of the volume layer the shared files use (LVMScan), so every dev package has it.
[ "$NAME" = LVM ] || ln -sfn "$ROOT/Sources/GuestFS/LVM" "$DEV/Sources/GuestFS/LVM"
ln -sfn "$ROOT/Tests/GuestFSTests/$NAME" "$DEV/Tests/GuestFSTests/$NAME"
cat >"$DEV/Package.swift" <<PKG
// swift-tools-version: 6.1
import PackageDescription
let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]
let package = Package(
    name: "GuestFSDev",
    platforms: [.macOS(.v15)],
    dependencies: [.package(path: "$ROOT/.build/checkouts/swift-system")],
    targets: [
        .target(name: "CLinuxShims"),
        .target(name: "CairnCore", dependencies: ["CLinuxShims", .product(name: "SystemPackage", package: "swift-system")], swiftSettings: strict),
        .target(name: "Storage", dependencies: ["CairnCore", .product(name: "SystemPackage", package: "swift-system")], swiftSettings: strict),
        .target(name: "GuestFS", dependencies: ["CairnCore"], swiftSettings: strict),
        .target(name: "CairnTestSupport", dependencies: ["CairnCore", "Storage"], swiftSettings: strict),
        .testTarget(name: "GuestFSTests", dependencies: ["GuestFS", "CairnCore", "CairnTestSupport"], swiftSettings: strict),
    ]
)
PKG
echo "$DEV"
