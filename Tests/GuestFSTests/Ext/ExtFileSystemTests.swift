import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

struct ExtConfig: Sendable, CustomStringConvertible {
    var name: String
    var options: [String]
    var type: String
    var optimize = false
    var size = "24M"
    var description: String { name }
    var bigalloc: Bool { options.contains { $0.contains("bigalloc") } }
    var largeInodes: Bool { !options.contains("128") }
}

@Suite struct ExtFileSystemTests {
    static let configs: [ExtConfig] = [
        ExtConfig(name: "ext2-1k-128", options: ["-t", "ext2", "-b", "1024", "-I", "128"], type: "ext2"),
        ExtConfig(name: "ext3-4k", options: ["-t", "ext3", "-b", "4096"], type: "ext3"),
        ExtConfig(name: "ext4-4k", options: ["-t", "ext4", "-b", "4096"], type: "ext4"),
        ExtConfig(name: "ext4-1k-64bit-htree", options: ["-t", "ext4", "-b", "1024", "-O", "64bit"], type: "ext4", optimize: true),
        ExtConfig(name: "ext4-inline", options: ["-t", "ext4", "-O", "inline_data"], type: "ext4"),
        ExtConfig(name: "ext4-blockmap", options: ["-t", "ext4", "-O", "^extent,^64bit,^metadata_csum", "-N", "2048"], type: "ext4"),
        ExtConfig(name: "ext4-metabg-1k", options: ["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"], type: "ext4"),
        ExtConfig(name: "ext4-bigalloc", options: ["-t", "ext4", "-O", "bigalloc", "-C", "16384"], type: "ext4"),
        ExtConfig(name: "ext4-64k", options: ["-t", "ext4", "-b", "65536"], type: "ext4", size: "32M"),
    ]

    /// debugfs `stat` fields of one inode.
    struct Stat {
        var links = -1, uid = -1, gid = -1
        var size: UInt64 = 0
        var times: [String: FileTime] = [:]
        var device: UInt64?
        var fastLink: String?
    }

    static func parseStat(_ text: String) -> Stat {
        var s = Stat()
        for line in text.split(separator: "\n") {
            let tokens = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            func after(_ key: String) -> String? { tokens.firstIndex(of: key).flatMap { $0 + 1 < tokens.count ? tokens[$0 + 1] : nil } }
            if let v = after("User:") { s.uid = Int(v) ?? -2 }
            if let v = after("Group:") { s.gid = Int(v) ?? -2 }
            if line.hasPrefix("User:"), let v = after("Size:") { s.size = UInt64(v) ?? 0 }
            if let v = after("Links:") { s.links = Int(v) ?? -2 }
            if let first = tokens.first, ["ctime:", "atime:", "mtime:", "crtime:"].contains(first), tokens.count > 1 {
                let parts = tokens[1].dropFirst(2).split(separator: ":")
                let sec = Int64(Int32(bitPattern: UInt32(parts[0], radix: 16) ?? 0))
                var t = FileTime(seconds: sec)
                if parts.count > 1, let extra = UInt32(parts[1], radix: 16) {
                    t = FileTime(seconds: sec + (Int64(extra & 3) << 32), nanoseconds: extra >> 2)
                }
                s.times[String(first.dropLast())] = t
            }
            if line.hasPrefix("Device major/minor number:"), let v = after("number:") {
                let mm = v.split(separator: ":").compactMap { UInt64($0, radix: 16) }
                if mm.count == 2 { s.device = mm[0] << 8 | mm[1] }
            }
            if line.hasPrefix("Fast link dest:"), let q = line.firstIndex(of: "\"") {
                s.fastLink = String(line[line.index(after: q)...].dropLast())
            }
        }
        return s
    }

    @Test(arguments: configs) func listingAndContentMatchDebugfs(_ c: ExtConfig) throws {
        let dir = try TempDir("ext-list")
        let source = try ExtFixture.makeSource(in: dir)
        let image = try ExtFixture.make(c.options, source: source, in: dir, name: "\(c.name).img", size: c.size, optimize: c.optimize)
        if c.largeInodes {
            // mke2fs -d drops the epoch bits of times past 2038; debugfs sets them.
            _ = try ExtFixture.debugfs(image, ["sif /future mtime 21000101000000", "sif /future mtime_extra 0x1dcd6501"], writable: true)
        }
        let volume = try FileBlockSource(path: image)
        #expect(ExtFileSystem.probe(volume))
        let fs = try ExtFileSystem(volume: volume)
        #expect(fs.typeName == c.type)
        let blkid = try Tool.run("blkid", ["-o", "value", "-s", "TYPE", image], check: false).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(blkid.isEmpty || blkid == fs.typeName)
        let uuid = try Tool.run("blkid", ["-o", "value", "-s", "UUID", image], check: false).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(uuid.isEmpty || uuid == fs.uuid)

        let entries = try ExtFixture.walk(fs)
        let byPath = Dictionary(entries.map { ($0.0, ($0.1, $0.2)) }, uniquingKeysWith: { a, _ in a })
        #expect(byPath["/lost+found"]?.1.kind == .directory)

        // Directory listings against `debugfs ls -p` (inode/mode/uid/gid/name/size).
        let dirs = [Ext.rootInode] + entries.filter { $0.2.kind == .directory }.map(\.1.node)
        let listings = try ExtFixture.debugfs(image, dirs.map { "ls -p <\($0)>" })
        #expect(listings.count == dirs.count)
        for (node, text) in zip(dirs, listings) {
            var theirs: [String] = []
            for line in text.split(separator: "\n") where line.hasPrefix("/") {
                let f = line.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
                guard f.count >= 7, f[5] != ".", f[5] != "..", f[1] != "0" else { continue }
                theirs.append([f[5], f[1], String(UInt32(f[2], radix: 8) ?? 0, radix: 8), f[3], f[4], f[6]].joined(separator: "|"))
            }
            var ours: [String] = []
            for e in try fs.directory(node) {
                let m = try fs.metadata(of: e.node)
                if let k = e.kind { #expect(k == m.kind, "\(e.name)") }
                let size = m.kind == .directory ? "" : "\(m.size)"
                ours.append([e.name, "\(e.node)", String(ExtFixture.mode(m), radix: 8), "\(m.uid)", "\(m.gid)", size].joined(separator: "|"))
            }
            #expect(ours.sorted() == theirs.sorted(), "directory inode \(node)")
            #expect(!ours.isEmpty || node != Ext.rootInode)
        }
        #expect(try fs.directory(fs.lookup("/many")).count == ExtFixture.manyFiles)

        // Inode metadata against `debugfs stat`.
        let nodes = Array(Set(entries.map(\.1.node))).sorted()
        let stats = try ExtFixture.debugfs(image, nodes.map { "stat <\($0)>" })
        #expect(stats.count == nodes.count)
        for (node, text) in zip(nodes, stats) {
            let s = Self.parseStat(text)
            let m = try fs.metadata(of: node)
            #expect(Int(m.linkCount) == s.links && Int(m.uid) == s.uid && Int(m.gid) == s.gid && m.size == s.size, "inode \(node)")
            #expect(s.times["mtime"] == m.modified && s.times["atime"] == m.accessed && s.times["ctime"] == m.changed, "inode \(node)")
            #expect(s.times["crtime"] == m.created, "inode \(node)")
            if let d = s.device { #expect(m.device == d) }
            if let link = s.fastLink { #expect(try fs.readLink(node) == link) }
        }

        // Content: every source file byte for byte; symlink targets; special files.
        for (rel, bytes) in source.files {
            let node = try fs.lookup("/" + rel)
            #expect(try fs.readAll(node) == bytes, "\(rel)")
        }
        for (rel, target) in source.links {
            #expect(try fs.readLink(fs.lookup("/" + rel)) == target)
        }
        #expect(try fs.metadata(of: fs.lookup("/fifo")).kind == .fifo)
        let dev = try fs.metadata(of: fs.lookup("/chardev"))
        #expect(dev.kind == .characterDevice && dev.device == 0x0103)
        let owned = try fs.metadata(of: fs.lookup("/owned"))
        #expect(owned.uid == 1234 && owned.gid == 5678 && owned.permissions == 0o4751)
        #expect(try fs.metadata(of: fs.lookup("/sticky")).permissions == 0o1777)
        #expect(try fs.metadata(of: fs.lookup("/past")).modified.seconds == -315_619_200)
        if c.largeInodes {
            #expect(try fs.metadata(of: fs.lookup("/future")).modified == FileTime(seconds: 4_102_444_800, nanoseconds: 125_000_000))
            #expect(try fs.metadata(of: fs.lookup("/big.bin")).created != nil)
        }
        // Reads at odd offsets and sizes, across extent and hole boundaries.
        for name in ["big.bin", "sparse.bin"] {
            let node = try fs.lookup("/" + name)
            let want = source.files[name] ?? []
            for (offset, count) in [(1, 1 << 20), (4095, 5000), ((1 << 20) - 7, 300_000), (want.count - 10, 100)] {
                var buf = [UInt8](repeating: 0xAA, count: count)
                let n = try buf.withUnsafeMutableBytes { try fs.read(node, into: $0, at: UInt64(offset)) }
                #expect(n == min(count, want.count - offset))
                #expect(Array(buf[0..<n]) == Array(want[offset..<offset + n]), "\(name) at \(offset)")
            }
            var buf = [UInt8](repeating: 0, count: 10)
            #expect(try buf.withUnsafeMutableBytes { try fs.read(node, into: $0, at: UInt64(want.count)) } == 0)
        }
        if c.options.contains(where: { $0.contains("inline_data") }) {
            #expect(try fs.inode(fs.lookup("/a/note")).hasInlineData)
            #expect(try fs.inode(fs.lookup("/a/b")).hasInlineData)
        }
        if c.options.contains(where: { $0.contains("^extent") }) { #expect(try !fs.inode(fs.lookup("/big.bin")).usesExtents) }
        #expect(throws: CairnError.self) { try fs.directory(fs.lookup("/big.bin")) }
        #expect(throws: CairnError.self) { try fs.readLink(fs.lookup("/big.bin")) }
        withExtendedLifetime(dir) {}
    }

    /// Free ranges equal what dumpe2fs derives from the bitmaps (bigalloc: a subset, since
    /// BLOCK_UNINIT groups are left out there), no block of any file, directory, the journal
    /// or the resize inode is free, and the total matches `dumpe2fs -h`.
    @Test(arguments: configs) func freeSpaceMatchesDumpe2fs(_ c: ExtConfig) throws {
        let dir = try TempDir("ext-free")
        let source = try ExtFixture.makeSource(in: dir)
        let image = try ExtFixture.make(c.options, source: source, in: dir, name: "\(c.name).img", size: c.size, optimize: c.optimize)
        let fs = try ExtFileSystem(volume: try FileBlockSource(path: image))
        let bs = UInt64(fs.blockSize)
        let free = try fs.freeRanges()
        var last: UInt64 = 0
        for r in free {
            #expect(r.lowerBound >= last && r.lowerBound % bs == 0 && r.upperBound % bs == 0)
            last = r.upperBound
        }
        let ours = free.map { $0.lowerBound / bs..<$0.upperBound / bs }

        let dump = try Tool.run("dumpe2fs", [image]).stdout
        // dumpe2fs prints clusters by their first block: "a-b" ends with the cluster at b.
        let step = UInt64(fs.sb.clusterSize) / bs
        var theirs: [Range<UInt64>] = []
        for line in dump.split(separator: "\n") where line.hasPrefix("  Free blocks: ") {
            for item in line.dropFirst("  Free blocks: ".count).split(separator: ",") {
                let ends = item.trimmingCharacters(in: .whitespaces).split(separator: "-").compactMap { UInt64($0) }
                guard let a = ends.first, let b = ends.last else { continue }
                if let l = theirs.last, l.upperBound == a { theirs[theirs.count - 1] = l.lowerBound..<b + step } else { theirs.append(a..<b + step) }
            }
        }
        let header = try Tool.run("dumpe2fs", ["-h", image]).stdout
        let freeLine = header.split(separator: "\n").first { $0.hasPrefix("Free blocks:") }
        let headerFree = UInt64(freeLine?.split(separator: " ").last ?? "") ?? 0
        let ourTotal = ours.reduce(0) { $0 + $1.count }
        if c.bigalloc {
            for r in ours { #expect(theirs.contains { $0.lowerBound <= r.lowerBound && r.upperBound <= $0.upperBound }, "\(r)") }
            #expect(ourTotal <= headerFree && ourTotal > 0)
        } else {
            #expect(ours == theirs)
            #expect(UInt64(ourTotal) == headerFree)
        }

        // Every block any inode owns (data, indirect and extent-tree blocks) is in use.
        let nodes = Array(Set(try ExtFixture.walk(fs).map(\.1.node) + [2, 7, 8])).sorted()
        let blockLists = try ExtFixture.debugfs(image, nodes.map { "blocks <\($0)>" })
        var owned = 0
        for text in blockLists {
            for token in text.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
                guard let b = UInt64(token) else { continue }
                owned += 1
                #expect(!ours.contains { $0.contains(b) }, "block \(b) is owned but reported free")
            }
        }
        #expect(owned > 300)

        // A journal that needs recovery: nothing is reported free.
        _ = try Tool.run("debugfs", ["-w", "-R", "feature needs_recovery", image])
        #expect(try ExtFileSystem(volume: try FileBlockSource(path: image)).freeRanges().isEmpty)
        withExtendedLifetime(dir) {}
    }

    @Test func unwrittenExtentsAndHolesReadAsZeros() throws {
        let dir = try TempDir("ext-unwritten")
        let source = try ExtFixture.makeSource(in: dir)
        let image = try ExtFixture.make(["-t", "ext4", "-b", "1024"], source: source, in: dir, name: "u.img")
        _ = try ExtFixture.debugfs(image, ["write /dev/null prealloc", "fallocate /prealloc 0 99", "sif /prealloc size 102400"], writable: true)
        let stat = try Tool.run("debugfs", ["-R", "stat /prealloc", image]).stdout
        #expect(stat.contains("[u]"), "\(stat)")
        // Put a pattern into the preallocated blocks: an unwritten extent must still read as zeros.
        let fs0 = try ExtFileSystem(volume: try FileBlockSource(path: image))
        let runs = try fs0.extentRuns(fs0.inode(fs0.lookup("/prealloc")))
        #expect(runs.count == 1 && runs[0].unwritten)
        try writeBytes([UInt8](repeating: 0x5A, count: 100 * 1024), to: image, at: runs[0].physical * 1024)
        let fs = try ExtFileSystem(volume: try FileBlockSource(path: image))
        let node = try fs.lookup("/prealloc")
        #expect(try fs.readAll(node) == [UInt8](repeating: 0, count: 102_400))
        withExtendedLifetime(dir) {}
    }

    /// A sparse ext2 file reaching the triple indirect block (1 KiB blocks: past 64 MiB), and a
    /// directory that e2fsck -D turned into an htree.
    @Test func tripleIndirectAndHtree() throws {
        let dir = try TempDir("ext-triple")
        let source = try ExtFixture.makeSource(in: dir)
        let far = source.root + "/far.bin"
        #expect(FileManager.default.createFile(atPath: far, contents: nil))
        let tail = Array("the end of a very sparse file".utf8)
        try writeBytes(tail, to: far, at: 80 << 20)
        try writeBytes(Array("start".utf8), to: far, at: 0)
        for (options, name) in [(["-t", "ext2", "-b", "1024"], "ext2.img"), (["-t", "ext4", "-b", "1024"], "ext4.img")] {
            let image = try ExtFixture.make(options, source: source, in: dir, name: name, optimize: true)
            let fs = try ExtFileSystem(volume: try FileBlockSource(path: image))
            let node = try fs.lookup("/far.bin")
            #expect(try fs.metadata(of: node).size == UInt64((80 << 20) + tail.count))
            var buf = [UInt8](repeating: 0xFF, count: 4096)
            #expect(try buf.withUnsafeMutableBytes { try fs.read(node, into: $0, at: (80 << 20) - 100) } == 100 + tail.count)
            #expect(Array(buf[0..<100]) == [UInt8](repeating: 0, count: 100) && Array(buf[100..<100 + tail.count]) == tail)
            #expect(try buf.withUnsafeMutableBytes { try fs.read(node, into: $0, at: 0) } == 4096)
            #expect(Array(buf[0..<5]) == Array("start".utf8) && buf[5..<4096].allSatisfy { $0 == 0 })
            let many = try fs.inode(fs.lookup("/many"))
            #expect(many.flags & Ext.InodeFlag.index != 0, "e2fsck -D made no htree")
            let names = try fs.directory(many.number).map(\.name)
            #expect(Set(names) == Set((0..<ExtFixture.manyFiles).map { "entry-number-\($0)-with-a-fairly-long-name" }))
        }
        withExtendedLifetime(dir) {}
    }

    @Test func probeRejectsOtherData() throws {
        #expect(!ExtFileSystem.probe(MemoryBlockSource([])))
        #expect(!ExtFileSystem.probe(MemoryBlockSource([UInt8](repeating: 0, count: 1500))))
        #expect(!ExtFileSystem.probe(MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16))))
        var b = [UInt8](repeating: 0, count: 4096)
        ExtFixture.put16(0xEF53, 1024 + 0x38, &b)
        #expect(!ExtFileSystem.probe(MemoryBlockSource(b)))  // geometry fields zero
        #expect(throws: CairnError.self) { try ExtFileSystem(volume: MemoryBlockSource(b)) }
    }

    @Test func regressionInputsReplay() throws {
        let root = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = root.appendingPathComponent("fuzz/regressions/ext4").path
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        for f in files.sorted() {
            let bytes = try readFile(dir + "/" + f)
            let volume = MemoryBlockSource(bytes, name: "fuzz-ext", zeroPaddedTo: 64 << 20)
            if let fs = try? ExtFileSystem(volume: volume) {
                #expect(ExtFixture.exercise(fs), "\(f)")
            }
        }
    }
}

