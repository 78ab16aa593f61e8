import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// Damaged copies of the fixture: each must give a CairnError naming the problem (or, for
/// loops, a bounded walk), never a trap or a hang.
@Suite struct XFSHostileTests {
    /// Expects `body` to throw a CairnError whose text contains `text`.
    static func expectError(_ text: String, _ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            try body()
            Issue.record("no error; expected one containing \"\(text)\"", sourceLocation: sourceLocation)
        } catch let e as CairnError {
            #expect(e.description.contains(text), "\(e.description)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("not a CairnError: \(error)", sourceLocation: sourceLocation)
        }
    }

    static func open(_ b: [UInt8]) throws -> XFSFileSystem { try XFSFileSystem(volume: MemoryBlockSource(b, name: "bad.xfs")) }

    /// Everything the reader exposes, for images that open: must finish (errors are fine).
    static func exercise(_ fs: XFSFileSystem) {
        _ = try? fs.walk(maxEntries: 20_000) { _, entry, meta in
            if meta.kind == .regular { _ = try? fs.readAll(entry.node, limit: 16 << 20) }
            if meta.kind == .symlink { _ = try? fs.readLink(entry.node) }
        }
        _ = try? fs.freeRanges()
    }

    @Test func superblockDamage() throws {
        let good = try XFSFixture.get().image
        var b = good
        b[0] = 0x58; b[1] = 0x58
        Self.expectError("magic") { _ = try Self.open(b) }
        #expect(!XFSFileSystem.probe(MemoryBlockSource(b)))

        b = good
        b[110] ^= 0x40  // a label byte: only the checksum notices
        Self.expectError("checksum mismatch") { _ = try Self.open(b) }

        b = good
        XFSPatch.put32(0xFFFF_FFFF, at: 88, &b)  // absurd AG count
        XFSPatch.restamp(&b, start: 0, length: 512, field: 224)
        Self.expectError("AGs") { _ = try Self.open(b) }

        b = good
        XFSPatch.put64(XFSPatch.get64(good, 8) * 4, at: 8, &b)  // more blocks than the volume
        XFSPatch.put32(XFSPatch.get32(good, 88) * 4, at: 88, &b)
        XFSPatch.restamp(&b, start: 0, length: 512, field: 224)
        Self.expectError("larger than its volume") { _ = try Self.open(b) }

        b = good
        XFSPatch.put32(3000, at: 4, &b)  // block size not a power of two
        XFSPatch.restamp(&b, start: 0, length: 512, field: 224)
        Self.expectError("block size") { _ = try Self.open(b) }

        b = good
        XFSPatch.put32(XFSPatch.get32(good, 216) | 0x10, at: 216, &b)  // NEEDSREPAIR
        XFSPatch.restamp(&b, start: 0, length: 512, field: 224)
        Self.expectError("needing repair") { _ = try Self.open(b) }

        b = good
        XFSPatch.put64(0xFFFF_FFFF_FFFF, at: 56, &b)  // root inode outside the file system
        XFSPatch.restamp(&b, start: 0, length: 512, field: 224)
        Self.expectError("root inode") { _ = try Self.open(b) }
    }

    @Test func truncatedImages() throws {
        let good = try XFSFixture.get().image
        for length in [0, 100, 511, 4096, 1 << 20, good.count / 2, good.count - 4096] {
            Self.expectError("XFS") { _ = try Self.open(Array(good.prefix(length))) }
        }
    }

    @Test func inodeDamage() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let good = fixture.image
        let big = try fs.lookup("/big.bin")
        let at = Int(fs.sb.inodeLocation(big) ?? 0)

        var b = good
        b[at + 60] ^= 1  // size, checksum not updated
        Self.expectError("checksum mismatch") { _ = try Self.open(b).metadata(of: big) }

        b = good
        XFSPatch.put32(0xFFFF, at: at + 76, &b)  // absurd extent count
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("claims 65535 extents") { _ = try Self.open(b).readAll(big) }

        b = good
        XFSPatch.put64(0xFFFF_FFFF_FFFF_FFF0, at: at + 176 + 8, &b)  // first extent: start block far away
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("outside its AG") { _ = try Self.open(b).readAll(big) }

        b = good
        XFSPatch.put64(big + 1, at: at + 152, &b)  // inode records another number
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("misplaced") { _ = try Self.open(b).metadata(of: big) }

        b = good
        XFSPatch.put16(0, at: at + 2, &b)  // mode without a type
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("no valid file type") { _ = try Self.open(b).metadata(of: big) }

        // An inode number past the end of the file system.
        Self.expectError("outside the file system") { _ = try fs.metadata(of: UInt64(1) << 40) }
        // The wrong kind for the call.
        Self.expectError("not a directory") { _ = try fs.directory(big) }
        Self.expectError("not a symbolic link") { _ = try fs.readLink(big) }
        Self.expectError("not a regular file") { _ = try fs.readAll(fs.rootNode) }
    }

    @Test func blockMapDamage() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let good = fixture.image
        let frag = try fs.lookup("/frag.bin")
        let at = Int(fs.sb.inodeLocation(frag) ?? 0)
        let fork = at + 176
        let forkSize = try fs.fileMap(frag).inode.dataFork.count
        let maxRecords = (forkSize - 4) / 16
        #expect(XFSPatch.get32(good, fork) >> 16 == 1, "root at level 1")
        #expect(XFSPatch.get32(good, fork) & 0xFFFF >= 2, "at least two leaves")
        let firstPointer = fork + 4 + maxRecords * 8

        // Both root pointers name the same leaf: a cross-link.
        var b = good
        XFSPatch.put64(XFSPatch.get64(good, firstPointer), at: firstPointer + 8, &b)
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("twice") { _ = try Self.open(b).readAll(frag) }

        // A pointer past the end of the file system.
        b = good
        XFSPatch.put64(UInt64(1) << 50, at: firstPointer, &b)
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("outside the file system") { _ = try Self.open(b).readAll(frag) }

        // Absurd root record count and depth.
        b = good
        XFSPatch.put32(0x0009_FFFF, at: fork, &b)
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("block-map root") { _ = try Self.open(b).readAll(frag) }

        // A leaf's checksum, then its level with the checksum re-stamped.
        let fsb = XFSPatch.get64(good, firstPointer)
        let leaf = Int((fs.sb.linearBlock(fsb, count: 1) ?? 0) * 4096)
        b = good
        b[leaf + 100] ^= 0xFF
        Self.expectError("checksum mismatch") { _ = try Self.open(b).readAll(frag) }
        b = good
        XFSPatch.put16(1, at: leaf + 4, &b)
        XFSPatch.restamp(&b, start: leaf, length: 4096, field: 64)
        Self.expectError("level") { _ = try Self.open(b).readAll(frag) }
        // Records out of order.
        b = good
        for k in 0..<16 { b[leaf + 72 + k] = good[leaf + 72 + 16 + k]; b[leaf + 72 + 16 + k] = good[leaf + 72 + k] }
        XFSPatch.restamp(&b, start: leaf, length: 4096, field: 64)
        Self.expectError("out of order") { _ = try Self.open(b).readAll(frag) }
    }

    @Test func directoryDamage() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let good = fixture.image

        // Short-form /a: its entry "b" made to point at the root (a loop back to the top).
        let a = try fs.lookup("/a")
        let at = Int(fs.sb.inodeLocation(a) ?? 0)
        #expect(good[at + 176] == 1 && good[at + 176 + 1] == 0, "one entry, 4-byte inode numbers")
        var b = good
        XFSPatch.put32(UInt32(fs.rootNode), at: at + 176 + 2 + 4 + 3 + 1 + 1, &b)
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        var loop = try Self.open(b)
        var count = 0
        try loop.walk { _, _, _ in count += 1 }
        #expect(count > 2000 && count < 3500, "the walk visits each directory once: \(count)")
        // And pointing at itself.
        XFSPatch.put32(UInt32(a), at: at + 176 + 2 + 4 + 3 + 1 + 1, &b)
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        loop = try Self.open(b)
        #expect(try loop.directory(a).first?.node == a)
        Self.exercise(loop)

        // Absurd short-form entry count.
        b = good
        b[at + 176] = 200
        XFSPatch.restamp(&b, start: at, length: 512, field: 100)
        Self.expectError("runs past") { _ = try Self.open(b).directory(a) }

        // A block directory: checksum, then a bad entry length with the checksum re-stamped.
        let small = try fs.lookup("/small")
        let block = Int((try fs.fileMap(small).extents.first?.physical ?? 0) * 4096)
        b = good
        b[block + 200] ^= 0x01
        Self.expectError("checksum mismatch") { _ = try Self.open(b).directory(small) }
        b = good
        b[block + 64 + 8] = 0xF0  // first entry's name length
        XFSPatch.restamp(&b, start: block, length: 4096, field: 4)
        Self.expectError("directory block") { _ = try Self.open(b).directory(small) }
        b = good
        XFSPatch.put32(0xFFFF, at: block + 4096 - 8, &b)  // leaf count of the block tail
        XFSPatch.restamp(&b, start: block, length: 4096, field: 4)
        Self.expectError("leaf entries") { _ = try Self.open(b).directory(small) }
        // Block owned by another inode.
        b = good
        XFSPatch.put64(small + 1, at: block + 40, &b)
        XFSPatch.restamp(&b, start: block, length: 4096, field: 4)
        Self.expectError("owner") { _ = try Self.open(b).directory(small) }
    }

    @Test func freeSpaceDamage() throws {
        let fixture = try XFSFixture.get()
        let good = fixture.image
        let agf = 512
        var b = good
        b[agf + 100] ^= 1
        Self.expectError("checksum mismatch") { _ = try Self.open(b).freeRanges() }

        b = good
        XFSPatch.put32(0x0FFF_FFFF, at: agf + 16, &b)  // by-block root past the AG
        XFSPatch.restamp(&b, start: agf, length: 512, field: 216)
        Self.expectError("root") { _ = try Self.open(b).freeRanges() }

        b = good
        XFSPatch.put32(XFSPatch.get32(good, agf + 52) + 1, at: agf + 52, &b)  // free block count
        XFSPatch.restamp(&b, start: agf, length: 512, field: 216)
        Self.expectError("free blocks") { _ = try Self.open(b).freeRanges() }

        b = good
        XFSPatch.put32(5, at: agf + 28, &b)  // tree level deeper than the tree
        XFSPatch.restamp(&b, start: agf, length: 512, field: 216)
        Self.expectError("level") { _ = try Self.open(b).freeRanges() }

        // A free extent that runs past the AG.
        let root = Int(XFSPatch.get32(good, agf + 16)) * 4096
        b = good
        XFSPatch.put32(0x7FFF_FFFF, at: root + 56 + 4, &b)
        XFSPatch.restamp(&b, start: root, length: 4096, field: 52)
        Self.expectError("outside the AG") { _ = try Self.open(b).freeRanges() }
        // One that starts past the AG (the first fuzz crash: an unchecked subtraction).
        b = good
        XFSPatch.put32(0x7FFF_FFFF, at: root + 56, &b)
        XFSPatch.restamp(&b, start: root, length: 4096, field: 52)
        Self.expectError("outside the AG") { _ = try Self.open(b).freeRanges() }
    }

    /// A damaged log never makes free space appear: no unmount record, a zeroed log or
    /// scrambled cycle numbers all read as dirty (nothing free), never as a crash.
    @Test func damagedLogReportsNoFreeSpace() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let good = fixture.image
        let start = Int((fs.sb.linearBlock(fs.sb.logStart, count: UInt64(fs.sb.logBlocks)) ?? 0) * 4096)
        let length = Int(fs.sb.logBlocks) * 4096
        #expect(try !fs.freeRanges().isEmpty)

        var b = good
        for i in start..<start + length { b[i] = 0 }
        #expect(try Self.open(b).freeRanges().isEmpty)

        // Clear the unmount flag of every operation header that has it.
        b = good
        var cleared = 0
        for block in stride(from: start, to: start + length, by: 512)
        where XFSPatch.get32(good, block) != 0xFEED_BABE && good[block + 8] == 0xAA && good[block + 9] & 0x20 != 0 {
            b[block + 9] &= ~0x20
            cleared += 1
        }
        #expect(cleared >= 1)
        #expect(try Self.open(b).freeRanges().isEmpty)

        var rng = SeededRandom(seed: 7)
        for _ in 0..<50 {
            b = good
            for _ in 0..<20 {
                let block = start + Int(rng.next() % UInt64(length / 512)) * 512
                XFSPatch.put32(UInt32(truncatingIfNeeded: rng.next() % 4), at: block + (rng.next() % 2 == 0 ? 0 : 4), &b)
            }
            _ = try? Self.open(b).freeRanges()
        }
    }

    /// Every input in fuzz/regressions/xfs/ (the fuzz target's encoding) runs without a crash.
    @Test func fuzzRegressionsReplay() throws {
        let root = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = root.appendingPathComponent("fuzz/regressions/xfs").path
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        for name in names.sorted() {
            let input = try readFile(dir + "/" + name)
            guard let fs = try? XFSFileSystem(volume: XFSFuzzVolume(input)) else { continue }
            Self.exercise(fs)
        }
    }

    /// The fuzz encoding itself round-trips a real image.
    @Test func fuzzEncodingReadsRealImage() throws {
        let fixture = try XFSFixture.get()
        var input: [UInt8] = []
        for sector in 0..<(fixture.image.count / 512) where fixture.image[sector * 512..<sector * 512 + 512].contains(where: { $0 != 0 }) {
            input += [UInt8(sector >> 24), UInt8((sector >> 16) & 0xFF), UInt8((sector >> 8) & 0xFF), UInt8(sector & 0xFF)]
            input += fixture.image[sector * 512..<sector * 512 + 512]
        }
        let fs = try XFSFileSystem(volume: XFSFuzzVolume(input))
        #expect(try fs.readAll(fs.lookup("/big.bin")) == fixture.contents["/big.bin"])
    }
}

