import CairnCore

/// The three FAT variants, told apart by the count of data clusters only (Microsoft's FAT
/// specification, "FAT type determination"): fewer than 4085 is FAT12, fewer than 65525 is
/// FAT16, anything else FAT32.
package enum FATType: String, Sendable, Equatable {
    case fat12 = "FAT12", fat16 = "FAT16", fat32 = "FAT32"

    /// Width of one FAT entry in bits.
    var entryBits: UInt64 {
        switch self {
        case .fat12: 12
        case .fat16: 16
        case .fat32: 32
        }
    }

    /// Entries at or above this value end a chain.
    var endOfChain: UInt32 {
        switch self {
        case .fat12: 0xFF8
        case .fat16: 0xFFF8
        case .fat32: 0x0FFF_FFF8
        }
    }

    /// The value that marks a bad cluster.
    var badCluster: UInt32 { endOfChain - 1 }

    /// Mask applied to a raw entry (FAT32 entries keep 4 reserved high bits).
    var mask: UInt32 {
        switch self {
        case .fat12: 0xFFF
        case .fat16: 0xFFFF
        case .fat32: 0x0FFF_FFFF
        }
    }

    static func forClusterCount(_ n: UInt64) -> FATType {
        n < FATLimits.fat12MaxClusters ? .fat12 : (n < FATLimits.fat16MaxClusters ? .fat16 : .fat32)
    }
}

/// Magic numbers and limits of the FAT reader, in one place.
enum FATLimits {
    /// Cluster counts below these are FAT12 / FAT16 (Microsoft's rule).
    static let fat12MaxClusters: UInt64 = 4085
    static let fat16MaxClusters: UInt64 = 65525
    /// The largest directory the format allows: 65,536 entries of 32 bytes.
    static let maxDirectoryBytes: UInt64 = 65536 * 32
    /// Largest cluster accepted (128 sectors of 4096 bytes).
    static let maxClusterSize: UInt64 = 512 << 10
    /// Most long-name entries in one set (255 UTF-16 units / 13 per entry).
    static let maxLFNEntries = 20
    /// FSInfo signatures (lead, structure, trail).
    static let fsInfoLead: UInt32 = 0x4161_5252
    static let fsInfoStruct: UInt32 = 0x6141_7272
    static let fsInfoTrail: UInt32 = 0xAA55_0000
    /// Extended boot signatures that mean serial, label and type fields follow.
    static let extendedBootSignatures: Set<UInt8> = [0x28, 0x29]
}

/// The BIOS parameter block in sector 0 and the layout derived from it.
///
/// Common part (all little-endian): jump (0, 3 bytes: 0xEB xx 0x90 or 0xE9 xx xx), OEM name
/// (3, 8), bytes per sector (11, u16), sectors per cluster (13, u8), reserved sectors (14,
/// u16), number of FATs (16, u8), root entries (17, u16), total sectors 16 (19, u16), media
/// (21, u8), FAT size 16 (22, u16), total sectors 32 (32, u32); signature 0x55 0xAA at 510.
///
/// FAT12/16 extension at 36: drive (36), boot signature (38), serial (39, u32), label (43, 11).
/// FAT32 extension at 36: FAT size 32 (36, u32), flags (40, u16: bit 7 = only one FAT is
/// active, bits 0-3 = which), version (42, u16, must be 0), root cluster (44, u32), FSInfo
/// sector (48, u16), backup boot sector (50, u16), drive (64), boot signature (66), serial
/// (67, u32), label (71, 11).
struct FATBootSector: Sendable {
    var bytesPerSector: UInt64
    var sectorsPerCluster: UInt64
    var reservedSectors: UInt64
    var numberOfFATs: UInt64
    var rootEntries: UInt64
    var totalSectors: UInt64
    var fatSectors: UInt64
    var type: FATType
    var clusterCount: UInt64
    /// Which FAT copy is read (FAT32 with mirroring off: the active one; otherwise the first).
    var activeFAT: UInt64
    var rootCluster: UInt32
    var fsInfoSector: UInt64
    var serial: UInt32?
    var bootLabel: String?

    var clusterSize: UInt64 { bytesPerSector * sectorsPerCluster }
    /// Byte offset of the FAT that is read.
    var fatOffset: UInt64 { (reservedSectors + activeFAT * fatSectors) * bytesPerSector }
    /// The fixed root directory region (FAT12/16; empty on FAT32).
    var rootRegionOffset: UInt64 { (reservedSectors + numberOfFATs * fatSectors) * bytesPerSector }
    var rootRegionBytes: UInt64 { rootEntries * 32 }
    var rootDirSectors: UInt64 { (rootEntries * 32 + bytesPerSector - 1) / bytesPerSector }
    var dataOffset: UInt64 { rootRegionOffset + rootDirSectors * bytesPerSector }
    /// Bytes the FAT entries of clusters 0..<clusterCount+2 take (rounded up).
    var fatBytesUsed: UInt64 { ((clusterCount + 2) * type.entryBits + 7) / 8 }
    /// One past the highest valid cluster number.
    var clusterLimit: UInt64 { clusterCount + 2 }

    func clusterOffset(_ cluster: UInt32) -> UInt64 { dataOffset + (UInt64(cluster) - 2) * clusterSize }

    /// A cheap signature check on sector 0; never throws.
    static func looksLikeFAT(_ b: CheckedBytes) -> Bool {
        guard let jump = b.u8(at: 0), jump == 0xEB || jump == 0xE9,
              b.u8(at: 510) == 0x55, b.u8(at: 511) == 0xAA,
              let bps = b.u16(at: 11), [512, 1024, 2048, 4096].contains(bps),
              let spc = b.u8(at: 13), spc != 0, spc & (spc - 1) == 0,
              let reserved = b.u16(at: 14), reserved != 0,
              let fats = b.u8(at: 16), fats != 0,
              let media = b.u8(at: 21), media == 0xF0 || media >= 0xF8,
              let t16 = b.u16(at: 19), let t32 = b.u32(at: 32), t16 != 0 || t32 != 0,
              let f16 = b.u16(at: 22), let f32 = b.u32(at: 36), f16 != 0 || f32 != 0
        else { return false }
        return true
    }

    /// Parses and checks sector 0 of `volume` (at least 512 bytes of `b`).
    init(_ b: CheckedBytes, volume: any BlockSource) throws {
        let name = volume.name
        func bad(_ what: String, _ offset: UInt64) -> CairnError {
            CairnError(.malformedImage, "FAT boot sector: \(what)", path: name, offset: offset,
                       hint: "the file system is damaged; run fsck.fat on a restored copy")
        }
        guard let bps = b.u16(at: 11), let spc = b.u8(at: 13), let reserved = b.u16(at: 14), let fats = b.u8(at: 16),
              let rootEntries = b.u16(at: 17), let t16 = b.u16(at: 19), let f16 = b.u16(at: 22), let t32 = b.u32(at: 32),
              let f32 = b.u32(at: 36), b.u8(at: 510) == 0x55, b.u8(at: 511) == 0xAA
        else { throw bad("sector 0 is short or has no 0x55AA signature", 0) }
        guard [512, 1024, 2048, 4096].contains(bps) else {
            throw CairnError(.unsupported, "FAT with \(bps)-byte sectors is not supported (512, 1024, 2048 or 4096)", path: name, offset: 11)
        }
        guard spc != 0, spc & (spc - 1) == 0 else { throw bad("sectors per cluster \(spc) is not a power of two", 13) }
        guard reserved != 0 else { throw bad("no reserved sectors (the boot sector itself is one)", 14) }
        guard fats != 0 else { throw bad("number of FATs is 0", 16) }
        bytesPerSector = UInt64(bps)
        sectorsPerCluster = UInt64(spc)
        guard bytesPerSector * sectorsPerCluster <= FATLimits.maxClusterSize else {
            throw CairnError(.unsupported, "FAT clusters of \(bytesPerSector * sectorsPerCluster) bytes are larger than the \(FATLimits.maxClusterSize) supported",
                             path: name, offset: 13)
        }
        reservedSectors = UInt64(reserved)
        numberOfFATs = UInt64(fats)
        self.rootEntries = UInt64(rootEntries)
        totalSectors = t16 != 0 ? UInt64(t16) : UInt64(t32)
        fatSectors = f16 != 0 ? UInt64(f16) : UInt64(f32)
        guard totalSectors != 0 else { throw bad("total sector count is 0", 19) }
        guard fatSectors != 0 else { throw bad("FAT size is 0", 22) }
        guard (self.rootEntries * 32) % bytesPerSector == 0 else {
            throw bad("\(rootEntries) root entries do not fill whole \(bytesPerSector)-byte sectors", 17)
        }
        // All fields are at most 32 bits wide, so these sums and products fit in 64 bits.
        let rootSectors = (self.rootEntries * 32 + bytesPerSector - 1) / bytesPerSector
        let metaSectors = reservedSectors + numberOfFATs * fatSectors + rootSectors
        guard metaSectors < totalSectors else {
            throw bad("reserved sectors, FATs and root directory (\(metaSectors) sectors) do not fit in the \(totalSectors) sectors of the volume", 14)
        }
        clusterCount = (totalSectors - metaSectors) / sectorsPerCluster
        // A zero 16-bit FAT size means FAT32 whatever the cluster count: Linux decides so
        // (fs/fat/inode.c), and `mkfs.fat -F 32` makes such small volumes (EFI system
        // partitions). Otherwise the cluster count decides, as Microsoft's specification says.
        type = f16 == 0 ? .fat32 : FATType.forClusterCount(clusterCount)
        let volumeBytes = totalSectors * bytesPerSector
        guard volumeBytes <= volume.size else {
            throw CairnError(.malformedImage, "the FAT file system is \(volumeBytes) bytes long but its volume has only \(volume.size) bytes",
                             path: name, offset: 19, hint: "the image or partition is truncated")
        }

        var serialOffset = 39, labelOffset = 43, signatureOffset = 38
        activeFAT = 0
        rootCluster = 0
        fsInfoSector = 0
        if type == .fat32 {
            guard f16 == 0, rootEntries == 0 else {
                throw bad("\(clusterCount) clusters make this FAT32, but the FAT12/16 fields (root entries \(rootEntries), FAT size \(f16)) are set", 17)
            }
            guard let flags = b.u16(at: 40), let version = b.u16(at: 42), let root = b.u32(at: 44), let info = b.u16(at: 48) else {
                throw bad("FAT32 boot sector is short", 36)
            }
            guard version == 0 else {
                throw CairnError(.unsupported, "FAT32 version \(version >> 8).\(version & 0xFF) is not supported (only 0.0)", path: name, offset: 42)
            }
            if flags & 0x80 != 0 {
                activeFAT = UInt64(flags & 0x0F)
                guard activeFAT < numberOfFATs else { throw bad("active FAT \(activeFAT) does not exist (\(numberOfFATs) FATs)", 40) }
            }
            guard UInt64(root) >= 2, UInt64(root) < clusterCount + 2 else {
                throw bad("root cluster \(root) is outside the clusters 2..<\(clusterCount + 2)", 44)
            }
            rootCluster = root
            fsInfoSector = UInt64(info)
            serialOffset = 67
            labelOffset = 71
            signatureOffset = 66
        } else if rootEntries == 0 {
            throw bad("\(type.rawValue) file system without root directory entries", 17)
        }
        guard fatSectors * bytesPerSector >= ((clusterCount + 2) * type.entryBits + 7) / 8 else {
            throw bad("the FAT (\(fatSectors) sectors) is too small for \(clusterCount) clusters", 22)
        }
        if let sig = b.u8(at: signatureOffset), FATLimits.extendedBootSignatures.contains(sig), let s = b.u32(at: serialOffset) {
            serial = s
            if let raw = b.slice(at: labelOffset, count: 11), sig == 0x29 {
                let text = FATName.trimTrailingSpaces(FATName.decode8Bit(Array(raw)))
                bootLabel = text == "NO NAME" ? nil : text
            }
        }
    }
}
