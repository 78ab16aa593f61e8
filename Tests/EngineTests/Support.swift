import CairnCore
import CairnTestSupport
import DiskFormats
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

let KiB = 1 << 10
let MiB = 1 << 20

/// Helpers shared by the engine tests: fixtures written with pwrite (holes stay holes), qemu
/// tools as referees, and thin wrappers around the engine's jobs.
enum E {
    static let password = "correct horse battery staple"

    // MARK: fixtures

    /// Creates a sparse raw file of `size` bytes and writes `segments` into it.
    static func writeSparse(_ path: String, size: Int, segments: [(offset: Int, bytes: [UInt8])]) throws {
        let f = try PosixFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
        try f.truncate(to: UInt64(size))
        for s in segments {
            precondition(s.offset + s.bytes.count <= size)
            try s.bytes.withUnsafeBytes { try f.pwrite($0, at: UInt64(s.offset)) }
        }
        try f.fsync()
    }

    /// A reproducible mixed disk: random runs, compressible runs, explicit (allocated) zero
    /// runs, holes everywhere else, data in the first and last byte.
    static func mixedDisk(_ path: String, size: Int, seed: UInt64, segments: Int = 30) throws {
        var rng = SeededRandom(seed: seed)
        var segs: [(offset: Int, bytes: [UInt8])] = []
        for i in 0..<segments {
            let length = Int.random(in: 1...min(size, 200_000), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            switch i % 3 {
            case 0: segs.append((offset, rng.bytes(length)))
            case 1: segs.append((offset, (0..<length).map { _ in UInt8(65 + Int(rng.next() % 4)) }))
            default: segs.append((offset, [UInt8](repeating: 0, count: length)))
            }
        }
        segs.append((0, [0xA5]))
        segs.append((size - 1, [0x5A]))
        try writeSparse(path, size: size, segments: segs)
    }

    /// A raw file of `size` random bytes (no holes at all).
    static func denseDisk(_ path: String, size: Int, seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        try writeSparse(path, size: size, segments: [(0, rng.bytes(size))])
    }

    @discardableResult
    static func qemuImg(_ args: [String]) throws -> Tool.Result { try Tool.run("qemu-img", args) }

    /// Runs qemu-io commands on an image and fails the test if qemu-io reports an error.
    static func qemuIO(_ path: String, format: String = "qcow2", _ commands: [String]) throws {
        var args = ["-f", format]
        for c in commands { args += ["-c", c] }
        args.append(path)
        let r = try Tool.run("qemu-io", args)
        #expect(!r.stdout.lowercased().contains("error") && !r.stderr.lowercased().contains("error"), "qemu-io: \(r.stdout) \(r.stderr)")
    }

    /// `qemu-img convert -O raw` of any image qemu can read (following its backing chain).
    static func referenceRaw(_ image: String, to out: String) throws {
        try qemuImg(["convert", "-O", "raw", image, out])
    }

    static func cmpEqual(_ a: String, _ b: String) throws -> Bool {
        try Tool.run("cmp", ["-s", a, b], check: false).status == 0
    }

    static func qemuCompare(_ a: String, _ fa: String, _ b: String, _ fb: String) throws -> Bool {
        try Tool.qemuImgCompare(a, b, formatA: fa, formatB: fb)
    }

    static func fileSize(_ path: String) throws -> UInt64 {
        let attrs = try FileManager.default.attributesOfItem(atPath: path)
        return (attrs[.size] as? NSNumber)?.uint64Value ?? 0
    }

    /// Bytes actually allocated to a file (st_blocks * 512).
    static func allocatedBytes(_ path: String) throws -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { throw CairnError.errno("stat", errno, path: path) }
        return UInt64(st.st_blocks) * 512
    }

    // MARK: repositories and jobs

    static func makeRepo(_ dir: TempDir, name: String = "repo", encryption: EncryptionAlgorithm = .none, chunkSize: Int = 64 * KiB) throws -> Repository {
        // A cheap scrypt cost keeps the tests fast; the CLI tests use the default.
        try Repository.initialize(path: dir.file(name), encryption: encryption, chunkSize: chunkSize,
                                  passphrase: encryption == .none ? nil : password, scryptN: 1 << 10)
    }

    static func reopen(_ repo: Repository) throws -> Repository {
        try Repository.open(path: repo.path) { password }
    }

    struct DiskSpec {
        var name: String
        var path: String
        var backing: [String] = []
        init(_ name: String, _ path: String, backing: [String] = []) {
            self.name = name; self.path = path; self.backing = backing
        }
    }

    @discardableResult
    static func backup(_ repo: Repository, vm: String = "vm", _ disks: [DiskSpec], workers: Int = 3) throws -> SnapshotEntry {
        let opened = try disks.map { d -> BackupDisk in
            let img = try ImageOpener.open(path: d.path, backing: d.backing)
            return BackupDisk(name: d.name, source: img.source, format: img.format.rawValue, path: d.path)
        }
        return try BackupJob(repository: repo, vm: vm, tags: [], disks: opened, workers: workers, toolVersion: "test").run()
    }

    @discardableResult
    /// `guest: false` backs up without looking at the guest (no partition table or file-system
    /// probes), for tests that count every byte the pipeline reads.
    static func backup(_ repo: Repository, vm: String = "vm", source: any BlockSource, name: String = "disk", workers: Int = 3,
                       guest: Bool = true) throws -> SnapshotEntry {
        try BackupJob(repository: repo, vm: vm, tags: [], disks: [BackupDisk(name: name, source: source, format: "raw", path: source.name,
                                                                             skipFreeSpace: guest, catalog: guest)],
                      workers: workers, toolVersion: "test").run()
    }

    static func disk(_ snap: SnapshotEntry, _ name: String? = nil) throws -> Manifest.Disk {
        let d = name.map { n in snap.manifest.disks.first { $0.name == n } } ?? snap.manifest.disks.first
        return try #require(d, "snapshot \(snap.id.short) has no disk \(name ?? "(first)")")
    }

    enum Target { case newRaw, qcow2, inPlace }

    static func restore(_ repo: Repository, _ snap: SnapshotEntry, disk name: String? = nil, to path: String, as target: Target = .newRaw,
                        workers: Int = 3) throws {
        let d = try disk(snap, name)
        let sink: any BlockSink
        switch target {
        case .newRaw: sink = try FileBlockSink(path: path, size: d.virtualSize, create: true)
        case .inPlace: sink = try FileBlockSink(path: path, size: d.virtualSize, create: false)
        case .qcow2: sink = try QCOW2Writer(file: PosixFile(path: path, flags: O_RDWR | O_CREAT | O_EXCL), virtualSize: d.virtualSize)
        }
        try RestoreJob(repository: repo, snapshot: snap, disk: d, sink: sink, workers: workers).run()
    }

    static func index(_ repo: Repository, _ snap: SnapshotEntry, disk name: String? = nil) throws -> DiskIndex {
        let d = try disk(snap, name)
        let parsed = CairnCore.Digest(hex: d.index)
        let id = try #require(parsed, "index id \(d.index)")
        return try repo.loadIndex(id, codec: repo.makeCodec())
    }

    /// Every regular file under `root`, recursively.
    static func allFiles(under root: String) throws -> [String] {
        var out: [String] = []
        guard let e = FileManager.default.enumerator(atPath: root) else { return [] }
        while let rel = e.nextObject() as? String {
            let p = (root as NSString).appendingPathComponent(rel)
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: p, isDirectory: &isDir), !isDir.boolValue { out.append(p) }
        }
        return out
    }

    /// Files under `root` whose bytes contain `needle`.
    static func filesContaining(_ needle: [UInt8], under root: String) throws -> [String] {
        try allFiles(under: root).filter { path in
            let bytes = try readFile(path)
            return bytes.withUnsafeBytes { hay in
                needle.withUnsafeBytes { n in contains(hay, n) }
            }
        }
    }

    /// Whether `hay` contains `needle` (memchr for the first byte, memcmp for the rest).
    static func contains(_ hay: UnsafeRawBufferPointer, _ needle: UnsafeRawBufferPointer) -> Bool {
        guard needle.count > 0 else { return true }
        guard hay.count >= needle.count, let base = hay.baseAddress, let n = needle.baseAddress else { return false }
        let first = Int32(needle[0])
        var pos = 0
        let last = hay.count - needle.count
        while pos <= last {
            guard let hit = memchr(base + pos, first, last - pos + 1) else { return false }
            let at = base.distance(to: UnsafeRawPointer(hit))
            if memcmp(base + at, n, needle.count) == 0 { return true }
            pos = at + 1
        }
        return false
    }

    /// Chunk positions touched by byte ranges.
    static func chunks(touchedBy ranges: [Range<Int>], chunkSize: Int) -> Set<Int> {
        var s = Set<Int>()
        for r in ranges where !r.isEmpty {
            for i in (r.lowerBound / chunkSize)...((r.upperBound - 1) / chunkSize) { s.insert(i) }
        }
        return s
    }
}

/// A block source that records what is read from it (to prove ranges are never read).
final class CountingSource: BlockSource, Sendable {
    let base: any BlockSource
    let bytesRead = Atomic<UInt64>(0)
    let reads = Mutex<[Range<UInt64>]>([])

    init(_ base: any BlockSource) { self.base = base }

    var size: UInt64 { base.size }
    var name: String { base.name }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        bytesRead.add(UInt64(buffer.count), ordering: .relaxed)
        reads.withLock { $0.append(offset..<offset + UInt64(buffer.count)) }
        try base.read(into: buffer, at: offset)
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] { try base.extents(in: range) }
}
