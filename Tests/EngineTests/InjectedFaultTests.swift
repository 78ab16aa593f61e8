import CairnCore
import CairnTestSupport
import Engine
import Foundation
import Repository
import RepositoryFormat
import Storage
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Backups, restores, check and repair on a repository whose storage misbehaves: transient
/// errors (retried by `RetryingStore`), torn reads and flipped bits (read again by
/// `loadChunk`), objects that can never be read, and a disk that fills up.
///
/// Determinism: `FaultInjectingStore` decides every fault from (seed, operation, key, attempt
/// number), never from thread timing. For objects whose names are known before the run (the
/// content-addressed chunks and indexes), `FaultProbe` replays those draws on a memory store
/// and the tests pick a seed under which no call can exhaust its retries, and under which
/// faults certainly happen. Names the tests cannot know in advance (lock files, manifests,
/// whose ids include the time) only ever see the 1 % rate, where four failures in a row have
/// probability 1e-8 per call.
@Suite("Injected storage faults")
struct InjectedFaultTests {
    // MARK: helpers

    /// Opens the repository at `path` through a fault-injecting store (wrapped in a
    /// `RetryingStore` by `Repository.open`, as every store is).
    static func open(_ path: String, _ plan: FaultPlan) throws -> (Repository, FaultInjectingStore) {
        let faults = FaultInjectingStore(wrapping: LocalDirectoryStore(root: path), plan: plan)
        let repo = try Repository.open(path: path, store: faults) { E.password }
        return (repo, faults)
    }

    static func retried(_ repo: Repository) throws -> Int {
        let retrying = try #require(repo.store as? RetryingStore, "Repository.open wraps every store in a RetryingStore")
        return retrying.retriedOperations
    }

    /// Replays the draws of a `FaultInjectingStore` with the same plan: a fresh fault store over
    /// a memory store holding the same objects sees, attempt for attempt, the same faults.
    final class FaultProbe {
        let memory = MemoryObjectStore()
        let store: FaultInjectingStore
        let objects: [ObjectKey: [UInt8]]
        /// Whether some read came back with the envelope's version byte flipped.
        var versionByteFlipped = false

        init(plan: FaultPlan, objects: [ObjectKey: [UInt8]]) throws {
            self.objects = objects
            for (k, v) in objects { try memory.put(k, v) }
            store = FaultInjectingStore(wrapping: memory, plan: plan)
        }

        /// For each of the first `n` attempts of `op` on `key`: how many faults the store injected
        /// into it (0: undisturbed; a read can be both torn and flipped).
        func faults(_ op: FaultOperation, _ key: ObjectKey, attempts n: Int) -> [Int] {
            (0..<n).map { _ in
                let before = store.counts.totalFaults
                do {
                    switch op {
                    case .get:
                        let bytes = try store.get(key)
                        if let o = objects[key], bytes.count > 4, bytes[4] != o[4] { versionByteFlipped = true }
                    case .put: try store.put(key, objects[key] ?? [1])
                    case .list: _ = try store.list(key.namespace)
                    case .barrier: try store.barrier()
                    case .exists: _ = try store.exists(key)
                    case .size: _ = try store.size(key)
                    case .delete: try store.delete(key)
                    }
                } catch {}
                return store.counts.totalFaults - before
            }
        }

        /// The longest run of consecutive disturbed attempts.
        static func longestRun(_ f: [Int]) -> Int {
            var best = 0, run = 0
            for x in f { run = x > 0 ? run + 1 : 0; best = max(best, run) }
            return best
        }
    }

    /// Chunk and index keys of a repository, with their stored bytes.
    static func contentObjects(_ repo: Repository) throws -> [ObjectKey: [UInt8]] {
        var out: [ObjectKey: [UInt8]] = [:]
        for ns in ["chunks", "indexes"] {
            for name in try repo.store.list(ns) { out[ObjectKey(ns, name)] = try readFile(repo.store.path(for: ObjectKey(ns, name))) }
        }
        return out
    }

    /// Three disks: `a1` dense, `b` mixed (holes, zeros, compressible runs), `a2` = `a1` with two
    /// chunks rewritten (its backup deduplicates the other 14).
    static func images(_ dir: TempDir) throws -> (a1: String, b: String, a2: String) {
        let a1 = dir.file("a1.raw"), b = dir.file("b.raw"), a2 = dir.file("a2.raw")
        try E.denseDisk(a1, size: 1 * MiB, seed: 31)
        try E.mixedDisk(b, size: 2 * MiB, seed: 32)
        #expect(copyfile(a1, a2))
        var rng = SeededRandom(seed: 33)
        try writeBytes(rng.bytes(64 * KiB), to: a2, at: 0)
        try writeBytes(rng.bytes(4 * KiB), to: a2, at: UInt64(9 * 64 * KiB + 100))
        return (a1, b, a2)
    }

    /// Copies the initialized (still empty) repository `from` to `to`: the copy has the same
    /// keys, so the same data gets the same chunk and index ids in both.
    static func twin(_ from: String, _ to: String) throws {
        try Tool.run("cp", ["-a", from, to])
    }

    // MARK: transient errors

    struct TransientCase: Sendable, CustomTestStringConvertible {
        var rate: Double
        /// nil: every namespace (and barriers).
        var namespaces: Set<String>?
        var operations: [FaultOperation]
        var testDescription: String {
            "\(Int(rate * 100))% on \(operations.map(\.rawValue).joined(separator: "/")) in \(namespaces.map { $0.sorted().joined(separator: ", ") } ?? "every namespace")"
        }
    }

    static let transientCases: [TransientCase] = [
        // 1 %: everything, including lock files and manifests (names not known in advance;
        // four failures in a row: 1e-8 per call).
        TransientCase(rate: 0.01, namespaces: nil, operations: FaultOperation.allCases),
        // 10 %: only content-named objects, whose every draw the probe checks, so the outcome
        // is fixed by the seed the test picks.
        TransientCase(rate: 0.10, namespaces: ["chunks", "indexes"], operations: [.get, .put, .list, .exists]),
    ]

    @Test("transient errors are retried: backups, byte-exact restores and check --read-data succeed", arguments: transientCases)
    func transientErrorsAreRetried(_ c: TransientCase) throws {
        let dir = try TempDir("faults-transient")
        let (a1, b, a2) = try Self.images(dir)
        _ = try E.makeRepo(dir, encryption: .aes256gcm)
        let path = dir.file("repo"), twinPath = dir.file("twin")
        try Self.twin(path, twinPath)

        // The twin, without faults, tells which chunks and indexes the run will store.
        let twin = try Repository.open(path: twinPath) { E.password }
        for (vm, image) in [("a", a1), ("b", b), ("a", a2)] { try E.backup(twin, vm: vm, [.init("d", image)]) }
        let objects = try Self.contentObjects(twin)
        let chunkKeys = objects.keys.filter { $0.namespace == "chunks" }
        #expect(chunkKeys.count > 30 && objects.count == chunkKeys.count + 3)

        // A seed under which no call on a known name fails 4 times in a row (each chunk and
        // index is put at most once and read at most 3 times, so 24 attempts cover every call;
        // lists and barriers happen a few dozen times), and under which at least one put and
        // one chunk get fail at their first attempt (so faults certainly hit backup and restore).
        func plan(_ seed: UInt64) -> FaultPlan {
            FaultPlan(seed: seed, transientErrorRate: FaultPlan.uniform(c.rate, c.operations), namespaces: c.namespaces)
        }
        var chosen: UInt64?
        for seed in UInt64(1)...2_000 {
            let probe = try FaultProbe(plan: plan(seed), objects: objects)
            var ok = true, putAtFirst = false, getAtFirst = false
            for key in objects.keys where ok {
                let puts = probe.faults(.put, key, attempts: 24), gets = probe.faults(.get, key, attempts: 24)
                ok = FaultProbe.longestRun(puts) < 4 && FaultProbe.longestRun(gets) < 4
                putAtFirst = putAtFirst || puts[0] > 0
                getAtFirst = getAtFirst || (gets[0] > 0 && key.namespace == "chunks")
            }
            for ns in ["chunks", "indexes", "snapshots", "locks", "keys"] where ok {
                ok = FaultProbe.longestRun(probe.faults(.list, ObjectKey(ns, ""), attempts: 200)) < 4
            }
            if ok { ok = FaultProbe.longestRun(probe.faults(.barrier, ObjectKey("", ""), attempts: 400)) < 4 }
            if ok && putAtFirst && getAtFirst { chosen = seed; break }
        }
        let seed = try #require(chosen, "a seed whose faults are all recoverable")

        let (repo, faults) = try Self.open(path, plan(seed))
        let s1 = try E.backup(repo, vm: "a", [.init("d", a1)])
        let s2 = try E.backup(repo, vm: "b", [.init("d", b)])
        let s3 = try E.backup(repo, vm: "a", [.init("d", a2)])
        #expect(try E.disk(s3).bytesNew == UInt64(2 * 64 * KiB), "a2 stores only its 2 changed chunks")
        let afterBackup = faults.counts
        #expect(afterBackup.transient[.put, default: 0] > 0, "puts failed during the backups: \(afterBackup)")

        for (k, (s, image)) in [(s1, a1), (s2, b), (s3, a2)].enumerated() {
            let out = dir.file("out\(k).raw")
            try E.restore(repo, s, to: out)
            #expect(try E.cmpEqual(image, out), "restore \(k) is byte-exact")
        }
        #expect(faults.counts.transient[.get, default: 0] > afterBackup.transient[.get, default: 0], "gets failed during the restores")

        let report = try CheckJob(repository: repo, readData: .all).run()
        #expect(report.ok, "\(report.problems)")
        #expect(report.snapshots == 3 && report.chunksRead == chunkKeys.count && report.chunksRead == report.referencedChunks)

        let counts = faults.counts
        let retried = try Self.retried(repo)
        #expect(counts.totalTransient > 0 && counts.totalFaults == counts.totalTransient, "\(counts)")
        #expect(retried > 0, "RetryingStore retried")
        #expect(retried <= counts.totalTransient, "only failed operations are retried: \(retried) retried, \(counts)")

        // Nothing the retries wrote is wrong: without faults the repository checks clean, and
        // holds exactly what the fault-free twin holds.
        let clean = try CheckJob(repository: try E.reopen(repo), readData: .all).run()
        #expect(clean.ok && clean.unreferencedChunks == 0)
        #expect(Set(try Self.contentObjects(repo).keys) == Set(objects.keys))
    }

    // MARK: torn reads and flipped bits

    struct ReadFaultCase: Sendable, CustomTestStringConvertible {
        var shortReadRate: Double
        var bitFlipRate: Double
        var testDescription: String {
            [shortReadRate > 0 ? "short reads \(Int(shortReadRate * 100))%" : nil, bitFlipRate > 0 ? "bit flips \(Int(bitFlipRate * 100))%" : nil]
                .compactMap { $0 }.joined(separator: " + ")
        }
    }

    static let readFaultCases: [ReadFaultCase] = [
        ReadFaultCase(shortReadRate: 0.01, bitFlipRate: 0), ReadFaultCase(shortReadRate: 0.10, bitFlipRate: 0),
        ReadFaultCase(shortReadRate: 0, bitFlipRate: 0.01), ReadFaultCase(shortReadRate: 0, bitFlipRate: 0.10),
        ReadFaultCase(shortReadRate: 0.10, bitFlipRate: 0.10),
    ]

    /// Torn reads and flipped bits on chunk gets: `loadChunk` reads a chunk that does not
    /// authenticate once more, so a restore or check fails only when both reads of one chunk are
    /// disturbed. At 10 % that happens to about 1 % of chunk reads (3.6 % with both faults on),
    /// so the test picks a seed under which it does not happen for any chunk: the probe predicts
    /// every read of every chunk (restore: attempt 0, and 1 if 0 was bad; check: the next one or
    /// two). It then knows exactly how many faults the run meets and how many gets it makes.
    @Test("torn reads and flipped bits on chunk reads are read again: restore is byte-exact and check is clean", arguments: readFaultCases)
    func readFaultsAreReadAgain(_ c: ReadFaultCase) throws {
        let dir = try TempDir("faults-read")
        let image = dir.file("d.raw")
        try E.denseDisk(image, size: 3 * MiB, seed: 41)
        let setup = try E.makeRepo(dir, encryption: .aes256gcm)
        let snap = try E.backup(setup, vm: "v", [.init("d", image)])
        let chunkObjects = try Self.contentObjects(setup).filter { $0.key.namespace == "chunks" }
        #expect(chunkObjects.count == 48)

        func plan(_ seed: UInt64) -> FaultPlan {
            FaultPlan(seed: seed, shortReadRate: c.shortReadRate, bitFlipRate: c.bitFlipRate, namespaces: ["chunks"])
        }
        var chosen: (seed: UInt64, faults: Int, gets: Int, inRestore: Int, inCheck: Int)?
        for seed in UInt64(1)...5_000 {
            let probe = try FaultProbe(plan: plan(seed), objects: chunkObjects)
            var ok = true, faults = 0, gets = 0, inRestore = 0, inCheck = 0
            for key in chunkObjects.keys where ok {
                let injected = probe.faults(.get, key, attempts: 4)
                let bad = injected.map { $0 > 0 }
                // Restore: attempt 0, re-read at 1 when 0 was disturbed.
                if bad[0] && bad[1] { ok = false; break }
                let r = bad[0] ? 2 : 1
                // Check: attempt r, re-read at r + 1.
                if bad[r] && bad[r + 1] { ok = false; break }
                let k = bad[r] ? 2 : 1
                gets += r + k
                faults += injected[0..<r + k].reduce(0, +)
                inRestore += bad[0] ? 1 : 0
                inCheck += bad[r] ? 1 : 0
            }
            // A flip of the version byte is not read again (see singleFlipIsReadAgainAnywhere,
            // which reproduces that); seeds that would put one there (about 1 flip in 65 000)
            // are skipped, so this test stays about torn and flipped reads in general.
            if probe.versionByteFlipped { ok = false }
            if ok && inRestore > 0 && inCheck > 0 { chosen = (seed, faults, gets, inRestore, inCheck); break }
        }
        let expected = try #require(chosen, "a seed under which no chunk is disturbed on both reads")

        let (repo, faults) = try Self.open(dir.file("repo"), plan(expected.seed))
        let out = dir.file("out.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(image, out), "restore is byte-exact although \(expected.inRestore) chunk read(s) were disturbed")
        let report = try CheckJob(repository: repo, readData: .all).run()
        #expect(report.ok, "check reports no rot for disturbed reads: \(report.problems)")
        #expect(report.chunksRead == 48)

        let counts = faults.counts
        #expect(counts.shortReads + counts.bitFlips == expected.faults, "the probe predicted every fault: \(counts)")
        #expect(c.shortReadRate == 0 || counts.shortReads > 0)
        #expect(c.bitFlipRate == 0 || counts.bitFlips > 0)
        #expect(counts.operations[.get, default: 0] == expected.gets, "each disturbed read was read exactly once more: \(counts)")
        #expect(counts.totalTransient == 0 && counts.permanent == 0)
    }

    /// A store that disturbs exactly one read: the first `get` of `target` returns the object
    /// with byte `offset` XORed with `mask`; every other call goes straight through.
    final class FlipOnceStore: ObjectStore, @unchecked Sendable {
        let base: LocalDirectoryStore
        let target: ObjectKey
        let offset: Int
        let mask: UInt8
        let flipped = Mutex(false)

        init(_ base: LocalDirectoryStore, target: ObjectKey, offset: Int, mask: UInt8) {
            self.base = base; self.target = target; self.offset = offset; self.mask = mask
        }

        private func disturb(_ key: ObjectKey) -> Bool {
            key == target && flipped.withLock { done in defer { done = true }; return !done }
        }

        var location: String { base.location }
        func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws { try base.put(key, bytes) }
        func get(_ key: ObjectKey) throws -> [UInt8] {
            var bytes = try base.get(key)
            if disturb(key) { bytes[offset] ^= mask }
            return bytes
        }
        func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int {
            let n = try base.get(key, into: &buffer)
            if disturb(key) { buffer[offset] ^= mask }
            return n
        }
        func exists(_ key: ObjectKey) throws -> Bool { try base.exists(key) }
        func size(_ key: ObjectKey) throws -> UInt64? { try base.size(key) }
        func list(_ namespace: String) throws -> [String] { try base.list(namespace) }
        func delete(_ key: ObjectKey) throws { try base.delete(key) }
        func barrier() throws { try base.barrier() }
        func path(for key: ObjectKey) -> String { base.path(for: key) }
        func setTemporaryOwner(_ owner: String) { base.setTemporaryOwner(owner) }
        func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int {
            try base.removeStaleTemporaries(liveOwners: liveOwners)
        }
    }

    /// loadChunk promises that "a torn or flipped read on the way is not rot": one disturbed
    /// read is read again. That must hold wherever the flipped bit lands in the object.
    @Test("one bit flipped in transit is read again wherever it lands (payload, kind byte, version byte)",
          arguments: [40, 5, 4])
    func singleFlipIsReadAgainAnywhere(_ offset: Int) throws {
        let dir = try TempDir("faults-flip-once")
        let image = dir.file("d.raw")
        try E.denseDisk(image, size: 512 * KiB, seed: 42)
        let setup = try E.makeRepo(dir, encryption: .aes256gcm)
        let snap = try E.backup(setup, vm: "v", [.init("d", image)])
        let victim = try E.index(setup, snap).entries[3]
        let path = dir.file("repo")
        let store = FlipOnceStore(LocalDirectoryStore(root: path), target: Repository.chunkKey(victim), offset: offset, mask: 0x01)
        let repo = try Repository.open(path: path, store: store) { E.password }
        let out = dir.file("out.raw")
        do {
            try E.restore(repo, snap, to: out)
            #expect(try E.cmpEqual(image, out))
        } catch let e as CairnError {
            Issue.record("a single flipped bit at byte \(offset) of chunk \(victim.hex) in transit failed the restore: code \(e.code), \(e.description)")
        }
        #expect(store.flipped.withLock { $0 }, "the read was disturbed")
    }

    // MARK: objects that can never be read

    @Test("permanently unreadable chunks: restores needing them fail naming the chunk, check names exactly them, other snapshots restore")
    func permanentReadFailures() throws {
        let dir = try TempDir("faults-permanent")
        let repo0 = try E.makeRepo(dir, encryption: .aes256gcm)
        var snaps: [SnapshotEntry] = []
        var images: [String] = []
        for v in 0..<3 {
            let image = dir.file("vm\(v).raw")
            try E.denseDisk(image, size: 512 * KiB, seed: 50 + UInt64(v))
            images.append(image)
            snaps.append(try E.backup(repo0, vm: "vm\(v)", [.init("d", image)]))
        }
        // Three chunks of vm0 and one of vm1 fail on every read; vm2 is untouched.
        let i0 = try E.index(repo0, snaps[0]).entries, i1 = try E.index(repo0, snaps[1]).entries
        let bad = [i0[1], i0[4], i0[7], i1[2]]
        let plan = FaultPlan(seed: 1, permanentKeys: Set(bad.map { Repository.chunkKey($0) }))
        let (repo, faults) = try Self.open(dir.file("repo"), plan)

        for (v, victims) in [(0, Array(bad[0..<3])), (1, [bad[3]])] {
            let e = #expect(throws: CairnError.self) { try E.restore(repo, snaps[v], to: dir.file("bad\(v).raw")) }
            #expect(e?.code == .io, "an unreadable chunk is an I/O failure: \(String(describing: e))")
            let text = e?.description ?? ""
            #expect(victims.contains { text.contains($0.hex) }, "the error names the unreadable chunk: \(text)")
            #expect(text.contains("restoring disk d of snapshot \(snaps[v].id.short)"), "and what was being restored: \(text)")
        }
        let good = dir.file("good.raw")
        try E.restore(repo, snaps[2], to: good)
        #expect(try E.cmpEqual(images[2], good))

        let report = try CheckJob(repository: repo, readData: .all).run()
        #expect(Set(report.problems.map(\.object)) == Set(bad.map(\.hex)) && report.problems.count == 4, "\(report.problems.map(\.message))")
        for p in report.problems {
            #expect(p.kind == "chunk")
            #expect(p.message.contains("injected permanent fault"), "the I/O cause is reported: \(p.message)")
            let owner = i0.contains { $0.hex == p.object } ? snaps[0] : snaps[1]
            #expect(p.snapshots == [owner.id.hex])
        }
        #expect(faults.counts.permanent >= 4 * 4, "every attempt of RetryingStore failed: \(faults.counts)")
        #expect(try Self.retried(repo) >= 4)
    }

    /// An object that cannot be *read* (an I/O error, the storage is unreachable) is not known to
    /// be corrupt: its bytes may be perfectly good. Repair must not destroy it.
    @Test("repair does not delete a chunk it could not read because of an I/O error")
    func repairKeepsUnreadableChunks() throws {
        let dir = try TempDir("faults-repair-io")
        let image = dir.file("d.raw")
        try E.denseDisk(image, size: 512 * KiB, seed: 60)
        let setup = try E.makeRepo(dir, encryption: .aes256gcm)
        let snap = try E.backup(setup, vm: "v", [.init("d", image)])
        let victim = try E.index(setup, snap).entries[2]
        let file = setup.store.path(for: Repository.chunkKey(victim))
        let original = try readFile(file)

        let (repo, _) = try Self.open(dir.file("repo"), FaultPlan(permanentKeys: [Repository.chunkKey(victim)]))
        let report = try RepairJob(repository: repo).run()
        #expect(report.check.problems.map(\.object) == [victim.hex])
        #expect(report.check.problems.map(\.state) == ["unreadable"])
        // Not known to be damaged: reported, left in place, the snapshot not marked.
        #expect(report.unreadable == ["chunks/\(victim.hex)"])
        #expect(report.markedDamaged.isEmpty && report.quarantined.isEmpty)
        #expect(try setup.markedSnapshots(.damaged).isEmpty)

        let inPlace = FileManager.default.fileExists(atPath: file)
        let quarantined = dir.file("repo/quarantine/chunks-\(victim.hex)")
        let kept = inPlace ? try readFile(file) : (FileManager.default.fileExists(atPath: quarantined) ? try readFile(quarantined) : nil)
        let survived = kept == original
        #expect(survived,
                "the intact chunk \(victim.hex) survives repair (in place: \(inPlace), quarantined: \(FileManager.default.fileExists(atPath: quarantined)))")
    }

    // MARK: a store that refuses writes

    struct PutFaultCase: Sendable, CustomTestStringConvertible {
        var name: String
        var namespace: String
        var noSpaceRate: Double = 0
        /// In chunk objects: the disk fills after this many whole chunk objects.
        var noSpaceAfterChunks: Int?
        var transientPutRate: Double = 0
        var expectedCode: CairnError.Code
        var testDescription: String { name }
    }

    static let putFaultCases: [PutFaultCase] = [
        PutFaultCase(name: "disk full after 5 chunks", namespace: "chunks", noSpaceAfterChunks: 5, expectedCode: .noSpace),
        PutFaultCase(name: "ENOSPC on the index", namespace: "indexes", noSpaceRate: 1, expectedCode: .noSpace),
        PutFaultCase(name: "ENOSPC on the manifest", namespace: "snapshots", noSpaceRate: 1, expectedCode: .noSpace),
        PutFaultCase(name: "chunk puts failing beyond the retries", namespace: "chunks", transientPutRate: 1, expectedCode: .io),
    ]

    @Test("a backup whose writes fail leaves no snapshot; every committed snapshot stays complete; a retry succeeds", arguments: putFaultCases)
    func failedWritesLeaveNoSnapshot(_ c: PutFaultCase) throws {
        let dir = try TempDir("faults-put")
        let a = dir.file("a.raw"), b = dir.file("b.raw")
        try E.denseDisk(a, size: 512 * KiB, seed: 70)
        try E.denseDisk(b, size: 2 * MiB, seed: 71)
        let setup = try E.makeRepo(dir, encryption: .aes256gcm)
        let sa = try E.backup(setup, vm: "a", [.init("d", a)])
        let chunkObjectSize = UInt64(try E.fileSize(setup.store.path(for: Repository.chunkKey(try E.index(setup, sa).entries[0]))))

        let plan = FaultPlan(seed: 7, transientErrorRate: c.transientPutRate > 0 ? [.put: c.transientPutRate] : [:],
                             noSpaceRate: c.noSpaceRate,
                             noSpaceAfterBytes: c.noSpaceAfterChunks.map { UInt64($0) * chunkObjectSize + chunkObjectSize / 2 },
                             namespaces: [c.namespace])
        let (repo, faults) = try Self.open(dir.file("repo"), plan)
        let e = #expect(throws: CairnError.self) { try E.backup(repo, vm: "b", [.init("d", b)]) }
        #expect(e?.code == c.expectedCode, "\(String(describing: e))")
        let text = e?.description ?? ""
        if c.expectedCode == .noSpace {
            #expect(text.contains("No space left on device") && text.contains("free space"), "a clear ENOSPC message: \(text)")
            #expect(faults.counts.noSpace > 0)
        } else {
            #expect(text.contains("injected transient fault"), "\(text)")
            #expect(try Self.retried(repo) > 0 && faults.counts.transient[.put, default: 0] >= 4, "retried before giving up: \(faults.counts)")
        }
        #expect(text.contains(dir.file("repo")), "the message names where: \(text)")

        // Without faults: only the committed snapshot exists, and it is complete.
        let clean = try E.reopen(repo)
        let listed = try clean.listSnapshots(codec: clean.makeCodec())
        #expect(listed.snapshots.map(\.id) == [sa.id] && listed.failures.isEmpty, "the failed backup left no manifest")
        #expect(try clean.store.list("snapshots") == [sa.id.hex])
        let report = try CheckJob(repository: clean, readData: .all).run()
        #expect(report.ok, "no committed snapshot references a missing object: \(report.problems)")
        #expect(report.chunksRead == 8)
        // What the failed backup did store is unreferenced (gc's business), never half-written.
        switch (c.namespace, c.noSpaceAfterChunks, c.transientPutRate > 0) {
        case ("chunks", 5?, _): #expect(report.unreferencedChunks == 5, "exactly the chunks that fit")
        case ("chunks", _, true): #expect(report.unreferencedChunks == 0)
        case ("indexes", _, _): #expect(report.unreferencedChunks == 32 && report.unreferencedIndexes == 0)
        default: #expect(report.unreferencedChunks == 32 && report.unreferencedIndexes == 1)
        }
        #expect(try clean.store.list("tmp").isEmpty, "no temporary file left behind")

        // Retried without faults, the backup succeeds (reusing what was stored) and restores.
        let sb = try E.backup(clean, vm: "b", [.init("d", b)])
        #expect(try E.disk(sb).bytesNew == UInt64(32 - report.unreferencedChunks) * UInt64(64 * KiB))
        for (s, image) in [(sa, a), (sb, b)] {
            let out = dir.file("out-\(s.manifest.vm).raw")
            try E.restore(clean, s, to: out)
            #expect(try E.cmpEqual(image, out))
        }
        let final = try CheckJob(repository: clean, readData: .all).run()
        #expect(final.ok && final.snapshots == 2 && final.unreferencedChunks == 0)
    }
}
