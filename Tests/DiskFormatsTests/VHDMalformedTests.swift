import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Hand-damaged VHD and VHDX images: every defect throws a `CairnError` naming the field;
/// nothing traps or hangs.
@Suite("VHD and VHDX malformed images")
struct VHDMalformedTests {
    static func openVHD(_ bytes: [UInt8], parent: (any BlockSource)? = nil) throws -> VHDImage {
        try VHDImage(file: MemoryBlockSource(bytes, name: "bad.img"), parent: parent)
    }

    static func openVHDX(_ bytes: [UInt8], parent: (any BlockSource)? = nil) throws -> VHDXImage {
        try VHDXImage(file: MemoryBlockSource(bytes, name: "bad.img"), parent: parent)
    }

    static func exercise(_ image: any BlockSource) throws {
        _ = try Fixture.readAll(image)
        _ = try image.allExtents()
    }

    /// Expects `body` to throw a CairnError with `code` whose message contains `words`.
    static func expectError(_ code: CairnError.Code, _ words: String..., sourceLocation: SourceLocation = #_sourceLocation,
                            _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("expected \(code) error mentioning \(words)", sourceLocation: sourceLocation)
        } catch let error as CairnError {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            for w in words {
                #expect(error.message.contains(w), "message \"\(error.message)\" lacks \"\(w)\"", sourceLocation: sourceLocation)
            }
            #expect(error.path == "bad.img", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
    }

    static func fixedVHD() throws -> [UInt8] { try VHDFixture.dynamicVHD(size: 1 << 20, seed: 3, subformat: "fixed") }

    static func vhdx(blockSize: String = "1M", size: Int = 3 << 20) throws -> [UInt8] {
        let dir = try TempDir("vhdx-bad")
        defer { withExtendedLifetime(dir) {} }
        let raw = dir.file("v.raw"), img = dir.file("v.vhdx")
        try Fixture.writeFile(Fixture.pattern(size: size, seed: 12, segments: 10), to: raw)
        try VHDFixture.convert(raw, to: img, format: "vhdx", options: "subformat=dynamic,block_size=\(blockSize)")
        return try readFile(img)
    }

    @Test("VHD footer and header defects")
    func vhdDefects() throws {
        let fixed = try Self.fixedVHD()
        try Self.exercise(try Self.openVHD(fixed))
        let end = fixed.count - 512

        var b = fixed
        b[end + 100] ^= 1
        Self.expectError(.malformedImage, "footer checksum") { _ = try Self.openVHD(b) }

        b = fixed
        b[end] = UInt8(ascii: "x")
        Self.expectError(.malformedImage, "conectix") { _ = try Self.openVHD(b) }

        b = fixed
        Fixture.put(UInt64(fixed.count), at: end + 48, in: &b)
        VHDFixture.fixVHDFooter(&b, at: end)
        Self.expectError(.malformedImage, "current size") { _ = try Self.openVHD(b) }

        b = fixed
        Fixture.put(UInt32(9), at: end + 60, in: &b)
        VHDFixture.fixVHDFooter(&b, at: end)
        Self.expectError(.unsupported, "disk type 9") { _ = try Self.openVHD(b) }

        Self.expectError(.malformedImage, "too small") { _ = try Self.openVHD([UInt8](repeating: 0, count: 100)) }
        Self.expectError(.usage, "no parent") { _ = try Self.openVHD(fixed, parent: MemoryBlockSource([0])) }

        let dynamic = try VHDFixture.dynamicVHD(size: 3 << 20)
        try Self.exercise(try Self.openVHD(dynamic))
        let dEnd = dynamic.count - 512
        let header = Int(Fixture.get64(dynamic, at: 16))
        let table = Int(Fixture.get64(dynamic, at: header + 16))

        // The end footer damaged: the copy at 0 is used. Both damaged: refused.
        b = dynamic
        b[dEnd + 70] ^= 0xFF
        try Self.exercise(try Self.openVHD(b))
        b[70] ^= 0xFF
        Self.expectError(.malformedImage, "footer checksum") { _ = try Self.openVHD(b) }

        b = dynamic
        b[header + 200] ^= 1
        Self.expectError(.malformedImage, "dynamic disk header checksum") { _ = try Self.openVHD(b) }

        func withHeader(_ edit: (inout [UInt8]) -> Void) -> [UInt8] {
            var c = dynamic
            edit(&c)
            VHDFixture.fixVHDHeader(&c, at: header)
            return c
        }
        Self.expectError(.malformedImage, "block size 3000") {
            _ = try Self.openVHD(withHeader { Fixture.put(UInt32(3000), at: header + 32, in: &$0) })
        }
        Self.expectError(.malformedImage, "block size") {
            _ = try Self.openVHD(withHeader { Fixture.put(UInt32(1 << 30), at: header + 32, in: &$0) })
        }
        Self.expectError(.malformedImage, "max table entries") {
            _ = try Self.openVHD(withHeader { Fixture.put(UInt32(1), at: header + 28, in: &$0) })
        }
        Self.expectError(.malformedImage, "BAT", "past the end") {
            _ = try Self.openVHD(withHeader { Fixture.put(UInt64(1 << 40), at: header + 16, in: &$0) })
        }
        Self.expectError(.malformedImage, "sector aligned") {
            _ = try Self.openVHD(withHeader { Fixture.put(UInt64(1537), at: header + 16, in: &$0) })
        }

        // A BAT entry past the end of the file.
        b = dynamic
        Fixture.put(UInt32(0x7FFF_0000), at: table, in: &b)
        Self.expectError(.malformedImage, "BAT entry 0", "past the end") { try Self.exercise(try Self.openVHD(b)) }

        // Truncated: the footer is gone, the copy at 0 names a header and BAT that are cut.
        b = Array(dynamic[0..<2048])
        #expect(throws: CairnError.self) { try Self.exercise(try Self.openVHD(b)) }

        // Absurd size.
        b = dynamic
        for at in [0, dEnd] {
            Fixture.put(UInt64(1) << 50, at: at + 48, in: &b)
            VHDFixture.fixVHDFooter(&b, at: at)
        }
        Self.expectError(.malformedImage, "2 TiB") { _ = try Self.openVHD(b) }
    }

    @Test("VHDX header, region and metadata defects")
    func vhdxDefects() throws {
        let good = try Self.vhdx()
        try Self.exercise(try Self.openVHDX(good))
        let h1 = Int(VHDX.header1Offset), h2 = Int(VHDX.header2Offset)
        let r1 = Int(VHDX.regionTable1Offset), r2 = Int(VHDX.regionTable2Offset)

        var b = good
        b[0] = UInt8(ascii: "V")
        Self.expectError(.malformedImage, "vhdxfile") { _ = try Self.openVHDX(b) }

        // One header damaged: the other is used. Both: refused, naming the checksum.
        b = good
        b[h1 + 100] ^= 1
        try Self.exercise(try Self.openVHDX(b))
        b[h2 + 100] ^= 1
        Self.expectError(.malformedImage, "no valid header", "CRC-32C") { _ = try Self.openVHDX(b) }

        // The higher sequence number wins.
        b = good
        let newer = max(VHDFixture.get64LE(good, at: h1 + 8), VHDFixture.get64LE(good, at: h2 + 8)) + 1000
        VHDFixture.put64LE(newer, at: h2 + 8, in: &b)
        VHDFixture.fixVHDXChecksum(&b, at: h2, length: 4096)
        #expect(try Self.openVHDX(b).headerSequenceNumber == newer)

        // Region tables.
        b = good
        b[r1 + 20] ^= 1
        try Self.exercise(try Self.openVHDX(b))
        b[r2 + 20] ^= 1
        Self.expectError(.malformedImage, "region table", "CRC-32C") { _ = try Self.openVHDX(b) }

        let layout = try VHDXLayout(good)
        func withRegion(_ edit: (inout [UInt8]) -> Void) -> [UInt8] {
            var c = good
            edit(&c)
            VHDFixture.fixVHDXChecksum(&c, at: r1, length: 65536)
            return c
        }
        // The BAT region placed past the end of the file.
        let batEntryBase: Int = {
            for i in 0..<4 where Array(good[r1 + 16 + i * 32..<r1 + 32 + i * 32]) == VHDX.batRegion.bytes { return r1 + 16 + i * 32 }
            return r1 + 16
        }()
        Self.expectError(.malformedImage, "past the end") {
            _ = try Self.openVHDX(withRegion { VHDFixture.put64LE(1 << 40, at: batEntryBase + 16, in: &$0) })
        }
        Self.expectError(.malformedImage, "1 MiB") {
            _ = try Self.openVHDX(withRegion { VHDFixture.put64LE(4096, at: batEntryBase + 16, in: &$0) })
        }
        Self.expectError(.unsupported, "required") {
            _ = try Self.openVHDX(withRegion {
                VHDFixture.put32LE(3, at: r1 + 8, in: &$0)
                let e = r1 + 16 + 2 * 32
                for i in 0..<16 { $0[e + i] = UInt8(i + 1) }
                VHDFixture.put64LE(1 << 20, at: e + 16, in: &$0)
                VHDFixture.put32LE(1 << 20, at: e + 24, in: &$0)
                VHDFixture.put32LE(1, at: e + 28, in: &$0)
            })
        }

        // Metadata: absurd block size and virtual size.
        b = good
        VHDFixture.put32LE(3 << 20, at: layout.fileParametersOffset, in: &b)
        Self.expectError(.malformedImage, "block size") { _ = try Self.openVHDX(b) }
        b = good
        VHDFixture.put32LE(512, at: layout.fileParametersOffset, in: &b)
        Self.expectError(.malformedImage, "block size 512") { _ = try Self.openVHDX(b) }
        b = good
        VHDFixture.put64LE(1 << 60, at: layout.virtualSizeOffset, in: &b)
        Self.expectError(.malformedImage, "64 TiB") { _ = try Self.openVHDX(b) }
        b = good
        VHDFixture.put64LE(1000, at: layout.virtualSizeOffset, in: &b)
        Self.expectError(.malformedImage, "logical sector size") { _ = try Self.openVHDX(b) }
        b = good
        VHDFixture.put64LE(1 << 40, at: layout.virtualSizeOffset, in: &b)
        Self.expectError(.malformedImage, "BAT region", "too small") { _ = try Self.openVHDX(b) }
        b = good
        b[layout.metadataOffset] = UInt8(ascii: "X")
        Self.expectError(.malformedImage, "metadata") { _ = try Self.openVHDX(b) }

        // BAT entries: past the end of the file, in the headers, undefined state.
        b = good
        VHDFixture.put64LE(UInt64(1) << 45 | 6, at: layout.batOffset, in: &b)
        Self.expectError(.malformedImage, "BAT entry 0", "past the end") { try Self.exercise(try Self.openVHDX(b)) }
        b = good
        VHDFixture.put64LE(6, at: layout.batOffset, in: &b)
        Self.expectError(.malformedImage, "inside the headers") { try Self.exercise(try Self.openVHDX(b)) }
        b = good
        VHDFixture.put64LE(5, at: layout.batOffset, in: &b)
        Self.expectError(.malformedImage, "undefined state 5") { try Self.exercise(try Self.openVHDX(b)) }
        b = good
        VHDFixture.put64LE(layout.batEntry(good, block: 0) & ~7 | 7, at: layout.batOffset, in: &b)
        Self.expectError(.malformedImage, "partially present") { try Self.exercise(try Self.openVHDX(b)) }

        // Truncated files.
        for cut in [100, 70_000, 300_000, 1 << 20, good.count - (1 << 20)] {
            #expect(throws: CairnError.self) { try Self.exercise(try Self.openVHDX(Array(good[0..<cut]))) }
        }
        Self.expectError(.usage, "no parent") { _ = try Self.openVHDX(good, parent: MemoryBlockSource([0])) }
    }

    @Test("a VHDX with entries in its log is refused, never read past")
    func vhdxLog() throws {
        let good = try Self.vhdx()
        var b = good
        // Make header 2 current (higher sequence) with a log GUID, and a matching log entry.
        let h = Int(VHDX.header2Offset)
        VHDFixture.put64LE(VHDFixture.get64LE(good, at: Int(VHDX.header1Offset) + 8) + 10, at: h + 8, in: &b)
        let guid = VHDX.GUID.random()
        b.replaceSubrange(h + 48..<h + 64, with: guid.bytes)
        VHDFixture.fixVHDXChecksum(&b, at: h, length: 4096)
        let logOffset = Int(VHDFixture.get64LE(b, at: h + 72))
        let logLength = Int(VHDFixture.get32LE(b, at: h + 68))
        try #require(logOffset >= 1 << 20 && logLength >= 4096)
        // A GUID without entries: the log is empty, the image opens.
        try Self.exercise(try Self.openVHDX(b))
        // An entry "loge" with that GUID, 4 KiB into the log.
        let e = logOffset + 4096
        VHDFixture.put32LE(0x6567_6F6C, at: e, in: &b)
        VHDFixture.put32LE(4096, at: e + 8, in: &b)
        VHDFixture.put64LE(1, at: e + 16, in: &b)
        b.replaceSubrange(e + 32..<e + 48, with: guid.bytes)
        VHDFixture.fixVHDXChecksum(&b, at: e, length: 4096)
        Self.expectError(.unsupported, "log is not empty") { _ = try Self.openVHDX(b) }
        do {
            _ = try Self.openVHDX(b)
        } catch let error as CairnError {
            #expect(error.hint?.contains("qemu-img check -r all") == true)
        }
        // A log region outside the file.
        VHDFixture.put64LE(1 << 40, at: h + 72, in: &b)
        VHDFixture.fixVHDXChecksum(&b, at: h, length: 4096)
        Self.expectError(.malformedImage, "log") { _ = try Self.openVHDX(b) }
    }

    @Test("random byte flips never crash or hang")
    func mutationLoop() throws {
        let vhdFixtures = [try VHDFixture.dynamicVHD(size: 3 << 20), try Self.fixedVHD()]
        let vhdxFixtures = [try Self.vhdx(), try Self.vhdx(blockSize: "2M", size: 3 << 20)]
        let clock = ContinuousClock()
        let start = clock.now
        var rng = SeededRandom(seed: 2025)
        var outcomes: [String: Int] = [:]
        let zeroParent = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 20), name: "parent")
        for iteration in 0..<4000 {
            let isVHDX = iteration % 2 == 1
            let base = isVHDX ? vhdxFixtures[(iteration / 2) % 2] : vhdFixtures[(iteration / 2) % 2]
            var bytes = base
            // Interesting regions: VHD footer copies, header, BAT; VHDX headers, region
            // tables, metadata and BAT.
            let hot: [Range<Int>] = isVHDX
                ? [0..<8, 65536..<65536 + 80, 131072..<131072 + 80, 196608..<196608 + 100, 262144..<262144 + 100,
                   (2 << 20)..<(2 << 20) + 300, (2 << 20) + 65536..<(2 << 20) + 65600, (3 << 20)..<(3 << 20) + 64]
                : [0..<512, 512..<2048, 2048..<2600, (bytes.count - 512)..<bytes.count]
            var touched = Set<Int>()
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let which = Int.random(in: 0..<hot.count, using: &rng)
                touched.insert(which)
                let region = hot[which]
                let at = Int.random(in: region.clamped(to: 0..<bytes.count), using: &rng)
                if Bool.random(using: &rng) {
                    bytes[at] ^= UInt8(truncatingIfNeeded: 1 << Int.random(in: 0..<8, using: &rng))
                } else {
                    bytes[at] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            // Usually make the checksums right again, so the damage reaches deeper.
            if Int.random(in: 0..<4, using: &rng) != 0 {
                if isVHDX {
                    // Only the structures that were hit (hot regions 1-4).
                    if touched.contains(1) { VHDFixture.fixVHDXChecksum(&bytes, at: 65536, length: 4096) }
                    if touched.contains(2) { VHDFixture.fixVHDXChecksum(&bytes, at: 131072, length: 4096) }
                    if touched.contains(3) { VHDFixture.fixVHDXChecksum(&bytes, at: 196608, length: 65536) }
                    if touched.contains(4) { VHDFixture.fixVHDXChecksum(&bytes, at: 262144, length: 65536) }
                } else {
                    VHDFixture.fixVHDFooter(&bytes, at: bytes.count - 512)
                    if Fixture.get64(bytes, at: bytes.count - 512 + 16) == 512 {
                        VHDFixture.fixVHDFooter(&bytes, at: 0)
                        VHDFixture.fixVHDHeader(&bytes, at: 512)
                    }
                }
            }
            if Int.random(in: 0..<25, using: &rng) == 0 {
                bytes.removeLast(Int.random(in: 0..<bytes.count, using: &rng))
            }
            let parent: (any BlockSource)? = Int.random(in: 0..<4, using: &rng) == 0 ? zeroParent : nil
            do {
                let image: any BlockSource = isVHDX
                    ? try Self.openVHDX(bytes, parent: parent) : try Self.openVHD(bytes, parent: parent)
                let limit = min(image.size, 1 << 20)
                _ = try image.readBytes(at: 0, count: Int(limit))
                let offset = UInt64.random(in: 0...image.size, using: &rng)
                _ = try image.readBytes(at: offset, count: Int(min(image.size - offset, 70_000)))
                _ = try image.extents(in: 0..<min(image.size, 16 << 20))
                outcomes["ok", default: 0] += 1
            } catch let error as CairnError {
                outcomes["\(error.code)", default: 0] += 1
                let expectedCodes: [CairnError.Code] = [.malformedImage, .unsupported, .usage]
                #expect(expectedCodes.contains(error.code), "iteration \(iteration): \(error)")
            }
        }
        #expect(clock.now - start < .seconds(30), "\(clock.now - start)")
        #expect(outcomes["ok", default: 0] > 100, "\(outcomes)")
        #expect(outcomes["malformedImage", default: 0] > 100, "\(outcomes)")
    }
}
