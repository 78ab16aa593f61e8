/// An in-memory block source, for unit tests of logic and for parsers' own tests.
/// `extents` reports everything as data unless an explicit map is given.
public struct MemoryBlockSource: BlockSource {
    public let bytes: [UInt8]
    public let name: String
    private let map: [Extent]?

    public init(_ bytes: [UInt8], name: String = "memory", extents: [Extent]? = nil) {
        self.bytes = bytes
        self.name = name
        self.map = extents
    }

    public var size: UInt64 { UInt64(bytes.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        bytes.withUnsafeBytes { src in
            let start = Int(offset)
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<start + buffer.count]))
        }
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
