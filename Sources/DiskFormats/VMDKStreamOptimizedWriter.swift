import CairnCore
import Synchronization

/// Writes a new streamOptimized VMDK (version 3, deflate, markers) front to back, in the
/// layout vSphere / ovftool produce and QEMU reads:
///
///     0                  header, gdOffset = GD_AT_END (written last, by `finish`)
///     1 ..< 21           embedded descriptor (createType "streamOptimized")
///     128 ..             for each grain table span (32 MiB of guest space) in order:
///                          grains with data: grain marker (lba u64, size u32) + zlib stream,
///                          padded to a sector
///                          grain table marker (val 4, type 1) + the 512-entry grain table
///                          (only if the span holds data; otherwise its directory entry is 0)
///     ..                 grain directory marker (type 2) + grain directory
///     ..                 footer marker (type 3) + footer (the header with the real gdOffset)
///     ..                 end-of-stream marker (all zeros)
///
/// Grains are 64 KiB; every stored grain inflates to a full grain (the last one is padded with
/// zeros), as QEMU requires. All-zero grains are not stored.
///
/// `requiresSequentialWrites`: `write` and `writeZeroes` must come in ascending offset order
/// (any sizes; ranges never go back below the highest byte already written); a write below
/// that is refused. Calls are serialized by a mutex.
package final class VMDKStreamOptimizedWriter: BlockSink, Sendable {
    package let file: any RandomAccessFile
    /// Virtual size: the requested size rounded up to a multiple of 512, as qemu-img does.
    package let size: UInt64
    package var name: String { file.name }
    package var requiresSequentialWrites: Bool { true }

    private let grainBytes = VMDK.writerGrainSectors * VMDK.sectorSize
    private let tableEntries = Int(VMDK.writerGTEsPerGT)
    private let tableSectors = VMDK.writerGTEsPerGT * 4 / VMDK.sectorSize
    private let overHead = VMDK.writerGrainSectors
    private let level: Int32
    private let state: Mutex<State>

    private struct State {
        /// Highest guest byte handed over so far (exclusive).
        var highWater: UInt64 = 0
        /// The grain being assembled and its bytes.
        var grain: UInt64?
        var grainBuffer: [UInt8]
        /// The grain table span being assembled and its entries.
        var table: UInt64 = 0
        var tableEntries: [UInt32]
        var tableUsed = false
        var directory: [UInt32]
        /// Next free sector of the file.
        var nextSector: UInt64
        /// Grain marker + compressed data, reused.
        var output: [UInt8]
        var finished = false
    }

    /// Starts a new image. The file is truncated: its previous contents are discarded.
    ///
    /// - Parameter compressionLevel: zlib level 1...9 (6 is zlib's default).
    package init(file: any RandomAccessFile, virtualSize: UInt64, compressionLevel: Int32 = 6) throws {
        guard virtualSize <= VMDK.maxVirtualSize else {
            throw CairnError(.usage, "virtual size \(virtualSize) is larger than the 64 TiB a VMDK can hold", path: file.name)
        }
        guard (1...9).contains(compressionLevel) else {
            throw CairnError(.usage, "zlib compression level \(compressionLevel) must be from 1 to 9", path: file.name)
        }
        let size = vmdkRoundUp(virtualSize, VMDK.sectorSize)
        let grainsPerTable = VMDK.writerGTEsPerGT * VMDK.writerGrainSectors
        let entries = (size / VMDK.sectorSize + grainsPerTable - 1) / grainsPerTable
        let grain = Int(VMDK.writerGrainSectors * VMDK.sectorSize)
        let outputSize = Int(vmdkRoundUp(UInt64(VMDK.grainMarkerHeaderSize + VMDKZlib.bound(grain)), VMDK.sectorSize))
        self.file = file
        self.size = size
        self.level = compressionLevel
        self.state = Mutex(State(grainBuffer: [UInt8](repeating: 0, count: grain),
                                 tableEntries: [UInt32](repeating: 0, count: Int(VMDK.writerGTEsPerGT)),
                                 directory: [UInt32](repeating: 0, count: Int(entries)),
                                 nextSector: VMDK.writerGrainSectors,
                                 output: [UInt8](repeating: 0, count: outputSize)))
        // An unfinished file has a zero header, so it is never mistaken for an image.
        try file.setLength(0)
        try file.setLength(VMDK.writerGrainSectors * VMDK.sectorSize)
    }

    // MARK: - BlockSink

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "write")
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        try state.withLock { s in
            try checkOrder(&s, offset, "write")
            var pos = offset
            while pos < end {
                let g = pos / grainBytes
                let pieceEnd = min(end, (g + 1) * grainBytes)
                let piece = UnsafeRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(pieceEnd - offset)])
                if s.grain != g {
                    if isAllZero(piece) {  // nothing to store; the grain stays unopened
                        pos = pieceEnd
                        continue
                    }
                    try flushGrain(&s)
                    try startGrain(g, &s)
                }
                let inGrain = Int(pos - g * grainBytes)
                s.grainBuffer.withUnsafeMutableBytes { dst in
                    UnsafeMutableRawBufferPointer(rebasing: dst[inGrain..<inGrain + piece.count]).copyMemory(from: piece)
                }
                pos = pieceEnd
            }
            s.highWater = end
        }
    }

    /// Zeros need no storage: bytes above the high-water mark are still zero.
    package func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length, "writeZeroes")
        guard length > 0 else { return }
        try state.withLock { s in
            try checkOrder(&s, offset, "writeZeroes")
            s.highWater = offset + length
        }
    }

    /// Stores the last grain and grain table, the grain directory, the footer and the
    /// end-of-stream marker, then the descriptor and header, and syncs.
    package func finish() throws {
        try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            s.finished = true
            try flushGrain(&s)
            try flushTable(&s)

            let sector = VMDK.sectorSize
            let directorySectors = vmdkRoundUp(UInt64(s.directory.count) * 4, sector) / sector
            let gdSector = s.nextSector + 1
            try checkSectors(gdSector + directorySectors + 3)
            var header = VMDKSparseHeader(version: 3,
                                          flags: VMDK.Flag.newlineDetection | VMDK.Flag.compressedGrains | VMDK.Flag.markers,
                                          capacity: size / sector, grainSize: VMDK.writerGrainSectors,
                                          descriptorOffset: VMDK.writerDescriptorOffset, descriptorSize: VMDK.writerDescriptorSectors,
                                          numGTEsPerGT: UInt32(tableEntries), rgdOffset: 0, gdOffset: gdSector,
                                          overHead: overHead, compressAlgorithm: VMDK.compressionDeflate)

            // Directory marker + directory, footer marker + footer, end-of-stream marker.
            var tail = VMDKMarker(value: directorySectors, size: 0, type: VMDK.Marker.grainDirectory).encoded()
            var directory = [UInt8](repeating: 0, count: Int(directorySectors * sector))
            directory.withUnsafeMutableBytes { d in
                for (i, entry) in s.directory.enumerated() { d.storeLittleEndian(entry, at: i * 4) }
            }
            tail += directory
            tail += VMDKMarker(value: 1, size: 0, type: VMDK.Marker.footer).encoded()
            tail += header.encoded()
            tail += VMDKMarker(value: 0, size: 0, type: VMDK.Marker.endOfStream).encoded()
            try tail.withUnsafeBytes { try file.write($0, at: s.nextSector * sector) }
            s.nextSector += UInt64(tail.count) / sector
            try file.setLength(s.nextSector * sector)

            var descriptor = Array(VMDKDescriptor.render(createType: "streamOptimized", capacity: size / sector,
                                                         extentFileName: VMDKDescriptor.extentFileName(for: name),
                                                         cid: UInt32.random(in: 1...UInt32.max)).utf8)
            descriptor += [UInt8](repeating: 0, count: Int(VMDK.writerDescriptorSectors * sector) - descriptor.count)
            try descriptor.withUnsafeBytes { try file.write($0, at: VMDK.writerDescriptorOffset * sector) }
            try file.sync()

            header.gdOffset = VMDK.gdAtEnd
            try header.encoded().withUnsafeBytes { try file.write($0, at: 0) }
            try file.sync()
        }
    }

    // MARK: - Stream assembly (under the lock)

    private func checkOrder(_ s: inout State, _ offset: UInt64, _ call: String) throws {
        guard !s.finished else { throw finishedError() }
        guard offset >= s.highWater else {
            throw CairnError(.usage,
                             "streamOptimized VMDK is written front to back: \(call) at \(offset) comes after data up to \(s.highWater)",
                             path: name, offset: offset, hint: "write the image in ascending offset order")
        }
    }

    /// Starts grain `g` (ascending), closing the grain table span it leaves.
    private func startGrain(_ g: UInt64, _ s: inout State) throws {
        let t = g / UInt64(tableEntries)
        if t != s.table {
            try flushTable(&s)
            s.table = t
        }
        s.grain = g
        s.grainBuffer.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Compresses and appends the open grain unless it is all zeros.
    private func flushGrain(_ s: inout State) throws {
        guard let g = s.grain else { return }
        s.grain = nil
        if s.grainBuffer.withUnsafeBytes({ isAllZero($0) }) { return }
        let headerSize = VMDK.grainMarkerHeaderSize
        var output = s.output
        s.output = []
        defer { s.output = output }
        let compressed = s.grainBuffer.withUnsafeBytes { input in
            output.withUnsafeMutableBytes { out -> Int? in
                let room = UnsafeMutableRawBufferPointer(rebasing: out[headerSize...])
                return VMDKZlib.compressStream(input, into: room, level: level)
            }
        }
        guard let compressed else {
            throw CairnError(.io, "zlib failed to compress the grain at guest offset \(g * grainBytes)", path: name)
        }
        let total = Int(vmdkRoundUp(UInt64(headerSize + compressed), VMDK.sectorSize))
        let sectors = UInt64(total) / VMDK.sectorSize
        try checkSectors(s.nextSector + sectors)
        output.withUnsafeMutableBytes { out in
            out.storeLittleEndian(g * VMDK.writerGrainSectors, at: 0)
            out.storeLittleEndian(UInt32(compressed), at: 8)
            UnsafeMutableRawBufferPointer(rebasing: out[(headerSize + compressed)..<total]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        try output.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<total]), at: s.nextSector * VMDK.sectorSize) }
        s.tableEntries[Int(g % UInt64(tableEntries))] = UInt32(s.nextSector)
        s.tableUsed = true
        s.nextSector += sectors
    }

    /// Appends the current grain table (marker + table) if any grain of its span is stored.
    private func flushTable(_ s: inout State) throws {
        guard s.tableUsed else { return }
        try checkSectors(s.nextSector + 1 + tableSectors)
        var bytes = VMDKMarker(value: tableSectors, size: 0, type: VMDK.Marker.grainTable).encoded()
        var table = [UInt8](repeating: 0, count: Int(tableSectors * VMDK.sectorSize))
        table.withUnsafeMutableBytes { t in
            for (i, entry) in s.tableEntries.enumerated() { t.storeLittleEndian(entry, at: i * 4) }
        }
        bytes += table
        try bytes.withUnsafeBytes { try file.write($0, at: s.nextSector * VMDK.sectorSize) }
        s.directory[Int(s.table)] = UInt32(s.nextSector + 1)
        s.nextSector += 1 + tableSectors
        for i in s.tableEntries.indices { s.tableEntries[i] = 0 }
        s.tableUsed = false
    }

    private func checkSectors(_ end: UInt64) throws {
        guard end <= VMDK.maxSectorNumber else {
            throw CairnError(.noSpace, "streamOptimized VMDK would grow past 2 TiB (32-bit sector numbers)", path: name)
        }
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
