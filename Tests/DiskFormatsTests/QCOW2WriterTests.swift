import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

@Suite("qcow2 writing")
struct QCOW2WriterTests {
    /// Checks a finished image with the referees: `qemu-img check` (no errors, no leaks),
    /// `qemu-img compare` against the expected raw bytes, and our own reader.
    static func verifyWritten(_ img: String, expected: [UInt8], in dir: TempDir,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try Tool.run("qemu-img", ["check", "-f", "qcow2", img], check: false)
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
        #expect(check.stdout.contains("No errors were found"), "qemu-img check: \(check.stdout)", sourceLocation: sourceLocation)
        let raw = dir.file("expected-\(UUID().uuidString.prefix(8)).raw")
        try Fixture.writeFile(expected, to: raw)
        #expect(try Tool.qemuImgCompare(img, raw, formatA: "qcow2", formatB: "raw"), "qemu-img compare differs", sourceLocation: sourceLocation)
        let image = try Fixture.open(img)
        try Fixture.verify(image, equals: expected, qemuMapOf: img, sourceLocation: sourceLocation)
    }

    /// Disjoint segments covering `[0, size)` with random lengths, some all-zero.
    static func segments(size: Int, seed: UInt64, maxLength: Int) -> [Range<Int>] {
        var rng = SeededRandom(seed: seed)
        var out: [Range<Int>] = []
        var pos = 0
        while pos < size {
            let length = min(size - pos, Int.random(in: 1...maxLength, using: &rng))
            out.append(pos..<pos + length)
            pos += length
        }
        return out
    }

    @Test("sequential unaligned writes, zeros and overwrites", arguments: [512, 65536, 2 << 20])
    func sequentialWrites(clusterSize: Int) throws {
        let dir = try TempDir("qcow2-write")
        defer { withExtendedLifetime(dir) {} }
        let requested = 3_000_064
        let img = dir.file("w.qcow2")
        let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
        let writer = try QCOW2Writer(file: file, virtualSize: UInt64(requested), clusterSize: clusterSize)
        #expect(writer.size == 3_000_320)  // rounded up to 512 like qemu-img
        var expected = [UInt8](repeating: 0, count: Int(writer.size))
        let pattern = Fixture.pattern(size: requested, seed: 42)

        // Pass 1: the pattern in random unaligned pieces (zero pieces are skipped).
        for piece in Self.segments(size: requested, seed: 1, maxLength: 150_000) {
            try pattern[piece].withUnsafeBytes { try writer.write($0, at: UInt64(piece.lowerBound)) }
        }
        expected.replaceSubrange(0..<requested, with: pattern)

        // Pass 2: overwrite some ranges with zeros (both ways) and with new data.
        var rng = SeededRandom(seed: 2)
        for i in 0..<30 {
            let length = Int.random(in: 1...80_000, using: &rng)
            let offset = Int.random(in: 0...(expected.count - length), using: &rng)
            switch i % 3 {
            case 0:
                try writer.writeZeroes(at: UInt64(offset), length: UInt64(length))
                expected.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
            case 1:
                let zeros = [UInt8](repeating: 0, count: length)
                try zeros.withUnsafeBytes { try writer.write($0, at: UInt64(offset)) }
                expected.replaceSubrange(offset..<offset + length, with: zeros)
            default:
                let data = rng.bytes(length)
                try data.withUnsafeBytes { try writer.write($0, at: UInt64(offset)) }
                expected.replaceSubrange(offset..<offset + length, with: data)
            }
        }
        try writer.finish()
        try Self.verifyWritten(img, expected: expected, in: dir)
    }

    @Test("concurrent writes of pieces that share clusters")
    func concurrentWrites() throws {
        let dir = try TempDir("qcow2-concurrent")
        defer { withExtendedLifetime(dir) {} }
        let size = 5 * 1024 * 1024 + 12288
        let pattern = Fixture.pattern(size: size, seed: 77)
        for clusterSize in [4096, 65536] {
            let img = dir.file("c\(clusterSize).qcow2")
            let writer = try QCOW2Writer(file: try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC),
                                         virtualSize: UInt64(size), clusterSize: clusterSize)
            // Small random pieces, interleaved over threads: neighbours in one cluster are
            // written at the same time by different threads.
            let pieces = Self.segments(size: size, seed: 5, maxLength: 20_000)
            let errors = Locked(0)
            DispatchQueue.concurrentPerform(iterations: 4) { t in
                for (i, piece) in pieces.enumerated() where i % 4 == t {
                    do {
                        try pattern[piece].withUnsafeBytes { try writer.write($0, at: UInt64(piece.lowerBound)) }
                    } catch {
                        errors.withLock { $0 += 1 }
                    }
                }
            }
            #expect(errors.withLock { $0 } == 0)
            try writer.finish()
            try Self.verifyWritten(img, expected: pattern, in: dir)
        }
    }

    @Test("concurrent chunk-aligned writes, as the engine does")
    func concurrentChunks() throws {
        let dir = try TempDir("qcow2-chunks")
        defer { withExtendedLifetime(dir) {} }
        let chunk = 1 << 20, size = 8 * chunk
        var expected = Fixture.pattern(size: size, seed: 3)
        // One chunk all zeros, one with a single non-zero byte.
        expected.replaceSubrange(2 * chunk..<3 * chunk, with: repeatElement(0, count: chunk))
        expected.replaceSubrange(5 * chunk..<6 * chunk, with: repeatElement(0, count: chunk))
        expected[5 * chunk + 777] = 1
        let img = dir.file("k.qcow2")
        let writer = try QCOW2Writer(file: try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC), virtualSize: UInt64(size))
        let source = expected
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            try? source[i * chunk..<(i + 1) * chunk].withUnsafeBytes { try writer.write($0, at: UInt64(i * chunk)) }
        }
        try writer.finish()
        try Self.verifyWritten(img, expected: expected, in: dir)
        // The zero chunk is not allocated at all.
        let image = try Fixture.open(img)
        #expect(try image.extents(in: UInt64(2 * chunk)..<UInt64(3 * chunk)) == [Extent(offset: UInt64(2 * chunk), length: UInt64(chunk), kind: .unallocated)])
    }

    @Test("zeros on a fresh image cost nothing")
    func zerosOnly() throws {
        let dir = try TempDir("qcow2-zeros")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("z.qcow2")
        let size: UInt64 = 64 << 30
        let writer = try QCOW2Writer(file: try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC), virtualSize: size)
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        try zeros.withUnsafeBytes { try writer.write($0, at: 1 << 30) }
        try writer.writeZeroes(at: 0, length: size)
        let data = [UInt8](repeating: 9, count: 100)
        try data.withUnsafeBytes { try writer.write($0, at: size - 100) }
        try writer.finish()
        let check = try Tool.run("qemu-img", ["check", img], check: false)
        #expect(check.status == 0, "\(check.stdout)")
        let fileSize = try FileBlockSource(path: img).size
        #expect(fileSize < 1 << 20, "file holds \(fileSize) bytes")
        let image = try Fixture.open(img)
        #expect(try image.allExtents() == [
            Extent(offset: 0, length: size - 65536, kind: .unallocated),
            Extent(offset: size - 65536, length: 65536, kind: .data),
        ])
        #expect(try image.readBytes(at: size - 101, count: 101) == [0] + data)
        #expect(try image.allExtents() == (try Fixture.qemuMap(img)))
    }

    @Test("a zero-size image")
    func emptyImage() throws {
        let dir = try TempDir("qcow2-write-empty")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("e.qcow2")
        let writer = try QCOW2Writer(file: try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC), virtualSize: 0)
        try writer.finish()
        #expect(try Tool.run("qemu-img", ["check", img], check: false).status == 0)
        #expect(try Fixture.open(img).size == 0)
    }

    @Test("misuse is refused")
    func misuse() throws {
        let dir = try TempDir("qcow2-write-misuse")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("m.qcow2")
        let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
        #expect(throws: CairnError.self) { try QCOW2Writer(file: file, virtualSize: 1 << 20, clusterSize: 3000) }
        #expect(throws: CairnError.self) { try QCOW2Writer(file: file, virtualSize: 1 << 20, clusterSize: 4 << 20) }
        #expect(throws: CairnError.self) { try QCOW2Writer(file: file, virtualSize: UInt64.max) }
        let writer = try QCOW2Writer(file: file, virtualSize: 1 << 20)
        let data = [UInt8](repeating: 1, count: 10)
        #expect(throws: CairnError.self) { try data.withUnsafeBytes { try writer.write($0, at: (1 << 20) - 5) } }
        #expect(throws: CairnError.self) { try writer.writeZeroes(at: 1 << 20, length: 1) }
        try writer.finish()
        #expect(throws: CairnError.self) { try data.withUnsafeBytes { try writer.write($0, at: 0) } }
        #expect(throws: CairnError.self) { try writer.finish() }
    }

    @Test("refcount layout is the least fixed point")
    func refcountLayout() {
        for clusterSize: UInt64 in [512, 4096, 65536] {
            let perBlock = clusterSize / 2, perTable = clusterSize / 8
            for base: UInt64 in [1, 2, perBlock - 2, perBlock - 1, perBlock, perBlock + 1, perBlock * perTable - 1, perBlock * perTable + 5, 10_000_000] {
                let (blocks, table) = QCOW2Writer.refcountLayout(clustersBefore: base, clusterSize: clusterSize)
                let total = base + blocks + table
                #expect(blocks * perBlock >= total)
                #expect((blocks - 1) * perBlock < total)  // not one block too many
                #expect(table * perTable >= blocks && table >= 1)
                #expect(table == max(1, (blocks + perTable - 1) / perTable))
            }
        }
    }
}
