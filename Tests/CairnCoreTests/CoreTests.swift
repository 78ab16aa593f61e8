import CairnCore
import CairnTestSupport
import Foundation
import Testing

@Suite struct CoreTests {
    @Test func zeroCheckAtEveryAlignmentAndPosition() {
        var buf = [UInt8](repeating: 0, count: 300)
        buf.withUnsafeBytes { b in
            for start in 0..<9 {
                for end in [start, start + 1, 100, 299, 300] where end >= start {
                    #expect(isAllZero(UnsafeRawBufferPointer(rebasing: b[start..<end])))
                }
            }
        }
        for pos in [0, 1, 7, 8, 63, 64, 150, 299] {
            buf = [UInt8](repeating: 0, count: 300)
            buf[pos] = 1
            buf.withUnsafeBytes { b in
                #expect(!isAllZero(b))
                #expect(isAllZero(UnsafeRawBufferPointer(rebasing: b[(pos + 1)...])))
            }
        }
    }

    @Test func digestHex() throws {
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        let d = try #require(Digest(hex: hex))
        #expect(d.hex == hex)
        #expect(d.short == "ba7816bf")
        #expect(Digest(hex: "xyz") == nil)
        #expect(Digest(hex: String(hex.dropLast()) + "g") == nil)
        #expect(Digest.zero.isZero)
    }

    @Test func byteCountParsing() {
        #expect(ByteCount.parse("64K") == 65536)
        #expect(ByteCount.parse("1M") == 1 << 20)
        #expect(ByteCount.parse("4MiB") == 4 << 20)
        #expect(ByteCount.parse("65536") == 65536)
        #expect(ByteCount.parse("lots") == nil)
        #expect(ByteCount.parse("99999999999999999999T") == nil)
        #expect(ByteCount.format(1536) == "1.5 KiB")
    }

    @Test func coalesce() {
        let e = [Extent(offset: 0, length: 10, kind: .data), Extent(offset: 10, length: 5, kind: .data),
                 Extent(offset: 15, length: 0, kind: .zero), Extent(offset: 15, length: 5, kind: .zero)].coalesced()
        #expect(e == [Extent(offset: 0, length: 15, kind: .data), Extent(offset: 15, length: 5, kind: .zero)])
    }

    /// The raw source asks the real file system for holes (SEEK_DATA/SEEK_HOLE).
    @Test func sparseFileExtentsComeFromTheFileSystem() throws {
        let dir = try TempDir()
        let path = dir.file("sparse.raw")
        try Tool.run("truncate", ["-s", "64M", path])
        var rng = SeededRandom(seed: 9)
        try writeBytes(rng.bytes(1 << 20), to: path, at: 8 << 20)
        try writeBytes(rng.bytes(4096), to: path, at: 40 << 20)
        let src = try FileBlockSource(path: path)
        #expect(src.size == 64 << 20)
        let ext = try src.allExtents()
        let data = ext.filter { $0.kind == .data }
        let dataBytes = data.reduce(UInt64(0)) { $0 + $1.length }
        #expect(dataBytes >= (1 << 20) + 4096 && dataBytes <= 2 << 20, "data extents \(data)")
        #expect(data.contains { $0.offset <= 8 << 20 && $0.end >= 9 << 20 })
        #expect(data.contains { $0.offset <= 40 << 20 && $0.end >= (40 << 20) + 4096 })
        // Extents tile the file exactly.
        var pos: UInt64 = 0
        for e in ext { #expect(e.offset == pos); pos = e.end }
        #expect(pos == src.size)
        // A read past the end is an error, not a trap.
        var buf = [UInt8](repeating: 0, count: 10)
        #expect(throws: CairnError.self) { try buf.withUnsafeMutableBytes { try src.read(into: $0, at: src.size - 5) } }
    }

    @Test func sinkOverwritesExistingFileInPlace() throws {
        let dir = try TempDir()
        let path = dir.file("target")
        var rng = SeededRandom(seed: 1)
        try writeBytes(rng.bytes(3 * 65536), to: path, at: 0)
        let sink = try FileBlockSink(path: path, size: 3 * 65536, create: false)
        try sink.writeZeroes(at: 0, length: 65536)
        let data = rng.bytes(65536)
        try data.withUnsafeBytes { try sink.write($0, at: 65536) }
        try sink.writeZeroes(at: 2 * 65536, length: 65536)
        try sink.finish()
        let back = try readFile(path)
        #expect(back.count == 3 * 65536)
        #expect(back[0..<65536].allSatisfy { $0 == 0 })
        #expect(Array(back[65536..<131072]) == data)
        #expect(back[131072...].allSatisfy { $0 == 0 })
        // A new sink refuses to clobber an existing file.
        #expect(throws: CairnError.self) { _ = try FileBlockSink(path: path, size: 10, create: true) }
    }
}
