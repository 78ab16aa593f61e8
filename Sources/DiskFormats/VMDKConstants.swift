import CairnCore

/// Magic numbers, limits and byte layouts of the VMDK hosted sparse extent format, in one place.
///
/// Sources: VMware "Virtual Disk Format 5.0" (sparse extent header, grain directory and
/// tables, stream-optimized markers and footer) and QEMU `block/vmdk.c` for the limits real
/// readers enforce. All on-disk integers of a sparse extent are little-endian; offsets and
/// sizes in the header and in the tables count 512-byte sectors.
enum VMDK {
    /// Bytes 0-3 of a hosted sparse extent: "KDMV".
    static let magicBytes: [UInt8] = Array("KDMV".utf8)
    /// Bytes 0-3 of the older VMDK3 / ESX vmfsSparse extent ("COWD"), which we do not read.
    static let cowdMagicBytes: [UInt8] = Array("COWD".utf8)
    /// The first line of a text descriptor file.
    static let descriptorSignature = "# Disk DescriptorFile"

    static let sectorSize: UInt64 = 512
    /// A sparse extent header (and the footer copy of it) occupies one sector.
    static let headerSize = 512

    /// Byte offsets of `SparseExtentHeader` fields (see `VMDKSparseHeader`).
    enum Field {
        static let magic = 0
        static let version = 4
        static let flags = 8
        static let capacity = 12
        static let grainSize = 20
        static let descriptorOffset = 28
        static let descriptorSize = 36
        static let numGTEsPerGT = 44
        static let rgdOffset = 48
        static let gdOffset = 56
        static let overHead = 64
        static let uncleanShutdown = 72
        static let singleEndLineChar = 73
        static let nonEndLineChar = 74
        static let doubleEndLineChar1 = 75
        static let doubleEndLineChar2 = 76
        static let compressAlgorithm = 77
    }

    /// Bits of the header's `flags`.
    enum Flag {
        /// Bit 0: the end-of-line characters at bytes 73-76 are valid (newline detection).
        static let newlineDetection: UInt32 = 1 << 0
        /// Bit 1: a redundant grain directory (and its grain tables) exists at `rgdOffset`.
        static let redundantGrainTable: UInt32 = 1 << 1
        /// Bit 2: a grain table entry of 1 means "zeroed grain".
        static let zeroedGrainEntries: UInt32 = 1 << 2
        /// Bit 16: grains are compressed.
        static let compressedGrains: UInt32 = 1 << 16
        /// Bit 17: the file carries markers (stream-optimized layout).
        static let markers: UInt32 = 1 << 17
    }

    /// `compressAlgorithm` values.
    static let compressionNone: UInt16 = 0
    static let compressionDeflate: UInt16 = 1

    /// `gdOffset` of a stream-optimized header whose grain directory is found via the footer.
    static let gdAtEnd: UInt64 = 0xFFFF_FFFF_FFFF_FFFF

    /// Grain table entry 1 with `Flag.zeroedGrainEntries`: the grain reads as zeros.
    static let zeroedGrainEntry: UInt32 = 1

    /// Metadata marker types (a marker is one sector: val u64, size u32 = 0, type u32, padding).
    enum Marker {
        static let endOfStream: UInt32 = 0
        static let grainTable: UInt32 = 1
        static let grainDirectory: UInt32 = 2
        static let footer: UInt32 = 3
    }
    /// A grain marker precedes compressed grain data: lba u64, size u32, then the data.
    static let grainMarkerHeaderSize = 12

    // MARK: - Limits (what we accept when reading)

    /// Versions 1, 2 (zeroed-grain entries) and 3 (stream-optimized, change tracking).
    static let maxVersion: UInt32 = 3
    /// QEMU refuses grain tables of more than 512 entries; VMware always writes 512.
    static let maxGTEsPerGT: UInt32 = 512
    /// Grain sizes are powers of two; VMware writes 128 sectors (64 KiB). We accept up to
    /// 1 MiB, which bounds the memory one compressed grain needs.
    static let maxGrainSectors: UInt64 = 2048
    /// Grain directory entries (QEMU allows 32 Mi; 16 Mi maps 512 TiB with 64 KiB grains).
    static let maxGrainDirectoryEntries: UInt64 = 1 << 24
    /// Virtual size of one image (sum of extents): 64 TiB, above VMware's 62 TB limit.
    static let maxVirtualSize: UInt64 = 64 << 40
    /// Descriptor files and embedded descriptors larger than this are refused (QEMU: 1 MiB).
    static let maxDescriptorBytes: UInt64 = 1 << 20
    /// Extents in one descriptor (twoGbMaxExtent* needs 32 Ki for 64 TiB).
    static let maxExtents = 1 << 16
    /// Table and grain offsets are 32-bit sector numbers: an extent file is at most 2 TiB.
    static let maxSectorNumber: UInt64 = UInt64(UInt32.max)

    // MARK: - What we write

    /// 64 KiB grains, 512-entry grain tables (one table maps 32 MiB), as VMware and QEMU do.
    static let writerGrainSectors: UInt64 = 128
    static let writerGTEsPerGT: UInt64 = 512
    /// The embedded descriptor: sectors 1 ..< 21 (QEMU's layout).
    static let writerDescriptorOffset: UInt64 = 1
    static let writerDescriptorSectors: UInt64 = 20
}

/// `n` rounded up to a multiple of `m` (m > 0; the caller rules out overflow).
@inline(__always)
func vmdkRoundUp(_ n: UInt64, _ m: UInt64) -> UInt64 {
    (n + m - 1) / m * m
}
