import CairnCore
import Foundation
import RepositoryFormat
import Repository
import Synchronization

/// One disk of a snapshot as a random-access block source, read straight from the repository:
/// what file-level restore, `ls`, `cat`, `diff` and the NBD exports of instant restore read.
///
/// Zero chunks are reported as `.zero` extents and never fetched. Fetched chunks are
/// authenticated, decompressed and digest-checked, then kept in an LRU cache, so the many
/// small reads of a file-system walk or of an NBD client cost one chunk fetch each. Fetches
/// run in parallel (the lock is held only for the cache bookkeeping; two readers of one chunk
/// share one fetch), and sequential reading is detected: the next chunks are fetched ahead.
package final class SnapshotDiskSource: BlockSource, @unchecked Sendable {
    package let repository: Repository
    package let index: DiskIndex
    package let name: String
    private let cacheLimit: Int
    private let readAhead: Int
    private let state: Mutex<Cache>
    /// Codecs and read buffers of finished fetches, for the next ones: a fresh codec per chunk
    /// set up zstd contexts and grew its buffers again on every fetch.
    private let kits = Mutex<[FetchKit]>([])

    /// What one fetch needs; used by one fetch at a time (taken from and returned to `kits`).
    private final class FetchKit: @unchecked Sendable {
        let codec: ObjectCodec
        var scratch: UnsafeMutableRawBufferPointer

        init(codec: ObjectCodec, chunkSize: Int) {
            self.codec = codec
            scratch = .allocate(byteCount: chunkSize + 4096, alignment: 64)
        }

        deinit { scratch.deallocate() }
    }

    /// A fetch in progress that other readers of the same chunk wait for.
    private final class Pending: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        var result: Result<[UInt8], any Error>?
    }

    private struct Cache {
        var chunks: [Int: [UInt8]] = [:]
        var order: [Int] = []   // least recently used first
        var pending: [Int: Pending] = [:]
        var lastRead = -2
        var prefetching = 0
    }

    /// `cacheChunks` chunks are kept (default 64: 32 MiB at the default chunk size); up to
    /// `readAhead` chunks are fetched ahead of a sequential reader.
    package init(repository: Repository, snapshot: SnapshotEntry, disk: Manifest.Disk, cacheChunks: Int = 64, readAhead: Int = 4) throws {
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
        self.readAhead = max(0, readAhead)
        self.cacheLimit = max(2, cacheChunks, 2 * self.readAhead + 2)
        self.state = Mutex(Cache())
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
                let chunk = try chunk(i, noteRead: true)
                chunk.withUnsafeBytes { src in
                    target.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[within..<within + n]))
                }
            }
            done += n
        }
    }

    /// Chunk `i`, from the cache, from a fetch already running, or fetched now.
    private func chunk(_ i: Int, noteRead: Bool) throws -> [UInt8] {
        enum Step { case hit([UInt8]), wait(Pending), fetch(Pending) }
        var ahead: [Int] = []
        let step: Step = state.withLock { c in
            if noteRead {
                // Sequential reading (this chunk or the one after the last read): fetch ahead.
                if i == c.lastRead + 1, readAhead > 0 {
                    for k in 1...readAhead {
                        let j = i + k
                        guard j < index.entries.count, !index.entries[j].isZero, c.chunks[j] == nil, c.pending[j] == nil,
                              c.prefetching < readAhead else { continue }
                        c.prefetching += 1
                        ahead.append(j)
                    }
                }
                if i != c.lastRead { c.lastRead = i }
            }
            if let hit = c.chunks[i] {
                if let at = c.order.lastIndex(of: i) { c.order.remove(at: at) }
                c.order.append(i)
                return .hit(hit)
            }
            if let p = c.pending[i] { return .wait(p) }
            let p = Pending()
            c.pending[i] = p
            return .fetch(p)
        }
        for j in ahead {
            DispatchQueue.global().async { [self] in
                _ = try? chunk(j, noteRead: false)
                state.withLock { $0.prefetching -= 1 }
            }
        }
        switch step {
        case .hit(let bytes):
            return bytes
        case .wait(let p):
            p.done.wait()
            p.done.signal()   // wake the next waiter
            return try p.result!.get()
        case .fetch(let p):
            let result = Result { try fetch(i) }
            state.withLock { c in
                c.pending[i] = nil
                if case .success(let bytes) = result {
                    c.chunks[i] = bytes
                    c.order.append(i)
                    while c.order.count > cacheLimit { c.chunks[c.order.removeFirst()] = nil }
                }
            }
            p.result = result
            p.done.signal()
            return try result.get()
        }
    }

    /// Reads, authenticates, decompresses and digest-checks chunk `i` (no lock held).
    private func fetch(_ i: Int) throws -> [UInt8] {
        let len = index.length(ofChunk: i)
        let kit = kits.withLock { $0.popLast() } ?? FetchKit(codec: repository.makeCodec(), chunkSize: index.chunkSize)
        defer { kits.withLock { $0.append(kit) } }
        let id = index.entries[i]
        var n = 0
        let bytes: [UInt8]
        do {
            // Not zero-filled first: the chunk overwrites all of it (and a short one is refused).
            bytes = try [UInt8](unsafeUninitializedCapacity: len) { out, count in
                let exact = UnsafeMutableRawBufferPointer(UnsafeMutableBufferPointer(rebasing: out[0..<len]))
                n = try repository.loadChunk(id, codec: kit.codec, scratch: &kit.scratch, into: exact)
                count = n
            }
        } catch var e as CairnError {
            e.message = "reading \(name) at offset \(UInt64(i) * UInt64(index.chunkSize)): " + e.message
            throw e
        }
        guard n == len else {
            throw CairnError(.corrupt, "chunk \(id.hex) holds \(n) bytes, position \(i) of \(name) needs \(len)")
        }
        return bytes
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

    package func prefetch(_ range: Range<UInt64>) {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return }
        let cs = UInt64(index.chunkSize)
        for i in Int(range.lowerBound / cs)...Int((end - 1) / cs) where !index.entries[i].isZero {
            repository.store.prefetch(Repository.chunkKey(index.entries[i]))
        }
    }
}
