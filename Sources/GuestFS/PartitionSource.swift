import CairnCore

/// One partition of a disk as a block source: a window `[offset, offset + length)` over the
/// disk. Reads and allocation maps are translated to disk offsets and back, so file-system
/// readers run on it exactly as on a whole disk.
package struct PartitionSource: BlockSource {
    package let disk: any BlockSource
    package let offset: UInt64
    package let length: UInt64
    package let name: String

    /// A window over `disk`; throws when it does not lie inside the disk.
    package init(disk: any BlockSource, offset: UInt64, length: UInt64, name: String? = nil) throws {
        guard offset <= disk.size, length <= disk.size - offset else {
            throw CairnError(.malformedImage, "partition window \(offset)+\(length) extends past the end of the disk (\(disk.size) bytes)",
                             path: disk.name, offset: offset)
        }
        self.disk = disk
        self.offset = offset
        self.length = length
        self.name = name ?? "\(disk.name)@\(offset)"
    }

    /// The window of `partition` (named like Linux: `disk` + `p<index>`).
    package init(disk: any BlockSource, partition: Partition) throws {
        try self.init(disk: disk, offset: partition.start, length: partition.length, name: "\(disk.name)p\(partition.index)")
    }

    package var size: UInt64 { length }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        try disk.read(into: buffer, at: self.offset + offset)
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, length)
        guard range.lowerBound < end else { return [] }
        let mapped = try disk.extents(in: offset + range.lowerBound..<offset + end)
        var out: [Extent] = []
        out.reserveCapacity(mapped.count)
        for e in mapped {
            // Clip defensively: a source may report extents slightly wider than asked.
            let s = max(e.offset, offset + range.lowerBound)
            let t = min(e.end, offset + end)
            guard s < t else { continue }
            out.append(Extent(offset: s - offset, length: t - s, kind: e.kind))
        }
        return out
    }

    package func prefetch(_ range: Range<UInt64>) {
        let end = min(range.upperBound, length)
        guard range.lowerBound < end else { return }
        disk.prefetch(offset + range.lowerBound..<offset + end)
    }
}
