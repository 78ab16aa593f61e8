import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite(.enabled(if: FATFixture.available, "needs mtools, dosfstools and blkid"))
struct FATFileSystemTests {
    /// The listing, kinds, sizes, times, modes, label and serial agree with mdir, mattrib and
    /// blkid; every file reads back byte for byte.
    @Test(arguments: FATFixture.specs)
    func matchesMtools(_ spec: FATFixture.Spec) throws {
        let dir = try TempDir("fat\(spec.fat)")
        let (image, tree) = try FATFixture.make(spec, in: dir)
        let volume = try FileBlockSource(path: image)
        #expect(FATFileSystem.probe(volume))
        let fs = try FATFileSystem(volume: volume)
        #expect(fs.fatType.rawValue == "FAT\(spec.fat)")
        #expect(fs.typeName == "vfat")
        #expect(fs.blockSize == spec.sectorSize * spec.sectorsPerCluster)

        let ids = try FATFixture.blkid(image)
        #expect(ids["TYPE"] == fs.typeName)
        #expect(fs.uuid == ids["UUID"] && fs.uuid == "C0FF-EE42")
        #expect(fs.label == ids["LABEL"])

        let ours = try FATFixture.walk(fs)
        let theirs = try FATFixture.mdir(image)
        #expect(Set(ours.keys) == Set(theirs.keys))
        #expect(theirs.count == tree.files.count + tree.directories.count)
        let readOnly = try FATFixture.readOnlyPaths(image)
        #expect(readOnly == ["hello.txt", "sub/small.bin"])
        for (path, (entry, meta)) in ours {
            guard let ref = theirs[path] else { Issue.record("\(path) not listed by mdir"); continue }
            #expect((meta.kind == .directory) == ref.isDirectory, "\(path)")
            #expect(entry.kind == meta.kind)
            if !ref.isDirectory { #expect(meta.size == ref.size, "\(path)") }
            #expect(FATFixture.minuteText(meta.modified) == ref.modified, "\(path)")
            let expectedMode: UInt32 = ref.isDirectory ? 0o755 : (readOnly.contains(path) ? 0o444 : 0o644)
            #expect(meta.permissions == expectedMode, "\(path)")
            #expect(meta.uid == 0 && meta.gid == 0)
        }
        // Every source file reads back identically, through one read and through small pieces.
        for (path, bytes) in tree.files {
            let node = try fs.lookup("/" + path)
            #expect(try fs.readAll(node) == bytes, "\(path)")
        }
        for d in tree.directories { #expect(try fs.metadata(of: fs.lookup("/" + d)).kind == .directory) }
        let big = try fs.lookup("/big.bin")
        var pieced: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 100_003)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try fs.read(big, into: $0, at: UInt64(pieced.count)) }
            if n == 0 { break }
            pieced += buffer[0..<n]
        }
        #expect(pieced == tree.files["big.bin"])

        // Times: 2 s resolution, creation equals modification as mcopy -m writes it, access
        // date without time.
        let hello = try fs.metadata(of: fs.lookup("/hello.txt"))
        #expect(hello.modified == FileTime(seconds: 981_173_106))
        #expect(hello.created == hello.modified)
        #expect(hello.accessed == FileTime(seconds: 981_158_400))
        #expect(try fs.metadata(of: fs.lookup("/sub/deeper/deepest/d.txt")).modified == FileTime(seconds: 1_234_567_890))
        #expect(try fs.metadata(of: fs.lookup("/big.bin")).modified == FileTime(seconds: 1_600_000_000))

        // The names: 8.3 lowercase flags, plain 8.3, long and unicode names.
        let rootNames = try fs.directory(fs.rootNode).map(\.name)
        for name in ["lower.txt", "UPPER.TXT", "MiXed.Txt", "empty", "Ünïcödé 日本語 name.txt"] {
            #expect(rootNames.contains(name), "\(name) in \(rootNames)")
        }
        #expect(try fs.directory(fs.lookup("/many")).count == FATFixture.manyCount)
        #expect(throws: CairnError.self) { try fs.readLink(big) }
        #expect(throws: CairnError.self) { try fs.directory(big) }
    }

    /// Free space is exactly the clusters fsck.fat counts as unused, and no file, directory or
    /// metadata byte lies in it.
    @Test(arguments: FATFixture.specs)
    func freeSpaceMatchesFsck(_ spec: FATFixture.Spec) throws {
        let dir = try TempDir("fat\(spec.fat)-free")
        let (image, _) = try FATFixture.make(spec, in: dir)
        let fs = try FATFileSystem(volume: try FileBlockSource(path: image))
        let free = try fs.freeRanges()
        for (a, b) in zip(free, free.dropFirst()) { #expect(a.upperBound < b.lowerBound) }
        let total = free.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) }
        let (usedClusters, clusters) = try FATFixture.fsckClusters(image)
        #expect(clusters == fs.boot.clusterCount)
        #expect(total == (clusters - usedClusters) * UInt64(fs.blockSize))
        // Nothing in use may be free: metadata, the root, every directory's and file's clusters.
        var used: [Range<UInt64>] = [0..<fs.boot.dataOffset]
        if fs.boot.type == .fat32 {
            let runs = try FATFileSystem.directoryRuns(first: fs.boot.rootCluster, boot: fs.boot, table: fs.table, what: "root", entryOffset: 44)
            used += runs.map { fs.boot.clusterOffset($0.cluster)..<fs.boot.clusterOffset($0.cluster) + $0.count * fs.boot.clusterSize }
        }
        try fs.walk { _, entry, _ in
            let e = try fs.entry(of: entry.node)
            for r in try fs.runs(of: entry.node, e) {
                used.append(fs.boot.clusterOffset(r.cluster)..<fs.boot.clusterOffset(r.cluster) + r.count * fs.boot.clusterSize)
            }
        }
        #expect(used.count > FATFixture.manyCount)
        for u in used {
            for f in free { #expect(!u.overlaps(f), "in-use \(u) overlaps free \(f)") }
        }
        // A free cluster really is unreferenced: the byte count in use plus free adds up.
        #expect(fs.boot.dataOffset + clusters * fs.boot.clusterSize <= fs.volume.size)
    }

    /// Hostile edits of a real FAT12 image: each gives a CairnError or a bounded walk.
    @Test func hostileImages() throws {
        let dir = try TempDir("fat-hostile")
        let (image, tree) = try FATFixture.make(FATFixture.specs[0], in: dir)
        let bytes = try readFile(image)
        let fs = try FATFileSystem(volume: MemoryBlockSource(bytes))
        let boot = fs.boot
        func reopen(_ patches: [Int: UInt8]) throws -> FATFileSystem {
            try FATFileSystem(volume: PatchedBlockSource(base: bytes, patches: patches))
        }
        func u16(_ v: Int, at o: Int) -> [Int: UInt8] { [o: UInt8(v & 0xFF), o + 1: UInt8((v >> 8) & 0xFF)] }
        func u32(_ v: UInt32, at o: Int) -> [Int: UInt8] {
            [o: UInt8(v & 0xFF), o + 1: UInt8((v >> 8) & 0xFF), o + 2: UInt8((v >> 16) & 0xFF), o + 3: UInt8(v >> 24)]
        }
        func expectMalformed(_ what: String, _ body: () throws -> Void) {
            do {
                try body()
                Issue.record("\(what): no error")
            } catch let e as CairnError {
                #expect(e.code == .malformedImage || e.code == .unsupported, "\(what): \(e)")
            } catch {
                Issue.record("\(what): \(error)")
            }
        }
        // Absurd BPB counts.
        expectMalformed("root entries") { _ = try reopen(u16(0xFFFF, at: 17)) }
        expectMalformed("sectors per cluster") { _ = try reopen([13: 3]) }
        expectMalformed("bytes per sector") { _ = try reopen(u16(1000, at: 11)) }
        expectMalformed("total sectors") { _ = try reopen(u16(0, at: 19).merging(u32(0xFFFF_FFFF, at: 32)) { $1 }) }
        expectMalformed("FAT size") { _ = try reopen(u16(1, at: 22)) }
        #expect(!FATFileSystem.probe(PatchedBlockSource(base: bytes, patches: [510: 0])))
        #expect(!FATFileSystem.probe(MemoryBlockSource(Array(bytes.prefix(300)))))

        // Truncated images.
        for keep in [0, 100, 512, 4096, bytes.count / 2, bytes.count - 512] {
            expectMalformed("truncated to \(keep)") { _ = try FATFileSystem(volume: MemoryBlockSource(Array(bytes.prefix(keep)))) }
        }

        // A file whose first cluster points past the end of the volume.
        let helloNode = try fs.lookup("/hello.txt")
        let helloEntry = try fs.entry(of: helloNode)
        let past = try reopen(u16(0xFFF0, at: Int(helloNode) + 26))
        expectMalformed("cluster past the end") { _ = try past.readAll(helloNode) }

        // A FAT link past the end, to a free cluster, and a loop inside big.bin's chain.
        let bigNode = try fs.lookup("/big.bin")
        let bigRuns = try fs.runs(of: bigNode, fs.entry(of: bigNode))
        let bigFirst = Int(bigRuns[0].cluster)
        let fatAt = Int(boot.fatOffset)
        func fat12Patch(_ cluster: Int, _ value: Int) -> [Int: UInt8] {
            let at = fatAt + cluster + cluster / 2
            var pair = Int(bytes[at]) | Int(bytes[at + 1]) << 8
            pair = cluster & 1 == 1 ? (pair & 0x000F) | (value << 4) : (pair & 0xF000) | value
            return u16(pair, at: at)
        }
        #expect(fs.fatType == .fat12)
        expectMalformed("link past the end") { _ = try reopen(fat12Patch(bigFirst + 5, 0xFF0)).readAll(bigNode) }
        expectMalformed("link to a free cluster") { _ = try reopen(fat12Patch(bigFirst + 5, 0)).readAll(bigNode) }
        expectMalformed("bad cluster in chain") { _ = try reopen(fat12Patch(bigFirst + 5, 0xFF7)).readAll(bigNode) }
        expectMalformed("chain loop") { _ = try reopen(fat12Patch(bigFirst + 5, bigFirst)).readAll(bigNode) }
        expectMalformed("self loop") { _ = try reopen(fat12Patch(bigFirst + 5, bigFirst + 5)).readAll(bigNode) }
        // A chain cut short of the size.
        expectMalformed("short chain") { _ = try reopen(fat12Patch(bigFirst + 5, 0xFFF)).readAll(bigNode) }
        // A size larger than the volume.
        expectMalformed("absurd size") { _ = try reopen(u32(0xFFFF_FFF0, at: Int(helloNode) + 28)).readAll(helloNode) }
        // A chain longer than the size needs is read up to the size (fsck.fat would trim it).
        let longer = try reopen(fat12Patch(Int(helloEntry.firstCluster), Int(bigFirst)))
        #expect(try longer.readAll(helloNode) == tree.files["hello.txt"])

        // A directory whose chain loops (last cluster back to the first).
        let manyNode = try fs.lookup("/many")
        let manyRuns = try fs.runs(of: manyNode, fs.entry(of: manyNode))
        let manyLast = manyRuns.last.map { Int($0.cluster) + Int($0.count) - 1 } ?? 0
        #expect(manyRuns.reduce(0) { $0 + $1.count } > 1, "many/ must span several clusters")
        let loopDir = try reopen(fat12Patch(manyLast, Int(manyRuns[0].cluster)))
        expectMalformed("directory chain loop") { _ = try loopDir.directory(manyNode) }

        // A directory that contains itself: sub/deeper points at sub's own cluster, and
        // deepest points back at the root-level sub. The walk ends.
        let subNode = try fs.lookup("/sub")
        let deeperNode = try fs.lookup("/sub/deeper")
        let deepestNode = try fs.lookup("/sub/deeper/deepest")
        let subCluster = Int(try fs.entry(of: subNode).firstCluster)
        for patches in [u16(subCluster, at: Int(deeperNode) + 26), u16(subCluster, at: Int(deepestNode) + 26)] {
            let looped = try reopen(patches)
            var visited = 0
            do {
                try looped.walk(maxEntries: 10_000) { _, _, _ in visited += 1 }
            } catch let e as CairnError {
                Issue.record("walk of a looping tree threw \(e)")
            }
            #expect(visited < 1000)
        }
        // A subdirectory entry with no cluster.
        expectMalformed("directory without clusters") { _ = try reopen(u16(0, at: Int(subNode) + 26)).directory(subNode) }

        // Nodes that are not entries.
        expectMalformed("odd node") { _ = try fs.metadata(of: 33) }
        expectMalformed("node in the FAT") { _ = try fs.metadata(of: boot.fatOffset) }
        expectMalformed("node past the end") { _ = try fs.metadata(of: UInt64(bytes.count) + 4096) }
    }

    /// Long-name sets: a bad checksum or a missing part falls back to the 8.3 name; a
    /// surrogate pair decodes, a lone surrogate falls back.
    @Test func longNameFallbacks() throws {
        let dir = try TempDir("fat-lfn")
        let (image, _) = try FATFixture.make(FATFixture.specs[1], in: dir)
        let bytes = try readFile(image)
        let fs = try FATFileSystem(volume: MemoryBlockSource(bytes))
        let node = try fs.lookup("/emoji_XY.txt")
        let short = try fs.entry(of: node)
        #expect(FATName.shortName(short.rawName, caseFlags: short.caseFlags) == "EMOJI_XY.TXT")
        // The long-name entry holding "XY.tx" (units 6-10 sit at bytes 16-25 of the entry).
        guard let hit = FATFixture.find(FATFixture.utf16le("XY.tx"), in: bytes) else {
            Issue.record("long name not found")
            return
        }
        let lfn = hit - 16
        #expect(bytes[lfn + 11] == 0x0F)
        func name(_ patches: [Int: UInt8]) throws -> [String] {
            try FATFileSystem(volume: PatchedBlockSource(base: bytes, patches: patches)).directory(0).map(\.name)
        }
        let emoji = try name([hit: 0x3D, hit + 1: 0xD8, hit + 2: 0x00, hit + 3: 0xDE])
        #expect(emoji.contains("emoji_\u{1F600}.txt"), "\(emoji)")
        let lone = try name([hit: 0x3D, hit + 1: 0xD8])
        #expect(lone.contains("EMOJI_XY.TXT"), "\(lone)")
        let badSum = try name([lfn + 13: bytes[lfn + 13] ^ 0x55])
        #expect(badSum.contains("EMOJI_XY.TXT"), "\(badSum)")
        // The long name takes one entry; a set whose sequence number skips breaks.
        let badSeq = try name([lfn: 0x43])
        #expect(badSeq.contains("EMOJI_XY.TXT"), "\(badSeq)")
        // Deleted entries vanish; 0x05 in the first byte stands for 0xE5.
        #expect(try !name([Int(node): 0xE5]).contains { $0.hasPrefix("emoji") || $0.hasPrefix("EMOJI") })
        let e5 = try name([Int(node): 0x05, lfn: 0xE5])
        #expect(e5.contains("\u{03C3}MOJI_XY.TXT"), "\(e5)")
    }

    /// Random damage to a real image never traps or hangs.
    @Test func randomMutationsNeverTrap() throws {
        let dir = try TempDir("fat-mut")
        var rng = SeededRandom(seed: 0xFA7_F00D)
        for spec in [FATFixture.specs[0], FATFixture.specs[2]] {
            let (image, _) = try FATFixture.make(spec, in: dir)
            let bytes = try readFile(image)
            let fs = try FATFileSystem(volume: MemoryBlockSource(bytes))
            // Structures worth hitting: boot sector, FAT, root directory, the first directories.
            let hot = Int(fs.boot.dataOffset) + 64 * fs.blockSize
            var outcomes = [0, 0]
            for _ in 0..<300 {
                var patches: [Int: UInt8] = [:]
                for _ in 0..<Int.random(in: 1...12, using: &rng) {
                    let pos = Bool.random(using: &rng) ? Int.random(in: 0..<512, using: &rng) : Int.random(in: 0..<hot, using: &rng)
                    patches[pos] = UInt8.random(in: 0...255, using: &rng)
                }
                do {
                    let broken = try FATFileSystem(volume: PatchedBlockSource(base: bytes, patches: patches))
                    try broken.walk(maxEntries: 5000) { _, entry, meta in
                        if meta.kind == .regular { _ = try? broken.readAll(entry.node) }
                    }
                    _ = try broken.freeRanges()
                    outcomes[0] += 1
                } catch is CairnError {
                    outcomes[1] += 1
                }
            }
            #expect(outcomes[0] + outcomes[1] == 300)
            #expect(outcomes[0] > 0, "\(outcomes)")
        }
    }

    /// The probe says no to other file systems, to a partitioned disk's MBR and to short or
    /// empty volumes, and yes to a FAT made with an offset into a partition.
    @Test func probeRejectsOthers() throws {
        let dir = try TempDir("fat-probe")
        #expect(!FATFileSystem.probe(MemoryBlockSource([])))
        #expect(!FATFileSystem.probe(MemoryBlockSource([UInt8](repeating: 0, count: 65536))))
        let ext = dir.file("ext4.img")
        try Tool.run("truncate", ["-s", "8M", ext])
        try Tool.run("mke2fs", ["-q", "-F", "-t", "ext4", ext])
        #expect(!FATFileSystem.probe(try FileBlockSource(path: ext)))
        #expect(throws: CairnError.self) { try FATFileSystem(volume: try FileBlockSource(path: ext)) }
        if Tool.exists("mkntfs") {
            let ntfs = dir.file("ntfs.img")
            try Tool.run("truncate", ["-s", "8M", ntfs])
            try Tool.run("mkntfs", ["-q", "-F", "-f", ntfs])
            #expect(!FATFileSystem.probe(try FileBlockSource(path: ntfs)))
        }
        // A partitioned disk: the MBR is not a FAT; the partition is.
        let disk = dir.file("disk.img")
        try Tool.run("truncate", ["-s", "16M", disk])
        try Tool.run("sfdisk", ["-q", disk], stdin: Data("label: dos\nstart=2048, type=c\n".utf8))
        try Tool.run("mkfs.vfat", ["-F", "16", "-s", "1", "--offset", "2048", disk, "\((16 << 10) - 1024)"])
        let whole = try FileBlockSource(path: disk)
        #expect(!FATFileSystem.probe(whole))
        let part = try PartitionSource(disk: whole, offset: 2048 * 512, length: whole.size - 2048 * 512)
        #expect(FATFileSystem.probe(part))
        let fs = try FATFileSystem(volume: part)
        #expect(fs.fatType == .fat16 && fs.label.isEmpty)
        #expect(try fs.directory(fs.rootNode).isEmpty)
        let free = try fs.freeRanges().reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound) }
        #expect(free == fs.boot.clusterCount * UInt64(fs.blockSize))
    }

    /// The fields of one hand-made short entry: case flags, read-only, the 10 ms creation
    /// field, the FAT32 high cluster half, clamped dates.
    @Test func shortEntryFields() throws {
        var b = Array("README  TXT".utf8)
        // attr, NT flags, 10 ms, ctime, cdate, adate, cluster hi, wtime, wdate, cluster lo, size
        b += [0x01, 0x08, 151]
        let date: UInt16 = (45 << 9) | (6 << 5) | 15  // 2025-06-15
        let time: UInt16 = (13 << 11) | (14 << 5) | 29  // 13:14:58
        for v in [time, date, date, 1, time, date, 2] as [UInt16] { b += [UInt8(v & 0xFF), UInt8(v >> 8)] }
        b += [0xD2, 0x04, 0, 0]
        let e = try #require(FATDirectoryEntry(b, at: 0))
        #expect(FATName.shortName(e.rawName, caseFlags: e.caseFlags) == "readme.TXT")
        #expect(FATName.shortName(e.rawName, caseFlags: 0x18) == "readme.txt")
        #expect(e.permissions == 0o444 && !e.isDirectory && e.size == 1234 && e.firstCluster == 0x1_0002)
        let noon = FileTime(seconds: 1_749_993_298)  // 2025-06-15 13:14:58 UTC
        #expect(e.modified == noon)
        #expect(e.created == FileTime(seconds: noon.seconds + 1, nanoseconds: 510_000_000))
        #expect(e.accessed == FileTime(seconds: 1_749_945_600))
        // Month 0 and hour 31 clamp instead of trapping; a zero date is "never".
        #expect(FATTime.time(date: 0, time: 0) == nil)
        #expect(FATTime.time(date: 0x0001, time: 0xFFFF) == FileTime(seconds: 315_532_800 + 23 * 3600 + 59 * 60 + 59))
        #expect(FATName.checksum(Array("README  TXT".utf8)) == FATName.checksum(e.rawName))
        #expect(FATName.shortName(Array("\u{05}BC     TXT".utf8), caseFlags: 0) == "\u{03C3}BC.TXT")
        #expect(FATName.shortName(Array("A/B     TXT".utf8), caseFlags: 0) == nil)
        #expect(FATName.longName([0xD83D, 0xDE00, 0x41, 0, 0xFFFF]) == "\u{1F600}A")
        #expect(FATName.longName([0xDE00, 0x41]) == nil)
    }

    /// Every input in fuzz/regressions/fat/ (the fuzz target's encoding) runs without a crash.
    @Test func fuzzRegressionsReplay() throws {
        let root = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = root.appendingPathComponent("fuzz/regressions/fat").path
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        for name in names.sorted() {
            let input = try readFile(dir + "/" + name)
            guard let fs = try? FATFileSystem(volume: FATFileSystem.fuzzVolume(input)) else { continue }
            _ = try? fs.walk(maxEntries: 2000) { _, entry, meta in
                if meta.kind == .regular { _ = try? fs.readAll(entry.node, limit: 1 << 20) }
            }
            _ = try? fs.freeRanges()
        }
    }
}


/// `mkfs.fat -F 32` on a small volume (fewer than 65525 clusters, as small EFI system
/// partitions are) makes a FAT32 boot sector that Linux mounts as FAT32: so does Cairn.
/// (mtools refuses to write into one, so the volume stays empty: its root, label and free
/// space are checked against fsck.fat.)
@Suite("FAT32 below 65525 clusters")
struct SmallFAT32Tests {
    @Test("a 40 MiB mkfs.fat -F 32 -s 2 volume (40626 clusters) reads as FAT32")
    func smallFAT32() throws {
        let dir = try TempDir("fat32-small")
        let img = dir.file("esp.img")
        try Tool.run("mkfs.vfat", ["-F", "32", "-s", "2", "-n", "ESP", "-C", img, "\(40 * 1024)"])
        let fsck = try Tool.run("fsck.fat", ["-n", "-v", img])
        #expect(fsck.stdout.contains("40626 data clusters"), "\(fsck.stdout)")
        let fs = try FATFileSystem(volume: FileBlockSource(path: img))
        #expect(fs.fatType == .fat32, "FAT32 by its boot sector")
        #expect(fs.label == "ESP")
        #expect(try fs.directory(fs.rootNode).isEmpty)
        let free = try fs.freeRanges().reduce(UInt64(0)) { $0 + $1.upperBound - $1.lowerBound }
        #expect(free == 40625 * 1024, "all clusters but the root's are free")
    }
}
