import CairnCore

/// An in-memory source with a few bytes replaced, without copying the base: how hostile-image
/// tests corrupt one field of a real image at a time.
public struct PatchedBlockSource: BlockSource {
    public let base: [UInt8]
    public let patches: [Int: UInt8]
    public let name: String

    public init(base: [UInt8], patches: [Int: UInt8], name: String = "patched") {
        self.base = base
        self.patches = patches
        self.name = name
    }

    public var size: UInt64 { UInt64(base.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        let start = Int(offset)
        base.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<start + buffer.count])) }
        for (k, v) in patches where k >= start && k < start + buffer.count { buffer[k - start] = v }
    }

    public func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)]
    }
}
