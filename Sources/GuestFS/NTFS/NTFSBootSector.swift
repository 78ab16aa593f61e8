import CairnCore

/// Magic numbers and limits of the NTFS reader, in one place.
enum NTFSConstants {
    static let oemID: [UInt8] = Array("NTFS    ".utf8)
    static let fileMagic: [UInt8] = Array("FILE".utf8)
    static let indexMagic: [UInt8] = Array("INDX".utf8)
    /// The update-sequence stride: fixups protect the last two bytes of every 512-byte block,
    /// whatever the sector size.
    static let fixupStride = 512

    // Attribute type codes.
    static let standardInformation: UInt32 = 0x10
    static let attributeList: UInt32 = 0x20
    static let fileName: UInt32 = 0x30
    static let volumeName: UInt32 = 0x60
    static let volumeInformation: UInt32 = 0x70
    static let data: UInt32 = 0x80
    static let indexRoot: UInt32 = 0x90
    static let indexAllocation: UInt32 = 0xA0
    static let reparsePoint: UInt32 = 0xC0
    static let endMarker: UInt32 = 0xFFFF_FFFF

    // Attribute header flags.
    static let attributeCompressed: UInt16 = 0x0001
    static let attributeEncrypted: UInt16 = 0x4000
    static let attributeSparse: UInt16 = 0x8000

    // File attribute bits ($STANDARD_INFORMATION / $FILE_NAME).
    static let fileReadOnly: UInt32 = 0x0001
    static let fileSystem: UInt32 = 0x0004
    static let fileReparsePoint: UInt32 = 0x0400

    // MFT record header flags.
    static let recordInUse: UInt16 = 0x0001
    static let recordIsDirectory: UInt16 = 0x0002

    // Reparse tags.
    static let tagMountPoint: UInt32 = 0xA000_0003
    static let tagSymlink: UInt32 = 0xA000_000C
    static let tagLXSymlink: UInt32 = 0xA000_001D

    /// Record numbers below this are the file system's own metadata files ($MFT ... $Extend
    /// and four reserved records); directory listings hide them as `ntfsls` does.
    static let firstUserRecord: UInt64 = 16
    static let rootRecord: UInt64 = 5
    static let bitmapRecord: UInt64 = 6
    static let volumeRecord: UInt64 = 3

    /// 100-ns intervals between 1601-01-01 and 1970-01-01.
    static let epochDelta: Int64 = 116_444_736_000_000_000

    // Limits against hostile images.
    /// Largest MFT record / index block accepted (the usual sizes are 1 KiB and 4 KiB).
    static let maxRecordSize = 64 << 10
    /// Largest cluster accepted (NTFS allows up to 2 MiB).
    static let maxClusterSize = 2 << 20
    /// Most extension records one file may use through its $ATTRIBUTE_LIST.
    static let maxExtensionRecords = 4096
    /// Largest $ATTRIBUTE_LIST value read.
    static let maxAttributeListSize = 8 << 20
    /// Most attributes gathered for one file.
    static let maxAttributes = 65536
    /// Most runs in one attribute's runlist (all extents together).
    static let maxRuns = 4 << 20
    /// Deepest index B-tree walked, and most index blocks visited for one directory.
    static let maxIndexDepth = 32
    static let maxIndexBlocks = 1 << 20
    /// Most entries returned for one directory.
    static let maxDirectoryEntries = 10_000_000
    /// Largest resident-style value (reparse data, index root) kept in memory.
    static let maxSmallValue = 1 << 20
    /// Nodes kept in the parsed-node cache.
    static let nodeCacheCapacity = 4096
}

/// The NTFS boot sector (first sector of the volume). Fields used, little-endian:
///
/// | offset | size | field |
/// |---|---|---|
/// | 3 | 8 | OEM id "NTFS    " |
/// | 11 | 2 | bytes per sector |
/// | 13 | 1 | sectors per cluster (values above 0x80: 2^(256 - value)) |
/// | 40 | 8 | total sectors |
/// | 48 | 8 | LCN of $MFT |
/// | 64 | 1 | clusters per MFT record (signed; negative n means 2^-n bytes) |
/// | 68 | 1 | clusters per index block (same encoding) |
/// | 72 | 8 | volume serial number |
/// | 510 | 2 | 0x55 0xAA |
struct NTFSBootSector: Sendable, Equatable {
    var bytesPerSector: Int
    var clusterSize: Int
    var totalSectors: UInt64
    var mftLCN: UInt64
    var recordSize: Int
    var indexBlockSize: Int
    var serial: UInt64

    /// Clusters in the volume (the bitmap covers these).
    var totalClusters: UInt64 { (mul(totalSectors, UInt64(bytesPerSector)) ?? 0) / UInt64(clusterSize) }

    /// Decodes a boot sector; nil when it is not NTFS (wrong OEM id, signature or geometry).
    /// `why` receives a description of the first inconsistency for error messages.
    init?(_ b: CheckedBytes, why: inout String) {
        guard b.count >= 512, b.slice(at: 3, count: 8).map(Array.init) == NTFSConstants.oemID else {
            why = "no NTFS OEM id \"NTFS    \" at byte 3"
            return nil
        }
        guard b.u8(at: 510) == 0x55, b.u8(at: 511) == 0xAA else {
            why = "no 0x55AA boot signature at byte 510"
            return nil
        }
        guard let bps = b.u16(at: 11), [256, 512, 1024, 2048, 4096].contains(bps) else {
            why = "bytes per sector \(b.u16(at: 11) ?? 0) is not 256-4096"
            return nil
        }
        guard let spcRaw = b.u8(at: 13), spcRaw != 0 else {
            why = "sectors per cluster is 0"
            return nil
        }
        let sectorsPerCluster: Int
        if spcRaw > 0x80 {
            let shift = 256 - Int(spcRaw)
            guard shift <= 16 else { why = "sectors per cluster exponent \(shift) is too large"; return nil }
            sectorsPerCluster = 1 << shift
        } else {
            guard spcRaw.nonzeroBitCount == 1 else { why = "sectors per cluster \(spcRaw) is not a power of two"; return nil }
            sectorsPerCluster = Int(spcRaw)
        }
        let cluster = Int(bps) * sectorsPerCluster
        guard cluster <= NTFSConstants.maxClusterSize else {
            why = "cluster size \(cluster) is larger than \(NTFSConstants.maxClusterSize)"
            return nil
        }
        guard let total = b.u64(at: 40), let mft = b.u64(at: 48), let rec = b.u8(at: 64), let idx = b.u8(at: 68),
              let serial = b.u64(at: 72) else {
            why = "boot sector truncated"
            return nil
        }
        func decode(_ v: UInt8) -> Int? {
            let s = Int8(bitPattern: v)
            if s < 0 {
                let shift = -Int(s)
                guard shift >= 9, shift <= 16 else { return nil }
                return 1 << shift
            }
            guard s > 0, let size = Int(exactly: s).map({ $0 * cluster }), size <= NTFSConstants.maxRecordSize else { return nil }
            return size
        }
        guard let recordSize = decode(rec), recordSize >= 512, recordSize.nonzeroBitCount == 1 else {
            why = "clusters per MFT record \(Int8(bitPattern: rec)) gives an unusable record size"
            return nil
        }
        guard let indexSize = decode(idx), indexSize >= 512, indexSize.nonzeroBitCount == 1 else {
            why = "clusters per index block \(Int8(bitPattern: idx)) gives an unusable index block size"
            return nil
        }
        guard total > 0 else { why = "total sectors is 0"; return nil }
        bytesPerSector = Int(bps)
        clusterSize = cluster
        totalSectors = total
        mftLCN = mft
        self.recordSize = recordSize
        indexBlockSize = indexSize
        self.serial = serial
    }
}
