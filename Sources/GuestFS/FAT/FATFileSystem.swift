import CairnCore
import Synchronization

/// A read-only FAT12 / FAT16 / FAT32 file system (see docs/FAT.md).
///
/// Nodes are byte offsets in the volume of a file's or directory's 32-byte short directory
/// entry; the root directory, which has no entry, is node 0 (the boot sector, never an entry).
/// Because a node is a position, a directory that is reached twice through cross-linked or
/// looping clusters lists the same nodes again, and `walk` stops there.
package struct FATFileSystem: FileSystem {
    package let volume: any BlockSource
    package let typeName = "vfat"
    package let label: String
    package let uuid: String?
    package let blockSize: Int
    package let rootNode: UInt64 = 0
    /// FAT12, FAT16 or FAT32, by cluster count.
    package let fatType: FATType
    /// The free-cluster count the FAT32 FSInfo sector claims (a hint; nil when absent or
    /// unknown). `freeRanges` reads the FAT itself.
    package let fsInfoFreeClusters: UInt32?

    let boot: FATBootSector
    let table: FATTable
    let cache = FATCache()

    package static func probe(_ volume: any BlockSource) -> Bool {
        guard volume.size >= 512, let sector = try? volume.readBytes(at: 0, count: 512) else { return false }
        return FATBootSector.looksLikeFAT(CheckedBytes(sector))
    }

    package init(volume: any BlockSource) throws {
        self.volume = volume
        guard volume.size >= 512 else {
            throw CairnError(.malformedImage, "volume of \(volume.size) bytes is too small for a FAT boot sector", path: volume.name, offset: 0)
        }
        let sector0 = try volume.readBytes(at: 0, count: 512)
        guard FATBootSector.looksLikeFAT(CheckedBytes(sector0)) else {
            throw CairnError(.malformedImage, "no FAT boot sector (jump instruction, 0x55AA signature or BPB fields do not match)",
                             path: volume.name, offset: 0)
        }
        let boot = try FATBootSector(CheckedBytes(sector0), volume: volume)
        self.boot = boot
        fatType = boot.type
        blockSize = Int(boot.clusterSize)
        table = try FATTable(boot: boot, volume: volume)
        uuid = boot.serial.map { s in
            let hex = String(s, radix: 16, uppercase: true)
            let padded = String(repeating: "0", count: max(0, 8 - hex.count)) + hex
            return padded.prefix(4) + "-" + padded.suffix(4)
        }
        fsInfoFreeClusters = Self.readFSInfo(boot, volume)
        // The label: the root directory's volume-label entry wins over the boot sector's copy
        // (as blkid and Windows do); a damaged root leaves the boot sector's.
        let root = try? Self.parseDirectory(node: 0, boot: boot, table: table, volume: volume)
        if let root { cache.store(listing: root.entries.map(\.0), entries: root.entries.map { ($0.0.node, $0.1) }, for: 0) }
        label = root?.label.flatMap { $0 == "NO NAME" ? nil : $0 } ?? boot.bootLabel ?? ""
    }

    /// The FSInfo free-cluster count, when the sector is inside the reserved area and carries
    /// its three signatures (lead at 0, structure at 484, trail at 508; free count at 488).
    static func readFSInfo(_ boot: FATBootSector, _ volume: any BlockSource) -> UInt32? {
        guard boot.type == .fat32, boot.fsInfoSector >= 1, boot.fsInfoSector < boot.reservedSectors,
              let s = try? volume.readBytes(at: boot.fsInfoSector * boot.bytesPerSector, count: 512)
        else { return nil }
        let b = CheckedBytes(s)
        guard b.u32(at: 0) == FATLimits.fsInfoLead, b.u32(at: 484) == FATLimits.fsInfoStruct, b.u32(at: 508) == FATLimits.fsInfoTrail,
              let free = b.u32(at: 488), UInt64(free) <= boot.clusterCount
        else { return nil }
        return free
    }

    // MARK: - Entries

    /// The short entry of `node`, from the cache or read from the volume.
    func entry(of node: UInt64) throws -> FATDirectoryEntry {
        if let hit = cache.entry(node) { return hit }
        let dataEnd = boot.dataOffset + boot.clusterCount * boot.clusterSize
        guard node % 32 == 0, node >= boot.rootRegionOffset, node < dataEnd, 32 <= dataEnd - node else {
            throw CairnError(.malformedImage, "node \(node) is not the position of a FAT directory entry", path: volume.name, offset: node)
        }
        let bytes = try volume.readBytes(at: node, count: 32)
        guard let e = FATDirectoryEntry(bytes, at: 0), bytes[0] != 0, bytes[0] != 0xE5, !e.isLongNamePart, !e.isVolumeLabel, !e.isDotEntry else {
            throw CairnError(.malformedImage, "node \(node) is not a live file or directory entry", path: volume.name, offset: node)
        }
        let found = normalized(e)
        cache.store(entry: found, for: node)
        return found
    }

    /// The clusters of the FAT32 root directory (cached like any directory's).
    func rootRuns() throws -> [FATRun] {
        if let hit = cache.runs(rootNode) { return hit }
        let runs = try Self.directoryRuns(first: boot.rootCluster, boot: boot, table: table, what: "root directory", entryOffset: 44)
        cache.store(runs: runs, for: rootNode)
        return runs
    }

    /// Drops the high cluster half outside FAT32 (it must be 0 there; some tools store
    /// other data in it).
    func normalized(_ e: FATDirectoryEntry) -> FATDirectoryEntry {
        var e = e
        if boot.type != .fat32 { e.firstCluster &= 0xFFFF }
        return e
    }

    /// The clusters of `node`'s content as runs: for files exactly as many clusters as the
    /// size needs (a longer chain is tolerated, its tail ignored), for directories the whole
    /// chain (at most 2 MiB).
    func runs(of node: UInt64, _ e: FATDirectoryEntry) throws -> [FATRun] {
        if let hit = cache.runs(node) { return hit }
        let cs = boot.clusterSize
        let runs: [FATRun]
        if e.isDirectory {
            runs = try Self.directoryRuns(first: e.firstCluster, boot: boot, table: table, what: "directory at node \(node)", entryOffset: node)
        } else {
            let needed = (UInt64(e.size) + cs - 1) / cs
            if needed == 0 { return [] }
            guard needed <= boot.clusterCount else {
                throw CairnError(.malformedImage, "file at node \(node) has \(e.size) bytes, more than the \(boot.clusterCount) clusters of the volume hold",
                                 path: volume.name, offset: node + 28, hint: "the file system is damaged; run fsck.fat on a restored copy")
            }
            guard e.firstCluster != 0 else {
                throw CairnError(.malformedImage, "file at node \(node) has \(e.size) bytes but no first cluster", path: volume.name, offset: node + 20,
                                 hint: "the file system is damaged; run fsck.fat on a restored copy")
            }
            let found = try table.chain(from: e.firstCluster, maxClusters: needed, what: { "file at node \(node)" }, entryOffset: node + 20)
            let got = found.runs.last.map { $0.logical + $0.count } ?? 0
            guard got == needed else {
                throw CairnError(.malformedImage, "file at node \(node) has \(e.size) bytes but its cluster chain only \(got * cs)",
                                 path: volume.name, offset: node + 20, hint: "the file system is damaged; run fsck.fat on a restored copy")
            }
            runs = found.runs
        }
        cache.store(runs: runs, for: node)
        return runs
    }

    static func directoryRuns(first: UInt32, boot: FATBootSector, table: FATTable, what: String, entryOffset: UInt64) throws -> [FATRun] {
        let cs = boot.clusterSize
        let maxClusters = min(boot.clusterCount, (FATLimits.maxDirectoryBytes + cs - 1) / cs)
        let found = try table.chain(from: first, maxClusters: maxClusters, what: { what }, entryOffset: entryOffset)
        guard !found.longer else {
            throw CairnError(.malformedImage, "\(what) is longer than \(maxClusters) clusters (FAT directories hold at most 65536 entries) or its chain loops",
                             path: table.volume.name, offset: entryOffset, hint: "the file system is damaged; run fsck.fat on a restored copy")
        }
        return found.runs
    }

    // MARK: - FileSystem

    package func metadata(of node: UInt64) throws -> FileMetadata {
        if node == rootNode {
            let size = boot.type == .fat32 ? try rootRuns().reduce(0) { $0 + $1.count } * boot.clusterSize : boot.rootRegionBytes
            return FileMetadata(kind: .directory, permissions: 0o755, size: size, modified: FileTime(seconds: 0))
        }
        let e = try entry(of: node)
        var size = UInt64(e.size)
        if e.isDirectory { size = try runs(of: node, e).reduce(0) { $0 + $1.count } * boot.clusterSize }
        return FileMetadata(kind: e.isDirectory ? .directory : .regular, permissions: e.permissions, size: size,
                            modified: e.modified, accessed: e.accessed, changed: e.modified, created: e.created)
    }

    package func directory(_ node: UInt64) throws -> [DirectoryEntry] {
        if let hit = cache.listing(node) { return hit }
        var runs: [FATRun]?
        if node != rootNode {
            let e = try entry(of: node)
            guard e.isDirectory else {
                throw CairnError(.malformedImage, "node \(node) is a file, not a directory", path: volume.name, offset: node)
            }
            runs = try self.runs(of: node, e)
        } else if boot.type == .fat32 {
            runs = try rootRuns()
        }
        let parsed = try Self.parseDirectory(node: node, boot: boot, table: table, volume: volume, runs: runs)
        cache.store(listing: parsed.entries.map(\.0), entries: parsed.entries.map { ($0.0.node, $0.1) }, for: node)
        return parsed.entries.map(\.0)
    }

    package func readLink(_ node: UInt64) throws -> String {
        throw CairnError(.malformedImage, "FAT has no symbolic links (node \(node))", path: volume.name)
    }

    package func read(_ node: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let e = try entry(of: node)
        guard !e.isDirectory else {
            throw CairnError(.malformedImage, "node \(node) is a directory, not a file", path: volume.name, offset: node)
        }
        let size = UInt64(e.size)
        guard offset < size, buffer.count > 0 else { return 0 }
        let total = Int(min(UInt64(buffer.count), size - offset))
        let runs = try runs(of: node, e)
        let cs = boot.clusterSize
        var done = 0
        while done < total {
            let pos = offset + UInt64(done)
            let index = pos / cs
            // The last run that starts at or before `index` (runs are in logical order).
            var lo = 0, hi = runs.count
            while hi - lo > 1 {
                let mid = (lo + hi) / 2
                if runs[mid].logical <= index { lo = mid } else { hi = mid }
            }
            guard lo < runs.count, runs[lo].logical <= index, index < runs[lo].logical + runs[lo].count else {
                throw CairnError(.malformedImage, "file at node \(node) has no cluster for byte \(pos)", path: volume.name, offset: node)
            }
            let run = runs[lo]
            let physical = boot.clusterOffset(run.cluster) + (index - run.logical) * cs + pos % cs
            let runEnd = (run.logical + run.count) * cs
            let n = Int(min(UInt64(total - done), runEnd - pos))
            try volume.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]), at: physical)
            done += n
        }
        return total
    }

    /// The cached cluster runs of the file, clipped to its size (an empty file has none).
    /// Directories, the root included, throw.
    package func fileExtents(_ node: UInt64) throws -> [FileExtent]? {
        guard node != rootNode else {
            throw CairnError(.usage, "node \(node) is the root directory, not a file; only regular files have extents", path: volume.name)
        }
        let e = try entry(of: node)
        guard !e.isDirectory else {
            throw CairnError(.usage, "node \(node) is a directory, not a file; only regular files have extents", path: volume.name, offset: node)
        }
        let size = UInt64(e.size)
        let cs = boot.clusterSize
        var out: [FileExtent] = []
        // The runs cover exactly the clusters the size needs, in logical order from 0.
        for run in try runs(of: node, e) {
            let start = run.logical * cs
            guard start < size else { break }
            out.append(logicalOffset: start, physicalOffset: boot.clusterOffset(run.cluster), length: min(run.count * cs, size - start))
        }
        return out
    }

    package func freeRanges() throws -> [Range<UInt64>] {
        try table.freeRanges()
    }
}

/// Bounded caches: short entries and listings of directories already parsed, and the
/// cluster runs of files and directories.
final class FATCache: Sendable {
    struct State {
        var entries: [UInt64: FATDirectoryEntry] = [:]
        var listings: [UInt64: [DirectoryEntry]] = [:]
        var listedEntries = 0
        var runs: [UInt64: [FATRun]] = [:]
        var runCount = 0
    }

    static let maxEntries = 200_000
    static let maxRuns = 1 << 20
    private let state = Mutex(State())

    func entry(_ node: UInt64) -> FATDirectoryEntry? { state.withLock { $0.entries[node] } }
    func listing(_ node: UInt64) -> [DirectoryEntry]? { state.withLock { $0.listings[node] } }
    func runs(_ node: UInt64) -> [FATRun]? { state.withLock { $0.runs[node] } }

    func store(listing: [DirectoryEntry], entries: [(UInt64, FATDirectoryEntry)], for node: UInt64) {
        state.withLock { s in
            if s.listedEntries + listing.count > Self.maxEntries || s.entries.count + entries.count > Self.maxEntries {
                s.entries.removeAll()
                s.listings.removeAll()
                s.listedEntries = 0
            }
            guard listing.count <= Self.maxEntries else { return }
            s.listings[node] = listing
            s.listedEntries += listing.count
            for (n, e) in entries { s.entries[n] = e }
        }
    }

    func store(entry: FATDirectoryEntry, for node: UInt64) {
        state.withLock { s in
            if s.entries.count >= Self.maxEntries {
                s.entries.removeAll()
                s.listings.removeAll()
                s.listedEntries = 0
            }
            s.entries[node] = entry
        }
    }

    func store(runs: [FATRun], for node: UInt64) {
        state.withLock { s in
            if s.runCount + runs.count > Self.maxRuns {
                s.runs.removeAll()
                s.runCount = 0
            }
            guard runs.count <= Self.maxRuns else { return }
            s.runs[node] = runs
            s.runCount += runs.count
        }
    }
}
