import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Helpers shared by the VHD and VHDX tests: qemu-img makes the images and is the referee.
enum VHDFixture {
    /// Converts `raw` with `qemu-img convert -O format -o options`.
    static func convert(_ raw: String, to img: String, format: String, options: String) throws {
        try Fixture.qemuImg(["convert", "-f", "raw", "-O", format, "-o", options, raw, img])
    }

    /// The raw contents of `img` according to qemu-img (`-f` is needed for fixed VHDs).
    static func referee(_ img: String, format: String, in dir: TempDir) throws -> [UInt8] {
        let out = dir.file("referee-\(UUID().uuidString.prefix(8)).raw")
        try Fixture.qemuImg(["convert", "-f", format, "-O", "raw", img, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try readFile(out)
    }

    static func put32LE(_ value: UInt32, at offset: Int, in bytes: inout [UInt8]) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    static func put64LE(_ value: UInt64, at offset: Int, in bytes: inout [UInt8]) {
        for i in 0..<8 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    static func get32LE(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(bytes[offset + $1]) << (8 * $1) }
    }

    static func get64LE(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        (0..<8).reduce(0) { $0 | UInt64(bytes[offset + $1]) << (8 * $1) }
    }

    /// Recomputes the VHD footer checksum at `offset`.
    static func fixVHDFooter(_ bytes: inout [UInt8], at offset: Int) {
        let sum = VHD.checksum(bytes[offset..<offset + 512], checksumOffset: 64)
        Fixture.put(sum, at: offset + 64, in: &bytes)
    }

    /// Recomputes the VHD dynamic header checksum at `offset`.
    static func fixVHDHeader(_ bytes: inout [UInt8], at offset: Int) {
        let sum = VHD.checksum(bytes[offset..<offset + 1024], checksumOffset: 36)
        Fixture.put(sum, at: offset + 36, in: &bytes)
    }

    /// Recomputes the CRC-32C of a VHDX header or region table at `offset` (`length` bytes).
    static func fixVHDXChecksum(_ bytes: inout [UInt8], at offset: Int, length: Int) {
        let crc = CRC32C.checksum(Array(bytes[offset..<offset + length]), zeroingFieldAt: 4)
        put32LE(crc, at: offset + 4, in: &bytes)
    }

    /// Bytes of a small dynamic VHD (2 MiB blocks) made by qemu-img from a pattern.
    static func dynamicVHD(size: Int = 5 << 20, seed: UInt64 = 5, subformat: String = "dynamic") throws -> [UInt8] {
        let dir = try TempDir("vhd-fixture")
        defer { withExtendedLifetime(dir) {} }
        let raw = dir.file("s.raw"), img = dir.file("s.vhd")
        try Fixture.writeFile(Fixture.pattern(size: size, seed: seed, segments: 12), to: raw)
        try convert(raw, to: img, format: "vpc", options: "subformat=\(subformat),force_size=on")
        return try readFile(img)
    }
}

@Suite("VHD reading")
struct VHDReadTests {
    static func open(_ path: String, parent: (any BlockSource)? = nil) throws -> VHDImage {
        try VHDImage(file: FileBlockSource(path: path), parent: parent)
    }

    @Test("qemu-img vpc images read like qemu-img convert -O raw",
          arguments: [("dynamic", false), ("fixed", false), ("dynamic", true), ("fixed", true)])
    func qemuImages(subformat: String, forceSize: Bool) throws {
        let dir = try TempDir("vhd-read")
        defer { withExtendedLifetime(dir) {} }
        for (size, seed) in [(3_000_001, UInt64(1)), (6 << 20, 2), (4_194_816, 3)] {
            let raw = dir.file("src-\(size).raw"), img = dir.file("img-\(size)-\(subformat).vhd")
            try Fixture.writeFile(Fixture.pattern(size: size, seed: seed), to: raw)
            try VHDFixture.convert(raw, to: img, format: "vpc", options: "subformat=\(subformat),force_size=\(forceSize ? "on" : "off")")
            let expected = try VHDFixture.referee(img, format: "vpc", in: dir)
            let image = try Self.open(img)
            #expect(image.isFixed == (subformat == "fixed"))
            #expect(!image.isDifferencing)
            // qemu (creator "qemu") rounds the size up to the CHS geometry, and writes that
            // size as current_size; with force_size it keeps the (sector-rounded) size.
            #expect(image.size == UInt64(expected.count), "size \(image.size) vs qemu \(expected.count)")
            if forceSize { #expect(image.size == UInt64((size + 511) / 512 * 512)) }
            try Fixture.verify(image, equals: expected, seed: UInt64(size))
            if subformat == "dynamic" {
                // qemu-img map reports unused vpc blocks as present zeros; we say unallocated.
                let qemu = try Fixture.qemuMap(img).map { Extent(offset: $0.offset, length: $0.length, kind: $0.kind == .zero ? .unallocated : $0.kind) }
                #expect(try image.allExtents() == qemu.coalesced(), "extents differ from qemu-img map")
            }
        }
    }

    @Test("a dynamic image with written and discarded blocks")
    func qemuIOWrites() throws {
        let dir = try TempDir("vhd-io")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("io.vhd")
        try Fixture.qemuImg(["create", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", img, "9M"])
        try Fixture.qemuIO(img, ["write -P 0x11 0 4096", "write -P 0x22 3000000 100000", "write -P 0x33 8388096 512"], format: "vpc")
        let expected = try VHDFixture.referee(img, format: "vpc", in: dir)
        let image = try Self.open(img)
        try Fixture.verify(image, equals: expected)
        let extents = try image.allExtents()
        #expect(extents.first == Extent(offset: 0, length: 4 << 20, kind: .data))
        #expect(extents.contains(Extent(offset: 4 << 20, length: 2 << 20, kind: .unallocated)))
    }

    /// qemu cannot create vpc children (the vpc driver has no backing-file support), so the
    /// differencing disk is a qemu dynamic image turned into one by hand: disk type 4, a
    /// parent name, and sector bitmaps with some bits cleared.
    @Test("a differencing VHD reads through its parent, sector by sector")
    func differencing() throws {
        let dir = try TempDir("vhd-diff")
        defer { withExtendedLifetime(dir) {} }
        let size = 7 << 20
        let baseRaw = dir.file("base.raw"), base = dir.file("base.vhd")
        try Fixture.writeFile(Fixture.pattern(size: size, seed: 77), to: baseRaw)
        try VHDFixture.convert(baseRaw, to: base, format: "vpc", options: "subformat=dynamic,force_size=on")
        let parentBytes = try VHDFixture.referee(base, format: "vpc", in: dir)

        let child = dir.file("child.vhd")
        try Fixture.qemuImg(["create", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", child, "7M"])
        try Fixture.qemuIO(child, ["write -P 0x41 0 2M", "write -P 0x42 4194304 1M", "write -P 0x43 6291456 512"], format: "vpc")
        let childRaw = try VHDFixture.referee(child, format: "vpc", in: dir)

        var bytes = try readFile(child)
        let headerOffset = Int(Fixture.get64(bytes, at: 16))
        let tableOffset = Int(Fixture.get64(bytes, at: headerOffset + 16))
        // Disk type 4 in both footers, a parent name in the header.
        for footer in [0, bytes.count - 512] {
            Fixture.put(UInt32(4), at: footer + 60, in: &bytes)
            VHDFixture.fixVHDFooter(&bytes, at: footer)
        }
        let parentName = "base-image.vhd"
        for (i, unit) in parentName.utf16.enumerated() { Fixture.put(unit, at: headerOffset + 64 + 2 * i, in: &bytes) }
        VHDFixture.fixVHDHeader(&bytes, at: headerOffset)
        // Block 0: clear the bits of sectors 1, 2 and 100..<300 (those come from the parent).
        let block0 = Int(Fixture.get32(bytes, at: tableOffset)) * 512
        var cleared: Set<Int> = [1, 2]
        for s in 100..<300 { cleared.insert(s) }
        for s in cleared { bytes[block0 + s / 8] &= ~(0x80 >> UInt8(s % 8)) }
        let path = dir.file("diff.vhd")
        try Fixture.writeFile(bytes, to: path)

        var expected = parentBytes
        for blockIndex in 0..<(size / (2 << 20) + 1) {
            let entry = Fixture.get32(bytes, at: tableOffset + 4 * blockIndex)
            guard entry != 0xFFFF_FFFF else { continue }
            for s in 0..<4096 where blockIndex != 0 || !cleared.contains(s) {
                let at = blockIndex * (2 << 20) + s * 512
                guard at < size else { break }
                expected.replaceSubrange(at..<at + 512, with: childRaw[at..<at + 512])
            }
        }

        // Without the parent: a usage error naming the recorded parent.
        do {
            _ = try Self.open(path)
            Issue.record("a differencing VHD opened without its parent")
        } catch let error as CairnError {
            #expect(error.code == .usage)
            #expect(error.message.contains(parentName) && error.message.contains("--backing"), "\(error)")
        }
        let parent = try Self.open(base)
        let image = try Self.open(path, parent: parent)
        #expect(image.isDifferencing)
        #expect(image.parentName == parentName)
        try Fixture.verify(image, equals: expected)

        // A parent for a disk that has none is refused.
        #expect(throws: CairnError.self) { _ = try Self.open(base, parent: parent) }
    }

    @Test("a dynamic VHD with cleared bitmap bits reads zeros there")
    func dynamicBitmap() throws {
        var bytes = try VHDFixture.dynamicVHD(size: 3 << 20, seed: 9)
        let headerOffset = Int(Fixture.get64(bytes, at: 16))
        let tableOffset = Int(Fixture.get64(bytes, at: headerOffset + 16))
        let entry = Fixture.get32(bytes, at: tableOffset)
        try #require(entry != 0xFFFF_FFFF)
        let block0 = Int(entry) * 512
        bytes[block0] = 0x7F  // sector 0 absent
        let image = try VHDImage(file: MemoryBlockSource(bytes, name: "b.vhd"))
        let first = try image.readBytes(at: 0, count: 1024)
        #expect(first[0..<512].allSatisfy { $0 == 0 })
        let extents = try image.extents(in: 0..<1024)
        #expect(extents == [Extent(offset: 0, length: 512, kind: .unallocated), Extent(offset: 512, length: 512, kind: .data)])
    }
}
