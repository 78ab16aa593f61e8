import CairnCore
import Foundation
import RepositoryFormat
import Repository
import Storage
import Synchronization

/// Restores one disk of a snapshot into a sink (sparse raw file, qcow2, existing file or
/// device). Chunks are fetched in parallel, authenticated, decompressed and digest-checked
/// before a single byte is written; zero chunks cost nothing on sinks that start zeroed.
package final class RestoreJob: @unchecked Sendable {
    package let repository: Repository
    package let snapshot: SnapshotEntry
    package let disk: Manifest.Disk
    package let sink: any BlockSink
    package let progress: any ProgressReporter
    package let cancel: CancellationToken
    package let workers: Int

    package init(repository: Repository, snapshot: SnapshotEntry, disk: Manifest.Disk, sink: any BlockSink,
                 progress: any ProgressReporter = SilentProgress(), cancel: CancellationToken = CancellationToken(),
                 workers: Int = defaultIOWorkerCount()) {
        self.repository = repository; self.snapshot = snapshot; self.disk = disk; self.sink = sink
        self.progress = progress; self.cancel = cancel; self.workers = workers
    }

    package func run() throws {
        let started = Date()
        let lock = try repository.lock(exclusive: false, job: "restore \(snapshot.id.short)")
        defer { lock.release() }
        let codec = repository.makeCodec()
        guard let indexID = CairnCore.Digest(hex: disk.index) else {
            throw CairnError(.corrupt, "snapshot \(snapshot.id.hex) disk \(disk.name) has an invalid index id '\(disk.index)'")
        }
        let index = try repository.loadIndex(indexID, codec: codec)
        Trace.mark("restore: index loaded, \(index.entries.count) entries")
        guard index.virtualSize == disk.virtualSize else {
            throw CairnError(.corrupt, "index \(indexID.hex) covers \(index.virtualSize) bytes, the manifest says \(disk.virtualSize)")
        }
        let total = index.virtualSize
        let counters = Counters()
        let ticker = ProgressTicker { [progress, counters] in
            progress.report(ProgressSnapshot(phase: "restore", doneBytes: counters.done.load(ordering: .relaxed), totalBytes: total,
                                             readBytes: counters.read.load(ordering: .relaxed), elapsedSeconds: Date().timeIntervalSince(started)))
        }
        defer { ticker.stop() }
        let next = Atomic<Int>(0)
        let repository = self.repository, sink = self.sink, cancel = self.cancel, disk = self.disk, snapshot = self.snapshot
        let entries = index.entries
        // Formats written front to back (VMDK streamOptimized) get their chunks in order: the
        // workers still fetch and decode in parallel, then wait their turn to write.
        let order: WriteOrder? = sink.requiresSequentialWrites ? WriteOrder(cancel: cancel) : nil
        // Readahead: chunk files are asked for a window ahead of the workers, so the disk queue
        // stays deep and the workers find their chunks in the page cache instead of waiting.
        let prefetcher = ChunkPrefetcher(store: repository.store, entries: entries, window: max(64, 4 * workers)) {
            next.load(ordering: .relaxed)
        }
        defer { prefetcher.stop() }
        try runWorkers(count: min(workers, max(1, entries.count)), stop: cancel) { _ in
            let codec = repository.makeCodec()
            let buffer = allocateBuffer(index.chunkSize)
            var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: index.chunkSize + 4096, alignment: 64)
            defer { buffer.deallocate(); scratch.deallocate() }
            while true {
                try cancel.check()
                let i = next.add(1, ordering: .relaxed).oldValue
                if i >= entries.count { break }
                let offset = UInt64(i) * UInt64(index.chunkSize)
                let len = index.length(ofChunk: i)
                let id = entries[i]
                if id.isZero {
                    try order?.waitForTurn(i)
                    try sink.writeZeroes(at: offset, length: UInt64(len))
                    order?.done(i)
                } else {
                    let n: Int
                    do {
                        n = try repository.loadChunk(id, codec: codec, scratch: &scratch, into: buffer)
                    } catch var e as CairnError {
                        e.message = "restoring disk \(disk.name) of snapshot \(snapshot.id.short), chunk at offset \(offset): " + e.message
                        throw e
                    }
                    guard n == len else {
                        throw CairnError(.corrupt, "chunk \(id.hex) holds \(n) bytes, position \(i) of disk \(disk.name) needs \(len)")
                    }
                    try order?.waitForTurn(i)
                    try sink.write(UnsafeRawBufferPointer(rebasing: buffer[0..<len]), at: offset)
                    order?.done(i)
                    counters.read.add(UInt64(len), ordering: .relaxed)
                }
                counters.done.add(UInt64(len), ordering: .relaxed)
            }
        }
        Trace.mark("restore: chunks written")
        try sink.finish()
        Trace.mark("restore: target synced")
        progress.finish(ProgressSnapshot(phase: "restore", doneBytes: total, totalBytes: total,
                                         readBytes: counters.read.load(ordering: .relaxed), elapsedSeconds: Date().timeIntervalSince(started)))
    }
}

/// Walks the index ahead of the restore workers and hints the store to read each chunk file
/// (`ObjectStore.prefetch`), at most `window` positions ahead of the next position handed out.
/// Several threads do it: on a cold cache each hint first waits for the chunk's directory block
/// and inode to be read (`open`), and one thread doing that in turn fell behind the workers,
/// who then waited for their data (measured: a fifth of their waits were on those lookups).
final class ChunkPrefetcher: @unchecked Sendable {
    private let stopped = Atomic<Bool>(false)
    private let claimed = Atomic<Int>(0)
    private let finished = DispatchSemaphore(value: 0)
    private let threads: Int

    /// `position` tells the next position the workers will take.
    init(store: any ObjectStore, entries: [CairnCore.Digest], window: Int, threads: Int = 8,
         position: @escaping @Sendable () -> Int) {
        self.threads = threads
        for _ in 0..<threads {
            let thread = Thread { [self] in
                defer { finished.signal() }
                while !stopped.load(ordering: .relaxed) {
                    let i = claimed.add(1, ordering: .relaxed).oldValue
                    if i >= entries.count { break }
                    if entries[i].isZero { continue }
                    // 2 ms naps: the window (64+ chunks) is far ahead of what the workers take
                    // in that time, and 8 threads napping 0.5 ms woke 3000 more times a restore.
                    while i >= position() + window && !stopped.load(ordering: .relaxed) { usleep(2000) }
                    store.prefetch(Repository.chunkKey(entries[i]))
                }
            }
            thread.start()
        }
    }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        for _ in 0..<threads { finished.wait() }
    }
}

/// Hands out turns to write in ascending chunk order. Workers take positions in ascending order,
/// so the one holding the lowest unwritten position always proceeds: no deadlock, and at most
/// one chunk per worker waits in memory.
final class WriteOrder: @unchecked Sendable {
    private let condition = NSCondition()
    private var next = 0
    private let cancel: CancellationToken

    init(cancel: CancellationToken) { self.cancel = cancel }

    func waitForTurn(_ i: Int) throws {
        condition.lock()
        defer { condition.unlock() }
        while next != i {
            if cancel.isCancelled { throw CairnError(.interrupted, "interrupted") }
            _ = condition.wait(until: Date(timeIntervalSinceNow: 0.2))
        }
    }

    func done(_ i: Int) {
        condition.lock()
        next = i + 1
        condition.broadcast()
        condition.unlock()
    }
}
