/// Magic numbers, limits and bit layouts of the qcow2 format, in one place.
///
/// Source: QEMU `docs/interop/qcow2.rst`. All on-disk numbers are big-endian.
enum QCOW2 {
    /// Bytes 0-3 of every qcow2 image: "QFI\xfb".
    static let magic: UInt32 = 0x5146_49FB
    static let magicBytes: [UInt8] = [0x51, 0x46, 0x49, 0xFB]

    /// A version 2 header is exactly 72 bytes; version 3 is at least 104 and a multiple of 8.
    static let v2HeaderLength = 72
    static let v3MinHeaderLength = 104
    /// The header length our writer produces (through the compression_type byte and padding).
    static let v3WrittenHeaderLength = 112

    /// Byte offsets of header fields (see `QCOW2Header`).
    enum Field {
        static let magic = 0
        static let version = 4
        static let backingFileOffset = 8
        static let backingFileSize = 16
        static let clusterBits = 20
        static let size = 24
        static let cryptMethod = 32
        static let l1Size = 36
        static let l1TableOffset = 40
        static let refcountTableOffset = 48
        static let refcountTableClusters = 56
        static let nbSnapshots = 60
        static let snapshotsOffset = 64
        static let incompatibleFeatures = 72
        static let compatibleFeatures = 80
        static let autoclearFeatures = 88
        static let refcountOrder = 96
        static let headerLength = 100
        static let compressionType = 104
    }

    /// Cluster sizes from 512 bytes to 2 MiB (QEMU's implementation limit).
    static let minClusterBits: UInt32 = 9
    static let maxClusterBits: UInt32 = 21

    /// The backing file name may hold at most 1023 bytes.
    static let maxBackingFileNameLength: UInt32 = 1023

    /// QEMU refuses L1 tables larger than 32 MiB.
    static let maxL1TableBytes: UInt64 = 32 << 20

    /// refcount_bits = 1 << refcount_order; order 6 (64-bit refcounts) at most.
    static let maxRefcountOrder: UInt32 = 6
    /// Version 2 images always use 16-bit refcounts.
    static let defaultRefcountOrder: UInt32 = 4

    /// Bits of `incompatible_features`.
    enum Incompatible {
        static let dirty: UInt64 = 1 << 0
        static let corrupt: UInt64 = 1 << 1
        static let externalDataFile: UInt64 = 1 << 2
        static let compressionType: UInt64 = 1 << 3
        static let extendedL2: UInt64 = 1 << 4
        static let known: UInt64 = dirty | corrupt | externalDataFile | compressionType | extendedL2
    }

    /// Header extension types (bytes 0-3 of each extension).
    enum Extension {
        static let end: UInt32 = 0x0000_0000
        static let backingFormat: UInt32 = 0xE279_2ACA
        static let featureNameTable: UInt32 = 0x6803_F857
        static let bitmaps: UInt32 = 0x2385_2875
        static let fullDiskEncryption: UInt32 = 0x0537_BE77
        static let externalDataFile: UInt32 = 0x4441_5441
        /// Each feature name table entry: type (1), bit (1), name (46).
        static let featureNameEntrySize = 48
    }

    /// L1 entry: bits 9-55 hold the L2 table offset; bit 63 "refcount is exactly one".
    static let l1OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Standard L2 entry: bits 9-55 hold the host cluster offset.
    static let l2OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Bit 63 of L1/L2 entries: the refcount of the cluster is exactly one (no COW needed).
    static let flagCopied: UInt64 = 1 << 63
    /// Bit 62 of an L2 entry: the cluster is compressed.
    static let flagCompressed: UInt64 = 1 << 62
    /// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros.
    static let flagZero: UInt64 = 1
    /// Host offsets (other than compressed ones) live in bits 0-55.
    static let maxHostOffsetBits: UInt64 = 56
    /// Compressed cluster sizes are counted in 512-byte sectors.
    static let compressedSectorSize: UInt64 = 512

    /// Compressed clusters with compression type deflate are raw deflate streams (no zlib
    /// header) produced with a 4 KiB window.
    static let deflateWindowBits: Int32 = -12
}

/// `0x` followed by lowercase hex, for offsets in messages.
func hex(_ value: UInt64) -> String {
    "0x" + String(value, radix: 16)
}
