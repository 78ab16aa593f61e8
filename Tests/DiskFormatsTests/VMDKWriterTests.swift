import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

@Suite("VMDK writing")
struct VMDKWriterTests {
    /// `qemu-img check`, `qemu-img compare` against the expected raw bytes, and our reader.
    static func verifyWritten(_ img: String, expected: [UInt8], createType: String, in dir: TempDir,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        try VMDKFixture.expectCheckPasses(img, sourceLocation: sourceLocation)
        let raw = dir.file("expected-\(UUID().uuidString.prefix(8)).raw")
        try Fixture.writeFile(expected, to: raw)
        #expect(try Tool.qemuImgCompare(img, raw, formatA: "vmdk", formatB: "raw"), "qemu-img compare differs", sourceLocation: sourceLocation)
        let info = try Fixture.qemuImg(["info", "--output=json", img]).stdout
        #expect(info.contains("\"virtual-size\": \(expected.count)"), "qemu-img info: \(info)", sourceLocation: sourceLocation)
        let image = try VMDKFixture.open(img)
        #expect(image.createType == createType, sourceLocation: sourceLocation)
        try Fixture.verify(image, equals: expected, sourceLocation: sourceLocation)
    }

    /// A disk of `size` bytes with data in a few places and long zero stretches (including a
    /// whole 32 MiB grain-table span when the disk is large enough).
    static func sparsePattern(size: Int, seed: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        let dense = Fixture.pattern(size: min(size, 3 << 20), seed: seed)
        bytes.replaceSubrange(0..<dense.count, with: dense)
        var rng = SeededRandom(seed: seed &+ 1)
        if size > 70 << 20 {
            let chunk = rng.bytes(300_000)
            bytes.replaceSubrange((66 << 20)..<(66 << 20) + chunk.count, with: chunk)
        }
        let tail = rng.bytes(min(size, 100_000))
        bytes.replaceSubrange(size - tail.count..<size, with: tail)
        return bytes
    }

    @Test("streamOptimized: ascending chunks, holes, zero ranges, partial last chunk",
          arguments: [3_000_064, (5 << 20) + 512, (72 << 20) + 1000])
    func streamOptimized(requested: Int) throws {
        let dir = try TempDir("vmdk-stream")
        let img = dir.file("s.vmdk")
        let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
        let writer = try VMDKStreamOptimizedWriter(file: file, virtualSize: UInt64(requested))
        #expect(writer.requiresSequentialWrites)
        #expect(writer.size == UInt64((requested + 511) / 512 * 512))
        let data = Self.sparsePattern(size: requested, seed: UInt64(requested))
        var expected = data + [UInt8](repeating: 0, count: Int(writer.size) - requested)

        // The restore's pattern: chunk-sized pieces (multiples of 64 KiB), ascending; zero
        // chunks as writeZeroes, some data chunks explicitly zeroed, the last one partial.
        let chunk = 256 << 10
        var pos = 0, index = 0
        while pos < requested {
            let end = min(requested, pos + chunk)
            let piece = Array(data[pos..<end])
            if index % 7 == 3 {
                try writer.writeZeroes(at: UInt64(pos), length: UInt64(end - pos))
                expected.replaceSubrange(pos..<end, with: repeatElement(0, count: end - pos))
            } else if piece.allSatisfy({ $0 == 0 }) {
                try writer.writeZeroes(at: UInt64(pos), length: UInt64(end - pos))
            } else {
                try piece.withUnsafeBytes { try writer.write($0, at: UInt64(pos)) }
            }
            pos = end
            index += 1
        }
        // Going back is refused.
        let back = [UInt8](repeating: 1, count: 512)
        #expect(throws: CairnError.self) { try back.withUnsafeBytes { try writer.write($0, at: 0) } }
        try writer.finish()
        try Self.verifyWritten(img, expected: expected, createType: "streamOptimized", in: dir)

        // Layout checks: header says GD_AT_END; the file ends with footer + EOS markers.
        let bytes = try readFile(img)
        #expect(VMDKFixture.getLE64(bytes, at: 56) == VMDK.gdAtEnd)
        #expect(VMDKFixture.getLE32(bytes, at: 4) == 3)
        #expect(bytes.count % 512 == 0)
        #expect(VMDKFixture.getLE32(bytes, at: bytes.count - 1536 + 12) == VMDK.Marker.footer)
        #expect(bytes[(bytes.count - 512)...].allSatisfy { $0 == 0 })
    }

    @Test("streamOptimized: unaligned small writes in ascending order")
    func streamUnaligned() throws {
        let dir = try TempDir("vmdk-stream-unaligned")
        let img = dir.file("u.vmdk")
        let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
        let size = 1_234_567
        let writer = try VMDKStreamOptimizedWriter(file: file, virtualSize: UInt64(size), compressionLevel: 1)
        let data = Fixture.pattern(size: size, seed: 99)
        var pos = 0
        var rng = SeededRandom(seed: 5)
        while pos < size {
            let end = min(size, pos + Int.random(in: 1...90_000, using: &rng))
            try data[pos..<end].withUnsafeBytes { try writer.write($0, at: UInt64(pos)) }
            pos = end
        }
        try writer.finish()
        try Self.verifyWritten(img, expected: data + [UInt8](repeating: 0, count: Int(writer.size) - size),
                               createType: "streamOptimized", in: dir)
    }

    @Test("monolithicSparse: concurrent unordered writes, zeros and overwrites", arguments: [3_000_064, (40 << 20) + 512])
    func sparse(requested: Int) throws {
        let dir = try TempDir("vmdk-sparse")
        let img = dir.file("m.vmdk")
        let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
        let writer = try VMDKSparseWriter(file: file, virtualSize: UInt64(requested))
        #expect(!writer.requiresSequentialWrites)
        let data = Self.sparsePattern(size: requested, seed: 3)
        var expected = data + [UInt8](repeating: 0, count: Int(writer.size) - requested)

        // Disjoint unaligned pieces, shuffled, written from 4 threads.
        var rng = SeededRandom(seed: 4)
        var pieces: [Range<Int>] = []
        var pos = 0
        while pos < requested {
            let end = min(requested, pos + Int.random(in: 1...200_000, using: &rng))
            pieces.append(pos..<end)
            pos = end
        }
        pieces.shuffle(using: &rng)
        let failures = Locked(0)
        let shared = pieces
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            for (i, piece) in shared.enumerated() where i % 4 == t {
                do {
                    try data[piece].withUnsafeBytes { try writer.write($0, at: UInt64(piece.lowerBound)) }
                } catch {
                    failures.withLock { $0 += 1 }
                }
            }
        }
        #expect(failures.withLock { $0 } == 0)
        // Overwrites: zeros both ways and new data.
        for i in 0..<20 {
            let length = Int.random(in: 1...100_000, using: &rng)
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
                let fresh = rng.bytes(length)
                try fresh.withUnsafeBytes { try writer.write($0, at: UInt64(offset)) }
                expected.replaceSubrange(offset..<offset + length, with: fresh)
            }
        }
        try writer.finish()
        #expect(throws: CairnError.self) { try [UInt8](repeating: 1, count: 1).withUnsafeBytes { try writer.write($0, at: 0) } }
        try Self.verifyWritten(img, expected: expected, createType: "monolithicSparse", in: dir)

        // qemu can keep writing anywhere in the restored disk (all grain tables exist).
        try Fixture.qemuIO(img, ["write -P 0x77 \(expected.count - 65536) 65536", "write -P 0x78 0 4096"], format: "vmdk")
        try VMDKFixture.expectCheckPasses(img)
    }

    @Test("empty and tiny disks")
    func tiny() throws {
        let dir = try TempDir("vmdk-tiny")
        for (stream, size) in [(true, 0), (false, 0), (true, 1), (false, 700), (true, 65536)] {
            let img = dir.file("t-\(stream)-\(size).vmdk")
            let file = try PosixFile(path: img, flags: O_RDWR | O_CREAT | O_TRUNC)
            let sink: any BlockSink = stream
                ? try VMDKStreamOptimizedWriter(file: file, virtualSize: UInt64(size))
                : try VMDKSparseWriter(file: file, virtualSize: UInt64(size))
            if size > 0 {
                let data = [UInt8](repeating: 0xAB, count: size)
                try data.withUnsafeBytes { try sink.write($0, at: 0) }
            }
            try sink.finish()
            let padded = (size + 511) / 512 * 512
            let expected = [UInt8](repeating: 0xAB, count: size) + [UInt8](repeating: 0, count: padded - size)
            let image = try VMDKFixture.open(img)
            #expect(image.size == UInt64(padded))
            #expect(try Fixture.readAll(image) == expected)
            if size > 0 {
                try Self.verifyWritten(img, expected: expected, createType: stream ? "streamOptimized" : "monolithicSparse", in: dir)
            }
        }
    }
}
