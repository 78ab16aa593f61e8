import CairnCore

/// A checked GPT header (UEFI spec 5.3.2). Field offsets: signature "EFI PART" (0), revision
/// (8), header size (12), header CRC32 (16), reserved (20), my LBA (24), alternate LBA (32),
/// first usable LBA (40), last usable LBA (48), disk GUID (56), partition entry LBA (72),
/// number of entries (80), entry size (84), entries CRC32 (88). All little-endian.
struct GPTHeader {
    var myLBA: UInt64
    var alternateLBA: UInt64
    var firstUsable: UInt64
    var lastUsable: UInt64
    var diskGUID: String
    var entriesLBA: UInt64
    var entryCount: UInt32
    var entrySize: UInt32
    var entriesCRC: UInt32

    static let signature: [UInt8] = Array("EFI PART".utf8)
}

/// Reads a GPT: the primary header at LBA 1 and the backup at the alternate LBA (or the last
/// sector), each with its entry array; uses the primary when it is valid, else the backup.
struct GPTReader {
    let disk: any BlockSource
    let sectorSize: UInt64
    var warnings: [String] = []

    init(disk: any BlockSource, sectorSize: UInt64) {
        self.disk = disk
        self.sectorSize = sectorSize
    }

    var diskSectors: UInt64 { disk.size / sectorSize }

    func fail(_ copy: String, _ message: String, at offset: UInt64) -> CairnError {
        CairnError(.malformedImage, "\(copy) GPT header: \(message)", path: disk.name, offset: offset)
    }

    /// Parses and validates the header at `lba`, and reads and validates its entry array.
    func header(at lba: UInt64, copy: String) throws -> (GPTHeader, [UInt8]) {
        guard lba < diskSectors, let base = mul(lba, sectorSize) else {
            throw fail(copy, "LBA \(lba) is past the end of the disk (\(diskSectors) sectors)", at: 0)
        }
        let b = CheckedBytes(try disk.readBytes(at: base, count: Int(sectorSize)))
        guard b.slice(at: 0, count: 8)?.elementsEqual(GPTHeader.signature) == true else {
            throw fail(copy, "signature \"EFI PART\" missing", at: base)
        }
        let revision = b.u32(at: 8) ?? 0
        guard revision >> 16 == 1 else {
            throw fail(copy, "revision \(revision >> 16).\(revision & 0xFFFF) is not 1.x", at: base + 8)
        }
        let headerSize = b.u32(at: 12) ?? 0
        guard headerSize >= 92, UInt64(headerSize) <= sectorSize else {
            throw fail(copy, "header size \(headerSize) is outside 92...\(sectorSize)", at: base + 12)
        }
        var raw = Array(b.slice(at: 0, count: Int(headerSize)) ?? [])
        let storedCRC = b.u32(at: 16) ?? 0
        for i in 16..<20 { raw[i] = 0 }
        let crc = CRC32.checksum(raw)
        guard crc == storedCRC else {
            throw fail(copy, "header CRC32 mismatch (stored 0x\(String(storedCRC, radix: 16)), computed 0x\(String(crc, radix: 16)))", at: base + 16)
        }
        let h = GPTHeader(myLBA: b.u64(at: 24) ?? 0, alternateLBA: b.u64(at: 32) ?? 0,
                          firstUsable: b.u64(at: 40) ?? 0, lastUsable: b.u64(at: 48) ?? 0,
                          diskGUID: guidString(b.slice(at: 56, count: 16) ?? []),
                          entriesLBA: b.u64(at: 72) ?? 0, entryCount: b.u32(at: 80) ?? 0,
                          entrySize: b.u32(at: 84) ?? 0, entriesCRC: b.u32(at: 88) ?? 0)
        guard h.myLBA == lba else {
            throw fail(copy, "my LBA \(h.myLBA) is not the header's location \(lba)", at: base + 24)
        }
        guard h.firstUsable <= h.lastUsable, h.lastUsable < diskSectors else {
            throw fail(copy, "usable LBA range \(h.firstUsable)...\(h.lastUsable) is empty or past the disk end (\(diskSectors) sectors)", at: base + 40)
        }
        guard h.entryCount <= PartitionTable.maxGPTEntries else {
            throw fail(copy, "number of partition entries \(h.entryCount) exceeds \(PartitionTable.maxGPTEntries)", at: base + 80)
        }
        guard h.entrySize >= 128, h.entrySize <= PartitionTable.maxGPTEntrySize, h.entrySize % 8 == 0 else {
            throw fail(copy, "partition entry size \(h.entrySize) is not a multiple of 8 in 128...\(PartitionTable.maxGPTEntrySize)", at: base + 84)
        }
        let arrayBytes = UInt64(h.entryCount) * UInt64(h.entrySize)
        guard h.entriesLBA >= 1, h.entriesLBA != lba, let arrayStart = mul(h.entriesLBA, sectorSize),
              arrayStart <= disk.size, arrayBytes <= disk.size - arrayStart else {
            throw fail(copy, "partition entry array (LBA \(h.entriesLBA), \(arrayBytes) bytes) lies outside the disk", at: base + 72)
        }
        let array = try disk.readBytes(at: arrayStart, count: Int(arrayBytes))
        let arrayCRC = CRC32.checksum(array)
        guard arrayCRC == h.entriesCRC else {
            throw fail(copy, "partition entry array CRC32 mismatch (stored 0x\(String(h.entriesCRC, radix: 16)), computed 0x\(String(arrayCRC, radix: 16)))", at: base + 88)
        }
        return (h, array)
    }

    mutating func read() throws -> (String, [Partition]) {
        var chosen: (GPTHeader, [UInt8])
        do {
            chosen = try header(at: 1, copy: "primary")
        } catch let primaryError as CairnError {
            let last = diskSectors - 1
            do {
                chosen = try header(at: last, copy: "backup")
            } catch let backupError as CairnError {
                throw CairnError(.malformedImage, "both GPT headers are unusable: \(primaryError.message); \(backupError.message)",
                                 path: disk.name, offset: primaryError.offset,
                                 hint: "the partition table is damaged; `sfdisk --verify` or `gdisk` may say more")
            }
            warnings.append("primary GPT unusable (\(primaryError.description)); used the backup at LBA \(last)")
            let (h, array) = chosen
            return (h.diskGUID, try entries(h, array))
        }
        // Check the backup too, so a damaged backup is reported while the primary still works.
        let alt = chosen.0.alternateLBA
        do {
            let backup = try header(at: alt, copy: "backup")
            if backup.0.alternateLBA != 1 || backup.1 != chosen.1 || backup.0.diskGUID != chosen.0.diskGUID {
                warnings.append("backup GPT header at LBA \(alt) does not match the primary")
            }
        } catch let e as CairnError {
            warnings.append("backup GPT unusable: \(e.description)")
        }
        if alt != diskSectors - 1 {
            warnings.append("primary GPT header's alternate LBA \(alt) is not the last sector \(diskSectors - 1) (disk resized?)")
        }
        let (h, array) = chosen
        return (h.diskGUID, try entries(h, array))
    }

    /// Parses the entry array. Entry fields: type GUID (0, 16), unique GUID (16, 16), first LBA
    /// (32), last LBA (40, inclusive), attributes (48), name (56, 72 bytes UTF-16LE).
    mutating func entries(_ h: GPTHeader, _ array: [UInt8]) throws -> [Partition] {
        let a = CheckedBytes(array)
        var out: [Partition] = []
        let arrayStart = h.entriesLBA &* sectorSize
        for i in 0..<Int(h.entryCount) {
            let o = i * Int(h.entrySize)
            guard let type = a.slice(at: o, count: 16), let unique = a.slice(at: o + 16, count: 16),
                  let first = a.u64(at: o + 32), let last = a.u64(at: o + 40), let attrs = a.u64(at: o + 48),
                  let nameSlice = a.slice(at: o + 56, count: 72) else {
                throw CairnError(.malformedImage, "GPT entry \(i + 1) is truncated", path: disk.name, offset: arrayStart &+ UInt64(o))
            }
            if type.allSatisfy({ $0 == 0 }) { continue }
            let entryOffset = arrayStart &+ UInt64(o)
            guard first <= last else {
                throw CairnError(.malformedImage, "GPT partition \(i + 1): first LBA \(first) is after last LBA \(last)",
                                 path: disk.name, offset: entryOffset + 32)
            }
            guard last < diskSectors, let start = mul(first, sectorSize) else {
                throw CairnError(.malformedImage, "GPT partition \(i + 1) (LBA \(first)...\(last)) extends past the end of the disk (\(diskSectors) sectors)",
                                 path: disk.name, offset: entryOffset + 40)
            }
            if first < h.firstUsable || last > h.lastUsable {
                // Linux accepts these; note it (partitioning tools refuse to create them).
                warnings.append("GPT partition \(i + 1) (LBA \(first)...\(last)) lies outside the usable range \(h.firstUsable)...\(h.lastUsable)")
            }
            let nameBytes = Array(nameSlice)
            var units: [UInt16] = []
            for k in 0..<36 {
                let u = UInt16(nameBytes[2 * k]) | UInt16(nameBytes[2 * k + 1]) << 8
                if u == 0 { break }
                units.append(u)
            }
            out.append(Partition(index: i + 1, start: start, length: (last - first + 1) * sectorSize,
                                 type: .gpt(guidString(type)), name: String(decoding: units, as: UTF16.self),
                                 uuid: guidString(unique), bootable: attrs & 4 != 0, attributes: attrs))
        }
        return out
    }
}
