import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// Damaged images: each must give a CairnError (or a bounded walk), never a trap or a hang.
@Suite struct ExtHostileTests {
    /// A small image with the standard source tree.
    static func image(_ options: [String], _ name: String) throws -> (TempDir, String, [UInt8]) {
        let dir = try TempDir("ext-hostile")
        let source = try ExtFixture.makeSource(in: dir)
        let path = try ExtFixture.make(options, source: source, in: dir, name: name)
        return (dir, path, try readFile(path))
    }

    static func expectError(_ bytes: [UInt8], _ fragment: String, code: CairnError.Code = .malformedImage,
                            sourceLocation: SourceLocation = #_sourceLocation, _ body: (ExtFileSystem) throws -> Void = { _ in }) {
        do {
            let fs = try ExtFileSystem(volume: MemoryBlockSource(bytes, name: "hostile.img"))
            try body(fs)
            Issue.record("no error (wanted \"\(fragment)\")", sourceLocation: sourceLocation)
        } catch let e as CairnError {
            #expect(e.code == code && e.description.contains(fragment), "\(e)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("not a CairnError: \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func superblockFieldsOutOfRange() throws {
        let (_, _, good) = try Self.image(["-t", "ext2", "-b", "1024"], "sb.img")
        let sb = 1024
        var b = good
        ExtFixture.put32(0xFFFF_FFF0, sb + 0x04, &b)  // blocks count
        Self.expectError(b, "larger than its volume")
        b = good
        ExtFixture.put32(0, sb + 0x28, &b)  // inodes per group
        Self.expectError(b, "inodes per group")
        b = good
        ExtFixture.put32(20, sb + 0x18, &b)  // log block size
        Self.expectError(b, "block size")
        b = good
        ExtFixture.put16(100, sb + 0x58, &b)  // inode size
        Self.expectError(b, "inode size")
        b = good
        ExtFixture.put32(0xFFFF_FFFF, sb + 0x00, &b)  // inodes count
        Self.expectError(b, "inode count")
        b = good
        ExtFixture.put32(4, sb + 0x20, &b)  // blocks per group
        Self.expectError(b, "per group")
        b = good
        ExtFixture.put32(ExtFixture.get32(b, sb + 0x60) | 0x1, sb + 0x60, &b)  // incompat: compression
        Self.expectError(b, "compression", code: .unsupported)
        b = good
        ExtFixture.put32(ExtFixture.get32(b, sb + 0x60) | 0x8000_0000, sb + 0x60, &b)
        Self.expectError(b, "0x80000000", code: .unsupported)
    }

    @Test func checksumMismatchesAreRefused() throws {
        let (_, _, good) = try Self.image(["-t", "ext4", "-b", "4096"], "csum.img")
        let fs = try ExtFileSystem(volume: MemoryBlockSource(good))
        #expect(fs.sb.hasMetadataCsum)
        var b = good
        b[1024 + 0x78] ^= 0x40  // label
        Self.expectError(b, "ext superblock: checksum mismatch")
        b = good
        b[4096 + 0x0C] ^= 0x01  // group 0 free blocks count, in the descriptor at block 1
        Self.expectError(b, "group descriptor 0: checksum mismatch")
        // An inode (mtime) of a file.
        let big = try fs.inode(fs.lookup("/big.bin"))
        b = good
        b[Int(big.offset) + 0x10] ^= 0x01
        Self.expectError(b, "checksum mismatch") { try _ = $0.metadata(of: big.number) }
        // A directory leaf block (a name byte in /many's first block).
        let many = try fs.inode(fs.lookup("/many"))
        let leaf = try fs.extentRuns(many)[0].physical * 4096
        b = good
        b[Int(leaf) + 30] ^= 0x01
        Self.expectError(b, "block checksum mismatch") { try _ = $0.directory(many.number) }
        // An extent-tree leaf block (islands.bin has more extents than i_block holds).
        let islands = try fs.inode(fs.lookup("/islands.bin"))
        let root = CheckedBytes(islands.block)
        #expect(root.u16(at: 6) == 1)
        let leafBlock = Int(root.u32(at: 12 + 4) ?? 0)
        b = good
        b[leafBlock * 4096 + 12 + 1] ^= 0x01
        Self.expectError(b, "checksum mismatch") { try _ = $0.readAll(islands.number) }
        // A block bitmap.
        b = good
        b[Int(fs.groups[0].blockBitmap * 4096) + 100] ^= 0x01
        Self.expectError(b, "block bitmap of group 0: checksum mismatch") { try _ = $0.freeRanges() }
    }

    @Test func pointersPastTheEnd() throws {
        let (_, _, good) = try Self.image(["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"], "ptr.img")
        let fs = try ExtFileSystem(volume: MemoryBlockSource(good))
        // Group descriptor 0's inode table far past the end (GDT at block 2 with 1 KiB blocks).
        var b = good
        ExtFixture.put32(0x00FF_FFFF, 2048 + 0x08, &b)
        Self.expectError(b, "outside")
        // The big file's first extent (in i_block, leaf at depth 0 or the first index).
        let big = try fs.inode(fs.lookup("/big.bin"))
        let root = Int(big.offset) + 0x28
        b = good
        ExtFixture.put32(0xFFFF_FF00, root + 12 + 8, &b)  // ee_start_lo (or ei_leaf's neighbour)
        ExtFixture.put32(0xFFFF_FF00, root + 12 + 4, &b)  // ei_leaf_lo if it is an index
        Self.expectError(b, "outside") { fs in _ = try fs.readAll(big.number) }
        // Absurd entry count and depth in the extent header.
        b = good
        ExtFixture.put16(200, root + 2, &b)
        Self.expectError(b, "entries") { fs in _ = try fs.readAll(big.number) }
        b = good
        ExtFixture.put16(9, root + 6, &b)
        Self.expectError(b, "depth") { fs in _ = try fs.readAll(big.number) }
        // A directory entry naming an inode past the last one.
        let a = try fs.inode(fs.lookup("/a"))
        let block = try fs.extentRuns(a)[0].physical * 1024
        b = good
        ExtFixture.put32(0x7FFF_FFFF, Int(block) + 24, &b)  // the entry after "." and ".."
        Self.expectError(b, "past the last inode") { fs in _ = try fs.directory(a.number) }
        // A record length that runs past the block.
        b = good
        ExtFixture.put16(0xFFF0, Int(block) + 4, &b)
        Self.expectError(b, "record length") { fs in _ = try fs.directory(a.number) }
        // A directory inode claiming an absurd size.
        b = good
        ExtFixture.put32(0xFFFF_FFFF, Int(a.offset) + 0x6C, &b)  // size_high (counted with large_dir only)
        ExtFixture.put32(0xFFFF_FF00, Int(a.offset) + 0x04, &b)
        Self.expectError(b, "claims") { fs in _ = try fs.directory(a.number) }
    }

    @Test func crossLinkedExtentTreeThrows() throws {
        let (_, _, good) = try Self.image(["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"], "xlink.img")
        let fs = try ExtFileSystem(volume: MemoryBlockSource(good))
        let big = try fs.inode(fs.lookup("/big.bin"))
        let runs = try fs.extentRuns(big)
        // A leaf block in free space holding the file's first extent.
        let freeBlock = Int(try fs.freeRanges().last!.lowerBound / 1024)
        var b = good
        var leaf = [UInt8](repeating: 0, count: 24)
        ExtFixture.put16(0xF30A, 0, &leaf); ExtFixture.put16(1, 2, &leaf); ExtFixture.put16(1, 4, &leaf)
        ExtFixture.put32(0, 12, &leaf); ExtFixture.put16(UInt16(min(runs[0].count, 100)), 16, &leaf)
        ExtFixture.put32(UInt32(runs[0].physical), 20, &leaf)
        b.replaceSubrange(freeBlock * 1024..<freeBlock * 1024 + 24, with: leaf)
        // Root: depth 1, two index entries (logical 0 and 1000) naming that same block.
        let root = Int(big.offset) + 0x28
        var node = [UInt8](repeating: 0, count: 60)
        ExtFixture.put16(0xF30A, 0, &node); ExtFixture.put16(2, 2, &node); ExtFixture.put16(4, 4, &node); ExtFixture.put16(1, 6, &node)
        ExtFixture.put32(0, 12, &node); ExtFixture.put32(UInt32(freeBlock), 16, &node)
        ExtFixture.put32(1000, 24, &node); ExtFixture.put32(UInt32(freeBlock), 28, &node)
        b.replaceSubrange(root..<root + 60, with: node)
        Self.expectError(b, "referenced twice") { fs in _ = try fs.readAll(big.number) }
        // Only one index entry: the forged tree reads.
        ExtFixture.put16(1, root + 2, &b)
        let fs2 = try ExtFileSystem(volume: MemoryBlockSource(b))
        #expect(try fs2.extentRuns(fs2.inode(big.number)).count == 1)
    }

    @Test func directoryLoopsGiveABoundedWalk() throws {
        let (dir, path, _) = try Self.image(["-t", "ext4", "-b", "1024"], "loop.img")
        // /a/b/up names /a, /a/self names /a itself, /a/b/c/root names the root.
        _ = try ExtFixture.debugfs(path, ["ln /a /a/b/up", "ln /a /a/self", "ln <2> /a/b/c/root"], writable: true)
        let fs = try ExtFileSystem(volume: try FileBlockSource(path: path))
        var count = 0
        try fs.walk { _, _, _ in count += 1 }
        #expect(count > 300 && count < 1000)
        #expect(try fs.lookup("/a/self/self/b/up/note") == fs.lookup("/a/note"))
        withExtendedLifetime(dir) {}
    }

    @Test func indirectBlockLoopsStayBounded() throws {
        let (_, _, good) = try Self.image(["-t", "ext2", "-b", "1024"], "ind.img")
        let fs = try ExtFileSystem(volume: MemoryBlockSource(good))
        let big = try fs.inode(fs.lookup("/big.bin"))
        let single = big.blockWord(12)
        var b = good
        // Double and triple indirect pointers both name the single indirect block; a pointer
        // past the end inside it.
        ExtFixture.put32(single, Int(big.offset) + 0x28 + 13 * 4, &b)
        ExtFixture.put32(single, Int(big.offset) + 0x28 + 14 * 4, &b)
        ExtFixture.put32(UInt32(1 << 30), Int(big.offset) + 0x6C, &b)  // size high: 4 EiB file
        let fs2 = try ExtFileSystem(volume: MemoryBlockSource(b))
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        for offset: UInt64 in [0, 300 << 10, 70 << 20, 1 << 40] {
            _ = try? buf.withUnsafeMutableBytes { try fs2.read(big.number, into: $0, at: offset) }
        }
        ExtFixture.put32(0xFFFF_FFF0, Int(single) * 1024 + 8, &b)
        Self.expectError(b, "outside") { fs in
            var buf = [UInt8](repeating: 0, count: 1 << 20)
            _ = try buf.withUnsafeMutableBytes { try fs.read(big.number, into: $0, at: 0) }
        }
    }

    @Test func truncatedImages() throws {
        for options in [["-t", "ext4", "-b", "4096"], ["-t", "ext2", "-b", "1024"]] {
            let (_, _, good) = try Self.image(options, "trunc.img")
            for length in [0, 100, 1024, 1500, 2048, 4096, 8192, 65536, 300_000, good.count / 2, good.count - 4096, good.count - 1] {
                let volume = MemoryBlockSource(Array(good.prefix(length)))
                #expect(!ExtFileSystem.probe(volume) || length >= 2048)
                do {
                    let fs = try ExtFileSystem(volume: volume)
                    #expect(ExtFixture.exercise(fs))
                    Issue.record("a truncated image (\(length) of \(good.count) bytes) opened")
                } catch let e as CairnError {
                    #expect(e.code == .malformedImage, "\(e)")
                }
            }
        }
    }

    /// Random damage to the metadata area never traps.
    @Test(arguments: [["-t", "ext4", "-b", "1024", "-O", "^metadata_csum,inline_data"], ["-t", "ext2", "-b", "1024"], ["-t", "ext4", "-b", "1024"]])
    func randomMutationsNeverTrap(_ options: [String]) throws {
        let (_, _, good) = try Self.image(options, "mut.img")
        let fs = try ExtFileSystem(volume: MemoryBlockSource(good))
        // Where the metadata lives: superblock, descriptors, bitmaps, inode tables, directories.
        var hot: [Range<Int>] = [0..<8192]
        for g in fs.groups {
            hot.append(Int(g.inodeTable) * 1024..<Int(g.inodeTable) * 1024 + 64 * 1024)
            hot.append(Int(g.blockBitmap) * 1024..<Int(g.blockBitmap) * 1024 + 1024)
        }
        for e in try ExtFixture.walk(fs) where e.2.kind == .directory {
            let i = try fs.inode(e.1.node)
            if i.usesExtents, let r = try fs.extentRuns(i).first { hot.append(Int(r.physical) * 1024..<Int(r.physical + 1) * 1024) }
        }
        var rng = SeededRandom(seed: UInt64(options.joined().utf8.count))
        var opened = 0
        for _ in 0..<400 {
            var patches: [Int: UInt8] = [:]
            for _ in 0..<Int.random(in: 1...12, using: &rng) {
                let r = hot[Int.random(in: 0..<hot.count, using: &rng)]
                let at = Int.random(in: r, using: &rng)
                guard at < good.count else { continue }
                patches[at] = Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : good[at] ^ (1 << UInt8.random(in: 0..<8, using: &rng))
            }
            guard let fs = try? ExtFileSystem(volume: PatchedBlockSource(base: good, patches: patches)) else { continue }
            opened += 1
            #expect(ExtFixture.exercise(fs))
        }
        #expect(opened > 50)
    }
}
