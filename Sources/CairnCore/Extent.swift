/// What a range of a virtual disk holds, as far as the source knows without reading it.
public enum ExtentKind: UInt8, Sendable, Hashable, CustomStringConvertible {
    /// Allocated: must be read.
    case data = 0
    /// Known to read as zeros (a qcow2 zero cluster, a punched hole): never read.
    case zero = 1
    /// Not allocated in this layer and nothing below it: reads as zeros, never read.
    case unallocated = 2

    public var description: String {
        switch self {
        case .data: "data"
        case .zero: "zero"
        case .unallocated: "unallocated"
        }
    }

    /// Whether the range must be read to know its contents.
    public var needsRead: Bool { self == .data }
}

/// A contiguous range of a virtual disk with one `ExtentKind`.
public struct Extent: Sendable, Hashable, CustomStringConvertible {
    public var offset: UInt64
    public var length: UInt64
    public var kind: ExtentKind

    public init(offset: UInt64, length: UInt64, kind: ExtentKind) {
        self.offset = offset
        self.length = length
        self.kind = kind
    }

    public var end: UInt64 { offset + length }
    public var range: Range<UInt64> { offset..<end }

    public var description: String { "\(kind)[\(offset)+\(length)]" }
}

extension Array where Element == Extent {
    /// Merges neighbours of the same kind; drops empty extents.
    public func coalesced() -> [Extent] {
        var out: [Extent] = []
        out.reserveCapacity(count)
        for e in self where e.length > 0 {
            if let last = out.last, last.kind == e.kind, last.end == e.offset {
                out[out.count - 1].length += e.length
            } else {
                out.append(e)
            }
        }
        return out
    }
}
