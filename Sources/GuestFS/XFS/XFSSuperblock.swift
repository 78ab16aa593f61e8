import CairnCore

/// Magic numbers of the XFS structures the reader checks (all stored big-endian).
enum XFSMagic {
    static let superblock: UInt32 = 0x5846_5342  // "XFSB"
    static let agf: UInt32 = 0x5841_4746  // "XAGF"
    static let agi: UInt32 = 0x5841_4749  // "XAGI"
    static let inode: UInt16 = 0x494E  // "IN"
    static let bmbtV5: UInt32 = 0x424D_4133  // "BMA3"
    static let bmbtV4: UInt32 = 0x424D_4150  // "BMAP"
    static let bnobtV5: UInt32 = 0x4142_3342  // "AB3B"
    static let bnobtV4: UInt32 = 0x4142_5442  // "ABTB"
    static let dirBlockV5: UInt32 = 0x5844_4233  // "XDB3"
    static let dirDataV5: UInt32 = 0x5844_4433  // "XDD3"
    static let dirBlockV4: UInt32 = 0x5844_3242  // "XD2B"
    static let dirDataV4: UInt32 = 0x5844_3244  // "XD2D"
    static let symlink: UInt32 = 0x5853_4C4D  // "XSLM"
}

/// Limits the reader enforces on values taken from the disk.
enum XFSLimits {
    /// Deepest B+tree accepted (block map and free-space trees; XFS itself stays below 10).
    static let maxTreeDepth = 10
    /// Most extents one file's map may hold.
    static let maxExtents = 1 << 22
    /// Most entries one directory may list.
    static let maxDirectoryEntries = 1 << 22
    /// Longest symlink target (XFS_SYMLINK_MAXLEN).
    static let maxSymlinkLength = 1024
    /// Parsed file maps kept in the cache.
    static let cachedMaps = 64
    /// Directory listings kept in the cache, and their total entries.
    static let cachedDirectories = 64
    static let cachedDirectoryEntries = 1 << 20
}

/// The primary superblock (sector 0 of the volume; XFS `struct xfs_dsb`, big-endian). Fields
/// read, by byte offset: magic (0), block size (4), data blocks (8), realtime blocks (16),
/// UUID (32), log start (48), root inode (56), AG blocks (84), AG count (88), log blocks (96),
/// version number (100, u16), sector size (102, u16), inode size (104, u16), inodes per block
/// (106, u16), name (108, 12 bytes), log2 of block size (120), sector size (121), inode size
/// (122), inodes per block (123), AG blocks rounded up (124), free data blocks (144),
/// directory block log (192), features2 (200), compat (208), ro-compat (212), incompat (216),
/// log-incompat (220), CRC (224, little-endian, CRC-32C over the sector), metadata UUID (248).
struct XFSSuperblock: Sendable {
    var version: Int
    var blockSize: Int
    var blockLog: Int
    var dataBlocks: UInt64
    var realtimeBlocks: UInt64
    var uuidBytes: [UInt8]
    /// The UUID stamped into v5 metadata blocks (sb_meta_uuid with the META_UUID feature).
    var metaUUID: [UInt8]
    var logStart: UInt64
    var logBlocks: UInt32
    var rootIno: UInt64
    var agBlocks: UInt32
    var agCount: UInt32
    var sectorSize: Int
    var inodeSize: Int
    var inodesPerBlockLog: Int
    var agBlockLog: Int
    var dirBlockLog: Int
    var freeDataBlocks: UInt64
    var label: String
    var hasFileType: Bool
    var incompat: UInt32

    var hasCRC: Bool { version == 5 }
    var dirBlockSize: Int { blockSize << dirBlockLog }
    /// Bits of an inode number that hold the AG-relative inode number.
    var agInoLog: Int { agBlockLog + inodesPerBlockLog }

    /// v5 incompatible features this reader understands: file type in directory entries (0),
    /// sparse inode chunks (1), metadata UUID (2), big timestamps (3), 64-bit extent counters
    /// (5), atomic file-range exchange (6), parent pointers (7, kept as attributes).
    static let knownIncompat: UInt32 = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
    static let incompatFileType: UInt32 = 0x01
    static let incompatMetaUUID: UInt32 = 0x04
    static let incompatNeedsRepair: UInt32 = 0x10

    static func parse(_ raw: [UInt8], volume: any BlockSource) throws -> XFSSuperblock {
        let name = volume.name
        func bad(_ message: String, _ offset: UInt64) -> CairnError {
            CairnError(.malformedImage, "XFS superblock: \(message)", path: name, offset: offset,
                       hint: "the file system is damaged; run xfs_repair -n on a restored copy")
        }
        let b = CheckedBytes(raw, order: .big)
        guard raw.count >= 512, b.u32(at: 0) == XFSMagic.superblock else { throw bad("magic \"XFSB\" missing", 0) }
        let versionNum = b.u16(at: 100) ?? 0
        let version = Int(versionNum & 0xF)
        let features2 = b.u32(at: 200) ?? 0
        if version == 4 {
            // v4: directories must be version 2 (DIRV2 bit 0x2000); everything else the reader needs
            // differs from v5 only by header sizes and missing checksums.
            guard versionNum & 0x2000 != 0 else {
                throw CairnError(.unsupported, "XFS v4 file system with version 1 directories is not supported", path: name, offset: 100)
            }
        } else if version != 5 {
            throw CairnError(.unsupported, "XFS superblock version \(version) is not supported (4 and 5 are)", path: name, offset: 100)
        }
        let blockLog = Int(b.u8(at: 120) ?? 0)
        let blockSize = Int(b.u32(at: 4) ?? 0)
        guard (9...16).contains(blockLog), blockSize == 1 << blockLog else {
            throw bad("block size \(blockSize) (log \(blockLog)) is not a power of two between 512 and 65536", 4)
        }
        let sectorLog = Int(b.u8(at: 121) ?? 0)
        let sectorSize = Int(b.u16(at: 102) ?? 0)
        guard (9...15).contains(sectorLog), sectorSize == 1 << sectorLog, sectorSize <= blockSize, sectorSize <= raw.count else {
            throw bad("sector size \(sectorSize) (log \(sectorLog)) is invalid", 102)
        }
        let inodeLog = Int(b.u8(at: 122) ?? 0)
        let inodeSize = Int(b.u16(at: 104) ?? 0)
        guard (8...11).contains(inodeLog), inodeSize == 1 << inodeLog, inodeSize <= blockSize,
              version == 4 || inodeSize >= 512 else {
            throw bad("inode size \(inodeSize) (log \(inodeLog)) is invalid", 104)
        }
        let inopbLog = Int(b.u8(at: 123) ?? 0)
        guard inopbLog == blockLog - inodeLog, Int(b.u16(at: 106) ?? 0) == blockSize / inodeSize else {
            throw bad("inodes per block (log \(inopbLog)) does not match block size \(blockSize) / inode size \(inodeSize)", 106)
        }
        let agBlocks = b.u32(at: 84) ?? 0
        let agCount = b.u32(at: 88) ?? 0
        let agBlockLog = Int(b.u8(at: 124) ?? 0)
        // sb_agblklog is log2 of agblocks rounded up; XFS needs at least 64 blocks per AG.
        guard agBlocks >= 64, (6...31).contains(agBlockLog), UInt64(agBlocks) <= UInt64(1) << agBlockLog,
              UInt64(agBlocks) > UInt64(1) << (agBlockLog - 1) else {
            throw bad("AG size \(agBlocks) blocks does not match its log \(agBlockLog)", 84)
        }
        guard agBlockLog + inopbLog <= 32 else { throw bad("inode numbers would need more than 64 bits", 124) }
        let dataBlocks = b.u64(at: 8) ?? 0
        guard agCount >= 1, dataBlocks > UInt64(agCount - 1) * UInt64(agBlocks),
              dataBlocks <= UInt64(agCount) * UInt64(agBlocks) else {
            throw bad("\(agCount) AGs of \(agBlocks) blocks do not cover \(dataBlocks) data blocks", 88)
        }
        guard let fsBytes = mul(dataBlocks, UInt64(blockSize)), fsBytes <= volume.size else {
            throw CairnError(.malformedImage, "XFS file system of \(dataBlocks) blocks of \(blockSize) bytes is larger than its volume (\(volume.size) bytes)",
                             path: name, offset: 8, hint: "the volume is truncated; restore or copy the whole partition")
        }
        let dirBlockLog = Int(b.u8(at: 192) ?? 0)
        guard blockLog + dirBlockLog <= 16 else { throw bad("directory block size 2^\(blockLog + dirBlockLog) exceeds 64 KiB", 192) }
        var incompat: UInt32 = 0
        if version == 5 {
            incompat = b.u32(at: 216) ?? 0
            if incompat & incompatNeedsRepair != 0 {
                throw CairnError(.unsupported, "XFS file system is marked as needing repair (NEEDSREPAIR)", path: name, offset: 216,
                                 hint: "run xfs_repair on the file system (or a restored copy) first")
            }
            let unknown = incompat & ~knownIncompat
            guard unknown == 0 else {
                throw CairnError(.unsupported, "XFS incompatible features 0x\(String(unknown, radix: 16)) are not supported (metadata directories, zoned devices or newer)",
                                 path: name, offset: 216)
            }
            if CRC32C.enforced {
                let stored = CheckedBytes(raw, order: .little).u32(at: 224) ?? 0
                let computed = CRC32C.checksum(Array(raw[0..<sectorSize]), zeroingFieldAt: 224)
                guard stored == computed else {
                    throw bad("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", 224)
                }
            }
        }
        let moreBits = versionNum & 0x8000 != 0
        let hasFileType = version == 5 ? incompat & incompatFileType != 0 : (moreBits && features2 & 0x200 != 0)
        let uuid = Array(b.slice(at: 32, count: 16) ?? [])
        let meta = version == 5 && incompat & incompatMetaUUID != 0 ? Array(b.slice(at: 248, count: 16) ?? []) : uuid
        let nameBytes = (b.slice(at: 108, count: 12) ?? []).prefix { $0 != 0 }
        let sb = XFSSuperblock(
            version: version, blockSize: blockSize, blockLog: blockLog, dataBlocks: dataBlocks,
            realtimeBlocks: b.u64(at: 16) ?? 0, uuidBytes: uuid, metaUUID: meta, logStart: b.u64(at: 48) ?? 0,
            logBlocks: b.u32(at: 96) ?? 0, rootIno: b.u64(at: 56) ?? 0, agBlocks: agBlocks, agCount: agCount,
            sectorSize: sectorSize, inodeSize: inodeSize, inodesPerBlockLog: inopbLog, agBlockLog: agBlockLog,
            dirBlockLog: dirBlockLog, freeDataBlocks: b.u64(at: 144) ?? 0,
            label: String(decoding: nameBytes, as: UTF8.self), hasFileType: hasFileType, incompat: incompat)
        guard sb.inodeLocation(sb.rootIno) != nil else { throw bad("root inode number \(sb.rootIno) lies outside the file system", 56) }
        return sb
    }

    /// The UUID as text (8-4-4-4-12 lowercase hex, bytes in stored order).
    var uuidString: String {
        let hex = uuidBytes.map { byte -> String in
            let digits: [Character] = Array("0123456789abcdef")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0xF)]])
        }
        guard hex.count == 16 else { return "" }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }

    /// Byte offset of AG `agno`'s first block.
    func agStart(_ agno: UInt64) -> UInt64 { agno * UInt64(agBlocks) * UInt64(blockSize) }

    /// Blocks in AG `agno` (the last one may be short).
    func agLength(_ agno: UInt64) -> UInt64 {
        min(UInt64(agBlocks), dataBlocks - agno * UInt64(agBlocks))
    }

    /// The byte offset of inode `ino` (agno << agino_log | agbno << inopblog | index), or nil
    /// when the number points outside the file system.
    func inodeLocation(_ ino: UInt64) -> UInt64? {
        let agno = ino >> UInt64(agInoLog)
        let agino = ino & ((UInt64(1) << UInt64(agInoLog)) - 1)
        let agbno = agino >> UInt64(inodesPerBlockLog)
        let index = agino & ((UInt64(1) << UInt64(inodesPerBlockLog)) - 1)
        guard agno < UInt64(agCount), agbno < agLength(agno), agbno > 0 || index > 0 || agno > 0 else { return nil }
        let block = agno * UInt64(agBlocks) + agbno
        return block * UInt64(blockSize) + index * UInt64(inodeSize)
    }

    /// Linear block index (from the start of the volume) of the extent that starts at file
    /// system block `fsb` (agno << agblklog | agbno) and runs `count` blocks, or nil when it
    /// leaves its AG or the file system.
    func linearBlock(_ fsb: UInt64, count: UInt64) -> UInt64? {
        let agno = fsb >> UInt64(agBlockLog)
        let agbno = fsb & ((UInt64(1) << UInt64(agBlockLog)) - 1)
        guard agno < UInt64(agCount), count <= agLength(agno), agbno <= agLength(agno) - count else { return nil }
        return agno * UInt64(agBlocks) + agbno
    }
}
