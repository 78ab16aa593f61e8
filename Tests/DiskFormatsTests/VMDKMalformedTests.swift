import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

@Suite("VMDK hostile inputs")
struct VMDKMalformedTests {
    static func expectError(_ code: CairnError.Code, containing text: String, sourceLocation: SourceLocation = #_sourceLocation,
                            _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("expected a \(code) error containing '\(text)'", sourceLocation: sourceLocation)
        } catch let error as CairnError {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            #expect(error.description.contains(text), "\(error)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    static func descriptor(_ extentLines: [String], extra: String = "") -> [UInt8] {
        Array("""
        # Disk DescriptorFile
        version=1
        CID=12345678
        parentCID=ffffffff
        createType="monolithicFlat"
        \(extra)
        # Extent description
        \(extentLines.joined(separator: "\n"))

        ddb.adapterType = "ide"
        """.utf8)
    }

    @Test("truncated or foreign headers")
    func truncatedHeader() throws {
        let (image, _) = try VMDKFixture.written(stream: false, size: 200_000, seed: 1)
        Self.expectError(.malformedImage, containing: "truncated") { _ = try VMDKFixture.open(Array(image.prefix(100))) }
        Self.expectError(.malformedImage, containing: "truncated") { _ = try VMDKFixture.open(Array(image.prefix(511))) }
        Self.expectError(.malformedImage, containing: "too small") { _ = try VMDKFixture.open(Array(image.prefix(3))) }
        Self.expectError(.malformedImage, containing: "not a VMDK") { _ = try VMDKFixture.open([UInt8](repeating: 0x41, count: 4096)) }
        var cowd = image
        cowd.replaceSubrange(0..<4, with: Array("COWD".utf8))
        Self.expectError(.unsupported, containing: "COWD") { _ = try VMDKFixture.open(cowd) }
        // Cut inside the grains: the overHead check or a grain past the end.
        Self.expectError(.malformedImage, containing: "truncated") { _ = try VMDKFixture.open(Array(image.prefix(40_000))) }
    }

    @Test("header fields out of range")
    func headerFields() throws {
        let (image, _) = try VMDKFixture.written(stream: false, size: 200_000, seed: 2)
        func mutated(_ body: (inout [UInt8]) -> Void) -> [UInt8] {
            var copy = image
            body(&copy)
            return copy
        }
        Self.expectError(.malformedImage, containing: "grain directory") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt64(1) << 40, at: 56, in: &$0) })
        }
        Self.expectError(.malformedImage, containing: "64 TiB") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt64(1) << 50, at: 12, in: &$0) })
        }
        // 32 TiB is under the limit, but its grain directory cannot fit in the file.
        Self.expectError(.malformedImage, containing: "past the end") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt64(1) << 36, at: 12, in: &$0) })
        }
        Self.expectError(.malformedImage, containing: "grain size") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt64(100), at: 20, in: &$0) })
        }
        Self.expectError(.malformedImage, containing: "grain size") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt64(0), at: 20, in: &$0) })
        }
        Self.expectError(.malformedImage, containing: "grain tables of 4096") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt32(4096), at: 44, in: &$0) })
        }
        Self.expectError(.unsupported, containing: "version 4") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt32(4), at: 4, in: &$0) })
        }
        Self.expectError(.unsupported, containing: "compression algorithm 7") {
            _ = try VMDKFixture.open(mutated { VMDKFixture.putLE(UInt16(7), at: 77, in: &$0) })
        }
    }

    @Test("grain table entry past the end of the file")
    func grainPastEnd() throws {
        let (image, _) = try VMDKFixture.written(stream: false, size: 200_000, seed: 3)
        var bad = image
        let gd = Int(VMDKFixture.getLE64(bad, at: 56)) * 512
        let gt = Int(VMDKFixture.getLE32(bad, at: gd)) * 512
        VMDKFixture.putLE(UInt32(0x7FFF_FFF0), at: gt, in: &bad)
        let img = try VMDKFixture.open(bad)
        Self.expectError(.malformedImage, containing: "past the end") { _ = try img.readBytes(at: 0, count: 4096) }
        Self.expectError(.malformedImage, containing: "past the end") { _ = try img.allExtents() }
    }

    @Test("overlapping and looping grain tables")
    func overlappingTables() throws {
        let (image, _) = try VMDKFixture.written(stream: false, size: 40 << 20, seed: 4)
        let gd = Int(VMDKFixture.getLE64(image, at: 56)) * 512
        let first = VMDKFixture.getLE32(image, at: gd)
        for (index, value) in [(1, first), (1, first + 1), (0, UInt32(gd / 512))] {
            var bad = image
            VMDKFixture.putLE(value, at: gd + index * 4, in: &bad)
            Self.expectError(.malformedImage, containing: value == UInt32(gd / 512) ? "inside the grain directory" : "overlap") {
                _ = try VMDKFixture.open(bad)
            }
        }
    }

    @Test("stream-optimized: garbage grains, bad markers, broken footer")
    func streamGarbage() throws {
        let (image, _) = try VMDKFixture.written(stream: true, size: 300_000, seed: 5)
        let grain = 128 * 512  // our writer's first grain marker
        var garbage = image
        for i in 0..<100 { garbage[grain + 12 + i] = UInt8(truncatingIfNeeded: i &* 37 &+ 1) }
        let g = try VMDKFixture.open(garbage)
        Self.expectError(.malformedImage, containing: "does not inflate") { _ = try g.readBytes(at: 0, count: 1000) }

        var hugeLength = image
        VMDKFixture.putLE(UInt32(0x0FFF_FFFF), at: grain + 8, in: &hugeLength)
        Self.expectError(.malformedImage, containing: "compressed length") { _ = try VMDKFixture.open(hugeLength).readBytes(at: 0, count: 10) }

        var wrongLBA = image
        VMDKFixture.putLE(UInt64(999), at: grain, in: &wrongLBA)
        Self.expectError(.malformedImage, containing: "grain marker for sector 999") { _ = try VMDKFixture.open(wrongLBA).readBytes(at: 0, count: 10) }

        var footer = image
        footer.replaceSubrange(footer.count - 512..<footer.count - 500, with: repeatElement(0xFF, count: 12))
        Self.expectError(.malformedImage, containing: "footer") { _ = try VMDKFixture.open(footer) }
        Self.expectError(.malformedImage, containing: "footer") { _ = try VMDKFixture.open(Array(image.prefix(image.count - 512))) }
    }

    @Test("descriptor extent names outside the directory are refused before opening anything",
          arguments: ["/etc/passwd", "../x", "..", ".", "sub/dir.vmdk", "a\\b.vmdk", "nul\u{0}.vmdk", ""])
    func hostileNames(_ name: String) throws {
        let calls = Locked<[String]>([])
        let text = Self.descriptor(["RW 8 FLAT \"ok-flat.vmdk\" 0", "RW 8 FLAT \"\(name)\" 0"])
        do {
            _ = try VMDKFixture.open(text, files: ["ok-flat.vmdk": [UInt8](repeating: 0, count: 4096)], calls: calls)
            Issue.record("hostile name '\(name)' accepted")
        } catch let error as CairnError {
            #expect(error.code == .malformedImage)
            #expect(error.message.contains("is not a plain file name"), "\(error)")
            if name == "/etc/passwd" { #expect(error.message.contains("'/etc/passwd'")) }
        }
        #expect(calls.withLock { $0 }.isEmpty, "openExtent was called: \(calls.withLock { $0 })")
    }

    @Test("missing extent file: the error names it")
    func missingExtent() throws {
        let calls = Locked<[String]>([])
        let text = Self.descriptor(["RW 8 FLAT \"missing-flat.vmdk\" 0"])
        Self.expectError(.notFound, containing: "'missing-flat.vmdk'") { _ = try VMDKFixture.open(text, calls: calls) }
        #expect(calls.withLock { $0 } == ["missing-flat.vmdk"])

        // With real files: the descriptor next to no extent.
        let dir = try TempDir("vmdk-missing")
        let path = dir.file("d.vmdk")
        try Fixture.writeFile(text, to: path)
        Self.expectError(.notFound, containing: "missing-flat.vmdk") { _ = try VMDKFixture.open(path) }
    }

    @Test("descriptor errors")
    func descriptorErrors() throws {
        let zeros = [UInt8](repeating: 0, count: 8192)
        let files = ["f.vmdk": zeros]
        Self.expectError(.malformedImage, containing: "too short") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 100 FLAT \"f.vmdk\" 0"]), files: files)
        }
        Self.expectError(.malformedImage, containing: "too short") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 8 FLAT \"f.vmdk\" 9"]), files: files)
        }
        Self.expectError(.malformedImage, containing: "not a valid extent line") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 8 FLAT \"f.vmdk"]), files: files)
        }
        Self.expectError(.malformedImage, containing: "not a valid extent line") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 99999999999999999999999 FLAT \"f.vmdk\" 0"]), files: files)
        }
        Self.expectError(.malformedImage, containing: "64 TiB") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 9223372036854775807 ZERO", "RW 8 FLAT \"f.vmdk\" 0"]), files: files)
        }
        Self.expectError(.malformedImage, containing: "lists no extents") { _ = try VMDKFixture.open(Self.descriptor([])) }
        Self.expectError(.malformedImage, containing: "0 sectors") { _ = try VMDKFixture.open(Self.descriptor(["RW 0 FLAT \"f.vmdk\" 0"]), files: files) }
        Self.expectError(.unsupported, containing: "NOACCESS") { _ = try VMDKFixture.open(Self.descriptor(["NOACCESS 8 FLAT \"f.vmdk\" 0"]), files: files) }
        Self.expectError(.unsupported, containing: "VMFSSPARSE") { _ = try VMDKFixture.open(Self.descriptor(["RW 8 VMFSSPARSE \"f.vmdk\""]), files: files) }
        Self.expectError(.malformedImage, containing: "unknown extent type") { _ = try VMDKFixture.open(Self.descriptor(["RW 8 BOGUS \"f.vmdk\""]), files: files) }
        // A SPARSE extent that is not a sparse extent (here: a descriptor).
        Self.expectError(.malformedImage, containing: "'d2.vmdk'") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 8 SPARSE \"d2.vmdk\""]), files: ["d2.vmdk": Self.descriptor(["RW 8 ZERO"])])
        }
        Self.expectError(.unsupported, containing: "differencing") {
            _ = try VMDKFixture.open(Self.descriptor(["RW 8 FLAT \"f.vmdk\" 0"], extra: "parentFileNameHint=\"base.vmdk\""), files: files)
        }
        var noType = Self.descriptor(["RW 8 FLAT \"f.vmdk\" 0"])
        noType = Array(String(decoding: noType, as: UTF8.self).replacingOccurrences(of: "createType=\"monolithicFlat\"", with: "").utf8)
        Self.expectError(.malformedImage, containing: "createType") { _ = try VMDKFixture.open(noType, files: files) }
        Self.expectError(.unsupported, containing: "physical device") {
            let t = String(decoding: Self.descriptor(["RW 8 FLAT \"f.vmdk\" 0"]), as: UTF8.self).replacingOccurrences(of: "monolithicFlat", with: "fullDevice")
            _ = try VMDKFixture.open(Array(t.utf8), files: files)
        }
        // A valid one, for contrast: ZERO + FLAT.
        let ok = try VMDKFixture.open(Self.descriptor(["RW 8 ZERO", "RDONLY 8 FLAT \"f.vmdk\" 2"]), files: files)
        #expect(ok.size == 8192)
        #expect(try ok.allExtents() == [Extent(offset: 0, length: 4096, kind: .zero), Extent(offset: 4096, length: 4096, kind: .data)])
    }

    @Test("child (differencing) disks made by qemu-img are refused")
    func childDisk() throws {
        let dir = try TempDir("vmdk-child")
        let base = dir.file("base.vmdk")
        let child = dir.file("child.vmdk")
        try Fixture.qemuImg(["create", "-q", "-f", "vmdk", base, "1M"])
        try Fixture.qemuImg(["create", "-q", "-f", "vmdk", "-b", base, "-F", "vmdk", child])
        Self.expectError(.unsupported, containing: "differencing") { _ = try VMDKFixture.open(child) }
        _ = try VMDKFixture.open(base)
    }

    /// Random byte flips and truncations of valid images: errors are fine, crashes and hangs
    /// are not.
    @Test("mutated images never crash")
    func mutationLoop() throws {
        let sparse = try VMDKFixture.written(stream: false, size: 300_000, seed: 6).image
        let stream = try VMDKFixture.written(stream: true, size: 300_000, seed: 7).image
        let flatDescriptor = Self.descriptor(["RW 16 FLAT \"f.vmdk\" 0", "RW 8 ZERO", "RW 586 SPARSE \"s.vmdk\""])
        let files = ["f.vmdk": [UInt8](repeating: 7, count: 8192), "s.vmdk": sparse]
        let bases = [sparse, stream, flatDescriptor]
        var rng = SeededRandom(seed: 2024)
        var opened = 0
        var readTotal = 0
        let start = Date()
        for iteration in 0..<2000 {
            var bytes = bases[iteration % bases.count]
            let flips = Int.random(in: 1...6, using: &rng)
            for _ in 0..<flips {
                let region = Int.random(in: 0..<4, using: &rng)
                let position: Int
                switch region {
                case 0: position = Int.random(in: 0..<min(bytes.count, 512), using: &rng)       // header
                case 1: position = Int.random(in: 0..<min(bytes.count, 64 << 10), using: &rng)   // descriptor, tables
                case 2: position = max(0, bytes.count - Int.random(in: 1...2048, using: &rng))     // footer
                default: position = Int.random(in: 0..<bytes.count, using: &rng)
                }
                bytes[position] = UInt8.random(in: 0...255, using: &rng)
            }
            if iteration % 11 == 0 { bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &rng))) }
            guard let image = try? VMDKFixture.open(bytes, files: files) else { continue }
            opened += 1
            guard let extents = try? image.allExtents() else { continue }
            var budget: UInt64 = 1 << 20
            for e in extents where budget > 0 {
                let count = min(e.length, 65536, budget)
                budget -= count
                let got = try? image.readBytes(at: e.offset, count: Int(count))
                readTotal += got?.count ?? 0
                if let got, e.kind != .data {
                    #expect(got.allSatisfy { $0 == 0 }, "\(e) read non-zero bytes (iteration \(iteration))")
                }
            }
        }
        #expect(readTotal > 1 << 20, "mutated images that open are read: \(readTotal) bytes")
        #expect(opened > 100, "most mutations should still open: \(opened)")
        #expect(Date().timeIntervalSince(start) < 60)
    }
}
