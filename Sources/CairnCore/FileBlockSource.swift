#if canImport(Glibc)
import Glibc
#endif
import CLinuxShims

/// A raw image file or block device as a `BlockSource`.
///
/// Sparse-aware: `extents` asks the file system with `SEEK_DATA`/`SEEK_HOLE`, so holes are
/// reported as `.unallocated` and never read. Block devices report everything as data.
public final class FileBlockSource: BlockSource, @unchecked Sendable {
    // @unchecked: immutable after init; PosixFile is thread-safe for positional reads.
    public let file: PosixFile
    public let size: UInt64
    public var name: String { file.path }
    private let isRegular: Bool

    public init(path: String) throws {
        let f = try PosixFile.openReadOnly(path)
        self.file = f
        self.size = try f.byteSize()
        self.isRegular = !f.isBlockDevice
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        try file.pread(into: buffer, at: offset)
    }

    /// Starts asynchronous read-ahead (POSIX_FADV_WILLNEED), so the pipeline's next chunks
    /// are in the page cache when a worker asks for them.
    public func prefetch(_ range: Range<UInt64>) {
        guard range.lowerBound < size else { return }
        let end = min(range.upperBound, size)
        _ = posix_fadvise(file.fd, off_t(range.lowerBound), off_t(end - range.lowerBound), POSIX_FADV_WILLNEED)
    }

    public func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        guard isRegular else { return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)] }
        var out: [Extent] = []
        var pos = range.lowerBound
        while pos < end {
            guard let data = try file.seekData(pos), data < end else {
                out.append(Extent(offset: pos, length: end - pos, kind: .unallocated))
                break
            }
            if data > pos { out.append(Extent(offset: pos, length: data - pos, kind: .unallocated)) }
            let hole = min(try file.seekHole(data), end)
            out.append(Extent(offset: data, length: hole - data, kind: .data))
            pos = hole
        }
        return out.coalesced()
    }
}

/// A raw file or block device as a restore target.
///
/// A new file is created sparse (`ftruncate`), so zero ranges cost nothing. An existing file or
/// device is overwritten in place: zero ranges are punched (regular files) or written as zeros.
public final class FileBlockSink: BlockSink, @unchecked Sendable {
    public let file: PosixFile
    public let size: UInt64
    public var name: String { file.path }
    private let startsZeroed: Bool
    private let isDevice: Bool
    /// When false, nothing is flushed: `finish` returns with the data possibly still in the page
    /// cache (`cairn restore --no-sync`).
    private let durable: Bool

    /// - Parameters:
    ///   - create: create a new file (fails if it exists unless `overwrite`), sized `size`.
    ///   - durable: start write-back as data arrives and fsync in `finish` (the default).
    public init(path: String, size: UInt64, create: Bool, overwrite: Bool = false, durable: Bool = true) throws {
        self.durable = durable
        if create {
            var flags = O_RDWR | O_CREAT
            flags |= overwrite ? O_TRUNC : O_EXCL
            let f = try PosixFile(path: path, flags: flags)
            try f.truncate(to: size)
            self.file = f
            self.startsZeroed = true
            self.isDevice = false
        } else {
            let f = try PosixFile(path: path, flags: O_RDWR)
            self.isDevice = f.isBlockDevice
            let existing = try f.byteSize()
            if isDevice {
                guard existing >= size else {
                    throw CairnError(.usage, "block device holds \(existing) bytes, the disk needs \(size)", path: path, hint: "choose a device at least as large as the disk")
                }
            } else if existing != size {
                try f.truncate(to: size)
            }
            self.file = f
            self.startsZeroed = false
        }
        self.size = size
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw CairnError(.io, "write past the end of the target (size \(size))", path: name, offset: offset)
        }
        guard startsZeroed else {
            try writeThrough(buffer, at: offset)
            return
        }
        // A new sparse file reads zeros already: write only the 4 KiB blocks that hold data,
        // so the restored file keeps the guest's zero blocks as holes (like qemu-img convert).
        let block = 4096
        var runStart = -1
        var pos = 0
        while pos < buffer.count {
            let aligned = Int((offset + UInt64(pos)) % UInt64(block))
            let n = min(block - aligned, buffer.count - pos)
            let zero = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + n]))
            if zero, runStart >= 0 {
                try writeThrough(UnsafeRawBufferPointer(rebasing: buffer[runStart..<pos]), at: offset + UInt64(runStart))
                runStart = -1
            } else if !zero, runStart < 0 {
                runStart = pos
            }
            pos += n
        }
        if runStart >= 0 {
            try writeThrough(UnsafeRawBufferPointer(rebasing: buffer[runStart..<buffer.count]), at: offset + UInt64(runStart))
        }
    }

    private func writeThrough(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try file.pwrite(buffer, at: offset)
        // Start write-back now so that I/O overlaps the rest of the restore and `finish`'s
        // fsync has little left to wait for.
        if durable { _ = cairn_start_writeback(file.fd, Int64(offset), Int64(buffer.count)) }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        if startsZeroed || length == 0 { return }
        if !isDevice, file.punchHole(at: offset, length: length) { return }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var pos = offset
        let end = offset + length
        while pos < end {
            let n = Int(min(UInt64(zeros.count), end - pos))
            try file.pwrite(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: pos)
            pos += UInt64(n)
        }
    }

    public func finish() throws {
        if durable { try file.fsync() }
    }
}
