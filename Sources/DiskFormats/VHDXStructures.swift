import CairnCore

/// Magic numbers, GUIDs, limits and layouts of the VHDX format ([MS-VHDX]), in one place.
/// All on-disk numbers are little-endian; GUIDs are stored as Data1 (LE 32), Data2 (LE 16),
/// Data3 (LE 16), Data4 (8 bytes as written).
enum VHDX {
    static let kiB: UInt64 = 1024
    static let miB: UInt64 = 1 << 20

    /// The file type identifier at offset 0: "vhdxfile", then the creator (UTF-16LE, 512 bytes).
    static let fileSignature: [UInt8] = Array("vhdxfile".utf8)
    static let headerSignature: UInt32 = 0x6461_6568      // "head"
    static let regionSignature: UInt32 = 0x6967_6572      // "regi"
    static let metadataSignature: [UInt8] = Array("metadata".utf8)
    static let logEntrySignature: UInt32 = 0x6567_6F6C    // "loge"

    /// Two headers (4 KiB used of 64 KiB each) and two region tables (64 KiB each).
    static let header1Offset: UInt64 = 64 << 10
    static let header2Offset: UInt64 = 128 << 10
    static let headerSize = 4096
    static let regionTable1Offset: UInt64 = 192 << 10
    static let regionTable2Offset: UInt64 = 256 << 10
    static let regionTableSize = 64 << 10
    static let maxRegionEntries: UInt32 = 2047
    static let maxMetadataEntries: UInt16 = 2047
    static let metadataTableSize = 64 << 10

    /// Header fields: signature (0), checksum (4), sequence number (8), file write guid (16),
    /// data write guid (32), log guid (48), log version (64, u16), version (66, u16),
    /// log length (68, u32), log offset (72, u64).
    enum Header {
        static let checksum = 4
        static let sequenceNumber = 8
        static let fileWriteGUID = 16
        static let dataWriteGUID = 32
        static let logGUID = 48
        static let logVersion = 64
        static let version = 66
        static let logLength = 68
        static let logOffset = 72
    }

    /// Block sizes allowed by the spec: powers of two from 1 MiB to 256 MiB.
    static let minBlockSize: UInt32 = 1 << 20
    static let maxBlockSize: UInt32 = 256 << 20
    /// The spec's largest virtual disk: 64 TiB.
    static let maxVirtualSize: UInt64 = 64 << 40
    /// Sector bitmap blocks are 1 MiB and describe 2^23 sectors.
    static let sectorsPerBitmapBlock: UInt64 = 1 << 23

    /// BAT entry: state in bits 0-2, file offset in MiB in bits 20-63.
    static let batStateMask: UInt64 = 0x7
    static let batOffsetMask: UInt64 = 0xFFFF_FFFF_FFF0_0000

    enum PayloadState: UInt64 {
        case notPresent = 0
        case undefined = 1
        case zero = 2
        case unmapped = 3
        case fullyPresent = 6
        case partiallyPresent = 7
    }
    static let sectorBitmapPresent: UInt64 = 6

    /// File parameters flags.
    static let leaveBlocksAllocated: UInt32 = 1 << 0
    static let hasParent: UInt32 = 1 << 1
    /// Metadata entry flags.
    static let metadataIsUser: UInt32 = 1 << 0
    static let metadataIsVirtualDisk: UInt32 = 1 << 1
    static let metadataIsRequired: UInt32 = 1 << 2
    /// Region entry flag.
    static let regionRequired: UInt32 = 1 << 0

    // Region GUIDs.
    static let batRegion = GUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
    static let metadataRegion = GUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
    // Metadata item GUIDs.
    static let fileParameters = GUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    static let virtualDiskSize = GUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let page83Data = GUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
    static let logicalSectorSize = GUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    static let physicalSectorSize = GUID("CDA348C7-445D-4471-9CC9-E9885251C556")
    static let parentLocator = GUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
    /// The VHDX parent locator type.
    static let parentLocatorType = GUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

    /// A GUID in its on-disk (mixed-endian) byte order.
    struct GUID: Hashable, Sendable, CustomStringConvertible {
        var bytes: [UInt8]

        init(bytes: [UInt8]) { self.bytes = bytes }

        /// From the canonical text form (used only for the constants above).
        init(_ text: String) {
            let hexDigits = text.filter { $0 != "-" }.map { UInt8(String($0), radix: 16) ?? 0 }
            var raw: [UInt8] = []
            var i = 0
            while i + 1 < hexDigits.count { raw.append(hexDigits[i] << 4 | hexDigits[i + 1]); i += 2 }
            if raw.count < 16 { raw += [UInt8](repeating: 0, count: 16 - raw.count) }
            bytes = [raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6]] + Array(raw[8..<16])
        }

        var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

        static func random() -> GUID {
            var rng = SystemRandomNumberGenerator()
            var b = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
            b[7] = b[7] & 0x0F | 0x40  // version 4 (Data3's high nibble, stored little-endian)
            b[8] = b[8] & 0x3F | 0x80
            return GUID(bytes: b)
        }

        var description: String {
            func h(_ r: [UInt8]) -> String { r.map { String($0, radix: 16).uppercased().leftPadded(2) }.joined() }
            let b = bytes.count == 16 ? bytes : [UInt8](repeating: 0, count: 16)
            return "\(h([b[3], b[2], b[1], b[0]]))-\(h([b[5], b[4]]))-\(h([b[7], b[6]]))-\(h(Array(b[8..<10])))-\(h(Array(b[10..<16])))"
        }
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

extension CheckedBytes {
    /// A 16-byte GUID at `offset`, or nil when it is not all there.
    func guid(at offset: Int) -> VHDX.GUID? {
        slice(at: offset, count: 16).map { VHDX.GUID(bytes: Array($0)) }
    }
}

extension UnsafeMutableRawBufferPointer {
    func storeGUID(_ guid: VHDX.GUID, at offset: Int) {
        for (i, b) in guid.bytes.prefix(16).enumerated() { self[offset + i] = b }
    }
}

/// Why one copy of a duplicated structure (header, region table) is unusable.
struct VHDXDefect: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A VHDX header (4 KiB at 64 KiB and 128 KiB): see `VHDX.Header` for the fields.
struct VHDXHeader: Sendable {
    var sequenceNumber: UInt64
    var logGUID: VHDX.GUID
    var logLength: UInt32
    var logOffset: UInt64

    /// Parses one header copy; returns why it is invalid instead of throwing, so the caller
    /// can fall back to the other copy.
    static func parse(_ raw: [UInt8]) -> Result<VHDXHeader, VHDXDefect> {
        let b = CheckedBytes(raw)
        guard b.count >= VHDX.headerSize, b.u32(at: 0) == VHDX.headerSignature else { return .failure(VHDXDefect("signature is not \"head\"")) }
        let stored = b.u32(at: VHDX.Header.checksum) ?? 0
        let computed = CRC32C.enforced ? CRC32C.checksum(Array(raw[0..<VHDX.headerSize]), zeroingFieldAt: VHDX.Header.checksum) : stored
        guard stored == computed else {
            return .failure(VHDXDefect("CRC-32C checksum mismatch (stored \(hex(UInt64(stored))), computed \(hex(UInt64(computed))))"))
        }
        let version = b.u16(at: VHDX.Header.version) ?? 0
        guard version == 1 else { return .failure(VHDXDefect("version \(version) is not 1")) }
        let logVersion = b.u16(at: VHDX.Header.logVersion) ?? 0
        guard logVersion == 0 else { return .failure(VHDXDefect("log version \(logVersion) is not 0")) }
        return .success(VHDXHeader(sequenceNumber: b.u64(at: VHDX.Header.sequenceNumber) ?? 0,
                                   logGUID: b.guid(at: VHDX.Header.logGUID) ?? VHDX.GUID(bytes: []),
                                   logLength: b.u32(at: VHDX.Header.logLength) ?? 0,
                                   logOffset: b.u64(at: VHDX.Header.logOffset) ?? 0))
    }

    /// Serializes a header for our writer (empty log, checksum filled in).
    static func make(sequenceNumber: UInt64, fileWrite: VHDX.GUID, dataWrite: VHDX.GUID, logOffset: UInt64, logLength: UInt32) -> [UInt8] {
        var raw = [UInt8](repeating: 0, count: VHDX.headerSize)
        raw.withUnsafeMutableBytes { h in
            h.storeLittleEndian(VHDX.headerSignature, at: 0)
            h.storeLittleEndian(sequenceNumber, at: VHDX.Header.sequenceNumber)
            h.storeGUID(fileWrite, at: VHDX.Header.fileWriteGUID)
            h.storeGUID(dataWrite, at: VHDX.Header.dataWriteGUID)
            h.storeLittleEndian(UInt16(0), at: VHDX.Header.logVersion)
            h.storeLittleEndian(UInt16(1), at: VHDX.Header.version)
            h.storeLittleEndian(logLength, at: VHDX.Header.logLength)
            h.storeLittleEndian(logOffset, at: VHDX.Header.logOffset)
        }
        let crc = CRC32C.checksum(raw[...])
        raw.withUnsafeMutableBytes { $0.storeLittleEndian(crc, at: VHDX.Header.checksum) }
        return raw
    }
}

/// One region table entry: guid (16), file offset (8), length (4), flags (4).
struct VHDXRegion: Sendable {
    var guid: VHDX.GUID
    var fileOffset: UInt64
    var length: UInt32
    var required: Bool

    /// Parses a 64 KiB region table: signature "regi" (0), checksum (4), entry count (8),
    /// reserved (12), entries from 16.
    static func parseTable(_ raw: [UInt8]) -> Result<[VHDXRegion], VHDXDefect> {
        let b = CheckedBytes(raw)
        guard b.count >= VHDX.regionTableSize, b.u32(at: 0) == VHDX.regionSignature else { return .failure(VHDXDefect("signature is not \"regi\"")) }
        let stored = b.u32(at: 4) ?? 0
        let computed = CRC32C.enforced ? CRC32C.checksum(Array(raw[0..<VHDX.regionTableSize]), zeroingFieldAt: 4) : stored
        guard stored == computed else {
            return .failure(VHDXDefect("CRC-32C checksum mismatch (stored \(hex(UInt64(stored))), computed \(hex(UInt64(computed))))"))
        }
        let count = b.u32(at: 8) ?? 0
        guard count <= VHDX.maxRegionEntries else { return .failure(VHDXDefect("entry count \(count) exceeds 2047")) }
        var out: [VHDXRegion] = []
        for i in 0..<Int(count) {
            let base = 16 + i * 32
            guard let guid = b.guid(at: base), let offset = b.u64(at: base + 16), let length = b.u32(at: base + 24),
                  let flags = b.u32(at: base + 28) else { return .failure(VHDXDefect("entry \(i) is cut short")) }
            out.append(VHDXRegion(guid: guid, fileOffset: offset, length: length, required: flags & VHDX.regionRequired != 0))
        }
        return .success(out)
    }

    static func makeTable(_ regions: [VHDXRegion]) -> [UInt8] {
        var raw = [UInt8](repeating: 0, count: VHDX.regionTableSize)
        raw.withUnsafeMutableBytes { t in
            t.storeLittleEndian(VHDX.regionSignature, at: 0)
            t.storeLittleEndian(UInt32(regions.count), at: 8)
            for (i, r) in regions.enumerated() {
                let base = 16 + i * 32
                t.storeGUID(r.guid, at: base)
                t.storeLittleEndian(r.fileOffset, at: base + 16)
                t.storeLittleEndian(r.length, at: base + 24)
                t.storeLittleEndian(r.required ? VHDX.regionRequired : 0, at: base + 28)
            }
        }
        let crc = CRC32C.checksum(raw[...])
        raw.withUnsafeMutableBytes { $0.storeLittleEndian(crc, at: 4) }
        return raw
    }
}

/// One metadata table entry: item id (16), offset (4, from the region start), length (4),
/// flags (4), reserved (4).
struct VHDXMetadataEntry: Sendable {
    var id: VHDX.GUID
    var offset: UInt32
    var length: UInt32
    var flags: UInt32
}

/// The metadata items Cairn understands, parsed and checked.
struct VHDXMetadata: Sendable {
    var blockSize: UInt32
    var leaveBlocksAllocated: Bool
    var hasParent: Bool
    var virtualDiskSize: UInt64
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    /// Parent locator key/value pairs (differencing disks), in file order.
    var parentLocator: [(key: String, value: String)]

    /// The parent path to name in messages: relative_path, else absolute_win32_path, else any.
    var parentPath: String? {
        for key in ["relative_path", "absolute_win32_path", "volume_path"] {
            if let v = parentLocator.first(where: { $0.key == key })?.value { return v }
        }
        return parentLocator.first?.value
    }

    /// Parses the metadata table at `regionOffset` and the items it names.
    static func read(from file: any BlockSource, regionOffset: UInt64, regionLength: UInt64) throws -> VHDXMetadata {
        let path = file.name
        func bad(_ message: String, _ at: UInt64? = nil) -> CairnError {
            CairnError(.malformedImage, "VHDX metadata " + message, path: path, offset: at ?? regionOffset)
        }
        guard regionLength >= UInt64(VHDX.metadataTableSize) else { throw bad("region of \(regionLength) bytes is smaller than its 64 KiB table") }
        let table = CheckedBytes(try file.readBytes(at: regionOffset, count: VHDX.metadataTableSize))
        guard table.bytes.starts(with: VHDX.metadataSignature) else { throw bad("table does not start with the signature \"metadata\"") }
        let count = table.u16(at: 10) ?? 0
        guard count <= VHDX.maxMetadataEntries else { throw bad("table entry count \(count) exceeds 2047") }

        var items: [VHDX.GUID: [UInt8]] = [:]
        for i in 0..<Int(count) {
            let base = 32 + i * 32
            guard let id = table.guid(at: base), let offset = table.u32(at: base + 16), let length = table.u32(at: base + 20),
                  let flags = table.u32(at: base + 24) else { throw bad("table entry \(i) is cut short") }
            let entry = VHDXMetadataEntry(id: id, offset: offset, length: length, flags: flags)
            let known = [VHDX.fileParameters, VHDX.virtualDiskSize, VHDX.page83Data, VHDX.logicalSectorSize,
                         VHDX.physicalSectorSize, VHDX.parentLocator].contains(id)
            if !known {
                if entry.flags & VHDX.metadataIsRequired != 0 {
                    throw CairnError(.unsupported, "VHDX metadata item \(id) is marked required but unknown to Cairn", path: path,
                                     offset: regionOffset + UInt64(base))
                }
                continue
            }
            guard entry.length > 0 else { continue }
            guard UInt64(entry.offset) >= UInt64(VHDX.metadataTableSize), UInt64(entry.offset) < regionLength,
                  UInt64(entry.length) <= regionLength - UInt64(entry.offset), entry.length <= 1 << 20 else {
                throw bad("item \(id) (offset \(entry.offset), length \(entry.length)) lies outside the metadata region (\(regionLength) bytes)",
                          regionOffset + UInt64(base))
            }
            guard items[id] == nil else { throw bad("item \(id) appears twice", regionOffset + UInt64(base)) }
            let start = regionOffset + UInt64(entry.offset)
            guard start < file.size, UInt64(entry.length) <= file.size - start else {
                throw bad("item \(id) at \(hex(start)) lies past the end of the file (size \(file.size))", regionOffset + UInt64(base))
            }
            items[id] = try file.readBytes(at: start, count: Int(entry.length))
        }

        func item(_ id: VHDX.GUID, _ what: String, minLength: Int) throws -> CheckedBytes {
            guard let raw = items[id] else { throw bad("has no \(what) item") }
            guard raw.count >= minLength else { throw bad("\(what) item is \(raw.count) bytes, expected \(minLength)") }
            return CheckedBytes(raw)
        }
        let params = try item(VHDX.fileParameters, "file parameters", minLength: 8)
        let blockSize = params.u32(at: 0) ?? 0
        let flags = params.u32(at: 4) ?? 0
        guard blockSize >= VHDX.minBlockSize, blockSize <= VHDX.maxBlockSize, blockSize & (blockSize - 1) == 0 else {
            throw bad("block size \(blockSize) is not a power of two from 1 MiB to 256 MiB")
        }
        let size = try item(VHDX.virtualDiskSize, "virtual disk size", minLength: 8).u64(at: 0) ?? 0
        let logical = try item(VHDX.logicalSectorSize, "logical sector size", minLength: 4).u32(at: 0) ?? 0
        guard logical == 512 || logical == 4096 else { throw bad("logical sector size \(logical) is neither 512 nor 4096") }
        let physical = try item(VHDX.physicalSectorSize, "physical sector size", minLength: 4).u32(at: 0) ?? 0
        guard physical == 512 || physical == 4096 else { throw bad("physical sector size \(physical) is neither 512 nor 4096") }
        guard size <= VHDX.maxVirtualSize else { throw bad("virtual disk size \(size) exceeds the format's 64 TiB limit") }
        guard size % UInt64(logical) == 0 else { throw bad("virtual disk size \(size) is not a multiple of the logical sector size \(logical)") }

        var locator: [(key: String, value: String)] = []
        if flags & VHDX.hasParent != 0, let raw = items[VHDX.parentLocator] {
            locator = parseParentLocator(raw)
        }
        return VHDXMetadata(blockSize: blockSize, leaveBlocksAllocated: flags & VHDX.leaveBlocksAllocated != 0,
                            hasParent: flags & VHDX.hasParent != 0, virtualDiskSize: size,
                            logicalSectorSize: logical, physicalSectorSize: physical, parentLocator: locator)
    }

    /// Parent locator: type guid (16), reserved (2), key-value count (2), then entries of key
    /// offset (4), value offset (4), key length (2), value length (2); strings are UTF-16LE
    /// at offsets from the start of the item. Damaged entries are skipped (names only).
    static func parseParentLocator(_ raw: [UInt8]) -> [(key: String, value: String)] {
        let b = CheckedBytes(raw)
        let count = Int(b.u16(at: 18) ?? 0)
        func string(_ offset: UInt32, _ length: UInt16) -> String? {
            let start = Int(offset), n = Int(length)
            guard start <= raw.count, n <= raw.count - start, n % 2 == 0 else { return nil }
            var units: [UInt16] = []
            var i = start
            while i + 1 < start + n { units.append(UInt16(raw[i]) | UInt16(raw[i + 1]) << 8); i += 2 }
            return String(decoding: units, as: UTF16.self)
        }
        var out: [(key: String, value: String)] = []
        for i in 0..<min(count, 256) {
            let base = 20 + i * 12
            guard let ko = b.u32(at: base), let vo = b.u32(at: base + 4), let kl = b.u16(at: base + 8), let vl = b.u16(at: base + 10),
                  let key = string(ko, kl), let value = string(vo, vl) else { continue }
            out.append((key, value))
        }
        return out
    }
}
