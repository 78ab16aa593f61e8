import CairnCore
import CairnTestSupport
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat
import Testing

@Suite("Encryption")
struct EncryptionTests {
    static let phrase = Array("CAIRN-PLAINTEXT-MARKER/7f3a9c/the quick brown fox;".utf8)
    static let vmName = "vm-marker-5b2e9d"
    static let diskName = "disk-marker-c41f07"

    struct Fixture {
        var disk: String
        /// 4 KiB of random bytes inside a fully random chunk (stored uncompressed when unencrypted).
        var randomMarker: [UInt8]
        /// The plaintext of the chunk holding `randomMarker` (chunk 32 of 64 KiB).
        var markerChunk: [UInt8]
    }

    /// 4 MiB of random data with 64 KiB of a repeated ASCII phrase at an unaligned offset.
    static func makeDisk(_ dir: TempDir) throws -> Fixture {
        var rng = SeededRandom(seed: 40)
        var bytes = rng.bytes(4 * MiB)
        var text: [UInt8] = []
        while text.count < 64 * KiB { text += phrase }
        text = Array(text.prefix(64 * KiB))
        bytes.replaceSubrange((1 * MiB + 777)..<(1 * MiB + 777 + text.count), with: text)
        let marker = Array(bytes[(2 * MiB + 5000)..<(2 * MiB + 5000 + 4096)])
        let path = dir.file("secret.raw")
        try E.writeSparse(path, size: bytes.count, segments: [(0, bytes)])
        return Fixture(disk: path, randomMarker: marker, markerChunk: Array(bytes[(2 * MiB)..<(2 * MiB + 64 * KiB)]))
    }

    static func window(_ m: [UInt8]) -> [UInt8] { Array(m[1000..<1064]) }

    @Test("an encrypted repository holds no guest bytes, names or plain chunk ids")
    func encryptedHidesEverything() throws {
        let dir = try TempDir("enc")
        let fx = try Self.makeDisk(dir)
        let repo = try E.makeRepo(dir, encryption: .aes256gcm, chunkSize: 64 * KiB)
        #expect(repo.isEncrypted)
        let snap = try E.backup(repo, vm: Self.vmName, [.init(Self.diskName, fx.disk)])

        let root = repo.path
        #expect(try E.allFiles(under: root).count > 64, "the repository holds the chunks")
        // The scanner finds what is there: the config is plain JSON.
        #expect(try E.filesContaining(Array("aes-256-gcm".utf8), under: root) == [root + "/config"])
        // ... and nothing of the guest, its names or its path.
        #expect(try E.filesContaining(Self.phrase, under: root).isEmpty, "the ASCII marker leaked")
        #expect(try E.filesContaining(Array(Self.phrase.prefix(16)), under: root).isEmpty)
        #expect(try E.filesContaining(Self.window(fx.randomMarker), under: root).isEmpty, "random guest bytes leaked")
        #expect(try E.filesContaining(Array(Self.vmName.utf8), under: root).isEmpty, "the VM name leaked")
        #expect(try E.filesContaining(Array(Self.diskName.utf8), under: root).isEmpty, "the disk name leaked")
        #expect(try E.filesContaining(Array("secret.raw".utf8), under: root).isEmpty, "the source path leaked")

        // Chunk ids are keyed (HMAC), not the SHA-256 of the plaintext.
        let plainID = ObjectCodec(keys: nil, compressionLevel: 1).id(of: fx.markerChunk)
        let index = try E.index(repo, snap)
        #expect(!index.entries.contains(plainID))
        #expect(try !repo.store.exists(Repository.chunkKey(plainID)))
        #expect(index.entries[32] == repo.makeCodec().id(of: fx.markerChunk))

        // Only the right password opens it, and then everything restores.
        let wrong = #expect(throws: CairnError.self) { _ = try Repository.open(path: root) { "not the password" } }
        #expect(wrong?.code == .wrongPassword)
        let none = #expect(throws: CairnError.self) { _ = try Repository.open(path: root) { nil } }
        #expect(none?.code == .wrongPassword)
        let reopened = try E.reopen(repo)
        let list = try reopened.listSnapshots(codec: reopened.makeCodec())
        #expect(list.snapshots.map(\.manifest.vm) == [Self.vmName])
        let out = dir.file("restored.raw")
        try E.restore(reopened, list.snapshots[0], to: out)
        #expect(try E.cmpEqual(fx.disk, out))
    }

    @Test("control: without encryption the same backup is readable on disk and restores")
    func unencryptedControl() throws {
        let dir = try TempDir("noenc")
        let fx = try Self.makeDisk(dir)
        let repo = try E.makeRepo(dir, encryption: .none, chunkSize: 64 * KiB)
        #expect(!repo.isEncrypted)
        let snap = try E.backup(repo, vm: Self.vmName, [.init(Self.diskName, fx.disk)])
        // Incompressible chunks are stored as they are: the scan does find guest bytes here,
        // so its empty result in the encrypted test means something.
        let plainID = ObjectCodec(keys: nil, compressionLevel: 1).id(of: fx.markerChunk)
        let hits = try E.filesContaining(Self.window(fx.randomMarker), under: repo.path)
        #expect(hits == [repo.store.path(for: Repository.chunkKey(plainID))])
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(fx.disk, out))
    }
}
