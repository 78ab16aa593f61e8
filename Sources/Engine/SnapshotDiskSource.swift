import CairnCore
import Foundation
import RepositoryFormat
import Repository
import Synchronization

/// One disk of a snapshot as a random-access block source, read straight from the repository:
/// what file-level restore, `ls`, `cat` and `diff` read guest file systems through.
///
/// Zero chunks are reported as `.zero` extents and never fetched. Fetched chunks are
/// authenticated, decompressed and digest-checked, then kept in a small LRU cache, so the
/// many small metadata reads of a file-system walk cost one chunk fetch each, not one per read.
package final class SnapshotDiskSource: BlockSource, @unchecked Sendable {
    package let repository: Repository
    package let index: DiskIndex
    package let name: String
    private let cacheLimit: Int
    private let state: Mutex<Cache>

    private struct Cache {
        var chunks: [Int: [UInt8]] = [:]
        var order: [Int] = []   // least recently used first
        var scratch: UnsafeMutableRawBufferPointer
    }

    /// `cacheChunks` chunks are kept (default 64: 32 MiB at the default chunk size).
    package init(repository: Repository, snapshot: SnapshotEntry, disk: Manifest.Disk, cacheChunks: Int = 64) throws {
        guard let indexID = CairnCore.Digest(hex: disk.index) else {
            throw CairnError(.corrupt, "snapshot \(snapshot.id.hex) disk \(disk.name) has an invalid index id '\(disk.index)'")
        }
        let index = try repository.loadIndex(indexID, codec: repository.makeCodec())
        guard index.virtualSize == disk.virtualSize else {
            throw CairnError(.corrupt, "index \(indexID.hex) covers \(index.virtualSize) bytes, the manifest says \(disk.virtualSize)")
        }
        self.repository = repository
        self.index = index
        self.name = "\(snapshot.id.short):\(disk.name)"
        self.cacheLimit = max(2, cacheChunks)
        self.state = Mutex(Cache(scratch: .allocate(byteCount: index.chunkSize + 4096, alignment: 64)))
    }

    deinit {
        state.withLock { $0.scratch.deallocate() }
    }

    package var size: UInt64 { index.virtualSize }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        let cs = UInt64(index.chunkSize)
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let i = Int(pos / cs)
            let within = Int(pos % cs)
            let n = min(buffer.count - done, index.length(ofChunk: i) - within)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            if index.entries[i].isZero {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            } else {
                try withChunk(i) { chunk in
                    chunk.withUnsafeBytes { src in
                        target.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[within..<within + n]))
                    }
                }
            }
            done += n
        }
    }

    /// Runs `body` on chunk `i`, fetching it into the cache first if needed.
    private func withChunk(_ i: Int, _ body: ([UInt8]) throws -> Void) throws {
        try state.withLock { cache in
            if let hit = cache.chunks[i] {
                if let at = cache.order.firstIndex(of: i) { cache.order.remove(at: at) }
                cache.order.append(i)
                try body(hit)
                return
            }
            let len = index.length(ofChunk: i)
            var bytes = [UInt8](repeating: 0, count: len)
            let id = index.entries[i]
            let n: Int
            do {
                n = try bytes.withUnsafeMutableBytes { out in
                    try repository.loadChunk(id, codec: repository.makeCodec(), scratch: &cache.scratch, into: out)
                }
            } catch var e as CairnError {
                e.message = "reading \(name) at offset \(UInt64(i) * UInt64(index.chunkSize)): " + e.message
                throw e
            }
            guard n == len else {
                throw CairnError(.corrupt, "chunk \(id.hex) holds \(n) bytes, position \(i) of \(name) needs \(len)")
            }
            cache.chunks[i] = bytes
            cache.order.append(i)
            if cache.order.count > cacheLimit {
                cache.chunks[cache.order.removeFirst()] = nil
            }
            try body(bytes)
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        let cs = UInt64(index.chunkSize)
        var out: [Extent] = []
        var pos = range.lowerBound
        while pos < end {
            let i = Int(pos / cs)
            let stop = min(UInt64(i + 1) * cs, end)
            out.append(Extent(offset: pos, length: stop - pos, kind: index.entries[i].isZero ? .zero : .data))
            pos = stop
        }
        return out.coalesced()
    }
}
