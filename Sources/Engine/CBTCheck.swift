import CairnCore
import Foundation
import RepositoryFormat
import Synchronization

/// Trust but verify change tracking (docs/LIVE-BACKUP.md): a random sample of the chunks a
/// dirty bitmap calls unchanged is read and its id compared with the base snapshot's entry.
///
/// Only chunks whose base entry holds data and that the source reports fully allocated are
/// sampled: a chunk partly masked as guest free space was stored with zeros in the masked part,
/// so comparing it with the raw bytes would accuse a bitmap that did nothing wrong.
package struct CBTCheck: Sendable, CustomStringConvertible {
    /// Chunks the bitmap called unchanged (reused from the base).
    package var unchanged: Int
    /// Chunks read and compared.
    package var sampled: Int
    package var bytesRead: UInt64
    /// The first chunk found different from its base entry, if any.
    package var mismatch: (position: Int, offset: UInt64)?

    package var description: String {
        if let m = mismatch {
            return "change tracking missed a write: chunk \(m.position) (offset \(m.offset)) differs from the base snapshot although the dirty bitmap calls it unchanged; change tracking abandoned for this run, every allocated block read and compared by content"
        }
        return "CBT check: \(sampled) of \(unchanged) unchanged chunks read, all equal to the base"
    }

    /// Samples `fraction` (0...1) of the plan's reused chunks (at least one when there are any).
    package static func run(source: any BlockSource, plan: ReadPlan, chunkSize: Int, fraction: Double,
                            makeCodec: @escaping @Sendable () -> ObjectCodec, cancel: CancellationToken) throws -> CBTCheck {
        let reused = plan.known.filter { !$0.id.isZero }
        var check = CBTCheck(unchanged: reused.count, sampled: 0, bytesRead: 0, mismatch: nil)
        guard !reused.isEmpty, fraction > 0 else { return check }
        let want = min(reused.count, max(1, Int((Double(reused.count) * min(fraction, 1)).rounded(.up))))
        var candidates = reused
        if want < candidates.count { candidates.shuffle() }
        // Candidates are read by a few threads at once (random reads: latency, not bandwidth).
        let cs = UInt64(chunkSize)
        let next = Atomic<Int>(0)
        // The result so far and the sample slots claimed by readers.
        let state = Mutex<(check: CBTCheck, claims: Int)>((check, 0))
        let pool = candidates
        try runWorkers(count: min(8, pool.count), stop: cancel) { _ in
            let codec = makeCodec()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            defer { buffer.deallocate() }
            while true {
                try cancel.check()
                // Claim one of the `want` sample slots before reading, so that the workers
                // together read no more than asked.
                let claimed = state.withLock { s -> Bool in
                    guard s.check.mismatch == nil, s.claims < want else { return false }
                    s.claims += 1
                    return true
                }
                if !claimed { break }
                let k = next.add(1, ordering: .relaxed).oldValue
                if k >= pool.count { break }
                let (position, id) = pool[k]
                let offset = UInt64(position) * cs
                let length = Int(min(cs, source.size - offset))
                guard try source.extents(in: offset..<offset + UInt64(length)).allSatisfy({ $0.kind == .data }) else {
                    state.withLock { $0.claims -= 1 }
                    continue
                }
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                try source.read(into: chunk, at: offset)
                let now = isAllZero(UnsafeRawBufferPointer(chunk)) ? Digest.zero : codec.id(of: UnsafeRawBufferPointer(chunk))
                state.withLock { s in
                    s.check.sampled += 1
                    s.check.bytesRead += UInt64(length)
                    if now != id, s.check.mismatch == nil || position < s.check.mismatch!.position { s.check.mismatch = (position, offset) }
                }
            }
        }
        check = state.withLock { $0.check }
        return check
    }
}
