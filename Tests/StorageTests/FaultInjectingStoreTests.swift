import CairnCore
import CairnTestSupport
import Dispatch
import Foundation
import Storage
import Testing

@Suite struct FaultInjectingStoreTests {
    /// `count` objects of 1...300 bytes in `namespace`, put into `store` directly.
    static func fill(_ store: any ObjectStore, _ count: Int, namespace: String = "chunks", seed: UInt64 = 1) throws -> [(ObjectKey, [UInt8])] {
        var rng = SeededRandom(seed: seed)
        var out: [(ObjectKey, [UInt8])] = []
        for _ in 0..<count {
            let key = ObjectKey(namespace, hexName(&rng))
            let bytes = rng.bytes(1 + Int(rng.next() % 300))
            try store.put(key, bytes)
            out.append((key, bytes))
        }
        return out
    }

    @Test func transientErrorsHappenAtTheConfiguredRateAndRetriesSucceed() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 200)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 42, transientErrorRate: [.get: 0.1]))
        var thrown = 0
        for round in 0..<10 {
            for (key, bytes) in objects {
                do {
                    #expect(try store.get(key) == bytes)
                } catch let e as CairnError {
                    thrown += 1
                    #expect(e.code == .io)
                    #expect(e.message.contains("injected transient"))
                    #expect(e.description.contains(key.name), "the error names the key")
                    // Retrying the same call eventually succeeds.
                    var ok = false
                    for _ in 0..<50 where !ok { ok = (try? store.get(key)) == bytes }
                    #expect(ok, "retry of \(key) in round \(round)")
                }
            }
        }
        let c = store.counts
        // 2000 first attempts at 10%: expect ~200.
        #expect((130...270).contains(thrown), "thrown \(thrown)")
        #expect(c.transient[.get, default: 0] >= thrown)
        #expect(c.transient[.put] == nil && c.permanent == 0 && c.shortReads == 0 && c.bitFlips == 0)
        #expect(c.operations[.get, default: 0] == 2000 + c.transient[.get, default: 0],
                "every retry is an operation too")
    }

    @Test func transientErrorsOnEveryOperationKind() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 50)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 1, transientErrorRate: FaultPlan.uniform(1)))
        let (key, bytes) = objects[0]
        let calls: [(FaultOperation, () throws -> Void)] = [
            (.get, { _ = try store.get(key) }),
            (.put, { try store.put(ObjectKey("chunks", "new"), bytes) }),
            (.exists, { _ = try store.exists(key) }),
            (.size, { _ = try store.size(key) }),
            (.list, { _ = try store.list("chunks") }),
            (.delete, { try store.delete(key) }),
            (.barrier, { try store.barrier() }),
        ]
        for (op, call) in calls {
            let e = #expect(throws: CairnError.self, "\(op)") { try call() }
            #expect(e?.code == .io)
            #expect(e?.message.contains("injected transient") == true)
            #expect(store.counts.transient[op] == 1, "\(op)")
        }
        // Nothing reached the wrapped store.
        #expect(try !memory.exists(ObjectKey("chunks", "new")))
        #expect(try memory.get(key) == bytes)
    }

    /// Runs a fixed mix of 2000 operations and records each outcome.
    static func script(seed: UInt64) throws -> (outcomes: [String], counts: FaultCounts) {
        let memory = MemoryObjectStore()
        let objects = try fill(memory, 100)
        let plan = FaultPlan(seed: seed, transientErrorRate: [.get: 0.05, .put: 0.05, .exists: 0.05],
                             permanentErrorRate: 0.03, shortReadRate: 0.05, bitFlipRate: 0.05, noSpaceRate: 0.05)
        let store = FaultInjectingStore(wrapping: memory, plan: plan)
        var rng = SeededRandom(seed: 99)
        var outcomes: [String] = []
        for i in 0..<2000 {
            let (key, bytes) = objects[Int(rng.next() % UInt64(objects.count))]
            do {
                switch i % 4 {
                case 0, 1:
                    let got = try store.get(key)
                    outcomes.append(got == bytes ? "ok" : "bad \(got.count) \(got.reduce(0) { $0 &* 31 &+ Int($1) })")
                case 2:
                    try store.put(ObjectKey("snapshots", "s\(i)"), bytes)
                    outcomes.append("put")
                default:
                    outcomes.append("exists \(try store.exists(key))")
                }
            } catch let e as CairnError {
                outcomes.append("error \(e.code) \(e.message)")
            }
        }
        return (outcomes, store.counts)
    }

    @Test func theSameSeedGivesTheSameSequence() throws {
        let a = try Self.script(seed: 7)
        let b = try Self.script(seed: 7)
        let c = try Self.script(seed: 8)
        // Compare by first difference: a failure then names one operation, not 2000.
        func firstDifference(_ x: [String], _ y: [String]) -> Int? {
            x.count != y.count ? min(x.count, y.count) : zip(x, y).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        }
        let diff = firstDifference(a.outcomes, b.outcomes)
        #expect(diff == nil, "operation \(diff ?? 0): \(diff.map { a.outcomes[$0] } ?? "") vs \(diff.map { b.outcomes[$0] } ?? "")")
        #expect(a.outcomes.count == 2000)
        #expect(a.counts == b.counts)
        #expect(firstDifference(a.outcomes, c.outcomes) != nil, "another seed gives other faults")
        // The script really injected faults of every kind.
        #expect(a.counts.totalTransient > 0 && a.counts.permanent > 0 && a.counts.shortReads > 0
                && a.counts.bitFlips > 0 && a.counts.noSpace > 0, "\(a.counts)")
    }

    @Test func faultsDoNotDependOnThreadInterleaving() throws {
        // Each key is handled by one thread, so the per-key outcomes are the same however the
        // threads interleave.
        func run() throws -> [String: String] {
            let memory = MemoryObjectStore()
            let objects = try Self.fill(memory, 400)
            let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 5, transientErrorRate: [.get: 0.2], bitFlipRate: 0.1))
            let results = Results()
            DispatchQueue.concurrentPerform(iterations: 8) { t in
                for i in stride(from: t, to: objects.count, by: 8) {
                    let (key, bytes) = objects[i]
                    var log = ""
                    for _ in 0..<3 {
                        if let got = try? store.get(key) { log += got == bytes ? "o" : "f" } else { log += "e" }
                    }
                    results.set(key.name, log)
                }
            }
            return results.all
        }
        let first = try run()
        #expect(first.count == 400)
        #expect(try run() == first)
    }

    @Test func shortReadsReturnAStrictPrefix() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 200)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 3, shortReadRate: 0.05))
        var short = 0
        var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
        defer { buf.deallocate() }
        for i in 0..<2000 {
            let (key, bytes) = objects[i % objects.count]
            // Alternate the two forms of get.
            let got: [UInt8]
            if i % 2 == 0 {
                got = try store.get(key)
            } else {
                let n = try store.get(key, into: &buf)
                got = Array(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            }
            if got != bytes {
                short += 1
                #expect(got.count < bytes.count)
                #expect(Array(bytes.prefix(got.count)) == got, "a torn read is a prefix")
            }
        }
        #expect((50...160).contains(short), "short \(short)")
        #expect(store.counts.shortReads == short)
        #expect(store.counts.totalFaults == short)
    }

    @Test func bitFlipsChangeExactlyOneBit() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 200)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 4, bitFlipRate: 0.05))
        var flipped = 0
        var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
        defer { buf.deallocate() }
        for i in 0..<2000 {
            let (key, bytes) = objects[i % objects.count]
            let got: [UInt8]
            if i % 2 == 0 {
                got = try store.get(key)
            } else {
                let n = try store.get(key, into: &buf)
                got = Array(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            }
            #expect(got.count == bytes.count)
            let differing = zip(got, bytes).reduce(0) { $0 + ($1.0 ^ $1.1).nonzeroBitCount }
            if differing > 0 { flipped += 1 }
            #expect(differing <= 1)
        }
        #expect((50...160).contains(flipped), "flipped \(flipped)")
        #expect(store.counts.bitFlips == flipped)
        // The wrapped store's bytes are never modified.
        for (key, bytes) in objects { #expect(try memory.get(key) == bytes) }
    }

    @Test func permanentFaultsStickToTheirKeys() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 400)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 11, permanentErrorRate: 0.1))
        var failing = Set<ObjectKey>()
        for round in 0..<5 {
            for (key, bytes) in objects {
                do {
                    #expect(try store.get(key) == bytes)
                    #expect(!failing.contains(key), "a permanent fault never heals")
                    #expect(!store.isPermanentlyFailing(key))
                } catch let e as CairnError {
                    #expect(e.code == .io)
                    #expect(e.message.contains("injected permanent"))
                    #expect(e.description.contains(key.name))
                    #expect(store.isPermanentlyFailing(key))
                    if round > 0 { #expect(failing.contains(key), "failed from the first read on") }
                    failing.insert(key)
                }
            }
        }
        #expect((15...70).contains(failing.count), "failing keys \(failing.count)")
        #expect(store.permanentlyFailedKeys == failing)
        #expect(store.counts.permanent == failing.count * 5)
        // Other operations on those keys still work; a missing key is still notFound.
        let someKey = try #require(failing.first)
        #expect(try store.exists(someKey))
        var missing: ObjectKey
        var rng = SeededRandom(seed: 1234)
        repeat { missing = ObjectKey("chunks", hexName(&rng)) } while !store.isPermanentlyFailing(missing)
        let e = #expect(throws: CairnError.self) { try store.get(missing) }
        #expect(e?.code == .notFound)

        // An explicitly chosen key fails too, from then on.
        let (chosen, _) = try #require(objects.first { !failing.contains($0.0) })
        store.failPermanently(chosen)
        for _ in 0..<3 {
            let e = #expect(throws: CairnError.self) { try store.get(chosen) }
            #expect(e?.message.contains("injected permanent") == true)
        }
        // The same seed chooses the same keys.
        let again = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 11, permanentErrorRate: 0.1))
        #expect(Set(objects.map(\.0).filter { again.isPermanentlyFailing($0) }) == failing)
    }

    @Test func noSpacePutsLeaveNothingVisible() throws {
        let dir = try TempDir("cairn-faults")
        let local = LocalDirectoryStore(root: dir.path, durable: false)
        let store = FaultInjectingStore(wrapping: local, plan: FaultPlan(seed: 9, noSpaceRate: 0.1))
        var rng = SeededRandom(seed: 10)
        var stored = Set<String>(), refused = Set<String>()
        for _ in 0..<2000 {
            let name = hexName(&rng)
            do {
                try store.put(ObjectKey("chunks", name), rng.bytes(64))
                stored.insert(name)
            } catch let e as CairnError {
                #expect(e.code == .noSpace, "the code LocalDirectoryStore uses for ENOSPC")
                #expect(e.message.contains("No space left on device"))
                #expect(e.description.contains(name))
                refused.insert(name)
            }
        }
        try store.barrier()
        #expect((130...270).contains(refused.count), "refused \(refused.count)")
        #expect(store.counts.noSpace == refused.count)
        #expect(Set(try local.list("chunks")) == stored)
        for name in refused.prefix(50) {
            #expect(try !local.exists(ObjectKey("chunks", name)))
            #expect(try !store.exists(ObjectKey("chunks", name)))
        }
        #expect(try local.listDirectory("\(dir.path)/tmp").isEmpty)
    }

    @Test func theDiskFillsAfterALimit() throws {
        let memory = MemoryObjectStore()
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(noSpaceAfterBytes: 10_000))
        var stored = 0
        var refusedAt: Int?
        for i in 0..<50 {
            do {
                try store.put(ObjectKey("chunks", "c\(i)"), [UInt8](repeating: 1, count: 1000))
                stored += 1
                #expect(refusedAt == nil, "a full disk stays full")
            } catch let e as CairnError {
                #expect(e.code == .noSpace)
                refusedAt = refusedAt ?? i
            }
        }
        #expect(stored == 10)
        #expect(memory.objectCount == 10)
        #expect(store.counts.noSpace == 40)
        // Raising the limit frees space.
        store.plan.noSpaceAfterBytes = nil
        try store.put(ObjectKey("chunks", "late"), [1])
    }

    @Test func latencyDelaysEachOperation() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 10)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(latencyMicroseconds: [.get: 2000]))
        let start = ContinuousClock.now
        for i in 0..<20 { _ = try store.get(objects[i % 10].0) }
        _ = try store.exists(objects[0].0)
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .milliseconds(40), "\(elapsed)")
        #expect(store.counts.delays == 20)
        #expect(store.counts.totalFaults == 0)
    }

    @Test func faultsCanBeRestrictedToNamespaces() throws {
        let memory = MemoryObjectStore()
        let chunks = try Self.fill(memory, 20, namespace: "chunks")
        let snaps = try Self.fill(memory, 20, namespace: "snapshots", seed: 2)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(transientErrorRate: FaultPlan.uniform(1), namespaces: ["chunks"]))
        for (key, bytes) in snaps {
            #expect(try store.get(key) == bytes)
            #expect(try store.exists(key))
        }
        #expect(try store.list("snapshots").count == 20)
        try store.put(ObjectKey("snapshots", "new"), [1])
        try store.barrier() // barrier has no namespace: only disturbed by unrestricted plans
        for (key, _) in chunks {
            #expect(throws: CairnError.self) { _ = try store.get(key) }
        }
        #expect(throws: CairnError.self) { _ = try store.list("chunks") }
        #expect(store.counts.transient[.get] == 20)
        #expect(store.counts.operations[.get] == 20, "only in-scope operations are counted")
    }

    @Test func disablingStopsFaults() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 100)
        let plan = FaultPlan(seed: 1, transientErrorRate: [.get: 0.5], shortReadRate: 0.5, bitFlipRate: 0.5,
                             noSpaceRate: 0.5, latencyMicroseconds: [.get: 1])
        let store = FaultInjectingStore(wrapping: memory, plan: plan, enabled: false)
        for (key, bytes) in objects { #expect(try store.get(key) == bytes) }
        try store.put(ObjectKey("chunks", "x"), [1])
        #expect(store.counts == FaultCounts())

        store.enabled = true
        var failures = 0
        for (key, bytes) in objects where (try? store.get(key)) != bytes { failures += 1 }
        #expect(failures > 50)
        let during = store.counts
        #expect(during.totalFaults > 50)

        store.enabled = false
        #expect(!store.enabled)
        for (key, bytes) in objects { #expect(try store.get(key) == bytes) }
        for i in 0..<100 { try store.put(ObjectKey("chunks", "y\(i)"), [1]) }
        #expect(store.counts == during)

        store.reset()
        #expect(store.counts == FaultCounts())
    }

    @Test func countersAreConsistentUnderConcurrency() throws {
        let memory = MemoryObjectStore()
        let objects = try Self.fill(memory, 400)
        let store = FaultInjectingStore(wrapping: memory, plan: FaultPlan(seed: 2, transientErrorRate: [.get: 0.1, .put: 0.1],
                                                                         shortReadRate: 0.05, noSpaceRate: 0.05))
        let errors = Results()
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            var thrown = 0, short = 0
            for i in 0..<500 {
                let (key, bytes) = objects[(t * 500 + i) % objects.count]
                do {
                    if i % 2 == 0 {
                        if try store.get(key).count < bytes.count { short += 1 }
                    } else {
                        try store.put(ObjectKey("snapshots", "t\(t)-\(i)"), bytes)
                    }
                } catch { thrown += 1 }
            }
            errors.set("\(t)", "\(thrown) \(short)")
        }
        let totals = errors.all.values.map { $0.split(separator: " ").map { Int($0)! } }
        let thrown = totals.reduce(0) { $0 + $1[0] }, short = totals.reduce(0) { $0 + $1[1] }
        let c = store.counts
        #expect(c.operations[.get] == 2000 && c.operations[.put] == 2000)
        #expect(c.totalTransient + c.noSpace == thrown)
        #expect(c.shortReads == short)
        #expect((300...500).contains(c.totalTransient), "\(c)")
    }
}

/// Per-key strings collected from worker threads.
final class Results: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [String: String] = [:]
    func set(_ k: String, _ v: String) { lock.withLock { values[k] = v } }
    var all: [String: String] { lock.withLock { values } }
}
