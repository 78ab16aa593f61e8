import CairnCore

/// The kind of partition table found at the start of a disk.
package enum PartitionScheme: String, Sendable, Equatable {
    case mbr, gpt, none
}

/// A partition's type: the MBR system-id byte or the GPT partition type GUID
/// (canonical lowercase text form).
package enum PartitionType: Sendable, Equatable, CustomStringConvertible {
    case mbr(UInt8)
    case gpt(String)

    package var description: String {
        switch self {
        case .mbr(let b):
            let digits: [Character] = Array("0123456789abcdef")
            return String([digits[Int(b >> 4)], digits[Int(b & 0xF)]])
        case .gpt(let g): return g
        }
    }
}

/// One partition, numbered as Linux numbers it: MBR primaries 1-4 by slot, logical
/// partitions from 5 in chain order; GPT entries by slot (entry i is partition i + 1).
package struct Partition: Sendable, Equatable {
    package var index: Int
    /// Offset of the first byte on the disk.
    package var start: UInt64
    /// Length in bytes.
    package var length: UInt64
    package var type: PartitionType
    /// GPT partition name (UTF-16LE, up to 36 code units); empty for MBR.
    package var name: String
    /// GPT unique partition GUID; nil for MBR.
    package var uuid: String?
    /// MBR boot flag 0x80, or GPT attribute bit 2 (legacy BIOS bootable).
    package var bootable: Bool
    /// An MBR extended partition (0x05, 0x0F, 0x85): a container of logical partitions, not a
    /// file system.
    package var isExtendedContainer: Bool
    /// GPT attribute bits (0 for MBR).
    package var attributes: UInt64

    package init(index: Int, start: UInt64, length: UInt64, type: PartitionType, name: String = "", uuid: String? = nil,
                 bootable: Bool = false, isExtendedContainer: Bool = false, attributes: UInt64 = 0) {
        self.index = index
        self.start = start
        self.length = length
        self.type = type
        self.name = name
        self.uuid = uuid
        self.bootable = bootable
        self.isExtendedContainer = isExtendedContainer
        self.attributes = attributes
    }

    package var end: UInt64 { start + length }
}

/// A parsed partition table: scheme, partitions (ascending index) and anything that was
/// repaired around (for instance "primary GPT header corrupt, used the backup").
package struct PartitionTable: Sendable, Equatable {
    package var scheme: PartitionScheme
    package var partitions: [Partition]
    package var warnings: [String]
    /// GPT disk GUID; nil for MBR / none.
    package var diskGUID: String?
    /// The MBR disk signature (bytes 440-443), 0 for GPT / none.
    package var mbrDiskSignature: UInt32

    /// Largest number of GPT entries accepted (the usual table has 128).
    package static let maxGPTEntries: UInt32 = 4096
    /// Largest GPT entry size accepted.
    package static let maxGPTEntrySize: UInt32 = 4096
    /// Most logical partitions (EBRs) followed in one extended partition.
    package static let maxLogicalPartitions = 128

    /// Reads the partition table of `disk`. Returns scheme `.none` when there is no MBR boot
    /// signature (or the sector is not an MBR: boot flags other than 0x00 / 0x80); throws
    /// `.malformedImage` for a table that is present but inconsistent.
    package static func read(_ disk: any BlockSource, sectorSize: Int = 512) throws -> PartitionTable {
        guard [512, 1024, 2048, 4096].contains(sectorSize) else {
            throw CairnError(.unsupported, "sector size \(sectorSize) is not supported (512, 1024, 2048 or 4096)", path: disk.name)
        }
        var table = PartitionTable(scheme: .none, partitions: [], warnings: [], diskGUID: nil, mbrDiskSignature: 0)
        guard disk.size >= UInt64(sectorSize) else { return table }
        let mbr = CheckedBytes(try disk.readBytes(at: 0, count: 512))
        guard mbr.u8(at: 510) == 0x55, mbr.u8(at: 511) == 0xAA else { return table }
        let entries = (0..<4).compactMap { MBREntry(mbr, slot: $0) }
        guard entries.count == 4, entries.allSatisfy({ $0.boot == 0 || $0.boot == 0x80 }) else { return table }
        if entries.contains(where: { $0.type == 0xEE }) {
            var reader = GPTReader(disk: disk, sectorSize: UInt64(sectorSize))
            let (guid, parts) = try reader.read()
            table.scheme = .gpt
            table.diskGUID = guid
            table.partitions = parts
            table.warnings = reader.warnings
            return table
        }
        table.scheme = .mbr
        table.mbrDiskSignature = mbr.u32(at: 440) ?? 0
        table.partitions = try readMBR(disk, entries: entries, sectorSize: UInt64(sectorSize), warnings: &table.warnings)
        return table
    }
}

// MARK: - MBR

/// One 16-byte MBR partition entry: boot flag (0), CHS start (1-3), type (4), CHS end (5-7),
/// start LBA (8, u32 LE), sector count (12, u32 LE).
struct MBREntry {
    var boot: UInt8
    var type: UInt8
    var lba: UInt32
    var sectors: UInt32

    /// The entry in slot `slot` (0-3) of the sector `b` (table at byte 446).
    init?(_ b: CheckedBytes, slot: Int) {
        let o = 446 + 16 * slot
        guard let boot = b.u8(at: o), let type = b.u8(at: o + 4), let lba = b.u32(at: o + 8), let n = b.u32(at: o + 12) else { return nil }
        self.boot = boot
        self.type = type
        self.lba = lba
        self.sectors = n
    }

    var isEmpty: Bool { type == 0 || sectors == 0 }
    var isExtended: Bool { MBREntry.extendedTypes.contains(type) }
    static let extendedTypes: Set<UInt8> = [0x05, 0x0F, 0x85]
}

extension PartitionTable {
    static func readMBR(_ disk: any BlockSource, entries: [MBREntry], sectorSize: UInt64, warnings: inout [String]) throws -> [Partition] {
        var out: [Partition] = []
        var nextLogical = 5
        for (slot, e) in entries.enumerated() where !e.isEmpty {
            let index = slot + 1
            let start = UInt64(e.lba) * sectorSize
            let length = UInt64(e.sectors) * sectorSize
            try checkInside(disk, start: start, length: length, what: "MBR partition \(index)", entryOffset: UInt64(446 + 16 * slot))
            out.append(Partition(index: index, start: start, length: length, type: .mbr(e.type),
                                 bootable: e.boot == 0x80, isExtendedContainer: e.isExtended))
            if e.isExtended {
                out += try readEBRChain(disk, extendedLBA: UInt64(e.lba), extendedSectors: UInt64(e.sectors),
                                        sectorSize: sectorSize, nextIndex: &nextLogical, warnings: &warnings)
            }
        }
        return out.sorted { $0.index < $1.index }
    }

    static func checkInside(_ disk: any BlockSource, start: UInt64, length: UInt64, what: String, entryOffset: UInt64) throws {
        guard start <= disk.size, length <= disk.size - start else {
            throw CairnError(.malformedImage, "\(what) (start \(start), length \(length) bytes) extends past the end of the disk (\(disk.size) bytes)",
                             path: disk.name, offset: entryOffset)
        }
    }

    /// Follows the EBR chain of the extended partition at `extendedLBA`. In each EBR, entry 1
    /// is the logical partition (start relative to this EBR) and entry 2 links to the next EBR
    /// (start relative to the extended partition's start); the chain ends when entry 2 is empty.
    static func readEBRChain(_ disk: any BlockSource, extendedLBA: UInt64, extendedSectors: UInt64, sectorSize: UInt64,
                             nextIndex: inout Int, warnings: inout [String]) throws -> [Partition] {
        var out: [Partition] = []
        var visited: Set<UInt64> = []
        var ebrLBA = extendedLBA
        let extendedEnd = extendedLBA + extendedSectors
        while true {
            let ebrOffset = ebrLBA * sectorSize
            guard visited.insert(ebrLBA).inserted else {
                throw CairnError(.malformedImage, "the extended partition's EBR chain loops (EBR at sector \(ebrLBA) is visited twice)",
                                 path: disk.name, offset: ebrOffset)
            }
            guard visited.count <= maxLogicalPartitions else {
                throw CairnError(.malformedImage, "the extended partition's EBR chain has more than \(maxLogicalPartitions) entries",
                                 path: disk.name, offset: ebrOffset)
            }
            guard ebrLBA >= extendedLBA, ebrLBA < extendedEnd else {
                throw CairnError(.malformedImage, "EBR at sector \(ebrLBA) lies outside the extended partition (sectors \(extendedLBA)..<\(extendedEnd))",
                                 path: disk.name, offset: ebrOffset)
            }
            guard ebrOffset <= disk.size, sectorSize <= disk.size - ebrOffset else {
                throw CairnError(.malformedImage, "EBR at sector \(ebrLBA) lies past the end of the disk", path: disk.name, offset: ebrOffset)
            }
            let sector = CheckedBytes(try disk.readBytes(at: ebrOffset, count: 512))
            guard sector.u8(at: 510) == 0x55, sector.u8(at: 511) == 0xAA else {
                throw CairnError(.malformedImage, "EBR at sector \(ebrLBA) has no 0x55AA signature", path: disk.name, offset: ebrOffset + 510)
            }
            guard let data = MBREntry(sector, slot: 0), let link = MBREntry(sector, slot: 1) else {
                throw CairnError(.malformedImage, "EBR at sector \(ebrLBA) is truncated", path: disk.name, offset: ebrOffset)
            }
            if !data.isEmpty && !data.isExtended {
                let index = nextIndex
                nextIndex += 1
                let start = (ebrLBA + UInt64(data.lba)) * sectorSize
                let length = UInt64(data.sectors) * sectorSize
                try checkInside(disk, start: start, length: length, what: "logical partition \(index)", entryOffset: ebrOffset + 446)
                if start + length > extendedEnd * sectorSize {
                    warnings.append("logical partition \(index) extends past the end of its extended partition")
                }
                out.append(Partition(index: index, start: start, length: length, type: .mbr(data.type), bootable: data.boot == 0x80))
            }
            guard !link.isEmpty, link.isExtended else { break }
            ebrLBA = extendedLBA + UInt64(link.lba)
        }
        return out
    }
}
