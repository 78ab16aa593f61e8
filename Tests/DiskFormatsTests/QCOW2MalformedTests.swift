import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Hand-damaged images: every defect throws a `CairnError` naming the field; nothing traps.
@Suite("qcow2 malformed images")
struct QCOW2MalformedTests {
    /// A small valid image (bytes) made by qemu-img: 1 MiB virtual, data and zero clusters.
    static func validImage(compat: String = "1.1", clusterSize: Int = 4096, compression: String? = nil) throws -> [UInt8] {
        let dir = try TempDir("qcow2-bad")
        defer { withExtendedLifetime(dir) {} }
        let raw = dir.file("v.raw"), img = dir.file("v.qcow2")
        try Fixture.writeFile(Fixture.pattern(size: 1 << 20, seed: 11, segments: 16), to: raw)
        var options = "compat=\(compat),cluster_size=\(clusterSize)"
        var args = ["convert", "-O", "qcow2"]
        if let compression {
            args.append("-c")
            if compat == "1.1" { options += ",compression_type=\(compression)" }
        }
        try Fixture.qemuImg(args + ["-o", options, raw, img])
        if compat == "1.1" && compression == nil {
            try Fixture.qemuIO(img, ["write -z 8192 8192", "write -z 524288 65536"])
        }
        return try readFile(img)
    }

    static func open(_ bytes: [UInt8], backing: (any BlockSource)? = nil) throws -> QCOW2Image {
        try QCOW2Image(file: MemoryBlockSource(bytes, name: "bad.qcow2"), backing: backing)
    }

    /// Opens, reads everything and maps everything.
    static func exercise(_ bytes: [UInt8]) throws {
        let image = try open(bytes)
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
            #expect(error.path == "bad.qcow2", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test("the valid fixtures read fine")
    func validFixtures() throws {
        for bytes in [try Self.validImage(), try Self.validImage(compat: "0.10", clusterSize: 512),
                      try Self.validImage(compression: "zstd"), try Self.validImage(compression: "zlib")] {
            try Self.exercise(bytes)
        }
    }

    @Test("header defects")
    func headerDefects() throws {
        let good = try Self.validImage()
        let fileSize = UInt64(good.count)

        Self.expectError(.malformedImage, "truncated") { try Self.exercise(Array(good[0..<50])) }
        Self.expectError(.malformedImage, "truncated") { try Self.exercise(Array(good[0..<90])) }
        Self.expectError(.malformedImage, "not a qcow2 image") { var b = good; b[3] = 0; try Self.exercise(b) }
        Self.expectError(.unsupported, "version 4") {
            var b = good; Fixture.put(UInt32(4), at: 4, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "L1 table offset", "past the end of the file") {
            var b = good; Fixture.put((fileSize + 8192) / 4096 * 4096, at: 40, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "L1 table offset", "aligned") {
            var b = good; Fixture.put(UInt64(4096 + 8), at: 40, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "l1_size", "32 MiB") {
            var b = good; Fixture.put(UInt32(0x1000_0000), at: 36, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "l1_size", "too small") {
            var b = good; Fixture.put(UInt32(0), at: 36, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "cluster_bits 8") {
            var b = good; Fixture.put(UInt32(8), at: 20, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "cluster_bits 22") {
            var b = good; Fixture.put(UInt32(22), at: 20, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "size 9223372036854775808") {
            var b = good; Fixture.put(UInt64(1) << 63, at: 24, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "size", "L1") {
            var b = good; Fixture.put(UInt64(1) << 60, at: 24, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "l1_size", "too small") {
            var b = good; Fixture.put(UInt64(1) << 40, at: 24, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "unknown incompatible feature bit 5") {
            var b = good; Fixture.put(UInt64(1) << 5, at: 72, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "unknown incompatible feature bit 63") {
            var b = good; Fixture.put(UInt64(1) << 63, at: 72, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "extended L2", "extended_l2=off") {
            var b = good; Fixture.put(UInt64(1) << 4, at: 72, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "external data file") {
            var b = good; Fixture.put(UInt64(1) << 2, at: 72, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "encrypted", "qemu-img convert") {
            var b = good; Fixture.put(UInt32(2), at: 32, in: &b); try Self.exercise(b)
        }
        Self.expectError(.unsupported, "compression_type 2") {
            var b = good; b[104] = 2; Fixture.put(UInt64(1) << 3, at: 72, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "compression_type 1", "bit 3") {
            var b = good; b[104] = 1; try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "header_length") {
            var b = good; Fixture.put(UInt32(100), at: 100, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "refcount_order") {
            var b = good; Fixture.put(UInt32(7), at: 96, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "backing_file_size") {
            var b = good; Fixture.put(UInt64(512), at: 8, in: &b); Fixture.put(UInt32(2000), at: 16, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "backing_file_offset") {
            var b = good; Fixture.put(UInt64(4090), at: 8, in: &b); Fixture.put(UInt32(100), at: 16, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "header extension") {
            var b = good; Fixture.put(UInt32(0x1234_5678), at: 112, in: &b); Fixture.put(UInt32(100_000), at: 116, in: &b); try Self.exercise(b)
        }
        // Dirty and corrupt bits are readable.
        var flagged = good
        Fixture.put(UInt64(3), at: 72, in: &flagged)
        let image = try Self.open(flagged)
        #expect(image.header.isDirty && image.header.isMarkedCorrupt)
        #expect(Fixture.difference(try Fixture.readAll(image), try Fixture.readAll(Self.open(good))) == nil)
    }

    @Test("an image really encrypted by qemu-img is refused")
    func realEncryption() throws {
        let dir = try TempDir("qcow2-luks")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("luks.qcow2")
        // qemu-img times its PBKDF to pick an iteration count and gives up ("Unable to get
        // accurate CPU usage") when a loaded machine skews the timing: try a few times.
        var made = false
        for _ in 0..<5 where !made {
            try? FileManager.default.removeItem(atPath: img)
            made = (try? Fixture.qemuImg(["create", "-q", "--object", "secret,id=sec0,data=passphrase", "-f", "qcow2",
                                          "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", img, "1M"])) != nil
        }
        try #require(made, "qemu-img could not create the LUKS fixture")
        let error = #expect(throws: CairnError.self) { try Fixture.open(img) }
        #expect(error?.code == .unsupported)
        #expect(error?.message.contains("encrypted") == true)
    }

    @Test("table and cluster defects")
    func tableDefects() throws {
        let good = try Self.validImage()
        let fileSize = UInt64(good.count)
        let l1Offset = Int(Fixture.get64(good, at: 40))
        let l2Offset = Int(Fixture.get64(good, at: l1Offset) & QCOW2.l1OffsetMask)
        #expect(l2Offset > 0)

        Self.expectError(.malformedImage, "L2 table offset", "past the end of the file") {
            var b = good; Fixture.put((fileSize + 4096 * 10) / 4096 * 4096 | QCOW2.flagCopied, at: l1Offset, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "L2 table offset", "not aligned") {
            var b = good; Fixture.put(UInt64(l2Offset + 512), at: l1Offset, in: &b); try Self.exercise(b)
        }
        // The first L2 entry maps guest cluster 0, which holds data.
        let entry = Fixture.get64(good, at: l2Offset)
        #expect(entry & QCOW2.l2OffsetMask != 0)
        Self.expectError(.malformedImage, "L2 entry", "past the end of the file") {
            var b = good; Fixture.put((fileSize + 4096 * 3) / 4096 * 4096 | QCOW2.flagCopied, at: l2Offset, in: &b); try Self.exercise(b)
        }
        Self.expectError(.malformedImage, "L2 entry", "not aligned") {
            var b = good; Fixture.put((entry & QCOW2.l2OffsetMask) + 512, at: l2Offset, in: &b); try Self.exercise(b)
        }
        // The extents walk validates too, without reading data.
        Self.expectError(.malformedImage, "L2 entry", "past the end of the file") {
            var b = good; Fixture.put((fileSize + 4096 * 3) / 4096 * 4096, at: l2Offset, in: &b)
            _ = try Self.open(b).allExtents()
        }

        // Version 2 has no zero flag.
        let v2 = try Self.validImage(compat: "0.10", clusterSize: 512)
        let v2L1 = Int(Fixture.get64(v2, at: 40))
        let v2L2 = Int(Fixture.get64(v2, at: v2L1) & QCOW2.l1OffsetMask)
        Self.expectError(.malformedImage, "version 2", "zero flag") {
            var b = v2; Fixture.put(Fixture.get64(v2, at: v2L2) | 1, at: v2L2, in: &b); try Self.exercise(b)
        }
    }

    @Test("compressed clusters with a garbage stream", arguments: ["zlib", "zstd"])
    func garbageCompressed(_ type: String) throws {
        let good = try Self.validImage(compression: type)
        try Self.exercise(good)
        let l1Offset = Int(Fixture.get64(good, at: 40))
        let l2Offset = Int(Fixture.get64(good, at: l1Offset) & QCOW2.l1OffsetMask)
        // Find a compressed entry and overwrite its stream.
        let clusterBits = UInt64(Fixture.get32(good, at: 20))
        let shift = 62 - (clusterBits - 8)
        var found = false
        for i in 0..<512 {
            let e = Fixture.get64(good, at: l2Offset + 8 * i)
            guard e & QCOW2.flagCompressed != 0 else { continue }
            let host = Int(e & ((1 << shift) - 1) & ~QCOW2.flagCompressed)
            var bad = good
            var rng = SeededRandom(seed: UInt64(i))
            for j in 0..<64 { bad[host + j] = UInt8(truncatingIfNeeded: rng.next()) }
            Self.expectError(.malformedImage, "compressed cluster", "does not decompress") { try Self.exercise(bad) }
            // A compressed descriptor pointing past the end of the file.
            var past = good
            Fixture.put(QCOW2.flagCompressed | UInt64(good.count + 100), at: l2Offset + 8 * i, in: &past)
            Self.expectError(.malformedImage, "compressed cluster", "past the end of the file") { try Self.exercise(past) }
            // A truncated stream (the file ends inside it).
            Self.expectError(.malformedImage, "compressed cluster") { try Self.exercise(Array(good[0..<host + 8])) }
            found = true
            break
        }
        #expect(found, "fixture has no compressed cluster")
    }

    @Test("random byte flips never crash or hang")
    func mutationLoop() throws {
        let fixtures = [try Self.validImage(), try Self.validImage(compat: "0.10", clusterSize: 512),
                        try Self.validImage(compression: "zstd"), try Self.validImage(compression: "zlib")]
        let clock = ContinuousClock()
        let start = clock.now
        var rng = SeededRandom(seed: 2024)
        var outcomes: [String: Int] = [:]
        for iteration in 0..<3000 {
            let base = fixtures[iteration % fixtures.count]
            let clusterSize = 1 << Int(Fixture.get32(base, at: 20))
            var bytes = base
            let flips = Int.random(in: 1...8, using: &rng)
            for _ in 0..<flips {
                let region: Int
                switch Int.random(in: 0..<10, using: &rng) {
                case 0..<3: region = 112  // header fields
                case 3..<8: region = min(bytes.count, clusterSize * 8)  // header, refcounts, L1, L2
                default: region = bytes.count
                }
                let at = Int.random(in: 0..<region, using: &rng)
                bytes[at] ^= UInt8(truncatingIfNeeded: 1 << Int.random(in: 0..<8, using: &rng))
                if Int.random(in: 0..<4, using: &rng) == 0 { bytes[at] = UInt8(truncatingIfNeeded: rng.next()) }
            }
            if Int.random(in: 0..<20, using: &rng) == 0 {
                bytes.removeLast(Int.random(in: 0..<bytes.count, using: &rng))
            }
            do {
                let image = try Self.open(bytes)
                // Bound the work: a damaged header may claim a huge disk.
                let limit = min(image.size, 2 << 20)
                _ = try image.readBytes(at: 0, count: Int(limit))
                let offset = UInt64.random(in: 0...image.size, using: &rng)
                _ = try image.readBytes(at: offset, count: Int(min(image.size - offset, 70_000)))
                _ = try image.extents(in: 0..<min(image.size, 8 << 20))
                outcomes["ok", default: 0] += 1
            } catch let error as CairnError {
                outcomes["\(error.code)", default: 0] += 1
                let expectedCodes: [CairnError.Code] = [.malformedImage, .unsupported, .usage]
                #expect(expectedCodes.contains(error.code), "iteration \(iteration): \(error)")
            }
        }
        #expect(clock.now - start < .seconds(60))
        #expect(outcomes["ok", default: 0] > 100)
        #expect(outcomes["malformedImage", default: 0] > 100)
    }
}
