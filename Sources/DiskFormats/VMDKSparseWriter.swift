import CairnCore
import Synchronization

/// Writes a new monolithicSparse VMDK (version 1, 64 KiB grains, 512-entry grain tables,
/// redundant grain directory) into a `RandomAccessFile`.
///
/// Layout of the finished file, in 512-byte sectors (QEMU's layout):
///
///     0                  header (written last, by `finish`)
///     1 ..< 21           embedded descriptor (createType "monolithicSparse")
///     21 ..              redundant grain directory, then its grain tables (all preallocated)
///     ..                 grain directory, then its grain tables (all preallocated)
///     overHead ..        data grains (overHead rounded up to a grain), in first-write order
///
/// Every grain table is preallocated, so QEMU and VMware can later write anywhere in the
/// disk. All-zero grains are never allocated; a grain is allocated when the first non-zero
/// byte lands in it, and the file beyond the metadata starts as zeros, so a partial write only
/// stores its own bytes. `write` and `writeZeroes` may run concurrently for disjoint ranges:
/// the allocator and the in-memory grain tables sit behind a mutex, data is written outside.
package final class VMDKSparseWriter: BlockSink, Sendable {
    package let file: any RandomAccessFile
    /// Virtual size: the requested size rounded up to a multiple of 512, as qemu-img does.
    package let size: UInt64
    package var name: String { file.name }

    private let grainBytes = VMDK.writerGrainSectors * VMDK.sectorSize
    private let tableEntries = Int(VMDK.writerGTEsPerGT)
    private let directoryEntries: Int
    private let directorySectors: UInt64
    private let tableSectors = VMDK.writerGTEsPerGT * 4 / VMDK.sectorSize
    private let rgdOffset: UInt64
    private let rgdTablesOffset: UInt64
    private let gdOffset: UInt64
    private let gdTablesOffset: UInt64
    private let overHead: UInt64
    private let zeroGrain: [UInt8]
    private let state: Mutex<State>

    private struct State {
        /// Per grain directory index: grain sectors (0 = unallocated); nil = no data yet.
        var tables: [[UInt32]?]
        var nextSector: UInt64
        var finished = false
    }

    /// Starts a new image. The file is truncated: its previous contents are discarded.
    package init(file: any RandomAccessFile, virtualSize: UInt64) throws {
        guard virtualSize <= VMDK.maxVirtualSize else {
            throw CairnError(.usage, "virtual size \(virtualSize) is larger than the 64 TiB a VMDK can hold", path: file.name)
        }
        let size = vmdkRoundUp(virtualSize, VMDK.sectorSize)
        let capacity = size / VMDK.sectorSize
        let grainsPerTable = VMDK.writerGTEsPerGT * VMDK.writerGrainSectors
        let entries = (capacity + grainsPerTable - 1) / grainsPerTable
        let gdSectors = vmdkRoundUp(entries * 4, VMDK.sectorSize) / VMDK.sectorSize
        let tableSectors = VMDK.writerGTEsPerGT * 4 / VMDK.sectorSize
        let rgd = VMDK.writerDescriptorOffset + VMDK.writerDescriptorSectors
        let rgdTables = rgd + gdSectors
        let gd = rgdTables + entries * tableSectors
        let gdTables = gd + gdSectors
        let overHead = vmdkRoundUp(gdTables + entries * tableSectors, VMDK.writerGrainSectors)

        self.file = file
        self.size = size
        self.directoryEntries = Int(entries)
        self.directorySectors = gdSectors
        self.rgdOffset = rgd
        self.rgdTablesOffset = rgdTables
        self.gdOffset = gd
        self.gdTablesOffset = gdTables
        self.overHead = overHead
        self.zeroGrain = [UInt8](repeating: 0, count: Int(VMDK.writerGrainSectors * VMDK.sectorSize))
        self.state = Mutex(State(tables: [[UInt32]?](repeating: nil, count: Int(entries)), nextSector: overHead))
        // An unfinished file has a zero header, so it is never mistaken for an image.
        try file.setLength(0)
        try file.setLength(overHead * VMDK.sectorSize)
    }

    // MARK: - BlockSink

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "write")
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        let first = offset / grainBytes
        let count = Int((end - 1) / grainBytes - first + 1)

        var isZero = [Bool](repeating: false, count: count)
        for i in 0..<count {
            let piece = pieceRange(i, first: first, offset: offset, end: end)
            isZero[i] = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[piece.bufferStart..<piece.bufferStart + piece.length]))
        }
        var hosts = [UInt64](repeating: 0, count: count)
        try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            for i in 0..<count {
                let grain = first + UInt64(i)
                let t = Int(grain / UInt64(tableEntries)), e = Int(grain % UInt64(tableEntries))
                if s.tables[t] == nil {
                    if isZero[i] { continue }
                    s.tables[t] = [UInt32](repeating: 0, count: tableEntries)
                }
                let existing = s.tables[t]?[e] ?? 0
                if existing != 0 {
                    hosts[i] = UInt64(existing) * VMDK.sectorSize
                } else if !isZero[i] {
                    guard s.nextSector + VMDK.writerGrainSectors - 1 <= VMDK.maxSectorNumber else {
                        throw CairnError(.noSpace, "VMDK sparse extent would grow past 2 TiB (32-bit sector numbers)", path: name)
                    }
                    s.tables[t]?[e] = UInt32(s.nextSector)
                    hosts[i] = s.nextSector * VMDK.sectorSize
                    s.nextSector += VMDK.writerGrainSectors
                }
            }
        }

        // One write per run of pieces contiguous in the file.
        var runHost: UInt64 = 0, runStart = 0, runLength = 0
        for i in 0..<count where hosts[i] != 0 {
            let piece = pieceRange(i, first: first, offset: offset, end: end)
            let host = hosts[i] + piece.inGrain
            if runLength > 0, runHost + UInt64(runLength) == host, runStart + runLength == piece.bufferStart {
                runLength += piece.length
                continue
            }
            if runLength > 0 {
                try file.write(UnsafeRawBufferPointer(rebasing: buffer[runStart..<runStart + runLength]), at: runHost)
            }
            runHost = host
            runStart = piece.bufferStart
            runLength = piece.length
        }
        if runLength > 0 {
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[runStart..<runStart + runLength]), at: runHost)
        }
    }

    /// Unallocated grains already read as zeros; allocated grains get zeros written.
    package func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length, "writeZeroes")
        guard length > 0 else { return }
        let end = offset + length
        let targets: [(UInt64, Int)] = try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            var out: [(UInt64, Int)] = []
            var pos = offset
            while pos < end {
                let grain = pos / grainBytes
                let pieceEnd = min(end, (grain + 1) * grainBytes)
                let t = Int(grain / UInt64(tableEntries)), e = Int(grain % UInt64(tableEntries))
                if let sector = s.tables[t]?[e], sector != 0 {
                    out.append((UInt64(sector) * VMDK.sectorSize + (pos - grain * grainBytes), Int(pieceEnd - pos)))
                }
                pos = pieceEnd
            }
            return out
        }
        try zeroGrain.withUnsafeBytes { zeros in
            for (host, count) in targets {
                try file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: host)
            }
        }
    }

    /// Writes the descriptor, both grain directories and all grain tables, then the header,
    /// and syncs. No writes are accepted afterwards.
    package func finish() throws {
        let (tables, dataEnd) = try state.withLock { s -> ([[UInt32]?], UInt64) in
            guard !s.finished else { throw finishedError() }
            s.finished = true
            return (s.tables, s.nextSector)
        }
        let sector = VMDK.sectorSize
        // Descriptor.
        var descriptor = Array(VMDKDescriptor.render(createType: "monolithicSparse", capacity: size / sector,
                                                     extentFileName: VMDKDescriptor.extentFileName(for: name),
                                                     cid: UInt32.random(in: 1...UInt32.max)).utf8)
        descriptor += [UInt8](repeating: 0, count: Int(VMDK.writerDescriptorSectors * sector) - descriptor.count)
        try descriptor.withUnsafeBytes { try file.write($0, at: VMDK.writerDescriptorOffset * sector) }

        // Directories and tables (the redundant copy first, as QEMU lays them out).
        for (directoryAt, tablesAt) in [(rgdOffset, rgdTablesOffset), (gdOffset, gdTablesOffset)] {
            var directory = [UInt8](repeating: 0, count: Int(directorySectors * sector))
            directory.withUnsafeMutableBytes { d in
                for i in 0..<directoryEntries {
                    d.storeLittleEndian(UInt32(tablesAt + UInt64(i) * tableSectors), at: i * 4)
                }
            }
            try directory.withUnsafeBytes { try file.write($0, at: directoryAt * sector) }
            // Tables in batches of up to 256 (512 KiB).
            let batch = 256
            var first = 0
            while first < directoryEntries {
                let n = min(batch, directoryEntries - first)
                var bytes = [UInt8](repeating: 0, count: n * tableEntries * 4)
                bytes.withUnsafeMutableBytes { out in
                    for k in 0..<n {
                        guard let table = tables[first + k] else { continue }
                        for (e, grainSector) in table.enumerated() where grainSector != 0 {
                            out.storeLittleEndian(grainSector, at: (k * tableEntries + e) * 4)
                        }
                    }
                }
                try bytes.withUnsafeBytes { try file.write($0, at: (tablesAt + UInt64(first) * tableSectors) * sector) }
                first += n
            }
        }
        try file.setLength(dataEnd * sector)
        try file.sync()

        let header = VMDKSparseHeader(version: 1, flags: VMDK.Flag.newlineDetection | VMDK.Flag.redundantGrainTable,
                                      capacity: size / sector, grainSize: VMDK.writerGrainSectors,
                                      descriptorOffset: VMDK.writerDescriptorOffset, descriptorSize: VMDK.writerDescriptorSectors,
                                      numGTEsPerGT: UInt32(tableEntries), rgdOffset: rgdOffset, gdOffset: gdOffset,
                                      overHead: overHead, compressAlgorithm: VMDK.compressionNone)
        try header.encoded().withUnsafeBytes { try file.write($0, at: 0) }
        try file.sync()
    }

    // MARK: - Helpers

    private struct Piece {
        var bufferStart: Int
        var length: Int
        var inGrain: UInt64
    }

    @inline(__always)
    private func pieceRange(_ i: Int, first: UInt64, offset: UInt64, end: UInt64) -> Piece {
        let grainStart = (first + UInt64(i)) * grainBytes
        let start = max(grainStart, offset)
        let stop = min(grainStart + grainBytes, end)
        return Piece(bufferStart: Int(start - offset), length: Int(stop - start), inGrain: start - grainStart)
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64, _ call: String) throws {
        guard offset <= size, length <= size - offset else {
            throw CairnError(.io, "\(call) of \(length) bytes past the end of the VMDK image (virtual size \(size))", path: name, offset: offset)
        }
    }

    private func finishedError() -> CairnError {
        CairnError(.usage, "VMDK image was already finished; no more writes are accepted", path: name)
    }
}
