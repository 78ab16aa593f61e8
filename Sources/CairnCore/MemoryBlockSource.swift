/// An in-memory block source, for unit tests of logic and for parsers' own tests.
/// `extents` reports everything as data unless an explicit map is given.
public struct MemoryBlockSource: BlockSource {
    public let bytes: [UInt8]
    public let name: String
    public let size: UInt64
    private let map: [Extent]?

    public init(_ bytes: [UInt8], name: String = "memory", extents: [Extent]? = nil) {
        self.bytes = bytes
        self.name = name
        self.size = UInt64(bytes.count)
        self.map = extents
    }

    /// `bytes` followed by zeros up to `size` (at least `bytes.count`): how the fuzz targets
    /// turn a short input into the start of a larger volume.
    public init(_ bytes: [UInt8], name: String = "memory", zeroPaddedTo size: UInt64) {
        self.bytes = bytes
        self.name = name
        self.size = max(size, UInt64(bytes.count))
        self.map = nil
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard offset < UInt64(bytes.count) else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let start = Int(offset)
        let n = min(buffer.count, bytes.count - start)
        bytes.withUnsafeBytes { src in
            UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<start + n]))
        }
        if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
    }

    public func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        guard let map else { return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)] }
        var out: [Extent] = []
        for e in map where e.end > range.lowerBound && e.offset < end {
            let s = max(e.offset, range.lowerBound)
            let t = min(e.end, end)
            out.append(Extent(offset: s, length: t - s, kind: e.kind))
        }
        return out
    }
}
