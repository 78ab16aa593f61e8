import CairnTestSupport
import Testing

@testable import CairnCore

@Suite("MaskedBlockSource")
struct MaskedBlockSourceTests {
    /// A source that records every byte range read from it.
    final class Recording: BlockSource, @unchecked Sendable {
        let inner: MemoryBlockSource
        var reads: [Range<UInt64>] = []
        init(_ bytes: [UInt8]) { inner = MemoryBlockSource(bytes, name: "recorded") }
        var size: UInt64 { inner.size }
        var name: String { inner.name }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
            reads.append(offset..<offset + UInt64(buffer.count))
            try inner.read(into: buffer, at: offset)
        }
        func extents(in range: Range<UInt64>) throws -> [Extent] { try inner.extents(in: range) }
    }

    @Test("reads return zeros in masked ranges and base bytes elsewhere, and never read masked bytes")
    func randomMasks() throws {
        var rng = SeededRandom(seed: 5)
        for round in 0..<200 {
            let size = Int.random(in: 1...20_000, using: &rng)
            let bytes = rng.bytes(size)
            var masks: [Range<UInt64>] = []
            for _ in 0..<Int.random(in: 0...8, using: &rng) {
                let a = UInt64.random(in: 0...UInt64(size), using: &rng)
                let b = UInt64.random(in: a...min(UInt64(size) + 100, a + 5000), using: &rng)
                masks.append(a..<b)
            }
            let base = Recording(bytes)
            let m = MaskedBlockSource(base: base, masked: masks)
            var expected = bytes
            for r in masks { for i in Int(r.lowerBound)..<min(Int(r.upperBound), size) { expected[i] = 0 } }
            let off = Int.random(in: 0..<size, using: &rng)
            let len = Int.random(in: 0...(size - off), using: &rng)
            var got = [UInt8](repeating: 0xAA, count: len)
            try got.withUnsafeMutableBytes { try m.read(into: $0, at: UInt64(off)) }
            #expect(got == Array(expected[off..<off + len]), "round \(round)")
            for r in base.reads {
                for mr in m.masked { #expect(!r.overlaps(mr), "round \(round): read \(r) touches masked \(mr)") }
            }
            // The map tiles the range; masked bytes are zero extents, the rest data.
            let ext = try m.extents(in: 0..<UInt64(size))
            var pos: UInt64 = 0
            for e in ext {
                #expect(e.offset == pos)
                pos = e.end
                let inMask = m.masked.contains { $0.contains(e.offset) }
                #expect((e.kind == .zero) == inMask, "round \(round): \(e) vs masks \(m.masked)")
            }
            #expect(pos == UInt64(size))
        }
    }

    @Test("masks are clipped, sorted and merged; maskedBytes counts them once")
    func normalisation() {
        let m = MaskedBlockSource(base: MemoryBlockSource([UInt8](repeating: 1, count: 100), name: "m"),
                                  masked: [90..<200, 10..<20, 15..<30, 40..<40, 30..<35])
        #expect(m.masked == [10..<35, 90..<100])
        #expect(m.maskedBytes == 35)
    }
}
