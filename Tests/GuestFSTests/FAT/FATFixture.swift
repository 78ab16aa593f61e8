import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// FAT fixtures made by the real tools: `mkfs.vfat` makes the file system, mtools (`mcopy -s
/// -m`, `mattrib`) fills it from a source tree written here; `mdir`, `mattrib`, `blkid` and
/// `fsck.fat` are the referees.
enum FATFixture {
    struct Spec: Sendable, CustomStringConvertible {
        var fat: Int
        var sectorSize: Int
        var sectorsPerCluster: Int
        var sizeKiB: Int
        var label: String
        var description: String { "FAT\(fat) \(sectorSize)-byte sectors x\(sectorsPerCluster)" }
    }

    static let specs: [Spec] = [
        Spec(fat: 12, sectorSize: 512, sectorsPerCluster: 4, sizeKiB: 8000, label: "SMALL12"),
        Spec(fat: 16, sectorSize: 4096, sectorsPerCluster: 1, sizeKiB: 20480, label: "BIG SECT16"),
        Spec(fat: 32, sectorSize: 512, sectorsPerCluster: 1, sizeKiB: 40000, label: "Thirty2"),
    ]

    static let tools = ["mkfs.vfat", "mcopy", "mdir", "mattrib", "fsck.fat", "blkid"]
    static var available: Bool { tools.allSatisfy(Tool.exists) }

    static let env = ["MTOOLS_SKIP_CHECK": "1", "TZ": "UTC", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"]

    /// Names in the source tree (relative paths) and their contents.
    struct Tree {
        var root: String
        var files: [String: [UInt8]] = [:]
        var directories: Set<String> = []
    }

    static let bigSize = 3 << 20
    static let manyCount = 150
    static let helloTime = Date(timeIntervalSince1970: 981_173_106)  // 2001-02-03 04:05:06 UTC

    /// Writes the source tree: nested directories, a directory with many long names, an empty
    /// file, a big random file, a file that is mostly zeros, long, unicode, lowercase 8.3 and
    /// mixed-case names, and fixed modification times.
    static func makeTree(in dir: TempDir) throws -> Tree {
        var tree = Tree(root: dir.file("src"))
        var rng = SeededRandom(seed: 0xFA7)
        func put(_ rel: String, _ bytes: [UInt8], time: Date? = nil) throws {
            let path = tree.root + "/" + rel
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            if let time { try FileManager.default.setAttributes([.modificationDate: time], ofItemAtPath: path) }
            tree.files[rel] = bytes
        }
        func mkdir(_ rel: String) throws {
            try FileManager.default.createDirectory(atPath: tree.root + "/" + rel, withIntermediateDirectories: true)
            tree.directories.insert(rel)
        }
        try FileManager.default.createDirectory(atPath: tree.root, withIntermediateDirectories: true)
        try put("hello.txt", Array("hello, FAT\n".utf8), time: helloTime)
        try put("empty", [])
        try put("big.bin", rng.bytes(bigSize), time: Date(timeIntervalSince1970: 1_600_000_000))
        var holes = [UInt8](repeating: 0, count: 300_000)
        holes.replaceSubrange(150_000..<150_100, with: rng.bytes(100))
        try put("holes.bin", holes)
        try put("lower.txt", Array("lowercase 8.3\n".utf8))
        try put("UPPER.TXT", Array("uppercase 8.3\n".utf8))
        try put("MiXed.Txt", Array("mixed\n".utf8))
        try put("A very long file name with spaces, commas and more than forty characters.text", Array("long\n".utf8))
        try put("Ünïcödé 日本語 name.txt", Array("unicode\n".utf8))
        try put("emoji_XY.txt", Array("surrogates are patched in by a test\n".utf8))
        try mkdir("many")
        for i in 0..<manyCount { try put("many/file number \(i) of many.dat", Array("\(i)\n".utf8)) }
        try mkdir("sub")
        try mkdir("sub/deeper")
        try mkdir("sub/deeper/deepest")
        try put("sub/deeper/deepest/d.txt", Array("deep\n".utf8), time: Date(timeIntervalSince1970: 1_234_567_890))
        try put("sub/small.bin", rng.bytes(5000))
        return tree
    }

    /// A populated image for `spec`; fsck.fat must accept it.
    static func make(_ spec: Spec, in dir: TempDir) throws -> (image: String, tree: Tree) {
        let tree = try makeTree(in: dir)
        let image = dir.file("fat\(spec.fat).img")
        try Tool.run("mkfs.vfat", ["-F", "\(spec.fat)", "-S", "\(spec.sectorSize)", "-s", "\(spec.sectorsPerCluster)",
                                   "-n", spec.label, "-i", "C0FFEE42", "-C", image, "\(spec.sizeKiB)"])
        let top = try FileManager.default.contentsOfDirectory(atPath: tree.root).sorted().map { tree.root + "/" + $0 }
        try Tool.run("mcopy", ["-s", "-m", "-i", image] + top + ["::/"], environment: env)
        try Tool.run("mattrib", ["-i", image, "+r", "::/hello.txt"], environment: env)
        try Tool.run("mattrib", ["-i", image, "+r", "::/sub/small.bin"], environment: env)
        try Tool.run("fsck.fat", ["-n", image])
        return (image, tree)
    }

    /// One entry of `mdir -/ -a`: kind, size, modification "YYYY-MM-DD HH:MM".
    struct Listed: Equatable, CustomStringConvertible {
        var isDirectory: Bool
        var size: UInt64
        var modified: String
        var description: String { "\(isDirectory ? "dir" : "file") \(size) \(modified)" }
    }

    /// Parses `mdir -/ -a -i image ::/` into paths (relative, "/"-separated, without a
    /// leading "/") and their entries. Entry lines are `BASENAME EXT SIZE|<DIR> DATE TIME
    /// [LONG NAME]`; the 8.3 part takes 12 characters.
    static func mdir(_ image: String) throws -> [String: Listed] {
        let out = try Tool.run("mdir", ["-/", "-a", "-i", image, "::/"], environment: env).stdout
        var result: [String: Listed] = [:]
        var current: String?
        for line in out.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("Directory for ::/") {
                current = String(line.dropFirst("Directory for ::/".count))
                continue
            }
            guard let dir = current, line.count > 13, !line.hasPrefix(" ") else { continue }
            let short = Array(line.prefix(12))
            let rest = String(line.dropFirst(12))
            let fields = rest.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 3, fields[1].count == 10, fields[1].contains("-") else { continue }
            let base = String(short[0..<8]).trimmingCharacters(in: .whitespaces)
            let ext = String(short[9..<12]).trimmingCharacters(in: .whitespaces)
            if base == "." || base == ".." { continue }
            // The long name follows the time after two spaces.
            var name = ext.isEmpty ? base : base + "." + ext
            if let timeRange = rest.range(of: String(fields[2])) {
                let tail = rest[timeRange.upperBound...]
                if tail.hasPrefix("  "), tail.count > 2 { name = String(tail.dropFirst(2)) }
            }
            let time = String(fields[2])
            let padded = time.count == 4 ? "0" + time : time
            let path = dir.isEmpty ? name : dir + "/" + name
            result[path] = Listed(isDirectory: fields[0] == "<DIR>", size: fields[0] == "<DIR>" ? 0 : UInt64(fields[0]) ?? .max,
                                  modified: "\(fields[1]) \(padded)")
        }
        return result
    }

    /// Paths that `mattrib -/` shows with the R (read-only) attribute.
    static func readOnlyPaths(_ image: String) throws -> Set<String> {
        let out = try Tool.run("mattrib", ["-/", "-i", image, "::/"], environment: env).stdout
        var paths: Set<String> = []
        for line in out.split(separator: "\n") {
            guard let r = line.range(of: "::/") else { continue }
            let flags = line[..<r.lowerBound]
            if flags.contains("R") { paths.insert(String(line[r.upperBound...])) }
        }
        return paths
    }

    /// `blkid -p -o export` as a dictionary.
    static func blkid(_ image: String) throws -> [String: String] {
        let out = try Tool.run("blkid", ["-p", "-o", "export", image]).stdout
        var d: [String: String] = [:]
        for line in out.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { d[String(parts[0])] = String(parts[1]).replacingOccurrences(of: "\\", with: "") }
        }
        return d
    }

    /// Used and total clusters from `fsck.fat -n -v` ("N files, USED/TOTAL clusters").
    static func fsckClusters(_ image: String) throws -> (used: UInt64, total: UInt64) {
        let out = try Tool.run("fsck.fat", ["-n", "-v", image]).stdout
        for line in out.split(separator: "\n") where line.contains(" files, ") && line.hasSuffix(" clusters") {
            let counts = line.split(separator: " ").dropLast().last?.split(separator: "/") ?? []
            if counts.count == 2, let u = UInt64(counts[0]), let t = UInt64(counts[1]) { return (u, t) }
        }
        throw CairnError(.io, "no cluster summary in fsck.fat output: \(out)")
    }

    /// "YYYY-MM-DD HH:MM" of a FAT time (taken as UTC).
    static func minuteText(_ t: FileTime) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "yyyy-MM-dd HH:mm"
        return f.string(from: Date(timeIntervalSince1970: TimeInterval(t.seconds)))
    }

    /// Every node reachable from the root and its path.
    static func walk(_ fs: FATFileSystem) throws -> [String: (DirectoryEntry, FileMetadata)] {
        var out: [String: (DirectoryEntry, FileMetadata)] = [:]
        try fs.walk { path, entry, meta in out[String(path.dropFirst())] = (entry, meta) }
        return out
    }

    /// Byte offset of the first occurrence of `needle` in `hay`.
    static func find(_ needle: [UInt8], in hay: [UInt8]) -> Int? {
        guard let first = needle.first, needle.count <= hay.count else { return nil }
        var i = 0
        while i + needle.count <= hay.count {
            if hay[i] == first, Array(hay[i..<i + needle.count]) == needle { return i }
            i += 1
        }
        return nil
    }

    static func utf16le(_ s: String) -> [UInt8] { s.utf16.flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] } }
}

