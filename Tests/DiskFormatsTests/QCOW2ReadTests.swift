import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// An image made by `qemu-img convert` from a raw pattern.
struct ConvertCase: Sendable, CustomStringConvertible {
    var compat: String
    var clusterSize: Int
    var compression: String?  // nil = not compressed; "zlib" or "zstd"

    var description: String { "compat=\(compat) cluster_size=\(clusterSize)\(compression.map { " -c \($0)" } ?? "")" }

    var options: String {
        var o = "compat=\(compat),cluster_size=\(clusterSize)"
        if let compression, compat == "1.1" { o += ",compression_type=\(compression)" }
        return o
    }
}

@Suite("qcow2 reading")
struct QCOW2ReadTests {
    static let sizes = [3_000_064, 5 * 1024 * 1024 + 12345]

    @Test("round trip of qemu-img convert output", arguments: [
        ConvertCase(compat: "0.10", clusterSize: 512),
        ConvertCase(compat: "0.10", clusterSize: 65536),
        ConvertCase(compat: "1.1", clusterSize: 512),
        ConvertCase(compat: "1.1", clusterSize: 4096),
        ConvertCase(compat: "1.1", clusterSize: 65536),
        ConvertCase(compat: "1.1", clusterSize: 2 << 20),
        ConvertCase(compat: "0.10", clusterSize: 65536, compression: "zlib"),
        ConvertCase(compat: "1.1", clusterSize: 65536, compression: "zlib"),
        ConvertCase(compat: "1.1", clusterSize: 65536, compression: "zstd"),
        ConvertCase(compat: "1.1", clusterSize: 4096, compression: "zstd"),
        ConvertCase(compat: "1.1", clusterSize: 512, compression: "zlib"),
        ConvertCase(compat: "1.1", clusterSize: 2 << 20, compression: "zstd"),
    ])
    func convertRoundTrip(_ c: ConvertCase) throws {
        let dir = try TempDir("qcow2-read")
        defer { withExtendedLifetime(dir) {} }
        for (i, size) in Self.sizes.enumerated() {
            let raw = dir.file("src\(i).raw"), img = dir.file("img\(i).qcow2")
            try Fixture.writeFile(Fixture.pattern(size: size, seed: UInt64(size)), to: raw)
            var args = ["convert", "-f", "raw", "-O", "qcow2", "-o", c.options]
            if c.compression != nil { args.append("-c") }
            try Fixture.qemuImg(args + [raw, img])

            let image = try Fixture.open(img)
            #expect(image.header.version == (c.compat == "1.1" ? 3 : 2))
            #expect(image.header.clusterSize == c.clusterSize)
            #expect(image.header.compressionType == (c.compression == "zstd" ? .zstd : .deflate))
            #expect(image.backingFileName == nil)
            #expect(image.size % 512 == 0 && image.size >= UInt64(size))
            let expected = try Fixture.referee(img, in: dir)
            try Fixture.verify(image, equals: expected, qemuMapOf: img)
            // Holes in the pattern stay unallocated (big clusters all hold some data).
            if c.clusterSize <= 65536 {
                #expect(try image.allExtents().contains { $0.kind == .unallocated })
            }
        }
    }

    @Test("compressed clusters are really compressed and decode", arguments: ["zlib", "zstd"])
    func compressedClustersPresent(_ type: String) throws {
        let dir = try TempDir("qcow2-comp")
        defer { withExtendedLifetime(dir) {} }
        // Fully compressible content: every cluster is stored compressed.
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i / 7 + i % 13) }
        let raw = dir.file("c.raw"), img = dir.file("c.qcow2")
        try Fixture.writeFile(bytes, to: raw)
        try Fixture.qemuImg(["convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type),cluster_size=65536", raw, img])
        let fileSize = try FileBlockSource(path: img).size
        #expect(fileSize < 600_000, "image should be compressed (\(fileSize) bytes)")
        let image = try Fixture.open(img)
        #expect(Fixture.difference(try Fixture.readAll(image), bytes) == nil)
        #expect(try image.allExtents() == [Extent(offset: 0, length: 1 << 20, kind: .data)])
        try Fixture.verify(image, equals: bytes, qemuMapOf: img)
    }

    @Test("zero clusters written with qemu-io write -z")
    func zeroClusters() throws {
        let dir = try TempDir("qcow2-zero")
        defer { withExtendedLifetime(dir) {} }
        let size = 3_000_064
        let raw = dir.file("z.raw"), img = dir.file("z.qcow2")
        try Fixture.writeFile([UInt8](repeating: 0x6B, count: size), to: raw)
        try Fixture.qemuImg(["convert", "-O", "qcow2", "-o", "compat=1.1,cluster_size=65536", raw, img])
        try Fixture.qemuIO(img, ["write -z 65536 131072", "write -z 1048576 65536", "write -z 300000 5000", "write -P 0x33 1114112 4096"])
        let image = try Fixture.open(img)
        let expected = try Fixture.referee(img, in: dir)
        try Fixture.verify(image, equals: expected, qemuMapOf: img)
        let extents = try image.allExtents()
        #expect(extents.contains(Extent(offset: 65536, length: 131072, kind: .zero)))
        #expect(extents.contains(Extent(offset: 1048576, length: 65536, kind: .zero)))
        // An unaligned zero write inside a data cluster stays data.
        #expect(try image.extents(in: 300000..<305000) == [Extent(offset: 300000, length: 5000, kind: .data)])
    }

    @Test("version 2 zero writes and preallocated metadata")
    func preallocatedMetadata() throws {
        let dir = try TempDir("qcow2-prealloc")
        defer { withExtendedLifetime(dir) {} }
        for compat in ["0.10", "1.1"] {
            let img = dir.file("p\(compat).qcow2")
            try Fixture.qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat),preallocation=metadata", img, "3000064"])
            try Fixture.qemuIO(img, ["write -P 0x44 70000 200000", "write -z 0 65536"])
            let image = try Fixture.open(img)
            try Fixture.verify(image, equals: try Fixture.referee(img, in: dir), qemuMapOf: img)
        }
    }

    @Test("internal snapshots are ignored: the active L1 table is read")
    func internalSnapshot() throws {
        let dir = try TempDir("qcow2-snap")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("s.qcow2")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "2M"])
        try Fixture.qemuIO(img, ["write -P 0x01 0 1M"])
        try Fixture.qemuImg(["snapshot", "-c", "before", img])
        // Clusters shared with the snapshot (refcount 2, no copied flag) and rewritten ones.
        try Fixture.qemuIO(img, ["write -P 0x02 4096 8192", "write -z 65536 65536", "write -P 0x03 1500000 10000"])
        let image = try Fixture.open(img)
        #expect(image.header.nbSnapshots == 1)
        try Fixture.verify(image, equals: try Fixture.referee(img, in: dir), qemuMapOf: img)
    }

    @Test("backing chain read with the backing image given explicitly")
    func backingChain() throws {
        let dir = try TempDir("qcow2-chain")
        defer { withExtendedLifetime(dir) {} }
        let baseRaw = dir.file("base.raw"), base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try Fixture.writeFile(Fixture.pattern(size: 3_000_064, seed: 99), to: baseRaw)
        try Fixture.qemuImg(["convert", "-O", "qcow2", "-o", "cluster_size=65536", baseRaw, base])
        // The top is larger than the base: reads past the base's end are zeros.
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "cluster_size=65536", top, "\(5 * 1024 * 1024 + 12345)"])
        try Fixture.qemuIO(top, [
            "write -P 0x5a 12345 70000",       // partial clusters: copy-on-write from the base
            "write -z 262144 131072",          // zero clusters hiding base data
            "write -P 0x77 2900000 400000",    // across the end of the base
            "write -P 0x12 4194304 65536",
        ])
        let baseImage = try Fixture.open(base)
        let image = try Fixture.open(top, backing: baseImage)
        #expect(image.backingFileName == base)
        #expect(image.header.backingFormat == "qcow2")
        try Fixture.verify(image, equals: try Fixture.referee(top, in: dir), qemuMapOf: top)

        // Raw backing file.
        let top2 = dir.file("top2.qcow2")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", "-b", baseRaw, "-F", "raw", top2, "4M"])
        try Fixture.qemuIO(top2, ["write -P 0x21 1000 3000", "write -z 1048576 65536"])
        let image2 = try Fixture.open(top2, backing: try FileBlockSource(path: baseRaw))
        try Fixture.verify(image2, equals: try Fixture.referee(top2, in: dir))
    }

    @Test("a recorded backing file must be named explicitly")
    func backingRequired() throws {
        let dir = try TempDir("qcow2-nobacking")
        defer { withExtendedLifetime(dir) {} }
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", base, "1M"])
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M"])
        let error = #expect(throws: CairnError.self) { try Fixture.open(top) }
        #expect(error?.code == .usage)
        #expect(error?.message.contains("'\(base)'") == true)
        #expect(error?.message.contains("--backing") == true)

        // And the reverse: a backing image for an image that records none.
        let extra = #expect(throws: CairnError.self) { try Fixture.open(base, backing: try FileBlockSource(path: top)) }
        #expect(extra?.code == .usage)
    }

    @Test("extents of a large sparse image are fast and exact")
    func largeSparse() throws {
        let dir = try TempDir("qcow2-sparse")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("big.qcow2")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", img, "1T"])
        try Fixture.qemuIO(img, ["write -P 1 0 4096", "write -P 2 549755813888 65536", "write -z 1099511496704 131072"])
        let image = try Fixture.open(img)
        let clock = ContinuousClock()
        let start = clock.now
        let extents = try image.allExtents()
        #expect(clock.now - start < .seconds(2))
        #expect(extents == [
            Extent(offset: 0, length: 65536, kind: .data),
            Extent(offset: 65536, length: 549755813888 - 65536, kind: .unallocated),
            Extent(offset: 549755813888, length: 65536, kind: .data),
            Extent(offset: 549755813888 + 65536, length: 1099511496704 - 549755813888 - 65536, kind: .unallocated),
            Extent(offset: 1099511496704, length: 131072, kind: .zero),
        ])
        #expect(extents == (try Fixture.qemuMap(img)))
        #expect(try image.readBytes(at: 549755813888, count: 3) == [2, 2, 2])
        #expect(try image.readBytes(at: 1099511496704, count: 2) == [0, 0])
    }

    @Test("format detection")
    func detect() throws {
        let dir = try TempDir("qcow2-detect")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("d.qcow2"), raw = dir.file("d.raw"), tiny = dir.file("tiny.raw")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", img, "1M"])
        try Fixture.writeFile([UInt8](repeating: 7, count: 4096), to: raw)
        try Fixture.writeFile([0x51, 0x46], to: tiny)
        #expect(try ImageFormat.detect(FileBlockSource(path: img)) == .qcow2)
        #expect(try ImageFormat.detect(FileBlockSource(path: raw)) == .raw)
        #expect(try ImageFormat.detect(FileBlockSource(path: tiny)) == .raw)
        #expect(try ImageFormat.detect(MemoryBlockSource([])) == .raw)
    }

    @Test("a zero-size image")
    func emptyImage() throws {
        let dir = try TempDir("qcow2-empty")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("e.qcow2")
        try Fixture.qemuImg(["create", "-q", "-f", "qcow2", img, "0"])
        let image = try Fixture.open(img)
        #expect(image.size == 0)
        #expect(try image.allExtents().isEmpty)
        #expect(try image.readBytes(at: 0, count: 0).isEmpty)
    }

    @Test("the L2 cache evicts the least recently used table")
    func l2CacheEviction() {
        var cache = L2Cache(capacity: 2)
        let a = L2Table(entries: [1]), b = L2Table(entries: [2]), c = L2Table(entries: [3])
        cache.put(10, a)
        cache.put(20, b)
        #expect(cache.get(10) === a)  // 20 is now the oldest
        cache.put(30, c)
        #expect(cache.get(20) == nil)
        #expect(cache.get(10) === a)
        #expect(cache.get(30) === c)
    }
}
