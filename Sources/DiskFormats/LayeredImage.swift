import CairnCore

// Pieces every image reader shares: reading a layer whose end may come early, the allocation
// map of the layer below, and a small cache of metadata tables.

/// Reads `target` from `source` at `offset`. Bytes past the source's end, or all of them when
/// there is no source, read as zeros: the tail of a last cluster that was never fully written
/// (as QEMU treats it), or a backing image smaller than its child.
func readZeroExtended(_ source: (any BlockSource)?, into target: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    var filled = 0
    if let source, offset < source.size {
        filled = Int(min(UInt64(target.count), source.size - offset))
        try source.read(into: UnsafeMutableRawBufferPointer(rebasing: target[0..<filled]), at: offset)
    }
    if filled < target.count {
        UnsafeMutableRawBufferPointer(rebasing: target[filled...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
}

/// The allocation map of `[start, start + length)` in the layer below (a backing file or a
/// parent): its own extents as far as it reaches, unallocated beyond it or without one.
func lowerLayerExtents(_ lower: (any BlockSource)?, _ start: UInt64, _ length: UInt64) throws -> [Extent] {
    let end = start + length
    guard let lower else { return [Extent(offset: start, length: length, kind: .unallocated)] }
    var out: [Extent] = []
    let covered = min(end, max(start, lower.size))
    if covered > start { out += try lower.extents(in: start..<covered) }
    if covered < end { out.append(Extent(offset: covered, length: end - covered, kind: .unallocated)) }
    return out
}

/// A small least-recently-used cache (L2 tables, grain tables, sector bitmaps). Callers keep it
/// in a Mutex; eviction scans, which is fine for the few hundred entries these hold.
struct LRUCache<Key: Hashable, Value> {
    private var entries: [Key: (value: Value, stamp: UInt64)] = [:]
    private var clock: UInt64 = 0
    let capacity: Int

    init(capacity: Int) { self.capacity = max(1, capacity) }

    mutating func get(_ key: Key) -> Value? {
        guard let hit = entries[key] else { return nil }
        clock += 1
        entries[key] = (hit.value, clock)
        return hit.value
    }

    mutating func put(_ key: Key, _ value: Value) {
        clock += 1
        if entries[key] == nil, entries.count >= capacity,
           let oldest = entries.min(by: { $0.value.stamp < $1.value.stamp })?.key {
            entries[oldest] = nil
        }
        entries[key] = (value, clock)
    }
}

/// A piece of a reader's mapping (unallocated, zero, stored at a host offset...).
protocol MappingRun {
    /// Whether `next`, starting right where `self` (already `length` bytes long) ends, extends
    /// it: the same kind, and for stored data still contiguous on the host.
    func isExtended(by next: Self, afterLength length: UInt64) -> Bool
}

/// Merges a reader's per-cluster (per-grain, per-block) runs into maximal runs before handing
/// them on, so reads coalesce host I/O and extent maps stay short.
struct RunCoalescer<Run: MappingRun> {
    private var start: UInt64 = 0
    private var length: UInt64 = 0
    private var pending: Run?

    mutating func add(_ start: UInt64, _ length: UInt64, _ run: Run, _ body: (UInt64, UInt64, Run) throws -> Void) rethrows {
        if let current = pending, self.start + self.length == start, current.isExtended(by: run, afterLength: self.length) {
            self.length += length
            return
        }
        try flush(body)
        self.start = start
        self.length = length
        pending = run
    }

    mutating func flush(_ body: (UInt64, UInt64, Run) throws -> Void) rethrows {
        if let current = pending { try body(start, length, current) }
        pending = nil
    }
}
