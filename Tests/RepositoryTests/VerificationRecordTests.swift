import CairnCore
import CairnTestSupport
import Foundation
import Repository
import RepositoryFormat
import Storage
import Testing

/// The verification-record API the live-backup code calls (docs/FORMAT.md, "Verification
/// records"): save, list per snapshot, newest per snapshot, failed snapshots, bad chunks; the
/// records are sealed objects that cannot be altered or moved to another snapshot.
@Suite struct VerificationRecordTests {
    static func snapshotID(_ n: UInt8) -> CairnCore.Digest {
        CairnCore.Digest([UInt8](repeating: n, count: 32))
    }

    static func record(_ snapshot: CairnCore.Digest, time: String, outcome: VerifyOutcome, level: VerifyLevel = .data,
                       bad: [CairnCore.Digest] = [], evidence: [VerificationRecord.Evidence] = []) -> VerificationRecord {
        VerificationRecord(snapshot: snapshot.hex, vm: "vm", time: time, host: "h", toolVersion: "test", level: level, outcome: outcome,
                           reason: outcome == .failed ? "data: chunk gone" : "",
                           levels: [.init(level: .data, outcome: outcome, reason: outcome == .failed ? "chunk gone" : "")],
                           badChunks: bad.map(\.hex), evidence: evidence)
    }

    @Test(arguments: [false, true])
    func newestRecordDecidesFailedSnapshotsAndBadChunks(encrypted: Bool) throws {
        let dir = try TempDir()
        let repo = try Repository.initialize(path: dir.file("repo"), encryption: encrypted ? .aes256gcm : .none, chunkSize: 1 << 16,
                                             passphrase: encrypted ? "pw" : nil, scryptN: 1024)
        // A repository without verifications/ (an old one) reads as having no records.
        #expect(try repo.latestVerifications().isEmpty)
        #expect(try repo.badChunks().isEmpty)
        let a = Self.snapshotID(1), b = Self.snapshotID(2)
        let badA = Self.snapshotID(0xA1), badB = Self.snapshotID(0xB1)
        let screenshot = VerificationRecord.Evidence(name: "screenshot.png", data: Data([0x89, 0x50, 0x4E, 0x47, 1, 2, 3]))
        try repo.saveVerification(Self.record(a, time: "2024-11-25T10:00:00.000Z", outcome: .failed, bad: [badA]))
        try repo.saveVerification(Self.record(a, time: "2024-11-25T11:00:00.000Z", outcome: .passed, level: .boot, evidence: [screenshot]))
        try repo.saveVerification(Self.record(b, time: "2024-11-25T09:00:00.000Z", outcome: .passed))
        try repo.saveVerification(Self.record(b, time: "2024-11-25T12:00:00.000Z", outcome: .failed, bad: [badB]))

        let historyA = try repo.verifications(for: a)
        #expect(historyA.map(\.outcome) == [.failed, .passed])
        #expect(historyA.last?.evidence == [screenshot])
        let latest = try repo.latestVerifications()
        #expect(latest[a.hex]?.outcome == .passed && latest[a.hex]?.level == .boot)
        #expect(latest[b.hex]?.outcome == .failed)
        #expect(try repo.failedSnapshots() == [b.hex])
        #expect(try repo.badChunks() == [badB], "only the newest record of a failed snapshot counts")

        // Sealed: the guest's screenshot is not readable in the file when encrypted, and a
        // record moved under another snapshot's name is refused.
        let names = try repo.verificationNames()
        #expect(names.count == 4)
        let withEvidence = try #require(names.first { $0.snapshot == a && $0.name.contains("T110000") })
        let path = dir.file("repo/verifications/\(withEvidence.name)")
        let stored = try readFile(path)
        #expect(Array(stored.prefix(4)) == [0x43, 0x52, 0x4E, 0x4F] && stored[5] == 4, "an object envelope of kind 4")
        if encrypted {
            #expect(!String(decoding: stored, as: UTF8.self).contains("screenshot"), "encrypted: no plaintext in the file")
        }
        let moved = withEvidence.name.replacingOccurrences(of: a.hex, with: b.hex)
        try FileManager.default.copyItem(atPath: path, toPath: dir.file("repo/verifications/\(moved)"))
        let e = #expect(throws: CairnError.self) { _ = try repo.loadVerification(named: moved, codec: repo.makeCodec()) }
        #expect(e?.code == .corrupt)
        #expect(try repo.allVerifications().failures.map(\.name) == [moved])
        #expect(try repo.latestVerifications()[b.hex]?.outcome == .failed, "the moved record is not counted")
        try FileManager.default.removeItem(atPath: dir.file("repo/verifications/\(moved)"))

        // A flipped byte is detected (authentication, or the id check when not encrypted).
        var flipped = stored
        flipped[flipped.count - 20] ^= 0x40
        try FileManager.default.removeItem(atPath: path)
        try Data(flipped).write(to: URL(fileURLWithPath: path))
        #expect(throws: CairnError.self) { _ = try repo.loadVerification(named: withEvidence.name, codec: repo.makeCodec()) }
        #expect(try repo.verifications(for: a).count == 1, "the damaged record is left out")

        // Forgetting a snapshot removes its records.
        try repo.forgetSnapshot(b)
        #expect(try repo.verifications(for: b).isEmpty)
        #expect(try repo.badChunks() == [badA], "a's damaged newest record is left out, so its older failed one counts")
        #expect(try repo.verificationNames().allSatisfy { $0.snapshot == a })
    }

    @Test func evidenceIsCappedAndNamesAreSafe() throws {
        let dir = try TempDir()
        let repo = try Repository.initialize(path: dir.file("repo"), encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        let s = Self.snapshotID(3)
        for bad in ["../escape", ".hidden", "a/b", "", "tab\there"] {
            let r = Self.record(s, time: "2024-11-25T10:00:00.000Z", outcome: .passed, evidence: [.init(name: bad, data: Data([1]))])
            #expect(throws: CairnError.self, "evidence name '\(bad)'") { try repo.saveVerification(r) }
        }
        let big = Self.record(s, time: "2024-11-25T10:00:00.000Z", outcome: .passed,
                              evidence: [.init(name: "big.bin", data: Data(count: Magic.maxEvidenceBytes + 1))])
        #expect(throws: CairnError.self) { try repo.saveVerification(big) }
        #expect(try repo.verificationNames().isEmpty)
    }
}
