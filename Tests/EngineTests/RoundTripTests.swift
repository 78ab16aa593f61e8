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

/// Byte-exact backup -> restore round trips; `cmp` and `qemu-img compare` are the referees.
@Suite("Round trips")
struct RoundTripTests {
    /// Not a multiple of any chunk size (nor of 64 KiB clusters), but of 512 (qcow2 sizes are).
    static let oddSize = 5 * MiB + 3 * 4096 + 512

    @Test("raw sparse disk with holes, zero runs and a partial last chunk", arguments: [64 * KiB, 1 * MiB])
    func rawSparse(chunkSize: Int) throws {
        let dir = try TempDir("rt-sparse")
        let src = dir.file("sparse.raw")
        try E.mixedDisk(src, size: Self.oddSize, seed: 1)
        // A guaranteed 2 MiB hole, so whole chunks are unallocated even with 1 MiB chunks.
        #expect(try PosixFile(path: src, flags: O_RDWR).punchHole(at: UInt64(2 * MiB), length: UInt64(2 * MiB)))
        // The fixture really has holes (otherwise this would not test them).
        #expect(try E.allocatedBytes(src) < UInt64(Self.oddSize))

        let repo = try E.makeRepo(dir, chunkSize: chunkSize)
        let snap = try E.backup(repo, [.init("sda", src)])
        let d = try E.disk(snap)
        #expect(d.virtualSize == UInt64(Self.oddSize))
        #expect(d.sourceFormat == "raw")
        #expect(d.chunks == (Self.oddSize + chunkSize - 1) / chunkSize)
        #expect(d.bytesZero > 0, "holes must be counted as zero")
        #expect(d.bytesNew + d.bytesDeduplicated + d.bytesZero == d.virtualSize, "every chunk is new, deduplicated or zero: \(d)")

        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.fileSize(out) == UInt64(Self.oddSize))
        #expect(try E.cmpEqual(src, out), "cmp: restored raw differs from the source")
        #expect(try E.qemuCompare(src, "raw", out, "raw"))
        // Zero chunks were not written: the restored file stays sparse.
        #expect(try E.allocatedBytes(out) < UInt64(Self.oddSize))
    }

    @Test("raw dense disk (random data everywhere), size not a multiple of the chunk size")
    func rawDense() throws {
        let dir = try TempDir("rt-dense")
        let src = dir.file("dense.raw")
        try E.denseDisk(src, size: Self.oddSize, seed: 2)
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("sda", src)])
        let d = try E.disk(snap)
        #expect(d.bytesRead == UInt64(Self.oddSize))
        #expect(d.bytesNew == UInt64(Self.oddSize))
        #expect(d.bytesZero == 0)
        // Random data does not compress: stored bytes are at least the data (plus headers).
        #expect(d.bytesStored >= d.bytesNew)

        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(src, out))
        #expect(try E.qemuCompare(src, "raw", out, "raw"))
    }

    struct QCOWCase: Sendable, CustomTestStringConvertible {
        var compat: String
        var cluster: String
        var compression: String?
        var chunkSize: Int
        var testDescription: String {
            "qcow2 compat=\(compat) cluster=\(cluster)\(compression.map { " compressed(\($0))" } ?? "") chunk=\(chunkSize / KiB)K"
        }
    }

    static let qcowCases: [QCOWCase] = [
        .init(compat: "0.10", cluster: "4K", compression: nil, chunkSize: 64 * KiB),
        .init(compat: "0.10", cluster: "64K", compression: nil, chunkSize: 256 * KiB),
        .init(compat: "0.10", cluster: "2M", compression: nil, chunkSize: 64 * KiB),
        .init(compat: "1.1", cluster: "4K", compression: nil, chunkSize: 256 * KiB),
        .init(compat: "1.1", cluster: "64K", compression: nil, chunkSize: 64 * KiB),
        .init(compat: "1.1", cluster: "2M", compression: nil, chunkSize: 1 * MiB),
        .init(compat: "0.10", cluster: "64K", compression: "zlib", chunkSize: 64 * KiB),
        .init(compat: "1.1", cluster: "64K", compression: "zlib", chunkSize: 256 * KiB),
        .init(compat: "1.1", cluster: "4K", compression: "zstd", chunkSize: 64 * KiB),
        .init(compat: "1.1", cluster: "2M", compression: "zstd", chunkSize: 256 * KiB),
    ]

    @Test("qcow2 made by qemu-img convert", arguments: qcowCases)
    func qcow2(_ c: QCOWCase) throws {
        let dir = try TempDir("rt-qcow2")
        let raw = dir.file("src.raw")
        try E.mixedDisk(raw, size: Self.oddSize, seed: 3)
        let img = dir.file("src.qcow2")
        var opts = "compat=\(c.compat),cluster_size=\(c.cluster)"
        if c.compression == "zstd" { opts += ",compression_type=zstd" }
        var args = ["convert", "-f", "raw", "-O", "qcow2", "-o", opts]
        if c.compression != nil { args.append("-c") }
        try E.qemuImg(args + [raw, img])

        // The fixture is what the case claims.
        let info = try JSONSerialization.jsonObject(with: E.qemuImg(["info", "--output=json", img]).stdoutData) as? [String: Any]
        let specific = (info?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        #expect(specific?["compat"] as? String == c.compat)
        if let comp = c.compression {
            if c.compat == "1.1" { #expect(specific?["compression-type"] as? String == comp) }
            let plain = dir.file("plain.qcow2")
            try E.qemuImg(["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=\(c.compat),cluster_size=\(c.cluster)", raw, plain])
            #expect(try E.fileSize(img) < E.fileSize(plain), "the -c image holds compressed clusters")
        }

        let repo = try E.makeRepo(dir, chunkSize: c.chunkSize)
        let snap = try E.backup(repo, [.init("vda", img)])
        let d = try E.disk(snap)
        #expect(d.sourceFormat == "qcow2")
        #expect(d.virtualSize == UInt64(Self.oddSize))
        #expect(d.bytesNew + d.bytesDeduplicated + d.bytesZero == d.virtualSize)

        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(raw, out), "cmp: restore of \(c.testDescription) differs from the original raw")
        #expect(try E.qemuCompare(img, "qcow2", out, "raw"), "qemu-img compare: restore differs from the qcow2 source")
    }

    @Test("qcow2 v3 zero clusters (qemu-io write -z) read as zeros and are never read")
    func zeroClusters() throws {
        let dir = try TempDir("rt-zero")
        let img = dir.file("z.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=64K", img, "6M"])
        try E.qemuIO(img, [
            "write -P 0x11 0 2M",
            "write -z 512K 1M",           // zero clusters over allocated data
            "write -z 3M 1M",             // zero clusters over nothing
            "write -P 0x22 4100K 100K",   // unaligned data run
            "write -z -u 4164K 64K",      // zero (unmapped) in the middle of it
        ])
        let map = try E.qemuImg(["map", "--output=json", img]).stdout
        #expect(map.contains("\"zero\": true"), "the fixture has zero clusters: \(map)")

        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let source = CountingSource(try ImageOpener.open(path: img).source)
        let snap = try E.backup(repo, source: source, name: "z")
        let d = try E.disk(snap)
        // Data: [0, 512K) and [1536K, 2M) = 1 MiB, and the 100K run minus the 64K zero = at most 3 chunks.
        let bound = UInt64(1 * MiB + 3 * 64 * KiB)
        #expect(d.bytesRead <= bound, "zero clusters must not be read: bytesRead \(d.bytesRead)")
        #expect(source.bytesRead.load(ordering: .relaxed) <= bound, "the source saw \(source.bytesRead.load(ordering: .relaxed)) bytes of reads")
        for r in source.reads.withLock({ $0 }) {
            #expect(!r.overlaps(UInt64(3 * MiB)..<UInt64(4 * MiB)), "read \(r) inside the zero clusters at 3M")
            #expect(!r.overlaps(UInt64(512 * KiB)..<UInt64(1536 * KiB)), "read \(r) inside the zero clusters at 512K")
        }

        let ref = dir.file("ref.raw")
        try E.referenceRaw(img, to: ref)
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(ref, out))
        #expect(try E.qemuCompare(img, "qcow2", out, "raw"))
    }

    @Test("explicit backing chain base.qcow2 <- top.qcow2 (top larger, zero clusters masking the base)")
    func backingChain() throws {
        let dir = try TempDir("rt-chain")
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64K", base, "8M"])
        try E.qemuIO(base, ["write -P 0xb1 0 3M", "write -P 0xb2 5M 2M", "write -P 0xb3 8128K 64K"])
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=32K", "-b", base, "-F", "qcow2", top, "\(10 * MiB + 4096)"])
        try E.qemuIO(top, [
            "write -P 0xc1 1M 512K",        // overrides base data
            "write -z 2M 512K",             // zeros over base data (must not show the base)
            "write -P 0xc2 5500K 4K",       // small unaligned override
            "write -P 0xc3 9M 100K",        // beyond the end of the base
        ])
        let ref = dir.file("ref.raw")
        try E.referenceRaw(top, to: ref)

        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("vda", top, backing: [base])])
        let d = try E.disk(snap)
        #expect(d.virtualSize == UInt64(10 * MiB + 4096))
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(ref, out), "restore differs from qemu-img convert -O raw top.qcow2")
        #expect(try E.qemuCompare(top, "qcow2", out, "raw"))
    }

    @Test("three-level chain raw <- qcow2 <- qcow2 given nearest first")
    func threeLevelChain() throws {
        let dir = try TempDir("rt-chain3")
        let base = dir.file("base.raw"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try E.mixedDisk(base, size: 4 * MiB, seed: 4)
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid, "4M"])
        try E.qemuIO(mid, ["write -P 0x44 100K 1M", "write -z 2M 64K"])
        try E.qemuImg(["create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, "4M"])
        try E.qemuIO(top, ["write -P 0x55 700K 64K", "write -P 0x66 3M 10K"])
        let ref = dir.file("ref.raw")
        try E.referenceRaw(top, to: ref)

        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("vda", top, backing: [mid, base])])
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(ref, out))
    }

    @Test("restore to qcow2 passes qemu-img check and compares identical", arguments: ["raw", "qcow2-zstd"])
    func restoreToQCOW2(sourceKind: String) throws {
        let dir = try TempDir("rt-toqcow2")
        let raw = dir.file("src.raw")
        try E.mixedDisk(raw, size: Self.oddSize, seed: 5)
        var src = raw, fmt = "raw"
        if sourceKind == "qcow2-zstd" {
            src = dir.file("src.qcow2")
            fmt = "qcow2"
            try E.qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw, src])
        }
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("vda", src)])
        let out = dir.file("restored.qcow2")
        try E.restore(repo, snap, to: out, as: .qcow2)

        let check = try Tool.run("qemu-img", ["check", "-f", "qcow2", out], check: false)
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)")
        let info = try JSONSerialization.jsonObject(with: E.qemuImg(["info", "--output=json", "-f", "qcow2", out]).stdoutData) as? [String: Any]
        #expect((info?["virtual-size"] as? NSNumber)?.intValue == Self.oddSize)
        #expect(try E.qemuCompare(src, fmt, out, "qcow2"), "qemu-img compare: restored qcow2 differs from the source")
        // Zero ranges are not allocated in the restored image.
        #expect(try E.fileSize(out) < UInt64(Self.oddSize))
        let back = dir.file("back.raw")
        try E.referenceRaw(out, to: back)
        #expect(try E.cmpEqual(raw, back))
    }

    @Test("restore onto an existing file in place (garbage-filled, larger, smaller) gives identical content",
          arguments: [0, 3 * MiB, -2 * MiB])
    func restoreInPlace(sizeDelta: Int) throws {
        let dir = try TempDir("rt-inplace")
        let src = dir.file("src.raw")
        try E.mixedDisk(src, size: Self.oddSize, seed: 6)
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("vda", src)])

        let target = dir.file("existing.raw")
        try E.denseDisk(target, size: Self.oddSize + sizeDelta, seed: 99)  // garbage everywhere
        #expect(try !E.cmpEqual(src, target))
        try E.restore(repo, snap, to: target, as: .inPlace)
        #expect(try E.fileSize(target) == UInt64(Self.oddSize))
        #expect(try E.cmpEqual(src, target), "in-place restore left garbage behind")
        #expect(try E.qemuCompare(src, "raw", target, "raw"))
    }

    @Test("tiny disks: 0 bytes, 1 byte, 1 MiB + 100 bytes (to raw and to qcow2)", arguments: [0, 1, 1 * MiB + 100])
    func tinyDisks(size: Int) throws {
        let dir = try TempDir("rt-tiny")
        let src = dir.file("tiny.raw")
        var rng = SeededRandom(seed: UInt64(size) + 11)
        try E.writeSparse(src, size: size, segments: size == 0 ? [] : [(0, rng.bytes(size))])
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("t", src)])
        let d = try E.disk(snap)
        #expect(d.virtualSize == UInt64(size))
        #expect(d.chunks == (size + 64 * KiB - 1) / (64 * KiB))
        let out = dir.file("out.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.fileSize(out) == UInt64(size))
        #expect(try E.cmpEqual(src, out))
        let q = dir.file("out.qcow2")
        try E.restore(repo, snap, to: q, as: .qcow2)
        #expect(try Tool.run("qemu-img", ["check", "-q", "-f", "qcow2", q], check: false).status == 0)
        // qcow2 sizes are multiples of 512: the image is the disk padded with zeros.
        let back = dir.file("back.raw")
        try E.referenceRaw(q, to: back)
        #expect(try E.fileSize(back) == UInt64((size + 511) / 512 * 512))
        let restored = try readFile(back)
        #expect(Array(restored.prefix(size)) == (try readFile(src)))
        #expect(restored.dropFirst(size).allSatisfy { $0 == 0 })
    }

    @Test("qcow2 with an internal snapshot: the active state is backed up")
    func internalSnapshot() throws {
        let dir = try TempDir("rt-intsnap")
        let img = dir.file("s.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", img, "4M"])
        try E.qemuIO(img, ["write -P 0x71 0 2M"])
        try E.qemuImg(["snapshot", "-c", "before", img])
        try E.qemuIO(img, ["write -P 0x72 1M 2M", "write -z 0 64K"])
        let ref = dir.file("ref.raw")
        try E.referenceRaw(img, to: ref)
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("vda", img)])
        let out = dir.file("out.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(ref, out), "the active L1 table, not the internal snapshot, is what is read")
    }

    @Test("several disks in one snapshot restore independently")
    func multiDisk() throws {
        let dir = try TempDir("rt-multi")
        let a = dir.file("a.raw"), b = dir.file("b.raw"), bq = dir.file("b.qcow2")
        try E.mixedDisk(a, size: 3 * MiB, seed: 7)
        try E.mixedDisk(b, size: 2 * MiB + 512, seed: 8)
        try E.qemuImg(["convert", "-f", "raw", "-O", "qcow2", b, bq])
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("sda", a), .init("sdb", bq)])
        #expect(snap.manifest.disks.map(\.name) == ["sda", "sdb"])
        let oa = dir.file("oa.raw"), ob = dir.file("ob.raw")
        try E.restore(repo, snap, disk: "sdb", to: ob)
        try E.restore(repo, snap, disk: "sda", to: oa)
        #expect(try E.cmpEqual(a, oa))
        #expect(try E.cmpEqual(b, ob))
        // A reopened repository (fresh process view) lists the same snapshot.
        let again = try E.reopen(repo)
        let list = try again.listSnapshots(codec: again.makeCodec())
        #expect(list.failures.isEmpty)
        #expect(list.snapshots.map(\.id) == [snap.id])
    }
}
