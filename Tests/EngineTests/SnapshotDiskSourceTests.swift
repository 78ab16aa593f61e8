import CairnCore
import CairnTestSupport
import Foundation
import Synchronization
import Testing

@testable import Engine
import Repository

@Suite("Snapshot disk as a block source")
struct SnapshotDiskSourceTests {
    /// A backed-up disk (data, zero runs, an odd tail) read back at random offsets and
    /// lengths, sequentially (read-ahead on), and from eight threads at once (shared fetches):
    /// always the original bytes; zero chunks are zero extents.
    @Test("random, sequential and concurrent reads return the original bytes; zero chunks are zero extents")
    func readsMatch() throws {
        let dir = try TempDir("snapdisk")
        var rng = SeededRandom(seed: 8)
        let size = 3 * MiB + 777
        var bytes = rng.bytes(size)
        for i in (MiB)..<(MiB + 256 * KiB) { bytes[i] = 0 }
        let path = dir.file("disk.raw")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let repo = try E.makeRepo(dir, encryption: .aes256gcm, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, source: try FileBlockSource(path: path), name: "d", guest: false)
        let source = try SnapshotDiskSource(repository: repo, snapshot: snap, disk: E.disk(snap), cacheChunks: 4, readAhead: 3)
        #expect(source.size == UInt64(size))
        for _ in 0..<300 {
            let o = Int.random(in: 0..<size, using: &rng), n = Int.random(in: 0...min(size - o, 200_000), using: &rng)
            #expect(try source.readBytes(at: UInt64(o), count: n) == Array(bytes[o..<o + n]))
        }
        var seq: [UInt8] = []
        var pos = 0
        while pos < size {
            let n = min(100_000, size - pos)
            seq += try source.readBytes(at: UInt64(pos), count: n)
            pos += n
        }
        #expect(seq == bytes)
        let zeros = try source.extents(in: 0..<UInt64(size)).filter { $0.kind == .zero }
        #expect(zeros == [Extent(offset: UInt64(MiB), length: UInt64(256 * KiB), kind: .zero)])

        let failures = Atomic<Int>(0)
        let original = bytes
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            var r = SeededRandom(seed: UInt64(100 + t))
            for _ in 0..<100 {
                let o = Int.random(in: 0..<size, using: &r), n = Int.random(in: 0...min(size - o, 150_000), using: &r)
                if (try? source.readBytes(at: UInt64(o), count: n)) != Array(original[o..<o + n]) { failures.add(1, ordering: .relaxed) }
            }
        }
        #expect(failures.load(ordering: .relaxed) == 0)
    }

    @Test("a missing chunk is an error naming the disk and offset, for every reader waiting on it")
    func missingChunk() throws {
        let dir = try TempDir("snapdisk-missing")
        var rng = SeededRandom(seed: 9)
        let path = dir.file("disk.raw")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(rng.bytes(256 * KiB))))
        let repo = try E.makeRepo(dir, chunkSize: 64 * KiB)
        let snap = try E.backup(repo, source: try FileBlockSource(path: path), name: "d", guest: false)
        let source = try SnapshotDiskSource(repository: repo, snapshot: snap, disk: E.disk(snap))
        try repo.store.delete(Repository.chunkKey(source.index.entries[2]))
        #expect { _ = try source.readBytes(at: 2 * 64 * 1024 + 5, count: 10) } throws: { e in
            let m = (e as? CairnError)?.message ?? ""
            return m.contains("at offset 131072") && m.contains("is missing")
        }
        #expect(try source.readBytes(at: 0, count: 10).count == 10, "other chunks still read")
    }
}
