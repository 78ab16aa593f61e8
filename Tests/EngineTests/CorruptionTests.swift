import CairnCore
import CairnTestSupport
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat
import Storage
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("Damaged repositories")
struct CorruptionTests {
    enum Damage: String, CaseIterable, Sendable { case flipByte, truncate, swapWithOtherChunk, delete }

    struct Case: Sendable, CustomTestStringConvertible {
        var damage: Damage
        var encrypted: Bool
        var testDescription: String { "\(damage.rawValue) \(encrypted ? "encrypted" : "unencrypted")" }
    }

    static let cases: [Case] = Damage.allCases.flatMap { d in [Case(damage: d, encrypted: false), Case(damage: d, encrypted: true)] }

    /// Rewrites a read-only (0444) object file.
    static func rewrite(_ path: String, _ change: (inout [UInt8]) -> Void) throws {
        #expect(chmod(path, 0o644) == 0)
        var bytes = try readFile(path)
        change(&bytes)
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        #expect(chmod(path, 0o444) == 0)
    }

    @Test("a damaged chunk is named by check with the snapshots using it; restores needing it fail, others succeed", arguments: cases)
    func damagedChunk(_ c: Case) throws {
        let dir = try TempDir("corrupt")
        let x = dir.file("x.raw"), y = dir.file("y.raw")
        try E.denseDisk(x, size: 2 * MiB, seed: 50)
        try E.denseDisk(y, size: 1 * MiB + 4096, seed: 51)
        let repo = try E.makeRepo(dir, encryption: c.encrypted ? .aes256gcm : .none, chunkSize: 64 * KiB)
        let sx1 = try E.backup(repo, vm: "x", [.init("xd", x)])
        let sx2 = try E.backup(repo, vm: "x", [.init("xd", x)])
        let sy = try E.backup(repo, vm: "y", [.init("yd", y)])
        #expect(try CheckJob(repository: repo, readData: .all).run().ok, "the repository starts healthy")

        let ix = try E.index(repo, sx1), iy = try E.index(repo, sy)
        let victim = ix.entries[ix.entries.count / 2]
        let other = ix.entries[1]
        #expect(!victim.isZero && !iy.entries.contains(victim), "the victim chunk belongs to x only")
        let path = repo.store.path(for: Repository.chunkKey(victim))
        #expect(FileManager.default.fileExists(atPath: path))

        switch c.damage {
        case .flipByte:
            try Self.rewrite(path) { $0[$0.count / 2] ^= 0x01 }
        case .truncate:
            try Self.rewrite(path) { $0.removeLast($0.count / 3) }
        case .swapWithOtherChunk:
            let otherBytes = try readFile(repo.store.path(for: Repository.chunkKey(other)))
            try Self.rewrite(path) { $0 = otherBytes }
        case .delete:
            #expect(unlink(path) == 0)
        }

        // Structural check: only a missing chunk is visible without reading data.
        let quick = try CheckJob(repository: repo, readData: .none).run()
        #expect(quick.ok == (c.damage != .delete), "structural check: \(quick.problems)")

        let report = try CheckJob(repository: repo, readData: .all).run()
        #expect(!report.ok)
        #expect(report.problems.count == 1, "exactly one problem: \(report.problems)")
        let problem = try #require(report.problems.first { $0.object == victim.hex }, "check names chunk \(victim.hex): \(report.problems)")
        #expect(problem.kind == "chunk")
        #expect(problem.message.contains(victim.hex))
        let affected = problem.affected.joined(separator: "\n")
        #expect(affected.contains(sx1.id.short) && affected.contains(sx2.id.short), "affected: \(affected)")
        #expect(!affected.contains(sy.id.short), "y does not use the chunk: \(affected)")
        #expect(report.snapshots == 3)

        // A restore that needs the chunk fails as corrupt and names it.
        let bad = dir.file("x.out")
        let e = #expect(throws: CairnError.self) { try E.restore(repo, sx2, to: bad) }
        #expect(e?.code == .corrupt, "\(String(describing: e))")
        #expect(e?.message.contains(victim.hex) == true, "message: \(e?.message ?? "")")

        // A restore of the other disk is unaffected.
        let good = dir.file("y.out")
        try E.restore(repo, sy, to: good)
        #expect(try E.cmpEqual(y, good))

        // A missing chunk is stored again by the next backup of the same data (the set of
        // stored chunks is listed from the store at each backup).
        if c.damage == .delete {
            let again = try E.backup(repo, vm: "x", [.init("xd", x)])
            #expect(try E.disk(again).bytesNew == UInt64(64 * KiB), "the missing chunk is stored again")
            let out = dir.file("x2.out")
            try E.restore(repo, again, to: out)
            #expect(try E.cmpEqual(x, out))
            #expect(try CheckJob(repository: repo, readData: .all).run().ok, "re-storing the chunk heals the older snapshots too")
        }
    }

    @Test("a damaged index or manifest is reported by check, not a crash")
    func damagedMetadata() throws {
        let dir = try TempDir("corrupt-meta")
        let x = dir.file("x.raw")
        try E.mixedDisk(x, size: 1 * MiB, seed: 52)
        let repo = try E.makeRepo(dir, encryption: .aes256gcm, chunkSize: 64 * KiB)
        let s1 = try E.backup(repo, vm: "a", [.init("d", x)])
        let s2 = try E.backup(repo, vm: "b", [.init("d", x)])
        #expect(s1.manifest.disks[0].index == s2.manifest.disks[0].index)
        let indexPath = repo.store.path(for: ObjectKey("indexes", s1.manifest.disks[0].index))
        try Self.rewrite(indexPath) { $0[$0.count - 20] ^= 0x80 }
        let report = try CheckJob(repository: repo, readData: .all).run()
        #expect(report.problems.count == 2, "\(report.problems)")
        #expect(report.problems.allSatisfy { $0.kind == "index" && $0.object == s1.manifest.disks[0].index })
        let e = #expect(throws: CairnError.self) { try E.restore(repo, s1, to: dir.file("o.raw")) }
        #expect(e?.code == .corrupt)

        let manifestPath = repo.store.path(for: ObjectKey("snapshots", s2.id.hex))
        try Self.rewrite(manifestPath) { $0[40] ^= 0xFF }
        let list = try repo.listSnapshots(codec: repo.makeCodec())
        #expect(list.snapshots.map(\.id) == [s1.id])
        #expect(list.failures.map(\.0) == [s2.id.hex])
        let report2 = try CheckJob(repository: repo, readData: .none).run()
        #expect(report2.problems.contains { $0.kind == "snapshot" && $0.object == s2.id.hex })
    }
}
