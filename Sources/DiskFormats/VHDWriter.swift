import CairnCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes a new dynamic VHD (2 MiB blocks, no parent) into a `RandomAccessFile`.
///
/// Layout of the finished file:
///
///     0          footer copy (512 bytes)             written by `finish`
///     512        dynamic disk header (1024 bytes)    written by `finish`
///     1536       BAT (4 bytes per block, padded to whole sectors)
///     ...        blocks, in the order they were first written: a 512-byte sector bitmap
///                (all ones) followed by 2 MiB of data
///     end        footer (512 bytes)
///
/// The virtual size is the requested size rounded up to a multiple of 512 and is stored in
/// `current_size` as is. The CHS geometry is the spec's when it expresses exactly that size,
/// else the largest geometry (65535/16/255): QEMU then takes the size from `current_size`
/// (as `qemu-img create -o force_size=on` does), as Hyper-V and VirtualBox always do. The
/// creator application is "crn ".
///
/// All-zero blocks are never allocated. `write` and `writeZeroes` may run concurrently for
/// disjoint ranges: the allocator sits behind a mutex, data is written outside it.
package final class VHDDynamicWriter: BlockSink, Sendable {
    package let file: any RandomAccessFile
    package let size: UInt64
    package var name: String { file.name }
    package static let blockSize: UInt64 = 2 << 20

    private let entries: Int
    private let batOffset: UInt64 = 1536
    private let firstBlockOffset: UInt64
    private let bitmapBytes: UInt64 = 512
    private let bitmap: [UInt8]
    private let zeroBlock: [UInt8]
    private let state: Mutex<State>

    private struct State {
        /// Per block: the sector number of its bitmap, or 0xFFFFFFFF.
        var bat: [UInt32]
        var next: UInt64
        var finished = false
    }

    /// Starts a new image; the file is truncated.
    ///
    /// - Parameter virtualSize: rounded up to a multiple of 512; at most 2040 GiB.
    package init(file: any RandomAccessFile, virtualSize: UInt64) throws {
        let (padded, overflow) = virtualSize.addingReportingOverflow(511)
        let size = padded / 512 * 512
        guard !overflow, size <= VHD.maxWriteSize else {
            throw CairnError(.usage, "virtual size \(virtualSize) is larger than a VHD can hold (2040 GiB)", path: file.name,
                             hint: "write a qcow2 or VHDX image instead")
        }
        let entries = Int((size + Self.blockSize - 1) / Self.blockSize)
        self.file = file
        self.size = size
        self.entries = entries
        self.firstBlockOffset = 1536 + (UInt64(entries) * 4 + 511) / 512 * 512
        self.bitmap = [UInt8](repeating: 0xFF, count: 512)
        self.zeroBlock = [UInt8](repeating: 0, count: Int(Self.blockSize))
        self.state = Mutex(State(bat: [UInt32](repeating: VHD.unusedBATEntry, count: entries), next: firstBlockOffset))
        // The first sector stays zero until `finish`, so an unfinished file is not an image.
        try file.setLength(0)
        try file.setLength(firstBlockOffset)
    }

    // MARK: - BlockSink

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "write")
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        let first = offset / Self.blockSize
        let count = Int((end - 1) / Self.blockSize - first + 1)
        var isZero = [Bool](repeating: false, count: count)
        for i in 0..<count {
            let p = piece(i, first: first, offset: offset, end: end)
            isZero[i] = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[p.bufferStart..<p.bufferStart + p.length]))
        }
        var hosts = [UInt64](repeating: 0, count: count)
        var fresh: [UInt64] = []
        try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            for i in 0..<count {
                let index = Int(first) + i
                if s.bat[index] == VHD.unusedBATEntry {
                    if isZero[i] { continue }
                    s.bat[index] = UInt32(s.next / VHD.sectorSize)
                    fresh.append(s.next)
                    s.next += bitmapBytes + Self.blockSize
                }
                hosts[i] = UInt64(s.bat[index]) * VHD.sectorSize + bitmapBytes
            }
        }
        try bitmap.withUnsafeBytes { bits in
            for start in fresh { try file.write(bits, at: start) }
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
        let targets: [(UInt64, Int)] = try state.withLock { s in
            guard !s.finished else { throw finishedError() }
            var out: [(UInt64, Int)] = []
            var pos = offset
            while pos < end {
                let index = pos / Self.blockSize
                let pieceEnd = min(end, (index + 1) * Self.blockSize)
                let entry = s.bat[Int(index)]
                if entry != VHD.unusedBATEntry {
                    out.append((UInt64(entry) * VHD.sectorSize + bitmapBytes + pos % Self.blockSize, Int(pieceEnd - pos)))
                }
                pos = pieceEnd
            }
            return out
        }
        try zeroBlock.withUnsafeBytes { zeros in
            for (host, count) in targets { try file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: host) }
        }
    }

    /// Writes the BAT, the header, the footer and its copy, then syncs. No writes afterwards.
    package func finish() throws {
        let (bat, end) = try state.withLock { s -> ([UInt32], UInt64) in
            guard !s.finished else { throw finishedError() }
            s.finished = true
            return (s.bat, s.next)
        }
        try file.setLength(end + UInt64(VHD.footerSize))
        var table = [UInt8](repeating: 0xFF, count: Int(firstBlockOffset - batOffset))
        table.withUnsafeMutableBytes { t in
            for (i, entry) in bat.enumerated() { t.storeBigEndian(entry, at: i * 4) }
        }
        try table.withUnsafeBytes { try file.write($0, at: batOffset) }
        try file.sync()

        let header = VHDDynamicHeader.make(tableOffset: batOffset, maxTableEntries: UInt32(entries), blockSize: UInt32(Self.blockSize))
        var id = [UInt8](repeating: 0, count: 16)
        var rng = SystemRandomNumberGenerator()
        for i in id.indices { id[i] = UInt8.random(in: 0...255, using: &rng) }
        let now = Int64(time(nil)) - 946_684_800  // seconds since 2000-01-01 00:00 UTC
        let footer = VHDFooter.make(dataOffset: 512, size: size, diskType: .dynamic,
                                    timestamp: UInt32(clamping: max(0, now)), uniqueID: id)
        try header.withUnsafeBytes { try file.write($0, at: 512) }
        try footer.withUnsafeBytes { try file.write($0, at: end) }
        try footer.withUnsafeBytes { try file.write($0, at: 0) }
        try file.sync()
    }

    // MARK: - Helpers

    private struct Piece {
        var bufferStart: Int
        var length: Int
        var inBlock: UInt64
    }

    private func piece(_ i: Int, first: UInt64, offset: UInt64, end: UInt64) -> Piece {
        let blockStart = (first + UInt64(i)) * Self.blockSize
        let start = max(blockStart, offset)
        let stop = min(blockStart + Self.blockSize, end)
        return Piece(bufferStart: Int(start - offset), length: Int(stop - start), inBlock: start - blockStart)
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64, _ call: String) throws {
        guard offset <= size, length <= size - offset else {
            throw CairnError(.io, "\(call) of \(length) bytes past the end of the VHD image (virtual size \(size))", path: name, offset: offset)
        }
    }

    private func finishedError() -> CairnError {
        CairnError(.usage, "VHD image was already finished; no more writes are accepted", path: name)
    }
}
