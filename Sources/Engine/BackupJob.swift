import CairnCore
import Foundation
import RepositoryFormat
import Repository
import Storage
import Synchronization

/// One disk to back up: a name inside the snapshot and the source to read.
package struct BackupDisk: Sendable {
    package var name: String
    package var source: any BlockSource
    package var format: String
    package var path: String
    /// Change tracking: the ranges changed since `base` was taken (from a dirty bitmap). Chunks
    /// outside them reuse `base`'s entries unread. Nil: read every allocated chunk and let
    /// content hashes find what changed.
    package var changedRanges: [Range<UInt64>]?
    package var base: DiskIndex?
    /// Treat blocks the guest file systems mark free as zero (docs/FILE-RESTORE.md).
    package var skipFreeSpace: Bool
    /// Walk the guest file systems and store a file catalog for `cairn find`.
    package var catalog: Bool
    /// Trust but verify change tracking: this fraction (0...1) of the chunks `changedRanges`
    /// calls unchanged is read anyway and compared with `base`; any difference abandons change
    /// tracking for this disk and reads everything (`readMode` becomes `hash-scan`).
    package var cbtSample: Double = 0.01
    /// Recorded in the manifest (live backups): how the disk is read and why, the base
    /// snapshot, the dirty bitmap that tracks changes from this snapshot on.
    package var readMode: String?
    package var readNote: String?
    package var baseSnapshot: String?
    package var cbtBitmap: String?
    package var cbtGeneration: Int?
    package var cbtNode: String?
    /// Bytes the source was asked for in total (an NBD client's count, including guest
    /// inspection and CBT samples); the manifest's `bytesRead` when set.
    package var bytesRequested: (@Sendable () -> UInt64)?

    package init(name: String, source: any BlockSource, format: String, path: String,
                 changedRanges: [Range<UInt64>]? = nil, base: DiskIndex? = nil, skipFreeSpace: Bool = true, catalog: Bool = true) {
        self.name = name; self.source = source; self.format = format; self.path = path
        self.changedRanges = changedRanges; self.base = base
        self.skipFreeSpace = skipFreeSpace; self.catalog = catalog
    }
}

/// What the pipeline reads for one disk.
///
/// Built from the source's allocation map and, when the source tracks changes, the ranges
/// changed since the base snapshot: chunks with no data are zero entries (never read, never
/// hashed), chunks outside every changed range reuse the base index's entry, all others are
/// read. The pipeline does not care where these ranges came from.
package struct ReadPlan: Sendable {
    package var chunkCount: Int
    /// Chunk positions to read, ascending.
    package var toRead: [Int]
    /// Entries known without reading (zero chunks, reused base entries), ascending.
    package var known: [(position: Int, id: CairnCore.Digest)]

    /// The most index entries one disk may have (32 bytes each in memory and in the index:
    /// 512 MiB). With the default 512 KiB chunks that is an 8 TiB disk; larger disks need a
    /// repository with larger chunks.
    package static let maxEntries = 1 << 24

    package static func make(source: any BlockSource, chunkSize: Int, changed: [Range<UInt64>]? = nil, base: DiskIndex? = nil) throws -> ReadPlan {
        let size = source.size
        let cs = UInt64(chunkSize)
        let count = size / cs + (size % cs == 0 ? 0 : 1)
        guard count <= UInt64(maxEntries) else {
            throw CairnError(.unsupported, "disk of \(ByteCount.format(size)) needs \(count) index entries at chunk size \(ByteCount.format(cs)); at most \(maxEntries) are supported",
                             path: source.name, hint: "back it up into a repository made with a larger --chunk-size (up to 8M)")
        }
        let n = Int(count)
        // Chunk positions touched by `r`, clamped to the disk (ranges may come from outside).
        func positions(_ r: Range<UInt64>) -> ClosedRange<Int>? {
            let lo = r.lowerBound, hi = min(r.upperBound, size)
            guard lo < hi else { return nil }
            return Int(lo / cs)...Int((hi - 1) / cs)
        }
        var hasData = [Bool](repeating: false, count: n)
        for e in try source.allExtents() where e.kind.needsRead {
            if let p = positions(e.range) { for i in p { hasData[i] = true } }
        }
        var isChanged: [Bool]?
        if let changed, let base, base.chunkSize == chunkSize, base.virtualSize == size, base.entries.count == n {
            var c = [Bool](repeating: false, count: n)
            for r in changed { if let p = positions(r) { for i in p { c[i] = true } } }
            isChanged = c
        }
        var toRead: [Int] = []
        var known: [(position: Int, id: CairnCore.Digest)] = []
        for i in 0..<n {
            if !hasData[i] { known.append((i, .zero)); continue }
            if let isChanged, !isChanged[i], let base { known.append((i, base.entries[i])); continue }
            toRead.append(i)
        }
        return ReadPlan(chunkCount: n, toRead: toRead, known: known)
    }
}

/// The backup job: reads disks through the pipeline into one new snapshot.
///
/// Per chunk: read into a worker-owned buffer -> all-zero check -> id (SHA-256 / HMAC) ->
/// already stored? -> zstd -> AES-256-GCM -> atomic put. Workers are threads (2 per core by
/// default) with their own buffers, so peak memory is workers x a few chunk sizes whatever the
/// disk size. After every chunk is durable: indexes, then the manifest.
package final class BackupJob: @unchecked Sendable {
    package let repository: Repository
    package let vm: String
    package let tags: [String]
    package let disks: [BackupDisk]
    package let progress: any ProgressReporter
    package let cancel: CancellationToken
    package let workers: Int
    package let toolVersion: String
    /// What the guest inspection could not do (a file system it could not read, ...), set by `run`.
    package private(set) var warnings: [String] = []
    /// Snapshot-level facts of live backups (docs/FORMAT.md).
    package var consistency = "crash"
    package var source: String?
    package var vmConfig: String?
    /// The ids of the chunks stored, when the caller lists them itself (a live backup lists them
    /// while QEMU prepares the point in time); nil: `run` lists them.
    package var knownChunks: (@Sendable () throws -> Set<CairnCore.Digest>)?
    /// Per disk, what the CBT sample found (set by `run`): nil when not sampled.
    package private(set) var cbtChecks: [String: CBTCheck] = [:]

    package init(repository: Repository, vm: String, tags: [String], disks: [BackupDisk], progress: any ProgressReporter = SilentProgress(),
                 cancel: CancellationToken = CancellationToken(), workers: Int = defaultWorkerCount(), toolVersion: String) {
        self.repository = repository; self.vm = vm; self.tags = tags; self.disks = disks
        self.progress = progress; self.cancel = cancel; self.workers = workers; self.toolVersion = toolVersion
    }

    package func run() throws -> SnapshotEntry {
        let started = Date()
        let lock = try repository.lock(exclusive: false, job: "backup \(vm)")
        defer { lock.release() }

        // Healing (docs/VERIFY.md): chunks a failed verification found bad are not trusted as
        // stored, so they are read and stored again, and a change-tracking base that uses one
        // is not used (its disk is read whole).
        let bad = try repository.badChunks()
        let known = ChunkSet(try (knownChunks?() ?? repository.listChunkIDs()).subtracting(bad))
        let disks = bad.isEmpty ? self.disks : self.disks.map { d in
            guard let base = d.base, base.entries.contains(where: { bad.contains($0) }) else { return d }
            var full = d
            full.base = nil
            full.changedRanges = nil
            if full.readMode != nil {
                full.readMode = "hash-scan"
                full.readNote = (full.readNote.map { $0 + "; " } ?? "") + "the base snapshot uses a chunk a failed verification found bad: every allocated block read"
            }
            return full
        }
        Trace.mark("backup: locked, \(repository.chunkSize) B chunks, chunk list read")
        let total = disks.reduce(UInt64(0)) { $0 + $1.source.size }
        let counters = Counters()
        let ticker = ProgressTicker { [progress, counters] in
            progress.report(ProgressSnapshot(phase: "backup", doneBytes: counters.done.load(ordering: .relaxed), totalBytes: total,
                                             readBytes: counters.read.load(ordering: .relaxed), newBytes: counters.new.load(ordering: .relaxed),
                                             elapsedSeconds: Date().timeIntervalSince(started)))
        }
        var manifestDisks: [Manifest.Disk] = []
        var indexes: [DiskIndex] = []
        var catalogIndexes: [DiskIndex?] = []
        do {
            defer { ticker.stop() }
            for var disk in disks {
                let before = (counters.read.load(ordering: .relaxed), counters.new.load(ordering: .relaxed),
                              counters.dedup.load(ordering: .relaxed), counters.zero.load(ordering: .relaxed),
                              counters.stored.load(ordering: .relaxed))
                // The guest's file systems: free blocks become zero extents, files a catalog.
                // (Both off: the guest is not looked at, not even its partition table.)
                let guest = disk.skipFreeSpace || disk.catalog
                    ? GuestInspection.inspect(disk.source, diskName: disk.name, freeSpace: disk.skipFreeSpace)
                    : GuestInspection(freeRanges: [], volumes: [], warnings: [])
                warnings += guest.warnings
                // The catalog walk reads only file system metadata, mostly waiting on the disk
                // when the cache is cold: it runs beside the data pipeline, not before it.
                let diskName = disk.name
                let catalogWalk = disk.catalog ? guest.layout.map { layout in
                    Background { GuestInspection.walkCatalog(layout, diskName: diskName) }
                } : nil
                var freeBytes: UInt64 = 0
                if disk.skipFreeSpace && !guest.freeRanges.isEmpty {
                    let masked = MaskedBlockSource(base: disk.source, masked: guest.freeRanges)
                    freeBytes = masked.maskedBytes
                    disk.source = masked
                }
                Trace.mark("backup: disk \(disk.name) inspected, \(freeBytes) bytes free")
                let stored = Result { try backupDisk(disk, known: known, counters: counters) }
                // Waited for even when the pipeline failed: the walk reads the disk's source.
                let walked = try catalogWalk?.get()
                warnings += walked?.warnings ?? []
                let (index, check) = try stored.get()
                Trace.mark("backup: disk \(disk.name) read, \(walked?.catalog?.entries.count ?? 0) files catalogued")
                if let check {
                    cbtChecks[disk.name] = check
                    if check.mismatch != nil {
                        disk.readMode = "hash-scan"
                        warnings.append("disk \(disk.name): \(check.description)")
                    }
                    disk.readNote = (disk.readNote.map { $0 + "; " } ?? "") + check.description
                }
                indexes.append(index)
                let catalogIndex = try walked?.catalog.map { try storeBlob($0.encode(), known: known, counters: counters) }
                catalogIndexes.append(catalogIndex)
                var recorded = Manifest.Disk(
                    name: disk.name, virtualSize: disk.source.size, sourceFormat: disk.format, sourcePath: disk.path, index: "",
                    chunks: index.entries.count,
                    bytesRead: disk.bytesRequested?() ?? (counters.read.load(ordering: .relaxed) - before.0),
                    bytesNew: counters.new.load(ordering: .relaxed) - before.1,
                    bytesDeduplicated: counters.dedup.load(ordering: .relaxed) - before.2,
                    bytesZero: counters.zero.load(ordering: .relaxed) - before.3,
                    bytesStored: counters.stored.load(ordering: .relaxed) - before.4,
                    skipFreeSpace: disk.skipFreeSpace, bytesFree: disk.skipFreeSpace ? freeBytes : nil,
                    volumes: disk.skipFreeSpace || disk.catalog ? guest.volumes : nil)
                recorded.readMode = disk.readMode
                recorded.readNote = disk.readNote
                recorded.base = disk.readMode == "cbt" ? disk.baseSnapshot : nil
                recorded.cbtBitmap = disk.cbtBitmap
                recorded.cbtGeneration = disk.cbtGeneration
                recorded.cbtNode = disk.cbtNode
                manifestDisks.append(recorded)
            }
        }
        Trace.mark("backup: chunks stored")
        try cancel.check()
        // Every chunk, data and name, durable (the store's group commits drained, directories
        // synced) before any index refers to it.
        try repository.store.barrier()
        let codec = repository.makeCodec()
        for (i, index) in indexes.enumerated() {
            manifestDisks[i].index = try repository.writeIndex(index, codec: codec).hex
            if let c = catalogIndexes[i] { manifestDisks[i].catalog = try repository.writeIndex(c, codec: codec).hex }
        }
        try repository.store.barrier()
        try cancel.check()
        var manifest = Manifest(vm: vm, time: timestamp(started), host: hostName(), tags: tags, toolVersion: toolVersion,
                                chunkSize: repository.chunkSize, consistency: consistency, disks: manifestDisks)
        manifest.source = source
        manifest.vmConfig = vmConfig
        let id = try repository.writeManifest(manifest, codec: codec)
        Trace.mark("backup: indexes and manifest written")
        progress.finish(ProgressSnapshot(phase: "backup", doneBytes: total, totalBytes: total,
                                         readBytes: counters.read.load(ordering: .relaxed), newBytes: counters.new.load(ordering: .relaxed),
                                         elapsedSeconds: Date().timeIntervalSince(started)))
        return SnapshotEntry(id: id, manifest: manifest)
    }

    /// Stores `bytes` as chunks (deduplicated like disk data) and returns the index over them.
    /// Chunks of a blob are not counted in the disk's byte counters except `stored`.
    private func storeBlob(_ bytes: [UInt8], known: ChunkSet, counters: Counters) throws -> DiskIndex {
        let chunkSize = repository.chunkSize
        let codec = repository.makeCodec()
        var entries: [CairnCore.Digest] = []
        var at = 0
        try bytes.withUnsafeBytes { raw in
            while at < raw.count {
                let piece = UnsafeRawBufferPointer(rebasing: raw[at..<min(at + chunkSize, raw.count)])
                at += piece.count
                if isAllZero(piece) { entries.append(.zero); continue }
                let id = codec.id(of: piece)
                entries.append(id)
                guard known.claim(id) else { continue }
                do {
                    let sealed = try codec.seal(kind: .chunk, id: id, plaintext: piece)
                    try repository.putChunk(id, sealed: sealed)
                    counters.stored.add(UInt64(sealed.count), ordering: .relaxed)
                } catch {
                    known.forget(id)
                    throw error
                }
            }
        }
        return DiskIndex(virtualSize: UInt64(bytes.count), chunkSize: chunkSize, entries: entries)
    }

    private func backupDisk(_ disk: BackupDisk, known: ChunkSet, counters: Counters) throws -> (DiskIndex, CBTCheck?) {
        let chunkSize = repository.chunkSize
        let source = disk.source
        var plan = try ReadPlan.make(source: source, chunkSize: chunkSize, changed: disk.changedRanges, base: disk.base)
        var check: CBTCheck?
        if disk.changedRanges != nil, disk.base != nil, disk.cbtSample > 0 {
            let c = try CBTCheck.run(source: source, plan: plan, chunkSize: chunkSize, fraction: disk.cbtSample,
                                     makeCodec: { [repository] in repository.makeCodec() }, cancel: cancel)
            counters.read.add(c.bytesRead, ordering: .relaxed)
            check = c
            if c.mismatch != nil {
                // The bitmap missed a write: nothing it says can be trusted this run.
                plan = try ReadPlan.make(source: source, chunkSize: chunkSize)
            }
        }
        Trace.mark("backup: disk \(disk.name) planned, \(plan.toRead.count) of \(plan.chunkCount) chunks to read")
        let slots = SharedSlots<CairnCore.Digest>(count: plan.chunkCount, initial: .zero)
        let template = DiskIndex(virtualSize: source.size, chunkSize: chunkSize, entries: [])
        for (i, d) in plan.known {
            slots[i] = d
            let len = UInt64(template.length(ofChunk: i))
            counters.done.add(len, ordering: .relaxed)
            if d.isZero {
                counters.zero.add(len, ordering: .relaxed)
            } else {
                // Reused from the base index without reading: the chunk must still exist.
                guard known.contains(d) else {
                    throw CairnError(.corrupt, "chunk \(d.hex) of the change-tracking base is missing from the repository",
                                     hint: "run a full backup (without change tracking)")
                }
                counters.dedup.add(len, ordering: .relaxed)
            }
        }
        let next = Atomic<Int>(0)
        let repository = self.repository
        let cancel = self.cancel
        let toRead = plan.toRead
        let prefetchDistance = workers * 2
        try runWorkers(count: min(workers, max(1, toRead.count)), stop: cancel) { _ in
            let codec = repository.makeCodec()
            let buffer = allocateBuffer(chunkSize)
            defer { buffer.deallocate() }
            while true {
                try cancel.check()
                let k = next.add(1, ordering: .relaxed).oldValue
                if k >= toRead.count { break }
                let i = toRead[k]
                // Keep the source's I/O a few chunks ahead of the workers.
                let ahead = k + prefetchDistance
                if ahead < toRead.count {
                    let o = UInt64(toRead[ahead]) * UInt64(chunkSize)
                    source.prefetch(o..<o + UInt64(chunkSize))
                }
                let offset = UInt64(i) * UInt64(chunkSize)
                let len = template.length(ofChunk: i)
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<len])
                do {
                    try source.read(into: chunk, at: offset)
                } catch var e as CairnError {
                    if e.path == nil { e.path = disk.path }
                    e.message = "reading disk \(disk.name): " + e.message
                    throw e
                }
                counters.read.add(UInt64(len), ordering: .relaxed)
                defer { counters.done.add(UInt64(len), ordering: .relaxed) }
                if isAllZero(UnsafeRawBufferPointer(chunk)) {
                    slots[i] = .zero
                    counters.zero.add(UInt64(len), ordering: .relaxed)
                    continue
                }
                let id = codec.id(of: UnsafeRawBufferPointer(chunk))
                slots[i] = id
                let isNew = known.claim(id)
                if !isNew {
                    counters.dedup.add(UInt64(len), ordering: .relaxed)
                    continue
                }
                do {
                    let sealed = try codec.seal(kind: .chunk, id: id, plaintext: UnsafeRawBufferPointer(chunk))
                    try repository.putChunk(id, sealed: sealed)
                    counters.stored.add(UInt64(sealed.count), ordering: .relaxed)
                } catch {
                    known.forget(id)
                    throw error
                }
                counters.new.add(UInt64(len), ordering: .relaxed)
            }
        }
        return (DiskIndex(virtualSize: source.size, chunkSize: chunkSize, entries: slots.array), check)
    }
}
