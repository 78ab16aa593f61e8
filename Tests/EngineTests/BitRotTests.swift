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

/// Bit rot at scale: 115 objects of an encrypted repository are damaged on disk (bit flips,
/// truncation, zero-filling) and `check --read-data` must name exactly those objects, no more
/// and no fewer; `repair` must quarantine exactly them and mark exactly the snapshots that
/// lost data (docs/FORMAT.md, "Object envelope", "Repair").
@Suite("Bit rot")
struct BitRotTests {
    /// How one object file is damaged.
    enum Damage: CaseIterable, CustomStringConvertible {
        /// One bit of the payload (offset >= 32) flipped.
        case flipPayloadBit
        /// One bit of the 32-byte envelope header flipped (magic, kind, flags, reserved), never
        /// the length fields, so no decoder is asked to allocate what a flipped length claims.
        case flipHeaderBit
        /// Cut short: some to less than the 32-byte header, most somewhere in the payload.
        case truncate
        /// Every byte replaced by zero, same length (a block the disk lost and returned zeroed).
        case zeroFillWhole
        /// Up to 4 KiB of the payload zeroed, same length (one lost sector run).
        case zeroFillRange

        var description: String {
            switch self {
            case .flipPayloadBit: "bit flip (payload)"
            case .flipHeaderBit: "bit flip (header)"
            case .truncate: "truncation"
            case .zeroFillWhole: "zero-fill (whole file)"
            case .zeroFillRange: "zero-fill (range)"
            }
        }
    }

    /// The damage for the k-th object of a kind: mostly bit flips, some truncations and
    /// zero-fills; every kind gets every mode at least once.
    static func damage(forItem k: Int) -> Damage {
        // 10-slot cycle: 5 payload flips, 1 header flip, 2 truncations, 1 whole and 1 range zero-fill.
        let cycle: [Damage] = [.flipPayloadBit, .truncate, .zeroFillWhole, .flipHeaderBit, .zeroFillRange,
                               .flipPayloadBit, .flipPayloadBit, .truncate, .flipPayloadBit, .flipPayloadBit]
        return cycle[k % cycle.count]
    }

    /// Applies `damage` to the read-only (0444) object file at `path`; returns the new bytes.
    @discardableResult
    static func apply(_ damage: Damage, to path: String, rng: inout SeededRandom) throws -> [UInt8] {
        let before = try readFile(path)
        #expect(before.count > 64, "object \(path) is large enough to damage")
        var bytes = before
        switch damage {
        case .flipPayloadBit:
            let bit = 32 * 8 + Int(rng.next() % UInt64((bytes.count - 32) * 8))
            bytes[bit / 8] ^= UInt8(1) << UInt8(bit % 8)
        case .flipHeaderBit:
            // Magic (0-3), version (4), kind (5), compression (6), encryption (7), reserved (24-31).
            let candidates = [0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 28, 31]
            let byte = candidates[Int(rng.next() % UInt64(candidates.count))]
            bytes[byte] ^= UInt8(1) << UInt8(rng.next() % 8)
        case .truncate:
            // One in three ends inside the header, the others inside the payload.
            let keep = rng.next() % 3 == 0 ? Int(rng.next() % 32) : 32 + Int(rng.next() % UInt64(bytes.count - 32))
            bytes.removeSubrange(keep...)
        case .zeroFillWhole:
            bytes = [UInt8](repeating: 0, count: bytes.count)
        case .zeroFillRange:
            let length = min(4096, bytes.count - 32)
            let start = 32 + Int(rng.next() % UInt64(bytes.count - 32 - length + 1))
            for i in start..<start + length { bytes[i] = 0 }
        }
        #expect(bytes != before, "\(damage) changed \(path)")
        #expect(chmod(path, 0o644) == 0, "chmod \(path)")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)), "rewrite \(path)")
        #expect(chmod(path, 0o444) == 0)
        return bytes
    }

    struct Problem: Hashable, CustomStringConvertible {
        var kind: String
        var object: String
        var description: String { "\(kind) \(object)" }
    }

    @Test("check --read-data names exactly the 115 damaged objects (5 manifests, 10 indexes, 100 chunks); repair quarantines exactly them")
    func damageIsFoundExactlyAndRepaired() throws {
        let dir = try TempDir("bitrot")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm, chunkSize: 64 * KiB)
        let chunksPerDisk = 32
        let diskSize = chunksPerDisk * 64 * KiB

        // 20 VMs, one snapshot each, every disk dense random data: no chunk is shared.
        var snaps: [SnapshotEntry] = []
        var images: [String] = []
        for v in 0..<20 {
            let image = dir.file("vm\(v).raw")
            try E.denseDisk(image, size: diskSize, seed: 7_000 + UInt64(v))
            images.append(image)
            snaps.append(try E.backup(repo, vm: "vm\(v)", [.init("d", image)]))
        }
        var chunksOf: [[CairnCore.Digest]] = []
        var indexOf: [String] = []
        for s in snaps {
            let index = try E.index(repo, s)
            #expect(index.entries.count == chunksPerDisk && !index.entries.contains { $0.isZero })
            chunksOf.append(index.entries)
            indexOf.append(try E.disk(s).index)
        }
        let allChunks = chunksOf.flatMap { $0 }
        #expect(Set(allChunks).count == 20 * chunksPerDisk, "every chunk belongs to exactly one snapshot")
        #expect(Set(indexOf).count == 20 && Set(snaps.map(\.id)).count == 20)

        // Control: the undamaged repository reads clean.
        let clean = try CheckJob(repository: repo, readData: .all).run()
        #expect(clean.problems.isEmpty, "no false positives on a healthy repository: \(clean.problems.prefix(5))")
        #expect(clean.snapshots == 20 && clean.indexes == 20)
        #expect(clean.referencedChunks == 640 && clean.chunksRead == 640 && clean.storedChunks == 640)
        #expect(clean.unreferencedChunks == 0 && clean.unreferencedIndexes == 0)

        // Damage: manifests of snapshots 0-4, indexes of 5-14, 20 chunks of each of 15-19.
        var rng = SeededRandom(seed: 0xB17_207)
        var expected = Set<Problem>()
        var owner: [Problem: String] = [:]          // object -> the snapshot that lost it
        var damagedBytes: [String: [UInt8]] = [:]   // "namespace/name" -> bytes after damage
        var modes: [String: Int] = [:]
        func hit(_ kind: String, _ namespace: String, _ name: String, item: Int, snapshot: SnapshotEntry) throws {
            let mode = Self.damage(forItem: item)
            modes[mode.description, default: 0] += 1
            let path = repo.store.path(for: ObjectKey(namespace, name))
            damagedBytes["\(namespace)/\(name)"] = try Self.apply(mode, to: path, rng: &rng)
            let p = Problem(kind: kind, object: name)
            expected.insert(p)
            owner[p] = snapshot.id.hex
        }
        for (k, v) in (0..<5).enumerated() {
            try hit("snapshot", "snapshots", snaps[v].id.hex, item: k, snapshot: snaps[v])
        }
        for (k, v) in (5..<15).enumerated() {
            try hit("index", "indexes", indexOf[v], item: k, snapshot: snaps[v])
        }
        var k = 0
        for v in 15..<20 {
            var positions = Array(0..<chunksPerDisk)
            positions.shuffle(using: &rng)
            for p in positions.prefix(20).sorted() {
                try hit("chunk", "chunks", chunksOf[v][p].hex, item: k, snapshot: snaps[v])
                k += 1
            }
        }
        #expect(expected.count == 115, "5 manifests + 10 indexes + 100 chunks")
        #expect(modes.count == Damage.allCases.count, "every damage mode is used: \(modes)")
        #expect(modes[Damage.flipPayloadBit.description, default: 0] + modes[Damage.flipHeaderBit.description, default: 0] > 115 / 2,
                "most damage is bit flips: \(modes)")

        // Structural check (no data read): the 5 manifests and 10 indexes, no chunk.
        let quick = try CheckJob(repository: repo, readData: .none).run()
        let quickFound = Set(quick.problems.map { Problem(kind: $0.kind, object: $0.object) })
        #expect(quickFound == expected.filter { $0.kind != "chunk" },
                "structural check: missed \(expected.filter { $0.kind != "chunk" }.subtracting(quickFound)), extra \(quickFound.subtracting(expected))")

        // Full check: exactly the 115, all corrupt, each charged to the snapshot that lost it.
        let report = try CheckJob(repository: repo, readData: .all).run()
        let found = Set(report.problems.map { Problem(kind: $0.kind, object: $0.object) })
        let missed = expected.subtracting(found), extra = found.subtracting(expected)
        #expect(missed.isEmpty, "check missed \(missed.count) damaged object(s): \(missed.sorted { $0.object < $1.object })")
        #expect(extra.isEmpty, "check reported \(extra.count) healthy object(s): \(extra.sorted { $0.object < $1.object })")
        #expect(report.problems.count == 115, "each object reported once")
        for p in report.problems {
            let key = Problem(kind: p.kind, object: p.object)
            #expect(p.state == "corrupt", "\(key): state \(p.state): \(p.message)")
            #expect(p.snapshots == [owner[key] ?? "?"], "\(key) affects only its own snapshot: \(p.snapshots)")
            #expect(p.message.contains(p.object), "the message names the object: \(p.message)")
        }
        // What stays readable: snapshots 5-19; only 15-19's chunks are referenced (the indexes
        // of 5-14 cannot be read, so neither can the list of their chunks).
        #expect(report.snapshots == 15 && report.indexes == 5)
        #expect(report.referencedChunks == 5 * chunksPerDisk && report.chunksRead == 5 * chunksPerDisk)
        #expect(report.unreferencedChunks == 15 * chunksPerDisk)
        #expect(report.unreferencedIndexes == 5, "the indexes of the 5 unreadable manifests")

        // Repair: quarantine exactly the 115 objects, mark exactly 5-19 damaged.
        let repair = try RepairJob(repository: repo).run()
        let namespaceOf = ["snapshot": "snapshots", "index": "indexes", "chunk": "chunks"]
        let expectedQuarantine = Set(expected.map { "\(namespaceOf[$0.kind]!)/\($0.object)" })
        #expect(Set(repair.quarantined) == expectedQuarantine && repair.quarantined.count == 115,
                "quarantined: missed \(expectedQuarantine.subtracting(repair.quarantined).count), extra \(Set(repair.quarantined).subtracting(expectedQuarantine).count)")
        #expect(Set(repair.markedDamaged) == Set(snaps[5..<20].map(\.id.hex)) && repair.markedDamaged.count == 15,
                "snapshots 5-19 are marked damaged; 0-4 have no manifest left to mark")
        #expect(repair.forgotten.isEmpty && repair.healed.isEmpty && !repair.dryRun)
        #expect(repair.check.problems.count == 115)

        // On disk: every damaged object moved to quarantine/<ns>-<name> with its damaged bytes.
        for (object, bytes) in damagedBytes {
            let parts = object.split(separator: "/")
            let key = ObjectKey(String(parts[0]), String(parts[1]))
            #expect(!FileManager.default.fileExists(atPath: repo.store.path(for: key)), "\(object) left its place")
            let moved = dir.file("repo/quarantine/\(parts[0])-\(parts[1])")
            #expect(try readFile(moved) == bytes, "quarantine keeps the damaged bytes of \(object)")
        }
        #expect(try repo.store.list("quarantine").count == 115)

        // The marks list what each snapshot lost.
        let mark5 = try #require(try repo.mark(.damaged, snapshot: snaps[5].id))
        #expect(mark5.missing == ["index \(indexOf[5])"])
        let lost15 = expected.filter { $0.kind == "chunk" && owner[$0] == snaps[15].id.hex }.map { "chunk \($0.object)" }.sorted()
        #expect(lost15.count == 20)
        #expect(try repo.mark(.damaged, snapshot: snaps[15].id)?.missing == lost15)
        #expect(try repo.markedSnapshots(.damaged) == Set(snaps[5..<20].map(\.id.hex)))

        // After repair the same damage reads as missing objects, nothing is corrupt any more.
        let after = try CheckJob(repository: repo, readData: .all).run()
        #expect(after.snapshots == 15)
        #expect(after.problems.allSatisfy { $0.state == "missing" }, "\(after.problems.filter { $0.state != "missing" })")
        #expect(Set(after.problems.map { Problem(kind: $0.kind, object: $0.object) }) == expected.filter { $0.kind != "snapshot" })

        // Healing: backing up VM 15's disk again stores its 20 chunks again under the same ids;
        // repair clears its mark and the old snapshot restores byte-exact.
        let again = try E.backup(repo, vm: "vm15", [.init("d", images[15])])
        #expect(try E.disk(again).bytesNew == UInt64(20 * 64 * KiB))
        let healed = try RepairJob(repository: repo).run()
        #expect(healed.healed == [snaps[15].id.hex])
        #expect(healed.quarantined.isEmpty)
        #expect(Set(healed.markedDamaged) == Set(snaps[5..<20].map(\.id.hex)).subtracting([snaps[15].id.hex]))
        let out = dir.file("vm15.out")
        try E.restore(repo, snaps[15], to: out)
        #expect(try E.cmpEqual(images[15], out))
    }
}
