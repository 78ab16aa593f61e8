import CairnCore
import CairnTestSupport
import Dispatch
import Foundation
import Storage
import Testing

/// The stores every conformance test runs against.
enum StoreKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case localDirectory
    case memory
    /// A `FaultInjectingStore` with the all-zero plan around a `LocalDirectoryStore`.
    case faultFreeWrapper

    var description: String { rawValue }

    /// A fresh, empty store. Keep `fixture` alive for as long as the store is used: it owns
    /// the temporary directory.
    func make() throws -> StoreFixture {
        switch self {
        case .localDirectory:
            let dir = try TempDir("cairn-conformance")
            let local = LocalDirectoryStore(root: dir.path)
            return StoreFixture(store: local, local: local, dir: dir)
        case .memory:
            return StoreFixture(store: MemoryObjectStore(), local: nil, dir: nil)
        case .faultFreeWrapper:
            let dir = try TempDir("cairn-conformance")
            let local = LocalDirectoryStore(root: dir.path)
            return StoreFixture(store: FaultInjectingStore(wrapping: local, plan: FaultPlan()), local: local, dir: dir)
        }
    }
}

struct StoreFixture {
    let store: any ObjectStore
    /// The `LocalDirectoryStore` underneath, when there is one.
    let local: LocalDirectoryStore?
    let dir: TempDir?

    /// Temporary files left in `tmp/` (always empty for stores without a directory).
    func temporaries() throws -> [String] {
        guard let local else { return [] }
        return try local.listDirectory("\(local.root)/tmp")
    }
}

/// 64 lowercase hex digits, deterministic from `rng`.
func hexName(_ rng: inout SeededRandom) -> String {
    rng.bytes(32).map { String($0, radix: 16).leftPadded(to: 2) }.joined()
}

extension String {
    func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

@Suite struct StoreConformanceTests {
    @Test(arguments: StoreKind.allCases, [0, 1, 5 << 20])
    func putGetRoundTrip(kind: StoreKind, size: Int) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: UInt64(size) &+ 17)
        let bytes = rng.bytes(size)
        let key = ObjectKey("chunks", hexName(&rng))
        try f.store.put(key, bytes)
        #expect(try f.store.get(key) == bytes)
        // The buffer form, into an empty buffer and into one larger than needed.
        var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
        defer { buf.deallocate() }
        let n = try f.store.get(key, into: &buf)
        #expect(n == size)
        #expect(Array(UnsafeRawBufferPointer(rebasing: buf[0..<n])) == bytes)
        var big = UnsafeMutableRawBufferPointer.allocate(byteCount: size + 100, alignment: 16)
        defer { big.deallocate() }
        let before = big.baseAddress
        #expect(try f.store.get(key, into: &big) == size)
        #expect(big.baseAddress == before, "a large enough buffer is reused")
        #expect(Array(UnsafeRawBufferPointer(rebasing: big[0..<size])) == bytes)
        #expect(try f.store.size(key) == UInt64(size))
        #expect(try f.temporaries().isEmpty)
    }

    @Test(arguments: StoreKind.allCases)
    func getIntoTooSmallBufferReallocates(kind: StoreKind) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: 2)
        let bytes = rng.bytes(10_000)
        let key = ObjectKey("indexes", hexName(&rng))
        try f.store.put(key, bytes)
        var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
        defer { buf.deallocate() }
        let n = try f.store.get(key, into: &buf)
        #expect(n == bytes.count)
        #expect(buf.count >= bytes.count)
        #expect(Array(UnsafeRawBufferPointer(rebasing: buf[0..<n])) == bytes)
    }

    @Test(arguments: StoreKind.allCases)
    func missingObjectIsNotFound(kind: StoreKind) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: 3)
        for key in [ObjectKey("chunks", hexName(&rng)), ObjectKey("snapshots", "nope"), ObjectKey("never-used", "x")] {
            let e1 = #expect(throws: CairnError.self) { try f.store.get(key) }
            #expect(e1?.code == .notFound)
            #expect(e1?.description.contains(key.name) == true, "the error names the object: \(String(describing: e1))")
            var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
            defer { buf.deallocate() }
            let e2 = #expect(throws: CairnError.self) { _ = try f.store.get(key, into: &buf) }
            #expect(e2?.code == .notFound)
            #expect(try !f.store.exists(key))
            #expect(try f.store.size(key) == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func existsAndSize(kind: StoreKind) throws {
        let f = try kind.make()
        let key = ObjectKey("snapshots", "s1")
        #expect(try !f.store.exists(key))
        #expect(try f.store.size(key) == nil)
        try f.store.put(key, Array("twelve bytes".utf8))
        #expect(try f.store.exists(key))
        #expect(try f.store.size(key) == 12)
        let empty = ObjectKey("keys", "empty")
        try f.store.put(empty, [])
        #expect(try f.store.exists(empty))
        #expect(try f.store.size(empty) == 0)
        #expect(try f.store.get(empty) == [])
    }

    @Test(arguments: StoreKind.allCases)
    func listShowsExactlyTheNamesPutPerNamespace(kind: StoreKind) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: 4)
        var expected: [String: Set<String>] = [:]
        for ns in ["chunks", "indexes"] {
            for _ in 0..<40 {
                let name = hexName(&rng)
                try f.store.put(ObjectKey(ns, name), rng.bytes(Int(rng.next() % 100)))
                expected[ns, default: []].insert(name)
            }
        }
        // Same names in two namespaces must not leak into each other.
        let shared = hexName(&rng)
        try f.store.put(ObjectKey("chunks", shared), [1])
        expected["chunks", default: []].insert(shared)
        for name in ["s1", "s2", shared] {
            try f.store.put(ObjectKey("snapshots", name), Array(name.utf8))
            expected["snapshots", default: []].insert(name)
        }
        try f.store.put(ObjectKey("keys", "default"), [9])
        expected["keys"] = ["default"]
        try f.store.barrier()

        for (ns, names) in expected {
            let listed = try f.store.list(ns)
            #expect(listed.count == names.count, "no duplicates in \(ns)")
            #expect(Set(listed) == names, "namespace \(ns)")
        }
        #expect(try f.store.list("locks").isEmpty)
        #expect(try f.store.list("nothing-here").isEmpty)
        #expect(try f.temporaries().isEmpty)
    }

    @Test(arguments: StoreKind.allCases)
    func deleteThenGetIsNotFound(kind: StoreKind) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: 5)
        let chunk = ObjectKey("chunks", hexName(&rng))
        let snap = ObjectKey("snapshots", "s1")
        try f.store.put(chunk, [1, 2, 3])
        try f.store.put(snap, [4, 5])
        try f.store.delete(chunk)
        try f.store.barrier()
        let e = #expect(throws: CairnError.self) { try f.store.get(chunk) }
        #expect(e?.code == .notFound)
        #expect(try !f.store.exists(chunk))
        #expect(try f.store.size(chunk) == nil)
        #expect(try f.store.list("chunks").isEmpty)
        // Other objects are untouched.
        #expect(try f.store.get(snap) == [4, 5])
        // Deleting a missing object is not an error (as LocalDirectoryStore does).
        try f.store.delete(chunk)
        try f.store.delete(ObjectKey("never-used", "x"))
        // A deleted key can be put again.
        try f.store.put(chunk, [7])
        #expect(try f.store.get(chunk) == [7])
    }

    @Test(arguments: StoreKind.allCases)
    func rePutOfIdenticalBytesIsFine(kind: StoreKind) throws {
        let f = try kind.make()
        var rng = SeededRandom(seed: 6)
        let key = ObjectKey("chunks", hexName(&rng))
        let bytes = rng.bytes(4096)
        try f.store.put(key, bytes)
        try f.store.put(key, bytes)
        try f.store.barrier()
        #expect(try f.store.get(key) == bytes)
        #expect(try f.store.list("chunks") == [key.name])
        #expect(try f.temporaries().isEmpty)
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentPutsAndGetsRoundTrip(kind: StoreKind) throws {
        let f = try kind.make()
        let store = f.store
        let objects = 500, threads = 8
        @Sendable func key(_ i: Int) -> ObjectKey {
            var rng = SeededRandom(seed: UInt64(i))
            return ObjectKey(i % 5 == 0 ? "indexes" : "chunks", hexName(&rng))
        }
        @Sendable func bytes(_ i: Int) -> [UInt8] {
            var rng = SeededRandom(seed: UInt64(i) &* 7919)
            return rng.bytes(Int(rng.next() % 20_000))
        }
        let failures = Failures()
        // Each thread puts its share then reads back every object put so far by anyone.
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            do {
                for i in stride(from: t, to: objects, by: threads) {
                    try store.put(key(i), bytes(i))
                    if try store.get(key(i)) != bytes(i) { failures.add("read-after-write \(i)") }
                }
                var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
                defer { buf.deallocate() }
                for i in stride(from: (t + 1) % threads, to: objects, by: threads) {
                    // Another thread's object: present (already put) or missing, never partial.
                    do {
                        let n = try store.get(key(i), into: &buf)
                        if Array(UnsafeRawBufferPointer(rebasing: buf[0..<n])) != bytes(i) { failures.add("torn \(i)") }
                    } catch let e as CairnError where e.code == .notFound {}
                }
            } catch {
                failures.add("thread \(t): \(error)")
            }
        }
        #expect(failures.all.isEmpty, "\(failures.all.prefix(5))")
        try store.barrier()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in stride(from: t, to: objects, by: threads) {
                do {
                    if try store.get(key(i)) != bytes(i) { failures.add("final \(i)") }
                } catch { failures.add("final \(i): \(error)") }
            }
        }
        #expect(failures.all.isEmpty, "\(failures.all.prefix(5))")
        let listed = try Set(store.list("chunks")).union(store.list("indexes"))
        #expect(listed == Set((0..<objects).map { key($0).name }))
        #expect(try f.temporaries().isEmpty)
    }

    @Test(arguments: [StoreKind.localDirectory, .faultFreeWrapper])
    func noTemporaryRemainsAfterSuccessfulPuts(kind: StoreKind) throws {
        let f = try kind.make()
        f.store.setTemporaryOwner("owner01")
        var rng = SeededRandom(seed: 8)
        for ns in ["chunks", "indexes", "snapshots", "keys", "locks"] {
            for _ in 0..<5 { try f.store.put(ObjectKey(ns, hexName(&rng)), rng.bytes(1000)) }
        }
        try f.store.barrier()
        let local = try #require(f.local)
        #expect(try local.listDirectory("\(local.root)/tmp").isEmpty)
        // Lock temporaries live beside the locks as dot files; none may remain either.
        let lockDir = try FileManager.default.contentsOfDirectory(atPath: "\(local.root)/locks")
        #expect(lockDir.allSatisfy { !$0.hasPrefix(".") }, "\(lockDir)")
        // The wrapper forwards path(for:) and the temporary-owner calls.
        let key = ObjectKey("chunks", hexName(&rng))
        #expect(f.store.path(for: key) == local.path(for: key))
        #expect(f.store.location == local.location)
        try FileManager.default.createDirectory(atPath: "\(local.root)/tmp", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: "\(local.root)/tmp/dead0001.1", contents: Data([1]))
        #expect(try f.store.removeStaleTemporaries { ["owner01"] } == 1)
    }
}

/// Failure messages collected from worker threads.
final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var messages: [String] = []
    func add(_ m: String) { lock.withLock { messages.append(m) } }
    var all: [String] { lock.withLock { messages } }
}
