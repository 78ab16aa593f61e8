#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CairnCore
import Storage
import Synchronization

/// The operations of an `ObjectStore` that a `FaultPlan` can disturb.
package enum FaultOperation: String, CaseIterable, Hashable, Sendable, CustomStringConvertible {
    case get, put, exists, size, list, delete, barrier

    package var description: String { rawValue }
}

/// What a `FaultInjectingStore` injects. All rates are probabilities in 0...1 per eligible
/// operation; the all-zero default plan injects nothing.
package struct FaultPlan: Sendable {
    /// Seed of every random decision.
    package var seed: UInt64
    /// Probability that an operation throws `CairnError(.io, "injected transient ...")` before
    /// reaching the wrapped store. Retrying the same call draws again and may succeed.
    package var transientErrorRate: [FaultOperation: Double]
    /// Fraction of keys whose every `get` fails with `CairnError(.io, "injected permanent ...")`
    /// (a bad sector, a lost object). The choice is a pure function of `seed` and the key.
    /// Only existing objects fail this way: a missing key still throws `.notFound`.
    package var permanentErrorRate: Double
    /// Keys that always fail on `get`, in addition to those chosen by `permanentErrorRate`.
    package var permanentKeys: Set<ObjectKey>
    /// Probability that a `get` of a non-empty object returns a strict prefix of it (a torn read).
    package var shortReadRate: Double
    /// Probability that a `get` of a non-empty object returns it with one random bit flipped.
    package var bitFlipRate: Double
    /// Probability that a `put` throws ENOSPC (the shape `LocalDirectoryStore` throws: code
    /// `.noSpace`, "pwrite failed: No space left on device"), without storing anything.
    package var noSpaceRate: Double
    /// When set, the disk "fills": once the puts that went through this wrapper (within scope)
    /// total this many bytes, every later put that would exceed it throws ENOSPC.
    package var noSpaceAfterBytes: UInt64?
    /// Sleep before each eligible operation of the given kind, in microseconds.
    package var latencyMicroseconds: [FaultOperation: UInt32]
    /// Namespaces subject to faults; nil means every namespace. `barrier` (which has no
    /// namespace) is disturbed only when this is nil.
    package var namespaces: Set<String>?

    package init(
        seed: UInt64 = 0,
        transientErrorRate: [FaultOperation: Double] = [:],
        permanentErrorRate: Double = 0,
        permanentKeys: Set<ObjectKey> = [],
        shortReadRate: Double = 0,
        bitFlipRate: Double = 0,
        noSpaceRate: Double = 0,
        noSpaceAfterBytes: UInt64? = nil,
        latencyMicroseconds: [FaultOperation: UInt32] = [:],
        namespaces: Set<String>? = nil
    ) {
        self.seed = seed
        self.transientErrorRate = transientErrorRate
        self.permanentErrorRate = permanentErrorRate
        self.permanentKeys = permanentKeys
        self.shortReadRate = shortReadRate
        self.bitFlipRate = bitFlipRate
        self.noSpaceRate = noSpaceRate
        self.noSpaceAfterBytes = noSpaceAfterBytes
        self.latencyMicroseconds = latencyMicroseconds
        self.namespaces = namespaces
    }

    /// Injects nothing.
    package static let none = FaultPlan()

    /// The same transient error rate for each of `operations`.
    package static func uniform(_ rate: Double, _ operations: [FaultOperation] = FaultOperation.allCases) -> [FaultOperation: Double] {
        Dictionary(uniqueKeysWithValues: operations.map { ($0, rate) })
    }
}

/// How many faults a `FaultInjectingStore` injected, by kind.
package struct FaultCounts: Sendable, Equatable, CustomStringConvertible {
    /// Operations that were subject to the plan (enabled and in scope), by kind.
    package var operations: [FaultOperation: Int] = [:]
    /// Transient errors thrown, by operation.
    package var transient: [FaultOperation: Int] = [:]
    package var permanent = 0
    package var shortReads = 0
    package var bitFlips = 0
    package var noSpace = 0
    /// Operations that were delayed.
    package var delays = 0

    package init() {}

    package var totalTransient: Int { transient.values.reduce(0, +) }
    /// Every injected fault except delays.
    package var totalFaults: Int { totalTransient + permanent + shortReads + bitFlips + noSpace }

    package var description: String {
        let ops = FaultOperation.allCases.compactMap { op in operations[op].map { "\(op)=\($0)" } }
        let tr = FaultOperation.allCases.compactMap { op in transient[op].map { "\(op)=\($0)" } }
        return "operations[\(ops.joined(separator: " "))] transient[\(tr.joined(separator: " "))] "
            + "permanent=\(permanent) shortReads=\(shortReads) bitFlips=\(bitFlips) noSpace=\(noSpace) delays=\(delays)"
    }
}

/// An `ObjectStore` that wraps another and injects faults according to a `FaultPlan`.
///
/// Every decision is drawn from a `SeededRandom` seeded with the plan's seed, the operation,
/// the key and how many times that operation was already tried on that key. The outcome of a
/// call therefore does not depend on how worker threads interleave: the same seed and the
/// same calls per key give the same faults, and a retry of a failed call draws afresh.
///
/// Faults that make an operation fail (transient, ENOSPC) are thrown *before* the wrapped
/// store is called, so a failed put leaves nothing visible. Read faults (permanent, short
/// reads, bit flips) apply after the wrapped store read the object.
package final class FaultInjectingStore: ObjectStore {
    package let wrapped: any ObjectStore

    private struct State {
        var plan: FaultPlan
        var enabled = true
        var counts = FaultCounts()
        var attempts: [AttemptKey: UInt64] = [:]
        var bytesPut: UInt64 = 0
        var permanentlyFailed: Set<ObjectKey> = []
    }

    private struct AttemptKey: Hashable {
        var operation: FaultOperation
        var namespace: String
        var name: String
    }

    private let state: Mutex<State>

    package init(wrapping store: any ObjectStore, plan: FaultPlan = .none, enabled: Bool = true) {
        wrapped = store
        state = Mutex(State(plan: plan, enabled: enabled))
    }

    // MARK: Control

    /// The plan in force; may be changed at any time.
    package var plan: FaultPlan {
        get { state.withLock { $0.plan } }
        set { state.withLock { $0.plan = newValue } }
    }

    /// When false, every call goes straight to the wrapped store (no faults, no latency).
    package var enabled: Bool {
        get { state.withLock { $0.enabled } }
        set { state.withLock { $0.enabled = newValue } }
    }

    /// Faults injected so far.
    package var counts: FaultCounts { state.withLock { $0.counts } }

    /// Keys on which a permanent fault was thrown so far.
    package var permanentlyFailedKeys: Set<ObjectKey> { state.withLock { $0.permanentlyFailed } }

    /// Makes every later `get` of `key` fail permanently.
    package func failPermanently(_ key: ObjectKey) {
        state.withLock { _ = $0.plan.permanentKeys.insert(key) }
    }

    /// Whether `get` of `key` fails permanently under the current plan (if the object exists
    /// and faults are enabled and in scope).
    package func isPermanentlyFailing(_ key: ObjectKey) -> Bool {
        let plan = self.plan
        return FaultInjectingStore.isPermanent(key, plan)
    }

    /// Zeroes the counters and the per-key attempt numbers (the sequence of faults restarts).
    package func reset() {
        state.withLock {
            $0.counts = FaultCounts()
            $0.attempts = [:]
            $0.bytesPut = 0
            $0.permanentlyFailed = []
        }
    }

    // MARK: Decisions

    /// What one call was dealt; drawn under the lock, acted upon outside it.
    private struct Draw {
        var rng: SeededRandom
        var plan: FaultPlan
        var latency: UInt32 = 0
    }

    /// Registers a call and returns its random source, or nil when faults are off for it.
    private func begin(_ op: FaultOperation, namespace: String?, name: String) -> Draw? {
        let draw: Draw? = state.withLock { s in
            guard s.enabled else { return nil }
            if let scope = s.plan.namespaces {
                guard let namespace, scope.contains(namespace) else { return nil }
            }
            let ak = AttemptKey(operation: op, namespace: namespace ?? "", name: name)
            let attempt = s.attempts[ak, default: 0]
            s.attempts[ak] = attempt + 1
            s.counts.operations[op, default: 0] += 1
            let seed = FaultInjectingStore.mix(s.plan.seed, op.rawValue, namespace ?? "", name, attempt)
            var d = Draw(rng: SeededRandom(seed: seed), plan: s.plan)
            d.latency = s.plan.latencyMicroseconds[op] ?? 0
            if d.latency > 0 { s.counts.delays += 1 }
            return d
        }
        if let draw, draw.latency > 0 { usleep(useconds_t(draw.latency)) }
        return draw
    }

    private func count(_ update: (inout FaultCounts) -> Void) {
        state.withLock { update(&$0.counts) }
    }

    /// Throws a transient error with the plan's probability for `op`.
    private func maybeTransient(_ draw: inout Draw, _ op: FaultOperation, _ what: String, path: String?) throws {
        let rate = draw.plan.transientErrorRate[op] ?? 0
        guard FaultInjectingStore.roll(&draw.rng, rate) else { return }
        count { $0.transient[op, default: 0] += 1 }
        throw CairnError(.io, "\(op) failed: injected transient fault on \(what)", path: path,
                         hint: "a retry may succeed")
    }

    /// A uniform draw in [0, 1) that is below `rate`. Always consumes one value, so the
    /// sequence of later draws does not depend on the rates.
    private static func roll(_ rng: inout SeededRandom, _ rate: Double) -> Bool {
        let u = Double(rng.next() >> 11) * 0x1.0p-53
        return u < rate
    }

    private static func isPermanent(_ key: ObjectKey, _ plan: FaultPlan) -> Bool {
        if plan.permanentKeys.contains(key) { return true }
        guard plan.permanentErrorRate > 0 else { return false }
        var rng = SeededRandom(seed: mix(plan.seed, "permanent", key.namespace, key.name, 0))
        return roll(&rng, plan.permanentErrorRate)
    }

    /// FNV-1a over the parts, finished by one SplitMix64 step (stable across processes,
    /// unlike `Hasher`).
    private static func mix(_ seed: UInt64, _ a: String, _ b: String, _ c: String, _ n: UInt64) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325 ^ seed
        func feed(_ byte: UInt8) { h = (h ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        for s in [a, b, c] {
            for byte in s.utf8 { feed(byte) }
            feed(0xFF)
        }
        for i in 0..<8 { feed(UInt8(truncatingIfNeeded: n >> (8 * UInt64(i)))) }
        var r = SeededRandom(seed: h)
        return r.next()
    }

    // MARK: Read faults

    /// Applies permanent, short-read and bit-flip faults to an object of `length` bytes just
    /// read into `bytes`; returns the length to report.
    private func readFaults(_ draw: inout Draw, _ key: ObjectKey, _ bytes: UnsafeMutableRawBufferPointer, _ length: Int) throws -> Int {
        // Draw everything first so the sequence is the same whatever the outcome.
        let short = FaultInjectingStore.roll(&draw.rng, draw.plan.shortReadRate)
        let shortValue = draw.rng.next()
        let flip = FaultInjectingStore.roll(&draw.rng, draw.plan.bitFlipRate)
        let flipValue = draw.rng.next()

        if FaultInjectingStore.isPermanent(key, draw.plan) {
            state.withLock {
                $0.counts.permanent += 1
                $0.permanentlyFailed.insert(key)
            }
            throw CairnError(.io, "get failed: injected permanent fault on \(key)", path: wrapped.path(for: key))
        }
        var n = length
        if short && n > 0 {
            n = Int(shortValue % UInt64(n))
            count { $0.shortReads += 1 }
        }
        if flip && n > 0 {
            let bit = Int(flipValue % UInt64(n * 8))
            bytes[bit / 8] ^= UInt8(1) << UInt8(bit % 8)
            count { $0.bitFlips += 1 }
        }
        return n
    }

    // MARK: ObjectStore

    package var location: String { wrapped.location }

    package func path(for key: ObjectKey) -> String { wrapped.path(for: key) }

    package func setTemporaryOwner(_ owner: String) { wrapped.setTemporaryOwner(owner) }

    package func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int {
        try wrapped.removeStaleTemporaries(liveOwners: liveOwners)
    }

    package func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws {
        guard var draw = begin(.put, namespace: key.namespace, name: key.name) else {
            return try wrapped.put(key, bytes)
        }
        try maybeTransient(&draw, .put, "\(key)", path: wrapped.path(for: key))
        var full = FaultInjectingStore.roll(&draw.rng, draw.plan.noSpaceRate)
        if !full, let limit = draw.plan.noSpaceAfterBytes {
            // Reserve the space under the lock so concurrent puts cannot overshoot the limit.
            full = state.withLock { s in
                if s.bytesPut + UInt64(bytes.count) > limit { return true }
                s.bytesPut += UInt64(bytes.count)
                return false
            }
        }
        if full {
            count { $0.noSpace += 1 }
            // The shape LocalDirectoryStore throws when its temporary file's pwrite hits ENOSPC.
            throw CairnError.errno("pwrite", ENOSPC, path: wrapped.path(for: key), offset: 0)
        }
        try wrapped.put(key, bytes)
    }

    package func get(_ key: ObjectKey) throws -> [UInt8] {
        guard var draw = begin(.get, namespace: key.namespace, name: key.name) else {
            return try wrapped.get(key)
        }
        try maybeTransient(&draw, .get, "\(key)", path: wrapped.path(for: key))
        var bytes = try wrapped.get(key)
        let n = try bytes.withUnsafeMutableBytes { try readFaults(&draw, key, $0, $0.count) }
        if n < bytes.count { bytes.removeSubrange(n...) }
        return bytes
    }

    package func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int {
        guard var draw = begin(.get, namespace: key.namespace, name: key.name) else {
            return try wrapped.get(key, into: &buffer)
        }
        try maybeTransient(&draw, .get, "\(key)", path: wrapped.path(for: key))
        let length = try wrapped.get(key, into: &buffer)
        return try readFaults(&draw, key, buffer, length)
    }

    package func exists(_ key: ObjectKey) throws -> Bool {
        if var draw = begin(.exists, namespace: key.namespace, name: key.name) {
            try maybeTransient(&draw, .exists, "\(key)", path: wrapped.path(for: key))
        }
        return try wrapped.exists(key)
    }

    package func size(_ key: ObjectKey) throws -> UInt64? {
        if var draw = begin(.size, namespace: key.namespace, name: key.name) {
            try maybeTransient(&draw, .size, "\(key)", path: wrapped.path(for: key))
        }
        return try wrapped.size(key)
    }

    package func list(_ namespace: String) throws -> [String] {
        if var draw = begin(.list, namespace: namespace, name: "") {
            try maybeTransient(&draw, .list, "namespace \(namespace)", path: "\(wrapped.location)/\(namespace)")
        }
        return try wrapped.list(namespace)
    }

    package func delete(_ key: ObjectKey) throws {
        if var draw = begin(.delete, namespace: key.namespace, name: key.name) {
            try maybeTransient(&draw, .delete, "\(key)", path: wrapped.path(for: key))
        }
        try wrapped.delete(key)
    }

    package func barrier() throws {
        if var draw = begin(.barrier, namespace: nil, name: "") {
            try maybeTransient(&draw, .barrier, "barrier", path: wrapped.location)
        }
        try wrapped.barrier()
    }
}
