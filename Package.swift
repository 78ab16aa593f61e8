// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "Cairn",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "cairn", targets: ["cairn"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        // System libraries (Debian: libzstd-dev, zlib1g-dev).
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),

        // Linux calls the Glibc overlay lacks (fallocate, SEEK_DATA, syncfs, mallopt).
        .target(name: "CLinuxShims"),

        // Layer 0: value types and the block-source protocols.
        .target(
            name: "CairnCore",
            dependencies: ["CLinuxShims", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict
        ),
        // Layer 1: pure format code.
        .target(
            name: "DiskFormats",
            dependencies: ["CairnCore", "CZstd", "CZlib"],
            swiftSettings: strict
        ),
        .target(
            name: "GuestFS",
            dependencies: ["CairnCore"],
            swiftSettings: strict
        ),
        .target(
            name: "RepositoryFormat",
            dependencies: [
                "CairnCore", "CZstd",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
            ],
            swiftSettings: strict
        ),
        // Layer 2.
        .target(
            name: "Storage",
            dependencies: ["CairnCore", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict
        ),
        .target(
            name: "Repository",
            dependencies: ["CairnCore", "RepositoryFormat", "Storage"],
            swiftSettings: strict
        ),
        // Layer 2: talking to QEMU (QMP).
        .target(name: "QEMU", dependencies: ["CairnCore"], swiftSettings: strict),
        // Layer 3: the NBD server (instant restore), over any block source.
        .target(
            name: "NBDServer",
            dependencies: ["CairnCore", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")],
            swiftSettings: strict
        ),
        // Layer 4.
        .target(
            name: "Engine",
            dependencies: ["CairnCore", "DiskFormats", "GuestFS", "QEMU", "NBDServer", "RepositoryFormat", "Storage", "Repository"],
            swiftSettings: strict
        ),
        // Layer 5.
        .executableTarget(
            name: "cairn",
            dependencies: [
                "Engine", "CairnCore", "DiskFormats", "GuestFS", "NBDServer", "QEMU", "Repository", "RepositoryFormat", "Storage",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict,
            // lld with packed relative relocations (DT_RELR, glibc >= 2.36): the loader of a cold
            // static-stdlib binary read 2.3 MB of relocation records before main (100k entries);
            // packed, 19 KB. Measured 23 -> 14 major page faults; a cold restore's exec-to-first-chunk
            // 135-150 -> ~110 ms.
            linkerSettings: [.unsafeFlags(["-use-ld=lld", "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs"], .when(platforms: [.linux]))]
        ),

        // Test support: fixtures built with real tools, process helpers.
        .target(name: "CairnTestSupport", dependencies: ["CairnCore", "Storage"], swiftSettings: strict),

        .testTarget(name: "CairnCoreTests", dependencies: ["CairnCore", "CairnTestSupport"]),
        .testTarget(name: "DiskFormatsTests", dependencies: ["DiskFormats", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "GuestFSTests", dependencies: ["GuestFS", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "RepositoryFormatTests", dependencies: ["RepositoryFormat", "CairnCore"]),
        .testTarget(name: "StorageTests", dependencies: ["Storage", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "RepositoryTests", dependencies: ["Repository", "RepositoryFormat", "Storage", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "EngineTests", dependencies: ["Engine", "DiskFormats", "GuestFS", "Repository", "RepositoryFormat", "Storage", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "NBDServerTests", dependencies: ["NBDServer", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "QEMUTests", dependencies: ["QEMU", "NBDServer", "CairnCore", "CairnTestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["CairnCore", "CairnTestSupport", "QEMU"]),
    ],
    swiftLanguageModes: [.v6]
)
