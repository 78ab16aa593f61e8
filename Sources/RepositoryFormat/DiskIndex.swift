import CairnCore

/// A per-disk index: one 32-byte chunk id per chunk position (docs/FORMAT.md, "Disk index").
///
///     0  8  magic "CAIRNIDX"     8  4  version (1)       12 4  header length (64)
///     16 8  virtual size         24 4  chunk size        28 4  reserved (0)
///     32 8  entry count          40 24 reserved (0)
///     64 .. entry count x 32 bytes: chunk id, or 32 zero bytes for an all-zero chunk
///
/// Invariant: entry count = ceil(virtual size / chunk size); the last chunk holds
/// `virtual size - (count - 1) * chunk size` bytes.
package struct DiskIndex: Sendable, Equatable {
    package var virtualSize: UInt64
    package var chunkSize: Int
    package var entries: [Digest]

    package init(virtualSize: UInt64, chunkSize: Int, entries: [Digest]) {
        self.virtualSize = virtualSize
        self.chunkSize = chunkSize
        self.entries = entries
    }

    package static func entryCount(virtualSize: UInt64, chunkSize: Int) -> Int {
        Int((virtualSize + UInt64(chunkSize) - 1) / UInt64(chunkSize))
    }

    /// Bytes covered by entry `i`.
    package func length(ofChunk i: Int) -> Int {
        let start = UInt64(i) * UInt64(chunkSize)
        return Int(min(UInt64(chunkSize), virtualSize - start))
    }

    package func encode() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Magic.indexHeaderSize + entries.count * 32)
        out.append(contentsOf: Magic.index)
        out.appendLE(Magic.indexVersion)
        out.appendLE(UInt32(Magic.indexHeaderSize))
        out.appendLE(virtualSize)
        out.appendLE(UInt32(chunkSize))
        out.appendLE(UInt32(0))
        out.appendLE(UInt64(entries.count))
        out.append(contentsOf: [UInt8](repeating: 0, count: 24))
        var d = [UInt8](repeating: 0, count: 32)
        for e in entries {
            d.withUnsafeMutableBytes { e.store(to: $0) }
            out.append(contentsOf: d)
        }
        return out
    }

    package static func decode(_ bytes: [UInt8], what: String) throws -> DiskIndex {
        try bytes.withUnsafeBytes { b in
            guard b.count >= Magic.indexHeaderSize else { throw CairnError(.corrupt, "\(what): index shorter than its header") }
            guard Array(b[0..<8]) == Magic.index else { throw CairnError(.corrupt, "\(what): bad index magic") }
            let version = b.le(UInt32.self, at: 8)
            guard version == Magic.indexVersion else { throw CairnError(.unsupported, "\(what): index version \(version) is not supported") }
            let headerLength = Int(b.le(UInt32.self, at: 12))
            guard headerLength == Magic.indexHeaderSize else { throw CairnError(.corrupt, "\(what): index header length \(headerLength)") }
            let size = b.le(UInt64.self, at: 16)
            let chunkSize = Int(b.le(UInt32.self, at: 24))
            guard RepositoryConfig.validChunkSize(chunkSize) else { throw CairnError(.corrupt, "\(what): index chunk size \(chunkSize) is invalid") }
            let count = b.le(UInt64.self, at: 32)
            guard size <= UInt64(1) << 62, count == UInt64(entryCount(virtualSize: size, chunkSize: chunkSize)) else {
                throw CairnError(.corrupt, "\(what): index entry count \(count) does not match size \(size)")
            }
            guard b.le(UInt32.self, at: 28) == 0, b[40..<64].allSatisfy({ $0 == 0 }) else {
                throw CairnError(.corrupt, "\(what): reserved index header bytes are not zero")
            }
            guard UInt64(b.count - Magic.indexHeaderSize) == count * 32 else {
                throw CairnError(.corrupt, "\(what): index holds \(b.count - Magic.indexHeaderSize) entry bytes for \(count) entries")
            }
            var entries = [Digest]()
            entries.reserveCapacity(Int(count))
            var o = Magic.indexHeaderSize
            for _ in 0..<Int(count) {
                entries.append(Digest(bytes: UnsafeRawBufferPointer(rebasing: b[o..<o + 32])))
                o += 32
            }
            return DiskIndex(virtualSize: size, chunkSize: chunkSize, entries: entries)
        }
    }
}
