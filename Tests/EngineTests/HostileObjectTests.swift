import CairnCore
import CairnTestSupport
import Engine
import Foundation
import Repository
import RepositoryFormat
import Storage
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Objects that are whole and well-formed files but not what their name promises: a chunk
/// swapped with another, an older manifest replayed under a newer name, guest bytes in place
/// of a manifest, a manifest in place of an index. Each must be refused with its own clear
/// reason naming the object (docs/FORMAT.md, "Object envelope", threat model).
@Suite("Hostile objects")
struct HostileObjectTests {
    /// Replaces the read-only (0444) object file at `path` with `bytes`.
    static func replace(_ path: String, with bytes: [UInt8]) throws {
        #expect(FileManager.default.fileExists(atPath: path), "\(path) exists before it is replaced")
        #expect(chmod(path, 0o644) == 0)
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        #expect(chmod(path, 0o444) == 0)
    }

    /// 4 KiB as they start an ext4 file system: 1 KiB of zeros (boot area), then a superblock
    /// with plausible counts and the magic 0xEF53 at offset 56.
    static func ext4Start() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        func le32(_ v: UInt32, _ at: Int) { for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        let sb = 1024
        le32(65_536, sb + 0)       // s_inodes_count
        le32(262_144, sb + 4)      // s_blocks_count_lo
        le32(13_107, sb + 8)       // s_r_blocks_count_lo
        le32(250_000, sb + 12)     // s_free_blocks_count_lo
        le32(65_525, sb + 16)      // s_free_inodes_count
        le32(0, sb + 20)           // s_first_data_block
        le32(2, sb + 24)           // s_log_block_size (4 KiB)
        le32(32_768, sb + 32)      // s_blocks_per_group
        le32(8_192, sb + 40)       // s_inodes_per_group
        b[sb + 56] = 0x53; b[sb + 57] = 0xEF   // s_magic
        le32(1, sb + 76)           // s_rev_level
        var rng = SeededRandom(seed: 0xE4)
        for i in 0..<16 { b[sb + 104 + i] = UInt8(truncatingIfNeeded: rng.next()) }   // s_uuid
        return b
    }

    /// The reason of an error message: what follows the last "<64 hex>: " (the object it is
    /// about), or the whole message when it names no object.
    static func reason(_ message: String) -> String {
        let parts = message.components(separatedBy: ": ")
        guard let i = parts.lastIndex(where: { p in p.count >= 64 && p.suffix(64).allSatisfy { "0123456789abcdef".contains($0) } }) else {
            return message
        }
        return parts[(i + 1)...].joined(separator: ": ")
    }

    struct Fixture {
        var dir: TempDir
        var repo: Repository
        /// x1 and x2 (two backups of VM x), y, z, w.
        var x1: SnapshotEntry, x2: SnapshotEntry, y: SnapshotEntry, z: SnapshotEntry, w: SnapshotEntry
        var images: [String: String]
    }

    static func fixture() throws -> Fixture {
        let dir = try TempDir("hostile")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        var images: [String: String] = [:]
        func image(_ name: String, _ seed: UInt64) throws -> String {
            let p = dir.file("\(name).raw")
            try E.denseDisk(p, size: 512 * KiB, seed: seed)
            images[name] = p
            return p
        }
        let x = try image("x", 80)
        let x1 = try E.backup(repo, vm: "x", [.init("d", x)])
        var rng = SeededRandom(seed: 85)
        try writeBytes(rng.bytes(64 * KiB), to: x, at: 0)
        let x2 = try E.backup(repo, vm: "x", [.init("d", x)])
        let y = try E.backup(repo, vm: "y", [.init("d", try image("y", 81))])
        let z = try E.backup(repo, vm: "z", [.init("d", try image("z", 82))])
        let w = try E.backup(repo, vm: "w", [.init("d", try image("w", 83))])
        #expect(Set([x1, x2, y, z, w].map(\.id)).count == 5 && x1.manifest.disks[0].index != x2.manifest.disks[0].index)
        return Fixture(dir: dir, repo: repo, x1: x1, x2: x2, y: y, z: z, w: w, images: images)
    }

    @Test("wrong password, swapped chunk, replayed manifest, guest bytes, wrong kind: each refused with its own reason naming the object")
    func eachHostileObjectHasItsOwnReason() throws {
        let f = try Self.fixture()
        let repo = f.repo, store = repo.store, codec = repo.makeCodec()
        let path = repo.path

        // (a) Wrong password.
        let wrong = #expect(throws: CairnError.self) { _ = try Repository.open(path: path) { "Tr0ub4dor&3" } }
        #expect(wrong?.code == .wrongPassword, "\(String(describing: wrong))")
        let none = #expect(throws: CairnError.self) { _ = try Repository.open(path: path) { nil } }
        #expect(none?.code == .wrongPassword)
        #expect(none?.message != wrong?.message, "no password and a wrong one are told apart")

        // (b1) A chunk of z swapped with another chunk's (valid, authentic) file.
        let zEntries = try E.index(repo, f.z).entries
        let victim = zEntries[2], donor = zEntries[5]
        let victimPath = store.path(for: Repository.chunkKey(victim))
        try Self.replace(victimPath, with: try readFile(store.path(for: Repository.chunkKey(donor))))
        let swapped = #expect(throws: CairnError.self) { try E.restore(repo, f.z, to: f.dir.file("z.out")) }
        #expect(swapped?.code == .corrupt)
        #expect(swapped?.message.contains("chunk \(victim.hex)") == true && swapped?.path == victimPath, "\(String(describing: swapped))")
        #expect(swapped?.message.contains("authentication failed") == true, "\(swapped?.message ?? "")")

        // (b2) x2's manifest replaced by x1's (an older valid manifest replayed).
        let x2Path = store.path(for: ObjectKey("snapshots", f.x2.id.hex))
        try Self.replace(x2Path, with: try readFile(store.path(for: ObjectKey("snapshots", f.x1.id.hex))))
        let replayed = #expect(throws: CairnError.self) { _ = try repo.loadManifest(f.x2.id, codec: codec) }
        #expect(replayed?.code == .corrupt)
        #expect(replayed?.message.contains("manifest \(f.x2.id.hex)") == true && replayed?.path == x2Path, "\(String(describing: replayed))")
        #expect(replayed?.message.contains("authentication failed") == true, "\(replayed?.message ?? "")")

        // (c) y's manifest replaced by guest bytes (the start of an ext4 file system).
        let yPath = store.path(for: ObjectKey("snapshots", f.y.id.hex))
        try Self.replace(yPath, with: Self.ext4Start())
        let guest = #expect(throws: CairnError.self) { _ = try repo.loadManifest(f.y.id, codec: codec) }
        #expect(guest?.code == .corrupt)
        #expect(guest?.message.contains("manifest \(f.y.id.hex)") == true && guest?.path == yPath, "\(String(describing: guest))")
        #expect(guest?.message.contains("not a Cairn object") == true, "\(guest?.message ?? "")")

        // (d) w's index replaced by a manifest object (x1's): right envelope, wrong kind.
        let wIndex = f.w.manifest.disks[0].index
        let wIndexPath = store.path(for: ObjectKey("indexes", wIndex))
        try Self.replace(wIndexPath, with: try readFile(store.path(for: ObjectKey("snapshots", f.x1.id.hex))))
        let kind = #expect(throws: CairnError.self) { try E.restore(repo, f.w, to: f.dir.file("w.out")) }
        #expect(kind?.code == .corrupt)
        #expect(kind?.message.contains("index \(wIndex)") == true && kind?.path == wIndexPath, "\(String(describing: kind))")
        #expect(kind?.message.contains("kind") == true, "\(kind?.message ?? "")")

        // Distinct reasons; the two authentication failures share theirs.
        let a = Self.reason(wrong?.message ?? "a"), b1 = Self.reason(swapped?.message ?? "b1"), b2 = Self.reason(replayed?.message ?? "b2")
        let c = Self.reason(guest?.message ?? "c"), d = Self.reason(kind?.message ?? "d")
        #expect(b1 == b2, "a swapped chunk and a replayed manifest fail the same check: '\(b1)' / '\(b2)'")
        #expect(Set([a, b1, c, d]).count == 4, "pairwise different reasons: a '\(a)', b '\(b1)', c '\(c)', d '\(d)'")
        for r in [b1, c, d] { #expect(!r.isEmpty && !r.contains(f.x1.id.hex)) }

        // The listing skips the two unreadable manifests and says why; x1 is listed once (the
        // replayed copy is not accepted as x1 either).
        let listed = try repo.listSnapshots(codec: codec)
        #expect(listed.snapshots.map(\.id).sorted() == [f.x1.id, f.z.id, f.w.id].sorted())
        let failures = Dictionary(uniqueKeysWithValues: listed.failures.map { ($0.0, $0.1.message) })
        #expect(failures.keys.sorted() == [f.x2.id.hex, f.y.id.hex].sorted())
        #expect(failures[f.x2.id.hex] == replayed?.message && failures[f.y.id.hex] == guest?.message)

        // check --read-data names exactly the four objects, with the same reasons.
        let report = try CheckJob(repository: repo, readData: .all).run()
        var byObject: [String: CheckProblem] = [:]
        for p in report.problems { byObject[p.object] = p }
        #expect(report.problems.count == 4 && Set(byObject.keys) == [victim.hex, f.x2.id.hex, f.y.id.hex, wIndex], "\(report.problems.map(\.message))")
        #expect(byObject[victim.hex]?.kind == "chunk" && byObject[wIndex]?.kind == "index")
        #expect(byObject[f.x2.id.hex]?.kind == "snapshot" && byObject[f.y.id.hex]?.kind == "snapshot")
        #expect(report.problems.allSatisfy { $0.state == "corrupt" })
        let chunkReason = Self.reason(byObject[victim.hex]?.message ?? "")
        #expect(chunkReason.hasPrefix(b1), "\(chunkReason)")
        #expect(byObject[f.y.id.hex]?.message.contains("not a Cairn object") == true)
        #expect(byObject[wIndex]?.message.contains(Self.reason(kind?.message ?? "?")) == true)

        // The untouched snapshot still restores.
        let out = f.dir.file("x1.out")
        let x1Image = f.dir.file("x1.raw")
        try E.denseDisk(x1Image, size: 512 * KiB, seed: 80)
        try E.restore(repo, f.x1, to: out)
        #expect(try E.cmpEqual(x1Image, out))
    }

    /// `cairn restore <id>` resolves the id with `resolveSnapshot`; asking for a snapshot whose
    /// manifest exists but does not authenticate must say so, not that no such snapshot exists.
    @Test("restoring by id a snapshot whose manifest was replayed reports corruption, not 'no snapshot matches'")
    func replayedManifestByReference() throws {
        let f = try Self.fixture()
        let store = f.repo.store
        try Self.replace(store.path(for: ObjectKey("snapshots", f.x2.id.hex)),
                         with: try readFile(store.path(for: ObjectKey("snapshots", f.x1.id.hex))))
        let e = #expect(throws: CairnError.self) { _ = try f.repo.resolveSnapshot(f.x2.id.hex, vm: nil, codec: f.repo.makeCodec()) }
        #expect(e?.code == .corrupt, "code \(String(describing: e?.code)): \(e?.description ?? "")")
        #expect(e?.description.contains("authentication failed") == true, "\(e?.description ?? "")")
    }

    struct GuestCase: Sendable, CustomTestStringConvertible {
        var namespace: String
        var random: Bool
        var testDescription: String { "\(random ? "random bytes" : "ext4 start") as \(namespace)" }
    }

    /// Guest data written over an object is "not a Cairn object" whatever those bytes are: the
    /// envelope's magic is checked before any header field is believed (docs/FORMAT.md, "A
    /// reader checks, in this order: size >= 32, magic, ...").
    @Test("guest bytes in place of an object are called 'not a Cairn object', whatever the bytes",
          arguments: ["snapshots", "indexes", "chunks"].flatMap { ns in [GuestCase(namespace: ns, random: false), GuestCase(namespace: ns, random: true)] })
    func guestBytesAreNotCairnObjects(_ c: GuestCase) throws {
        let f = try Self.fixture()
        let repo = f.repo, store = repo.store, codec = repo.makeCodec()
        var rng = SeededRandom(seed: 0x6E57)
        let bytes = c.random ? rng.bytes(4096) : Self.ext4Start()
        let name: String
        switch c.namespace {
        case "snapshots": name = f.z.id.hex
        case "indexes": name = f.z.manifest.disks[0].index
        default: name = try E.index(repo, f.z).entries[1].hex
        }
        let key = ObjectKey(c.namespace, name)
        try Self.replace(store.path(for: key), with: bytes)
        let e = #expect(throws: CairnError.self) {
            switch c.namespace {
            case "snapshots": _ = try repo.loadManifest(f.z.id, codec: codec)
            default: try E.restore(repo, f.z, to: f.dir.file("z.out"))
            }
        }
        #expect(e?.code == .corrupt)
        #expect(e?.message.contains(name) == true, "names the object: \(e?.description ?? "")")
        #expect(e?.message.contains("not a Cairn object") == true, "says it is not a Cairn object: \(e?.description ?? "")")
    }
}
