import CairnCore
import CairnTestSupport
import Foundation
import Repository
import RepositoryFormat
import Storage
import Testing

@Suite struct RepositoryTests {
    @Test func encryptedRepositoryNeedsTheRightPassword() throws {
        let dir = try TempDir()
        let path = dir.file("repo")
        _ = try Repository.initialize(path: path, encryption: .aes256gcm, chunkSize: 1 << 16, passphrase: "pw", scryptN: 1024)
        let ok = try Repository.open(path: path) { "pw" }
        #expect(ok.isEncrypted)
        let e = #expect(throws: CairnError.self) { _ = try Repository.open(path: path) { "nope" } }
        #expect(e?.code == .wrongPassword)
        let none = #expect(throws: CairnError.self) { _ = try Repository.open(path: path) { nil } }
        #expect(none?.code == .wrongPassword)
        let missing = #expect(throws: CairnError.self) { _ = try Repository.open(path: dir.file("nothing")) { "pw" } }
        #expect(missing?.code == .repositoryNotFound)
        // init refuses an existing repository.
        #expect(throws: CairnError.self) {
            _ = try Repository.initialize(path: path, encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        }
    }

    @Test func configIsValidatedBeforeUse() throws {
        let dir = try TempDir()
        let path = dir.file("repo")
        _ = try Repository.initialize(path: path, encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        let cfg = Repository.configPath(path)
        let text = try String(contentsOfFile: cfg, encoding: .utf8)
        try FileManager.default.removeItem(atPath: cfg)
        try text.replacingOccurrences(of: "65536", with: "12345").write(toFile: cfg, atomically: true, encoding: .utf8)
        let e = #expect(throws: CairnError.self) { _ = try Repository.open(path: path) { nil } }
        #expect(e?.code == .corrupt)
    }

    @Test func sharedLocksCoexistExclusiveDoesNot() throws {
        let dir = try TempDir()
        let repo = try Repository.initialize(path: dir.file("repo"), encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        let a = try repo.lock(exclusive: false, job: "a")
        let b = try repo.lock(exclusive: false, job: "b")
        let e = #expect(throws: CairnError.self) { _ = try repo.lock(exclusive: true, job: "gc") }
        #expect(e?.code == .locked)
        a.release()
        b.release()
        let x = try repo.lock(exclusive: true, job: "gc")
        #expect(throws: CairnError.self) { _ = try repo.lock(exclusive: false, job: "backup") }
        x.release()
        #expect(try repo.store.list("locks").isEmpty)
    }

    @Test func locksOfDeadProcessesAreStale() throws {
        let dir = try TempDir()
        let repo = try Repository.initialize(path: dir.file("repo"), encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        // A process that has exited: its pid no longer exists.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/true")
        try p.run()
        p.waitUntilExit()
        let rec = LockRecord(version: 1, kind: "exclusive", host: hostName(), pid: p.processIdentifier, time: timestamp(),
                             heartbeat: timestamp(), job: "gc")
        try repo.store.put(ObjectKey("locks", "00000000deadbeef"), [UInt8](try JSONEncoder().encode(rec)))
        let l = try repo.lock(exclusive: false, job: "backup")
        #expect(try repo.store.list("locks") == [l.id])
        l.release()
    }

    @Test func snapshotReferences() throws {
        let dir = try TempDir()
        let repo = try Repository.initialize(path: dir.file("repo"), encryption: .none, chunkSize: 1 << 16, passphrase: nil)
        let codec = repo.makeCodec()
        var ids: [CairnCore.Digest] = []
        for (i, vm) in ["a", "b", "a"].enumerated() {
            let m = Manifest(vm: vm, time: "2026-01-0\(i + 1)T00:00:00.000Z", host: "h", tags: [], toolVersion: "t", chunkSize: 1 << 16, disks: [])
            ids.append(try repo.writeManifest(m, codec: codec))
        }
        #expect(try repo.resolveSnapshot("latest", vm: nil, codec: codec).id == ids[2])
        #expect(try repo.resolveSnapshot("latest", vm: "b", codec: codec).id == ids[1])
        #expect(try repo.resolveSnapshot(ids[0].hex, vm: nil, codec: codec).id == ids[0])
        #expect(try repo.resolveSnapshot(String(ids[1].hex.prefix(12)), vm: nil, codec: codec).id == ids[1])
        #expect(throws: CairnError.self) { _ = try repo.resolveSnapshot("", vm: nil, codec: codec) }
        #expect(throws: CairnError.self) { _ = try repo.resolveSnapshot("zz", vm: nil, codec: codec) }
        #expect(throws: CairnError.self) { _ = try repo.resolveSnapshot("latest", vm: "nobody", codec: codec) }
    }
}
