import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

@Suite("VMDK reading")
struct VMDKReadTests {
    struct Case: Sendable, CustomStringConvertible {
        var subformat: String
        var size: Int
        var options: [String] = []
        var description: String { "\(subformat) \(size) \(options.joined(separator: ","))" }
    }

    static let cases: [Case] = [
        Case(subformat: "monolithicSparse", size: 3_000_064),
        Case(subformat: "monolithicSparse", size: (5 << 20) + 512, options: ["zeroed_grain=on"]),
        Case(subformat: "monolithicSparse", size: 40 << 20, options: ["adapter_type=lsilogic"]),
        Case(subformat: "streamOptimized", size: 3_000_064),
        Case(subformat: "streamOptimized", size: (5 << 20) + 512),
        Case(subformat: "monolithicFlat", size: 3_000_064),
        Case(subformat: "monolithicFlat", size: (5 << 20) + 512),
        Case(subformat: "twoGbMaxExtentSparse", size: 3_000_064),
        Case(subformat: "twoGbMaxExtentSparse", size: (5 << 20) + 512, options: ["zeroed_grain=on"]),
        Case(subformat: "twoGbMaxExtentFlat", size: (5 << 20) + 512),
    ]

    /// qemu-img converts a raw pattern to the subformat; our reader must match
    /// `qemu-img convert -O raw` byte for byte, and the extents must be consistent with it.
    @Test("reads what qemu-img wrote", arguments: cases)
    func readsQemuImages(_ c: Case) throws {
        let dir = try TempDir("vmdk-read")
        let raw = dir.file("src.raw")
        try Fixture.writeFile(Fixture.pattern(size: c.size, seed: UInt64(c.size) ^ 0x5EED), to: raw)
        let img = dir.file("disk.vmdk")
        let opts = (["subformat=\(c.subformat)"] + c.options).joined(separator: ",")
        try Fixture.qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", opts, raw, img])
        let expected = try Fixture.referee(img, in: dir)
        #expect(expected.count == (c.size + 511) / 512 * 512)

        let image = try VMDKFixture.open(img)
        #expect(image.createType == c.subformat)
        try Fixture.verify(image, equals: expected)
        let extents = try image.allExtents()
        #expect(extents.contains { $0.kind != .data }, "a patterned disk has holes: \(extents.prefix(5))")
    }

    @Test("zeroed grains read as zeros and are reported .zero")
    func zeroedGrains() throws {
        let dir = try TempDir("vmdk-zeroed")
        let img = dir.file("z.vmdk")
        try Fixture.qemuImg(["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "4M"])
        try Fixture.qemuIO(img, ["write -P 0x55 0 1M", "write -z 128k 128k", "write -P 0x66 2M 64k"], format: "vmdk")
        let expected = try Fixture.referee(img, in: dir)
        let image = try VMDKFixture.open(img)
        try Fixture.verify(image, equals: expected)
        let extents = try image.allExtents()
        #expect(extents.contains(Extent(offset: 128 << 10, length: 128 << 10, kind: .zero)), "\(extents)")
        #expect(extents.first == Extent(offset: 0, length: 128 << 10, kind: .data), "\(extents)")
    }

    /// Several extents of different kinds behind one descriptor: a flat file with an offset, a
    /// sparse extent made by qemu-img, a ZERO extent, a VMFS extent.
    @Test("hand-made multi-extent descriptor")
    func multiExtent() throws {
        let dir = try TempDir("vmdk-multi")
        let flatData = Fixture.pattern(size: 1 << 20, seed: 11)
        var flatFile = [UInt8](repeating: 0xEE, count: 4096)  // 8 sectors skipped by the offset
        flatFile += flatData
        try Fixture.writeFile(flatFile, to: dir.file("a-flat.vmdk"))

        let sparseRaw = dir.file("b.raw")
        let sparseData = Fixture.pattern(size: 2 << 20, seed: 12)
        try Fixture.writeFile(sparseData, to: sparseRaw)
        try Fixture.qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", sparseRaw, dir.file("b.vmdk")])
        let vmfsData = Fixture.pattern(size: 512 * 1000, seed: 13)
        try Fixture.writeFile(vmfsData, to: dir.file("c-flat.vmdk"))

        let descriptor = """
        # Disk DescriptorFile
        version=1
        CID=fffffffe
        parentCID=ffffffff
        createType="twoGbMaxExtentFlat"

        # Extent description
        RW 2048 FLAT "a-flat.vmdk" 8
        RDONLY 4096 SPARSE "b.vmdk"
        RW 300 ZERO
        RW 1000 VMFS "c-flat.vmdk"

        # The Disk Data Base
        #DDB
        ddb.adapterType = "lsilogic"
        """
        let path = dir.file("multi.vmdk")
        try Fixture.writeFile(Array(descriptor.utf8), to: path)
        let calls = Locked<[String]>([])
        let image = try VMDKFixture.open(path, calls: calls)
        #expect(calls.withLock { $0 } == ["a-flat.vmdk", "b.vmdk", "c-flat.vmdk"])
        #expect(image.extentCount == 4)
        let expected = flatData + sparseData + [UInt8](repeating: 0, count: 300 * 512) + vmfsData
        try Fixture.verify(image, equals: expected)
        let extents = try image.allExtents()
        #expect(extents.contains { $0.kind == .zero && $0.offset <= UInt64(3 << 20) && $0.end >= UInt64(3 << 20) + 300 * 512 })
    }

    /// Disks larger than 2 GiB as twoGbMaxExtent*: several extent files; only the data
    /// extents are read.
    @Test("twoGbMaxExtent with several extent files", arguments: ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
    func severalExtentFiles(subformat: String) throws {
        let dir = try TempDir("vmdk-2gb")
        let img = dir.file("big.vmdk")
        try Fixture.qemuImg(["create", "-q", "-f", "vmdk", "-o", "subformat=\(subformat)", img, "5G"])
        let writes: [(UInt64, UInt8)] = [(0, 0x11), ((2 << 30) - 4096, 0x22), ((4 << 30) + 12345 * 512, 0x33), ((5 << 30) - 65536, 0x44)]
        try Fixture.qemuIO(img, writes.map { "write -P \($0.1) \($0.0) 64k" }, format: "vmdk")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0 != "big.vmdk" }
        #expect(files.count >= 3, "\(files)")

        let image = try VMDKFixture.open(img)
        #expect(image.size == 5 << 30)
        #expect(image.extentCount == files.count)
        let extents = try image.allExtents()
        var pos: UInt64 = 0
        var dataBytes: UInt64 = 0
        for e in extents {
            #expect(e.offset == pos)
            pos = e.end
            if e.kind == .data { dataBytes += e.length }
        }
        #expect(pos == image.size)
        #expect(dataBytes < 64 << 20, "only the written grains are data: \(dataBytes)")
        for (offset, byte) in writes {
            let got = try image.readBytes(at: offset, count: 65536)
            #expect(got.allSatisfy { $0 == byte }, "read at \(offset)")
            #expect(extents.contains { $0.kind == .data && $0.offset <= offset && $0.end >= offset + 65536 }, "data at \(offset)")
        }
        // Reads across extent boundaries (2 GiB) match the pattern around them.
        let across = try image.readBytes(at: (2 << 30) - 8192, count: 16384)
        #expect(across[0..<4096].allSatisfy { $0 == 0 })
        #expect(across[4096..<8192].allSatisfy { $0 == 0x22 })
        #expect(across[8192...].allSatisfy { $0 == 0x22 })
    }
}
