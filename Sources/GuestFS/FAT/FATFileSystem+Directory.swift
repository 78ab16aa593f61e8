import CairnCore

extension FATFileSystem {
    /// A parsed directory: its live entries (with their short entries) in on-disk order, and
    /// the first volume-label entry when there is one (meaningful in the root only).
    struct ParsedDirectory {
        var entries: [(DirectoryEntry, FATDirectoryEntry)] = []
        var label: String?
    }

    /// Long-name entries collected for the short entry that follows them.
    private struct PendingLongName {
        var checksum: UInt8
        var next: Int
        var parts: [[UInt16]]
    }

    /// Parses directory `node`: the fixed root region (FAT12/16), the root cluster chain
    /// (FAT32) or the clusters `runs` of a subdirectory.
    static func parseDirectory(node: UInt64, boot: FATBootSector, table: FATTable, volume: any BlockSource,
                               runs: [FATRun]? = nil) throws -> ParsedDirectory {
        var pieces: [(offset: UInt64, count: UInt64)] = []
        if let runs {
            pieces = runs.map { (boot.clusterOffset($0.cluster), $0.count * boot.clusterSize) }
        } else if boot.type == .fat32 {
            let rootRuns = try directoryRuns(first: boot.rootCluster, boot: boot, table: table, what: "root directory", entryOffset: 44)
            pieces = rootRuns.map { (boot.clusterOffset($0.cluster), $0.count * boot.clusterSize) }
        } else {
            pieces = [(boot.rootRegionOffset, boot.rootRegionBytes)]
        }
        var out = ParsedDirectory()
        var pending: PendingLongName?
        for piece in pieces {
            // Directory pieces are at most 2 MiB in all (checked by the chain walk) and lie
            // inside the volume (clusters below the limit, root region before the data).
            let bytes = try volume.readBytes(at: piece.offset, count: Int(piece.count))
            var at = 0
            while at + 32 <= bytes.count {
                defer { at += 32 }
                let position = piece.offset + UInt64(at)
                let first = bytes[at]
                if first == 0x00 { return out }
                if first == 0xE5 {
                    pending = nil
                    continue
                }
                guard let raw = FATDirectoryEntry(bytes, at: at) else { continue }
                if raw.isLongNamePart {
                    pending = longNamePart(bytes, at: at, pending: pending)
                    continue
                }
                defer { pending = nil }
                if raw.isVolumeLabel {
                    if out.label == nil {
                        out.label = FATName.trimTrailingSpaces(FATName.decode8Bit(raw.rawName))
                    }
                    continue
                }
                if raw.isDotEntry { continue }
                var e = raw
                if boot.type != .fat32 { e.firstCluster &= 0xFFFF }
                var name: String?
                if let p = pending, p.next == 0, p.checksum == FATName.checksum(e.rawName) {
                    name = FATName.longName(p.parts.flatMap { $0 })
                }
                guard let chosen = name ?? FATName.shortName(e.rawName, caseFlags: e.caseFlags) else {
                    throw CairnError(.malformedImage, "directory entry has an unusable 8.3 name (control characters, \"/\" or a blank start)",
                                     path: volume.name, offset: position, hint: "the file system is damaged; run fsck.fat on a restored copy")
                }
                out.entries.append((DirectoryEntry(name: chosen, node: position, kind: e.isDirectory ? .directory : .regular), e))
            }
        }
        return out
    }

    /// Adds the long-name entry at `at` to the set being collected. Layout: sequence number
    /// (0: 1-20, 0x40 on the last, which comes first on disk), name units 1-5 (1, 10 bytes),
    /// attributes 0x0F (11), type 0 (12), checksum (13), units 6-11 (14, 12 bytes), cluster 0
    /// (26), units 12-13 (28, 4 bytes). A set that breaks off, skips a number or changes
    /// checksum is dropped, and its short entry goes by its 8.3 name.
    private static func longNamePart(_ b: [UInt8], at o: Int, pending: PendingLongName?) -> PendingLongName? {
        let c = CheckedBytes(b)
        guard let seq = c.u8(at: o), let type = c.u8(at: o + 12), let sum = c.u8(at: o + 13), type == 0 else { return nil }
        let ord = Int(seq & 0xBF)
        guard ord >= 1, ord <= FATLimits.maxLFNEntries else { return nil }
        var units: [UInt16] = []
        for (start, n) in [(1, 5), (14, 6), (28, 2)] {
            for k in 0..<n {
                guard let u = c.u16(at: o + start + 2 * k) else { return nil }
                units.append(u)
            }
        }
        if seq & 0x40 != 0 {
            var parts = [[UInt16]](repeating: [], count: ord)
            parts[ord - 1] = units
            return PendingLongName(checksum: sum, next: ord - 1, parts: parts)
        }
        guard var p = pending, p.next == ord, p.checksum == sum, ord - 1 < p.parts.count else { return nil }
        p.parts[ord - 1] = units
        p.next = ord - 1
        return p
    }
}
