import CairnCore
import Synchronization

/// Writes a new qcow2 version 3 image (compat 1.1, 16-bit refcounts, no backing file, no
/// compression) into a `RandomAccessFile`.
///
/// Layout of the finished file, in clusters:
///
///     0                  header (written last, by `finish`)
///     1 ..< d            data clusters, in the order they were first written
///     d ..< d+n          L2 tables (one per 2^(cluster_bits-3) guest clusters that hold data)
///     ..                 L1 table (ceil(l1_size * 8 / cluster_size) clusters)
///     ..                 refcount blocks, then the refcount table
///
/// All-zero clusters are never allocated: they stay unallocated and read as zeros. A data
/// cluster is allocated when the first non-zero byte lands in it; the file is truncated at
/// init, so a new cluster reads as zeros and a partial write only stores its own bytes (no
/// read-modify-write, so writes sharing a cluster never race).
///
/// `write` and `writeZeroes` may run concurrently for disjoint ranges. The allocator and the
/// in-memory L2 tables (8 bytes per guest cluster with data) sit behind a mutex; data is
/// written outside it, one call per run of host-contiguous clusters.
package final class QCOW2Writer: BlockSink, Sendable {
    package let file: any RandomAccessFile
    /// Virtual size: the requested size rounded up to a multiple of 512, as QEMU does.
    package let size: UInt64
    package let clusterSize: Int
    package var name: String { file.name }

    private let clusterBits: UInt64
    private let l2Bits: UInt64
    private let l1Size: Int
    private let zeroCluster: [UInt8]
    private let state: Mutex<State>

    private struct State {
        /// Per L1 index: host offsets of guest clusters (0 = unallocated); nil = no data.
        var l2: [[UInt64]?]
        /// Next free host cluster index (cluster 0 is the header).
        var nextCluster: UInt64 = 1
        var finished = false
    }

    /// Starts a new image. The file is truncated: its previous contents are discarded.
    ///
    /// - Parameters:
    ///   - virtualSize: the disk size; rounded up to a multiple of 512.
    ///   - clusterSize: a power of two from 512 bytes to 2 MiB.
    package init(file: any RandomAccessFile, virtualSize: UInt64, clusterSize: Int = 65536) throws {
        guard clusterSize >= 1 << QCOW2.minClusterBits, clusterSize <= 1 << QCOW2.maxClusterBits,
              clusterSize & (clusterSize - 1) == 0 else {
            throw CairnError(.usage, "qcow2 cluster size \(clusterSize) must be a power of two from 512 bytes to 2 MiB", path: file.name)
        }
        let (padded, overflow) = virtualSize.addingReportingOverflow(511)
        guard !overflow, padded / 512 * 512 <= UInt64(Int64.max) else {
            throw CairnError(.usage, "virtual size \(virtualSize) is too large for a qcow2 image", path: file.name)
        }
        let size = padded / 512 * 512
        let cluster = UInt64(clusterSize)
        let bits = UInt64(clusterSize.trailingZeroBitCount)
        let l2Entries = cluster / 8
        let clusters = size / cluster + (size % cluster == 0 ? 0 : 1)
        let l1Entries = clusters / l2Entries + (clusters % l2Entries == 0 ? 0 : 1)
        guard l1Entries * 8 <= QCOW2.maxL1TableBytes else {
            throw CairnError(.usage, "virtual size \(virtualSize) needs an L1 table larger than 32 MiB with \(clusterSize)-byte clusters",
                             path: file.name, hint: "use a larger cluster size")
        }
        self.file = file
        self.size = size
        self.clusterSize = clusterSize
        self.clusterBits = bits
        self.l2Bits = bits - 3
        self.l1Size = Int(l1Entries)
        self.zeroCluster = [UInt8](repeating: 0, count: clusterSize)
        self.state = Mutex(State(l2: [[UInt64]?](repeating: nil, count: Int(l1Entries))))
        // Start from an empty file whose first cluster (the header, written last) is zeros,
        // so an unfinished file is never mistaken for an image.
        try file.setLength(0)
        try file.setLength(cluster)
    }

    // MARK: - BlockSink

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "write")
        guard buffer.count > 0 else { return }
        let cluster = UInt64(clusterSize)
        let end = offset + UInt64(buffer.count)
        let first = offset >> clusterBits
        let count = Int(((end - 1) >> clusterBits) - first + 1)

        // Which pieces hold data (outside the lock: it is the expensive part).
        var hosts = [UInt64](repeating: 0, count: count)
        var isZero = [Bool](repeating: false, count: count)
        for i in 0..<count {
            let piece = pieceRange(i, first: first, offset: offset, end: end)
            isZero[i] = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[piece.bufferStart..<piece.bufferStart + piece.length]))
        }

        try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            for i in 0..<count {
                let guestCluster = first + UInt64(i)
                let l1Index = Int(guestCluster >> l2Bits)
                let l2Index = Int(guestCluster & ((1 << l2Bits) - 1))
                if s.l2[l1Index] == nil {
                    if isZero[i] { continue }
                    s.l2[l1Index] = [UInt64](repeating: 0, count: 1 << Int(l2Bits))
                }
                let existing = s.l2[l1Index]?[l2Index] ?? 0
                if existing != 0 {
                    hosts[i] = existing
                } else if !isZero[i] {
                    let host = s.nextCluster * cluster
                    s.nextCluster += 1
                    s.l2[l1Index]?[l2Index] = host
                    hosts[i] = host
                }
            }
        }

        // One pwrite per run of pieces that are contiguous on the host.
        var runHost: UInt64 = 0, runBufferStart = 0, runLength = 0
        for i in 0..<count {
            let piece = pieceRange(i, first: first, offset: offset, end: end)
            guard hosts[i] != 0 else { continue }
            let host = hosts[i] + piece.inCluster
            if runLength > 0, runHost + UInt64(runLength) == host, runBufferStart + runLength == piece.bufferStart {
                runLength += piece.length
                continue
            }
            if runLength > 0 {
                try file.write(UnsafeRawBufferPointer(rebasing: buffer[runBufferStart..<runBufferStart + runLength]), at: runHost)
            }
            runHost = host
            runBufferStart = piece.bufferStart
            runLength = piece.length
        }
        if runLength > 0 {
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[runBufferStart..<runBufferStart + runLength]), at: runHost)
        }
    }

    /// Unallocated clusters already read as zeros; clusters that hold data get zeros written
    /// over the range.
    package func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length, "writeZeroes")
        guard length > 0 else { return }
        let cluster = UInt64(clusterSize)
        let end = offset + length
        // (host offset, byte count) of allocated pieces, found under the lock.
        let targets: [(UInt64, Int)] = try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            var out: [(UInt64, Int)] = []
            var pos = offset
            let l2Span = cluster << l2Bits
            while pos < end {
                let l1Index = pos / l2Span
                let spanEnd = min(end, (l1Index + 1) * l2Span)
                guard let table = s.l2[Int(l1Index)] else {
                    pos = spanEnd
                    continue
                }
                while pos < spanEnd {
                    let guestCluster = pos >> clusterBits
                    let pieceEnd = min(spanEnd, (guestCluster + 1) * cluster)
                    let host = table[Int(guestCluster & ((1 << l2Bits) - 1))]
                    if host != 0 { out.append((host + (pos & (cluster - 1)), Int(pieceEnd - pos))) }
                    pos = pieceEnd
                }
            }
            return out
        }
        try zeroCluster.withUnsafeBytes { zeros in
            for (host, count) in targets {
                try file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: host)
            }
        }
    }

    /// Writes the L2 tables, the L1 table, the refcounts and finally the header, then syncs.
    /// No writes are accepted afterwards.
    package func finish() throws {
        let (tables, dataEnd) = try state.withLock { s -> ([[UInt64]?], UInt64) in
            guard !s.finished else { throw finishedError() }
            s.finished = true
            return (s.l2, s.nextCluster)
        }
        let cluster = UInt64(clusterSize)

        // Place the metadata after the data.
        var next = dataEnd
        var l1 = [UInt64](repeating: 0, count: l1Size)
        var l2Placement: [(l1Index: Int, hostCluster: UInt64)] = []
        for (index, table) in tables.enumerated() where table != nil {
            l1[index] = (next * cluster) | QCOW2.flagCopied
            l2Placement.append((index, next))
            next += 1
        }
        let l1Bytes = UInt64(l1Size) * 8
        let l1Clusters = (l1Bytes + cluster - 1) / cluster
        let l1Offset = l1Size > 0 ? next * cluster : 0
        next += l1Clusters

        let layout = Self.refcountLayout(clustersBefore: next, clusterSize: cluster)
        let refcountBlocksStart = next
        let refcountTableStart = next + layout.blocks
        let totalClusters = refcountTableStart + layout.tableClusters

        var buffer = [UInt8](repeating: 0, count: clusterSize)
        // L2 tables.
        for placement in l2Placement {
            guard let table = tables[placement.l1Index] else { continue }
            buffer.withUnsafeMutableBytes { out in
                for (i, host) in table.enumerated() {
                    out.storeBigEndian(host == 0 ? 0 : host | QCOW2.flagCopied, at: i * 8)
                }
            }
            try buffer.withUnsafeBytes { try file.write($0, at: placement.hostCluster * cluster) }
        }
        // L1 table, padded to whole clusters.
        if l1Clusters > 0 {
            var bytes = [UInt8](repeating: 0, count: Int(l1Clusters * cluster))
            bytes.withUnsafeMutableBytes { out in
                for (i, entry) in l1.enumerated() { out.storeBigEndian(entry, at: i * 8) }
            }
            try bytes.withUnsafeBytes { try file.write($0, at: l1Offset) }
        }
        // Refcount blocks: every cluster of the file has refcount 1.
        let perBlock = cluster / 2
        for block in 0..<layout.blocks {
            let firstCovered = block * perBlock
            let covered = min(perBlock, totalClusters - firstCovered)
            buffer.withUnsafeMutableBytes { out in
                out.initializeMemory(as: UInt8.self, repeating: 0)
                for i in 0..<Int(covered) { out.storeBigEndian(UInt16(1), at: i * 2) }
            }
            try buffer.withUnsafeBytes { try file.write($0, at: (refcountBlocksStart + block) * cluster) }
        }
        // Refcount table.
        var tableBytes = [UInt8](repeating: 0, count: Int(layout.tableClusters * cluster))
        tableBytes.withUnsafeMutableBytes { out in
            for block in 0..<layout.blocks {
                out.storeBigEndian((refcountBlocksStart + block) * cluster, at: Int(block) * 8)
            }
        }
        try tableBytes.withUnsafeBytes { try file.write($0, at: refcountTableStart * cluster) }
        try file.setLength(totalClusters * cluster)

        // Everything the header points to is durable before the header exists.
        try file.sync()
        var headerBytes = [UInt8](repeating: 0, count: clusterSize)
        headerBytes.withUnsafeMutableBytes { h in
            h.storeBigEndian(QCOW2.magic, at: QCOW2.Field.magic)
            h.storeBigEndian(UInt32(3), at: QCOW2.Field.version)
            h.storeBigEndian(UInt32(clusterBits), at: QCOW2.Field.clusterBits)
            h.storeBigEndian(size, at: QCOW2.Field.size)
            h.storeBigEndian(UInt32(l1Size), at: QCOW2.Field.l1Size)
            h.storeBigEndian(l1Offset, at: QCOW2.Field.l1TableOffset)
            h.storeBigEndian(refcountTableStart * cluster, at: QCOW2.Field.refcountTableOffset)
            h.storeBigEndian(UInt32(layout.tableClusters), at: QCOW2.Field.refcountTableClusters)
            h.storeBigEndian(QCOW2.defaultRefcountOrder, at: QCOW2.Field.refcountOrder)
            h.storeBigEndian(UInt32(QCOW2.v3WrittenHeaderLength), at: QCOW2.Field.headerLength)
            // compression_type 0 (deflate), padding, then the end-of-extensions marker: zeros.
        }
        try headerBytes.withUnsafeBytes { try file.write($0, at: 0) }
        try file.sync()
    }

    // MARK: - Helpers

    /// Refcount blocks and refcount table clusters needed so that every cluster, including
    /// these, has a refcount entry: the least fixed point, reached by iterating upwards.
    static func refcountLayout(clustersBefore base: UInt64, clusterSize: UInt64) -> (blocks: UInt64, tableClusters: UInt64) {
        let perBlock = clusterSize / 2  // 16-bit refcounts
        let perTableCluster = clusterSize / 8
        var blocks: UInt64 = 0, tableClusters: UInt64 = 0
        while true {
            let total = base + blocks + tableClusters
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = max(1, (needBlocks + perTableCluster - 1) / perTableCluster)
            if needBlocks == blocks && needTable == tableClusters { return (blocks, tableClusters) }
            blocks = needBlocks
            tableClusters = needTable
        }
    }

    private struct Piece {
        var bufferStart: Int
        var length: Int
        var inCluster: UInt64
    }

    /// The `i`-th cluster-sized piece of a write of `[offset, end)` starting at cluster `first`.
    @inline(__always)
    private func pieceRange(_ i: Int, first: UInt64, offset: UInt64, end: UInt64) -> Piece {
        let clusterStart = (first + UInt64(i)) << clusterBits
        let start = max(clusterStart, offset)
        let stop = min(clusterStart + UInt64(clusterSize), end)
        return Piece(bufferStart: Int(start - offset), length: Int(stop - start), inCluster: start - clusterStart)
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64, _ call: String) throws {
        guard offset <= size, length <= size - offset else {
            throw CairnError(.io, "\(call) of \(length) bytes past the end of the qcow2 image (virtual size \(size))", path: name, offset: offset)
        }
    }

    private func finishedError() -> CairnError {
        CairnError(.usage, "qcow2 image was already finished; no more writes are accepted", path: name)
    }
}
