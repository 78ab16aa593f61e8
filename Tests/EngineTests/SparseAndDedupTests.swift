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

@Suite("Sparse reading and deduplication")
struct SparseAndDedupTests {
    @Test("1 GiB sparse raw with 3 MiB of data: holes are never read")
    func bigSparseRaw() throws {
        let dir = try TempDir("sparse-1g")
        let src = dir.file("big.raw")
        let size = 1 << 30
        var rng = SeededRandom(seed: 10)
        let segments: [(offset: Int, bytes: [UInt8])] = [
            (0, rng.bytes(1 * MiB)),                           // one aligned chunk
            (512 * MiB + 300 * KiB, rng.bytes(1 * MiB)),       // straddles two chunks
            (size - 1 * MiB, rng.bytes(1 * MiB)),              // the last chunk
        ]
        try E.writeSparse(src, size: size, segments: segments)
        #expect(try E.allocatedBytes(src) <= UInt64(4 * MiB), "the fixture is sparse")

        let repo = try E.makeRepo(dir, chunkSize: 1 * MiB)
        let source = CountingSource(try ImageOpener.open(path: src).source)
        let snap = try E.backup(repo, source: source, name: "big", guest: false)   // every byte read is counted
        let d = try E.disk(snap)
        #expect(d.virtualSize == UInt64(size))
        #expect(d.chunks == 1024)
        #expect(d.bytesRead <= UInt64(4 * MiB), "bytesRead \(d.bytesRead)")
        #expect(d.bytesZero >= UInt64(size - 4 * MiB), "bytesZero \(d.bytesZero)")
        #expect(d.bytesNew == d.bytesRead, "every chunk read holds fresh random data")
        #expect(d.bytesNew + d.bytesDeduplicated + d.bytesZero == d.virtualSize)
        #expect(source.bytesRead.load(ordering: .relaxed) <= UInt64(4 * MiB),
                "the source was asked for \(source.bytesRead.load(ordering: .relaxed)) bytes")
        for r in source.reads.withLock({ $0 }) {
            #expect(!r.overlaps(UInt64(8 * MiB)..<UInt64(512 * MiB)), "read \(r) inside a hole")
        }

        let index = try E.index(repo, snap)
        #expect(index.entries.filter { !$0.isZero }.count == 4)

        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.fileSize(out) == UInt64(size))
        #expect(try E.allocatedBytes(out) <= UInt64(6 * MiB), "restore keeps holes as holes")
        #expect(try E.qemuCompare(src, "raw", out, "raw"))
    }

    @Test("zero 4 KiB blocks inside data chunks stay holes in a restored raw file")
    func zeroBlocksInsideChunks() throws {
        let dir = try TempDir("sparse-inner")
        let src = dir.file("inner.raw")
        var rng = SeededRandom(seed: 12)
        // 4 MiB fully written: in every 64 KiB, 3 data blocks of 4 KiB, the rest explicit zeros;
        // plus one unaligned 100-byte run and a 1-byte run that straddle block boundaries.
        var bytes = [UInt8](repeating: 0, count: 4 * MiB)
        for c in stride(from: 0, to: bytes.count, by: 64 * KiB) {
            for b in [0, 5, 11] { bytes.replaceSubrange(c + b * 4096..<c + (b + 1) * 4096, with: rng.bytes(4096)) }
        }
        bytes.replaceSubrange(2 * MiB + 4050..<2 * MiB + 4150, with: rng.bytes(100))
        bytes[3 * MiB + 8191] = 0x7F
        try E.writeSparse(src, size: bytes.count, segments: [(0, bytes)])
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("d", src)])
        let out = dir.file("out.raw")
        try E.restore(repo, snap, to: out)
        #expect(try readFile(out) == bytes)
        let dataBlocks = 64 * 3 + 2 + 1   // 3 per chunk, the 100-byte run spans 2 blocks, the lone byte 1
        let allocated = try E.allocatedBytes(out)
        #expect(allocated <= UInt64(dataBlocks * 4096), "allocated \(allocated)")
        #expect(try E.qemuCompare(src, "raw", out, "raw"))
    }

    @Test("1 GiB qcow2 with 3 MiB of data and zero clusters: unallocated and zero clusters are never read")
    func bigSparseQCOW2() throws {
        let dir = try TempDir("sparse-1g-q")
        let img = dir.file("big.qcow2")
        try E.qemuImg(["create", "-q", "-f", "qcow2", img, "1G"])
        try E.qemuIO(img, ["write -P 0x31 0 1M", "write -P 0x32 300M 2M", "write -z 600M 64M", "write -z 1000M 24M"])
        let repo = try E.makeRepo(dir, chunkSize: 1 * MiB)
        let source = CountingSource(try ImageOpener.open(path: img).source)
        let snap = try E.backup(repo, source: source, name: "big", guest: false)   // every byte read is counted
        let d = try E.disk(snap)
        #expect(d.bytesRead <= UInt64(4 * MiB))
        #expect(d.bytesZero >= UInt64((1 << 30) - 4 * MiB))
        #expect(source.bytesRead.load(ordering: .relaxed) <= UInt64(4 * MiB))
        // The 0x32 run is two identical chunks: one is new, the other deduplicated.
        #expect(d.bytesNew == UInt64(2 * MiB))
        #expect(d.bytesDeduplicated == UInt64(1 * MiB))
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.qemuCompare(img, "qcow2", out, "raw"))
    }

    @Test("two clones of one template: the second backup stores only the changed chunks")
    func clonesOfATemplate() throws {
        let dir = try TempDir("clones")
        let chunk = 64 * KiB
        let size = 24 * MiB
        var rng = SeededRandom(seed: 20)
        // The template: 16 MiB of data in four runs, holes elsewhere.
        let template: [(offset: Int, bytes: [UInt8])] = [
            (0, rng.bytes(6 * MiB)), (8 * MiB, rng.bytes(4 * MiB)), (14 * MiB, rng.bytes(4 * MiB)), (20 * MiB, rng.bytes(2 * MiB)),
        ]
        // Clone A: the template plus its own small change.
        let aChange = (offset: 3 * MiB + 1000, bytes: rng.bytes(10_000))
        let a = dir.file("a.raw")
        try E.writeSparse(a, size: size, segments: template + [aChange])
        // Clone B = A changed in place at unaligned offsets (one change inside a hole).
        let bChanges: [(offset: Int, bytes: [UInt8])] = [
            (1 * MiB + 12345, rng.bytes(1 * MiB)),
            (9 * MiB - 100, rng.bytes(200)),          // straddles a chunk boundary
            (15 * MiB, rng.bytes(2 * MiB + 7)),
            (19 * MiB + 4096, rng.bytes(4096)),       // inside a hole of A
        ]
        let b = dir.file("b.raw")
        try E.writeSparse(b, size: size, segments: template + [aChange] + bChanges)
        let changed = E.chunks(touchedBy: bChanges.map { $0.offset..<$0.offset + $0.bytes.count }, chunkSize: chunk)

        let repo = try E.makeRepo(dir, chunkSize: chunk)
        let snapA = try E.backup(repo, vm: "clone-a", [.init("vda", a)])
        let dA = try E.disk(snapA)
        let dataA = UInt64(16 * MiB)  // A's data chunks (all distinct random data)
        #expect(dA.bytesNew == dataA)
        #expect(dA.bytesDeduplicated == 0)
        #expect(dA.bytesZero == UInt64(size) - dataA)

        let snapB = try E.backup(repo, vm: "clone-b", [.init("vda", b)])
        let dB = try E.disk(snapB)
        let changedBytes = UInt64(changed.count * chunk)
        #expect(dB.bytesNew <= changedBytes, "bytesNew \(dB.bytesNew) > \(changed.count) changed chunks")
        #expect(dB.bytesNew == changedBytes, "every changed chunk holds new random data")
        // B's data = A's data plus the chunk that was a hole in A.
        let dataB = dataA + UInt64(chunk)
        #expect(dB.bytesDeduplicated == dataB - changedBytes, "bytesDeduplicated \(dB.bytesDeduplicated)")
        #expect(dB.bytesZero == UInt64(size) - dataB)
        #expect(dB.bytesRead == dataB)
        #expect(dB.bytesStored > 0 && dB.bytesStored < dA.bytesStored)

        // The indexes agree: B differs from A exactly at the changed positions.
        let iA = try E.index(repo, snapA), iB = try E.index(repo, snapB)
        let differing = Set(iA.entries.indices.filter { iA.entries[$0] != iB.entries[$0] })
        #expect(differing == changed)

        // Stats count each unique chunk once.
        let stats = try RepositoryStats.compute(repository: repo)
        #expect(stats.snapshots == 2)
        #expect(stats.logicalBytes == UInt64(2 * size))
        #expect(stats.referencedDataBytes == dataA + dataB)
        #expect(stats.uniqueDataBytes == dataA + changedBytes)
        #expect(stats.chunks == Int((dataA + changedBytes) / UInt64(chunk)))
        let expectedRatio = Double(dataA + dataB) / Double(dataA + changedBytes)
        #expect(abs(stats.deduplicationRatio - expectedRatio) < 0.011, "ratio \(stats.deduplicationRatio), expected \(expectedRatio)")

        // A third backup of B stores nothing.
        let again = try E.backup(repo, vm: "clone-b", [.init("vda", b)])
        #expect(try E.disk(again).bytesNew == 0)
        #expect(try E.disk(again).bytesDeduplicated == dataB)
        #expect(try E.disk(again).index == dB.index, "identical disks give identical index objects")

        let outA = dir.file("a.out"), outB = dir.file("b.out")
        try E.restore(repo, snapA, to: outA)
        try E.restore(repo, snapB, to: outB)
        #expect(try E.cmpEqual(a, outA))
        #expect(try E.cmpEqual(b, outB))
    }

    @Test("change tracking: only chunks in the changed ranges are read; the rest reuse the base index")
    func changeTracking() throws {
        let dir = try TempDir("cbt")
        let chunk = 64 * KiB
        let size = 4 * MiB + 4096
        let disk = dir.file("v.raw")
        try E.denseDisk(disk, size: size, seed: 30)
        let repo = try E.makeRepo(dir, chunkSize: chunk)
        let s1 = try E.backup(repo, vm: "cbt", [.init("vda", disk)])
        let base = try E.index(repo, s1)

        // Change the disk, and report exactly those ranges as changed (as a dirty bitmap would).
        var rng = SeededRandom(seed: 31)
        let changes: [(offset: Int, bytes: [UInt8])] = [(100_000, rng.bytes(5000)), (2 * MiB - 10, rng.bytes(20)), (size - 100, rng.bytes(100))]
        for c in changes { try writeBytes(c.bytes, to: disk, at: UInt64(c.offset)) }
        let ranges = changes.map { UInt64($0.offset)..<UInt64($0.offset + $0.bytes.count) }
        let touched = E.chunks(touchedBy: changes.map { $0.offset..<$0.offset + $0.bytes.count }, chunkSize: chunk)

        let source = CountingSource(try FileBlockSource(path: disk))
        var cbtDisk = BackupDisk(name: "vda", source: source, format: "raw", path: disk, changedRanges: ranges, base: base,
                                 skipFreeSpace: false, catalog: false)
        cbtDisk.cbtSample = 0 // exact read counts: no verification sample
        let job = BackupJob(repository: repo, vm: "cbt", tags: [], disks: [cbtDisk], workers: 3, toolVersion: "test")
        let s2 = try job.run()
        let d = try E.disk(s2)
        let touchedBytes = touched.reduce(UInt64(0)) { $0 + UInt64(base.length(ofChunk: $1)) }
        #expect(source.bytesRead.load(ordering: .relaxed) == touchedBytes, "only the changed chunks are read")
        #expect(d.bytesRead == touchedBytes)
        #expect(d.bytesNew == touchedBytes)
        #expect(d.bytesDeduplicated == UInt64(size) - touchedBytes, "unchanged chunks are reused from the base")
        let i2 = try E.index(repo, s2)
        #expect(Set(i2.entries.indices.filter { i2.entries[$0] != base.entries[$0] }) == touched)
        let out = dir.file("out.raw")
        try E.restore(repo, s2, to: out)
        #expect(try E.cmpEqual(disk, out))

        // A base whose size differs is not trusted: everything is read.
        let other = dir.file("other.raw")
        try E.denseDisk(other, size: size + 65536, seed: 32)
        let full = CountingSource(try FileBlockSource(path: other))
        _ = try BackupJob(repository: repo, vm: "cbt", tags: [],
                          disks: [BackupDisk(name: "vda", source: full, format: "raw", path: other, changedRanges: [], base: base,
                                                     skipFreeSpace: false, catalog: false)],
                          workers: 3, toolVersion: "test").run()
        #expect(full.bytesRead.load(ordering: .relaxed) == UInt64(size + 65536))

        // A base chunk that vanished from the repository is an error, not a silent hole.
        let unchanged = try #require((0..<base.entries.count).first { !touched.contains($0) })
        let victim = base.entries[unchanged]
        #expect(unlink(repo.store.path(for: Repository.chunkKey(victim))) == 0)
        let e = #expect(throws: CairnError.self) {
            try BackupJob(repository: repo, vm: "cbt", tags: [],
                          disks: [BackupDisk(name: "vda", source: try FileBlockSource(path: disk), format: "raw", path: disk,
                                             changedRanges: ranges, base: base)],
                          workers: 3, toolVersion: "test").run()
        }
        #expect(e?.code == .corrupt)
        #expect(e?.message.contains(victim.hex) == true)
        #expect(try repo.listSnapshots(codec: repo.makeCodec()).snapshots.count == 3)
    }

    @Test("change tracking that misses a write is caught by the sample: everything is read, the index is right")
    func lyingChangeTracking() throws {
        let dir = try TempDir("cbt-lie")
        let chunk = 64 * KiB
        let size = 2 * MiB
        let disk = dir.file("v.raw")
        try E.denseDisk(disk, size: size, seed: 40)
        let repo = try E.makeRepo(dir, chunkSize: chunk)
        let s1 = try E.backup(repo, vm: "lie", [.init("vda", disk)])
        let base = try E.index(repo, s1)
        var rng = SeededRandom(seed: 41)
        try writeBytes(rng.bytes(100), to: disk, at: 10_000)      // reported
        try writeBytes(rng.bytes(100), to: disk, at: 1_500_000)   // not reported: the "bitmap" lies
        let source = CountingSource(try FileBlockSource(path: disk))
        var d = BackupDisk(name: "vda", source: source, format: "raw", path: disk, changedRanges: [10_000..<10_100], base: base,
                           skipFreeSpace: false, catalog: false)
        d.cbtSample = 1
        d.readMode = "cbt"
        let job = BackupJob(repository: repo, vm: "lie", tags: [], disks: [d], workers: 2, toolVersion: "test")
        let s2 = try job.run()
        let m = try E.disk(s2)
        #expect(m.readMode == "hash-scan")
        #expect(m.readNote?.contains("chunk \(1_500_000 / chunk)") == true, "\(m.readNote ?? "")")
        #expect(job.cbtChecks["vda"]?.mismatch?.position == 1_500_000 / chunk)
        // The index is what a full read gives.
        let full = try E.backup(repo, vm: "lie-full", [.init("vda", disk)])
        #expect(try E.index(repo, s2).entries == E.index(repo, full).entries)
    }

    @Test("identical chunks inside one disk and across disks of one snapshot are stored once")
    func dedupInsideASnapshot() throws {
        let dir = try TempDir("dedup-inside")
        var rng = SeededRandom(seed: 21)
        let block = rng.bytes(64 * KiB)
        let a = dir.file("a.raw"), b = dir.file("b.raw")
        // a: the same block at 8 aligned positions; b: the same block twice.
        try E.writeSparse(a, size: 1 * MiB, segments: (0..<8).map { ($0 * 2 * 64 * KiB, block) })
        try E.writeSparse(b, size: 512 * KiB, segments: [(0, block), (256 * KiB, block)])
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, [.init("a", a), .init("b", b)], workers: 4)
        let da = try E.disk(snap, "a"), db = try E.disk(snap, "b")
        #expect(da.bytesNew == UInt64(64 * KiB), "racing workers must store a chunk once")
        #expect(da.bytesDeduplicated == UInt64(7 * 64 * KiB))
        #expect(db.bytesNew == 0)
        #expect(db.bytesDeduplicated == UInt64(2 * 64 * KiB))
        #expect(try repo.listChunkIDs().count == 1)
        let out = dir.file("a.out")
        try E.restore(repo, snap, disk: "a", to: out)
        #expect(try E.cmpEqual(a, out))
    }
}
