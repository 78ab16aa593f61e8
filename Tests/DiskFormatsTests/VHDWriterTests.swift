import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

@Suite("VHD and VHDX writing")
struct VHDWriterTests {
    enum Kind: String, CaseIterable, Sendable {
        case vhd, vhdx1M, vhdx8M, vhdx32M

        var qemuFormat: String { self == .vhd ? "vpc" : "vhdx" }

        func makeWriter(_ file: any RandomAccessFile, size: UInt64) throws -> any BlockSink {
            switch self {
            case .vhd: return try VHDDynamicWriter(file: file, virtualSize: size)
            case .vhdx1M: return try VHDXDynamicWriter(file: file, virtualSize: size, blockSize: 1 << 20)
            case .vhdx8M: return try VHDXDynamicWriter(file: file, virtualSize: size, blockSize: 8 << 20)
            case .vhdx32M: return try VHDXDynamicWriter(file: file, virtualSize: size)
            }
        }

        func open(_ path: String) throws -> any BlockSource {
            if self == .vhd { return try VHDImage(file: FileBlockSource(path: path)) }
            return try VHDXImage(file: FileBlockSource(path: path))
        }
    }

    /// Referees: `qemu-img check` (vhdx; qemu has no check for vpc), `qemu-img compare`
    /// against the expected raw bytes, `qemu-img info` for the size, and our own reader.
    static func verifyWritten(_ img: String, kind: Kind, expected: [UInt8], in dir: TempDir,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        if kind != .vhd {
            let check = try Tool.run("qemu-img", ["check", "-f", "vhdx", img], check: false)
            #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
        }
        let info = try Tool.run("qemu-img", ["info", "-f", kind.qemuFormat, "--output=json", img])
        let json = try JSONSerialization.jsonObject(with: info.stdoutData) as? [String: Any]
        #expect((json?["virtual-size"] as? NSNumber)?.intValue == expected.count, "qemu-img info: \(info.stdout)", sourceLocation: sourceLocation)
        let raw = dir.file("expected-\(UUID().uuidString.prefix(8)).raw")
        try Fixture.writeFile(expected, to: raw)
        let compare = try Tool.run("qemu-img", ["compare", "-f", kind.qemuFormat, "-F", "raw", img, raw], check: false)
        if compare.status != 0 {
            let map = try Tool.run("qemu-img", ["map", "-f", kind.qemuFormat, "--output=json", img], check: false)
            Issue.record("qemu-img compare: \(compare.stdout) \(compare.stderr)\nmap: \(map.stdout)", sourceLocation: sourceLocation)
        }
        let image = try kind.open(img)
        try Fixture.verify(image, equals: expected, sourceLocation: sourceLocation)
    }

    static func newFile(_ path: String) throws -> PosixFile {
        try PosixFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
    }

    @Test("unaligned writes, zeros and overwrites round-trip", arguments: Kind.allCases)
    func sequentialWrites(kind: Kind) throws {
        let dir = try TempDir("vhd-write")
        defer { withExtendedLifetime(dir) {} }
        let requested = 5_000_001
        let img = dir.file("w.img")
        let writer = try kind.makeWriter(try Self.newFile(img), size: UInt64(requested))
        #expect(writer.size == 5_000_192)  // rounded up to whole sectors
        var expected = [UInt8](repeating: 0, count: Int(writer.size))
        let pattern = Fixture.pattern(size: requested, seed: 42)
        for piece in QCOW2WriterTests.segments(size: requested, seed: 1, maxLength: 150_000) {
            try pattern[piece].withUnsafeBytes { try writer.write($0, at: UInt64(piece.lowerBound)) }
        }
        expected.replaceSubrange(0..<requested, with: pattern)
        var rng = SeededRandom(seed: 2)
        for i in 0..<20 {
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
        try Self.verifyWritten(img, kind: kind, expected: expected, in: dir)
        #expect(throws: CairnError.self) { try [UInt8(1)].withUnsafeBytes { try writer.write($0, at: 0) } }
    }

    @Test("sparse: only blocks with data are stored", arguments: [Kind.vhd, .vhdx1M])
    func sparse(kind: Kind) throws {
        let dir = try TempDir("vhd-sparse")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("s.img")
        let size: UInt64 = 64 << 20
        let writer = try kind.makeWriter(try Self.newFile(img), size: size)
        let zeros = [UInt8](repeating: 0, count: 4 << 20)
        try zeros.withUnsafeBytes { try writer.write($0, at: 0) }
        try [UInt8](repeating: 7, count: 100).withUnsafeBytes { try writer.write($0, at: 40 << 20) }
        try writer.finish()
        var expected = [UInt8](repeating: 0, count: Int(size))
        for i in 0..<100 { expected[(40 << 20) + i] = 7 }
        try Self.verifyWritten(img, kind: kind, expected: expected, in: dir)
        let fileSize = try FileManager.default.attributesOfItem(atPath: img)[.size] as? Int ?? 0
        #expect(fileSize < 6 << 20, "file of \(fileSize) bytes for one block of data")
        let extents = try kind.open(img).allExtents()
        #expect(extents.filter { $0.kind == .data }.count == 1)
    }

    @Test("concurrent writes of disjoint pieces in any order", arguments: [Kind.vhd, .vhdx1M])
    func concurrentWrites(kind: Kind) throws {
        let dir = try TempDir("vhd-concurrent")
        defer { withExtendedLifetime(dir) {} }
        let size = 7 << 20
        let img = dir.file("c.img")
        let writer = try kind.makeWriter(try Self.newFile(img), size: UInt64(size))
        let pattern = Fixture.pattern(size: size, seed: 99)
        var pieces = QCOW2WriterTests.segments(size: size, seed: 5, maxLength: 70_000)
        var rng = SeededRandom(seed: 6)
        pieces.shuffle(using: &rng)
        let failures = Locked(0)
        let work = pieces
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            for (i, piece) in work.enumerated() where i % 4 == t {
                do {
                    try pattern[piece].withUnsafeBytes { try writer.write($0, at: UInt64(piece.lowerBound)) }
                } catch {
                    failures.withLock { $0 += 1 }
                }
            }
        }
        #expect(failures.withLock { $0 } == 0)
        try writer.finish()
        try Self.verifyWritten(img, kind: kind, expected: pattern, in: dir)
    }

    @Test("CHS geometry follows the spec's algorithm")
    func geometry() {
        #expect(VHD.geometry(totalSectors: 20480) == (cylinders: 301, heads: 4, sectorsPerTrack: 17))
        let huge = VHD.geometry(totalSectors: 1 << 40)
        #expect(huge == (cylinders: 65535, heads: 16, sectorsPerTrack: 255))
    }

    @Test("writer limits")
    func limits() throws {
        let dir = try TempDir("vhd-limits")
        defer { withExtendedLifetime(dir) {} }
        let f = try Self.newFile(dir.file("x"))
        #expect(throws: CairnError.self) { _ = try VHDDynamicWriter(file: f, virtualSize: 3 << 40) }
        #expect(throws: CairnError.self) { _ = try VHDXDynamicWriter(file: f, virtualSize: 1 << 20, blockSize: 3 << 20) }
        #expect(throws: CairnError.self) { _ = try VHDXDynamicWriter(file: f, virtualSize: 65 << 40) }
        let w = try VHDXDynamicWriter(file: f, virtualSize: 1 << 20)
        #expect(throws: CairnError.self) { try [UInt8(1), 2].withUnsafeBytes { try w.write($0, at: (1 << 20) - 1) } }
    }
}
