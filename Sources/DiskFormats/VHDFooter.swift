import CairnCore

/// Magic numbers, limits and field offsets of the VHD format (Microsoft "Virtual Hard Disk
/// Image Format Specification"; QEMU calls it "vpc"), in one place. All numbers big-endian.
enum VHD {
    static let sectorSize: UInt64 = 512
    static let footerSize = 512
    static let dynamicHeaderSize = 1024

    static let footerCookie: [UInt8] = Array("conectix".utf8)
    static let dynamicCookie: [UInt8] = Array("cxsparse".utf8)

    /// Footer `data_offset` of a fixed disk: all ones.
    static let noDataOffset: UInt64 = .max
    /// An unused BAT entry.
    static let unusedBATEntry: UInt32 = .max

    /// Disk types (footer bytes 60-63).
    enum DiskType: UInt32, Sendable {
        case fixed = 2
        case dynamic = 3
        case differencing = 4
    }

    /// Footer field offsets (512 bytes).
    enum Footer {
        static let cookie = 0
        static let features = 8
        static let formatVersion = 12
        static let dataOffset = 16
        static let timestamp = 24
        static let creatorApp = 28
        static let creatorVersion = 32
        static let creatorHostOS = 36
        static let originalSize = 40
        static let currentSize = 48
        static let geometry = 56
        static let diskType = 60
        static let checksum = 64
        static let uniqueID = 68
        static let savedState = 84
    }

    /// Dynamic disk header field offsets (1024 bytes).
    enum Header {
        static let cookie = 0
        static let dataOffset = 8
        static let tableOffset = 16
        static let headerVersion = 24
        static let maxTableEntries = 28
        static let blockSize = 32
        static let checksum = 36
        static let parentUniqueID = 40
        static let parentTimestamp = 56
        static let parentUnicodeName = 64
        static let parentUnicodeNameLength = 512
        static let parentLocators = 576
        static let parentLocatorCount = 8
        static let parentLocatorSize = 24
    }

    /// Block sizes we accept: powers of two from 512 bytes to 256 MiB (the spec's default and
    /// what every tool writes is 2 MiB).
    static let minBlockSize: UInt32 = 512
    static let maxBlockSize: UInt32 = 256 << 20
    /// The BAT may hold at most 64 MiB of entries (16 Mi blocks).
    static let maxBATBytes: UInt64 = 64 << 20
    /// Largest virtual size: BAT entries are 32-bit sector numbers, so a dynamic file cannot
    /// exceed 2 TiB; QEMU caps the disk at 2040 GiB (0xff000000 sectors). We accept up to
    /// 2 TiB when reading and write at most 2040 GiB.
    static let maxReadSize: UInt64 = 2 << 40
    static let maxWriteSize: UInt64 = 0xFF00_0000 * 512

    /// The creator application our writer records. QEMU derives the size from the CHS
    /// geometry for the creators "vpc " and "qemu" and from `current_size` for every other
    /// one; a creator of our own keeps `current_size` authoritative, as Hyper-V does.
    static let creatorApp: [UInt8] = Array("crn ".utf8)
    static let creatorHostOS: [UInt8] = Array("Wi2k".utf8)

    /// The ones' complement of the byte sum of `bytes`, skipping the 4-byte checksum field
    /// at `checksumOffset`.
    static func checksum(_ bytes: ArraySlice<UInt8>, checksumOffset: Int) -> UInt32 {
        var sum: UInt32 = 0
        let skip = bytes.startIndex + checksumOffset..<bytes.startIndex + checksumOffset + 4
        for i in bytes.indices where !skip.contains(i) { sum &+= UInt32(bytes[i]) }
        return ~sum
    }

    /// CHS geometry for `totalSectors` (the spec's appendix algorithm); sizes beyond the
    /// largest geometry get the largest one (65535/16/255).
    static func geometry(totalSectors: UInt64) -> (cylinders: UInt16, heads: UInt8, sectorsPerTrack: UInt8) {
        let total = min(totalSectors, 65535 * 16 * 255)
        var sectorsPerTrack: UInt64, heads: UInt64, cylinderTimesHeads: UInt64
        if total >= 65535 * 16 * 63 {
            sectorsPerTrack = 255
            heads = 16
            cylinderTimesHeads = total / sectorsPerTrack
        } else {
            sectorsPerTrack = 17
            cylinderTimesHeads = total / sectorsPerTrack
            heads = (cylinderTimesHeads + 1023) / 1024
            if heads < 4 { heads = 4 }
            if cylinderTimesHeads >= heads * 1024 || heads > 16 {
                sectorsPerTrack = 31
                heads = 16
                cylinderTimesHeads = total / sectorsPerTrack
            }
            if cylinderTimesHeads >= heads * 1024 {
                sectorsPerTrack = 63
                heads = 16
                cylinderTimesHeads = total / sectorsPerTrack
            }
        }
        let cylinders = min(cylinderTimesHeads / heads, 65535)
        return (UInt16(cylinders), UInt8(heads), UInt8(sectorsPerTrack))
    }
}

/// The 512-byte VHD footer (spec "Hard Disk Footer Format"): cookie "conectix" (0-7),
/// features (8), format version (12), data offset (16, 8 bytes), timestamp (24), creator
/// application (28), creator version (32), creator host OS (36), original size (40, 8),
/// current size (48, 8), disk geometry (56), disk type (60), checksum (64), unique id (68, 16),
/// saved state (84).
package struct VHDFooter: Sendable, Equatable {
    package var dataOffset: UInt64
    package var currentSize: UInt64
    package var diskType: UInt32
    package var creatorApp: String
    package var cylinders: UInt16
    package var heads: UInt8
    package var sectorsPerTrack: UInt8

    /// Parses and checks a footer (cookie and checksum). `copy` names it in messages.
    static func parse(_ raw: [UInt8], path: String, at offset: UInt64, copy: String) throws -> VHDFooter {
        let b = CheckedBytes(raw, order: .big)
        guard b.count >= VHD.footerSize, raw.starts(with: VHD.footerCookie) else {
            throw CairnError(.malformedImage, "VHD \(copy) does not start with the cookie \"conectix\"", path: path, offset: offset)
        }
        let stored = b.u32(at: VHD.Footer.checksum) ?? 0
        let computed = VHD.checksum(raw[0..<VHD.footerSize], checksumOffset: VHD.Footer.checksum)
        guard stored == computed else {
            throw CairnError(.malformedImage, "VHD \(copy) checksum mismatch (stored \(hex(UInt64(stored))), computed \(hex(UInt64(computed))))",
                             path: path, offset: offset + UInt64(VHD.Footer.checksum),
                             hint: "the image is damaged; try `qemu-img convert -f vpc` to see what QEMU makes of it")
        }
        let app = (b.slice(at: VHD.Footer.creatorApp, count: 4) ?? [])
        return VHDFooter(
            dataOffset: b.u64(at: VHD.Footer.dataOffset) ?? 0,
            currentSize: b.u64(at: VHD.Footer.currentSize) ?? 0,
            diskType: b.u32(at: VHD.Footer.diskType) ?? 0,
            creatorApp: String(decoding: app.map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }, as: UTF8.self),
            cylinders: UInt16(b.u8(at: VHD.Footer.geometry) ?? 0) << 8 | UInt16(b.u8(at: VHD.Footer.geometry + 1) ?? 0),
            heads: b.u8(at: VHD.Footer.geometry + 2) ?? 0,
            sectorsPerTrack: b.u8(at: VHD.Footer.geometry + 3) ?? 0)
    }

    /// Serializes a footer for our writer (checksum filled in).
    static func make(dataOffset: UInt64, size: UInt64, diskType: VHD.DiskType, timestamp: UInt32, uniqueID: [UInt8]) -> [UInt8] {
        var raw = [UInt8](repeating: 0, count: VHD.footerSize)
        // The spec's geometry when it expresses the size exactly; otherwise the largest one,
        // which QEMU (like Hyper-V) reads as "use current_size" whatever the creator.
        var geometry = VHD.geometry(totalSectors: size / VHD.sectorSize)
        if UInt64(geometry.cylinders) * UInt64(geometry.heads) * UInt64(geometry.sectorsPerTrack) * VHD.sectorSize != size {
            geometry = (65535, 16, 255)
        }
        raw.withUnsafeMutableBytes { f in
            for i in 0..<8 { f[i] = VHD.footerCookie[i] }
            f.storeBigEndian(UInt32(2), at: VHD.Footer.features)
            f.storeBigEndian(UInt32(0x0001_0000), at: VHD.Footer.formatVersion)
            f.storeBigEndian(dataOffset, at: VHD.Footer.dataOffset)
            f.storeBigEndian(timestamp, at: VHD.Footer.timestamp)
            for i in 0..<4 {
                f[VHD.Footer.creatorApp + i] = VHD.creatorApp[i]
                f[VHD.Footer.creatorHostOS + i] = VHD.creatorHostOS[i]
            }
            f.storeBigEndian(UInt32(0x0001_0000), at: VHD.Footer.creatorVersion)
            f.storeBigEndian(size, at: VHD.Footer.originalSize)
            f.storeBigEndian(size, at: VHD.Footer.currentSize)
            f.storeBigEndian(geometry.cylinders, at: VHD.Footer.geometry)
            f[VHD.Footer.geometry + 2] = geometry.heads
            f[VHD.Footer.geometry + 3] = geometry.sectorsPerTrack
            f.storeBigEndian(diskType.rawValue, at: VHD.Footer.diskType)
            for i in 0..<min(16, uniqueID.count) { f[VHD.Footer.uniqueID + i] = uniqueID[i] }
        }
        let sum = VHD.checksum(raw[...], checksumOffset: VHD.Footer.checksum)
        raw.withUnsafeMutableBytes { $0.storeBigEndian(sum, at: VHD.Footer.checksum) }
        return raw
    }
}

/// The 1024-byte dynamic disk header (spec "Dynamic Disk Header Format"): cookie "cxsparse"
/// (0-7), data offset (8), table offset (16, the BAT), header version (24), max table entries
/// (28), block size (32), checksum (36), parent unique id (40, 16), parent timestamp (56),
/// parent unicode name (64, 512 bytes UTF-16BE), eight parent locators (576, 24 bytes each).
package struct VHDDynamicHeader: Sendable, Equatable {
    package var tableOffset: UInt64
    package var maxTableEntries: UInt32
    package var blockSize: UInt32
    /// The parent's name as recorded (differencing disks); empty if none.
    package var parentName: String
    /// Parent locator paths (UTF-16LE "W2ru"/"W2ku" or UTF-8 "Mac"/"MacX"), as recorded.
    package var parentLocatorPaths: [String]

    static func parse(_ raw: [UInt8], path: String, at offset: UInt64, fileSize: UInt64,
                      readLocator: (UInt64, Int) throws -> [UInt8]) throws -> VHDDynamicHeader {
        let b = CheckedBytes(raw, order: .big)
        guard b.count >= VHD.dynamicHeaderSize, raw.starts(with: VHD.dynamicCookie) else {
            throw CairnError(.malformedImage, "VHD dynamic disk header does not start with the cookie \"cxsparse\"", path: path, offset: offset)
        }
        let stored = b.u32(at: VHD.Header.checksum) ?? 0
        let computed = VHD.checksum(raw[0..<VHD.dynamicHeaderSize], checksumOffset: VHD.Header.checksum)
        guard stored == computed else {
            throw CairnError(.malformedImage, "VHD dynamic disk header checksum mismatch (stored \(hex(UInt64(stored))), computed \(hex(UInt64(computed))))",
                             path: path, offset: offset + UInt64(VHD.Header.checksum))
        }
        var units: [UInt16] = []
        var i = VHD.Header.parentUnicodeName
        while i + 1 < VHD.Header.parentUnicodeName + VHD.Header.parentUnicodeNameLength {
            let u = UInt16(raw[i]) << 8 | UInt16(raw[i + 1])
            if u == 0 { break }
            units.append(u)
            i += 2
        }
        var locators: [String] = []
        for n in 0..<VHD.Header.parentLocatorCount {
            let base = VHD.Header.parentLocators + n * VHD.Header.parentLocatorSize
            let code = b.u32(at: base) ?? 0
            let length = UInt64(b.u32(at: base + 8) ?? 0)
            let dataOffset = b.u64(at: base + 16) ?? 0
            guard code != 0, length > 0, length <= 4096, dataOffset < fileSize, length <= fileSize - dataOffset else { continue }
            let bytes = try readLocator(dataOffset, Int(length))
            let text: String
            if code == 0x5732_7275 || code == 0x5732_6B75 {  // "W2ru", "W2ku": UTF-16LE
                var le: [UInt16] = []
                var j = 0
                while j + 1 < bytes.count { le.append(UInt16(bytes[j]) | UInt16(bytes[j + 1]) << 8); j += 2 }
                text = String(decoding: le, as: UTF16.self)
            } else {
                text = String(decoding: bytes, as: UTF8.self)
            }
            if !text.isEmpty { locators.append(text) }
        }
        return VHDDynamicHeader(
            tableOffset: b.u64(at: VHD.Header.tableOffset) ?? 0,
            maxTableEntries: b.u32(at: VHD.Header.maxTableEntries) ?? 0,
            blockSize: b.u32(at: VHD.Header.blockSize) ?? 0,
            parentName: String(decoding: units, as: UTF16.self),
            parentLocatorPaths: locators)
    }

    /// Serializes a dynamic disk header for our writer (no parent; checksum filled in).
    static func make(tableOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) -> [UInt8] {
        var raw = [UInt8](repeating: 0, count: VHD.dynamicHeaderSize)
        raw.withUnsafeMutableBytes { h in
            for i in 0..<8 { h[i] = VHD.dynamicCookie[i] }
            h.storeBigEndian(VHD.noDataOffset, at: VHD.Header.dataOffset)
            h.storeBigEndian(tableOffset, at: VHD.Header.tableOffset)
            h.storeBigEndian(UInt32(0x0001_0000), at: VHD.Header.headerVersion)
            h.storeBigEndian(maxTableEntries, at: VHD.Header.maxTableEntries)
            h.storeBigEndian(blockSize, at: VHD.Header.blockSize)
        }
        let sum = VHD.checksum(raw[...], checksumOffset: VHD.Header.checksum)
        raw.withUnsafeMutableBytes { $0.storeBigEndian(sum, at: VHD.Header.checksum) }
        return raw
    }
}
