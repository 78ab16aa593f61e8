import CairnCore

/// Magic numbers and feature bits of ext2/ext3/ext4 (Linux `fs/ext4/ext4.h`,
/// Documentation/filesystems/ext4). Everything the reader compares against lives here.
enum Ext {
    static let superblockOffset: UInt64 = 1024
    static let superblockSize = 1024
    static let magic: UInt16 = 0xEF53
    static let rootInode: UInt64 = 2
    static let extentMagic: UInt16 = 0xF30A
    static let xattrMagic: UInt32 = 0xEA02_0000
    /// Linux's EXT4_MAX_EXTENT_DEPTH.
    static let maxExtentDepth = 5
    /// Most extents kept for one file (a 48 MiB mapping cache entry); more is refused.
    static let maxExtentsPerFile = 4 << 20
    /// Largest symlink target read (Linux limits targets to one block; PATH_MAX is 4096).
    static let maxSymlinkLength: UInt64 = 65536
    /// Most block groups accepted (2^21 groups of 128 MiB are 256 TiB); their descriptors are
    /// kept in memory, 32 bytes each.
    static let maxGroups: UInt64 = 1 << 21

    enum Compat {
        static let hasJournal: UInt32 = 0x4
        static let sparseSuper2: UInt32 = 0x200
    }

    enum Incompat {
        static let compression: UInt32 = 0x1
        static let filetype: UInt32 = 0x2
        static let recover: UInt32 = 0x4
        static let journalDev: UInt32 = 0x8
        static let metaBG: UInt32 = 0x10
        static let extents: UInt32 = 0x40
        static let is64Bit: UInt32 = 0x80
        static let mmp: UInt32 = 0x100
        static let flexBG: UInt32 = 0x200
        static let eaInode: UInt32 = 0x400
        static let dirData: UInt32 = 0x1000
        static let csumSeed: UInt32 = 0x2000
        static let largeDir: UInt32 = 0x4000
        static let inlineData: UInt32 = 0x8000
        static let encrypt: UInt32 = 0x10000
        static let casefold: UInt32 = 0x20000

        /// Everything this reader understands.
        static let supported: UInt32 = filetype | recover | metaBG | extents | is64Bit | mmp | flexBG | eaInode
            | csumSeed | largeDir | inlineData | encrypt | casefold
        /// Names for messages.
        static let names: [(UInt32, String)] = [
            (compression, "compression"), (filetype, "filetype"), (recover, "needs_recovery"), (journalDev, "journal_dev"),
            (metaBG, "meta_bg"), (0x20, "0x20"), (extents, "extent"), (is64Bit, "64bit"), (mmp, "mmp"), (flexBG, "flex_bg"),
            (eaInode, "ea_inode"), (0x800, "0x800"), (dirData, "dirdata"), (csumSeed, "metadata_csum_seed"),
            (largeDir, "large_dir"), (inlineData, "inline_data"), (encrypt, "encrypt"), (casefold, "casefold"),
        ]
    }

    enum ROCompat {
        static let sparseSuper: UInt32 = 0x1
        static let largeFile: UInt32 = 0x2
        static let btreeDir: UInt32 = 0x4
        static let gdtCsum: UInt32 = 0x10
        static let bigalloc: UInt32 = 0x200
        static let metadataCsum: UInt32 = 0x400
    }

    /// Inode flags (i_flags).
    enum InodeFlag {
        static let index: UInt32 = 0x1000
        static let encrypted: UInt32 = 0x800
        static let hugeFile: UInt32 = 0x40000
        static let extents: UInt32 = 0x80000
        static let eaInode: UInt32 = 0x200000
        static let inlineData: UInt32 = 0x1000_0000
    }

    /// Group descriptor flags (bg_flags).
    enum GroupFlag {
        static let blockUninit: UInt16 = 0x2
    }

    static func featureNames(_ bits: UInt32) -> String {
        var names: [String] = []
        for i in 0..<32 {
            let bit = UInt32(1) << UInt32(i)
            guard bits & bit != 0 else { continue }
            names.append(Incompat.names.first { $0.0 == bit }?.1 ?? "0x" + String(bit, radix: 16))
        }
        return names.joined(separator: ", ")
    }
}

/// The fields of the 1024-byte superblock at byte 1024 of the volume that the reader uses
/// (offsets in `docs/EXT4.md`), validated so that every derived size fits the volume.
struct ExtSuperblock: Sendable {
    var inodesCount: UInt32
    var blocksCount: UInt64
    var freeBlocksCount: UInt64
    var firstDataBlock: UInt64
    var logBlockSize: UInt32
    var blockSize: Int
    /// Bytes per allocation-bitmap bit: the block size, or the cluster size with bigalloc.
    var clusterSize: Int
    var blocksPerGroup: UInt64
    var clustersPerGroup: UInt64
    var inodesPerGroup: UInt32
    var revLevel: UInt32
    var inodeSize: Int
    var compat: UInt32
    var incompat: UInt32
    var roCompat: UInt32
    var uuid: [UInt8]
    var label: String
    var reservedGDTBlocks: UInt64
    var descSize: Int
    var firstMetaBG: UInt64
    var logGroupsPerFlex: UInt8
    var backupBGs: (UInt32, UInt32)
    var checksumSeed: UInt32
    var groupCount: UInt64

    var hasMetadataCsum: Bool { roCompat & Ext.ROCompat.metadataCsum != 0 }
    var hasGroupCsum: Bool { roCompat & (Ext.ROCompat.metadataCsum | Ext.ROCompat.gdtCsum) != 0 }
    var hasFiletype: Bool { incompat & Ext.Incompat.filetype != 0 }
    var hasInlineData: Bool { incompat & Ext.Incompat.inlineData != 0 }
    var hasMetaBG: Bool { incompat & Ext.Incompat.metaBG != 0 }
    var hasLargeDir: Bool { incompat & Ext.Incompat.largeDir != 0 }
    var needsRecovery: Bool { incompat & Ext.Incompat.recover != 0 }
    var descPerBlock: UInt64 { UInt64(blockSize / descSize) }
    var clusterRatio: UInt64 { UInt64(clusterSize / blockSize) }

    /// blkid's naming: ext4 as soon as a feature beyond ext3's set is on, ext3 with a journal,
    /// ext2 otherwise.
    var typeName: String {
        let ext3Incompat = Ext.Incompat.filetype | Ext.Incompat.recover | Ext.Incompat.metaBG
        let ext3RO = Ext.ROCompat.sparseSuper | Ext.ROCompat.largeFile | Ext.ROCompat.btreeDir
        if incompat & ~ext3Incompat != 0 || roCompat & ~ext3RO != 0 { return "ext4" }
        return compat & Ext.Compat.hasJournal != 0 ? "ext3" : "ext2"
    }

    var uuidString: String {
        func h(_ x: UInt8) -> String { String(x, radix: 16).count == 1 ? "0" + String(x, radix: 16) : String(x, radix: 16) }
        let hex = uuid.map(h)
        guard hex.count == 16 else { return "" }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }

    /// A cheap look at the superblock: the magic at 1024 + 0x38 and sane geometry fields.
    static func probe(_ volume: any BlockSource) -> Bool {
        guard volume.size >= Ext.superblockOffset + UInt64(Ext.superblockSize),
              let raw = try? volume.readBytes(at: Ext.superblockOffset, count: Ext.superblockSize) else { return false }
        let b = CheckedBytes(raw)
        guard b.u16(at: 0x38) == Ext.magic, let log = b.u32(at: 0x18), log <= 6,
              let bpg = b.u32(at: 0x20), bpg > 0, let ipg = b.u32(at: 0x28), ipg > 0 else { return false }
        return true
    }

    /// Where a backup superblock of a file system made with mke2fs's default geometry lies when
    /// the primary one is gone: block group 1 starts at block `8 * blockSize + firstDataBlock`
    /// for every block size, and its copy records group number 1 (`s_block_group_nr`, 0x5A).
    /// Returns the byte offset of the first backup found and the type it describes, or nil.
    static func findBackup(_ volume: any BlockSource) -> (offset: UInt64, typeName: String)? {
        for log in 0...6 {
            let blockSize = UInt64(1024) << UInt64(log)
            let blocksPerGroup = 8 * blockSize
            let offset = (blocksPerGroup + (blockSize == 1024 ? 1 : 0)) * blockSize
            guard offset + UInt64(Ext.superblockSize) <= volume.size,
                  let raw = try? volume.readBytes(at: offset, count: Ext.superblockSize) else { continue }
            let b = CheckedBytes(raw)
            guard b.u16(at: 0x38) == Ext.magic, b.u32(at: 0x18) == UInt32(log), b.u32(at: 0x20) == UInt32(blocksPerGroup),
                  b.u16(at: 0x5A) == 1 else { continue }
            let window = MemoryBlockSource([UInt8](repeating: 0, count: 1024) + raw, zeroPaddedTo: volume.size)
            let typeName = (try? ExtSuperblock(volume: window).typeName) ?? "ext"
            return (offset, typeName)
        }
        return nil
    }

    /// Parses and checks the superblock of `volume`.
    init(volume: any BlockSource) throws {
        let name = volume.name
        let at = Ext.superblockOffset
        guard volume.size >= at + UInt64(Ext.superblockSize) else {
            throw CairnError(.malformedImage, "volume of \(volume.size) bytes is too small for an ext2/3/4 superblock", path: name, offset: at)
        }
        let raw = try volume.readBytes(at: at, count: Ext.superblockSize)
        let b = CheckedBytes(raw)
        func bad(_ what: String, _ field: Int) -> CairnError {
            CairnError(.malformedImage, "ext superblock: \(what)", path: name, offset: at + UInt64(field),
                       hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        guard b.u16(at: 0x38) == Ext.magic else { throw bad("no ext2/3/4 magic 0xEF53", 0x38) }
        let u32 = { (o: Int) -> UInt32 in b.u32(at: o) ?? 0 }
        let u16 = { (o: Int) -> UInt16 in b.u16(at: o) ?? 0 }

        revLevel = u32(0x4C)
        compat = revLevel >= 1 ? u32(0x5C) : 0
        incompat = revLevel >= 1 ? u32(0x60) : 0
        roCompat = revLevel >= 1 ? u32(0x64) : 0

        let unknown = incompat & ~Ext.Incompat.supported
        if unknown != 0 {
            if unknown & Ext.Incompat.journalDev != 0 {
                throw CairnError(.unsupported, "this is an external ext3/ext4 journal device, not a file system", path: name, offset: at + 0x60)
            }
            throw CairnError(.unsupported, "ext file system uses incompatible features this reader does not support: \(Ext.featureNames(unknown))",
                             path: name, offset: at + 0x60)
        }
        if roCompat & Ext.ROCompat.metadataCsum != 0 {
            guard b.u8(at: 0x175) == 1 else { throw bad("metadata_csum with an unknown checksum type \(b.u8(at: 0x175) ?? 0)", 0x175) }
            let stored = u32(0x3FC)
            let computed = CRC32C.enforced ? CRC32C.update(0xFFFF_FFFF, raw[0..<0x3FC]) : stored
            guard stored == computed else {
                throw bad("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", 0x3FC)
            }
        }

        inodesCount = u32(0x00)
        let is64 = incompat & Ext.Incompat.is64Bit != 0
        blocksCount = UInt64(u32(0x04)) | (is64 ? UInt64(u32(0x150)) << 32 : 0)
        freeBlocksCount = UInt64(u32(0x0C)) | (is64 ? UInt64(u32(0x158)) << 32 : 0)
        firstDataBlock = UInt64(u32(0x14))
        logBlockSize = u32(0x18)
        guard logBlockSize <= 6 else { throw bad("block size 2^(10+\(logBlockSize)) is out of range (1 KiB to 64 KiB)", 0x18) }
        blockSize = 1024 << Int(logBlockSize)
        let logCluster = u32(0x1C)
        if roCompat & Ext.ROCompat.bigalloc != 0 {
            guard logCluster >= logBlockSize, logCluster <= 29 else { throw bad("bigalloc cluster size 2^(10+\(logCluster)) is out of range", 0x1C) }
            clusterSize = 1024 << Int(logCluster)
        } else {
            clusterSize = blockSize
        }
        blocksPerGroup = UInt64(u32(0x20))
        clustersPerGroup = roCompat & Ext.ROCompat.bigalloc != 0 ? UInt64(u32(0x24)) : blocksPerGroup
        inodesPerGroup = u32(0x28)
        let bitsPerBlock = UInt64(blockSize) * 8
        guard clustersPerGroup >= 8, clustersPerGroup <= bitsPerBlock, clustersPerGroup % 8 == 0 else {
            throw bad("\(clustersPerGroup) blocks (clusters) per group is out of range (8 to \(bitsPerBlock), a multiple of 8)", 0x20)
        }
        guard blocksPerGroup == clustersPerGroup * UInt64(clusterSize / blockSize) else {
            throw bad("blocks per group \(blocksPerGroup) does not match clusters per group \(clustersPerGroup)", 0x20)
        }
        guard inodesPerGroup > 0, UInt64(inodesPerGroup) <= bitsPerBlock else {
            throw bad("\(inodesPerGroup) inodes per group is out of range (1 to \(bitsPerBlock))", 0x28)
        }
        if roCompat & Ext.ROCompat.bigalloc != 0 && firstDataBlock != 0 {
            throw bad("bigalloc with first data block \(firstDataBlock) (must be 0)", 0x14)
        }
        guard firstDataBlock == (blockSize == 1024 ? 1 : 0) || (blockSize == 1024 && firstDataBlock == 0 && clusterSize > blockSize) else {
            throw bad("first data block \(firstDataBlock) does not fit the \(blockSize)-byte block size", 0x14)
        }
        guard blocksCount > firstDataBlock else { throw bad("block count \(blocksCount) is too small", 0x04) }
        guard let fsBytes = mul(blocksCount, UInt64(blockSize)), fsBytes <= volume.size else {
            throw CairnError(.malformedImage, "the ext file system (\(blocksCount) blocks of \(blockSize) bytes) is larger than its volume (\(volume.size) bytes)",
                             path: name, offset: at + 0x04, hint: "the partition or image is truncated")
        }
        groupCount = (blocksCount - firstDataBlock + blocksPerGroup - 1) / blocksPerGroup
        guard groupCount <= Ext.maxGroups else { throw bad("\(groupCount) block groups is more than this reader accepts (\(Ext.maxGroups))", 0x20) }
        guard let totalInodes = mul(groupCount, UInt64(inodesPerGroup)), totalInodes == UInt64(inodesCount) else {
            throw bad("inode count \(inodesCount) is not \(groupCount) groups x \(inodesPerGroup) inodes", 0x00)
        }

        if revLevel == 0 {
            inodeSize = 128
        } else {
            inodeSize = Int(u16(0x58))
            guard inodeSize >= 128, inodeSize <= blockSize, inodeSize & (inodeSize - 1) == 0 else {
                throw bad("inode size \(inodeSize) is not a power of two between 128 and the block size", 0x58)
            }
        }
        if is64 {
            descSize = Int(u16(0xFE))
            guard descSize >= 64, descSize <= 1024, descSize & (descSize - 1) == 0 else {
                throw bad("group descriptor size \(descSize) is not a power of two between 64 and 1024", 0xFE)
            }
        } else {
            descSize = 32
        }
        uuid = Array(raw[0x68..<0x78])
        label = String(decoding: raw[0x78..<0x88].prefix { $0 != 0 }, as: UTF8.self)
        reservedGDTBlocks = UInt64(u16(0xCE))
        firstMetaBG = UInt64(u32(0x104))
        logGroupsPerFlex = b.u8(at: 0x174) ?? 0
        backupBGs = (u32(0x24C), u32(0x250))
        if incompat & Ext.Incompat.csumSeed != 0 {
            checksumSeed = u32(0x270)
        } else {
            checksumSeed = CRC32C.update(0xFFFF_FFFF, raw[0x68..<0x78])
        }
    }

    /// Whether group `g` holds a superblock backup (and, without meta_bg, a GDT copy).
    func groupHasSuper(_ g: UInt64) -> Bool {
        if g == 0 { return true }
        if compat & Ext.Compat.sparseSuper2 != 0 {
            return g == UInt64(backupBGs.0) || g == UInt64(backupBGs.1)
        }
        if g <= 1 || roCompat & Ext.ROCompat.sparseSuper == 0 { return true }
        if g & 1 == 0 { return false }
        for base: UInt64 in [3, 5, 7] {
            var p = base
            while p < g { p *= base }
            if p == g { return true }
        }
        return false
    }

    /// First block of group `g`.
    func groupFirstBlock(_ g: UInt64) -> UInt64 { firstDataBlock + g * blocksPerGroup }

    /// Number of blocks in group `g` (the last one may be short).
    func blocksInGroup(_ g: UInt64) -> UInt64 {
        let start = groupFirstBlock(g)
        return min(blocksPerGroup, blocksCount - start)
    }

    /// Number of group descriptor blocks.
    var descriptorBlocks: UInt64 { (groupCount + descPerBlock - 1) / descPerBlock }

    /// The block holding descriptor block `n` (meta_bg puts later ones in their meta group).
    func descriptorBlockLocation(_ n: UInt64) -> UInt64 {
        // The primary superblock is at byte 1024: block 1 with 1 KiB blocks, else block 0.
        let superBlock: UInt64 = blockSize == 1024 ? 1 : 0
        if !hasMetaBG || n < firstMetaBG { return superBlock + 1 + n }
        let g = n * descPerBlock
        var block = groupFirstBlock(g) + (groupHasSuper(g) ? 1 : 0)
        if blockSize == 1024 && n == 0 && firstDataBlock == 0 { block += 1 }
        return block
    }

    /// Blocks of group `g` used by the superblock backup and group descriptors (and the
    /// reserved GDT blocks), as a range of absolute block numbers starting at the group start.
    func superAndDescriptorBlocks(_ g: UInt64) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        let start = groupFirstBlock(g)
        let hasSuper = groupHasSuper(g)
        // With 1 KiB blocks the superblock of group 0 is block 1 (block 0 is the boot block,
        // outside every group when first_data_block is 1).
        if hasSuper { out.append(start..<start + 1) }
        let metaGroup = g / descPerBlock
        if !hasMetaBG || metaGroup < firstMetaBG {
            if hasSuper {
                let oldDesc = hasMetaBG ? firstMetaBG : descriptorBlocks + reservedGDTBlocks
                out.append(start + 1..<start + 1 + oldDesc)
            }
        } else {
            let r = g % descPerBlock
            if r == 0 || r == 1 || r == descPerBlock - 1 {
                let b = start + (hasSuper ? 1 : 0)
                out.append(b..<b + 1)
            }
        }
        return out
    }
}
