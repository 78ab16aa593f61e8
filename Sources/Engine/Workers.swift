import CairnCore
import Foundation
import Synchronization

/// A cancellation flag shared by a job's threads; set by the CLI's signal handler.
package final class CancellationToken: Sendable {
    private let flag = Atomic<Bool>(false)
    package init() {}
    package func cancel() { flag.store(true, ordering: .relaxed) }
    package var isCancelled: Bool { flag.load(ordering: .relaxed) }
    package func check() throws {
        if isCancelled { throw CairnError(.interrupted, "interrupted") }
    }
}

/// Runs `body(worker)` on `count` dedicated threads (blocking I/O never runs on Swift's
/// cooperative pool) and rethrows the first error. `stop` is set when any worker fails so the
/// others can finish early.
package func runWorkers(count: Int, stop: CancellationToken, _ body: @escaping @Sendable (Int) throws -> Void) throws {
    let firstError = Mutex<(any Error)?>(nil)
    let group = DispatchGroup()
    for w in 0..<count {
        group.enter()
        let t = Thread {
            defer { group.leave() }
            do {
                try body(w)
            } catch {
                firstError.withLock { if $0 == nil { $0 = error } }
                stop.cancel()
            }
        }
        t.stackSize = 1 << 20
        t.start()
    }
    group.wait()
    if let e = firstError.withLock({ $0 }) { throw e }
}

/// Lock-free counters for progress and statistics.
package final class Counters: Sendable {
    package let done = Atomic<UInt64>(0)
    package let read = Atomic<UInt64>(0)
    package let new = Atomic<UInt64>(0)
    package let dedup = Atomic<UInt64>(0)
    package let zero = Atomic<UInt64>(0)
    package let stored = Atomic<UInt64>(0)
    package init() {}
}

/// Calls a reporter a few times a second from its own thread while a job runs.
package final class ProgressTicker: Sendable {
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)

    package init(interval: Double = 0.5, _ tick: @escaping @Sendable () -> Void) {
        let t = Thread { [wake, finished] in
            while wake.wait(timeout: .now() + interval) == .timedOut {
                tick()
            }
            finished.signal()
        }
        t.start()
    }

    /// Stops at once (does not wait for the next tick).
    package func stop() {
        wake.signal()
        finished.wait()
    }
}

/// The set of chunk ids known to be stored, shared by a job's workers.
package final class ChunkSet: Sendable {
    private let set: Mutex<Set<CairnCore.Digest>>
    package init(_ initial: Set<CairnCore.Digest>) { set = Mutex(initial) }
    /// Claims `id`; true when it was not known (the caller must store it).
    package func claim(_ id: CairnCore.Digest) -> Bool { set.withLock { $0.insert(id).inserted } }
    package func forget(_ id: CairnCore.Digest) { _ = set.withLock { $0.remove(id) } }
    package func contains(_ id: CairnCore.Digest) -> Bool { set.withLock { $0.contains(id) } }
}

/// Default worker count: two per core, so one thread's fdatasync overlaps another's hashing.
package func defaultWorkerCount() -> Int {
    max(2, ProcessInfo.processInfo.activeProcessorCount * 2)
}

/// Restores and checks mostly wait for chunk files to come off the disk: four per core keep
/// enough reads in flight (measured: 8 workers beat 4 by ~10 % on a cold 2-core restore).
package func defaultIOWorkerCount() -> Int {
    max(4, ProcessInfo.processInfo.activeProcessorCount * 4)
}

/// Page-aligned buffer owned by one worker.
package func allocateBuffer(_ n: Int) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, 4096), alignment: 4096)
}

/// A fixed array shared by workers that write disjoint slots.
package final class SharedSlots<T: Sendable>: @unchecked Sendable {
    package let buffer: UnsafeMutableBufferPointer<T>
    package init(count: Int, initial: T) {
        buffer = .allocate(capacity: count)
        buffer.initialize(repeating: initial)
    }
    deinit {
        buffer.deinitialize()
        buffer.deallocate()
    }
    package subscript(i: Int) -> T {
        get { buffer[i] }
        set { buffer[i] = newValue }
    }
    package var array: [T] { Array(buffer) }
}
