import CairnCore
import Foundation
import GuestFS
import RepositoryFormat
import Repository
import Storage
import Synchronization

/// What a sandboxed boot of a snapshot showed (the boot level of `cairn verify`).
package struct BootOutcome: Sendable {
    package var passed: Bool
    package var reason: String
    /// Files kept as proof, e.g. "screenshot.png", "serial.log" (stored with the record,
    /// docs/FORMAT.md "Verification records": at most 16 files, 16 MiB together).
    package var evidence: [(name: String, bytes: [UInt8])]

    package init(passed: Bool, reason: String, evidence: [(name: String, bytes: [UInt8])] = []) {
        self.passed = passed
        self.reason = reason
        self.evidence = evidence
    }
}

/// Verifies snapshots (docs/VERIFY.md) and stores a `VerificationRecord` for each.
///
/// Levels are cumulative: `data` reads every chunk a snapshot references (disk indexes and
/// file catalogs), `filesystem` adds a walk of every guest file system and its native checker,
/// `boot` adds a sandboxed boot through the `boot` closure. A failed level stops the ones above
/// it (recorded as skipped). Runs under a shared lock, so gc cannot sweep chunks while they
/// are being verified.
package final class VerifyJob: @unchecked Sendable {
    package let repository: Repository
    package let level: VerifyLevel
    /// Fraction of a snapshot's distinct chunks the data level reads (nil: all).
    package let sample: Double?
    /// Run e2fsck, xfs_repair, fsck.fat, ntfsfix where installed (filesystem level).
    package let nativeCheckers: Bool
    package let checkerTimeout: TimeInterval
    package let boot: ((SnapshotEntry) throws -> BootOutcome)?
    package let progress: any ProgressReporter
    package let cancel: CancellationToken
    package let workers: Int
    package let toolVersion: String

    /// Chunks read in this run: good ones are not read again for the next snapshot, bad ones
    /// keep their error.
    private var goodChunks = Set<CairnCore.Digest>()
    private var badChunkErrors: [CairnCore.Digest: CairnError] = [:]

    package init(repository: Repository, level: VerifyLevel, sample: Double? = nil, nativeCheckers: Bool = true,
                 checkerTimeout: TimeInterval = 1800, boot: ((SnapshotEntry) throws -> BootOutcome)? = nil,
                 progress: any ProgressReporter = SilentProgress(), cancel: CancellationToken = CancellationToken(),
                 workers: Int = defaultIOWorkerCount(), toolVersion: String) {
        self.repository = repository; self.level = level; self.sample = sample; self.nativeCheckers = nativeCheckers
        self.checkerTimeout = checkerTimeout; self.boot = boot; self.progress = progress; self.cancel = cancel
        self.workers = workers; self.toolVersion = toolVersion
    }

    /// Parses `--sample`: a percentage in (0, 100].
    package static func parseSample(_ text: String) throws -> Double {
        let t = text.hasSuffix("%") ? String(text.dropLast()) : text
        guard let p = Double(t), p > 0, p <= 100 else {
            throw CairnError(.usage, "cannot read the sample '\(text)'", hint: "give a percentage above 0 and at most 100, like 10%")
        }
        return p / 100
    }

    /// The snapshots among `snapshots` without any record at `level` or above (`--all-unverified`).
    package static func unverified(_ snapshots: [SnapshotEntry], records: [String: [VerificationRecord]], level: VerifyLevel) -> [SnapshotEntry] {
        snapshots.filter { s in !(records[s.id.hex] ?? []).contains { $0.level >= level } }
    }

    /// Verifies each snapshot in turn, stores its record and hands it to `onRecord` (for output
    /// as it happens). Records of snapshots verified before an interrupt are kept.
    @discardableResult
    package func run(_ snapshots: [SnapshotEntry], onRecord: (VerificationRecord) -> Void = { _ in }) throws -> [VerificationRecord] {
        if level == .boot && boot == nil {
            throw CairnError(.usage, "boot-level verification needs the sandbox, which this cairn cannot run",
                             hint: "verify at --level filesystem or data")
        }
        let lock = try repository.lock(exclusive: false, job: "verify")
        defer { lock.release() }
        var out: [VerificationRecord] = []
        for s in snapshots {
            try cancel.check()
            let record = try verify(s)
            try cancel.check()   // a record cut short by an interrupt is not stored
            try repository.saveVerification(record)
            out.append(record)
            onRecord(record)
        }
        return out
    }

    /// Verifies one snapshot (without storing the record).
    package func verify(_ s: SnapshotEntry) throws -> VerificationRecord {
        let started = Date()
        var levels: [VerificationRecord.LevelResult] = []
        var bad: [CairnCore.Digest] = []
        var evidence: [VerificationRecord.Evidence] = []
        for l in level.cumulative {
            if levels.contains(where: { $0.outcome == .failed }) {
                levels.append(.init(level: l, outcome: .skipped, reason: "not run: a lower level failed"))
                continue
            }
            let t0 = Date()
            var result: VerificationRecord.LevelResult
            switch l {
            case .data:
                (result, bad) = try verifyData(s)
            case .filesystem:
                result = try verifyFileSystems(s)
            case .boot:
                (result, evidence) = try verifyBoot(s)
            }
            result.seconds = (Date().timeIntervalSince(t0) * 1000).rounded() / 1000
            levels.append(result)
        }
        let failed = levels.first { $0.outcome == .failed }
        return VerificationRecord(
            snapshot: s.id.hex, vm: s.manifest.vm, time: timestamp(started), host: hostName(), toolVersion: toolVersion,
            level: level, outcome: failed == nil ? .passed : .failed, reason: failed.map { "\($0.level.rawValue): \($0.reason)" } ?? "",
            sample: sample, levels: levels, badChunks: bad.map(\.hex).sorted(), evidence: evidence)
    }

    // MARK: data

    /// Where a chunk is used first: a place (disk index or catalog) and a chunk position.
    private struct Use {
        var place: Int32
        var position: Int32
        var count: Int32
    }

    private func verifyData(_ s: SnapshotEntry) throws -> (VerificationRecord.LevelResult, [CairnCore.Digest]) {
        let codec = repository.makeCodec()
        var problems: [String] = []
        var details: [String] = []
        var places: [String] = []   // "disk sda", "disk sda catalog"
        var uses: [CairnCore.Digest: Use] = [:]
        var lengths: [CairnCore.Digest: Int] = [:]
        let chunkSize = UInt64(repository.chunkSize)
        for d in s.manifest.disks {
            for (what, hex) in d.indexReferences {
                let place = what == "index" ? "disk \(d.name)" : "disk \(d.name) \(what)"
                guard let id = CairnCore.Digest(hex: hex) else {
                    problems.append("\(place): invalid \(what) id '\(hex)'")
                    continue
                }
                let index: DiskIndex
                do {
                    index = try repository.loadIndex(id, codec: codec)
                } catch let e as CairnError {
                    problems.append("\(place): \(what) \(hex) cannot be read: \(e.message)")
                    continue
                }
                if what == "index" && index.virtualSize != d.virtualSize {
                    problems.append("\(place): index \(hex) covers \(index.virtualSize) bytes, the manifest says \(d.virtualSize)")
                }
                if UInt64(index.chunkSize) != chunkSize {
                    problems.append("\(place): \(what) \(hex) has chunk size \(index.chunkSize), the repository \(chunkSize)")
                    continue
                }
                let k = Int32(places.count)
                places.append(place)
                var zero = 0
                for (i, entry) in index.entries.enumerated() {
                    if entry.isZero { zero += 1; continue }
                    if var u = uses[entry] {
                        u.count += 1
                        uses[entry] = u
                    } else {
                        uses[entry] = Use(place: k, position: Int32(i), count: 1)
                        lengths[entry] = index.length(ofChunk: i)
                    }
                }
                details.append("\(place): \(ByteCount.format(index.virtualSize)), \(index.entries.count) chunk positions, \(zero) zero")
            }
        }
        // Which distinct chunks to read.
        var ids = uses.keys.sorted()
        if let sample, !ids.isEmpty {
            var rng = SystemRandomNumberGenerator()
            ids.shuffle(using: &rng)
            ids = Array(ids.prefix(max(1, Int((Double(ids.count) * sample).rounded(.up))))).sorted()
        }
        let toRead = ids.filter { !goodChunks.contains($0) && badChunkErrors[$0] == nil }
        let failures = try readChunks(toRead, lengths: lengths, phase: "verify \(s.id.short) data")
        for id in toRead where failures[id] == nil { goodChunks.insert(id) }
        for (id, e) in failures { badChunkErrors[id] = e }
        let bad = ids.filter { badChunkErrors[$0] != nil }
        let bytes = ids.reduce(UInt64(0)) { $0 + UInt64(lengths[$1] ?? 0) }
        details.insert("read \(ids.count) of \(uses.count) distinct chunks (\(ByteCount.format(bytes)))"
                       + (sample.map { ", a random \(Self.percent($0)) sample" } ?? ""), at: 0)
        for id in bad {
            guard let u = uses[id], let e = badChunkErrors[id] else { continue }
            let offset = UInt64(u.position) * chunkSize
            var line = "\(places[Int(u.place)]), byte offset \(offset) (chunk position \(u.position)): \(e.message)"
            if !e.message.contains(id.hex) { line += " (chunk \(id.hex))" }
            if u.count > 1 { line += "; used at \(u.count - 1) more position\(u.count == 2 ? "" : "s")" }
            problems.append(line)
        }
        if !problems.isEmpty {
            details += problems.prefix(100)
            if problems.count > 100 { details.append("... and \(problems.count - 100) more problems") }
        }
        let reason = problems.isEmpty ? "" : problems[0] + (problems.count > 1 ? " (and \(problems.count - 1) more problem\(problems.count == 2 ? "" : "s"))" : "")
        return (.init(level: .data, outcome: problems.isEmpty ? .passed : .failed, reason: reason, details: details), bad)
    }

    static func percent(_ f: Double) -> String {
        let p = f * 100
        return p == p.rounded() ? "\(Int(p))%" : String(format: "%.2f%%", p)
    }

    /// Reads, authenticates, decompresses and digest-checks `ids` in parallel; returns the
    /// failures.
    private func readChunks(_ ids: [CairnCore.Digest], lengths: [CairnCore.Digest: Int], phase: String) throws -> [CairnCore.Digest: CairnError] {
        guard !ids.isEmpty else { return [:] }
        let started = Date()
        let bad = try verifyChunks(ids, lengths: lengths, repository: repository, workers: workers, cancel: cancel,
                                   progress: progress, phase: phase, started: started).bad
        let total = ids.reduce(UInt64(0)) { $0 + UInt64(lengths[$1] ?? 0) }
        progress.finish(ProgressSnapshot(phase: phase, doneBytes: total, totalBytes: total, elapsedSeconds: Date().timeIntervalSince(started)))
        return bad
    }

    // MARK: filesystem

    private func verifyFileSystems(_ s: SnapshotEntry) throws -> VerificationRecord.LevelResult {
        var problems: [String] = []
        var details: [String] = []
        for d in s.manifest.disks {
            try cancel.check()
            let source: SnapshotDiskSource
            do {
                source = try SnapshotDiskSource(repository: repository, snapshot: s, disk: d)
            } catch let e as CairnError {
                problems.append("disk \(d.name): cannot be opened: \(e.message)")
                continue
            }
            let layout = DiskLayout.scan(source)
            let scheme = layout.table.scheme == .none ? "no partition table" : "\(layout.table.scheme) partition table"
            details.append("disk \(d.name): \(scheme), \(layout.volumes.count) volume\(layout.volumes.count == 1 ? "" : "s")")
            for w in layout.warnings { details.append("disk \(d.name): warning: \(w)") }
            for v in layout.volumes {
                try cancel.check()
                let label = "disk \(d.name) volume \(v.name.isEmpty ? "(whole disk)" : v.name)"
                var checkType: String?
                switch v.content {
                case .fileSystem(let fs):
                    checkType = fs.typeName
                    do {
                        let counts = try Self.walk(fs)
                        details.append("\(label) (\(fs.typeName)): walked \(counts.summary)")
                    } catch let e as CairnError where e.code == .interrupted {
                        throw e
                    } catch {
                        problems.append("\(label) (\(fs.typeName)): \(describe(error))")
                    }
                case .damaged(let type, let reason):
                    checkType = type
                    problems.append("\(label): the \(type) file system is damaged: \(reason)")
                case .swap:
                    details.append("\(label): swap (nothing to check)")
                case .lvmPhysicalVolume(let vg):
                    details.append("\(label): LVM physical volume of \(vg) (its logical volumes are checked as volumes)")
                case .unrecognized:
                    details.append("\(label): no file system recognised (not checked)")
                }
                guard nativeCheckers, let type = checkType else { continue }
                guard let checker = NativeChecker.forType(type) else {
                    details.append("\(label): no native checker for \(type)")
                    continue
                }
                switch checker.check(v.source, label: label, timeout: checkerTimeout, cancel: cancel) {
                case .clean(let text): details.append("\(label): \(text)")
                case .failed(let text): problems.append("\(label): \(text)")
                case .notRun(let why):
                    try cancel.check()
                    details.append("\(label): \(checker.tool) not run: \(why)")
                }
            }
        }
        details += problems
        let reason = problems.isEmpty ? "" : problems.joined(separator: "; ")
        return .init(level: .filesystem, outcome: problems.isEmpty ? .passed : .failed, reason: reason, details: details)
    }

    package struct WalkCounts: Sendable, Equatable {
        package var directories = 0
        package var files = 0
        package var symlinks = 0
        package var other = 0

        /// "9 directories, 309 files, 2 symlinks, 0 other".
        package var summary: String {
            func n(_ k: Int, _ one: String, _ many: String) -> String { "\(k) \(k == 1 ? one : many)" }
            return "\(n(directories, "directory", "directories")), \(n(files, "file", "files")), \(n(symlinks, "symlink", "symlinks")), \(other) other"
        }
    }

    /// Lists every directory, reads every node's metadata and every symlink's target; an error
    /// names the path it met. Directories reached twice are walked once; at most `maxEntries`.
    package static func walk(_ fs: any FileSystem, maxEntries: Int = 50_000_000) throws -> WalkCounts {
        var counts = WalkCounts()
        let root = fs.rootNode
        let rootMeta: FileMetadata
        do {
            rootMeta = try fs.metadata(of: root)
        } catch {
            throw CairnError(.malformedImage, "reading the root directory's metadata: \(describe(error))")
        }
        guard rootMeta.kind == .directory else {
            throw CairnError(.malformedImage, "the root node is a \(rootMeta.kind.rawValue), not a directory")
        }
        counts.directories = 1
        var seen: Set<UInt64> = [root]
        var pending: [(UInt64, String)] = [(root, "")]
        var entriesSeen = 0
        while let (dir, path) = pending.popLast() {
            let entries: [DirectoryEntry]
            do {
                entries = try fs.directory(dir)
            } catch {
                throw CairnError(.malformedImage, "listing directory \(path.isEmpty ? "/" : path): \(describe(error))")
            }
            for entry in entries {
                entriesSeen += 1
                guard entriesSeen <= maxEntries else {
                    throw CairnError(.malformedImage, "more than \(maxEntries) directory entries")
                }
                let child = path + "/" + entry.name
                let meta: FileMetadata
                do {
                    meta = try fs.metadata(of: entry.node)
                } catch {
                    throw CairnError(.malformedImage, "reading the metadata of \(child): \(describe(error))")
                }
                switch meta.kind {
                case .directory:
                    if seen.insert(entry.node).inserted {
                        counts.directories += 1
                        pending.append((entry.node, child))
                    }
                case .symlink:
                    counts.symlinks += 1
                    do {
                        _ = try fs.readLink(entry.node)
                    } catch {
                        throw CairnError(.malformedImage, "reading the symlink \(child): \(describe(error))")
                    }
                case .regular:
                    counts.files += 1
                default:
                    counts.other += 1
                }
            }
        }
        return counts
    }

    // MARK: boot

    private func verifyBoot(_ s: SnapshotEntry) throws -> (VerificationRecord.LevelResult, [VerificationRecord.Evidence]) {
        guard let boot else {
            throw CairnError(.usage, "boot-level verification needs the sandbox, which this cairn cannot run")
        }
        let outcome = try boot(s)
        var details: [String] = []
        var evidence: [VerificationRecord.Evidence] = []
        var total = 0
        for e in outcome.evidence {
            guard VerificationRecord.isValidEvidenceName(e.name), !evidence.contains(where: { $0.name == e.name }) else {
                details.append("evidence '\(e.name)' dropped: not a plain, unique file name")
                continue
            }
            guard evidence.count < Magic.maxEvidenceFiles, total + e.bytes.count <= Magic.maxEvidenceBytes else {
                details.append("evidence \(e.name) (\(ByteCount.format(UInt64(e.bytes.count)))) dropped: over the limit of \(Magic.maxEvidenceFiles) files, \(ByteCount.format(UInt64(Magic.maxEvidenceBytes)))")
                continue
            }
            total += e.bytes.count
            evidence.append(.init(name: e.name, data: Data(e.bytes)))
            details.append("evidence \(e.name): \(ByteCount.format(UInt64(e.bytes.count)))")
        }
        return (.init(level: .boot, outcome: outcome.passed ? .passed : .failed, reason: outcome.passed ? "" : outcome.reason,
                      details: (outcome.passed && !outcome.reason.isEmpty ? [outcome.reason] : []) + details), evidence)
    }
}
