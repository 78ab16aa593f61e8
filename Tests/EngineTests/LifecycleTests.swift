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

/// Prune, gc, protect, repair and lock waiting on real repositories (docs/FORMAT.md).
@Suite("Repository lifecycle")
struct LifecycleTests {
    /// A disk whose chunk `k` of 64 KiB holds `version[k]`-seeded random bytes.
    static func versionedDisk(_ path: String, _ versions: [UInt64]) throws {
        var segs: [(offset: Int, bytes: [UInt8])] = []
        for (k, v) in versions.enumerated() {
            var rng = SeededRandom(seed: v &* 1000 &+ UInt64(k))
            segs.append((k * 64 * KiB, rng.bytes(64 * KiB)))
        }
        try E.writeSparse(path, size: versions.count * 64 * KiB, segments: segs)
    }

    static func chunkCount(_ repo: Repository) throws -> Int { try repo.store.list("chunks").count }

    @Test("prune forgets by policy, gc frees exactly the chunks only forgotten snapshots used, the rest restores byte-exact")
    func pruneThenGC() throws {
        let dir = try TempDir("lifecycle")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        let disk = dir.file("d.raw")
        var snaps: [SnapshotEntry] = []
        var images: [String] = []
        // Five generations; generation g rewrites chunk 0 (a value only it has) and chunk g + 1
        // (a value every later generation keeps).
        var versions: [UInt64] = Array(repeating: 1, count: 8)
        for g in 0..<5 {
            versions[0] = UInt64(100 + g)
            versions[g + 1] = UInt64(200 + g)
            try Self.versionedDisk(disk, versions)
            let copy = dir.file("gen\(g).raw")
            #expect(copyfile(disk, copy))
            images.append(copy)
            snaps.append(try E.backup(repo, vm: "vm", [.init("d", disk)]))
            Thread.sleep(forTimeInterval: 0.01)
        }
        let before = try Self.chunkCount(repo)
        #expect(before == 8 + 4 * 2, "8 chunks in generation 0, two new ones in each later generation")
        try repo.setMark(.protected, snapshot: snaps[0].id, SnapshotMark(note: "first"))

        let report = try PruneJob(repository: repo, policy: RetentionPolicy(keepLast: 2)).run()
        let removed = Set(report.decisions.filter { !$0.keep }.map(\.id))
        #expect(removed == Set([snaps[1].id.hex, snaps[2].id.hex]), "keeps the 2 newest and the protected one")
        #expect(try repo.listSnapshots(codec: repo.makeCodec()).snapshots.count == 3)

        let gc = try GarbageCollector(repository: repo).run()
        // What the kept snapshots reference, computed from their indexes; gc keeps exactly it.
        var needed = Set<CairnCore.Digest>()
        for s in [snaps[0], snaps[3], snaps[4]] { needed.formUnion(try E.index(repo, s).entries.filter { !$0.isZero }) }
        #expect(try Self.chunkCount(repo) == needed.count)
        #expect(gc.deletedChunks == before - needed.count)
        #expect(gc.deletedChunks == 2, "chunk 0 of generations 1 and 2")
        #expect(try CheckJob(repository: repo, readData: .all).run().ok)
        for (k, s) in [(0, snaps[0]), (3, snaps[3]), (4, snaps[4])] {
            let out = dir.file("restore\(k).raw")
            try E.restore(repo, s, to: out)
            #expect(try E.cmpEqual(out, images[k]))
        }
    }

    @Test("gc deletes chunks an interrupted backup left and keeps everything a snapshot references")
    func gcRemovesOrphans() throws {
        let dir = try TempDir("lifecycle")
        let repo = try E.makeRepo(dir)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 512 * KiB, seed: 9)
        try E.backup(repo, [.init("d", disk)])
        // Orphans: what a backup killed before its manifest leaves: chunks and an index that
        // no manifest names. Made by a real backup whose manifest is then removed by hand.
        let other = dir.file("o.raw")
        try E.denseDisk(other, size: 192 * KiB, seed: 10)
        let gone = try E.backup(repo, vm: "killed", [.init("o", other)])
        let parsed = CairnCore.Digest(hex: gone.manifest.disks[0].index)
        let orphanIndex = try #require(parsed)
        let orphans = try E.index(repo, gone).entries
        #expect(unlink(repo.store.path(for: ObjectKey("snapshots", gone.id.hex))) == 0)
        let codec = repo.makeCodec()
        var rng = SeededRandom(seed: 4)
        let loose = rng.bytes(1000)
        let looseID = codec.id(of: loose)
        try codec.seal(kind: .chunk, id: looseID, plaintext: loose).withUnsafeBytes { try repo.putChunk(looseID, sealed: $0) }

        let dry = try GarbageCollector(repository: repo, dryRun: true).run()
        #expect(dry.deletedChunks == orphans.count + 1 && dry.deletedIndexes == 1, "\(dry)")
        #expect(try repo.store.exists(Repository.chunkKey(looseID)), "a dry run deletes nothing")
        let real = try GarbageCollector(repository: repo).run()
        #expect(real.deletedChunks == orphans.count + 1 && real.deletedIndexes == 1)
        #expect(try !repo.store.exists(ObjectKey("indexes", orphanIndex.hex)))
        for id in orphans { #expect(try !repo.store.exists(Repository.chunkKey(id))) }
        #expect(try !repo.store.exists(Repository.chunkKey(looseID)))
        #expect(try CheckJob(repository: repo, readData: .all).run().ok)
    }

    @Test("gc stops before deleting anything when a manifest cannot be read")
    func gcRefusesOnCorruptManifest() throws {
        let dir = try TempDir("lifecycle")
        let repo = try E.makeRepo(dir)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 256 * KiB, seed: 1)
        _ = try E.backup(repo, [.init("d", disk)])
        try E.denseDisk(disk, size: 256 * KiB, seed: 2)
        let s2 = try E.backup(repo, [.init("d", disk)])
        _ = try PruneJob(repository: repo, policy: RetentionPolicy(keepLast: 1)).run()
        let path = repo.store.path(for: ObjectKey("snapshots", s2.id.hex))
        #expect(chmod(path, 0o644) == 0)
        #expect(FileManager.default.createFile(atPath: path, contents: Data("guest bytes".utf8)))
        let chunks = try Self.chunkCount(repo)
        do {
            _ = try GarbageCollector(repository: repo).run()
            Issue.record("gc ran over an unreadable manifest")
        } catch let e as CairnError {
            #expect(e.code == .corrupt && e.message.contains("before deleting anything") && e.message.contains(s2.id.hex), "\(e)")
        }
        #expect(try Self.chunkCount(repo) == chunks)
    }

    @Test("repair sets a corrupt chunk aside and marks the snapshot; the next backup of the same data heals it")
    func repairAndHeal() throws {
        let dir = try TempDir("lifecycle")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 1 * MiB, seed: 77)
        let s = try E.backup(repo, [.init("d", disk)])
        let victim = try E.index(repo, s).entries[3]
        let path = repo.store.path(for: Repository.chunkKey(victim))
        #expect(chmod(path, 0o644) == 0)
        var bytes = try readFile(path)
        bytes[bytes.count / 2] ^= 0x10
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))

        let dry = try RepairJob(repository: repo, dryRun: true).run()
        #expect(dry.quarantined == ["chunks/\(victim.hex)"] && dry.markedDamaged == [s.id.hex])
        #expect(try repo.markedSnapshots(.damaged).isEmpty, "a dry run changes nothing")

        let r = try RepairJob(repository: repo).run()
        #expect(r.check.problems.map(\.object) == [victim.hex])
        #expect(r.quarantined == ["chunks/\(victim.hex)"])
        #expect(try repo.markedSnapshots(.damaged) == [s.id.hex])
        #expect(try repo.store.exists(ObjectKey("quarantine", "chunks-\(victim.hex)")))
        let after = try CheckJob(repository: repo, readData: .all).run()
        #expect(after.problems.map { "\($0.state) \($0.object)" } == ["missing \(victim.hex)"])

        _ = try E.backup(repo, [.init("d", disk)])
        #expect(try CheckJob(repository: repo, readData: .all).run().ok, "the backup stored the missing chunk again")
        let healed = try RepairJob(repository: repo).run()
        #expect(healed.healed == [s.id.hex])
        #expect(try repo.markedSnapshots(.damaged).isEmpty)
        let out = dir.file("out.raw")
        try E.restore(repo, s, to: out)
        #expect(try E.cmpEqual(out, disk))
    }

    @Test("an exclusive locker waits for shared holders and keeps new ones out; a shared locker waits for it")
    func lockWaiting() throws {
        let dir = try TempDir("lifecycle")
        let repo = try E.makeRepo(dir)
        let shared = try repo.lock(exclusive: false, job: "test shared")
        #expect(throws: CairnError.self) { _ = try repo.lock(exclusive: true, job: "no wait", wait: 0) }
        let order = Mutex<[String]>([])
        let gotExclusive = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let x = try? repo.lock(exclusive: true, job: "waiting exclusive", wait: 30)
            order.withLock { $0.append(x == nil ? "exclusive failed" : "exclusive") }
            gotExclusive.signal()
            Thread.sleep(forTimeInterval: 0.3)
            order.withLock { $0.append("exclusive released") }
            x?.release()
        }
        // Give the exclusive locker time to write its file; a new shared locker must now wait.
        Thread.sleep(forTimeInterval: 0.3)
        #expect(throws: CairnError.self) { _ = try repo.lock(exclusive: false, job: "newcomer", wait: 0) }
        order.withLock { $0.append("shared released") }
        shared.release()
        let late = try repo.lock(exclusive: false, job: "late shared", wait: 30)
        order.withLock { $0.append("late shared") }
        late.release()
        gotExclusive.wait()
        #expect(order.withLock { $0 } == ["shared released", "exclusive", "exclusive released", "late shared"])
        #expect(try repo.store.list("locks").isEmpty)
    }
}

/// `cp` preserving holes; true on success.
func copyfile(_ from: String, _ to: String) -> Bool {
    (try? Tool.run("cp", ["--sparse=always", from, to]).status) == 0
}
