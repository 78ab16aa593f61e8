import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// ext2/3/4 fixtures made by the real `mke2fs -d` from a source tree the test writes, with
/// `debugfs` and `dumpe2fs` as the referees.
enum ExtFixture {
    /// What the source tree holds: regular files (relative path -> content), symlink targets.
    struct Source {
        var root: String
        var files: [String: [UInt8]] = [:]
        var links: [String: String] = [:]
    }

    static let manyFiles = 300
    static let longTarget = String(repeating: "long-target-component/", count: 10) + "end"

    /// Writes the source tree: nested directories, a directory with many entries, empty,
    /// big random, sparse and small files, short and long symlinks, a hard link, unicode
    /// names, a fifo, a character device, special modes, owners and times.
    static func makeSource(in dir: TempDir) throws -> Source {
        let root = dir.file("src")
        var s = Source(root: root)
        let fm = FileManager.default
        var rng = SeededRandom(seed: 0xE47)
        func write(_ rel: String, _ bytes: [UInt8]) throws {
            let path = root + "/" + rel
            try fm.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            #expect(fm.createFile(atPath: path, contents: Data(bytes)))
            s.files[rel] = bytes
        }
        try write("a/b/c/deep.txt", Array("deep inside\n".utf8))
        try write("a/note", Array("note".utf8))
        for i in 0..<manyFiles {
            try write("many/entry-number-\(i)-with-a-fairly-long-name", Array("file \(i)\n".utf8))
        }
        try write("empty", [])
        try write("big.bin", rng.bytes(3 << 20 | 12345))
        try write("medium.bin", rng.bytes(70_000))
        try write("ünïcødé-名前.txt", Array("unicode".utf8))
        try write("emoji-😀", Array("smile".utf8))
        // Sparse: data, a 1 MiB hole, data, a hole to the end but for the last 100 bytes.
        var sparse = [UInt8](repeating: 0, count: 4 << 20)
        let pieces = [(0, rng.bytes(8192)), (1 << 20, rng.bytes(8192)), ((4 << 20) - 100, rng.bytes(100))]
        for (o, bytes) in pieces { sparse.replaceSubrange(o..<o + bytes.count, with: bytes) }
        let sparsePath = root + "/sparse.bin"
        #expect(fm.createFile(atPath: sparsePath, contents: nil))
        for (o, bytes) in pieces { try writeBytes(bytes, to: sparsePath, at: UInt64(o)) }
        try Tool.run("truncate", ["-s", "\(4 << 20)", sparsePath])
        s.files["sparse.bin"] = sparse

        // Islands of data between holes: more extents than i_block holds, so a tree of depth 1.
        var islands = [UInt8](repeating: 0, count: 7 * 65536 + 4096)
        let islandsPath = root + "/islands.bin"
        #expect(fm.createFile(atPath: islandsPath, contents: nil))
        for k in 0..<8 {
            let bytes = rng.bytes(4096)
            islands.replaceSubrange(k * 65536..<k * 65536 + 4096, with: bytes)
            try writeBytes(bytes, to: islandsPath, at: UInt64(k * 65536))
        }
        s.files["islands.bin"] = islands

        try Tool.run("ln", ["-s", "a/b/c/deep.txt", root + "/link-short"])
        s.links["link-short"] = "a/b/c/deep.txt"
        try Tool.run("ln", ["-s", longTarget, root + "/a/link-long"])
        s.links["a/link-long"] = longTarget
        try Tool.run("ln", [root + "/medium.bin", root + "/a/hard-medium"])
        s.files["a/hard-medium"] = s.files["medium.bin"]
        try Tool.run("mkfifo", [root + "/fifo"])
        try Tool.run("mknod", [root + "/chardev", "c", "1", "3"])

        try write("owned", Array("owned by 1234:5678".utf8))
        try Tool.run("chown", ["1234:5678", root + "/owned"])
        try Tool.run("chmod", ["4751", root + "/owned"])
        try fm.createDirectory(atPath: root + "/sticky", withIntermediateDirectories: true)
        try Tool.run("chmod", ["1777", root + "/sticky"])
        try write("future", Array("2100".utf8))
        try Tool.run("touch", ["-m", "-d", "@4102444800", root + "/future"])  // 2100-01-01: needs the epoch bits
        try write("past", Array("1960".utf8))
        try Tool.run("touch", ["-m", "-d", "@-315619200", root + "/past"])    // 1960-01-01
        return s
    }

    /// Runs mke2fs with `options` on a fresh image of `size`, then `e2fsck -fn` (which must
    /// pass). `optimize` first rebuilds directories as htrees (`e2fsck -fyD`).
    static func make(_ options: [String], source: Source, in dir: TempDir, name: String, size: String = "24M",
                     optimize: Bool = false) throws -> String {
        let path = dir.file(name)
        try Tool.run("mke2fs", ["-q", "-F"] + options + ["-d", source.root, path, size])
        if optimize {
            let r = try Tool.run("e2fsck", ["-fyD", path], check: false)
            #expect(r.status <= 1, "e2fsck -fyD: \(r.stdout)\(r.stderr)")
        }
        let check = try Tool.run("e2fsck", ["-fn", path], check: false)
        #expect(check.status == 0, "e2fsck -fn \(options): \(check.stdout)\(check.stderr)")
        return path
    }

    /// The file type and permission bits as debugfs prints them (octal `st_mode`).
    static func mode(_ m: FileMetadata) -> UInt32 {
        let type: UInt32 = switch m.kind {
        case .regular: 0o100000
        case .directory: 0o040000
        case .symlink: 0o120000
        case .characterDevice: 0o020000
        case .blockDevice: 0o060000
        case .fifo: 0o010000
        case .socket: 0o140000
        case .other: 0
        }
        return type | m.permissions
    }

    /// Runs debugfs with one command per line and returns each command's output.
    static func debugfs(_ image: String, _ commands: [String], writable: Bool = false) throws -> [String] {
        let dir = try TempDir("ext-dbg")
        let cmdFile = dir.file("cmds")
        #expect(FileManager.default.createFile(atPath: cmdFile, contents: Data((commands.joined(separator: "\n") + "\n").utf8)))
        let out = try Tool.run("debugfs", (writable ? ["-w"] : []) + ["-f", cmdFile, image]).stdout
        var parts: [String] = []
        var current: [Substring]?
        for line in out.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("debugfs: ") {
                if let current { parts.append(current.joined(separator: "\n")) }
                current = []
            } else {
                current?.append(line)
            }
        }
        if let current { parts.append(current.joined(separator: "\n")) }
        return parts
    }

    /// Every entry below the root: path -> (entry, metadata).
    static func walk(_ fs: ExtFileSystem) throws -> [(String, DirectoryEntry, FileMetadata)] {
        var out: [(String, DirectoryEntry, FileMetadata)] = []
        try fs.walk { path, entry, meta in out.append((path, entry, meta)) }
        return out
    }

    /// A [UInt8] editing helper for hostile images.
    static func put16(_ v: UInt16, _ o: Int, _ b: inout [UInt8]) { for i in 0..<2 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func put32(_ v: UInt32, _ o: Int, _ b: inout [UInt8]) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func get32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
    static func get16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }

    /// Drives every reader entry point, as the fuzz target does; returns false when an error
    /// other than a CairnError escaped.
    static func exercise(_ fs: ExtFileSystem) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 65536)
        do {
            try fs.walk(maxEntries: 5000) { _, entry, meta in
                if meta.kind == .regular {
                    _ = try buffer.withUnsafeMutableBytes { try fs.read(entry.node, into: $0, at: 0) }
                } else if meta.kind == .symlink {
                    _ = try fs.readLink(entry.node)
                }
            }
        } catch is CairnError {
        } catch {
            return false
        }
        do {
            let free = try fs.freeRanges()
            var last: UInt64 = 0
            for r in free {
                if r.lowerBound < last || r.upperBound > fs.volume.size { return false }
                last = r.upperBound
            }
        } catch is CairnError {
        } catch {
            return false
        }
        return true
    }
}

