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

/// VerifyJob's plumbing that the CLI tests cannot reach: the boot closure (which the sandbox
/// provides), its evidence, the cumulative levels, and healing through a change-tracking base.
@Suite struct VerifyJobTests {
    static func corrupt(_ repo: Repository, _ id: CairnCore.Digest) throws {
        let path = repo.store.path(for: Repository.chunkKey(id))
        var bytes = try readFile(path)
        bytes[bytes.count / 2] ^= 0x10
        try FileManager.default.removeItem(atPath: path)
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
    }

    @Test("boot level: the closure's outcome and evidence are stored with the record; a failed boot is a failed record")
    func bootLevelRecordsOutcomeAndEvidence() throws {
        let dir = try TempDir("verify-boot")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 1 * MiB, seed: 5)
        let s = try E.backup(repo, [.init("d", disk)])
        let png: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A] + [UInt8](repeating: 7, count: 100)
        let booted = Mutex<[String]>([])
        let passing = VerifyJob(repository: repo, level: .boot, nativeCheckers: false, boot: { snap in
            booted.withLock { $0.append(snap.id.hex) }
            return BootOutcome(passed: true, reason: "heartbeat seen after 4.2 s",
                               evidence: [("screenshot.png", png), ("serial.log", Array("login:\n".utf8)),
                                          ("../escape", [1]), ("huge.bin", [UInt8](repeating: 0, count: Magic.maxEvidenceBytes))])
        }, toolVersion: "test")
        let record = try #require(try passing.run([s]).first)
        #expect(booted.withLock { $0 } == [s.id.hex])
        #expect(record.outcome == .passed && record.level == .boot)
        #expect(record.levels.map(\.level) == [.data, .filesystem, .boot] && record.levels.allSatisfy { $0.outcome == .passed })
        #expect(record.evidence.map(\.name) == ["screenshot.png", "serial.log"])
        let bootDetails = record.levels.last?.details ?? []
        #expect(bootDetails.contains("heartbeat seen after 4.2 s"), "\(bootDetails)")
        #expect(bootDetails.contains { $0.hasPrefix("evidence '../escape' dropped") }, "\(bootDetails)")
        #expect(bootDetails.contains { $0.hasPrefix("evidence huge.bin") && $0.contains("dropped") }, "\(bootDetails)")
        let stored = try #require(try repo.verifications(for: s.id).last)
        #expect(stored.evidence.first?.data == Data(png), "the screenshot is kept byte for byte")

        let failing = VerifyJob(repository: repo, level: .boot, nativeCheckers: false, boot: { _ in
            BootOutcome(passed: false, reason: "no heartbeat within 120 s", evidence: [("screenshot.png", png)])
        }, toolVersion: "test")
        let failed = try #require(try failing.run([s]).first)
        #expect(failed.outcome == .failed && failed.failedLevel == .boot)
        #expect(failed.reason == "boot: no heartbeat within 120 s")
        #expect(failed.evidence.count == 1, "evidence is kept for a failed boot too")
        #expect(failed.badChunks.isEmpty)
        #expect(try repo.failedSnapshots() == [s.id.hex])
        #expect(try repo.badChunks().isEmpty, "a failed boot names no bad chunk")
    }

    @Test("levels are cumulative: a data failure skips the file systems and the boot; boot without a sandbox is a usage error")
    func failedLowerLevelSkipsHigherOnes() throws {
        let dir = try TempDir("verify-skip")
        let repo = try E.makeRepo(dir)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 1 * MiB, seed: 6)
        let s = try E.backup(repo, [.init("d", disk)])
        let noSandbox = VerifyJob(repository: repo, level: .boot, toolVersion: "test")
        let e = #expect(throws: CairnError.self) { try noSandbox.run([s]) }
        #expect(e?.code == .usage)
        #expect(try repo.verifications(for: s.id).isEmpty)

        let victim = try E.index(repo, s).entries[2]
        try Self.corrupt(repo, victim)
        let called = Mutex(false)
        let job = VerifyJob(repository: repo, level: .boot, boot: { _ in
            called.withLock { $0 = true }
            return BootOutcome(passed: true, reason: "")
        }, toolVersion: "test")
        let record = try #require(try job.run([s]).first)
        #expect(!called.withLock { $0 }, "no boot after a data failure")
        #expect(record.levels.map(\.outcome) == [.failed, .skipped, .skipped])
        #expect(record.badChunks == [victim.hex])
        #expect(record.reason.hasPrefix("data: disk d, byte offset \(2 * 64 * KiB) (chunk position 2): chunk \(victim.hex)"), "\(record.reason)")
    }

    @Test("a change-tracking base that uses a bad chunk is not trusted: the disk is read whole and the chunk stored again")
    func changeTrackingBaseWithBadChunkIsReadWhole() throws {
        let dir = try TempDir("verify-cbt")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        let disk = dir.file("d.raw")
        try E.denseDisk(disk, size: 1 * MiB, seed: 7)
        let s = try E.backup(repo, [.init("d", disk)])
        let base = try E.index(repo, s)
        let victim = base.entries[5]
        try Self.corrupt(repo, victim)
        #expect(try VerifyJob(repository: repo, level: .data, toolVersion: "test").run([s]).first?.outcome == .failed)

        // Nothing changed since the base, by the dirty bitmap: only healing makes it read.
        let img = try ImageOpener.open(path: disk)
        let job = BackupJob(repository: repo, vm: "vm", tags: [],
                            disks: [BackupDisk(name: "d", source: img.source, format: "raw", path: disk, changedRanges: [], base: base)],
                            workers: 2, toolVersion: "test")
        let healed = try job.run()
        #expect(healed.manifest.disks[0].bytesRead == 1 * UInt64(MiB), "the whole disk was read")
        #expect(healed.manifest.disks[0].bytesNew == UInt64(64 * KiB), "exactly the bad chunk was stored again")
        let both = try VerifyJob(repository: repo, level: .data, toolVersion: "test").run([s, healed])
        #expect(both.map(\.outcome) == [.passed, .passed])
        #expect(try repo.badChunks().isEmpty)
    }
}
