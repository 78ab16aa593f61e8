import CairnCore

/// The 512-byte `SparseExtentHeader` at the start of a hosted sparse extent (and, in a
/// stream-optimized extent, its copy in the footer). Little-endian, offsets in sectors:
///
///     0   magic "KDMV"          4   version u32          8   flags u32
///     12  capacity u64          20  grainSize u64         28  descriptorOffset u64
///     36  descriptorSize u64    44  numGTEsPerGT u32      48  rgdOffset u64
///     56  gdOffset u64          64  overHead u64          72  uncleanShutdown u8
///     73  '\n'  74 ' '  75 '\r'  76 '\n'                  77  compressAlgorithm u16
///     79  padding to 512
///
/// Decoding only reads fields; `VMDKSparseExtent` validates them against the file.
struct VMDKSparseHeader: Sendable, Equatable {
    var version: UInt32
    var flags: UInt32
    /// Virtual size of the extent in sectors.
    var capacity: UInt64
    /// Sectors per grain.
    var grainSize: UInt64
    var descriptorOffset: UInt64
    var descriptorSize: UInt64
    var numGTEsPerGT: UInt32
    var rgdOffset: UInt64
    var gdOffset: UInt64
    /// Sectors of metadata before the first grain.
    var overHead: UInt64
    var uncleanShutdown: UInt8 = 0
    var compressAlgorithm: UInt16

    var hasMarkers: Bool { flags & VMDK.Flag.markers != 0 }
    var hasZeroedGrainEntries: Bool { flags & VMDK.Flag.zeroedGrainEntries != 0 }
    /// QEMU decides compression by the algorithm field alone; so do we.
    var isCompressed: Bool { compressAlgorithm == VMDK.compressionDeflate }

    /// Decodes a header from at least 512 bytes whose first four are "KDMV"; nil otherwise.
    static func decode(_ raw: [UInt8]) -> VMDKSparseHeader? {
        guard raw.count >= VMDK.headerSize, raw.starts(with: VMDK.magicBytes) else { return nil }
        let b = CheckedBytes(raw)
        guard let version = b.u32(at: VMDK.Field.version), let flags = b.u32(at: VMDK.Field.flags),
              let capacity = b.u64(at: VMDK.Field.capacity), let grainSize = b.u64(at: VMDK.Field.grainSize),
              let descriptorOffset = b.u64(at: VMDK.Field.descriptorOffset),
              let descriptorSize = b.u64(at: VMDK.Field.descriptorSize),
              let gtes = b.u32(at: VMDK.Field.numGTEsPerGT), let rgd = b.u64(at: VMDK.Field.rgdOffset),
              let gd = b.u64(at: VMDK.Field.gdOffset), let overHead = b.u64(at: VMDK.Field.overHead),
              let compress = b.u16(at: VMDK.Field.compressAlgorithm) else { return nil }
        return VMDKSparseHeader(version: version, flags: flags, capacity: capacity, grainSize: grainSize,
                                descriptorOffset: descriptorOffset, descriptorSize: descriptorSize,
                                numGTEsPerGT: gtes, rgdOffset: rgd, gdOffset: gd, overHead: overHead,
                                uncleanShutdown: raw[VMDK.Field.uncleanShutdown], compressAlgorithm: compress)
    }

    /// The 512-byte encoding, with magic and the newline-detection characters.
    func encoded() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: VMDK.headerSize)
        out.withUnsafeMutableBytes { h in
            for (i, byte) in VMDK.magicBytes.enumerated() { h[i] = byte }
            h.storeLittleEndian(version, at: VMDK.Field.version)
            h.storeLittleEndian(flags, at: VMDK.Field.flags)
            h.storeLittleEndian(capacity, at: VMDK.Field.capacity)
            h.storeLittleEndian(grainSize, at: VMDK.Field.grainSize)
            h.storeLittleEndian(descriptorOffset, at: VMDK.Field.descriptorOffset)
            h.storeLittleEndian(descriptorSize, at: VMDK.Field.descriptorSize)
            h.storeLittleEndian(numGTEsPerGT, at: VMDK.Field.numGTEsPerGT)
            h.storeLittleEndian(rgdOffset, at: VMDK.Field.rgdOffset)
            h.storeLittleEndian(gdOffset, at: VMDK.Field.gdOffset)
            h.storeLittleEndian(overHead, at: VMDK.Field.overHead)
            h[VMDK.Field.uncleanShutdown] = uncleanShutdown
            h[VMDK.Field.singleEndLineChar] = 0x0A
            h[VMDK.Field.nonEndLineChar] = 0x20
            h[VMDK.Field.doubleEndLineChar1] = 0x0D
            h[VMDK.Field.doubleEndLineChar2] = 0x0A
            h.storeLittleEndian(compressAlgorithm, at: VMDK.Field.compressAlgorithm)
        }
        return out
    }
}

/// A metadata marker sector of a stream-optimized extent: val u64, size u32 (0), type u32.
struct VMDKMarker: Equatable {
    var value: UInt64
    var size: UInt32
    var type: UInt32

    /// One sector holding the marker, zero-padded.
    func encoded() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(VMDK.sectorSize))
        out.withUnsafeMutableBytes { m in
            m.storeLittleEndian(value, at: 0)
            m.storeLittleEndian(size, at: 8)
            m.storeLittleEndian(type, at: 12)
        }
        return out
    }

    static func decode(_ bytes: [UInt8], at offset: Int) -> VMDKMarker? {
        let b = CheckedBytes(bytes)
        guard let value = b.u64(at: offset), let size = b.u32(at: offset + 8), let type = b.u32(at: offset + 12) else { return nil }
        return VMDKMarker(value: value, size: size, type: type)
    }
}
