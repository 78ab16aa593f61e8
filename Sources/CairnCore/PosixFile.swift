#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CLinuxShims

/// A thin owner of a file descriptor with positional, EINTR-safe, short-I/O-safe calls.
/// Every error names the call, the path and the offset.
public final class PosixFile: @unchecked Sendable {
    // @unchecked: the descriptor is immutable after init; pread/pwrite are thread-safe.
    public let fd: Int32
    public let path: String

    public init(path: String, flags: Int32, mode: mode_t = 0o644) throws {
        let fd = open(path, flags | O_CLOEXEC, mode)
        guard fd >= 0 else { throw CairnError.errno("open", Glibc.errno, path: path) }
        self.fd = fd
        self.path = path
    }

    deinit { close(fd) }

    public static func openReadOnly(_ path: String) throws -> PosixFile {
        try PosixFile(path: path, flags: O_RDONLY)
    }

    /// Reads exactly `buffer.count` bytes at `offset`; throws on end of file.
    public func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try preadSome(into: buffer, at: offset)
        if n < buffer.count {
            throw CairnError(.io, "unexpected end of file reading \(buffer.count) bytes", path: path, offset: offset + UInt64(n))
        }
    }

    /// Reads up to `buffer.count` bytes; returns how many (0 at end of file).
    public func preadSome(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw CairnError.errno("pread", errno, path: path, offset: offset + UInt64(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func pwrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw CairnError.errno("pwrite", errno, path: path, offset: offset + UInt64(done))
            }
            done += n
        }
    }

    public func fsync() throws {
        while Glibc.fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw CairnError.errno("fsync", errno, path: path)
        }
    }

    public func fdatasync() throws {
        while Glibc.fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw CairnError.errno("fdatasync", errno, path: path)
        }
    }

    /// Starts writing the file's dirty pages back without waiting for them
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); a hint, never fails.
    public func startWriteback() {
        _ = cairn_start_writeback(fd, 0, 0)
    }

    public func truncate(to size: UInt64) throws {
        guard ftruncate(fd, off_t(size)) == 0 else { throw CairnError.errno("ftruncate", errno, path: path) }
    }

    public func stat() throws -> Glibc.stat {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { throw CairnError.errno("fstat", errno, path: path) }
        return st
    }

    public var isBlockDevice: Bool {
        guard let st = try? stat() else { return false }
        return (st.st_mode & S_IFMT) == S_IFBLK
    }

    /// Size of a regular file, or of a block device (BLKGETSIZE64).
    public func byteSize() throws -> UInt64 {
        let st = try stat()
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var size: UInt64 = 0
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            let blkGetSize64: UInt = 0x8008_1272
            guard ioctl(fd, blkGetSize64, &size) == 0 else { throw CairnError.errno("ioctl(BLKGETSIZE64)", errno, path: path) }
            return size
        }
        return UInt64(st.st_size)
    }

    /// Next data offset at or after `offset` (SEEK_DATA); nil when only a hole remains.
    /// Returns `offset` itself if the file system cannot tell (EINVAL other than at EOF).
    public func seekData(_ offset: UInt64) throws -> UInt64? {
        let r = lseek(fd, off_t(offset), cairn_seek_data_whence())
        if r < 0 {
            if errno == ENXIO { return nil }
            throw CairnError.errno("lseek(SEEK_DATA)", errno, path: path, offset: offset)
        }
        return UInt64(r)
    }

    public func seekHole(_ offset: UInt64) throws -> UInt64 {
        let r = lseek(fd, off_t(offset), cairn_seek_hole_whence())
        if r < 0 { throw CairnError.errno("lseek(SEEK_HOLE)", errno, path: path, offset: offset) }
        return UInt64(r)
    }

    /// Deallocates a range so it reads as zeros (regular files); false if unsupported.
    public func punchHole(at offset: UInt64, length: UInt64) -> Bool {
        cairn_punch_hole(fd, Int64(offset), Int64(length)) == 0
    }
}

/// Fsyncs a directory so that renames and creations inside it are durable.
public func fsyncDirectory(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw CairnError.errno("open(directory)", errno, path: path) }
    defer { close(fd) }
    if Glibc.fsync(fd) != 0 { throw CairnError.errno("fsync(directory)", errno, path: path) }
}

/// Flushes the whole file system holding `path` (one barrier for many files).
public func syncFileSystem(containing path: String) throws {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw CairnError.errno("open", errno, path: path) }
    defer { close(fd) }
    if cairn_syncfs(fd) != 0 { throw CairnError.errno("syncfs", errno, path: path) }
}

/// The `f_type` magic number of the file system holding `path` (statfs(2)), nil when it
/// cannot be asked.
public func fileSystemType(of path: String) -> UInt32? {
    let t = cairn_fs_type(path)
    return t < 0 ? nil : UInt32(truncatingIfNeeded: t)
}

/// Tunes glibc malloc for chunk-sized buffers (call once at startup of a tool), and asks for
/// huge pages under the first 48 MiB of heap (the key derivation's table lands there).
public func tuneMallocForLargeBuffers() {
    cairn_malloc_tune()
    cairn_heap_prefer_hugepages(48 << 20)
}

/// A file whose `sync` does nothing: image writers keep their write order, but nothing is
/// forced to disk (`cairn restore --no-sync`).
public struct UnsyncedFile: RandomAccessFile {
    public let file: PosixFile
    public init(_ file: PosixFile) { self.file = file }
    public var name: String { file.path }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try file.pwrite(buffer, at: offset) }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try file.pread(into: buffer, at: offset) }
    public func setLength(_ length: UInt64) throws { try file.truncate(to: length) }
    public func sync() throws {}
}

extension PosixFile: RandomAccessFile {
    public var name: String { path }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try pwrite(buffer, at: offset) }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try pread(into: buffer, at: offset) }
    public func setLength(_ length: UInt64) throws { try truncate(to: length) }
    public func sync() throws { try fsync() }
}
