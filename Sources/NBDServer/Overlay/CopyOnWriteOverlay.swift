import CairnCore
import Glibc
import Synchronization

/// A writable view of a read-only disk (a restore point): writes land in a local sparse
/// overlay file, reads merge the overlay and the base, the base is never modified
/// (docs/OVERLAY.md). The overlay file survives a restart and is tied to its base by an
/// identity string (snapshot id and disk name), so it is never merged over another disk.
///
/// Layout: a 4 KiB header, a state map (2 bits per block: base / data / zero), then the data
/// area with block i at `dataOffset + i * blockSize` (the file is sparse: only written blocks
/// take space). The state map on disk is updated only at `flush` (and `close`), after the
/// data it describes is durable: a crash loses unflushed writes, never exposes a block whose
/// data did not reach the disk.
package final class CopyOnWriteOverlay: NBDWritableDevice, @unchecked Sendable {
    package static let magic = Array("CAIRNCOW".utf8)
    package static let version: UInt32 = 1
    package static let headerSize = 4096
    package static let maxIdentityLength = 1024

    enum BlockState: UInt8 { case base = 0, data = 1, zero = 2 }

    package let base: any BlockSource
    package let path: String
    package let identity: String
    package let blockSize: Int
    package var size: UInt64 { base.size }
    package var name: String { "overlay \(path) over \(base.name)" }
    let dataOffset: UInt64
    let mapOffset: UInt64
    let blockCount: Int
    private let file: PosixFile
    private let state: Mutex<State>

    private struct State {
        /// 2 bits per block, 4 blocks per byte, as on disk.
        var map: [UInt8]
        var dirty: Bool
        var closed: Bool
    }

    private init(base: any BlockSource, path: String, identity: String, blockSize: Int, file: PosixFile, map: [UInt8]) {
        self.base = base
        self.path = path
        self.identity = identity
        self.blockSize = blockSize
        self.file = file
        self.blockCount = Int((base.size + UInt64(blockSize) - 1) / UInt64(blockSize))
        self.mapOffset = UInt64(Self.headerSize)
        let mapBytes = UInt64((blockCount + 3) / 4)
        self.dataOffset = (UInt64(Self.headerSize) + mapBytes + UInt64(blockSize) - 1) / UInt64(blockSize) * UInt64(blockSize)
        self.state = Mutex(State(map: map, dirty: false, closed: false))
    }

    /// A new, empty overlay at `path` (which must not exist).
    package static func create(path: String, base: any BlockSource, identity: String, blockSize: Int = 65536) throws -> CopyOnWriteOverlay {
        guard blockSize >= 512, blockSize <= 1 << 22, blockSize & (blockSize - 1) == 0 else {
            throw CairnError(.usage, "overlay block size \(blockSize) must be a power of two from 512 B to 4 MiB")
        }
        guard identity.utf8.count <= maxIdentityLength else { throw CairnError(.usage, "overlay identity is longer than \(maxIdentityLength) bytes") }
        let file = try PosixFile(path: path, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        let count = Int((base.size + UInt64(blockSize) - 1) / UInt64(blockSize))
        let overlay = CopyOnWriteOverlay(base: base, path: path, identity: identity, blockSize: blockSize, file: file,
                                         map: [UInt8](repeating: 0, count: (count + 3) / 4))
        do {
            try file.truncate(to: overlay.dataOffset + base.size)
            try overlay.writeHeader()
            try file.fsync()
            try fsyncDirectory(NSStringLike(path).directory)
        } catch {
            unlink(path)
            throw error
        }
        return overlay
    }

    /// Opens an existing overlay; refuses one made for another base.
    package static func open(path: String, base: any BlockSource, identity: String) throws -> CopyOnWriteOverlay {
        let file = try PosixFile(path: path, flags: O_RDWR | O_CLOEXEC)
        var header = [UInt8](repeating: 0, count: headerSize)
        let got = try header.withUnsafeMutableBytes { try file.preadSome(into: $0, at: 0) }
        let b = CheckedBytes(header)
        guard got == headerSize, Array(header[0..<8]) == magic else {
            throw CairnError(.corrupt, "not a Cairn overlay file (bad magic)", path: path, offset: 0)
        }
        guard let version = b.u32(at: 8), version == Self.version else {
            throw CairnError(.unsupported, "overlay version \(b.u32(at: 8) ?? 0) is not supported", path: path, offset: 8)
        }
        guard let bs = b.u32(at: 12), let size = b.u64(at: 16), let idLength = b.u32(at: 24),
              Int(bs) >= 512, Int(bs) <= 1 << 22, bs & (bs - 1) == 0, Int(idLength) <= maxIdentityLength,
              let idBytes = b.slice(at: 28, count: Int(idLength)) else {
            throw CairnError(.corrupt, "overlay header fields are out of range", path: path, offset: 12)
        }
        let stored = String(decoding: idBytes, as: UTF8.self)
        guard stored == identity else {
            throw CairnError(.usage, "overlay belongs to \(stored), not \(identity)", path: path,
                             hint: "use the restore point it was made for, or discard it")
        }
        guard size == base.size else {
            throw CairnError(.corrupt, "overlay covers \(size) bytes, the disk has \(base.size)", path: path, offset: 16)
        }
        let count = Int((size + UInt64(bs) - 1) / UInt64(bs))
        var map = [UInt8](repeating: 0, count: (count + 3) / 4)
        if !map.isEmpty {
            try map.withUnsafeMutableBytes { try file.pread(into: $0, at: UInt64(headerSize)) }
        }
        let overlay = CopyOnWriteOverlay(base: base, path: path, identity: identity, blockSize: Int(bs), file: file, map: map)
        for i in 0..<count where overlay.stateOf(i, in: map) == nil {
            throw CairnError(.corrupt, "overlay state map has an invalid entry for block \(i)", path: path, offset: UInt64(headerSize + i / 4))
        }
        return overlay
    }

    private func writeHeader() throws {
        var h = [UInt8](repeating: 0, count: Self.headerSize)
        h.replaceSubrange(0..<8, with: Self.magic)
        let id = Array(identity.utf8)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { h.replaceSubrange(at..<at + MemoryLayout<T>.size, with: $0) }
        }
        put(Self.version, 8)
        put(UInt32(blockSize), 12)
        put(size, 16)
        put(UInt32(id.count), 24)
        h.replaceSubrange(28..<28 + id.count, with: id)
        try h.withUnsafeBytes { try file.pwrite($0, at: 0) }
    }

    private func stateOf(_ i: Int, in map: [UInt8]) -> BlockState? {
        BlockState(rawValue: (map[i / 4] >> UInt8((i % 4) * 2)) & 3)
    }

    private static func set(_ i: Int, _ s: BlockState, in map: inout [UInt8]) {
        let shift = UInt8((i % 4) * 2)
        map[i / 4] = (map[i / 4] & ~(3 << shift)) | (s.rawValue << shift)
    }

    // MARK: reads

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard buffer.count > 0 else { return }
        let bs = UInt64(blockSize)
        let first = Int(offset / bs), last = Int((offset + UInt64(buffer.count) - 1) / bs)
        let states: [BlockState] = state.withLock { s in (first...last).map { stateOf($0, in: s.map) ?? .base } }
        var pos = offset
        let end = offset + UInt64(buffer.count)
        var k = 0
        while pos < end {
            let i = first + k
            let s = states[k]
            // Extend over following blocks in the same state.
            var stop = min(UInt64(i + 1) * bs, end)
            var j = k + 1
            while stop < end, j < states.count, states[j] == s {
                stop = min(UInt64(first + j + 1) * bs, end)
                j += 1
            }
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(stop - offset)])
            switch s {
            case .base: try base.read(into: piece, at: pos)
            case .data: try file.pread(into: piece, at: dataOffset + pos)
            case .zero: piece.initializeMemory(as: UInt8.self, repeating: 0)
            }
            pos = stop
            k = j
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        let bs = UInt64(blockSize)
        let first = Int(range.lowerBound / bs), last = Int((end - 1) / bs)
        let states: [BlockState] = state.withLock { s in (first...last).map { stateOf($0, in: s.map) ?? .base } }
        var out: [Extent] = []
        var pos = range.lowerBound
        var k = 0
        while pos < end {
            let s = states[k]
            var j = k + 1
            while j < states.count && states[j] == s { j += 1 }
            let stop = min(UInt64(first + j) * bs, end)
            switch s {
            case .base: out += try base.extents(in: pos..<stop)
            case .data: out.append(Extent(offset: pos, length: stop - pos, kind: .data))
            case .zero: out.append(Extent(offset: pos, length: stop - pos, kind: .zero))
            }
            pos = stop
            k = j
        }
        return out.coalesced()
    }

    // MARK: writes

    package func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, bytes.count)
        try modify(offset: offset, length: UInt64(bytes.count)) { blockStart, within, target in
            let from = Int(blockStart + UInt64(within.lowerBound) - offset)
            UnsafeMutableRawBufferPointer(rebasing: target[within]).copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[from..<from + within.count]))
        }
    }

    package func writeZeroes(at offset: UInt64, length: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw CairnError(.usage, "zeroing \(length) bytes at \(offset) goes past the end (\(size))", path: path)
        }
        try modify(offset: offset, length: length, zeroWholeBlocks: true) { _, within, target in
            UnsafeMutableRawBufferPointer(rebasing: target[within]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Trimmed ranges read as zeros afterwards (the protocol allows either).
    package func trim(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length)
    }

    /// Applies `change` to every block touched by `[offset, offset + length)`: partial blocks
    /// are read (merged view), changed and written to the overlay; whole blocks being zeroed
    /// just become `zero` (their overlay space is punched).
    private func modify(offset: UInt64, length: UInt64, zeroWholeBlocks: Bool = false,
                        _ change: (UInt64, Range<Int>, UnsafeMutableRawBufferPointer) -> Void) throws {
        guard length > 0 else { return }
        let bs = UInt64(blockSize)
        let end = offset + length
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        var i = Int(offset / bs)
        while UInt64(i) * bs < end {
            let blockStart = UInt64(i) * bs
            let blockLength = Int(min(bs, size - blockStart))
            let lo = Int(max(offset, blockStart) - blockStart)
            let hi = Int(min(end, blockStart + UInt64(blockLength)) - blockStart)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<blockLength])
            try state.withLock { s in
                guard !s.closed else { throw CairnError(.usage, "the overlay is closed", path: path) }
                if zeroWholeBlocks && lo == 0 && hi == blockLength {
                    Self.set(i, .zero, in: &s.map)
                    s.dirty = true
                    _ = file.punchHole(at: dataOffset + blockStart, length: UInt64(blockLength))
                    return
                }
                // Read-modify-write under the lock, so two partial writes of one block cannot
                // lose each other's bytes.
                if !(lo == 0 && hi == blockLength) {
                    switch stateOf(i, in: s.map) ?? .base {
                    case .base: try base.read(into: target, at: blockStart)
                    case .data: try file.pread(into: target, at: dataOffset + blockStart)
                    case .zero: target.initializeMemory(as: UInt8.self, repeating: 0)
                    }
                }
                change(blockStart, lo..<hi, target)
                try file.pwrite(UnsafeRawBufferPointer(target), at: dataOffset + blockStart)
                Self.set(i, .data, in: &s.map)
                s.dirty = true
            }
            i += 1
        }
    }

    /// Data first, then the state map that points at it, each made durable.
    package func flush() throws {
        try state.withLock { s in
            guard s.dirty else { return }
            try file.fdatasync()
            try s.map.withUnsafeBytes { try file.pwrite($0, at: mapOffset) }
            try file.fdatasync()
            s.dirty = false
        }
    }

    /// Flushes and refuses further writes.
    package func close() throws {
        try flush()
        state.withLock { $0.closed = true }
    }

    /// Bytes of the disk that the overlay holds (written or zeroed blocks).
    package var changedBytes: UInt64 {
        state.withLock { s in
            var n: UInt64 = 0
            for i in 0..<blockCount where (stateOf(i, in: s.map) ?? .base) != .base {
                n += min(UInt64(blockSize), size - UInt64(i) * UInt64(blockSize))
            }
            return n
        }
    }
}

/// The directory part of a path, without Foundation.
struct NSStringLike {
    let path: String
    init(_ path: String) { self.path = path }
    var directory: String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
