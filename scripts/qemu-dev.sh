#!/usr/bin/env bash
# Makes a small SwiftPM package for developing part of the QEMU target (or a test of it) in
# isolation, so a helper's build never sees another helper's half-written files:
#
#   scripts/qemu-dev.sh NAME SRC... -- TEST...      (-> /work/dev/NAME)
#
# SRC are file names under Sources/QEMU, TEST under Tests/QEMUTests (symlinked, so edits land
# in this checkout). CairnCore, Storage, CairnTestSupport and NBDServer (for tests against our
# own server) are linked whole. `swift test` there runs only the named tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=$1; shift
DEV=${DEV_ROOT:-/work/dev}/$NAME
rm -rf "$DEV/Sources" "$DEV/Tests"
mkdir -p "$DEV/Sources/QEMU" "$DEV/Tests/QEMUTests"
for t in CLinuxShims CairnCore Storage CairnTestSupport NBDServer; do ln -sfn "$ROOT/Sources/$t" "$DEV/Sources/$t"; done
dir=Sources/QEMU
for f in "$@"; do
    if [ "$f" = -- ]; then dir=Tests/QEMUTests; continue; fi
    touch "$ROOT/$dir/$f"
    ln -sfn "$ROOT/$dir/$f" "$DEV/$dir/$f"
done
cat >"$DEV/Package.swift" <<PKG
// swift-tools-version: 6.1
import PackageDescription
let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]
let package = Package(
    name: "QEMUDev",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: "$ROOT/.build/checkouts/swift-system"),
        .package(path: "$ROOT/.build/checkouts/swift-nio"),
    ],
    targets: [
        .target(name: "CLinuxShims"),
        .target(name: "CairnCore", dependencies: ["CLinuxShims", .product(name: "SystemPackage", package: "swift-system")], swiftSettings: strict),
        .target(name: "Storage", dependencies: ["CairnCore", .product(name: "SystemPackage", package: "swift-system")], swiftSettings: strict),
        .target(name: "CairnTestSupport", dependencies: ["CairnCore", "Storage"], swiftSettings: strict),
        .target(name: "NBDServer", dependencies: ["CairnCore", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")], swiftSettings: strict),
        .target(name: "QEMU", dependencies: ["CairnCore"], swiftSettings: strict),
        .testTarget(name: "QEMUTests", dependencies: ["QEMU", "NBDServer", "CairnCore", "CairnTestSupport"], swiftSettings: strict),
    ]
)
PKG
echo "$DEV"
