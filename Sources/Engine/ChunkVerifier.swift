import CairnCore
import Foundation
import Repository
import Synchronization

/// Reads, authenticates, decompresses and digest-checks `ids` on `workers` threads (one
/// codec and buffer pair per thread), for `cairn check --read-data` and `cairn verify`.
/// `lengths` gives the plaintext length an index needs; a chunk of another length is corrupt.
/// Returns the failures and the plaintext bytes read.
package func verifyChunks(_ ids: [CairnCore.Digest], lengths: [CairnCore.Digest: Int], repository: Repository, workers: Int,
                          cancel: CancellationToken, progress: any ProgressReporter, phase: String,
                          started: Date = Date()) throws -> (bad: [CairnCore.Digest: CairnError], bytes: UInt64) {
    guard !ids.isEmpty else { return ([:], 0) }
    let next = Atomic<Int>(0)
    let bad = Mutex<[CairnCore.Digest: CairnError]>([:])
    let doneBytes = Atomic<UInt64>(0)
    let total = ids.reduce(UInt64(0)) { $0 + UInt64(lengths[$1] ?? 0) }
    let ticker = ProgressTicker {
        progress.report(ProgressSnapshot(phase: phase, doneBytes: doneBytes.load(ordering: .relaxed), totalBytes: total,
                                         elapsedSeconds: Date().timeIntervalSince(started)))
    }
    defer { ticker.stop() }
    let chunkSize = repository.chunkSize
    try runWorkers(count: min(workers, ids.count), stop: cancel) { _ in
        let codec = repository.makeCodec()
        let buffer = allocateBuffer(chunkSize)
        var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize + 4096, alignment: 64)
        defer { buffer.deallocate(); scratch.deallocate() }
        while true {
            try cancel.check()
            let k = next.add(1, ordering: .relaxed).oldValue
            if k >= ids.count { break }
            let id = ids[k]
            do {
                let n = try repository.loadChunk(id, codec: codec, scratch: &scratch, into: buffer)
                if let want = lengths[id], n != want {
                    throw CairnError(.corrupt, "chunk \(id.hex) holds \(n) bytes where the index needs \(want)")
                }
                doneBytes.add(UInt64(n), ordering: .relaxed)
            } catch let e as CairnError {
                bad.withLock { $0[id] = e }
            }
        }
    }
    return (bad.withLock { $0 }, doneBytes.load(ordering: .relaxed))
}
