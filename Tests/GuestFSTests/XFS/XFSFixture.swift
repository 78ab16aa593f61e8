import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// One file of the referee listing, as the kernel's XFS driver reported it on the mounted
/// fixture (`find -printf`, `stat`).
struct XFSRefEntry: Sendable {
    var type: Character
    var ino: UInt64
    var permissions: UInt32
    var uid: UInt32
    var gid: UInt32
    var size: UInt64
    var links: UInt32
    var modified: FileTime
    var accessed: FileTime
    var changed: FileTime
    var created: FileTime
    var rdev: UInt64
    var target: String
}

/// The rich XFS image every test shares: made once per test process with mkfs.xfs, filled
/// through a loop mount by `script`, read back through the mount as the referee, checked
/// with `xfs_repair -n`, then kept in memory only (no file, no mount survives the build).
struct XFSFixture: Sendable {
    var image: [UInt8]
    var entries: [String: XFSRefEntry]
    var contents: [String: [UInt8]]
    /// Free extents as `xfs_db freesp -d` lists them, as byte ranges (not merged).
    var freeExtents: [Range<UInt64>]
    var freeBlocks: UInt64
    var uuid: String

    static let size = 64 << 20
    /// mkfs.xfs refuses file systems under 300 MB unless it believes it runs under xfstests.
    static let smallFSEnvironment = ["TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"]

    static let shared: Result<XFSFixture, any Error> = Result { try build() }

    static func get() throws -> XFSFixture { try shared.get() }

    /// The tree: every directory form (short-form, block, leaf, node), B+tree-mapped files (one
    /// with a two-level tree),
    /// holes, unwritten extents, short and remote symlinks, a hard link, devices, unicode
    /// names, special modes, owners and times outside 1970-2038.
    static let script = #"""
        set -euo pipefail
        cd "$1"
        mkdir -p a/b/c/d/e small medium many sticky "日本語"
        echo deep > a/b/c/d/e/leaf.txt
        : > empty
        head -c 3145728 /dev/urandom > big.bin
        truncate -s 8M sparse.bin
        printf middle | dd of=sparse.bin bs=1 seek=4194305 conv=notrunc status=none
        printf tail | dd of=sparse.bin bs=1 seek=8388604 conv=notrunc status=none
        xfs_io -f -c "falloc 0 1m" -c "pwrite -S 0x5a 262144 65536" prealloc.bin > /dev/null
        args=()
        for i in $(seq 0 399); do args+=(-c "pwrite -S $((i % 251 + 1)) $((i * 8192 + i % 7)) 4000"); done
        xfs_io -f "${args[@]}" frag.bin > /dev/null
        args=()
        for i in $(seq 0 1599); do args+=(-c "pwrite -S $((i % 253 + 1)) $((i * 8192)) 1000"); done
        xfs_io -f "${args[@]}" deep.bin > /dev/null
        head -c 1048576 /dev/urandom > gone.bin
        sync
        rm gone.bin
        ln -s big.bin link-short
        ln -s "$(printf 'long-target-%.0s' $(seq 1 60))/end" link-long
        ln -s a/b/c link-dir
        ln big.bin hard-link
        echo unicode > "héllo wörld ✓.txt"
        echo x > "日本語/ファイル"
        echo s > setuid; chmod 4755 setuid
        chmod 1777 sticky
        echo o > owned; chown 1234:5678 owned; chmod 640 owned
        touch -d '1960-05-06 07:08:09.5' old
        touch -d '2100-01-01 00:00:01.25' future
        touch -h -d '2001-02-03 04:05:06.123456789' link-short
        mknod chardev c 1 3; mknod blockdev b 7 0; mkfifo fifo
        for i in $(seq 1 30); do : > small/f$i; done
        for i in $(seq 1 300); do : > medium/medium-entry-number-$i; done
        for i in $(seq 1 3000); do : > many/a-rather-long-file-name-in-a-big-directory-$i; done
        for i in $(seq 1 7 3000); do rm many/a-rather-long-file-name-in-a-big-directory-$i; done
        """#

    static func build() throws -> XFSFixture {
        let dir = try TempDir("xfs-fixture")
        let image = dir.file("fs.img")
        let mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try Tool.run("truncate", ["-s", "\(size)", image])
        try Tool.run("mkfs.xfs", ["-q", "-f", "-L", "cairn-xfs", image], environment: smallFSEnvironment)
        try Tool.run("mount", ["-o", "loop,noatime", image, mnt])
        var entries: [String: XFSRefEntry] = [:]
        var contents: [String: [UInt8]] = [:]
        do {
            defer { _ = try? Tool.run("umount", [mnt], check: false) }
            try Tool.run("bash", ["-c", script, "fixture", mnt])
            let listing = try Tool.run("find", [mnt, "-mindepth", "1", "-printf", "%y\t%i\t%m\t%U\t%G\t%s\t%n\t%T@\t%A@\t%C@\t%P\t%l\n"]).stdout
            let stats = try Tool.run("find", [mnt, "-mindepth", "1", "-exec", "stat", "-c", "%i\t%.9W\t%t\t%T", "{}", "+"]).stdout
            var births: [UInt64: (FileTime, UInt64)] = [:]
            for line in stats.split(separator: "\n") {
                let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
                guard f.count == 4, let ino = UInt64(f[0]) else { continue }
                let major = UInt64(f[2], radix: 16) ?? 0, minor = UInt64(f[3], radix: 16) ?? 0
                births[ino] = (parseTime(f[1]), major << 8 | minor)
            }
            for line in listing.split(separator: "\n") {
                let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
                guard f.count == 12, let type = f[0].first, let ino = UInt64(f[1]) else { continue }
                let (birth, rdev) = births[ino] ?? (FileTime(seconds: 0), 0)
                entries["/" + f[10]] = XFSRefEntry(
                    type: type, ino: ino, permissions: UInt32(f[2], radix: 8) ?? 0, uid: UInt32(f[3]) ?? 0, gid: UInt32(f[4]) ?? 0,
                    size: UInt64(f[5]) ?? 0, links: UInt32(f[6]) ?? 0, modified: parseTime(f[7]), accessed: parseTime(f[8]),
                    changed: parseTime(f[9]), created: birth, rdev: type == "c" || type == "b" ? rdev : 0, target: f[11])
                if type == "f" { contents["/" + f[10]] = try readFile(mnt + "/" + f[10]) }
            }
        }
        guard try Tool.run("mountpoint", ["-q", mnt], check: false).status != 0 else {
            throw CairnError(.io, "the XFS fixture is still mounted at \(mnt)")
        }
        try Tool.run("xfs_repair", ["-n", image])
        let freesp = try Tool.run("xfs_db", ["-r", "-c", "freesp -d", image]).stdout
        let sb = try Tool.run("xfs_db", ["-r", "-c", "sb 0", "-c", "p blocksize agblocks", image]).stdout
        func field(_ name: String) -> UInt64 {
            for line in sb.split(separator: "\n") where line.hasPrefix(name + " = ") {
                return UInt64(line.dropFirst(name.count + 3)) ?? 0
            }
            return 0
        }
        let bs = field("blocksize"), agBlocks = field("agblocks")
        var free: [Range<UInt64>] = []
        var total: UInt64 = 0
        for line in freesp.split(separator: "\n") {
            let f = line.split(separator: " ").compactMap { UInt64($0) }
            if f.count == 3 {
                let start = (f[0] * agBlocks + f[1]) * bs
                free.append(start..<start + f[2] * bs)
            }
        }
        for line in try Tool.run("xfs_db", ["-r", "-c", "freesp -s", image]).stdout.split(separator: "\n") where line.hasPrefix("total free blocks") {
            total = UInt64(line.split(separator: " ").last ?? "") ?? 0
        }
        let uuid = try Tool.run("blkid", ["-p", "-o", "value", "-s", "UUID", image]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        return XFSFixture(image: try readFile(image), entries: entries, contents: contents,
                          freeExtents: free.sorted { $0.lowerBound < $1.lowerBound }, freeBlocks: total, uuid: uuid)
    }

    /// `find`'s "%T@" / stat's "%.9W" text as a FileTime: both print the seconds (signed) and
    /// the nanoseconds as two fields joined by a dot ("-304707111.500000000" is 0.5 s after
    /// second -304707111), so the fraction is not negated.
    static func parseTime(_ text: String) -> FileTime {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        let seconds = Int64(parts.first ?? "0") ?? 0
        let fraction = parts.count > 1 ? String(parts[1].prefix(9)).padding(toLength: 9, withPad: "0", startingAt: 0) : "0"
        return FileTime(seconds: seconds, nanoseconds: UInt32(fraction) ?? 0)
    }

    func fileSystem() throws -> XFSFileSystem {
        try XFSFileSystem(volume: MemoryBlockSource(image, name: "fixture.xfs"))
    }
}

/// Test helpers that edit an image in place (big-endian fields, re-stamped CRCs).
enum XFSPatch {
    static func put16(_ v: UInt16, at o: Int, _ b: inout [UInt8]) {
        b[o] = UInt8(v >> 8); b[o + 1] = UInt8(v & 0xFF)
    }
    static func put32(_ v: UInt32, at o: Int, _ b: inout [UInt8]) {
        for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * i)) }
    }
    static func put64(_ v: UInt64, at o: Int, _ b: inout [UInt8]) {
        for i in 0..<8 { b[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * i)) }
    }
    static func get32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[o + $1]) } }
    static func get64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[o + $1]) } }

    /// Recomputes the little-endian CRC-32C at `start + field` over `length` bytes from `start`.
    static func restamp(_ b: inout [UInt8], start: Int, length: Int, field: Int) {
        let crc = CRC32C.checksum(Array(b[start..<start + length]), zeroingFieldAt: field)
        for i in 0..<4 { b[start + field + i] = UInt8(truncatingIfNeeded: crc >> (8 * i)) }
    }
}
