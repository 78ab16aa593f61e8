import CairnCore
import Synchronization

/// A stretch of `count` consecutive clusters starting at `cluster`, holding clusters
/// `logical..<logical + count` of a file or directory.
struct FATRun: Sendable, Equatable {
    var logical: UInt64
    var cluster: UInt32
    var count: UInt64
}

/// The file allocation table that is read (the first, or on FAT32 with mirroring off the
/// active one). FAT12 and FAT16 tables (at most 128 KiB for the clusters that exist) are held
/// in memory; FAT32 tables are read in 64 KiB pages through a small bounded cache.
final class FATTable: Sendable {
    let boot: FATBootSector
    let volume: any BlockSource
    /// The whole used part of a FAT12/16 table; empty for FAT32.
    private let small: [UInt8]
    private let pages = Mutex<[UInt64: [UInt8]]>([:])

    static let pageSize: UInt64 = 64 << 10
    static let maxPages = 64

    init(boot: FATBootSector, volume: any BlockSource) throws {
        self.boot = boot
        self.volume = volume
        if boot.type == .fat32 {
            small = []
        } else {
            // fatBytesUsed <= (65524 + 2) * 2 bytes, checked to lie inside the FAT by the boot sector.
            small = try volume.readBytes(at: boot.fatOffset, count: Int(boot.fatBytesUsed))
        }
    }

    /// The masked FAT entry of `cluster` (which the caller checked is below `clusterLimit`).
    func entry(_ cluster: UInt32) throws -> UInt32 {
        let n = UInt64(cluster)
        switch boot.type {
        case .fat12:
            let at = Int(n + n / 2)
            guard at + 1 < small.count else { return 0 }
            let pair = UInt16(small[at]) | UInt16(small[at + 1]) << 8
            return UInt32(n & 1 == 1 ? pair >> 4 : pair & 0xFFF)
        case .fat16:
            let at = Int(n * 2)
            guard at + 1 < small.count else { return 0 }
            return UInt32(small[at]) | UInt32(small[at + 1]) << 8
        case .fat32:
            let byte = n * 4
            let page = byte / Self.pageSize
            let inPage = Int(byte % Self.pageSize)
            let bytes = try self.page(page)
            guard let v = CheckedBytes(bytes).u32(at: inPage) else { return 0 }
            return v & FATType.fat32.mask
        }
    }

    private func page(_ index: UInt64) throws -> [UInt8] {
        if let hit = pages.withLock({ $0[index] }) { return hit }
        let start = boot.fatOffset + index * Self.pageSize
        let end = min(boot.fatOffset + boot.fatBytesUsed, start + Self.pageSize)
        guard start < end else { return [] }
        let bytes = try volume.readBytes(at: start, count: Int(end - start))
        pages.withLock { cache in
            if cache.count >= Self.maxPages { cache.removeAll(keepingCapacity: true) }
            cache[index] = bytes
        }
        return bytes
    }

    /// Follows the chain that starts at `first` for at most `maxClusters` clusters and returns
    /// it as runs, plus whether the chain went on past that limit. Throws for a start or a
    /// link outside the data clusters, a free, reserved or bad cluster inside the chain, and a
    /// chain that visits a cluster twice (a loop or a chain that crosses itself).
    func chain(from first: UInt32, maxClusters: UInt64, what: () -> String, entryOffset: UInt64) throws -> (runs: [FATRun], longer: Bool) {
        let limit = boot.clusterLimit
        func fail(_ message: String) -> CairnError {
            CairnError(.malformedImage, "\(what()): \(message)", path: volume.name, offset: entryOffset,
                       hint: "the file system is damaged; run fsck.fat on a restored copy")
        }
        guard UInt64(first) >= 2, UInt64(first) < limit else {
            throw fail("first cluster \(first) is outside the data clusters 2..<\(limit)")
        }
        var runs: [FATRun] = []
        var cluster = first
        var total: UInt64 = 0
        var longer = false
        while true {
            if let last = runs.last, UInt64(last.cluster) + last.count == UInt64(cluster) {
                runs[runs.count - 1].count += 1
            } else {
                runs.append(FATRun(logical: total, cluster: cluster, count: 1))
            }
            total += 1
            let next = try entry(cluster)
            if next >= boot.type.endOfChain { break }
            if total >= maxClusters {
                longer = true
                break
            }
            if next == boot.type.badCluster { throw fail("cluster \(cluster) links to a cluster marked bad") }
            guard next >= 2 else { throw fail("cluster \(cluster) links to \(next == 0 ? "a free cluster" : "reserved cluster 1")") }
            guard UInt64(next) < limit else { throw fail("cluster \(cluster) links to \(next), past the last cluster \(limit - 1)") }
            // maxClusters never exceeds the cluster count, so a looping chain stops above; the
            // overlap check below tells it apart from a long one.
            cluster = next
        }
        let sorted = runs.sorted { $0.cluster < $1.cluster }
        for (a, b) in zip(sorted, sorted.dropFirst()) where UInt64(a.cluster) + a.count > UInt64(b.cluster) {
            throw fail("the cluster chain loops (cluster \(b.cluster) is used twice)")
        }
        return (runs, longer)
    }

    /// Byte ranges of the data clusters whose FAT entry is 0, ascending and merged.
    func freeRanges() throws -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        let cs = boot.clusterSize
        let base = boot.dataOffset
        let limit = boot.clusterLimit
        // A run of free clusters start..<c (cluster numbers) becomes one byte range.
        var start: UInt64 = 0
        var inRun = false
        if boot.type != .fat32 {
            for c in 2..<limit {
                let free = try entry(UInt32(c)) == 0
                if free != inRun {
                    if free { start = c } else { out.append(base + (start - 2) * cs..<base + (c - 2) * cs) }
                    inRun = free
                }
            }
        } else {
            // FAT32: stream the table in 1 MiB pieces (whole entries), outside the page cache.
            let piece: UInt64 = 1 << 20
            var c: UInt64 = 0
            while c < limit {
                let n = min(piece / 4, limit - c)
                let bytes = try volume.readBytes(at: boot.fatOffset + c * 4, count: Int(n * 4))
                bytes.withUnsafeBytes { raw in
                    var i = c < 2 ? Int(2 - c) : 0
                    while i < Int(n) {
                        let free = raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self) & FATType.fat32.mask.littleEndian == 0
                        if free != inRun {
                            let cluster = c + UInt64(i)
                            if free { start = cluster } else { out.append(base + (start - 2) * cs..<base + (cluster - 2) * cs) }
                            inRun = free
                        }
                        i += 1
                    }
                }
                c += n
            }
        }
        if inRun { out.append(base + (start - 2) * cs..<base + (limit - 2) * cs) }
        return out
    }
}
