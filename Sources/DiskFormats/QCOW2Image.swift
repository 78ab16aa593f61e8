import CairnCore
import Synchronization

/// A qcow2 image (version 2 or 3) read as a virtual disk.
///
/// Reads go through the active L1 table and L2 tables (`docs/interop/qcow2.rst`, "Cluster
/// mapping"). Guest clusters that are contiguous on the host are read with one call;
/// unallocated clusters come from the backing image (zeros past its end, or with no
/// backing); zero clusters are never read; compressed clusters are inflated one at a time.
/// Internal snapshots are ignored (only the active L1 table is used).
///
/// Every table and data offset is checked (alignment, inside the file) before it is used; a
/// bad one throws `CairnError(.malformedImage)` naming the field and where it was found.
///
/// Safe for concurrent `read` and `extents` calls: the only mutable state is an L2 table
/// cache behind a mutex, and tables are read outside the lock.
package final class QCOW2Image: BlockSource, Sendable {
    package let header: QCOW2Header
    package let file: any BlockSource
    package let backing: (any BlockSource)?
    /// Virtual size.
    package let size: UInt64
    package var name: String { file.name }
    /// The backing file name recorded in the image, nil if none.
    package var backingFileName: String? { header.backingFileName }

    private let fileSize: UInt64
    private let clusterBits: UInt64
    private let clusterSize: UInt64
    /// log2 of the number of entries per L2 table.
    private let l2Bits: UInt64
    /// The active L1 table, in host byte order.
    private let l1: [UInt64]
    private let cache: Mutex<L2Cache>
    private let decompressor: QCOW2Decompressor
    /// For compressed descriptors: offset bits are 0..<compressedShift, the additional sector
    /// count sits above them (x = 62 - (cluster_bits - 8)).
    private let compressedShift: UInt64

    /// Opens `file` as qcow2.
    ///
    /// - Parameter backing: the image named by the user as this image's backing file. We
    ///   never open a path recorded inside an image: if the image records one, `backing` is
    ///   required; if it records none, `backing` must be nil.
    package init(file: any BlockSource, backing: (any BlockSource)? = nil) throws {
        let header = try QCOW2Header.read(from: file)
        if let recorded = header.backingFileName, backing == nil {
            throw CairnError(.usage, "qcow2 image has backing file '\(recorded)' recorded; name it explicitly with --backing PATH",
                             path: file.name,
                             hint: "Cairn never opens a path found inside an image; give the backing image (and its own backing, if any) on the command line")
        }
        if header.backingFileName == nil, let backing {
            throw CairnError(.usage, "qcow2 image records no backing file, but backing image '\(backing.name)' was given",
                             path: file.name, hint: "drop --backing for this image")
        }
        self.header = header
        self.file = file
        self.backing = backing
        self.size = header.size
        self.fileSize = file.size
        self.clusterBits = UInt64(header.clusterBits)
        self.clusterSize = UInt64(header.clusterSize)
        self.l2Bits = UInt64(header.clusterBits) - 3
        self.compressedShift = 62 - (UInt64(header.clusterBits) - 8)
        self.decompressor = QCOW2Decompressor(type: header.compressionType)

        // The header check guarantees the table lies inside the file and is at most 32 MiB.
        var l1 = [UInt64](repeating: 0, count: Int(header.l1Size))
        if !l1.isEmpty {
            try l1.withUnsafeMutableBytes { try file.read(into: $0, at: header.l1TableOffset) }
            for i in l1.indices { l1[i] = UInt64(bigEndian: l1[i]) }
        }
        self.l1 = l1

        // Keep up to 32 MiB of L2 tables (at least 16): 512 tables of 64 KiB map 256 GiB.
        let capacity = max(16, (32 << 20) / header.clusterSize)
        self.cache = Mutex(L2Cache(capacity: capacity))
    }

    // MARK: - BlockSource

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard buffer.count > 0 else { return }
        var scratch: [UInt8] = []
        try walk(offset..<offset + UInt64(buffer.count)) { start, length, run in
            let from = Int(start - offset)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[from..<from + Int(length)])
            switch run {
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                try readBacking(into: target, at: start)
            case .data(let host):
                try readHost(into: target, at: host)
            case .compressed(let descriptor, let inCluster):
                try readCompressed(descriptor, inCluster: inCluster, into: target, guestOffset: start, scratch: &scratch)
            }
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        var out: [Extent] = []
        try walk(range.lowerBound..<end) { start, length, run in
            switch run {
            case .data, .compressed:
                out.append(Extent(offset: start, length: length, kind: .data))
            case .zero:
                out.append(Extent(offset: start, length: length, kind: .zero))
            case .unallocated:
                out.append(contentsOf: try backingExtents(start, length))
            }
        }
        return out.coalesced()
    }

    // MARK: - Mapping

    /// How a run of guest bytes maps to the file.
    enum Run {
        /// Not allocated here: the backing image or zeros.
        case unallocated
        /// Reads as zeros (v3 zero flag).
        case zero
        /// Stored at this host offset (of the run's first byte), contiguously.
        case data(host: UInt64)
        /// Inside one compressed cluster; `inCluster` is the run's offset in the cluster.
        case compressed(CompressedCluster, inCluster: Int)
    }

    struct CompressedCluster {
        var hostOffset: UInt64
        /// Stored bytes, already bounded by the end of the file.
        var length: Int
    }

    /// Calls `body` for maximal runs covering `range` (inside `0..<size`) in order: runs of
    /// the same kind are merged, data runs only while they stay contiguous on the host,
    /// compressed runs never. An L1 entry of 0 yields its whole range in one step.
    func walk(_ range: Range<UInt64>, _ body: (UInt64, UInt64, Run) throws -> Void) throws {
        var runs = RunCoalescer<Run>()
        func emit(_ start: UInt64, _ length: UInt64, _ run: Run) throws { try runs.add(start, length, run, body) }

        let l2Span = clusterSize << l2Bits  // guest bytes per L1 entry (at most 2^39)
        var pos = range.lowerBound
        let end = range.upperBound
        while pos < end {
            let l1Index = pos / l2Span
            guard l1Index < UInt64(l1.count) else {
                throw CairnError(.malformedImage, "qcow2 L1 table (l1_size \(l1.count)) does not cover guest offset \(hex(pos))", path: name)
            }
            let spanEnd = min(end, (l1Index + 1) * l2Span)
            let l2Offset = l1[Int(l1Index)] & QCOW2.l1OffsetMask
            if l2Offset == 0 {
                try emit(pos, spanEnd - pos, .unallocated)
                pos = spanEnd
                continue
            }
            let table = try l2Table(at: l2Offset, l1Index: Int(l1Index))
            while pos < spanEnd {
                let guestCluster = pos >> clusterBits
                let clusterEnd = min(spanEnd, (guestCluster + 1) << clusterBits)
                let inCluster = pos & (clusterSize - 1)
                let entry = table.entries[Int(guestCluster & ((1 << l2Bits) - 1))]
                let run = try classify(entry, guestOffset: guestCluster << clusterBits)
                switch run {
                case .data(let host):
                    try emit(pos, clusterEnd - pos, .data(host: host + inCluster))
                case .compressed(let c, _):
                    try emit(pos, clusterEnd - pos, .compressed(c, inCluster: Int(inCluster)))
                case .zero, .unallocated:
                    try emit(pos, clusterEnd - pos, run)
                }
                pos = clusterEnd
            }
        }
        try runs.flush(body)
    }

    /// Decodes one L2 entry, validating the offsets it holds.
    private func classify(_ entry: UInt64, guestOffset: UInt64) throws -> Run {
        if entry & QCOW2.flagCompressed != 0 {
            let descriptor = entry & ~(QCOW2.flagCompressed | QCOW2.flagCopied)
            let hostOffset = descriptor & ((1 << compressedShift) - 1)
            let extraSectors = descriptor >> compressedShift
            guard hostOffset >> QCOW2.maxHostOffsetBits == 0 else {
                throw CairnError(.malformedImage, "qcow2 compressed cluster descriptor for guest offset \(hex(guestOffset)) has host offset \(hex(hostOffset)) beyond 56 bits",
                                 path: name)
            }
            guard hostOffset < fileSize else {
                throw CairnError(.malformedImage, "qcow2 compressed cluster for guest offset \(hex(guestOffset)) points to \(hex(hostOffset)), past the end of the file (size \(fileSize))",
                                 path: name)
            }
            // (extra + 1) sectors, minus the part of the first sector before the offset.
            let stored = (extraSectors + 1) * QCOW2.compressedSectorSize - (hostOffset & (QCOW2.compressedSectorSize - 1))
            let length = min(stored, fileSize - hostOffset)
            return .compressed(CompressedCluster(hostOffset: hostOffset, length: Int(length)), inCluster: 0)
        }
        if entry & QCOW2.flagZero != 0 {
            guard header.version >= 3 else {
                throw CairnError(.malformedImage, "qcow2 version 2 L2 entry for guest offset \(hex(guestOffset)) has the zero flag (bit 0), which only version 3 defines",
                                 path: name)
            }
            return .zero
        }
        let host = entry & QCOW2.l2OffsetMask
        if host == 0 { return .unallocated }
        guard host & (clusterSize - 1) == 0 else {
            throw CairnError(.malformedImage, "qcow2 L2 entry for guest offset \(hex(guestOffset)) points to \(hex(host)), which is not aligned to the cluster size \(clusterSize)",
                             path: name)
        }
        guard host < fileSize else {
            throw CairnError(.malformedImage, "qcow2 L2 entry for guest offset \(hex(guestOffset)) points to data cluster \(hex(host)), past the end of the file (size \(fileSize))",
                             path: name)
        }
        return .data(host: host)
    }

    /// The L2 table at `offset` (from L1 entry `l1Index`), from the cache or the file.
    private func l2Table(at offset: UInt64, l1Index: Int) throws -> L2Table {
        if let cached = cache.withLock({ $0.get(offset) }) { return cached }
        guard offset & (clusterSize - 1) == 0 else {
            throw CairnError(.malformedImage, "qcow2 L2 table offset \(hex(offset)) (L1 index \(l1Index)) is not aligned to the cluster size \(clusterSize)",
                             path: name, offset: header.l1TableOffset + UInt64(l1Index) * 8)
        }
        guard offset < fileSize, clusterSize <= fileSize - offset else {
            throw CairnError(.malformedImage, "qcow2 L2 table offset \(hex(offset)) (L1 index \(l1Index)) lies past the end of the file (size \(fileSize))",
                             path: name, offset: header.l1TableOffset + UInt64(l1Index) * 8)
        }
        var entries = [UInt64](repeating: 0, count: 1 << Int(l2Bits))
        try entries.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        for i in entries.indices { entries[i] = UInt64(bigEndian: entries[i]) }
        let table = L2Table(entries: entries)
        cache.withLock { $0.put(offset, table) }
        return table
    }

    // MARK: - Reading runs

    /// Reads host bytes; bytes past the end of the file read as zeros, as in QEMU.
    private func readHost(into target: UnsafeMutableRawBufferPointer, at host: UInt64) throws {
        try readZeroExtended(file, into: target, at: host)
    }

    /// Unallocated guest bytes: from the backing image, zeros past its end or without one.
    private func readBacking(into target: UnsafeMutableRawBufferPointer, at guestOffset: UInt64) throws {
        try readZeroExtended(backing, into: target, at: guestOffset)
    }

    private func backingExtents(_ start: UInt64, _ length: UInt64) throws -> [Extent] {
        try lowerLayerExtents(backing, start, length)
    }

    private func readCompressed(_ cluster: CompressedCluster, inCluster: Int, into target: UnsafeMutableRawBufferPointer,
                                guestOffset: UInt64, scratch: inout [UInt8]) throws {
        let clusterBytes = Int(clusterSize)
        let needed = cluster.length + (target.count == clusterBytes ? 0 : clusterBytes)
        if scratch.count < needed { scratch = [UInt8](repeating: 0, count: needed) }
        let ok = try scratch.withUnsafeMutableBytes { space -> Bool in
            let input = UnsafeMutableRawBufferPointer(rebasing: space[0..<cluster.length])
            try file.read(into: input, at: cluster.hostOffset)
            if target.count == clusterBytes {
                return decompressor.decompress(UnsafeRawBufferPointer(input), into: target)
            }
            let whole = UnsafeMutableRawBufferPointer(rebasing: space[cluster.length..<cluster.length + clusterBytes])
            guard decompressor.decompress(UnsafeRawBufferPointer(input), into: whole) else { return false }
            target.copyMemory(from: UnsafeRawBufferPointer(rebasing: whole[inCluster..<inCluster + target.count]))
            return true
        }
        guard ok else {
            let clusterStart = guestOffset - UInt64(inCluster)
            throw CairnError(.malformedImage,
                             "qcow2 compressed cluster for guest offset \(hex(clusterStart)) at \(hex(cluster.hostOffset)) (\(cluster.length) bytes) does not decompress (\(header.compressionType)) to one \(clusterBytes)-byte cluster",
                             path: name, offset: cluster.hostOffset)
        }
    }
}

/// One L2 table in host byte order; immutable once read.
final class L2Table: Sendable {
    let entries: [UInt64]
    init(entries: [UInt64]) { self.entries = entries }
}

/// L2 tables by file offset.
typealias L2Cache = LRUCache<UInt64, L2Table>

extension QCOW2Image.Run: MappingRun {
    func isExtended(by next: Self, afterLength length: UInt64) -> Bool {
        switch (self, next) {
        case (.unallocated, .unallocated), (.zero, .zero): true
        case (.data(let a), .data(let b)): a + length == b
        default: false   // compressed runs never merge
        }
    }
}
