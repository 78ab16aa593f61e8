/// A source with some ranges declared zero: the ranges a guest file system marks free.
///
/// The allocation map reports the masked ranges as `.zero` (so whole chunks inside them are
/// never read), and reads return zeros there without reading the base: a chunk that is partly
/// free reads only its used parts. Everything else passes through unchanged.
public struct MaskedBlockSource: BlockSource {
    public let base: any BlockSource
    /// Ascending, non-overlapping, non-empty, inside `[0, base.size)`.
    public let masked: [Range<UInt64>]

    /// `masked` may come in any order and overlap; it is clipped to the source, sorted and merged.
    public init(base: any BlockSource, masked: [Range<UInt64>]) {
        self.base = base
        self.masked = masked.compactMap { r -> Range<UInt64>? in
            let hi = min(r.upperBound, base.size)
            return r.lowerBound < hi ? r.lowerBound..<hi : nil
        }.mergedAscending()
    }

    public var size: UInt64 { base.size }
    public var name: String { base.name }

    /// Bytes declared zero.
    public var maskedBytes: UInt64 { masked.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) } }

    /// Index of the first masked range ending after `offset`.
    private func firstMasked(endingAfter offset: UInt64) -> Int {
        var lo = 0, hi = masked.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if masked[mid].upperBound <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        let end = offset + UInt64(buffer.count)
        var pos = offset
        var i = firstMasked(endingAfter: offset)
        while pos < end {
            let nextMask = i < masked.count ? masked[i] : end..<end
            if nextMask.lowerBound > pos {
                // Used bytes up to the next masked range: read them.
                let stop = min(nextMask.lowerBound, end)
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(stop - offset)])
                try base.read(into: slice, at: pos)
                pos = stop
            } else {
                let stop = min(nextMask.upperBound, end)
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(stop - offset)])
                slice.initializeMemory(as: UInt8.self, repeating: 0)
                pos = stop
                i += 1
            }
        }
    }

    public func extents(in range: Range<UInt64>) throws -> [Extent] {
        let baseExtents = try base.extents(in: range)
        var out: [Extent] = []
        out.reserveCapacity(baseExtents.count)
        for e in baseExtents {
            guard e.kind == .data else {
                out.append(e)
                continue
            }
            // Cut the data extent at the masked ranges inside it.
            var pos = e.offset
            var i = firstMasked(endingAfter: e.offset)
            while pos < e.end {
                if i < masked.count, masked[i].lowerBound < e.end {
                    let m = masked[i]
                    if m.lowerBound > pos {
                        out.append(Extent(offset: pos, length: m.lowerBound - pos, kind: .data))
                        pos = m.lowerBound
                    }
                    let stop = min(m.upperBound, e.end)
                    out.append(Extent(offset: pos, length: stop - pos, kind: .zero))
                    pos = stop
                    if m.upperBound <= e.end { i += 1 }
                } else {
                    out.append(Extent(offset: pos, length: e.end - pos, kind: .data))
                    pos = e.end
                }
            }
        }
        return out.coalesced()
    }

    public func prefetch(_ range: Range<UInt64>) { base.prefetch(range) }
}

extension Array where Element == Range<UInt64> {
    /// The same bytes as ascending, non-overlapping, non-empty ranges (touching ones merged).
    public func mergedAscending() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        out.reserveCapacity(count)
        for r in sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<Swift.max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }
}
