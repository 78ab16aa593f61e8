import CairnCore
import Synchronization

/// Writes a new dynamic VHDX (no parent, 512-byte logical and 4 KiB physical sectors) into a
/// `RandomAccessFile`.
///
/// Layout of the finished file:
///
///     0         file type identifier "vhdxfile", creator "Cairn"   (written by `finish`)
///     64 KiB    header 1, 128 KiB header 2 (CRC-32C, sequence 1 and 2, empty log)
///     192 KiB   region table 1, 256 KiB region table 2 (BAT and metadata regions)
///     1 MiB     log region (1 MiB, empty: log GUID zero)
///     2 MiB     metadata region (1 MiB): table, then file parameters, virtual disk size,
///               page 83 data, logical and physical sector size at 64 KiB
///     3 MiB     BAT (payload and sector bitmap entries interleaved by the chunk ratio,
///               padded to whole MiB)
///     ...       payload blocks, 1 MiB aligned, in the order they were first written
///
/// Blocks never written, or only with zeros, stay NOT_PRESENT (read as zeros). `write` and
/// `writeZeroes` may run concurrently for disjoint ranges: the allocator sits behind a mutex,
/// data is written outside it.
package final class VHDXDynamicWriter: BlockSink, Sendable {
    package let file: any RandomAccessFile
    /// Virtual size: the requested size rounded up to a multiple of 512.
    package let size: UInt64
    package let blockSize: UInt64
    package var name: String { file.name }

    private static let logOffset: UInt64 = 1 << 20
    private static let logLength: UInt64 = 1 << 20
    private static let metadataOffset: UInt64 = 2 << 20
    private static let metadataLength: UInt64 = 1 << 20
    private static let batOffset: UInt64 = 3 << 20
    private static let logicalSector: UInt64 = 512
    private static let physicalSector: UInt64 = 4096

    private let payloadBlocks: Int
    private let chunkRatio: UInt64
    private let batLength: UInt64
    private let zeroBlock: [UInt8]
    private let state: Mutex<State>

    private struct State {
        /// Per payload block: its file offset, 0 if not allocated.
        var blocks: [UInt64]
        var next: UInt64
        var finished = false
    }

    /// Starts a new image; the file is truncated.
    ///
    /// - Parameters:
    ///   - virtualSize: rounded up to a multiple of 512; at most 64 TiB.
    ///   - blockSize: a power of two from 1 MiB to 256 MiB (default 32 MiB, as Hyper-V).
    package init(file: any RandomAccessFile, virtualSize: UInt64, blockSize: Int = 32 << 20) throws {
        guard blockSize >= Int(VHDX.minBlockSize), blockSize <= Int(VHDX.maxBlockSize), blockSize & (blockSize - 1) == 0 else {
            throw CairnError(.usage, "VHDX block size \(blockSize) must be a power of two from 1 MiB to 256 MiB", path: file.name)
        }
        let (padded, overflow) = virtualSize.addingReportingOverflow(511)
        let size = padded / 512 * 512
        guard !overflow, size <= VHDX.maxVirtualSize else {
            throw CairnError(.usage, "virtual size \(virtualSize) is larger than a VHDX can hold (64 TiB)", path: file.name)
        }
        let block = UInt64(blockSize)
        let payloadBlocks = (size + block - 1) / block
        let chunkRatio = VHDX.sectorsPerBitmapBlock * Self.logicalSector / block
        let entries = payloadBlocks == 0 ? 0 : payloadBlocks + (payloadBlocks - 1) / chunkRatio
        let batLength = max(VHDX.miB, (entries * 8 + VHDX.miB - 1) / VHDX.miB * VHDX.miB)
        guard batLength <= UInt64(UInt32.max) else {
            throw CairnError(.usage, "virtual size \(virtualSize) needs a BAT larger than 4 GiB with \(blockSize)-byte blocks", path: file.name,
                             hint: "use a larger block size")
        }
        self.file = file
        self.size = size
        self.blockSize = block
        self.payloadBlocks = Int(payloadBlocks)
        self.chunkRatio = chunkRatio
        self.batLength = batLength
        self.zeroBlock = [UInt8](repeating: 0, count: min(blockSize, 4 << 20))
        self.state = Mutex(State(blocks: [UInt64](repeating: 0, count: Int(payloadBlocks)), next: Self.batOffset + batLength))
        // The identifier stays zero until `finish`, so an unfinished file is not an image.
        try file.setLength(0)
        try file.setLength(Self.batOffset + batLength)
    }

    // MARK: - BlockSink

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "write")
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        let first = offset / blockSize
        let count = Int((end - 1) / blockSize - first + 1)
        var isZero = [Bool](repeating: false, count: count)
        for i in 0..<count {
            let p = piece(i, first: first, offset: offset, end: end)
            isZero[i] = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[p.bufferStart..<p.bufferStart + p.length]))
        }
        var hosts = [UInt64](repeating: 0, count: count)
        try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            for i in 0..<count {
                let index = Int(first) + i
                if s.blocks[index] == 0 {
                    if isZero[i] { continue }
                    s.blocks[index] = s.next
                    s.next += blockSize
                }
                hosts[i] = s.blocks[index]
            }
        }
        for i in 0..<count where hosts[i] != 0 {
            let p = piece(i, first: first, offset: offset, end: end)
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[p.bufferStart..<p.bufferStart + p.length]), at: hosts[i] + p.inBlock)
        }
    }

    /// Unallocated blocks already read as zeros; allocated ones get zeros written.
    package func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length, "writeZeroes")
        guard length > 0 else { return }
        let end = offset + length
        let targets: [(UInt64, UInt64)] = try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            var out: [(UInt64, UInt64)] = []
            var pos = offset
            while pos < end {
                let index = pos / blockSize
                let pieceEnd = min(end, (index + 1) * blockSize)
                let host = s.blocks[Int(index)]
                if host != 0 { out.append((host + pos % blockSize, pieceEnd - pos)) }
                pos = pieceEnd
            }
            return out
        }
        try zeroBlock.withUnsafeBytes { zeros in
            for (host, count) in targets {
                var done: UInt64 = 0
                while done < count {
                    let n = Int(min(count - done, UInt64(zeros.count)))
                    try file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: host + done)
                    done += UInt64(n)
                }
            }
        }
    }

    /// Writes the BAT, the metadata, the region tables, the headers and finally the file
    /// type identifier, then syncs. No writes are accepted afterwards.
    package func finish() throws {
        let (blocks, end) = try state.withLock { s -> ([UInt64], UInt64) in
            guard !s.finished else { throw finishedError() }
            s.finished = true
            return (s.blocks, s.next)
        }
        try file.setLength(end)

        // BAT: payload entries, with an (unallocated) sector bitmap entry after each chunk.
        var bat = [UInt8](repeating: 0, count: Int(batLength))
        bat.withUnsafeMutableBytes { t in
            for (i, host) in blocks.enumerated() where host != 0 {
                let index = UInt64(i) + UInt64(i) / chunkRatio
                t.storeLittleEndian(host | VHDX.PayloadState.fullyPresent.rawValue, at: Int(index) * 8)
            }
        }
        try bat.withUnsafeBytes { try file.write($0, at: Self.batOffset) }

        // Metadata region: the table, then the items at 64 KiB.
        var meta = [UInt8](repeating: 0, count: VHDX.metadataTableSize + 4096)
        let itemBase = VHDX.metadataTableSize
        let items: [(VHDX.GUID, Int, UInt32, [UInt8])] = [
            (VHDX.fileParameters, 0, VHDX.metadataIsRequired, le(UInt32(blockSize)) + le(UInt32(0))),
            (VHDX.virtualDiskSize, 8, VHDX.metadataIsRequired | VHDX.metadataIsVirtualDisk, le(size)),
            (VHDX.page83Data, 16, VHDX.metadataIsRequired | VHDX.metadataIsVirtualDisk, VHDX.GUID.random().bytes),
            (VHDX.logicalSectorSize, 32, VHDX.metadataIsRequired | VHDX.metadataIsVirtualDisk, le(UInt32(Self.logicalSector))),
            (VHDX.physicalSectorSize, 36, VHDX.metadataIsRequired | VHDX.metadataIsVirtualDisk, le(UInt32(Self.physicalSector))),
        ]
        meta.withUnsafeMutableBytes { m in
            for i in 0..<8 { m[i] = VHDX.metadataSignature[i] }
            m.storeLittleEndian(UInt16(items.count), at: 10)
            for (n, (id, at, flags, value)) in items.enumerated() {
                let base = 32 + n * 32
                m.storeGUID(id, at: base)
                m.storeLittleEndian(UInt32(itemBase + at), at: base + 16)
                m.storeLittleEndian(UInt32(value.count), at: base + 20)
                m.storeLittleEndian(flags, at: base + 24)
                for (j, b) in value.enumerated() { m[itemBase + at + j] = b }
            }
        }
        try meta.withUnsafeBytes { try file.write($0, at: Self.metadataOffset) }

        let regions = VHDXRegion.makeTable([
            VHDXRegion(guid: VHDX.batRegion, fileOffset: Self.batOffset, length: UInt32(batLength), required: true),
            VHDXRegion(guid: VHDX.metadataRegion, fileOffset: Self.metadataOffset, length: UInt32(Self.metadataLength), required: true),
        ])
        try regions.withUnsafeBytes { r in
            try file.write(r, at: VHDX.regionTable1Offset)
            try file.write(r, at: VHDX.regionTable2Offset)
        }
        try file.sync()

        let fileWrite = VHDX.GUID.random(), dataWrite = VHDX.GUID.random()
        for (sequence, offset) in [(UInt64(1), VHDX.header1Offset), (2, VHDX.header2Offset)] {
            let header = VHDXHeader.make(sequenceNumber: sequence, fileWrite: fileWrite, dataWrite: dataWrite,
                                         logOffset: Self.logOffset, logLength: UInt32(Self.logLength))
            try header.withUnsafeBytes { try file.write($0, at: offset) }
        }
        var identifier = VHDX.fileSignature
        for unit in "Cairn".utf16 { identifier += [UInt8(unit & 0xFF), UInt8(unit >> 8)] }
        try identifier.withUnsafeBytes { try file.write($0, at: 0) }
        try file.sync()
    }

    // MARK: - Helpers

    private func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }

    private struct Piece {
        var bufferStart: Int
        var length: Int
        var inBlock: UInt64
    }

    private func piece(_ i: Int, first: UInt64, offset: UInt64, end: UInt64) -> Piece {
        let blockStart = (first + UInt64(i)) * blockSize
        let start = max(blockStart, offset)
        let stop = min(blockStart + blockSize, end)
        return Piece(bufferStart: Int(start - offset), length: Int(stop - start), inBlock: start - blockStart)
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64, _ call: String) throws {
        guard offset <= size, length <= size - offset else {
            throw CairnError(.io, "\(call) of \(length) bytes past the end of the VHDX image (virtual size \(size))", path: name, offset: offset)
        }
    }

    private func finishedError() -> CairnError {
        CairnError(.usage, "VHDX image was already finished; no more writes are accepted", path: name)
    }
}
