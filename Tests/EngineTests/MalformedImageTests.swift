import CairnCore
import CairnTestSupport
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Damaged qcow2 images go through `ImageOpener` (and the backup pipeline) and must come out
/// as a `CairnError` naming the file and the problem, never as a crash or a bogus snapshot.
@Suite("Malformed images")
struct MalformedImageTests {
    // MARK: fixture surgery

    static func putBE64(_ v: UInt64, at offset: Int, in path: String) throws {
        try writeBytes(withUnsafeBytes(of: v.bigEndian) { Array($0) }, to: path, at: UInt64(offset))
    }

    static func putBE32(_ v: UInt32, at offset: Int, in path: String) throws {
        try writeBytes(withUnsafeBytes(of: v.bigEndian) { Array($0) }, to: path, at: UInt64(offset))
    }

    static func getBE64(_ path: String, at offset: Int) throws -> UInt64 {
        let b = try readFile(path)
        return b[offset..<offset + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }

    static func truncate(_ path: String, to size: Int) throws {
        #expect(Glibc.truncate(path, off_t(size)) == 0)
    }

    /// A valid 4 MiB qcow2 v3 (64 KiB clusters) with data in its first MiB.
    static func validImage(_ dir: TempDir, _ name: String = "good.qcow2", compressed: Bool = false) throws -> String {
        let path = dir.file(name)
        if compressed {
            let raw = dir.file("\(name).raw")
            try E.writeSparse(raw, size: 4 * MiB, segments: [(0, Array(repeating: UInt8(ascii: "q"), count: 1 * MiB))])
            try E.qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", raw, path])
        } else {
            try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64K", path, "4M"])
            try E.qemuIO(path, ["write -P 0x5a 0 1M"])
        }
        return path
    }

    /// Offset of the first L2 table and its first entry.
    static func firstL2(_ path: String) throws -> (l2: UInt64, entry: UInt64) {
        let l1 = try getBE64(path, at: 40)
        let l2 = try getBE64(path, at: Int(l1)) & 0x00FF_FFFF_FFFF_FE00
        #expect(l2 != 0)
        return (l2, try getBE64(path, at: Int(l2)))
    }

    static func expectOpenFails(_ path: String, _ codes: Set<CairnError.Code>, _ keywords: [String], format: ImageFormat? = nil,
                                backing: [String] = [], sourceLocation: SourceLocation = #_sourceLocation) {
        let e = #expect(throws: CairnError.self, sourceLocation: sourceLocation) {
            _ = try ImageOpener.open(path: path, format: format, backing: backing)
        }
        guard let e else { return }
        #expect(codes.contains(e.code), "code \(e.code): \(e)", sourceLocation: sourceLocation)
        #expect(e.description.contains(path) || e.description.contains((path as NSString).lastPathComponent),
                "the message names the file: \(e)", sourceLocation: sourceLocation)
        for k in keywords {
            #expect(e.description.lowercased().contains(k.lowercased()), "message mentions '\(k)': \(e)", sourceLocation: sourceLocation)
        }
    }

    // MARK: header and table problems found when opening

    struct OpenCase: Sendable, CustomTestStringConvertible {
        var name: String
        var code: CairnError.Code
        var keywords: [String]
        var damage: @Sendable (String) throws -> Void
        var testDescription: String { name }
    }

    static let openCases: [OpenCase] = [
        .init(name: "truncated inside the v2 header", code: .malformedImage, keywords: ["truncated"]) { try truncate($0, to: 48) },
        .init(name: "truncated inside the v3 header", code: .malformedImage, keywords: ["truncated"]) { try truncate($0, to: 100) },
        .init(name: "truncated after the first cluster (L1 table gone)", code: .malformedImage, keywords: ["L1", "past the end"]) {
            try truncate($0, to: 64 * KiB)
        },
        .init(name: "L1 offset past the end", code: .malformedImage, keywords: ["L1", "past the end"]) {
            try putBE64(0x40_0000_0000, at: 40, in: $0)
        },
        .init(name: "L1 offset not cluster aligned", code: .malformedImage, keywords: ["L1", "aligned"]) {
            try putBE64(try getBE64($0, at: 40) + 8, at: 40, in: $0)
        },
        .init(name: "huge virtual size the L1 table does not cover", code: .malformedImage, keywords: ["size"]) {
            try putBE64(1 << 60, at: 24, in: $0)
        },
        .init(name: "virtual size 2^64-1", code: .malformedImage, keywords: ["size"]) { try putBE64(UInt64.max, at: 24, in: $0) },
        .init(name: "l1_size 2^32-1", code: .malformedImage, keywords: ["l1_size"]) { try putBE32(UInt32.max, at: 36, in: $0) },
        .init(name: "cluster_bits 40", code: .unsupported, keywords: ["cluster_bits"]) { try putBE32(40, at: 20, in: $0) },
        .init(name: "cluster_bits 5", code: .malformedImage, keywords: ["cluster_bits"]) { try putBE32(5, at: 20, in: $0) },
        .init(name: "version 7", code: .unsupported, keywords: ["version"]) { try putBE32(7, at: 4, in: $0) },
        .init(name: "encrypted (crypt_method 1)", code: .unsupported, keywords: ["encrypt"]) { try putBE32(1, at: 32, in: $0) },
        .init(name: "unknown incompatible feature bit", code: .unsupported, keywords: ["incompatible"]) {
            try putBE64(1 << 40, at: 72, in: $0)
        },
    ]

    @Test("malformed qcow2 headers are refused by ImageOpener with a clear error", arguments: openCases)
    func malformedHeader(_ c: OpenCase) throws {
        let dir = try TempDir("malformed")
        let path = try Self.validImage(dir)
        _ = try ImageOpener.open(path: path)  // valid before the damage
        try c.damage(path)
        Self.expectOpenFails(path, [c.code], c.keywords)
    }

    @Test("wrong use of formats and backing files is refused")
    func usageErrors() throws {
        let dir = try TempDir("malformed-usage")
        let good = try Self.validImage(dir)
        let raw = dir.file("plain.raw")
        try E.mixedDisk(raw, size: 1 * MiB, seed: 60)
        // A raw file forced to qcow2.
        Self.expectOpenFails(raw, [.malformedImage], ["qcow2"], format: .qcow2)
        // Raw images have no backing file.
        Self.expectOpenFails(raw, [.usage], ["backing"], backing: [good])
        // A backing file given for an image that records none.
        Self.expectOpenFails(good, [.usage], ["backing"], backing: [raw])
        // A recorded backing file is never opened on its own.
        let top = dir.file("top.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-b", good, "-F", "qcow2", top, "4M"])
        Self.expectOpenFails(top, [.usage], ["backing"])
        // A missing file.
        let e = #expect(throws: CairnError.self) { _ = try ImageOpener.open(path: dir.file("nope.qcow2")) }
        #expect(e?.code == .notFound)
        // A file shorter than the magic is raw, not an error.
        let tiny = dir.file("tiny")
        try E.writeSparse(tiny, size: 3, segments: [(0, [0x51, 0x46, 0x49])])
        #expect(try ImageOpener.open(path: tiny).format == .raw)
    }

    @Test("qcow2 features Cairn does not read are refused as unsupported")
    func unsupportedFeatures() throws {
        let dir = try TempDir("malformed-unsupported")
        let ext = dir.file("ext.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, "4M"])
        Self.expectOpenFails(ext, [.unsupported], ["extended"])
        let dataFile = dir.file("data.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("data.bin"))", dataFile, "4M"])
        Self.expectOpenFails(dataFile, [.unsupported], ["external data file"])
    }

    // MARK: problems found while reading

    struct ReadCase: Sendable, CustomTestStringConvertible {
        var name: String
        var compressed: Bool
        var keywords: [String]
        var damage: @Sendable (String) throws -> Void
        var testDescription: String { name }
    }

    static let readCases: [ReadCase] = [
        .init(name: "L2 entry pointing past the end of the file", compressed: false, keywords: ["past the end"]) { p in
            let (l2, _) = try firstL2(p)
            try putBE64((1 << 63) | (1 << 40), at: Int(l2), in: p)
        },
        .init(name: "L2 entry not cluster aligned", compressed: false, keywords: ["aligned"]) { p in
            let (l2, entry) = try firstL2(p)
            try putBE64(entry + 512, at: Int(l2) + 8, in: p)
        },
        .init(name: "L1 entry pointing to an L2 table past the end", compressed: false, keywords: ["L2", "past the end"]) { p in
            let l1 = try getBE64(p, at: 40)
            try putBE64((1 << 63) | (1 << 40), at: Int(l1), in: p)
        },
        .init(name: "compressed cluster that does not inflate", compressed: true, keywords: ["compressed"]) { p in
            let (_, entry) = try firstL2(p)
            #expect(entry & (1 << 62) != 0, "the first cluster is compressed")
            let host = entry & ((1 << 54) - 1)  // 64 KiB clusters: x = 62 - (16 - 8)
            try writeBytes([UInt8](repeating: 0xFF, count: 64), to: p, at: host)
        },
    ]

    @Test("table entries and data that are bad fail the backup cleanly, and no snapshot is written", arguments: readCases)
    func malformedData(_ c: ReadCase) throws {
        let dir = try TempDir("malformed-read")
        let path = try Self.validImage(dir, compressed: c.compressed)
        try c.damage(path)
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let e = #expect(throws: CairnError.self) { try E.backup(repo, [.init("vda", path)]) }
        #expect(e?.code == .malformedImage, "\(String(describing: e))")
        for k in c.keywords {
            #expect(e?.description.lowercased().contains(k.lowercased()) == true, "message mentions '\(k)': \(String(describing: e))")
        }
        #expect(e?.description.contains(path) == true, "the message names the image: \(String(describing: e))")
        let list = try repo.listSnapshots(codec: repo.makeCodec())
        #expect(list.snapshots.isEmpty && list.failures.isEmpty)
        #expect(try CheckJob(repository: repo, readData: .all).run().ok)
        #expect(try repo.store.list("locks").isEmpty, "the lock is released after a failed backup")
    }

    @Test("random garbage after a valid magic never crashes", arguments: 0..<8)
    func fuzzedHeaders(seed: Int) throws {
        let dir = try TempDir("malformed-fuzz")
        let path = try Self.validImage(dir)
        var rng = SeededRandom(seed: UInt64(1000 + seed))
        // Scramble 1-16 random bytes of the header's first 112 bytes (keeping the magic).
        for _ in 0..<Int.random(in: 1...16, using: &rng) {
            let at = Int.random(in: 4..<112, using: &rng)
            try writeBytes([UInt8.random(in: 0...255, using: &rng)], to: path, at: UInt64(at))
        }
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        do {
            let img = try ImageOpener.open(path: path)
            // Whatever passed validation must also be readable or fail with an error, and only
            // sizes that are cheap to walk are backed up.
            guard img.source.size <= UInt64(64 * MiB) else { return }
            _ = try E.backup(repo, source: img.source, name: "fuzz")
            let out = dir.file("out.raw")
            let snap = try #require(try repo.listSnapshots(codec: repo.makeCodec()).snapshots.first)
            try E.restore(repo, snap, to: out)
            #expect(try E.fileSize(out) == img.source.size)
        } catch let e as CairnError {
            #expect([.malformedImage, .unsupported, .usage].contains(e.code), "\(e)")
            #expect(!e.message.isEmpty)
        }
    }
}
