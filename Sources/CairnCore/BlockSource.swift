/// Everything Cairn reads is a block source: a running VM's disk seen through NBD, a qcow2 or
/// raw image, a block device, or a snapshot inside the repository.
///
/// A source answers two questions: *give me bytes N..M* (`read(into:at:)`) and *which ranges
/// are allocated, zero or unallocated* (`extents(in:)`). Change tracking is a separate,
/// optional question (`ChangeTrackingSource`), so the backup pipeline only ever consumes
/// ranges and never cares where they came from.
///
/// Sources are `Sendable` and must allow concurrent `read` calls from several threads
/// (positional reads; any cache inside is protected by the source itself).
public protocol BlockSource: Sendable {
    /// Virtual size in bytes.
    var size: UInt64 { get }

    /// Fills `buffer` with the bytes at `[offset, offset + buffer.count)`.
    /// Throws if the range extends past `size` or the underlying data is malformed.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws

    /// The allocation map of `range`: extents in ascending order that cover the range
    /// exactly, with no gaps and no overlap. A source that cannot tell reports `.data`.
    func extents(in range: Range<UInt64>) throws -> [Extent]

    /// A short name for messages (usually a path).
    var name: String { get }

    /// A hint that `range` will be read soon (sources backed by files start the I/O now).
    func prefetch(_ range: Range<UInt64>)
}

extension BlockSource {
    public func prefetch(_ range: Range<UInt64>) {}

    /// The allocation map of the whole source.
    public func allExtents() throws -> [Extent] {
        try extents(in: 0..<size)
    }

    /// Reads `count` bytes at `offset` into a new array (convenience for parsers and tests;
    /// the hot path reads into buffers it owns).
    public func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count >= 0 else { throw CairnError(.malformedImage, "negative read length", path: name, offset: offset) }
        guard offset <= size, UInt64(count) <= size - offset else {
            throw CairnError(.malformedImage, "read of \(count) bytes past the end (size \(size))", path: name, offset: offset)
        }
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }

    /// Checks that `[offset, offset + count)` lies inside the source; throws a clear error if not.
    public func checkRange(_ offset: UInt64, _ count: Int) throws {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw CairnError(.io, "read of \(count) bytes past the end of the source (size \(size))", path: name, offset: offset)
        }
    }
}

/// A source that can say which ranges changed since an earlier point (QEMU dirty bitmaps).
///
/// The token is opaque to the pipeline; the source returns `nil` when it cannot vouch for the
/// token (missing bitmap, other chain), and the pipeline then reads everything and compares
/// hashes.
public protocol ChangeTrackingSource: BlockSource {
    func changedRanges(since token: String) throws -> [Range<UInt64>]?
}

/// Where restores write: positional writes plus a way to say "this range is zero".
public protocol BlockSink: Sendable {
    var size: UInt64 { get }
    var name: String { get }
    /// Writes `buffer` at `offset`. Safe to call concurrently for disjoint ranges.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Declares `[offset, offset + length)` to read as zeros. Sinks that start out zeroed
    /// (a new sparse file, a new qcow2) do nothing; an existing file or device writes zeros.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Makes everything written durable and finishes the format's metadata.
    func finish() throws

    /// True for formats that must be written front to back (VMDK streamOptimized): the
    /// restore then hands over chunks in ascending offset order, one at a time.
    var requiresSequentialWrites: Bool { get }
}

extension BlockSink {
    public var requiresSequentialWrites: Bool { false }
}

/// A growable file that format writers (qcow2, VMDK...) write into by position.
/// Keeps format code free of file-system calls; `PosixFile` is the real one.
public protocol RandomAccessFile: Sendable {
    var name: String { get }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Sets the file's length (extending with zeros / holes).
    func setLength(_ length: UInt64) throws
    /// Makes all writes durable.
    func sync() throws
}
