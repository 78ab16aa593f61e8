import CairnCore
import Foundation
import Synchronization

/// Retries store operations that failed with a transient I/O error (code `.io`: EIO, EAGAIN, a
/// timeout; on an object store, a 5xx). Every operation of the contract is safe to repeat:
/// `put` is atomic and write-once, `delete` of a missing object succeeds, reads change nothing.
///
/// Not retried: `.notFound` (an answer, not a failure), `.noSpace` (waiting does not free
/// space), and every other code. After the last attempt the error goes up unchanged, so the
/// caller reports what failed and where.
package final class RetryingStore: ObjectStore, Sendable {
    package let base: any ObjectStore
    package let attempts: Int
    package let firstDelay: TimeInterval
    private let retried = Atomic<Int>(0)

    /// `attempts` tries in all; the delay before retry k is firstDelay * 4^(k-1), jittered.
    package init(_ base: any ObjectStore, attempts: Int = 4, firstDelay: TimeInterval = 0.02) {
        self.base = base
        self.attempts = max(1, attempts)
        self.firstDelay = firstDelay
    }

    /// Operations that failed at least once and were tried again.
    package var retriedOperations: Int { retried.load(ordering: .relaxed) }

    private func retrying<T>(_ body: () throws -> T) throws -> T {
        var delay = firstDelay
        for attempt in 1... {
            do {
                return try body()
            } catch let e as CairnError where e.code == .io && attempt < attempts {
                if attempt == 1 { retried.add(1, ordering: .relaxed) }
                Thread.sleep(forTimeInterval: delay * Double.random(in: 0.75...1.25))
                delay *= 4
            }
        }
        fatalError("unreachable: the last attempt returns or throws")
    }

    package var location: String { base.location }
    package func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws { try retrying { try base.put(key, bytes) } }
    package func get(_ key: ObjectKey) throws -> [UInt8] { try retrying { try base.get(key) } }
    package func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int {
        try retrying { try base.get(key, into: &buffer) }
    }
    package func exists(_ key: ObjectKey) throws -> Bool { try retrying { try base.exists(key) } }
    package func size(_ key: ObjectKey) throws -> UInt64? { try retrying { try base.size(key) } }
    package func list(_ namespace: String) throws -> [String] { try retrying { try base.list(namespace) } }
    package func delete(_ key: ObjectKey) throws { try retrying { try base.delete(key) } }
    package func barrier() throws { try retrying { try base.barrier() } }
    package func path(for key: ObjectKey) -> String { base.path(for: key) }
    package func setTemporaryOwner(_ owner: String) { base.setTemporaryOwner(owner) }
    package func prefetch(_ key: ObjectKey) { base.prefetch(key) }
    package func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int {
        try retrying { try base.removeStaleTemporaries(liveOwners: liveOwners) }
    }
}
