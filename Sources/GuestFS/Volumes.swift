import CairnCore

/// How to recognise and open one kind of file system.
package struct FileSystemReader: Sendable {
    package var typeName: String
    package var probe: @Sendable (any BlockSource) -> Bool
    package var open: @Sendable (any BlockSource) throws -> any FileSystem

    package init(typeName: String, probe: @escaping @Sendable (any BlockSource) -> Bool,
                 open: @escaping @Sendable (any BlockSource) throws -> any FileSystem) {
        self.typeName = typeName
        self.probe = probe
        self.open = open
    }

    /// The first reader whose signature matches, opened; nil when none matches. A matching
    /// signature whose file system then fails to open is an error (the volume is damaged).
    package static func open(_ volume: any BlockSource, readers: [FileSystemReader] = all) throws -> (any FileSystem)? {
        for r in readers where r.probe(volume) {
            return try r.open(volume)
        }
        return nil
    }
}

/// What a volume (a partition, a logical volume, a whole disk) holds.
package enum VolumeContent: Sendable {
    /// A file system Cairn reads.
    case fileSystem(any FileSystem)
    /// Linux swap (signature SWAPSPACE2): everything after its header page is scratch space.
    case swap
    /// An LVM2 physical volume; its logical volumes are listed as volumes of their own.
    case lvmPhysicalVolume(volumeGroup: String)
    /// A file-system signature was found but the file system could not be opened.
    case damaged(typeName: String, reason: String)
    /// Nothing recognised (or an unsupported file system).
    case unrecognized

    package var summary: String {
        switch self {
        case .fileSystem(let fs): fs.typeName
        case .swap: "swap"
        case .lvmPhysicalVolume(let vg): "LVM2 PV (\(vg))"
        case .damaged(let t, _): "\(t) (damaged)"
        case .unrecognized: "unrecognized"
        }
    }
}

/// One volume of a disk, with the way back from its byte offsets to the disk's.
package struct Volume: Sendable {
    /// "p1" for partition 1, "VG/LV" for a logical volume, "" for a file system on the whole
    /// disk (no partition table).
    package var name: String
    package var source: any BlockSource
    package var content: VolumeContent
    package var partition: Partition?
    /// The disk byte ranges that hold the volume's `[offset, offset + length)`, in order.
    package var toDisk: @Sendable (Range<UInt64>) -> [Range<UInt64>]

    package var fileSystem: (any FileSystem)? {
        if case .fileSystem(let fs) = content { return fs }
        return nil
    }
}

/// A disk's partition table and volumes, found without trusting anything: every structure is
/// read through the checked parsers; a damaged part is reported and the rest still listed.
package struct DiskLayout: Sendable {
    package var table: PartitionTable
    package var volumes: [Volume]
    /// What was skipped or repaired around, for the user.
    package var warnings: [String]

    /// The page size whose swap signature is recognised (x86-64 and most Linux machines).
    package static let swapPageSize: UInt64 = 4096

    /// Scans `disk`: the partition table (or the whole disk as one volume), and in each
    /// partition a file system, swap or an LVM physical volume (whose logical volumes follow).
    package static func scan(_ disk: any BlockSource, readers: [FileSystemReader] = FileSystemReader.all) -> DiskLayout {
        var warnings: [String] = []
        let table: PartitionTable
        do {
            table = try PartitionTable.read(disk)
            warnings += table.warnings
        } catch {
            warnings.append("partition table: \(describe(error)); the disk is read as one volume")
            table = PartitionTable(scheme: .none, partitions: [], warnings: [], diskGUID: nil, mbrDiskSignature: 0)
        }
        var volumes: [Volume] = []
        var lvmCandidates: [(Volume, any BlockSource)] = []
        if table.scheme == .none {
            let v = classify(name: "", source: disk, partition: nil, toDisk: { [$0] }, readers: readers, warnings: &warnings)
            if case .lvmPhysicalVolume = v.content { lvmCandidates.append((v, disk)) }
            volumes.append(v)
        } else {
            for p in table.partitions where !p.isExtendedContainer {
                let name = "p\(p.index)"
                guard let window = try? PartitionSource(disk: disk, partition: p) else {
                    warnings.append("\(name): lies outside the disk; skipped")
                    continue
                }
                let start = p.start
                let v = classify(name: name, source: window, partition: p, toDisk: { r in [start + r.lowerBound..<start + r.upperBound] },
                                 readers: readers, warnings: &warnings)
                if case .lvmPhysicalVolume = v.content { lvmCandidates.append((v, window)) }
                volumes.append(v)
            }
        }
        volumes += LVMScan.logicalVolumes(of: lvmCandidates, readers: readers, warnings: &warnings)
        return DiskLayout(table: table, volumes: volumes, warnings: warnings)
    }

    /// What `source` holds: swap, an LVM2 PV (unless `lookForLVM` is off, as inside a logical
    /// volume), a file system, or nothing recognised.
    static func classify(name: String, source: any BlockSource, partition: Partition?,
                         toDisk: @escaping @Sendable (Range<UInt64>) -> [Range<UInt64>],
                         readers: [FileSystemReader], lookForLVM: Bool = true, warnings: inout [String]) -> Volume {
        var v = Volume(name: name, source: source, content: .unrecognized, partition: partition, toDisk: toDisk)
        if isSwap(source) {
            v.content = .swap
            return v
        }
        if lookForLVM, let lvm = LVMScan.classify(source, name: name.isEmpty ? "disk" : name, warnings: &warnings) {
            v.content = lvm
            return v
        }
        for r in readers where r.probe(source) {
            do {
                v.content = .fileSystem(try r.open(source))
            } catch {
                let reason = describe(error)
                v.content = .damaged(typeName: r.typeName, reason: reason)
                warnings.append("\(name.isEmpty ? "disk" : name): \(r.typeName) signature found but it cannot be read: \(reason)")
            }
            return v
        }
        if let (typeName, reason) = lostFileSystem(source) {
            v.content = .damaged(typeName: typeName, reason: reason)
            warnings.append("\(name.isEmpty ? "disk" : name): \(reason)")
        }
        return v
    }

    /// A file system whose primary signature is gone but whose backup copy remains: an ext
    /// backup superblock in block group 1, or NTFS's backup boot sector in the volume's last
    /// sector. Such a volume is damaged, not empty (its checker can often repair it from the
    /// backup).
    static func lostFileSystem(_ source: any BlockSource) -> (typeName: String, reason: String)? {
        if let (offset, typeName) = ExtSuperblock.findBackup(source) {
            return (typeName, "the primary ext superblock (byte 1024) has no ext2/3/4 magic, but a backup superblock (\(typeName)) is at byte \(offset): the superblock is damaged")
        }
        if source.size >= 1024, let raw = try? source.readBytes(at: source.size - 512, count: 512) {
            var why = ""
            if NTFSBootSector(CheckedBytes(raw), why: &why) != nil {
                return ("ntfs", "the NTFS boot sector (byte 0) is not valid, but its backup is in the volume's last sector (byte \(source.size - 512)): the boot sector is damaged")
            }
        }
        return nil
    }

    /// Linux swap: "SWAPSPACE2" in the last 10 bytes of the first page (a hibernation image
    /// replaces it with another signature and is then not treated as swap).
    package static func isSwap(_ source: any BlockSource) -> Bool {
        guard source.size > swapPageSize * 2,
              let sig = try? source.readBytes(at: swapPageSize - 10, count: 10) else { return false }
        return sig == Array("SWAPSPACE2".utf8)
    }

    /// The volume named `name`, or nil.
    package func volume(named name: String) -> Volume? {
        volumes.first { $0.name == name }
    }

    /// Disk byte ranges the guest marks free: free space of every readable file system,
    /// swap space after its header page, and LVM extents no logical volume uses. Ascending and
    /// merged. A file system that cannot report its free space contributes nothing (and a
    /// warning): skipping is only ever an optimisation.
    package func freeDiskRanges(warnings: inout [String]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for v in volumes {
            switch v.content {
            case .fileSystem(let fs):
                do {
                    for r in try fs.freeRanges() { out += v.toDisk(r) }
                } catch {
                    warnings.append("\(v.name.isEmpty ? "disk" : v.name): free space of \(fs.typeName) not read (\(describe(error))); its blocks are all backed up")
                }
            case .swap:
                if v.source.size > Self.swapPageSize { out += v.toDisk(Self.swapPageSize..<v.source.size) }
            case .lvmPhysicalVolume, .damaged, .unrecognized:
                break
            }
        }
        out += LVMScan.unusedDiskRanges(of: volumes.filter {
            if case .lvmPhysicalVolume = $0.content { return true } else { return false }
        })
        return out.mergedAscending()
    }
}

/// The text of an error for a warning line.
package func describe(_ error: any Error) -> String {
    if let e = error as? CairnError { return e.message }
    return "\(error)"
}
