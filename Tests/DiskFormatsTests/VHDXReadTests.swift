import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Finding things in a VHDX made by qemu-img (for hand edits).
struct VHDXLayout {
    var batOffset: Int
    var batLength: Int
    var metadataOffset: Int
    var blockSize: Int
    var fileParametersOffset: Int
    var virtualSizeOffset: Int

    init(_ bytes: [UInt8]) throws {
        let table = Int(VHDX.regionTable1Offset)
        let count = Int(VHDFixture.get32LE(bytes, at: table + 8))
        var bat: (Int, Int)?, meta: Int?
        for i in 0..<count {
            let base = table + 16 + i * 32
            let guid = Array(bytes[base..<base + 16])
            let offset = Int(VHDFixture.get64LE(bytes, at: base + 16))
            if guid == VHDX.batRegion.bytes { bat = (offset, Int(VHDFixture.get32LE(bytes, at: base + 24))) }
            if guid == VHDX.metadataRegion.bytes { meta = offset }
        }
        guard let bat, let meta else { throw CairnError(.malformedImage, "no BAT/metadata region in fixture") }
        batOffset = bat.0
        batLength = bat.1
        metadataOffset = meta
        let entries = Int(bytes[meta + 10]) | Int(bytes[meta + 11]) << 8
        var params: Int?, virtualSize: Int?
        for i in 0..<entries {
            let base = meta + 32 + i * 32
            let id = Array(bytes[base..<base + 16])
            if id == VHDX.fileParameters.bytes { params = meta + Int(VHDFixture.get32LE(bytes, at: base + 16)) }
            if id == VHDX.virtualDiskSize.bytes { virtualSize = meta + Int(VHDFixture.get32LE(bytes, at: base + 16)) }
        }
        guard let params, let virtualSize else { throw CairnError(.malformedImage, "no file parameters or size in fixture") }
        fileParametersOffset = params
        virtualSizeOffset = virtualSize
        blockSize = Int(VHDFixture.get32LE(bytes, at: params))
    }

    var chunkRatio: Int { (1 << 23) * 512 / blockSize }

    func batEntry(_ bytes: [UInt8], block: Int) -> UInt64 {
        VHDFixture.get64LE(bytes, at: batOffset + 8 * (block + block / chunkRatio))
    }
}

@Suite("VHDX reading")
struct VHDXReadTests {
    static func open(_ path: String, parent: (any BlockSource)? = nil) throws -> VHDXImage {
        try VHDXImage(file: FileBlockSource(path: path), parent: parent)
    }

    @Test("qemu-img vhdx images read like qemu-img convert -O raw",
          arguments: ["dynamic", "fixed"], ["1M", "8M", "32M"])
    func qemuImages(subformat: String, blockSize: String) throws {
        let dir = try TempDir("vhdx-read")
        defer { withExtendedLifetime(dir) {} }
        for (size, seed) in [(3_000_001, UInt64(1)), (9 << 20, 2)] {
            let raw = dir.file("src.raw"), img = dir.file("img-\(size).vhdx")
            try Fixture.writeFile(Fixture.pattern(size: size, seed: seed), to: raw)
            try VHDFixture.convert(raw, to: img, format: "vhdx", options: "subformat=\(subformat),block_size=\(blockSize)")
            let expected = try VHDFixture.referee(img, format: "vhdx", in: dir)
            let image = try Self.open(img)
            #expect(image.size == UInt64(expected.count))
            #expect(image.blockSize == UInt64(blockSize.dropLast())! << 20)
            #expect(!image.isDifferencing)
            try Fixture.verify(image, equals: expected, seed: seed)
        }
    }

    @Test("a dynamic VHDX written by qemu-io (log used and flushed) reads fine")
    func qemuIOWrites() throws {
        let dir = try TempDir("vhdx-io")
        defer { withExtendedLifetime(dir) {} }
        let img = dir.file("io.vhdx")
        try Fixture.qemuImg(["create", "-f", "vhdx", "-o", "block_size=1M", img, "6M"])
        try Fixture.qemuIO(img, ["write -P 0x11 0 4096", "write -P 0x22 3000000 100000", "write -z 4M 1M", "write -P 0x33 6290944 512"],
                           format: "vhdx")
        let expected = try VHDFixture.referee(img, format: "vhdx", in: dir)
        let image = try Self.open(img)
        try Fixture.verify(image, equals: expected)
        let extents = try image.allExtents()
        #expect(extents.first == Extent(offset: 0, length: 1 << 20, kind: .data))
    }

    /// qemu cannot create or read differencing VHDX images, so this one is a qemu dynamic
    /// image turned into one by hand: the has-parent flag, a parent locator, a sector bitmap
    /// block, and BAT entries changed to PARTIALLY_PRESENT / NOT_PRESENT.
    static func makeDifferencing(_ original: [UInt8], parentPath: String, partial: [Int: [Range<Int>]], notPresent: Set<Int>) throws -> [UInt8] {
        var bytes = original
        let layout = try VHDXLayout(bytes)
        // Has-parent flag.
        bytes[layout.fileParametersOffset + 4] |= 2
        // Parent locator item at 512 KiB into the metadata region.
        let meta = layout.metadataOffset
        let count = Int(bytes[meta + 10]) | Int(bytes[meta + 11]) << 8
        func utf16(_ s: String) -> [UInt8] { s.utf16.flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] } }
        let pairs = [("parent_linkage", "{00000000-0000-0000-0000-000000000000}"), ("relative_path", parentPath)]
        var item = VHDX.parentLocatorType.bytes + [0, 0, UInt8(pairs.count), 0]
        var strings: [UInt8] = []
        let stringsStart = 20 + 12 * pairs.count
        for (k, v) in pairs {
            let key = utf16(k), value = utf16(v)
            var entry = [UInt8](repeating: 0, count: 12)
            VHDFixture.put32LE(UInt32(stringsStart + strings.count), at: 0, in: &entry)
            VHDFixture.put32LE(UInt32(stringsStart + strings.count + key.count), at: 4, in: &entry)
            entry[8] = UInt8(key.count); entry[10] = UInt8(value.count)
            item += entry
            strings += key + value
        }
        item += strings
        let itemOffset = 512 << 10
        bytes.replaceSubrange(meta + itemOffset..<meta + itemOffset + item.count, with: item)
        let entry = meta + 32 + count * 32
        bytes.replaceSubrange(entry..<entry + 16, with: VHDX.parentLocator.bytes)
        VHDFixture.put32LE(UInt32(itemOffset), at: entry + 16, in: &bytes)
        VHDFixture.put32LE(UInt32(item.count), at: entry + 20, in: &bytes)
        VHDFixture.put32LE(4, at: entry + 24, in: &bytes)
        bytes[meta + 10] = UInt8((count + 1) & 0xFF)
        bytes[meta + 11] = UInt8((count + 1) >> 8)

        // A sector bitmap block for chunk 0, appended 1 MiB aligned.
        let sb = (bytes.count + (1 << 20) - 1) / (1 << 20) * (1 << 20)
        bytes += [UInt8](repeating: 0, count: sb + (1 << 20) - bytes.count)
        let sectorsPerBlock = layout.blockSize / 512
        for (block, ranges) in partial {
            let at = layout.batOffset + 8 * block
            let e = VHDFixture.get64LE(bytes, at: at)
            VHDFixture.put64LE(e & ~7 | 7, at: at, in: &bytes)
            for r in ranges {
                for s in r {
                    let bit = block * sectorsPerBlock + s
                    bytes[sb + bit / 8] |= 1 << UInt8(bit % 8)
                }
            }
        }
        for block in notPresent { VHDFixture.put64LE(0, at: layout.batOffset + 8 * block, in: &bytes) }
        // qemu marks untouched blocks ZERO; in a differencing disk they must be NOT_PRESENT
        // to come from the parent (as Hyper-V writes them).
        for block in 0..<layout.chunkRatio where layout.batEntry(bytes, block: block) & 7 == 2 {
            VHDFixture.put64LE(0, at: layout.batOffset + 8 * block, in: &bytes)
        }
        VHDFixture.put64LE(UInt64(sb) | 6, at: layout.batOffset + 8 * layout.chunkRatio, in: &bytes)
        return bytes
    }

    @Test("a differencing VHDX reads through its parent, sector by sector")
    func differencing() throws {
        let dir = try TempDir("vhdx-diff")
        defer { withExtendedLifetime(dir) {} }
        let size = 6 << 20
        let baseRaw = dir.file("base.raw"), base = dir.file("base.vhdx")
        try Fixture.writeFile(Fixture.pattern(size: size, seed: 31), to: baseRaw)
        try VHDFixture.convert(baseRaw, to: base, format: "vhdx", options: "subformat=dynamic,block_size=1M")
        let parentBytes = try VHDFixture.referee(base, format: "vhdx", in: dir)

        let child = dir.file("child.vhdx")
        try Fixture.qemuImg(["create", "-f", "vhdx", "-o", "block_size=1M", child, "6M"])
        try Fixture.qemuIO(child, ["write -P 0x51 0 1M", "write -P 0x52 1M 1M", "write -P 0x53 3M 4k", "write -P 0x54 5M 512"], format: "vhdx")
        let childRaw = try VHDFixture.referee(child, format: "vhdx", in: dir)

        let partial: [Int: [Range<Int>]] = [0: [0..<100, 1000..<1001], 5: [0..<1]]
        let bytes = try Self.makeDifferencing(try readFile(child), parentPath: "..\\base.vhdx", partial: partial, notPresent: [1])
        let path = dir.file("diff.vhdx")
        try Fixture.writeFile(bytes, to: path)

        let layout = try VHDXLayout(bytes)
        var expected = parentBytes
        for block in 0..<(size >> 20) {
            let state = layout.batEntry(bytes, block: block) & 7
            for s in 0..<2048 {
                let fromChild: Bool
                switch state {
                case 6: fromChild = true
                case 7: fromChild = partial[block, default: []].contains { $0.contains(s) }
                default: fromChild = false
                }
                if fromChild {
                    let at = (block << 20) + s * 512
                    expected.replaceSubrange(at..<at + 512, with: childRaw[at..<at + 512])
                }
            }
        }

        do {
            _ = try Self.open(path)
            Issue.record("a differencing VHDX opened without its parent")
        } catch let error as CairnError {
            #expect(error.code == .usage)
            #expect(error.message.contains("..\\base.vhdx") && error.message.contains("--backing"), "\(error)")
        }
        let image = try Self.open(path, parent: try Self.open(base))
        #expect(image.isDifferencing)
        #expect(image.parentPath == "..\\base.vhdx")
        try Fixture.verify(image, equals: expected)
        // A raw parent works as well.
        let rawParent = try Self.open(path, parent: FileBlockSource(path: baseRaw))
        #expect(try Fixture.readAll(rawParent) == expected)
        #expect(throws: CairnError.self) { _ = try Self.open(base, parent: rawParent) }
    }
}

@Suite("CRC-32C")
struct CRC32CTests {
    /// One bit at a time, straight from the polynomial: the reference for the sliced version.
    static func bitwise(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes {
            c ^= UInt32(b)
            for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        }
        return ~c
    }

    @Test("the check value and every length and alignment agree with the bitwise definition")
    func matchesDefinition() {
        #expect(CRC32C.checksum(Array("123456789".utf8)[...]) == 0xE306_9283)
        var rng = SeededRandom(seed: 7)
        let data = (0..<300).map { _ in UInt8.random(in: 0...255, using: &rng) }
        for start in 0..<9 {
            for end in stride(from: start, through: data.count, by: 7) {
                #expect(CRC32C.checksum(data[start..<end]) == Self.bitwise(Array(data[start..<end])))
            }
        }
        for field in [0, 3, 4, 100, 296, 298] {
            var zeroed = data
            for k in field..<min(field + 4, data.count) { zeroed[k] = 0 }
            #expect(CRC32C.checksum(data, zeroingFieldAt: field) == Self.bitwise(zeroed))
        }
    }
}
