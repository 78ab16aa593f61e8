import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct XFSFileSystemTests {
    @Test func superblockAndProbe() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        #expect(fs.typeName == "xfs")
        #expect(fs.label == "cairn-xfs")
        #expect(fs.blockSize == 4096)
        #expect(XFSFileSystem.probe(MemoryBlockSource(fixture.image)))
        #expect(!XFSFileSystem.probe(MemoryBlockSource([UInt8](repeating: 0, count: 4096))))
        #expect(!XFSFileSystem.probe(MemoryBlockSource(Array(fixture.image.prefix(100)))))
        #expect(fs.uuid == fixture.uuid)
    }

    /// Our walk equals the mounted tree: names, inode numbers, kinds, sizes, modes, owners,
    /// link counts, all four times with nanoseconds, device numbers and symlink targets.
    @Test func listingMatchesMountedTree() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        var seen: Set<String> = []
        try fs.walk { path, entry, meta in
            seen.insert(path)
            guard let ref = fixture.entries[path] else {
                Issue.record("\(path) is not in the mounted tree")
                return
            }
            #expect(entry.node == ref.ino, "\(path)")
            #expect(meta.kind.letter == (ref.type == "f" ? "-" : ref.type), "\(path)")
            if let kind = entry.kind { #expect(kind == meta.kind, "\(path)") }
            #expect(meta.permissions == ref.permissions, "\(path)")
            #expect(meta.uid == ref.uid && meta.gid == ref.gid, "\(path)")
            #expect(meta.size == ref.size, "\(path)")
            #expect(meta.linkCount == ref.links, "\(path)")
            #expect(meta.modified == ref.modified, "\(path) mtime")
            #expect(meta.accessed == ref.accessed, "\(path) atime")
            #expect(meta.changed == ref.changed, "\(path) ctime")
            #expect(meta.created == ref.created, "\(path) crtime")
            #expect(meta.device == ref.rdev, "\(path)")
            if meta.kind == .symlink {
                let target = try fs.readLink(entry.node)
                #expect(target == ref.target, "\(path)")
            }
        }
        #expect(seen == Set(fixture.entries.keys))
        #expect(seen.count > 2900)
        // Spot checks of what the script set.
        #expect(fixture.entries["/owned"]?.uid == 1234)
        #expect(fixture.entries["/old"]?.modified.seconds ?? 0 < 0)
        #expect(fixture.entries["/future"]?.modified.seconds ?? 0 > Int64(Int32.max))
        #expect(fixture.entries["/link-long"]?.target.count ?? 0 > 700)
        #expect(try fs.lookup("/link-dir/d/e/leaf.txt", followLast: true) == fixture.entries["/a/b/c/d/e/leaf.txt"]?.ino)
    }

    /// Every directory form and the B+tree block map are present in the fixture.
    @Test func fixtureCoversAllForms() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        func map(_ path: String) throws -> XFSFileMap { try fs.fileMap(try fs.lookup(path)) }
        #expect(try map("/a").inode.format == .local)
        let small = try map("/small")
        #expect(small.inode.format == .extents && small.inode.size == UInt64(fs.sb.dirBlockSize))
        let medium = try map("/medium")
        #expect(medium.extents.contains { $0.logical * 4096 >= XFSFileSystem.leafSpaceOffset })
        let many = try map("/many")
        #expect(many.extents.filter { $0.logical * 4096 >= XFSFileSystem.leafSpaceOffset }.reduce(0) { $0 + $1.count } > 2)
        #expect(try fs.directory(fs.lookup("/many")).count == 3000 - 429)
        let frag = try map("/frag.bin")
        #expect(frag.inode.format == .btree)
        #expect(frag.extents.filter { !$0.unwritten }.count == 400)
        let deep = try map("/deep.bin")
        #expect(deep.inode.format == .btree && deep.extents.filter { !$0.unwritten }.count == 1600)
        #expect(CheckedBytes(deep.inode.dataFork, order: .big).u16(at: 0) == 2, "a root at level 2: interior tree blocks are read")
        #expect(try map("/prealloc.bin").extents.contains { $0.unwritten })
        #expect(try map("/link-long").inode.format == .extents)
        #expect(try map("/link-short").inode.format == .local)
    }

    /// Every regular file reads back byte-identical, whole and in odd-sized pieces.
    @Test func contentsAreIdentical() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        #expect(fixture.contents.count > 2800)
        var read = 0
        try fs.walk { path, entry, meta in
            guard meta.kind == .regular else { return }
            let got = try fs.readAll(entry.node)
            #expect(got == fixture.contents[path], "\(path)")
            read += 1
        }
        #expect(read == fixture.contents.count)
        for path in ["/big.bin", "/sparse.bin", "/frag.bin", "/deep.bin", "/prealloc.bin"] {
            let expected = fixture.contents[path] ?? []
            let node = try fs.lookup(path)
            var rng = SeededRandom(seed: UInt64(path.count))
            for _ in 0..<40 {
                let offset = Int(rng.next() % UInt64(expected.count + 10))
                let length = Int(rng.next() % 300_000) + 1
                var buffer = [UInt8](repeating: 0xEE, count: length)
                let n = try buffer.withUnsafeMutableBytes { try fs.read(node, into: $0, at: UInt64(offset)) }
                let want = max(0, min(length, expected.count - offset))
                #expect(n == want, "\(path) at \(offset)")
                if n > 0 { #expect(Array(buffer[0..<n]) == Array(expected[offset..<offset + n]), "\(path) at \(offset)") }
            }
        }
    }

    /// Free space equals `xfs_db freesp -d` extent by extent, its total equals the AGFs', and no
    /// byte of any inode, file or directory block, block-map block or the log is in it.
    @Test func freeSpaceMatchesXfsDbAndAvoidsUsedBlocks() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let free = try fs.freeRanges()
        // xfs_db counts the AG free lists (AGFL) as free; we leave them out (they are reserved).
        func blocks(_ ranges: [Range<UInt64>]) -> Set<UInt64> {
            Set(ranges.flatMap { stride(from: $0.lowerBound / 4096, to: $0.upperBound / 4096, by: 1) })
        }
        let agfl = Self.freeListBlocks(fixture.image, fs.sb)
        #expect(!agfl.isEmpty)
        let ours = blocks(free), theirs = blocks(fixture.freeExtents).subtracting(agfl)
        #expect(ours.subtracting(theirs).isEmpty, "free only for us: \(ours.subtracting(theirs).sorted().prefix(20))")
        #expect(theirs.subtracting(ours).isEmpty, "free only for xfs_db: \(theirs.subtracting(ours).sorted().prefix(20))")
        let total = free.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        #expect(total == (fixture.freeBlocks - UInt64(agfl.count)) * 4096)
        var last: UInt64 = 0
        for r in free {
            #expect(r.lowerBound >= last && r.upperBound <= fs.volume.size)
            last = r.upperBound
        }
        func overlaps(_ start: UInt64, _ length: UInt64) -> Bool {
            var lo = 0, hi = free.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if free[mid].upperBound <= start { lo = mid + 1 } else { hi = mid }
            }
            return lo < free.count && free[lo].lowerBound < start + length
        }
        #expect(!overlaps(0, 4096))
        let logStart = fs.sb.logStart, logBlocks = UInt64(fs.sb.logBlocks)
        #expect(logStart > 0 && !overlaps(fs.sb.linearBlock(logStart, count: logBlocks).map { $0 * 4096 } ?? 0, logBlocks * 4096))
        var checked = 0
        try fs.walk { _, entry, _ in
            let map = try fs.fileMap(entry.node)
            #expect(!overlaps(map.inode.offset, UInt64(fs.sb.inodeSize)))
            for e in map.extents { #expect(!overlaps(e.physical * 4096, e.count * 4096)) }
            checked += 1
        }
        #expect(checked > 2900)
    }

    /// Linear block numbers on the AG free lists: AGF free-list first/last/count (40, 44, 48);
    /// AGFL in sector 3 of the AG, v5 header 36 bytes, then a circular array of u32 AG blocks.
    static func freeListBlocks(_ image: [UInt8], _ sb: XFSSuperblock) -> Set<UInt64> {
        var out: Set<UInt64> = []
        for agno in 0..<UInt64(sb.agCount) {
            let agf = Int(sb.agStart(agno)) + sb.sectorSize
            let agfl = Int(sb.agStart(agno)) + 3 * sb.sectorSize
            var k = Int(XFSPatch.get32(image, agf + 40))
            let count = Int(XFSPatch.get32(image, agf + 48)), size = (sb.sectorSize - 36) / 4
            for _ in 0..<count {
                out.insert(agno * UInt64(sb.agBlocks) + UInt64(XFSPatch.get32(image, agfl + 36 + 4 * k)))
                k = (k + 1) % size
            }
        }
        return out
    }

    /// A file system shut down with changes only in its log (as a crash or a live snapshot
    /// leaves it) reports no free space; a cleanly unmounted one does.
    @Test func dirtyLogReportsNoFreeSpace() throws {
        #expect(try XFSFixture.get().fileSystem().logIsClean())
        let dir = try TempDir("xfs-dirty")
        let image = dir.file("dirty.img"), mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try Tool.run("truncate", ["-s", "32M", image])
        try Tool.run("mkfs.xfs", ["-q", "-f", image], environment: XFSFixture.smallFSEnvironment)
        try Tool.run("mount", ["-o", "loop", image, mnt])
        do {
            defer { _ = try? Tool.run("umount", [mnt], check: false) }
            try Tool.run("bash", ["-c", "head -c 1000000 /dev/urandom > \"$1/file\"; mkdir \"$1/dir\"; sync; xfs_io -x -c shutdown \"$1\"", "dirty", mnt])
        }
        let fs = try XFSFileSystem(volume: FileBlockSource(path: image))
        #expect(try !fs.logIsClean())
        #expect(try fs.freeRanges().isEmpty)
        // The metadata on disk still reads (as of the last checkpoint).
        _ = try fs.directory(fs.rootNode)
    }
}
